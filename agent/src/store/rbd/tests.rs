#![allow(clippy::cast_possible_truncation)] // small test values
//! Tests against a real cluster. `RBDSYNC_TEST_CEPH_CONF` names its
//! ceph.conf (`deploy/dev/ceph-cluster.sh up DIR` writes `DIR/ceph.conf`,
//! client `admin`, keyring named in the conf; pools `rbd` and `backup`).
//! Without the variable every test here fails: they are never skipped.
//!
//! Each test makes images with unique names through [`Scratch`], which
//! removes them (children first, snapshots first) when it is dropped;
//! declare it before the stores so they are closed first.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::*;
use crate::store::{BlockStore, ExtentKind};

/// Env var naming the test cluster's ceph.conf.
pub(super) const CONF_ENV: &str = "RBDSYNC_TEST_CEPH_CONF";
pub(super) const MIB: u64 = 1 << 20;

/// Settings for the test cluster; panics with instructions if it is not configured.
pub(super) fn config() -> CephConfig {
    let conf = std::env::var_os(CONF_ENV).unwrap_or_else(|| {
        panic!(
            "{CONF_ENV} is not set: the rbd store tests need a Ceph cluster. Start one with \
             `deploy/dev/ceph-cluster.sh up DIR` and `export {CONF_ENV}=DIR/ceph.conf`"
        )
    });
    CephConfig { conf: PathBuf::from(conf), client: "admin".into(), keyring: None }
}

/// One connection shared by the tests of this process.
pub(super) fn ceph() -> Arc<Ceph> {
    static CEPH: OnceLock<Arc<Ceph>> = OnceLock::new();
    CEPH.get_or_init(|| {
        let config = config();
        Arc::new(Ceph::connect(&config).unwrap_or_else(|e| panic!("Cannot connect to {}: {e}", config.conf.display())))
    })
    .clone()
}

/// Images a test created; removed on drop, newest first.
pub(super) struct Scratch {
    pub(super) ceph: Arc<Ceph>,
    images: Mutex<Vec<(String, String)>>,
}

impl Scratch {
    pub(super) fn new() -> Self {
        Self { ceph: ceph(), images: Mutex::new(Vec::new()) }
    }

    /// A fresh image name in `pool`, removed with the scratch.
    pub(super) fn name(&self, pool: &str, tag: &str) -> String {
        let name = format!("t-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        self.images.lock().unwrap().push((pool.to_owned(), name.clone()));
        name
    }

    /// Creates a fresh image.
    pub(super) fn create(&self, pool: &str, tag: &str, size: u64) -> (String, RbdStore) {
        let name = self.name(pool, tag);
        let store = self.ceph.create(pool, &name, size).unwrap();
        (name, store)
    }

    fn purge(&self, pool: &str, image: &str) -> Result<(), StoreError> {
        match self.ceph.open(pool, image, None, false) {
            Ok(store) => {
                for snap in store.list_snapshots()? {
                    store.remove_snapshot(&snap.name)?;
                }
            }
            Err(StoreError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        self.ceph.remove(pool, image)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let images = std::mem::take(&mut *self.images.lock().unwrap_or_else(|p| p.into_inner()));
        for (pool, image) in images.iter().rev() {
            if let Err(e) = self.purge(pool, image) {
                eprintln!("cleanup of {pool}/{image} failed: {e}");
            }
        }
    }
}

/// `len` bytes of a pattern that differs per `seed`.
pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

pub(super) fn read(store: &dyn BlockStore, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    store.read_at(&mut buf, offset).unwrap();
    buf
}

pub(super) fn kind_at(extents: &[crate::store::Extent], off: u64) -> ExtentKind {
    extents.iter().find(|e| e.offset <= off && off < e.offset + e.length).unwrap().kind
}

/// The shared contract (`store/tests.rs`) runs against `rbd:` too; this checks what only librbd does.
#[test]
fn capabilities_are_all_on() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "caps", MIB);
    let caps = store.capabilities();
    assert!(!caps.read_only && caps.discard && caps.write_zeroes && caps.extents);
    assert!(caps.snapshots && caps.layering && caps.metadata);
}

#[test]
fn create_open_exists_list_remove() {
    let scratch = Scratch::new();
    let ceph = &scratch.ceph;
    let (name, store) = scratch.create("backup", "life", 12 * MIB);
    assert_eq!(store.size(), 12 * MIB);
    assert!(ceph.exists("backup", &name).unwrap());
    assert!(ceph.list("backup").unwrap().contains(&name));
    assert!(matches!(ceph.create("backup", &name, MIB), Err(StoreError::Exists(t)) if t == format!("backup/{name}")));
    // Open while another handle (ours) is open: fine; removing while open: Busy.
    let again = ceph.open("backup", &name, None, true).unwrap();
    assert!(again.capabilities().read_only);
    assert!(matches!(again.write_at(b"x", 0), Err(StoreError::ReadOnly)));
    assert!(matches!(ceph.remove("backup", &name), Err(StoreError::Busy(..))));
    drop((store, again));
    ceph.remove("backup", &name).unwrap();
    assert!(!ceph.exists("backup", &name).unwrap());
    assert!(!ceph.list("backup").unwrap().contains(&name));
    assert!(
        matches!(ceph.open("backup", &name, None, false), Err(StoreError::NotFound(t)) if t == format!("backup/{name}"))
    );
    assert!(matches!(ceph.remove("backup", &name), Err(StoreError::NotFound(_))));
}

#[test]
fn data_survives_reopen_and_crosses_objects() {
    let scratch = Scratch::new();
    let (name, store) = scratch.create("rbd", "data", 16 * MIB);
    // Spans the 4 MiB object boundary, unaligned at both ends.
    let data = pattern(7, (MIB + 12345) as usize);
    let at = 4 * MIB - 5000;
    store.write_at(&data, at).unwrap();
    store.flush().unwrap();
    drop(store);
    let store = scratch.ceph.open("rbd", &name, None, false).unwrap();
    assert_eq!(read(&store, at, data.len()), data);
    assert_eq!(read(&store, at - 100, 100), vec![0; 100]);
    assert_eq!(read(&store, 16 * MIB - 4096, 4096), vec![0; 4096]);
    assert!(matches!(store.write_at(b"xy", 16 * MIB - 1), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(store.read_at(&mut [0u8; 1], 16 * MIB), Err(StoreError::OutOfRange { .. })));
}

#[test]
fn zeroes_and_discards_read_back_as_zeroes() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "zero", 12 * MIB);
    let ones = vec![0xffu8; (12 * MIB) as usize];
    store.write_at(&ones, 0).unwrap();
    // Small unaligned discard (under rbd_discard_granularity_bytes), a whole object, and thick zeroes.
    store.discard(1000, 3000).unwrap();
    store.discard(4 * MIB, 4 * MIB).unwrap();
    store.write_zeroes(9 * MIB + 7, 100_000, false).unwrap();
    store.write_zeroes(10 * MIB + 3, 5000, true).unwrap();
    let back = read(&store, 0, ones.len());
    let zero = |from: u64, len: u64| (from..from + len).all(|i| back[i as usize] == 0);
    let ones_at = |from: u64, len: u64| (from..from + len).all(|i| back[i as usize] == 0xff);
    assert!(ones_at(0, 1000) && zero(1000, 3000) && ones_at(4000, 4 * MIB - 4000));
    assert!(zero(4 * MIB, 4 * MIB) && ones_at(8 * MIB, MIB + 7));
    assert!(zero(9 * MIB + 7, 100_000) && ones_at(9 * MIB + 100_007, MIB - 100_004));
    assert!(zero(10 * MIB + 3, 5000) && ones_at(10 * MIB + 5003, 2 * MIB - 5003));
    // The whole discarded object is a hole now.
    let extents = store.extents(0, 12 * MIB).unwrap();
    assert_eq!(kind_at(&extents, 5 * MIB), ExtentKind::Hole);
    assert_eq!(kind_at(&extents, 0), ExtentKind::Data);
}

#[test]
fn extents_show_data_and_holes() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "extents", 20 * MIB);
    assert_eq!(
        store.extents(0, 20 * MIB).unwrap(),
        vec![crate::store::Extent { offset: 0, length: 20 * MIB, kind: ExtentKind::Hole }]
    );
    store.write_at(&pattern(1, 4096), 4096).unwrap();
    store.write_at(&pattern(2, 65536), 9 * MIB).unwrap();
    let extents = store.extents(0, 20 * MIB).unwrap();
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos);
        pos += e.length;
    }
    assert_eq!(pos, 20 * MIB);
    assert_eq!(kind_at(&extents, 4096), ExtentKind::Data);
    assert_eq!(kind_at(&extents, 9 * MIB + 65535), ExtentKind::Data);
    // Granularity: an object reports data from its start to its last written byte
    // (8 MiB..9 MiB+64 KiB here), so only whole unwritten objects and object tails are holes.
    for hole in [3 * MIB, 5 * MIB, 9 * MIB + 65536, 13 * MIB, 20 * MIB - 1] {
        assert_eq!(kind_at(&extents, hole), ExtentKind::Hole, "at {hole}: {extents:?}");
    }
    // A sub-range is covered exactly, and clipped at the end of the image.
    let sub = store.extents(9 * MIB + 100, 20 * MIB).unwrap();
    assert_eq!(sub.first().unwrap().offset, 9 * MIB + 100);
    assert_eq!(sub.iter().map(|e| e.length).sum::<u64>(), 11 * MIB - 100);
}

#[test]
fn snapshots_freeze_content_list_in_order_and_remove() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "snaps", 8 * MIB);
    store.write_at(&pattern(1, 8192), 0).unwrap();
    store.create_snapshot("one").unwrap();
    store.write_at(&pattern(2, 8192), 0).unwrap();
    store.resize(10 * MIB).unwrap();
    assert_eq!(store.size(), 10 * MIB);
    store.create_snapshot("two").unwrap();
    store.write_at(&pattern(3, 8192), 0).unwrap();
    assert!(matches!(store.create_snapshot("one"), Err(StoreError::Exists(_))));

    let snaps = store.list_snapshots().unwrap();
    assert_eq!(snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["one", "two"]);
    assert!(snaps[0].id < snaps[1].id);
    assert_eq!((snaps[0].size, snaps[1].size), (8 * MIB, 10 * MIB));

    let one = store.open_snapshot("one").unwrap();
    let two = store.open_snapshot("two").unwrap();
    assert_eq!(read(&*one, 0, 8192), pattern(1, 8192));
    assert_eq!(read(&*two, 0, 8192), pattern(2, 8192));
    assert_eq!(read(&store, 0, 8192), pattern(3, 8192));
    assert_eq!((one.size(), two.size()), (8 * MIB, 10 * MIB));
    assert!(matches!(store.open_snapshot("nope"), Err(StoreError::NotFound(_))));

    store.remove_snapshot("one").unwrap();
    assert_eq!(store.list_snapshots().unwrap().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["two"]);
    assert!(matches!(store.remove_snapshot("one"), Err(StoreError::NotFound(_))));
}

#[test]
fn snapshot_views_are_read_only() {
    let scratch = Scratch::new();
    let (name, store) = scratch.create("rbd", "view", 4 * MIB);
    store.write_at(&pattern(9, 4096), 0).unwrap();
    store.create_snapshot("s").unwrap();
    let view = store.open_snapshot("s").unwrap();
    let by_name = scratch.ceph.open("rbd", &name, Some("s"), false).unwrap();
    for v in [&*view, &by_name as &dyn BlockStore] {
        assert!(v.capabilities().read_only);
        assert!(matches!(v.write_at(b"x", 0), Err(StoreError::ReadOnly)));
        assert!(matches!(v.write_zeroes(0, 4096, true), Err(StoreError::ReadOnly)));
        assert!(matches!(v.discard(0, 4096), Err(StoreError::ReadOnly)));
        assert!(matches!(v.set_meta("k", "v"), Err(StoreError::ReadOnly)));
        assert!(matches!(v.create_snapshot("t"), Err(StoreError::ReadOnly)));
        assert!(matches!(v.resize(MIB), Err(StoreError::ReadOnly)));
        v.flush().unwrap();
        assert_eq!(read(v, 0, 4096), pattern(9, 4096));
    }
    let (head, snap) = (store.identity().unwrap(), view.identity().unwrap());
    assert!(head.id.starts_with("rbd:") && snap.id.starts_with(&head.id) && snap.id != head.id);
    assert!(snap.modified_ns > 0);
    // The same name re-created is another snapshot.
    drop((view, by_name));
    store.remove_snapshot("s").unwrap();
    store.create_snapshot("s").unwrap();
    assert_ne!(store.open_snapshot("s").unwrap().identity().unwrap().id, snap.id);
}

#[test]
fn identity_changes_when_the_image_is_replaced() {
    let scratch = Scratch::new();
    let (name, store) = scratch.create("rbd", "ident", MIB);
    let first = store.identity().unwrap();
    assert!(first.id.starts_with("rbd:") && first.id.len() > 4);
    assert!(first.modified_ns > 1_600_000_000 * 1_000_000_000, "{first:?}");
    assert_eq!(store.identity().unwrap().id, first.id);
    drop(store);
    scratch.ceph.remove("rbd", &name).unwrap();
    let store = scratch.ceph.create("rbd", &name, MIB).unwrap();
    assert_ne!(store.identity().unwrap().id, first.id);
}

#[test]
fn metadata_set_get_list_remove() {
    let scratch = Scratch::new();
    let (name, store) = scratch.create("rbd", "meta", MIB);
    assert_eq!(store.get_meta("rbdsync.a").unwrap(), None);
    store.set_meta("rbdsync.a", "1").unwrap();
    store.set_meta("rbdsync.empty", "").unwrap();
    let long = "x".repeat(10_000);
    store.set_meta("rbdsync.long", &long).unwrap();
    store.set_meta("rbdsync.a", "2").unwrap();
    assert_eq!(store.get_meta("rbdsync.a").unwrap().as_deref(), Some("2"));
    assert_eq!(store.get_meta("rbdsync.long").unwrap(), Some(long.clone()));
    assert_eq!(store.get_meta("rbdsync.empty").unwrap().as_deref(), Some(""));
    let all = store.list_meta().unwrap();
    let ours: Vec<_> =
        all.iter().filter(|(k, _)| k.starts_with("rbdsync.")).map(|(k, v)| (k.as_str(), v.len())).collect();
    assert_eq!(ours, [("rbdsync.a", 1), ("rbdsync.empty", 0), ("rbdsync.long", 10_000)]);
    store.remove_meta("rbdsync.a").unwrap();
    store.remove_meta("rbdsync.a").unwrap();
    assert_eq!(store.get_meta("rbdsync.a").unwrap(), None);
    // Durable: another handle sees it.
    let other = scratch.ceph.open("rbd", &name, None, true).unwrap();
    assert_eq!(other.get_meta("rbdsync.long").unwrap(), Some(long));
}

#[test]
fn metadata_lists_past_one_page() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "metapage", MIB);
    for i in 0..600 {
        store.set_meta(&format!("k{i:04}"), &i.to_string()).unwrap();
    }
    let all = store.list_meta().unwrap();
    assert_eq!(all.len(), 600);
    assert_eq!(all.get("k0599").map(String::as_str), Some("599"));
}

#[test]
fn missing_pool_and_image_are_not_found() {
    let ceph = ceph();
    assert!(
        matches!(ceph.open("no-such-pool", "x", None, false), Err(StoreError::NotFound(t)) if t == "pool no-such-pool")
    );
    assert!(matches!(ceph.exists("no-such-pool", "x"), Err(StoreError::NotFound(_))));
    assert!(matches!(ceph.create("no-such-pool", "x", MIB), Err(StoreError::NotFound(_))));
    assert!(matches!(ceph.list("no-such-pool"), Err(StoreError::NotFound(_))));
    assert!(!ceph.exists("rbd", "t-never-created").unwrap());
    assert!(
        matches!(ceph.open("rbd", "t-never-created", None, true), Err(StoreError::NotFound(t)) if t == "rbd/t-never-created")
    );
    assert!(matches!(ceph.open("rbd", "bad\0name", None, true), Err(StoreError::Ceph { errno: libc::EINVAL, .. })));
}

#[test]
fn remove_refuses_an_image_with_snapshots() {
    let scratch = Scratch::new();
    let (name, store) = scratch.create("rbd", "busy", MIB);
    store.create_snapshot("keep").unwrap();
    drop(store);
    match scratch.ceph.remove("rbd", &name) {
        Err(StoreError::Busy(target, why)) => {
            assert_eq!((target, why.as_str()), (format!("rbd/{name}"), "it has snapshots"))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(scratch.ceph.exists("rbd", &name).unwrap());
    assert_eq!(scratch.ceph.open("rbd", &name, None, true).unwrap().list_snapshots().unwrap().len(), 1);
}

/// A private conf naming the test cluster's keyring but monitor `mon_host`.
fn conf_with(dir: &std::path::Path, mon_host: &str, keyring: &std::path::Path) -> PathBuf {
    let path = dir.join("ceph.conf");
    std::fs::write(&path, format!("[global]\nmon_host = {mon_host}\nkeyring = {}\n", keyring.display())).unwrap();
    path
}

/// The `mon_host` and client keyring of the test cluster's conf.
fn cluster_mon_and_keyring() -> (String, PathBuf) {
    let conf = std::fs::read_to_string(config().conf).unwrap();
    let value = |key: &str| {
        conf.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| panic!("{key} not in the test conf"))
    };
    (value("mon_host"), PathBuf::from(value("keyring")))
}

#[test]
fn unreachable_monitor_fails_within_the_timeout() {
    let (_, keyring) = cluster_mon_and_keyring();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 (discard) here.
    let conf = conf_with(dir.path(), "[v2:127.0.0.1:9]", &keyring);
    let config = CephConfig { conf, client: "admin".into(), keyring: None };
    let started = Instant::now();
    let err = Ceph::connect_with_timeout(&config, Duration::from_secs(2)).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, StoreError::Ceph { op: "rados_connect", .. }), "{err:?}");
    assert!(took < Duration::from_secs(12), "took {took:?}");
}

#[test]
fn wrong_key_fails_within_the_timeout() {
    let (mon_host, _) = cluster_mon_and_keyring();
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("wrong.keyring");
    std::fs::write(&keyring, "[client.admin]\n\tkey = AQChMwlrzzJnIRAA1G8o6FrMUP+f4hU9n7tnQg==\n").unwrap();
    let conf = conf_with(dir.path(), &mon_host, &keyring);
    let config = CephConfig { conf, client: "admin".into(), keyring: Some(keyring) };
    let started = Instant::now();
    let err = Ceph::connect_with_timeout(&config, Duration::from_secs(2)).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, StoreError::Ceph { op: "rados_connect", .. }), "{err:?}");
    assert!(took < Duration::from_secs(12), "took {took:?}");
    // And a client without any key.
    let config = CephConfig { keyring: Some(dir.path().join("missing.keyring")), ..config };
    assert!(matches!(Ceph::connect_with_timeout(&config, Duration::from_secs(2)), Err(StoreError::Ceph { .. })));
}

#[test]
fn missing_conf_is_an_open_error() {
    let config = CephConfig { conf: "/nonexistent/ceph.conf".into(), client: "admin".into(), keyring: None };
    assert!(matches!(Ceph::connect(&config), Err(StoreError::Open { .. })));
}

#[test]
fn concurrent_io_on_one_image() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "threads", 8 * MIB);
    let store = Arc::new(store);
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..16u64 {
                    let off = (u64::from(t) * 16 + i) * 65536;
                    let data = pattern(t.wrapping_add(i as u8), 65536);
                    store.write_at(&data, off).unwrap();
                    assert_eq!(read(&*store, off, 65536), data);
                }
            });
        }
    });
    store.flush().unwrap();
}
