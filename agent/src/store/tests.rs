#![allow(clippy::cast_possible_truncation)] // small test values
//! Contract tests: the same cases run against every store.

use super::*;

/// Runs every contract case against a store of at least 4 MiB, zero-filled and writable.
pub(crate) fn contract(store: &dyn BlockStore) {
    read_back_what_was_written(store);
    zeroes_and_discard_read_as_zero(store);
    extents_cover_the_range_exactly(store);
    flush_succeeds(store);
}

fn read_back_what_was_written(store: &dyn BlockStore) {
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    store.write_at(&data, 4096).unwrap();
    let mut back = vec![0u8; 8192];
    store.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    let mut unaligned = vec![0u8; 100];
    store.read_at(&mut unaligned, 4096 + 7).unwrap();
    assert_eq!(unaligned, data[7..107]);
}

fn zeroes_and_discard_read_as_zero(store: &dyn BlockStore) {
    let ones = vec![0xffu8; 1 << 16];
    store.write_at(&ones, 1 << 20).unwrap();
    store.write_zeroes((1 << 20) + 4096, 4096, false).unwrap();
    store.discard((1 << 20) + 32768, 32768).unwrap();
    let mut back = vec![0u8; 1 << 16];
    store.read_at(&mut back, 1 << 20).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0xff));
    assert!(back[4096..8192].iter().all(|&b| b == 0));
    assert!(back[8192..32768].iter().all(|&b| b == 0xff));
    assert!(back[32768..].iter().all(|&b| b == 0));
}

fn extents_cover_the_range_exactly(store: &dyn BlockStore) {
    let len = 4 << 20;
    let extents = store.extents(0, len).unwrap();
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos);
        assert!(e.length > 0);
        pos += e.length;
    }
    assert_eq!(pos, len.min(store.size()));
    if store.capabilities().extents {
        let at = |off: u64| extents.iter().find(|e| e.offset <= off && off < e.offset + e.length).unwrap().kind;
        assert_eq!(at(4096), ExtentKind::Data);
        assert_eq!(at(3 << 20), ExtentKind::Hole);
    }
}

fn flush_succeeds(store: &dyn BlockStore) {
    store.flush().unwrap();
}

#[test]
fn file_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions { create_size: Some(8 << 20), read_only: false };
    let store = file::FileStore::open(&dir.path().join("img.raw"), &opts).unwrap();
    contract(&store);
}

#[test]
fn file_store_refuses_writes_when_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.raw");
    file::FileStore::open(&path, &OpenOptions { create_size: Some(1 << 20), read_only: false }).unwrap();
    let ro = file::FileStore::open(&path, &OpenOptions { create_size: None, read_only: true }).unwrap();
    assert!(matches!(ro.write_at(b"x", 0), Err(StoreError::ReadOnly)));
    assert!(matches!(ro.discard(0, 4096), Err(StoreError::ReadOnly)));
    assert_eq!(StoreError::ReadOnly.nbd_errno(), proto::consts::errno::EPERM);
}

#[test]
fn file_store_checks_size_and_existence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.raw");
    let missing = file::FileStore::open(&path, &OpenOptions { create_size: None, read_only: false });
    assert!(matches!(missing, Err(StoreError::Missing(_))));
    file::FileStore::open(&path, &OpenOptions { create_size: Some(1 << 20), read_only: false }).unwrap();
    let wrong = file::FileStore::open(&path, &OpenOptions { create_size: Some(2 << 20), read_only: false });
    assert!(matches!(wrong, Err(StoreError::SizeMismatch { expected: 2097152, actual: 1048576, .. })));
}
