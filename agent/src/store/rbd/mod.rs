//! Ceph RBD images through librbd (being written; see the store issue).

use super::{BlockStore, Capabilities, Extent, Identity, StoreError};
use crate::config::CephConfig;

/// A connected Ceph cluster.
#[derive(Debug)]
pub struct Ceph;

/// An open RBD image or snapshot.
#[derive(Debug)]
pub struct RbdStore;

const TODO: StoreError = StoreError::Unsupported("rbd: images");

impl Ceph {
    /// Connects with the agent's `ceph:` settings.
    pub fn connect(_config: &CephConfig) -> Result<Self, StoreError> {
        Err(TODO)
    }
    /// Opens an image (or a snapshot view).
    pub fn open(
        &self,
        _pool: &str,
        _image: &str,
        _snap: Option<&str>,
        _read_only: bool,
    ) -> Result<RbdStore, StoreError> {
        Err(TODO)
    }
    /// Creates an image.
    pub fn create(&self, _pool: &str, _image: &str, _size: u64) -> Result<RbdStore, StoreError> {
        Err(TODO)
    }
    /// Clones a snapshot.
    pub fn clone_image(
        &self,
        _pp: &str,
        _pi: &str,
        _ps: &str,
        _pool: &str,
        _image: &str,
    ) -> Result<RbdStore, StoreError> {
        Err(TODO)
    }
    /// Whether an image exists.
    pub fn exists(&self, _pool: &str, _image: &str) -> Result<bool, StoreError> {
        Err(TODO)
    }
    /// Removes an image.
    pub fn remove(&self, _pool: &str, _image: &str) -> Result<(), StoreError> {
        Err(TODO)
    }
}

impl BlockStore for RbdStore {
    fn size(&self) -> u64 {
        0
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<(), StoreError> {
        Err(TODO)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), StoreError> {
        Err(TODO)
    }
    fn write_zeroes(&self, _offset: u64, _length: u64, _may_unmap: bool) -> Result<(), StoreError> {
        Err(TODO)
    }
    fn discard(&self, _offset: u64, _length: u64) -> Result<(), StoreError> {
        Err(TODO)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Err(TODO)
    }
    fn extents(&self, _offset: u64, _length: u64) -> Result<Vec<Extent>, StoreError> {
        Err(TODO)
    }
    fn identity(&self) -> Result<Identity, StoreError> {
        Err(TODO)
    }
}
