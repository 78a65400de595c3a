//! Contract tests: the same cases, with the same expectations, run against
//! every store — `file:` always, `rbd:` against the real cluster named by
//! `RBDSYNC_TEST_CEPH_CONF` (the test fails, never skips, without it).
#![allow(clippy::cast_possible_truncation)] // small test values

use std::sync::Arc;

use super::*;
use crate::config::CephConfig;

/// Where a contract run creates its images.
struct Fixture {
    stores: Arc<Stores>,
    name: Box<dyn Fn(&str) -> ImageUri>,
    _dir: Option<tempfile::TempDir>,
}

fn file_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    Fixture {
        stores: Stores::new(None),
        name: Box::new(move |n| ImageUri::file(root.join(format!("{n}.raw")))),
        _dir: Some(dir),
    }
}

/// The test cluster's `ceph:` settings; panics (fails the test) when absent.
pub(crate) fn test_ceph() -> CephConfig {
    let conf = std::env::var("RBDSYNC_TEST_CEPH_CONF")
        .expect("RBDSYNC_TEST_CEPH_CONF must name the ceph.conf of a test cluster (tests/run.sh starts one)");
    CephConfig { conf: conf.into(), client: "admin".into(), keyring: None }
}

fn rbd_fixture(pool: &'static str) -> Fixture {
    let prefix = format!("ct-{}", uuid::Uuid::new_v4().simple());
    let name = move |n: &str| ImageUri::Rbd { pool: pool.into(), image: format!("{prefix}-{n}"), snap: None };
    Fixture { stores: Stores::new(Some(test_ceph())), name: Box::new(name), _dir: None }
}

impl Fixture {
    fn create(&self, n: &str, size: u64) -> Arc<dyn BlockStore> {
        self.stores.create(&(self.name)(n), size).unwrap()
    }

    /// Removes an image and all its snapshots.
    fn destroy(&self, n: &str) {
        let uri = (self.name)(n);
        if let Ok(img) = self.stores.open(&uri, &OpenOptions::default()) {
            for s in img.list_snapshots().unwrap_or_default() {
                let _ = img.remove_snapshot(&s.name);
            }
        }
        let _ = self.stores.remove(&uri);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn read(store: &dyn BlockStore, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    store.read_at(&mut buf, offset).unwrap();
    buf
}

fn run_contract(f: &Fixture) {
    data_path(f);
    snapshots(f);
    layering(f);
    flatten_under_concurrent_writes(f);
    changed_extents(f);
    metadata(f);
    errors(f);
}

fn data_path(f: &Fixture) {
    let img = f.create("data", 8 << 20);
    let data = pattern(1, 8192);
    img.write_at(&data, 4096).unwrap();
    assert_eq!(read(img.as_ref(), 4096, 8192), data);
    assert_eq!(read(img.as_ref(), 4096 + 7, 100), data[7..107]);
    img.write_at(&[0xff; 1 << 16], 1 << 20).unwrap();
    img.write_zeroes((1 << 20) + 4096, 4096, false).unwrap();
    img.discard((1 << 20) + 32768, 32768).unwrap();
    let back = read(img.as_ref(), 1 << 20, 1 << 16);
    assert!(back[..4096].iter().all(|&b| b == 0xff));
    assert!(back[4096..8192].iter().all(|&b| b == 0));
    assert!(back[8192..32768].iter().all(|&b| b == 0xff));
    assert!(back[32768..].iter().all(|&b| b == 0));
    // read_append: after what the vector holds, the same bytes as read_at; past the end, an error.
    let mut out = vec![7u8; 3];
    img.read_append(&mut out, 8192 + 100, 4096).unwrap();
    assert_eq!(out[..3], [7, 7, 7]);
    assert_eq!(out[3..], read(img.as_ref(), 4096, 8192 + 100)[..]);
    assert!(img.read_append(&mut Vec::new(), 8192, (8 << 20) - 4096).is_err());
    img.flush().unwrap();
    let extents = img.extents(0, 8 << 20).unwrap();
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos);
        pos += e.length;
    }
    assert_eq!(pos, 8 << 20);
    let kind = |off: u64| extents.iter().find(|e| e.offset <= off && off < e.offset + e.length).unwrap().kind;
    assert_eq!(kind(4096), ExtentKind::Data);
    assert_eq!(kind(6 << 20), ExtentKind::Hole);
    assert!(img.identity().unwrap().id.len() > 3);
    drop(img);
    f.destroy("data");
}

fn snapshots(f: &Fixture) {
    let img = f.create("snap", 4 << 20);
    img.write_at(&pattern(2, 65536), 0).unwrap();
    img.create_snapshot("s1").unwrap();
    img.write_at(&pattern(3, 65536), 0).unwrap();
    img.create_snapshot("s2").unwrap();
    img.write_at(&pattern(4, 4096), 1 << 20).unwrap();
    let names: Vec<String> = img.list_snapshots().unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s2"]);
    let s1 = img.open_snapshot("s1").unwrap();
    assert_eq!(read(s1.as_ref(), 0, 65536), pattern(2, 65536));
    assert_eq!(read(s1.as_ref(), 1 << 20, 4096), vec![0; 4096]);
    assert!(s1.capabilities().read_only);
    assert!(s1.write_at(b"x", 0).is_err(), "snapshot views are read-only");
    let via_uri = f.stores.open(&(f.name)("snap").with_snap(Some("s2")), &OpenOptions::default()).unwrap();
    assert_eq!(read(via_uri.as_ref(), 0, 65536), pattern(3, 65536));
    assert!(matches!(img.create_snapshot("s1"), Err(StoreError::Exists(_))));
    img.remove_snapshot("s2").unwrap();
    assert!(matches!(img.remove_snapshot("s2"), Err(StoreError::NotFound(_))));
    assert_eq!(img.list_snapshots().unwrap().len(), 1);
    drop((img, s1, via_uri));
    f.destroy("snap");
}

fn make_parent(f: &Fixture, name: &str) -> Arc<dyn BlockStore> {
    let parent = f.create(name, 8 << 20);
    parent.write_at(&pattern(5, 1 << 20), 0).unwrap();
    parent.write_at(&pattern(6, 1 << 20), 4 << 20).unwrap();
    parent.create_snapshot("base").unwrap();
    parent
}

fn layering(f: &Fixture) {
    let parent = make_parent(f, "parent");
    let base = (f.name)("parent").with_snap(Some("base"));
    let child = f.stores.clone_image(&base, &(f.name)("child")).unwrap();
    assert_eq!(child.parent().unwrap(), Some(base.clone()));
    assert_eq!(read(child.as_ref(), 0, 1 << 20), pattern(5, 1 << 20));
    child.write_at(&pattern(7, 1000), 5000).unwrap(); // partial granule: the rest must come from the parent
    let mut expect = pattern(5, 1 << 20);
    expect[5000..6000].copy_from_slice(&pattern(7, 1000));
    assert_eq!(read(child.as_ref(), 0, 1 << 20), expect);
    child.discard(4 << 20, 1 << 20).unwrap();
    assert_eq!(read(child.as_ref(), 4 << 20, 1 << 20), vec![0; 1 << 20], "discard hides parent data");
    assert_eq!(read(parent.as_ref(), 0, 1 << 20), pattern(5, 1 << 20), "child writes never reach the parent");
    assert!(matches!(parent.remove_snapshot("base"), Err(StoreError::Busy(..))));
    let mut calls = 0;
    child
        .flatten(&mut |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
    assert!(calls > 0);
    assert_eq!(child.parent().unwrap(), None);
    assert_eq!(read(child.as_ref(), 0, 1 << 20), expect);
    assert_eq!(read(child.as_ref(), 4 << 20, 1 << 20), vec![0; 1 << 20]);
    parent.remove_snapshot("base").unwrap();
    assert_eq!(read(child.as_ref(), 0, 1 << 20), expect, "flattened child does not need the parent");
    drop((child, parent));
    f.destroy("child");
    f.destroy("parent");
}

fn flatten_under_concurrent_writes(f: &Fixture) {
    make_parent(f, "fparent");
    let base = (f.name)("fparent").with_snap(Some("base"));
    let child = f.stores.clone_image(&base, &(f.name)("fchild")).unwrap();
    let writer = {
        let child = child.clone();
        std::thread::spawn(move || {
            for i in 0..64u64 {
                child.write_at(&pattern(i as u8, 4096), i * 65536 + 512).unwrap();
            }
        })
    };
    child.flatten(&mut |_, _| {}).unwrap();
    writer.join().unwrap();
    for i in 0..64u64 {
        assert_eq!(read(child.as_ref(), i * 65536 + 512, 4096), pattern(i as u8, 4096), "write {i} was overwritten");
    }
    drop(child);
    f.destroy("fchild");
    f.destroy("fparent");
}

fn changed_extents(f: &Fixture) {
    let img = f.create("diff", 8 << 20);
    img.write_at(&pattern(1, 4096), 0).unwrap();
    img.create_snapshot("s1").unwrap();
    img.write_at(&pattern(2, 4096), 2 << 20).unwrap();
    img.write_at(&pattern(3, 100), (5 << 20) + 10).unwrap();
    let changed = img.changed_extents(Some("s1"), 0, 8 << 20).unwrap();
    let covers = |off: u64, len: u64| changed.iter().any(|&(s, l)| s <= off && off + len <= s + l);
    assert!(covers(2 << 20, 4096) && covers((5 << 20) + 10, 100), "{changed:?}");
    assert!(!covers(0, 4096), "unchanged data reported as changed: {changed:?}");
    let total: u64 = changed.iter().map(|c| c.1).sum();
    assert!(total <= 8 << 20 >> 1, "{changed:?}");
    let all = img.changed_extents(None, 0, 8 << 20).unwrap();
    assert!(all.iter().any(|&(s, l)| s == 0 || (s < 4096 && s + l > 0)), "{all:?}");
    drop(img);
    f.destroy("diff");
}

fn metadata(f: &Fixture) {
    let img = f.create("meta", 1 << 20);
    assert_eq!(img.get_meta("rbdsync.k").unwrap(), None);
    img.set_meta("rbdsync.k", "v1").unwrap();
    img.set_meta("rbdsync.j", "{\"gen\":3}").unwrap();
    assert_eq!(img.get_meta("rbdsync.k").unwrap().as_deref(), Some("v1"));
    let all = img.list_meta().unwrap();
    assert_eq!(all.get("rbdsync.j").map(String::as_str), Some("{\"gen\":3}"));
    img.remove_meta("rbdsync.k").unwrap();
    assert_eq!(img.get_meta("rbdsync.k").unwrap(), None);
    drop(img);
    f.destroy("meta");
}

fn errors(f: &Fixture) {
    let missing = f.stores.open(&(f.name)("missing"), &OpenOptions::default());
    assert!(matches!(missing, Err(StoreError::NotFound(_)) | Err(StoreError::Missing(_))), "{missing:?}");
    let img = f.create("err", 1 << 20);
    assert!(matches!(f.stores.create(&(f.name)("err"), 1 << 20), Err(StoreError::Exists(_))));
    img.create_snapshot("s").unwrap();
    assert!(
        matches!(f.stores.remove(&(f.name)("err")), Err(StoreError::Busy(..))),
        "remove refuses an image with snapshots"
    );
    assert!(matches!(img.open_snapshot("nope"), Err(StoreError::NotFound(_))));
    let wrong_size = f.stores.open(&(f.name)("err"), &OpenOptions { create_size: Some(2 << 20), read_only: false });
    assert!(matches!(wrong_size, Err(StoreError::SizeMismatch { .. })));
    drop(img);
    f.destroy("err");
    assert!(!f.stores.exists(&(f.name)("err")).unwrap());
}

#[test]
fn file_store_meets_the_contract() {
    run_contract(&file_fixture());
}

#[test]
fn rbd_store_meets_the_contract() {
    run_contract(&rbd_fixture("rbd"));
}

#[test]
fn file_child_layers_on_an_rbd_snapshot() {
    let rbd = rbd_fixture("backup");
    let parent = make_parent(&rbd, "xparent");
    let dir = tempfile::tempdir().unwrap();
    let child_uri = ImageUri::file(dir.path().join("child.raw"));
    let base = (rbd.name)("xparent").with_snap(Some("base"));
    let child = rbd.stores.clone_image(&base, &child_uri).unwrap();
    assert_eq!(read(child.as_ref(), 4 << 20, 1 << 20), pattern(6, 1 << 20));
    child.write_at(&pattern(9, 512), 0).unwrap();
    child.flatten(&mut |_, _| {}).unwrap();
    drop(parent);
    rbd.destroy("xparent");
    assert!(!rbd.stores.exists(&(rbd.name)("xparent")).unwrap(), "parent removed after flatten");
    let mut expect = pattern(5, 1 << 20);
    expect[..512].copy_from_slice(&pattern(9, 512));
    assert_eq!(read(child.as_ref(), 0, 1 << 20), expect);
}

#[test]
fn file_store_refuses_writes_when_read_only() {
    let f = file_fixture();
    f.create("ro", 1 << 20);
    let ro = f.stores.open(&(f.name)("ro"), &OpenOptions { create_size: None, read_only: true }).unwrap();
    assert!(matches!(ro.write_at(b"x", 0), Err(StoreError::ReadOnly)));
    assert!(matches!(ro.discard(0, 4096), Err(StoreError::ReadOnly)));
    assert_eq!(StoreError::ReadOnly.nbd_errno(), proto::consts::errno::EPERM);
}

#[test]
fn layered_file_child_survives_reopen_after_flush() {
    let f = file_fixture();
    make_parent(&f, "p");
    let base = (f.name)("p").with_snap(Some("base"));
    let child = f.stores.clone_image(&base, &(f.name)("c")).unwrap();
    child.write_at(&pattern(8, 3000), 70_000).unwrap();
    child.flush().unwrap();
    drop(child);
    let child = f.stores.open(&(f.name)("c"), &OpenOptions::default()).unwrap();
    let mut expect = pattern(5, 1 << 20);
    expect[70_000..73_000].copy_from_slice(&pattern(8, 3000));
    assert_eq!(read(child.as_ref(), 0, 1 << 20), expect);
    assert_eq!(child.parent().unwrap(), Some(base));
}

#[test]
fn stream_of_zero_parent_granules_hides_what_an_unflushed_write_left_in_the_child() {
    let f = file_fixture();
    make_parent(&f, "p");
    let base = (f.name)("p").with_snap(Some("base"));
    let child = f.stores.clone_image(&base, &(f.name)("c")).unwrap();
    // A write that reached the child file but not the owned map (a crash before the flush),
    // where the parent is all zeroes.
    let ImageUri::File { path, .. } = (f.name)("c") else { unreachable!() };
    let raw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&raw, &[0xaa; 8192], (2 << 20) + 65536).unwrap();
    assert_eq!(read(child.as_ref(), 1 << 20, 3 << 20), vec![0; 3 << 20], "unowned granules read from the parent");
    child.copy_from_parent(0, 8 << 20).unwrap();
    assert_eq!(read(child.as_ref(), 1 << 20, 3 << 20), vec![0; 3 << 20], "the stream showed data never written");
    assert_eq!(read(child.as_ref(), 0, 1 << 20), pattern(5, 1 << 20));
    child.detach_parent().unwrap();
    assert_eq!(read(child.as_ref(), 1 << 20, 3 << 20), vec![0; 3 << 20], "detached, the leftover is gone");
}

#[test]
fn layered_file_child_with_a_bad_granularity_is_corrupt() {
    let f = file_fixture();
    make_parent(&f, "p");
    let base = (f.name)("p").with_snap(Some("base"));
    drop(f.stores.clone_image(&base, &(f.name)("c")).unwrap());
    let ImageUri::File { path, .. } = (f.name)("c") else { unreachable!() };
    let sidecar = super::file::sidecar::path_of(&path);
    let text = std::fs::read_to_string(&sidecar).unwrap();
    for bad in ["0", "3000", "256"] {
        std::fs::write(&sidecar, text.replace("\"granularity\": 65536", &format!("\"granularity\": {bad}"))).unwrap();
        let opened = f.stores.open(&(f.name)("c"), &OpenOptions::default());
        assert!(
            matches!(&opened, Err(StoreError::Corrupt(_, why)) if why.contains("granularity")),
            "{bad}: {opened:?}"
        );
    }
}
