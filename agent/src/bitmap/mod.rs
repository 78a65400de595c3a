//! Dirty bitmaps: which granules of a disk were written, per named bitmap.
//!
//! # Guarantees
//! - Every WRITE, TRIM and WRITE_ZEROES marks every enabled, consistent
//!   bitmap of its disk *before* it reaches the store ([`DiskBitmaps::mark`]).
//! - Crash consistency (Linux md's write-intent model): before a write is
//!   acknowledged, its bits are durable in the bitmap files or its region
//!   (`intent_region`, 64 MiB by default) is durable in the disk's
//!   write-intent log ([`intent`]); bits are cleared on disk only lazily.
//!   After `kill -9` or power loss the loaded bitmap (file plus logged
//!   regions) is therefore a superset of every acknowledged write. Only the
//!   first write into a clean region pays for a sync, one sync covers every
//!   bitmap of the disk, and concurrent first writes share it (group commit
//!   in [`persister`]). With `intent_region: 0` the unit is the granule
//!   and each bitmap file is synced itself.
//! - A bitmap whose file cannot be trusted (corrupt, other version, disk
//!   resized, image replaced or modified while the agent was down) loads as
//!   *inconsistent*: listed, refused for incremental use, removable.
//! - A generation number, bumped whenever bits are dropped (clear, merge
//!   target, job commit), names the state a backup was taken against.
//!
//! # Locking
//! | lock | held by | protects |
//! |------|---------|----------|
//! | `DiskBitmaps::gate` (read) | every write request, across mark + store write | nothing by itself: lets jobs drain writes |
//! | `DiskBitmaps::gate` (write) | clear, merge, job begin/commit | atomic hand-off against in-flight writes |
//! | `DiskBitmaps::ops` | control operations | the bitmap list |
//! | `Bitmap::file` | persister, header writes | the bitmap file (and the intent log's) |
//!
//! Order: `ops` → `gate` → `file`. The hot path takes only `gate` (read)
//! and atomics; it waits on the persister only after a first write.

mod disk;
mod gate;
mod intent;
pub mod persist;
mod persister;
mod suspect;

pub use disk::{Bitmap, BitmapInfo, DiskBitmaps, Drained, Frozen};
pub use gate::OwnedShared;

/// Errors of bitmap operations, named after what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// No bitmap of that name on the disk.
    #[error("No bitmap {name:?} on disk {disk}")]
    NotFound {
        /// Disk.
        disk: String,
        /// Bitmap name.
        name: String,
    },
    /// A bitmap of that name already exists.
    #[error("Bitmap {0:?} already exists")]
    Exists(String),
    /// The bitmap is in use by a job.
    #[error("Bitmap {name:?} is busy (in use by job {job})")]
    Busy {
        /// Bitmap name.
        name: String,
        /// Job holding it.
        job: String,
    },
    /// The bitmap cannot be trusted; only `remove` is allowed.
    #[error("Bitmap {name:?} is inconsistent ({reason}); remove it and take a full backup")]
    Inconsistent {
        /// Bitmap name.
        name: String,
        /// Why it is not trusted.
        reason: String,
    },
    /// The bitmap is disabled where recording is required.
    #[error("Bitmap {0:?} is disabled")]
    Disabled(String),
    /// Invalid parameters.
    #[error("{0}")]
    Invalid(String),
    /// The bitmap file could not be written.
    #[error("Cannot persist bitmap {name:?}")]
    Persist {
        /// Bitmap name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl BitmapError {
    /// Stable machine-readable code (API errors, CLI JSON).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "bitmap_not_found",
            Self::Exists(_) => "bitmap_exists",
            Self::Busy { .. } => "bitmap_busy",
            Self::Inconsistent { .. } => "bitmap_inconsistent",
            Self::Disabled(_) => "bitmap_disabled",
            Self::Invalid(_) => "invalid_argument",
            Self::Persist { .. } => "io_error",
        }
    }
}

#[cfg(test)]
mod tests;
