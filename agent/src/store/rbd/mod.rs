//! Ceph RBD images through librbd 1.16 / librados (Debian 12's Ceph 16).
//!
//! ```text
//!   Ceph ──── Arc<Cluster>          rados_t: connect once, shut down once (last owner)
//!    │           ▲
//!    ├─ pools: Arc<IoCtx> ──┘       rados_ioctx_t per pool, cached; destroyed once
//!    │           ▲
//!    └─ open() ─► RbdStore ── Image rbd_image_t; closed once; keeps its IoCtx alive
//! ```
//!
//! Ownership is strictly downwards through `Arc`s, so an image can outlive
//! the [`Ceph`] that opened it and the cluster is shut down after the last
//! image is closed. The FFI wrappers (`rados.rs`, `image.rs`, `snap.rs`,
//! `pool.rs`) are the only code with `unsafe`; each wrapper type documents
//! why it is `Send + Sync`.
//!
//! Every call is synchronous: the NBD data path calls [`RbdStore`] from
//! tokio's blocking pool, and librbd allows concurrent calls on one image.
//! Every librados operation is bounded by [`CEPH_TIMEOUT`] (monitor ops, OSD
//! ops and the initial connect), so an unreachable cluster or a full pool
//! fails a request instead of hanging it.
//!
//! librbd behaviour the store relies on (checked against the dev cluster):
//! - discard uses `rbd_write_zeroes` (flags 0): `rbd_discard` leaves ranges
//!   smaller than `rbd_discard_granularity_bytes` (64 KiB) unchanged.
//! - `extents` is `rbd_diff_iterate2` from nothing, parent included: an
//!   object reports data from its start to its last written byte; whole
//!   unwritten objects and object tails are holes.
//! - removing a snapshot with clone-v2 children would succeed (librbd moves
//!   it to the trash namespace), so `remove_snapshot` checks
//!   `rbd_list_children3` first and answers [`StoreError::Busy`].
//!
//! Errors: `-errno` results become [`StoreError::NotFound`] (ENOENT),
//! [`StoreError::Exists`] (EEXIST), [`StoreError::Busy`] (EBUSY, ENOTEMPTY)
//! or [`StoreError::Ceph`] naming the C function and its pool/image.

mod aio;
mod error;
mod image;
mod pool;
mod rados;
mod snap;
mod store;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_layering;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::image::Image;
use self::rados::{Cluster, IoCtx};
pub use self::store::RbdStore;
use super::StoreError;
use crate::config::CephConfig;

/// Bound on every monitor and OSD operation and on connecting
/// (`rados_mon_op_timeout`, `rados_osd_op_timeout`, `client_mount_timeout`).
pub const CEPH_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected Ceph cluster: opens, creates, clones, lists and removes images.
pub struct Ceph {
    cluster: Arc<Cluster>,
    /// IO contexts by pool name, created on first use.
    pools: Mutex<HashMap<String, Arc<IoCtx>>>,
}

impl Ceph {
    /// Connects with the agent's `ceph:` settings; fails within about
    /// [`CEPH_TIMEOUT`] if the cluster is unreachable or refuses the key.
    pub fn connect(config: &CephConfig) -> Result<Self, StoreError> {
        Self::connect_with_timeout(config, CEPH_TIMEOUT)
    }

    /// [`connect`](Self::connect) with another bound (whole seconds, at least 1).
    pub fn connect_with_timeout(config: &CephConfig, timeout: Duration) -> Result<Self, StoreError> {
        let cluster = Cluster::connect(&config.conf, &config.client, config.keyring.as_deref(), timeout)?;
        Ok(Self { cluster, pools: Mutex::new(HashMap::new()) })
    }

    /// The IO context for `pool`; a missing pool is [`StoreError::NotFound`].
    fn pool(&self, pool: &str) -> Result<Arc<IoCtx>, StoreError> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ioctx) = pools.get(pool) {
            return Ok(ioctx.clone());
        }
        let ioctx = Arc::new(IoCtx::create(&self.cluster, pool)?);
        pools.insert(pool.to_owned(), ioctx.clone());
        Ok(ioctx)
    }

    /// Opens an image at head, or a read-only view of snapshot `snap`.
    pub fn open(&self, pool: &str, image: &str, snap: Option<&str>, read_only: bool) -> Result<RbdStore, StoreError> {
        let opened = Image::open(&self.pool(pool)?, image, snap, read_only)?;
        RbdStore::new(opened, image, snap, read_only)
    }

    /// Creates an image of `size` bytes (4 MiB objects, the cluster's
    /// `rbd_default_features`) and opens it read-write.
    pub fn create(&self, pool: &str, image: &str, size: u64) -> Result<RbdStore, StoreError> {
        pool::create(&*self.pool(pool)?, image, size)?;
        self.open(pool, image, None, false)
    }

    /// Creates `pool/image` layered on `parent_pool/parent_image@parent_snap`
    /// (clone v2: the snapshot is not protected) and opens it read-write.
    pub fn clone_image(
        &self,
        parent_pool: &str,
        parent_image: &str,
        parent_snap: &str,
        pool: &str,
        image: &str,
    ) -> Result<RbdStore, StoreError> {
        let parent = self.pool(parent_pool)?;
        pool::clone(&parent, parent_image, parent_snap, &*self.pool(pool)?, image)?;
        self.open(pool, image, None, false)
    }

    /// Whether the image exists (a missing pool is an error).
    pub fn exists(&self, pool: &str, image: &str) -> Result<bool, StoreError> {
        match Image::open(&self.pool(pool)?, image, None, true) {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes an image; [`StoreError::Busy`] if it has snapshots or another
    /// client has it open. Removes nothing else (no snapshots, no children).
    pub fn remove(&self, pool: &str, image: &str) -> Result<(), StoreError> {
        pool::remove(&*self.pool(pool)?, image)
    }

    /// Image names in `pool`, sorted.
    pub fn list(&self, pool: &str) -> Result<Vec<String>, StoreError> {
        pool::list(&*self.pool(pool)?)
    }
}

impl std::fmt::Debug for Ceph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ceph").field("cluster", &self.cluster.target()).finish()
    }
}
