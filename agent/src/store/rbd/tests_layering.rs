#![allow(clippy::cast_possible_truncation)] // small test values
//! Cluster tests of clones, flatten and changed extents (harness in `tests.rs`).

use super::tests::{kind_at, pattern, read, Scratch, MIB};
use crate::config::ImageUri;
use crate::store::{BlockStore, ExtentKind, StoreError};

/// Ranges of `changed` cover `offset..offset+len`.
fn covers(changed: &[(u64, u64)], offset: u64, len: u64) -> bool {
    let mut pos = offset;
    for &(off, l) in changed {
        if off <= pos && pos < off + l {
            pos = off + l;
        }
        if pos >= offset + len {
            return true;
        }
    }
    pos >= offset + len
}

#[test]
fn clone_reads_parent_and_writes_stay_in_the_child() {
    let scratch = Scratch::new();
    let ceph = &scratch.ceph;
    let (parent_name, parent) = scratch.create("rbd", "parent", 12 * MIB);
    parent.write_at(&pattern(1, (2 * MIB) as usize), 0).unwrap();
    parent.write_at(&pattern(2, 4096), 9 * MIB).unwrap();
    parent.create_snapshot("base").unwrap();
    // A child in another pool.
    let child_name = scratch.name("backup", "child");
    let child = ceph.clone_image("rbd", &parent_name, "base", "backup", &child_name).unwrap();
    assert_eq!(child.size(), 12 * MIB);
    assert_eq!(read(&child, 0, (2 * MIB) as usize), pattern(1, (2 * MIB) as usize));
    assert_eq!(read(&child, 9 * MIB, 4096), pattern(2, 4096));
    let expected = ImageUri::Rbd { pool: "rbd".into(), image: parent_name.clone(), snap: Some("base".into()) };
    assert_eq!(child.parent().unwrap(), Some(expected));
    assert_eq!(parent.parent().unwrap(), None);

    // Extents of the child report the parent's allocation where it reads from it.
    let extents = child.extents(0, 12 * MIB).unwrap();
    assert_eq!(kind_at(&extents, 4096), ExtentKind::Data);
    assert_eq!(kind_at(&extents, 9 * MIB), ExtentKind::Data);
    assert_eq!(kind_at(&extents, 5 * MIB), ExtentKind::Hole);

    // Child writes and discards never reach the parent.
    child.write_at(&pattern(3, 4096), 4096).unwrap();
    child.discard(MIB, 65536).unwrap();
    child.discard(8 * MIB, 4 * MIB).unwrap();
    assert_eq!(read(&child, 4096, 4096), pattern(3, 4096));
    assert_eq!(read(&child, MIB, 65536), vec![0; 65536]);
    assert_eq!(read(&child, 9 * MIB, 4096), vec![0; 4096]);
    assert_eq!(read(&parent, 0, (2 * MIB) as usize), pattern(1, (2 * MIB) as usize));
    assert_eq!(read(&parent, 9 * MIB, 4096), pattern(2, 4096));
    let base = parent.open_snapshot("base").unwrap();
    assert_eq!(read(&*base, 0, (2 * MIB) as usize), pattern(1, (2 * MIB) as usize));

    // Parent writes after the snapshot never reach the child.
    parent.write_at(&pattern(4, 4096), 3 * MIB).unwrap();
    assert_eq!(read(&child, 3 * MIB, 4096), read(&*base, 3 * MIB, 4096));

    // The snapshot cannot go while the child depends on it; the parent image neither.
    match parent.remove_snapshot("base") {
        Err(StoreError::Busy(what, why)) => {
            assert_eq!(what, format!("rbd/{parent_name}@base"));
            assert!(why.contains(&child_name), "{why}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(parent.list_snapshots().unwrap().len(), 1);
    drop(base);
    assert!(matches!(ceph.remove("rbd", &parent_name), Err(StoreError::Busy(..))));
}

#[test]
fn clone_of_missing_snapshot_or_onto_existing_image_fails() {
    let scratch = Scratch::new();
    let (parent_name, parent) = scratch.create("rbd", "p", MIB);
    let child_name = scratch.name("rbd", "c");
    let missing = scratch.ceph.clone_image("rbd", &parent_name, "nope", "rbd", &child_name);
    assert!(matches!(missing, Err(StoreError::NotFound(t)) if t == format!("rbd/{parent_name}@nope")));
    parent.create_snapshot("s").unwrap();
    let (taken, _) = scratch.create("rbd", "taken", MIB);
    let onto = scratch.ceph.clone_image("rbd", &parent_name, "s", "rbd", &taken);
    assert!(matches!(onto, Err(StoreError::Exists(t)) if t == format!("rbd/{taken}")));
}

#[test]
fn flatten_detaches_and_keeps_data() {
    let scratch = Scratch::new();
    let (parent_name, parent) = scratch.create("rbd", "fparent", 12 * MIB);
    parent.write_at(&pattern(5, (3 * MIB) as usize), 2 * MIB).unwrap();
    parent.create_snapshot("base").unwrap();
    let child_name = scratch.name("rbd", "fchild");
    let child = scratch.ceph.clone_image("rbd", &parent_name, "base", "rbd", &child_name).unwrap();
    child.write_at(&pattern(6, 4096), 0).unwrap();

    let mut calls = Vec::new();
    child.flatten(&mut |done, total| calls.push((done, total))).unwrap();
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|&(done, total)| done <= total && total > 0), "{calls:?}");
    assert_eq!(child.parent().unwrap(), None);
    assert_eq!(read(&child, 2 * MIB, (3 * MIB) as usize), pattern(5, (3 * MIB) as usize));
    assert_eq!(read(&child, 0, 4096), pattern(6, 4096));
    // Now the child owns the data: own changes since nothing include it.
    let own = child.changed_extents(None, 0, 12 * MIB).unwrap();
    assert!(covers(&own, 2 * MIB, 3 * MIB), "{own:?}");
    // Flattening again is a no-op, and the parent snapshot is free to go.
    child.flatten(&mut |_, _| panic!("no parent, no progress")).unwrap();
    parent.remove_snapshot("base").unwrap();
    assert_eq!(read(&child, 2 * MIB, 4096), pattern(5, 4096));
}

#[test]
fn changed_extents_since_a_snapshot() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "changed", 20 * MIB);
    store.write_at(&pattern(1, 65536), 0).unwrap();
    store.write_at(&pattern(1, 65536), 13 * MIB).unwrap();
    store.create_snapshot("s1").unwrap();
    assert_eq!(store.changed_extents(Some("s1"), 0, 20 * MIB).unwrap(), vec![]);

    store.write_at(&pattern(2, 4096), 8192).unwrap(); // in an object that existed at s1
    store.write_at(&pattern(2, 10_000), 6 * MIB + 3).unwrap(); // a new object
    store.discard(13 * MIB, 65536).unwrap(); // data removed since s1
    let changed = store.changed_extents(Some("s1"), 0, 20 * MIB).unwrap();
    assert!(covers(&changed, 8192, 4096), "{changed:?}");
    assert!(covers(&changed, 6 * MIB + 3, 10_000), "{changed:?}");
    assert!(covers(&changed, 13 * MIB, 65536), "{changed:?}");
    assert!(!covers(&changed, 17 * MIB, 1), "{changed:?}");
    // Sorted, disjoint, within the range asked.
    assert!(changed.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0), "{changed:?}");
    let part = store.changed_extents(Some("s1"), 6 * MIB, MIB).unwrap();
    assert!(part.iter().all(|&(o, l)| o >= 6 * MIB && o + l <= 7 * MIB), "{part:?}");
    assert!(covers(&part, 6 * MIB + 3, 10_000));

    // From nothing: everything ever written (and still there).
    let all = store.changed_extents(None, 0, 20 * MIB).unwrap();
    assert!(covers(&all, 0, 65536) && covers(&all, 6 * MIB + 3, 10_000), "{all:?}");

    // Between two snapshots, seen from the later snapshot's view.
    store.create_snapshot("s2").unwrap();
    store.write_at(&pattern(3, 4096), 18 * MIB).unwrap();
    let s2 = store.open_snapshot("s2").unwrap();
    let between = s2.changed_extents(Some("s1"), 0, 20 * MIB).unwrap();
    assert!(covers(&between, 8192, 4096) && !covers(&between, 18 * MIB, 4096), "{between:?}");
    assert!(matches!(store.changed_extents(Some("nope"), 0, MIB), Err(StoreError::NotFound(_))));
}

#[test]
fn changed_extents_of_a_clone_exclude_the_parent() {
    let scratch = Scratch::new();
    let (parent_name, parent) = scratch.create("rbd", "cparent", 8 * MIB);
    parent.write_at(&pattern(1, (2 * MIB) as usize), 0).unwrap();
    parent.create_snapshot("base").unwrap();
    let child_name = scratch.name("rbd", "cchild");
    let child = scratch.ceph.clone_image("rbd", &parent_name, "base", "rbd", &child_name).unwrap();
    assert_eq!(child.changed_extents(None, 0, 8 * MIB).unwrap(), vec![]);
    child.write_at(&pattern(2, 4096), 5 * MIB).unwrap();
    let own = child.changed_extents(None, 0, 8 * MIB).unwrap();
    assert!(covers(&own, 5 * MIB, 4096), "{own:?}");
    assert!(!covers(&own, 0, 1), "{own:?}");
}
