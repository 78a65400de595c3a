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
pub mod rbd;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{CephConfig, ImageUri};

/// What a store can do; drives the NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Writes are refused.
    pub read_only: bool,
    /// `discard` deallocates (reads as zeroes afterwards).
    pub discard: bool,
    /// `write_zeroes` is efficient (no data transfer).
    pub write_zeroes: bool,
    /// `extents` reports real allocation.
    pub extents: bool,
    /// Snapshots, snapshot views and changed extents.
    pub snapshots: bool,
    /// Children layered on a snapshot (`Stores::clone_image`), `flatten`.
    pub layering: bool,
    /// Key/value metadata.
    pub metadata: bool,
    /// Reads and writes are memory-speed syscalls (page cache): the NBD
    /// server may run them on its own task instead of a blocking thread.
    pub inline_io: bool,
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
    /// The image exists, smaller than configured (larger is accepted: grown online).
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
    /// No such image or snapshot.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The image or snapshot already exists.
    #[error("{0} already exists")]
    Exists(String),
    /// Still in use (a snapshot with children, an image with snapshots).
    #[error("{0} is in use: {1}")]
    Busy(String, String),
    /// A Ceph call failed.
    #[error("Ceph {op} failed on {target}: {message} (errno {errno})")]
    Ceph {
        /// librbd/librados function or operation.
        op: &'static str,
        /// Pool/image it was about.
        target: String,
        /// Positive errno.
        errno: i32,
        /// strerror text.
        message: String,
    },
    /// Ceph is needed but not configured.
    #[error("rbd: images need a `ceph:` section in agent.yaml")]
    NoCeph,
    /// Metadata of an image is unreadable.
    #[error("Corrupt metadata for {0}: {1}")]
    Corrupt(String, String),
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
            Self::Ceph { errno: e, .. } => match *e {
                libc::ENOSPC | libc::EDQUOT => errno::ENOSPC,
                libc::EROFS | libc::EPERM | libc::EACCES => errno::EPERM,
                libc::ENOMEM => errno::ENOMEM,
                _ => errno::EIO,
            },
            _ => errno::EIO,
        }
    }
}

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot name.
    pub name: String,
    /// Store-assigned id, increasing with creation order.
    pub id: u64,
    /// Image size when the snapshot was taken.
    pub size: u64,
}

/// A request of a store's asynchronous data path: started when the method
/// returned, independent of the store's lifetime (`'static`).
pub type IoFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

/// The asynchronous data path of a store whose requests complete on the
/// store's own threads (librbd aio): the NBD server awaits these instead of
/// parking a blocking thread on every request. Same checks and semantics as
/// the blocking methods of [`BlockStore`].
pub trait AsyncIo: Send + Sync {
    /// Appends the `len` bytes at `offset` to `buf` (a reply header, say);
    /// yields `buf`. The bytes are not zeroed first: the store fills them.
    fn read(&self, buf: Vec<u8>, len: usize, offset: u64) -> IoFuture<Vec<u8>>;
    /// Writes `data` at `offset` (not durable until a flush).
    fn write(&self, data: bytes::Bytes, offset: u64) -> IoFuture<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<()>;
}

/// A block image (or a read-only snapshot view of one). All offsets are
/// bytes; callers check ranges first. Methods a store cannot support return
/// [`StoreError::Unsupported`]; [`Capabilities`] says which ones those are.
pub trait BlockStore: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;
    /// Fills `buf` from `offset` (unwritten regions of a layered image read from the parent).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError>;
    /// [`read_at`](Self::read_at) of `len` bytes appended to `out`: a store
    /// that can read into uninitialized memory does not zero it first (a
    /// reply buffer of 1 MiB is otherwise written twice).
    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> Result<(), StoreError> {
        let at = out.len();
        out.resize(at + len, 0);
        self.read_at(&mut out[at..], offset)
    }
    /// Writes `buf` at `offset` (not durable until [`flush`](Self::flush)).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError>;
    /// Makes the range read as zeroes; may deallocate it if `may_unmap`.
    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), StoreError>;
    /// Deallocates the range (reads as zeroes afterwards, also over a parent).
    fn discard(&self, offset: u64, length: u64) -> Result<(), StoreError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Allocation map of `offset..offset+length`, in order, covering it
    /// exactly. For a layered image, regions still read from the parent
    /// report the parent's allocation.
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError>;
    /// Identity of the image.
    fn identity(&self) -> Result<Identity, StoreError>;

    /// The asynchronous data path, if the store has one.
    fn async_io(&self) -> Option<&dyn AsyncIo> {
        None
    }
    /// Changes the size (growing reads as zeroes).
    fn resize(&self, _size: u64) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("resize"))
    }
    /// Creates a snapshot of the current content.
    fn create_snapshot(&self, _name: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("snapshots"))
    }
    /// Snapshots, oldest first.
    fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        Err(StoreError::Unsupported("snapshots"))
    }
    /// Removes a snapshot (fails if a child image still depends on it).
    fn remove_snapshot(&self, _name: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("snapshots"))
    }
    /// A read-only view of a snapshot.
    fn open_snapshot(&self, _name: &str) -> Result<Arc<dyn BlockStore>, StoreError> {
        Err(StoreError::Unsupported("snapshots"))
    }
    /// Byte ranges of this image's own data (not its parent's) that may
    /// differ from snapshot `since` (`None`: from an empty image), within
    /// `offset..offset+length`. May over-report, never under-reports.
    fn changed_extents(&self, _since: Option<&str>, _offset: u64, _length: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        Err(StoreError::Unsupported("changed extents"))
    }
    /// The parent snapshot this image is layered on, if any.
    fn parent(&self) -> Result<Option<ImageUri>, StoreError> {
        Ok(None)
    }
    /// Copies every region still read from the parent into this image,
    /// then detaches the parent; `progress(done, total)` is called as it goes.
    fn flatten(&self, _progress: &mut dyn FnMut(u64, u64)) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("flatten"))
    }
    /// Copies every region of `offset..offset+length` still read from the
    /// parent into this image (safe against concurrent writes); returns the
    /// bytes read from the parent. The stream job's unit of work.
    fn copy_from_parent(&self, _offset: u64, _length: u64) -> Result<u64, StoreError> {
        Err(StoreError::Unsupported("chunked copy from the parent"))
    }
    /// Drops the parent once nothing is read from it any more.
    fn detach_parent(&self) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("detaching the parent"))
    }
    /// Reads a metadata value.
    fn get_meta(&self, _key: &str) -> Result<Option<String>, StoreError> {
        Err(StoreError::Unsupported("metadata"))
    }
    /// Sets a metadata value (durably).
    fn set_meta(&self, _key: &str, _value: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("metadata"))
    }
    /// Removes a metadata key (no error if absent).
    fn remove_meta(&self, _key: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("metadata"))
    }
    /// Every metadata key and value.
    fn list_meta(&self) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        Err(StoreError::Unsupported("metadata"))
    }
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Size to create the image with if it is missing.
    pub create_size: Option<u64>,
    /// Open read-only.
    pub read_only: bool,
}

/// Opens and manages images of every kind; holds the Ceph connection
/// (made on first use of an `rbd:` URI).
#[derive(Debug)]
pub struct Stores {
    ceph_config: Option<CephConfig>,
    ceph: std::sync::Mutex<Option<Arc<rbd::Ceph>>>,
}

impl Stores {
    /// Stores for the agent's `ceph:` section (None: `file:` only).
    pub fn new(ceph_config: Option<CephConfig>) -> Arc<Self> {
        Arc::new(Self { ceph_config, ceph: std::sync::Mutex::new(None) })
    }

    /// The Ceph connection, connecting on first use.
    pub fn ceph(&self) -> Result<Arc<rbd::Ceph>, StoreError> {
        let mut slot = self.ceph.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ceph) = slot.as_ref() {
            return Ok(ceph.clone());
        }
        let config = self.ceph_config.as_ref().ok_or(StoreError::NoCeph)?;
        let ceph = Arc::new(rbd::Ceph::connect(config)?);
        *slot = Some(ceph.clone());
        Ok(ceph)
    }

    /// Opens (or, with `create_size`, creates) an image; a URI with `@snap`
    /// opens a read-only snapshot view.
    pub fn open(self: &Arc<Self>, uri: &ImageUri, options: &OpenOptions) -> Result<Arc<dyn BlockStore>, StoreError> {
        match uri {
            ImageUri::File { path, snap: None } => Ok(Arc::new(file::FileStore::open(path, options, self)?)),
            ImageUri::File { path, snap: Some(snap) } => {
                let image = file::FileStore::open(path, &OpenOptions { create_size: None, read_only: true }, self)?;
                image.open_snapshot(snap)
            }
            ImageUri::Rbd { pool, image, snap } => {
                let ceph = self.ceph()?;
                if !ceph.exists(pool, image)? {
                    match (options.create_size, snap) {
                        (Some(size), None) => return Ok(Arc::new(ceph.create(pool, image, size)?)),
                        _ => return Err(StoreError::NotFound(uri.to_string())),
                    }
                }
                let store = ceph.open(pool, image, snap.as_deref(), options.read_only || snap.is_some())?;
                // Larger is an image grown online (`disk resize`); smaller is not this disk's.
                if let Some(expected) = options.create_size.filter(|&s| s > store.size()) {
                    return Err(StoreError::SizeMismatch {
                        path: uri.to_string().into(),
                        expected,
                        actual: store.size(),
                    });
                }
                Ok(Arc::new(store))
            }
        }
    }

    /// Creates a new, empty image; fails if it exists.
    pub fn create(self: &Arc<Self>, uri: &ImageUri, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        match uri {
            ImageUri::File { path, snap: None } => Ok(Arc::new(file::FileStore::create(path, size, self)?)),
            ImageUri::Rbd { pool, image, snap: None } => Ok(Arc::new(self.ceph()?.create(pool, image, size)?)),
            _ => Err(StoreError::Unsupported("creating a snapshot URI")),
        }
    }

    /// Creates `child` layered on the snapshot `parent` (`...@snap`):
    /// unwritten regions of the child read from the parent. `rbd:` children
    /// need an `rbd:` parent; `file:` children take either.
    pub fn clone_image(
        self: &Arc<Self>,
        parent: &ImageUri,
        child: &ImageUri,
    ) -> Result<Arc<dyn BlockStore>, StoreError> {
        if parent.snap().is_none() {
            return Err(StoreError::Unsupported("layering on an image that is not a snapshot"));
        }
        match (parent, child) {
            (_, ImageUri::File { path, snap: None }) => {
                Ok(Arc::new(file::FileStore::create_child(path, parent, self)?))
            }
            (ImageUri::Rbd { pool: pp, image: pi, snap: Some(ps) }, ImageUri::Rbd { pool, image, snap: None }) => {
                Ok(Arc::new(self.ceph()?.clone_image(pp, pi, ps, pool, image)?))
            }
            _ => Err(StoreError::Unsupported("an rbd: image layered on a file: parent")),
        }
    }

    /// Whether the image exists.
    pub fn exists(&self, uri: &ImageUri) -> Result<bool, StoreError> {
        match uri {
            ImageUri::File { path, .. } => Ok(path.exists()),
            ImageUri::Rbd { pool, image, .. } => self.ceph()?.exists(pool, image),
        }
    }

    /// Removes an image (it must have no snapshots).
    pub fn remove(&self, uri: &ImageUri) -> Result<(), StoreError> {
        match uri {
            ImageUri::File { path, snap: None } => file::FileStore::remove(path),
            ImageUri::Rbd { pool, image, snap: None } => self.ceph()?.remove(pool, image),
            _ => Err(StoreError::Unsupported("removing a snapshot URI (remove the snapshot)")),
        }
    }
}

/// Opens (or creates) a `file:` image without a Ceph connection (tests, tools).
pub fn open(uri: &ImageUri, options: &OpenOptions) -> Result<Arc<dyn BlockStore>, StoreError> {
    Stores::new(None).open(uri, options)
}

#[cfg(test)]
mod tests;
