//! Holds on backup snapshots. A disk layered on a backup snapshot (a
//! migration destination until its stream detaches it) reads from that
//! snapshot, so retention on the backup chain must not remove it. The
//! destination records a hold in the backup image's metadata,
//! `rbdsync.hold.SNAP/HOLDER` (HOLDER = `NODE:VM/DISK`), when it creates
//! the layered disk, and drops it once the stream detached the disk (or
//! the migration is aborted). Retention skips held snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use crate::config::ImageUri;
use crate::store::{OpenOptions, StoreError, Stores};

/// Metadata key prefix of holds.
pub const HOLD_PREFIX: &str = "rbdsync.hold.";

/// The holder of disk `disk`'s hold on the snapshot it is layered on: `NODE:VM/DISK`.
pub fn holder(node: &str, disk: &str) -> String {
    format!("{node}:{disk}")
}

/// The prefix of the holders of VM `vm`'s disks (`NODE:VM/`; each adds its disk's name).
pub fn vm_holders(node: &str, vm: &str) -> String {
    format!("{node}:{vm}/")
}

fn key(snap: &str, holder: &str) -> String {
    format!("{HOLD_PREFIX}{snap}/{holder}")
}

/// The holders of `snap`, from the base image's metadata.
pub fn holders(meta: &BTreeMap<String, String>, snap: &str) -> Vec<String> {
    let prefix = format!("{HOLD_PREFIX}{snap}/");
    meta.keys().filter_map(|k| k.strip_prefix(&prefix)).map(str::to_owned).collect()
}

fn base(stores: &Arc<Stores>, snapshot: &ImageUri) -> Result<(Arc<dyn crate::store::BlockStore>, String), StoreError> {
    let snap = snapshot.snap().ok_or_else(|| StoreError::NotFound(format!("a snapshot in {snapshot}")))?.to_owned();
    let image = stores.open(&snapshot.with_snap(None), &OpenOptions { create_size: None, read_only: false })?;
    Ok((image, snap))
}

/// Records that `holder` reads from `snapshot` (`URI@SNAP`).
pub fn hold(stores: &Arc<Stores>, snapshot: &ImageUri, holder: &str, why: &str) -> Result<(), StoreError> {
    let (image, snap) = base(stores, snapshot)?;
    image.set_meta(&key(&snap, holder), &json!({ "why": why, "since": super::unix_now() }).to_string())
}

/// Drops `holder`'s hold on `snapshot` (nothing if there is none).
pub fn release(stores: &Arc<Stores>, snapshot: &ImageUri, holder: &str) -> Result<(), StoreError> {
    let (image, snap) = base(stores, snapshot)?;
    match image.remove_meta(&key(&snap, holder)) {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::backup::{retention, SnapMeta, SyncMode, SNAP_KEY_PREFIX};

    #[test]
    fn retention_keeps_held_snapshots_and_releasing_lets_it_remove_them() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(None);
        let uri = ImageUri::file(dir.path().join("b.raw"));
        let image = stores.open(&uri, &OpenOptions { create_size: Some(1 << 20), read_only: false }).unwrap();
        for (i, snap) in ["s1", "s2", "s3"].into_iter().enumerate() {
            image.create_snapshot(snap).unwrap();
            let meta = SnapMeta {
                disk: "vm1/disk0".into(),
                node: "a".into(),
                sync: SyncMode::Full,
                bitmap: None,
                bitmap_uuid: None,
                generation: None,
                previous: None,
                point_in_time: i as u64,
                size: 1 << 20,
                bytes_written: 0,
            };
            image.set_meta(&format!("{SNAP_KEY_PREFIX}{snap}"), &serde_json::to_string(&meta).unwrap()).unwrap();
        }
        hold(&stores, &uri.with_snap(Some("s1")), "b:vm1/disk0", "test").unwrap();
        assert_eq!(holders(&image.list_meta().unwrap(), "s1"), ["b:vm1/disk0"]);
        let removed = retention(image.as_ref(), 1, "s3").unwrap();
        assert_eq!(removed, ["s2"], "s1 is held");
        release(&stores, &uri.with_snap(Some("s1")), "b:vm1/disk0").unwrap();
        release(&stores, &uri.with_snap(Some("s1")), "b:vm1/disk0").unwrap(); // twice: no error
        assert!(holders(&image.list_meta().unwrap(), "s1").is_empty());
        assert_eq!(retention(image.as_ref(), 1, "s3").unwrap(), ["s1"]);
    }
}
