//! [`RbdStore`]: [`BlockStore`] over an open librbd image.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::image::{DiffExtent, Image};
use crate::config::ImageUri;
use bytes::Bytes;

use crate::store::{
    AsyncIo, BlockStore, Capabilities, Extent, ExtentKind, Identity, IoFuture, SnapshotInfo, StoreError,
};

/// An open RBD image, or a read-only view of one of its snapshots.
///
/// Every method is one or a few synchronous librbd calls; librbd allows them
/// concurrently on one image, so the store is shared between NBD requests.
pub struct RbdStore {
    image: Image,
    pool: String,
    name: String,
    snap: Option<String>,
    read_only: bool,
    /// Cached at open, updated by [`resize`](BlockStore::resize).
    size: AtomicU64,
}

impl RbdStore {
    /// Wraps an open image.
    pub(super) fn new(image: Image, name: &str, snap: Option<&str>, read_only: bool) -> Result<Self, StoreError> {
        let size = image.size()?;
        let pool = image.ioctx().pool().to_owned();
        let read_only = read_only || snap.is_some();
        Ok(Self {
            image,
            pool,
            name: name.to_owned(),
            snap: snap.map(str::to_owned),
            read_only,
            size: AtomicU64::new(size),
        })
    }

    /// The URI of this image (`rbd:pool/image[@snap]`).
    pub fn uri(&self) -> ImageUri {
        ImageUri::Rbd { pool: self.pool.clone(), image: self.name.clone(), snap: self.snap.clone() }
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.read_only {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange { offset, length, size }),
        }
    }

    /// Opens this image read-only at snapshot `name`.
    fn snapshot_view(&self, name: &str) -> Result<Self, StoreError> {
        let image = Image::open(self.image.ioctx(), &self.name, Some(name), true)?;
        Self::new(image, &self.name, Some(name), true)
    }
}

impl std::fmt::Debug for RbdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdStore")
            .field("image", &self.image.spec())
            .field("read_only", &self.read_only)
            .field("size", &self.size())
            .finish()
    }
}

impl AsyncIo for RbdStore {
    fn read(&self, buf: Vec<u8>, len: usize, offset: u64) -> IoFuture<Vec<u8>> {
        if let Err(e) = self.check_range(offset, u64::try_from(len).unwrap_or(u64::MAX)) {
            return Box::pin(std::future::ready(Err(e)));
        }
        if len == 0 {
            return Box::pin(std::future::ready(Ok(buf)));
        }
        Box::pin(self.image.aio_read(buf, len, offset))
    }

    fn write(&self, data: Bytes, offset: u64) -> IoFuture<()> {
        let checked = self
            .check_writable()
            .and_then(|()| self.check_range(offset, u64::try_from(data.len()).unwrap_or(u64::MAX)));
        if checked.is_err() || data.is_empty() {
            return Box::pin(std::future::ready(checked));
        }
        Box::pin(self.image.aio_write(data, offset))
    }

    fn flush(&self) -> IoFuture<()> {
        if self.read_only {
            return Box::pin(std::future::ready(Ok(())));
        }
        Box::pin(self.image.aio_flush())
    }
}

impl BlockStore for RbdStore {
    fn async_io(&self) -> Option<&dyn AsyncIo> {
        Some(self)
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            discard: true,
            write_zeroes: true,
            extents: true,
            snapshots: true,
            layering: true,
            metadata: true,
            inline_io: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.check_range(offset, u64::try_from(buf.len()).unwrap_or(u64::MAX))?;
        if buf.is_empty() {
            return Ok(());
        }
        self.image.read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        self.check_range(offset, u64::try_from(buf.len()).unwrap_or(u64::MAX))?;
        if buf.is_empty() {
            return Ok(());
        }
        self.image.write(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), StoreError> {
        self.check_writable()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        self.image.write_zeroes(offset, length, !may_unmap)
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        // Not `rbd_discard`: it skips the parts of a range that are not
        // aligned to `rbd_discard_granularity_bytes`, which then keep their
        // data; the contract is that a discarded range reads as zeroes.
        self.image.write_zeroes(offset, length, false)
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        self.image.flush()
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError> {
        let end = offset.saturating_add(length).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let diff = self.image.diff(None, offset, end - offset, true)?;
        Ok(allocation_map(&diff, offset, end))
    }

    /// `rbd:IMAGE_ID` and the image's modify timestamp (updated by librbd at
    /// most every `rbd_mtime_update_interval`, 60 s by default); a snapshot
    /// view is `rbd:IMAGE_ID@SNAP_ID` with the snapshot's creation time, so a
    /// snapshot re-created under the same name has another identity.
    fn identity(&self) -> Result<Identity, StoreError> {
        let image_id = self.image.id()?;
        let Some(name) = &self.snap else {
            return Ok(Identity { id: format!("rbd:{image_id}"), modified_ns: self.image.modify_timestamp_ns()? });
        };
        let snaps = self.image.snap_list()?;
        let snap =
            snaps.iter().find(|s| &s.name == name).ok_or_else(|| StoreError::NotFound(self.image.spec().to_owned()))?;
        Ok(Identity { id: format!("rbd:{image_id}@{}", snap.id), modified_ns: self.image.snap_timestamp_ns(snap.id)? })
    }

    fn resize(&self, size: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        self.image.resize(size)?;
        self.size.store(self.image.size()?, Ordering::Relaxed);
        Ok(())
    }

    fn create_snapshot(&self, name: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        self.image.snap_create(name)
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        self.image.snap_list()
    }

    fn remove_snapshot(&self, name: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        // librbd would move a snapshot with (clone v2) children to the trash
        // namespace and report success; refuse instead. A child created
        // between this check and the removal still lands in that trash case.
        let children = self.snapshot_view(name)?.image.children()?;
        if !children.is_empty() {
            let target = format!("{}@{name}", self.image.spec());
            return Err(StoreError::Busy(target, format!("children depend on it: {}", children.join(", "))));
        }
        self.image.snap_remove(name)
    }

    fn open_snapshot(&self, name: &str) -> Result<Arc<dyn BlockStore>, StoreError> {
        Ok(Arc::new(self.snapshot_view(name)?))
    }

    fn changed_extents(&self, since: Option<&str>, offset: u64, length: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let end = offset.saturating_add(length).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        // Both kinds count: `exists = false` is a range zeroed or discarded since `since`.
        let diff = self.image.diff(since, offset, end - offset, false)?;
        Ok(merge(diff.iter().map(|e| (e.offset, e.length)), offset, end))
    }

    fn parent(&self) -> Result<Option<ImageUri>, StoreError> {
        let parent = self.image.parent()?;
        Ok(parent.map(|p| ImageUri::Rbd { pool: p.pool, image: p.image, snap: Some(p.snap) }))
    }

    fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), StoreError> {
        self.check_writable()?;
        if self.image.parent()?.is_none() {
            return Ok(());
        }
        self.image.flatten(progress)
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.image.meta_get(key)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        self.image.meta_set(key, value)
    }

    fn remove_meta(&self, key: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        self.image.meta_remove(key)
    }

    fn list_meta(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.image.meta_list()
    }
}

/// Sorted, merged `(offset, length)` ranges clipped to `start..end`.
fn merge(ranges: impl Iterator<Item = (u64, u64)>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut clipped: Vec<(u64, u64)> = ranges
        .map(|(off, len)| (off.max(start), off.saturating_add(len).min(end)))
        .filter(|(from, to)| from < to)
        .collect();
    clipped.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(clipped.len());
    for (from, to) in clipped {
        match out.last_mut() {
            Some((last_off, last_len)) if from <= *last_off + *last_len => {
                *last_len = (*last_len).max(to - *last_off);
            }
            _ => out.push((from, to - from)),
        }
    }
    out
}

/// Data extents from the diff, holes between them, covering `start..end` exactly.
fn allocation_map(diff: &[DiffExtent], start: u64, end: u64) -> Vec<Extent> {
    let data = merge(diff.iter().filter(|e| e.exists).map(|e| (e.offset, e.length)), start, end);
    let mut out = Vec::with_capacity(data.len() * 2 + 1);
    let mut pos = start;
    for (offset, length) in data {
        if offset > pos {
            out.push(Extent { offset: pos, length: offset - pos, kind: ExtentKind::Hole });
        }
        out.push(Extent { offset, length, kind: ExtentKind::Data });
        pos = offset + length;
    }
    if pos < end {
        out.push(Extent { offset: pos, length: end - pos, kind: ExtentKind::Hole });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, length: u64) -> DiffExtent {
        DiffExtent { offset, length, exists: true }
    }

    #[test]
    fn merge_sorts_joins_and_clips() {
        let ranges = [(10, 5), (0, 4), (4, 2), (14, 10), (100, 1)];
        assert_eq!(merge(ranges.into_iter(), 1, 20), vec![(1, 5), (10, 10)]);
        assert_eq!(merge(std::iter::empty(), 0, 10), vec![]);
    }

    #[test]
    fn allocation_map_covers_the_range() {
        let diff = [data(4096, 4096), data(1 << 20, 65536), DiffExtent { offset: 0, length: 10, exists: false }];
        let map = allocation_map(&diff, 0, 2 << 20);
        let kinds: Vec<_> = map.iter().map(|e| (e.offset, e.length, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, 4096, ExtentKind::Hole),
                (4096, 4096, ExtentKind::Data),
                (8192, (1 << 20) - 8192, ExtentKind::Hole),
                (1 << 20, 65536, ExtentKind::Data),
                ((1 << 20) + 65536, (1 << 20) - 65536, ExtentKind::Hole),
            ]
        );
        assert_eq!(allocation_map(&[], 5, 9), vec![Extent { offset: 5, length: 4, kind: ExtentKind::Hole }]);
        assert_eq!(
            allocation_map(&[data(0, 100)], 5, 9),
            vec![Extent { offset: 5, length: 4, kind: ExtentKind::Data }]
        );
    }
}
