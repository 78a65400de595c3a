//! The write-intent log of one disk: Linux md's on-disk bitmap, kept one
//! level above the named bitmaps.
//!
//! A named bitmap is exact in memory but its file may lag behind: a write
//! whose granules are not yet durable in a bitmap file is acknowledged as
//! soon as its *region* (`intent_region`, 64 MiB by default) is durable in
//! `.write-intent`. So only the first write into a clean region pays for a
//! sync, and one sync covers every bitmap of the disk.
//!
//! A checkpoint (every [`CHECKPOINT_INTERVAL`], on the persister thread)
//! writes the bitmap files up to date and then clears the regions no write
//! relied on since the previous checkpoint (`hot`), in this order:
//!
//! 1. pick the cold regions; mark them not durable in memory (`persisted`),
//!    so a write arriving now asks for a sync again;
//! 2. write every bitmap page whose bits differ from its file, sync;
//! 3. write the cleared regions to the log, sync.
//!
//! A write that relied on a region read `persisted` before step 1 cleared
//! it, after setting its bits (SeqCst both sides), so step 2 sees its bits.
//! After a crash the loaded bitmaps are their files plus every region left
//! in the log: a superset of every acknowledged write ([`recover`]).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::disk::Bitmap;
use super::persist::{BitmapFile, LoadError};
use super::persister::{page_of, PageRequest};
use super::suspect;
use crate::bits::AtomicBits;
use crate::store::Identity;

/// File name of the log, next to the bitmap files (not a valid bitmap name).
pub(crate) const INTENT_FILE: &str = ".write-intent";
/// How often bitmap files are brought up to date and cold regions cleared.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Regions in which writes may be acknowledged with their bits only in memory.
#[derive(Debug)]
pub(crate) struct Intent {
    /// `bits`: regions that must be durable in the log; `persisted`: regions that are.
    log: Arc<Bitmap>,
    /// Regions a write relied on since the last checkpoint.
    hot: AtomicBits,
}

impl Intent {
    /// Creates an empty log (replacing any old one atomically).
    pub fn create(dir: &Path, size: u64, identity: &Identity, region: u64) -> io::Result<Self> {
        let log = Bitmap::log(INTENT_FILE, region, size, identity);
        let file = BitmapFile::create(&dir.join(INTENT_FILE), &log.header(false, 0), log.bits.word_count())?;
        log.set_file(Some(file));
        let hot = AtomicBits::new(log.bits.len());
        Ok(Self { log: Arc::new(log), hot })
    }

    /// Bytes per region.
    pub fn region(&self) -> u64 {
        self.log.granularity()
    }

    /// Notes a write to `offset..offset+length` whose bitmap bits are set in
    /// memory but not durable. `None`: its regions are durable, the write
    /// may proceed; otherwise the log pages to sync first.
    pub fn note(&self, offset: u64, length: u64) -> Option<PageRequest> {
        let (first, last) = self.log.granules(offset, length);
        self.log.bits.set_range(first, last);
        self.hot.set_range(first, last);
        if self.log.persisted.all_set(first, last) {
            None
        } else {
            Some(self.log.page_request(first / 64, last / 64))
        }
    }

    /// Whether `offset..offset+length` lies in durable regions.
    pub fn covers(&self, offset: u64, length: u64) -> bool {
        let (first, last) = self.log.granules(offset, length);
        self.log.persisted.all_set(first, last)
    }

    /// One checkpoint (see the module docs) over the disk's bitmaps. The
    /// list is read after the cold regions stopped counting as durable, so
    /// a bitmap added meanwhile is written too (a write that relied on a
    /// cold region saw that bitmap in its own, earlier read of the list).
    pub fn checkpoint(&self, list: &ArcSwap<Vec<Arc<Bitmap>>>) -> Result<(), String> {
        let log = &self.log;
        if log.bits.dirty_words().next().is_none() {
            return Ok(());
        }
        let mut cold = Vec::new();
        for w in log.bits.dirty_words().collect::<Vec<_>>() {
            let c = log.bits.word(w) & !self.hot.take_word(w);
            if c != 0 {
                log.persisted.and_not_word(w, c);
                log.bits.and_not_word(w, c);
                cold.push((w, c));
            }
        }
        let bitmaps = list.load();
        for b in bitmaps.iter().filter(|b| b.is_consistent()) {
            if let Err(e) = b.write_changed_pages() {
                // The log file still holds every cold region: give them back.
                for &(w, c) in &cold {
                    log.bits.or_word(w, c);
                    log.persisted.or_word(w, c);
                }
                return Err(format!("bitmap {:?}: {e}", b.name()));
            }
        }
        if !cold.is_empty() {
            let pages = cold.iter().map(|&(w, _)| page_of(w)).collect();
            log.write_pages(&pages).map_err(|e| format!("write-intent log: {e}"))?;
        }
        Ok(())
    }
}

/// At load, before anything is written: ORs every region left in the log
/// of an unclean stop into `unclean` (the bitmaps not closed cleanly) and
/// makes them durable; a log that cannot be read makes them inconsistent.
/// The caller then replaces or removes the log.
pub(crate) fn recover(dir: &Path, size: u64, unclean: &[Arc<Bitmap>]) {
    let path = dir.join(INTENT_FILE);
    let (header, body) = match BitmapFile::open(&path) {
        Ok((_, header, body)) => (header, body),
        Err(LoadError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            for b in unclean {
                b.set_inconsistent(format!("write-intent log unreadable: {e}"));
            }
            return;
        }
    };
    let region = header.granularity;
    let regions = AtomicBits::from_words(header.disk_size.div_ceil(region), &body);
    let ranges: Vec<(u64, u64)> = Bitmap::dirty_ranges(&regions, region, size.min(header.disk_size));
    if ranges.is_empty() {
        return;
    }
    for b in unclean {
        suspect::mark_recovered(b, &ranges);
        let pages = (0..=page_of(b.bits.word_count().saturating_sub(1))).collect();
        if let Err(e) = b.write_pages(&pages) {
            b.set_inconsistent(format!("cannot save regions of the write-intent log: {e}"));
        } else if let Err(e) = suspect::save(dir, b) {
            // Only a cost: the granules stay dirty, and are copied without a look.
            b.suspect.clear_all();
            suspect::forget(dir, b.name());
            tracing::warn!(bitmap = %b.name(), error = %e, "cannot save suspect granules; they count as dirty");
        }
    }
    let bytes: u64 = ranges.iter().map(|r| r.1).sum();
    tracing::info!(dir = %dir.display(), regions = ranges.len(), bytes, bitmaps = unclean.len(),
        "unclean stop: regions of the write-intent log marked dirty (suspect: compared before a backup copies them)");
}
