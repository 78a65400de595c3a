//! Exports: a disk as clients see it, and the registry of all of them.
//!
//! An [`Export`] joins an image store with everything that must happen on
//! its write path (range checks, and marking dirty bitmaps before a write
//! reaches the store). The NBD server and block jobs both go through it, so
//! no write can bypass the tracking.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use proto::consts::{tflags, BASE_ALLOCATION, QEMU_DIRTY_BITMAP_PREFIX};
use proto::ExportInfo;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;

use crate::bitmap::{BitmapError, DiskBitmaps, Drained};
use crate::jobs::pit::PointInTime;
use crate::store::{BlockStore, StoreError};

/// Why a request on an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Marking the bitmaps failed; the write was not done.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

impl ExportError {
    /// The NBD error number a client sees.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Self::Store(e) => e.nbd_errno(),
            Self::Bitmap(_) => proto::consts::errno::EIO,
        }
    }
}

/// One exported disk.
#[derive(Debug)]
pub struct Export {
    name: String,
    description: String,
    store: Arc<dyn BlockStore>,
    bitmaps: Arc<DiskBitmaps>,
    hooks: ArcSwap<Vec<Arc<PointInTime>>>,
    read_only: bool,
    detached: CancellationToken,
}

impl Export {
    /// Exports `store` as `name` (`VM/DISK`).
    pub fn new(
        name: String,
        description: String,
        store: Arc<dyn BlockStore>,
        bitmaps: Arc<DiskBitmaps>,
        read_only: bool,
    ) -> Self {
        let read_only = read_only || store.capabilities().read_only;
        Self {
            name,
            description,
            store,
            bitmaps,
            hooks: ArcSwap::default(),
            read_only,
            detached: CancellationToken::new(),
        }
    }

    /// Installs a point-in-time view; call inside [`DiskBitmaps::drained`].
    pub fn add_hook(&self, _: &Drained, hook: Arc<PointInTime>) {
        self.hooks.rcu(|hooks| {
            let mut v = hooks.as_ref().clone();
            v.push(hook.clone());
            v
        });
    }

    /// Removes a point-in-time view.
    pub fn remove_hook(&self, hook: &Arc<PointInTime>) {
        self.hooks.rcu(|hooks| hooks.iter().filter(|h| !Arc::ptr_eq(h, hook)).cloned().collect::<Vec<_>>());
    }

    /// The disk's dirty bitmaps.
    pub fn bitmaps(&self) -> &Arc<DiskBitmaps> {
        &self.bitmaps
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.store
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// Cancelled when the export is removed; its connections then close.
    pub fn detached(&self) -> &CancellationToken {
        &self.detached
    }

    /// What negotiation advertises: flags derived from the store's capabilities.
    pub fn info(&self) -> ExportInfo {
        let caps = self.store.capabilities();
        let mut flags = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_DF;
        flags |= tflags::SEND_CACHE | tflags::CAN_MULTI_CONN;
        if self.read_only {
            flags |= tflags::READ_ONLY;
        } else {
            flags |= tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
            if caps.discard {
                flags |= tflags::SEND_TRIM;
            }
        }
        ExportInfo { name: self.name.clone(), description: self.description.clone(), size: self.size(), flags }
    }

    /// Metadata contexts this export offers.
    pub fn meta_contexts(&self) -> Vec<String> {
        let bitmaps = self.bitmaps.list().into_iter().filter(|b| b.consistent);
        std::iter::once(BASE_ALLOCATION.to_owned())
            .chain(bitmaps.map(|b| format!("{QEMU_DIRTY_BITMAP_PREFIX}{}", b.name)))
            .collect()
    }

    /// Checks that `offset..offset+length` lies inside the export.
    pub fn check_range(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange { offset, length, size }),
        }
    }

    /// Writes through the tracking path: bitmaps are marked (durably)
    /// before the data reaches the store.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError> {
        self.tracked(offset, data.len() as u64, fua, || self.store.write_at(data, offset))
    }

    /// Zeroes a range through the tracking path.
    pub fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool, fua: bool) -> Result<(), ExportError> {
        self.tracked(offset, length, fua, || self.store.write_zeroes(offset, length, may_unmap))
    }

    /// Discards a range through the tracking path.
    pub fn discard(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.tracked(offset, length, fua, || self.store.discard(offset, length))
    }

    fn tracked(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
        io: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), ExportError> {
        self.writable()?;
        let _section = self.bitmaps.write_section();
        self.bitmaps.mark(offset, length)?;
        for hook in self.hooks.load().iter() {
            hook.before_write(offset, length)?;
        }
        io()?;
        Ok(self.fua(fua)?)
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        Ok(())
    }

    fn fua(&self, fua: bool) -> Result<(), StoreError> {
        if fua {
            self.store.flush()?;
        }
        Ok(())
    }
}

/// All exports of the agent, by name.
#[derive(Debug, Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<Export>>>,
}

impl Exports {
    /// Looks an export up.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.read().get(name).cloned()
    }

    /// All exports, sorted by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.read().values().cloned().collect()
    }

    /// Adds or replaces an export; a replaced one is detached.
    pub fn insert(&self, export: Arc<Export>) {
        let old = self.write().insert(export.name.clone(), export);
        if let Some(old) = old {
            old.detached.cancel();
        }
    }

    /// Removes an export and closes its connections.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let old = self.write().remove(name);
        if let Some(old) = &old {
            old.detached.cancel();
        }
        old
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.map.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.map.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
