//! A point-in-time view of a live disk: what a job reads is the disk's
//! content at the moment the view was installed, while clients keep writing.
//!
//! The view hooks the export's write path (copy-before-write): before a
//! write reaches a granule whose old content the job still needs, that
//! granule's content is saved to a local scratch file. The job reads saved
//! granules from the scratch file and the others from the disk, each under
//! the granule's stripe lock, so a write can never slip between the check
//! and the read. Once the job is done with a granule it releases it and
//! writes there stop paying for the copy.
//!
//! The view must be installed while writes are drained
//! ([`DiskBitmaps::drained`](crate::bitmap::DiskBitmaps::drained)).
//! Scratch space is bounded by the bytes clients rewrite during the job.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bitmap::AtomicBits;
use crate::store::{BlockStore, StoreError};

const STRIPES: u64 = 256;

/// The frozen view of one disk for one job.
#[derive(Debug)]
pub struct PointInTime {
    source: Arc<dyn BlockStore>,
    size: u64,
    shift: u32,
    needed: AtomicBits,
    saved: AtomicBits,
    scratch: File,
    scratch_path: PathBuf,
    stripes: Vec<Mutex<()>>,
}

fn scratch_err(offset: u64) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { op: "point-in-time scratch", offset, source }
}

impl PointInTime {
    /// A view of `source` now; only granules set in `needed` are preserved.
    pub fn new(
        source: Arc<dyn BlockStore>,
        granularity: u64,
        needed: AtomicBits,
        scratch: &Path,
    ) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: scratch.to_owned(), source };
        if let Some(dir) = scratch.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(scratch).map_err(open_err)?;
        let size = source.size();
        Ok(Self {
            saved: AtomicBits::new(needed.len()),
            needed,
            source,
            size,
            shift: granularity.trailing_zeros(),
            scratch: file,
            scratch_path: scratch.to_owned(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// A view that preserves every granule.
    pub fn whole(source: Arc<dyn BlockStore>, granularity: u64, scratch: &Path) -> Result<Self, StoreError> {
        let all = AtomicBits::new(source.size().div_ceil(granularity));
        all.set_all();
        Self::new(source, granularity, all, scratch)
    }

    /// Bytes per granule.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    fn lock(&self, g: u64) -> MutexGuard<'_, ()> {
        self.stripes[(g % STRIPES) as usize].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn span(&self, g: u64) -> (u64, usize) {
        let start = g << self.shift;
        (start, usize::try_from(((g + 1) << self.shift).min(self.size) - start).unwrap_or(0))
    }

    /// Copy-before-write: saves the old content of every needed granule
    /// that `offset..offset+length` touches. Called by the export before
    /// the write reaches the store.
    pub fn before_write(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        let (first, last) = (offset >> self.shift, (offset + length.max(1) - 1) >> self.shift);
        for g in first..=last.min(self.needed.len().saturating_sub(1)) {
            if !self.needed.get(g) || self.saved.get(g) {
                continue;
            }
            let _lock = self.lock(g);
            if !self.needed.get(g) || self.saved.get(g) {
                continue;
            }
            let (start, len) = self.span(g);
            let mut buf = vec![0u8; len];
            self.source.read_at(&mut buf, start)?;
            self.scratch.write_all_at(&buf, start).map_err(scratch_err(start))?;
            self.saved.set_range(g, g);
        }
        Ok(())
    }

    /// Reads the content at the view's moment.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let g = pos >> self.shift;
            let stop = ((g + 1) << self.shift).min(end);
            let at = usize::try_from(pos - offset).unwrap_or(0);
            let chunk = &mut buf[at..at + usize::try_from(stop - pos).unwrap_or(0)];
            let _lock = self.lock(g);
            if self.saved.get(g) {
                self.scratch.read_exact_at(chunk, pos).map_err(scratch_err(pos))?;
            } else {
                self.source.read_at(chunk, pos)?;
            }
            pos = stop;
        }
        Ok(())
    }

    /// The job no longer needs these granules: writes stop copying them.
    pub fn release(&self, offset: u64, length: u64) {
        let (first, last) = (offset >> self.shift, (offset + length.max(1) - 1) >> self.shift);
        for g in first..=last.min(self.needed.len().saturating_sub(1)) {
            self.needed.and_not_word(g / 64, 1 << (g % 64));
        }
    }

    /// Bytes saved to scratch so far.
    pub fn scratch_bytes(&self) -> u64 {
        self.saved.count() << self.shift
    }
}

impl crate::export::WriteHook for PointInTime {
    fn before_write(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        PointInTime::before_write(self, offset, length)
    }
}

impl Drop for PointInTime {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.scratch_path);
    }
}
