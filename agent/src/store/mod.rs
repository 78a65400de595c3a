//! Image stores: where disk, backup and migration images live.
//!
//! One trait, [`BlockStore`], with small capability-gated methods; one
//! factory, [`open`], that turns an [`ImageUri`](crate::config::ImageUri)
//! into a store. NBD transmission flags are derived from
//! [`BlockStore::capabilities`], never hard-coded.
//!
//! Methods are blocking: the NBD data path calls them from tokio's blocking
//! pool, so a slow disk never stalls the async reactor.
//!
//! ```text
//!   ImageUri ──open()──► Arc<dyn BlockStore>
//!                           ├── file::FileStore   raw sparse file (pread/pwrite, fallocate, SEEK_HOLE)
//!                           └── (rbd: Ceph RBD via librbd, see the store issue)
//! ```

pub mod file;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::ImageUri;

/// What a store can do; drives the NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes are refused.
    pub read_only: bool,
    /// `discard` deallocates (reads as zeroes afterwards).
    pub discard: bool,
    /// `write_zeroes` is efficient (no data transfer).
    pub write_zeroes: bool,
    /// `extents` reports real allocation.
    pub extents: bool,
}

/// Allocation state of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; contents are whatever was written.
    Data,
    /// Not allocated; reads as zeroes.
    Hole,
}

/// A run of bytes with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Allocation state.
    pub kind: ExtentKind,
}

/// Who an image is, so state kept about it (bitmaps) can detect that the
/// image was replaced or changed behind the agent's back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable id of this image instance (a new image with the same name differs).
    pub id: String,
    /// Last modification time in ns since the epoch (0 if unknown).
    pub modified_ns: u64,
}

/// Errors of every store, named after the failed operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or creating the image failed.
    #[error("Cannot open {path}")]
    Open {
        /// Image path or name.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An IO call failed.
    #[error("{op} failed at offset {offset}")]
    Io {
        /// Operation name.
        op: &'static str,
        /// Offset of the request.
        offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A write-type call on a read-only image.
    #[error("Image is read-only")]
    ReadOnly,
    /// The range ends past the image.
    #[error("Range {offset}+{length} is past the end of the image ({size} bytes)")]
    OutOfRange {
        /// Start offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Image size.
        size: u64,
    },
    /// The image exists with another size than configured.
    #[error("Image {path} has {actual} bytes, configuration says {expected}")]
    SizeMismatch {
        /// Image path.
        path: PathBuf,
        /// Configured size.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// The image does not exist and no size was given to create it.
    #[error("Image {0} does not exist and no size is configured to create it")]
    Missing(PathBuf),
    /// The store cannot do this.
    #[error("{0} is not supported by this store")]
    Unsupported(&'static str),
}

impl StoreError {
    /// The NBD error number a client sees for this error.
    pub fn nbd_errno(&self) -> u32 {
        use proto::consts::errno;
        match self {
            Self::ReadOnly => errno::EPERM,
            Self::OutOfRange { .. } => errno::EINVAL,
            Self::Unsupported(_) => errno::ENOTSUP,
            Self::Io { source, .. } | Self::Open { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => errno::ENOSPC,
                Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => errno::EPERM,
                Some(libc::ENOMEM) => errno::ENOMEM,
                Some(libc::EOPNOTSUPP) => errno::ENOTSUP,
                _ => errno::EIO,
            },
            Self::SizeMismatch { .. } | Self::Missing(_) => errno::EIO,
        }
    }
}

/// A block image. All offsets are bytes; callers check ranges first.
pub trait BlockStore: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError>;
    /// Writes `buf` at `offset` (not durable until [`flush`](Self::flush)).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError>;
    /// Makes the range read as zeroes; may deallocate it if `may_unmap`.
    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), StoreError>;
    /// Deallocates the range (reads as zeroes afterwards).
    fn discard(&self, offset: u64, length: u64) -> Result<(), StoreError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Allocation map of `offset..offset+length`, in order, covering it exactly.
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError>;
    /// Identity of the image.
    fn identity(&self) -> Result<Identity, StoreError>;
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Size to create the image with if it is missing.
    pub create_size: Option<u64>,
    /// Open read-only.
    pub read_only: bool,
}

/// Opens (or creates) the image a URI names.
pub fn open(uri: &ImageUri, options: &OpenOptions) -> Result<Arc<dyn BlockStore>, StoreError> {
    match uri {
        ImageUri::File(path) => Ok(Arc::new(file::FileStore::open(path, options)?)),
        ImageUri::Rbd { .. } => Err(StoreError::Unsupported("rbd: images")),
    }
}

#[cfg(test)]
mod tests;
