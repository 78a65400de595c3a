//! A point-in-time view of a live disk: what a job reads is the disk's
//! content at the moment the view was installed, while clients keep writing.
//!
//! The view hooks the export's write path (copy-before-write): before a
//! write reaches a granule whose old content the job still needs, the old
//! content of the part it overwrites (in 4 KiB save units, not the whole
//! granule: a 4 KiB guest write copies 4 KiB, not 64) is saved to a local
//! scratch file. The job reads saved units from the scratch file and the
//! others from the disk, under the granule's stripe lock, so a write can
//! never slip between the check and the read. Once the job is done with a
//! granule it releases it and writes there stop paying for the copy.
//!
//! The view must be installed while writes are drained
//! ([`DiskBitmaps::drained`](crate::bitmap::DiskBitmaps::drained)).
//! Scratch space is bounded by the bytes clients rewrite during the job.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bits::AtomicBits;
use crate::store::{BlockStore, Extent, ExtentKind, StoreError};

const STRIPES: u64 = 256;
/// Save unit of copy-before-write (smaller granularities use theirs).
const SAVE_UNIT_SHIFT: u32 = 12;

/// The frozen view of one disk for one job.
#[derive(Debug)]
pub struct PointInTime {
    source: Arc<dyn BlockStore>,
    size: u64,
    shift: u32,
    /// Save unit shift (at most `shift`).
    unit: u32,
    needed: AtomicBits,
    /// Save units whose old content is in the scratch file.
    saved: AtomicBits,
    scratch: File,
    scratch_path: PathBuf,
    stripes: Vec<Mutex<()>>,
    /// Guest writes seen (the job backs off while they come in).
    guest_writes: AtomicU64,
    /// Why copy-before-write failed: the view no longer holds the moment,
    /// so every read fails from then on (the job fails, the guest's write
    /// went through).
    broken: Mutex<Option<String>>,
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
        let shift = granularity.trailing_zeros();
        let unit = shift.min(SAVE_UNIT_SHIFT);
        Ok(Self {
            saved: AtomicBits::new(size.div_ceil(1 << unit)),
            needed,
            source,
            size,
            shift,
            unit,
            scratch: file,
            scratch_path: scratch.to_owned(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            guest_writes: AtomicU64::new(0),
            broken: Mutex::new(None),
        })
    }

    /// Guest writes the export passed through this view so far.
    pub fn guest_writes(&self) -> u64 {
        self.guest_writes.load(Relaxed)
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

    /// Runs of save units in `first..=last` (one granule's worth at most)
    /// with the same saved state: `(first, last, saved)`.
    fn unit_runs(&self, first: u64, last: u64) -> Vec<(u64, u64, bool)> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for u in first..=last {
            let saved = self.saved.get(u);
            match runs.last_mut() {
                Some(run) if run.2 == saved => run.1 = u,
                _ => runs.push((u, u, saved)),
            }
        }
        runs
    }

    /// Byte range of save units `first..=last`, clamped to the disk.
    fn unit_span(&self, first: u64, last: u64) -> (u64, usize) {
        let start = first << self.unit;
        (start, usize::try_from(((last + 1) << self.unit).min(self.size) - start).unwrap_or(0))
    }

    /// Copy-before-write: saves the old content of the save units of every
    /// needed granule that `offset..offset+length` touches. Called by the
    /// export before the write reaches the store.
    pub fn before_write(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        let end = offset + length.max(1) - 1;
        let (first, last) = (offset >> self.shift, end >> self.shift);
        let per = self.shift - self.unit;
        for g in first..=last.min(self.needed.len().saturating_sub(1)) {
            if !self.needed.get(g) {
                continue;
            }
            // Clamped to the view's size: past it (a disk grown since the moment) there is no old
            // content to save.
            let last_unit = self.saved.len().saturating_sub(1);
            let (u0, u1) =
                ((offset >> self.unit).max(g << per), (end >> self.unit).min(((g + 1) << per) - 1).min(last_unit));
            if u0 > u1 || (u0..=u1).all(|u| self.saved.get(u)) {
                continue;
            }
            let _lock = self.lock(g);
            if !self.needed.get(g) {
                continue;
            }
            for (a, b, saved) in self.unit_runs(u0, u1) {
                if saved {
                    continue;
                }
                let (start, len) = self.unit_span(a, b);
                let mut buf = vec![0u8; len];
                let saved = self
                    .source
                    .read_at(&mut buf, start)
                    .and_then(|()| self.scratch.write_all_at(&buf, start).map_err(scratch_err(start)));
                if let Err(e) = saved {
                    // Recorded under the granule's lock: a read that takes the lock next fails
                    // instead of reading the source while the guest's write lands there.
                    self.broken().get_or_insert_with(|| e.to_string());
                    return Err(e);
                }
                self.saved.set_range(a, b);
            }
        }
        Ok(())
    }

    fn broken(&self) -> MutexGuard<'_, Option<String>> {
        self.broken.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails once copy-before-write has failed. A read that passed this
    /// check under the granule's lock reads old content: a failed copy
    /// records the failure before it releases that lock, and its write
    /// reaches the store only after that.
    fn check_intact(&self, offset: u64) -> Result<(), StoreError> {
        match self.broken().as_ref() {
            Some(why) => Err(StoreError::Io {
                op: "point-in-time view",
                offset,
                source: std::io::Error::other(format!("copy-before-write failed, the view is lost: {why}")),
            }),
            None => Ok(()),
        }
    }

    /// Fails once copy-before-write has failed (the view lost its moment).
    pub fn intact(&self) -> Result<(), StoreError> {
        self.check_intact(0)
    }

    /// Reads the content at the view's moment.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let g = pos >> self.shift;
            let stop = ((g + 1) << self.shift).min(end);
            let _lock = self.lock(g);
            self.check_intact(pos)?;
            for (a, b, saved) in self.unit_runs(pos >> self.unit, (stop - 1) >> self.unit) {
                let (from, to) = ((a << self.unit).max(pos), ((b + 1) << self.unit).min(stop));
                let at = usize::try_from(from - offset).unwrap_or(0);
                let chunk = &mut buf[at..at + usize::try_from(to - from).unwrap_or(0)];
                if saved {
                    self.scratch.read_exact_at(chunk, from).map_err(scratch_err(from))?;
                } else {
                    self.source.read_at(chunk, from)?;
                }
            }
            pos = stop;
        }
        Ok(())
    }

    /// Allocation of `offset..offset+length` at the view's moment, for a
    /// range not yet [released](Self::release): what the source reports
    /// now, except that a hole is data where a save unit is saved (a write
    /// since the moment changed it; the saved copy is what the view reads)
    /// or where the granule is not needed (nothing tracks it). Sound because
    /// copy-before-write saves a unit before the write reaches the store: a
    /// unit that is a hole in the source now, and still unsaved after that
    /// was seen, was changed by no write since the view's moment.
    pub fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError> {
        let now = self.source.extents(offset, length)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, length: u64, kind: ExtentKind| match out.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.length == offset => last.length += length,
            _ => out.push(Extent { offset, length, kind }),
        };
        for e in now {
            if e.kind == ExtentKind::Data || e.length == 0 {
                push(e.offset, e.length, e.kind);
                continue;
            }
            let end = e.offset + e.length;
            let mut pos = e.offset;
            while pos < end {
                let u = pos >> self.unit;
                // 64 save units at a time where a whole word of them is unsaved and needed.
                let word_end = (u / 64 + 1) * 64;
                let (stop, saved) =
                    if u.is_multiple_of(64) && (word_end << self.unit) <= end && self.saved.word(u / 64) == 0 {
                        (word_end << self.unit, false)
                    } else {
                        (((u + 1) << self.unit).min(end), self.saved.get(u))
                    };
                let needed = self.needed.all_set(pos >> self.shift, (stop - 1) >> self.shift);
                let hole = !saved && needed;
                push(pos, stop - pos, if hole { ExtentKind::Hole } else { ExtentKind::Data });
                pos = stop;
            }
        }
        // A view whose copy-before-write failed no longer knows the moment: a hole now may have
        // held data then. The failure is recorded before the write reaches the store.
        self.check_intact(offset)?;
        Ok(out)
    }

    /// The job copied `offset..offset+length`: writes stop copying the
    /// granules it covers whole (the last one when it reaches the disk's
    /// end). A granule only partly covered stays needed: with granules
    /// larger than the job's copy chunks, its other chunks have yet to read
    /// the point-in-time content; such granules stay needed to the job's end.
    pub fn release(&self, offset: u64, length: u64) {
        let end = offset.saturating_add(length).min(self.size);
        let first = offset.div_ceil(1 << self.shift);
        let stop = if end == self.size { self.size.div_ceil(1 << self.shift) } else { end >> self.shift };
        for g in first..stop.min(self.needed.len()) {
            self.needed.and_not_word(g / 64, 1 << (g % 64));
        }
    }

    /// Bytes saved to scratch so far.
    pub fn scratch_bytes(&self) -> u64 {
        self.saved.count() << self.unit
    }
}

impl crate::export::WriteHook for PointInTime {
    /// A failed copy-before-write (scratch space full, a source read error)
    /// never fails the guest's write: the view is marked lost before the
    /// write can reach the store, every later read fails, and the job fails
    /// with every bitmap bit kept.
    fn before_write(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.guest_writes.fetch_add(1, Relaxed);
        if self.broken().is_some() {
            return Ok(());
        }
        if let Err(e) = PointInTime::before_write(self, offset, length) {
            tracing::error!(offset, error = %e, "copy-before-write failed; the job fails, the guest's write goes on");
        }
        Ok(())
    }

    /// Copy-before-write reads the source and writes the local scratch
    /// file; it waits on a stripe lock at most for the job's read of one
    /// granule from the same source. Inline-safe when the source is.
    fn inline_safe(&self) -> bool {
        self.source.capabilities().inline_io
    }
}

impl Drop for PointInTime {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.scratch_path);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test sizes
mod tests {
    use super::*;
    use crate::store::file::FileStore;
    use crate::store::Stores;

    /// Deterministic bytes for a test image.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// A disk grown while a view is open (online resize): a write past the view's end inside
    /// its last granule has no old content to save, and must neither fail nor panic.
    #[test]
    fn a_write_past_the_views_end_in_its_last_granule_saves_nothing() {
        const G: u64 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(None);
        let old = 4 * G + 8192; // not granule-aligned: the last granule is partly past the end
        let store: Arc<dyn BlockStore> = Arc::new(FileStore::create(&dir.path().join("d.raw"), old, &stores).unwrap());
        let before = pattern(old as usize, 11);
        store.write_at(&before, 0).unwrap();
        let view = PointInTime::whole(store.clone(), G, &dir.path().join("scratch")).unwrap();
        store.resize(8 * G).unwrap();
        for (offset, len) in [(old + 8192, 4096usize), (old - 4096, 16384), (6 * G, 4096)] {
            view.before_write(offset, len as u64).unwrap();
            store.write_at(&vec![0xee; len], offset).unwrap();
        }
        let mut seen = vec![0u8; old as usize];
        view.read(&mut seen, 0).unwrap();
        assert!(seen == before, "the view lost its old content");
    }

    #[test]
    fn the_views_allocation_is_the_moments_even_after_a_write_punches_a_hole() {
        const G: u64 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(None);
        let store: Arc<dyn BlockStore> =
            Arc::new(FileStore::create(&dir.path().join("d.raw"), 8 * G, &stores).unwrap());
        store.write_at(&pattern(2 * G as usize, 5), 0).unwrap(); // granules 0-1 data, 2-7 holes
        let view = PointInTime::whole(store.clone(), G, &dir.path().join("scratch")).unwrap();
        let kinds = |view: &PointInTime| -> Vec<(u64, u64, ExtentKind)> {
            view.extents(0, 8 * G).unwrap().iter().map(|e| (e.offset, e.length, e.kind)).collect()
        };
        assert_eq!(kinds(&view), [(0, 2 * G, ExtentKind::Data), (2 * G, 6 * G, ExtentKind::Hole)]);
        // The guest punches granule 1 and writes into granule 4: the view still sees data in 1
        // (saved), and 4 is data now (its saved zeroes are what the view reads).
        view.before_write(G, G).unwrap();
        store.discard(G, G).unwrap();
        assert_eq!(store.extents(G, G).unwrap()[0].kind, ExtentKind::Hole, "the file store punched no hole");
        view.before_write(4 * G, 4096).unwrap();
        store.write_at(&[7; 4096], 4 * G).unwrap();
        let now = kinds(&view);
        let data_at = |pos: u64| now.iter().any(|&(o, l, k)| o <= pos && pos < o + l && k == ExtentKind::Data);
        assert!(data_at(G) && data_at(2 * G - 1), "{now:?}");
        assert!(data_at(4 * G), "{now:?}");
        assert!(!data_at(2 * G) && !data_at(6 * G), "{now:?}");
        // Released granules are no longer tracked: a hole there counts as data (read it).
        view.release(6 * G, G);
        assert!(kinds(&view).iter().any(|&(o, l, k)| o <= 6 * G && 6 * G < o + l && k == ExtentKind::Data));
    }

    #[test]
    fn a_view_that_lost_its_moment_reports_no_allocation() {
        // Copy-before-write fails (scratch on a full device); the guest's discard goes through.
        // A hole the view would report there may have held data at the moment.
        const G: u64 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(None);
        let store: Arc<dyn BlockStore> =
            Arc::new(FileStore::create(&dir.path().join("d.raw"), 4 * G, &stores).unwrap());
        store.write_at(&pattern(4 * G as usize, 9), 0).unwrap();
        let scratch = dir.path().join("scratch");
        std::os::unix::fs::symlink("/dev/full", &scratch).unwrap();
        let view = PointInTime::whole(store.clone(), G, &scratch).unwrap();
        assert!(view.before_write(G, G).is_err(), "the scratch write did not fail");
        store.discard(G, G).unwrap();
        assert!(view.extents(0, 4 * G).is_err(), "{:?}", view.extents(0, 4 * G));
        assert!(view.intact().is_err());
    }

    #[test]
    fn a_granule_larger_than_a_copied_chunk_stays_needed_after_the_chunk() {
        const G: u64 = 8 << 20;
        const SIZE: u64 = 2 * G + (1 << 20); // a short last granule
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(None);
        let store: Arc<dyn BlockStore> = Arc::new(FileStore::create(&dir.path().join("d.raw"), SIZE, &stores).unwrap());
        let before = pattern(SIZE as usize, 3);
        store.write_at(&before, 0).unwrap();
        let view = PointInTime::whole(store.clone(), G, &dir.path().join("scratch")).unwrap();
        // The job copied the first 4 MiB chunk of granule 0 and of granule 1; then the guest writes
        // the second half of each.
        view.release(0, 4 << 20);
        view.release(G, 4 << 20);
        for at in [4 << 20, G + (4 << 20)] {
            view.before_write(at, 4096).unwrap();
            store.write_at(&[0xee; 4096], at).unwrap();
        }
        for at in [4 << 20, G + (4 << 20)] {
            let mut seen = vec![0u8; 4096];
            view.read(&mut seen, at).unwrap();
            assert!(seen[..] == before[at as usize..at as usize + 4096], "the view lost the old data at {at}");
        }
        // Its other half copied, granule 1 still is needed (no chunk covered it whole); granule 0,
        // copied whole, and the last granule, copied up to the disk's end, are released.
        view.release(G + (4 << 20), 4 << 20);
        view.release(0, G);
        view.release(2 * G, 1 << 20);
        for (at, released) in [(G + (5 << 20), false), (5 << 20, true), (2 * G, true)] {
            view.before_write(at, 4096).unwrap();
            store.write_at(&[0xdd; 4096], at).unwrap();
            let mut seen = vec![0u8; 4096];
            view.read(&mut seen, at).unwrap();
            let want = if released { &[0xdd; 4096][..] } else { &before[at as usize..at as usize + 4096] };
            assert!(seen == want, "granule of {at}: released should be {released}");
        }
    }

    #[test]
    fn the_view_keeps_the_old_content_and_saves_only_what_writes_overwrite() {
        const SIZE: u64 = (4 << 20) + 12288; // a short last granule
        const G: u64 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(None);
        let store: Arc<dyn BlockStore> = Arc::new(FileStore::create(&dir.path().join("d.raw"), SIZE, &stores).unwrap());
        let before = pattern(SIZE as usize, 7);
        store.write_at(&before, 0).unwrap();
        // Needed: every granule but 3 (already copied by the job, say).
        let needed = AtomicBits::new(SIZE.div_ceil(G));
        needed.set_all();
        needed.and_not_word(0, 1 << 3);
        let view = PointInTime::new(store.clone(), G, needed, &dir.path().join("scratch")).unwrap();
        // Writes of many shapes: inside a unit, across units, across granules,
        // unaligned, into the unneeded granule, the tail, twice to one place.
        let writes: [(u64, u64); 8] = [
            (4096, 4096),
            (100, 50),
            (G - 512, 1024),
            (3 * G + 10, 4000),
            (SIZE - 5000, 5000),
            (10 * G, 3 * G),
            (4096, 4096),
            (20 * G + 4095, 2),
        ];
        let mut expect_saved = std::collections::BTreeSet::new();
        for (i, &(offset, length)) in writes.iter().enumerate() {
            view.before_write(offset, length).unwrap();
            store.write_at(&pattern(length as usize, 100 + i as u64), offset).unwrap();
            for u in offset >> 12..=(offset + length - 1) >> 12 {
                if u >> 4 != 3 {
                    expect_saved.insert(u);
                }
            }
        }
        let mut seen = vec![0u8; SIZE as usize];
        view.read(&mut seen, 0).unwrap();
        let g3 = (3 * G) as usize..(4 * G) as usize;
        assert!(seen[..g3.start] == before[..g3.start] && seen[g3.end..] == before[g3.end..], "the view changed");
        // Granule 3 was released: it reads the new data.
        let mut g3 = vec![0u8; G as usize];
        view.read(&mut g3, 3 * G).unwrap();
        let mut now = vec![0u8; G as usize];
        store.read_at(&mut now, 3 * G).unwrap();
        assert_eq!(g3, now);
        // Only the 4 KiB units written to were saved (not whole 64 KiB granules).
        assert_eq!(view.scratch_bytes(), expect_saved.len() as u64 * 4096, "units saved");
        // Odd reads: unaligned, spanning saved and unsaved units and granules.
        for (offset, len) in [(4000u64, 9000usize), (G - 3, 7), (SIZE - 7000, 7000), (9 * G + 5, 2 * G as usize)] {
            let mut b = vec![0u8; len];
            view.read(&mut b, offset).unwrap();
            assert!(b == before[offset as usize..offset as usize + len], "read {offset}+{len}");
        }
    }

    /// Scratch space full (the scratch file is /dev/full): the guest's write must succeed, and the
    /// job's reads fail from then on instead of returning post-snapshot data.
    #[test]
    fn a_failed_copy_before_write_fails_the_view_not_the_guest_write() {
        use crate::export::WriteHook;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlockStore> =
            Arc::new(FileStore::create(&dir.path().join("disk.raw"), 1 << 20, &Stores::new(None)).unwrap());
        store.write_at(&pattern(1 << 20, 5), 0).unwrap();
        let scratch = dir.path().join("scratch");
        std::os::unix::fs::symlink("/dev/full", &scratch).unwrap();
        let view = PointInTime::whole(store.clone(), 64 << 10, &scratch).unwrap();
        let mut before = vec![0u8; 4096];
        view.read(&mut before, 0).unwrap();
        assert_eq!(before, pattern(1 << 20, 5)[..4096]);
        let written = WriteHook::before_write(&view, 8192, 4096);
        assert!(written.is_ok(), "the guest's write failed: {written:?}");
        store.write_at(&[0xee; 4096], 8192).unwrap();
        let mut after = vec![0u8; 4096];
        assert!(view.read(&mut after, 8192).is_err(), "the view returned data written after its moment");
        assert!(view.read(&mut after, 1 << 19).is_err(), "the lost view still serves reads");
        assert!(WriteHook::before_write(&view, 1 << 19, 4096).is_ok());
    }
}
