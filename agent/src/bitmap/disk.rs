//! The bitmaps of one disk: loading, the write path, control operations
//! and the hand-off to block jobs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use super::gate::{Exclusive, Gate, OwnedShared};
use super::intent::{self, Intent, INTENT_FILE};
use super::persist::{BitmapFile, Header, LoadError, WORDS_PER_PAGE};
use super::persister::{page_of, PageRequest, Persister, STOPPED};
use super::suspect;
use super::BitmapError;
use crate::bits::{valid_mask, AtomicBits};
use crate::config::{check_granularity, check_name, BitmapConfig};
use crate::store::Identity;

/// What `bitmap list` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Bytes covered by dirty granules (clamped to the disk).
    pub dirty_bytes: u64,
    /// Of `dirty_bytes`, those that came back from the write-intent log
    /// after an unclean stop: maybe never written. An incremental backup
    /// compares them with its target and copies only what differs.
    pub suspect_bytes: u64,
    /// Writes are being recorded.
    pub recording: bool,
    /// In use by a job.
    pub busy: bool,
    /// The job holding it.
    pub busy_job: Option<String>,
    /// Survives restarts (always true here).
    pub persistent: bool,
    /// Can be trusted.
    pub consistent: bool,
    /// Why it cannot be trusted.
    pub inconsistent_reason: Option<String>,
    /// Bumped whenever bits were dropped.
    pub generation: u64,
    /// Random id given at creation.
    pub uuid: String,
}

#[derive(Debug)]
struct Meta {
    generation: u64,
    uuid: [u8; 16],
    busy: Option<String>,
    reason: Option<String>,
}

/// One named bitmap.
#[derive(Debug)]
pub struct Bitmap {
    name: String,
    granularity: u64,
    shift: u32,
    disk_size: u64,
    identity: String,
    pub(super) bits: AtomicBits,
    pub(super) persisted: AtomicBits,
    /// Dirty granules that may be clean: set only by crash recovery, from a
    /// region of the write-intent log (see [`super::suspect`]). A hint that
    /// costs reads, never a reason to skip a granule unseen.
    pub(super) suspect: suspect::SuspectBits,
    successor: ArcSwapOption<AtomicBits>,
    enabled: AtomicBool,
    consistent: AtomicBool,
    meta: Mutex<Meta>,
    file: Mutex<Option<BitmapFile>>,
}

/// Proof that writes are drained (see [`DiskBitmaps::drained`]).
#[derive(Debug)]
pub struct Drained(());

/// The bits a job works from, frozen at its start.
#[derive(Debug)]
pub struct Frozen {
    /// Granules dirty at the job's start.
    pub bits: AtomicBits,
    /// Of `bits`, the suspect granules (see [`BitmapInfo::suspect_bytes`]):
    /// only ever a reason to compare with a copy that is known to have been
    /// equal at the bitmap's last clear, never to skip a granule unseen.
    pub(crate) suspect: Option<AtomicBits>,
    /// Bytes per bit.
    pub granularity: u64,
    /// Generation at the job's start.
    pub generation: u64,
    /// The bitmap's uuid.
    pub uuid: String,
}

impl Bitmap {
    fn new(name: &str, granularity: u64, disk_size: u64, identity: &Identity, meta: Meta) -> Self {
        let len = disk_size.div_ceil(granularity);
        Self {
            name: name.to_owned(),
            granularity,
            shift: granularity.trailing_zeros(),
            disk_size,
            identity: identity.id.clone(),
            bits: AtomicBits::new(len),
            persisted: AtomicBits::new(len),
            suspect: suspect::SuspectBits::default(),
            successor: ArcSwapOption::empty(),
            enabled: AtomicBool::new(true),
            consistent: AtomicBool::new(true),
            meta: Mutex::new(meta),
            file: Mutex::new(None),
        }
    }

    /// This bitmap over a disk grown to `disk_size` bytes, taking over its
    /// file (the grown range clean). Only while writes are drained, so that
    /// no bit is set meanwhile: the copies are exact.
    fn grown(&self, disk_size: u64) -> Self {
        let len = disk_size.div_ceil(self.granularity);
        let copy = |bits: &AtomicBits| AtomicBits::from_words(len, &bits.snapshot());
        let meta = {
            let m = self.meta();
            Meta { generation: m.generation, uuid: m.uuid, busy: m.busy.clone(), reason: m.reason.clone() }
        };
        let suspect = suspect::SuspectBits::default();
        self.suspect.with(|set| {
            for (w, v) in set.map(AtomicBits::snapshot).unwrap_or_default().into_iter().enumerate() {
                suspect.or_word(len, w as u64, v);
            }
        });
        let successor = ArcSwapOption::empty();
        successor.store(self.successor.load_full().map(|s| Arc::new(copy(&s))));
        Self {
            name: self.name.clone(),
            granularity: self.granularity,
            shift: self.shift,
            disk_size,
            identity: self.identity.clone(),
            bits: copy(&self.bits),
            persisted: copy(&self.persisted),
            suspect,
            successor,
            enabled: AtomicBool::new(self.enabled.load(SeqCst)),
            consistent: AtomicBool::new(self.is_consistent()),
            meta: Mutex::new(meta),
            file: Mutex::new(self.file.lock().unwrap_or_else(|p| p.into_inner()).take()),
        }
    }

    /// Lengthens the file's body for a disk of `disk_size` bytes (see [`BitmapFile::grow`]).
    fn grow_file(&self, disk_size: u64) -> std::io::Result<()> {
        match self.file.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(f) => f.grow(disk_size.div_ceil(self.granularity).div_ceil(64)),
            None => Ok(()),
        }
    }

    /// The write-intent log's region set (see [`super::intent`]).
    pub(super) fn log(name: &str, region: u64, disk_size: u64, identity: &Identity) -> Self {
        let meta = Meta { generation: 0, uuid: [0; 16], busy: None, reason: None };
        Self::new(name, region, disk_size, identity, meta)
    }

    pub(super) fn set_file(&self, file: Option<BitmapFile>) {
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = file;
    }

    /// Writes back every page whose words differ from the file, then syncs.
    pub(super) fn write_changed_pages(&self) -> std::io::Result<()> {
        let pages: BTreeSet<u64> =
            (0..self.bits.word_count()).filter(|&w| self.bits.word(w) != self.persisted.word(w)).map(page_of).collect();
        if pages.is_empty() {
            return Ok(());
        }
        self.write_pages(&pages)
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Whether the bitmap can be trusted.
    pub fn is_consistent(&self) -> bool {
        self.consistent.load(SeqCst)
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.meta().generation
    }

    /// The bitmap's uuid as text.
    pub fn uuid(&self) -> String {
        uuid::Uuid::from_bytes(self.meta().uuid).to_string()
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn granules(&self, offset: u64, length: u64) -> (u64, u64) {
        (offset >> self.shift, (offset + length.max(1) - 1) >> self.shift)
    }

    fn info(&self) -> BitmapInfo {
        let meta = self.meta();
        BitmapInfo {
            name: self.name.clone(),
            granularity: self.granularity,
            dirty_bytes: self.bytes_of(&self.bits),
            suspect_bytes: self.suspect.with(|s| s.map_or(0, |s| self.bytes_of(s))),
            recording: self.enabled.load(SeqCst),
            busy: meta.busy.is_some(),
            busy_job: meta.busy.clone(),
            persistent: true,
            consistent: self.is_consistent(),
            inconsistent_reason: meta.reason.clone(),
            generation: meta.generation,
            uuid: uuid::Uuid::from_bytes(meta.uuid).to_string(),
        }
    }

    fn bytes_of(&self, bits: &AtomicBits) -> u64 {
        let g = self.granularity;
        bits.runs_from(0).map(|(f, n)| ((f + n) * g).min(self.disk_size) - f * g).sum()
    }

    /// Dirty/clean runs covering `offset..offset+length` (clamped to the
    /// disk), as `(length, dirty)`, starting with a run at `offset`.
    pub fn extents(&self, offset: u64, length: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(length).min(self.disk_size);
        let mut out = Vec::new();
        let mut pos = offset;
        for (first, n) in self.bits.runs_from(offset >> self.shift) {
            let (start, stop) = ((first << self.shift).max(offset), ((first + n) << self.shift).min(end));
            if start >= end {
                break;
            }
            if start > pos {
                out.push((start - pos, false));
            }
            out.push((stop - start, true));
            pos = stop;
        }
        if pos < end {
            out.push((end - pos, false));
        }
        out
    }

    /// Dirty byte ranges `(offset, length)` of the whole disk.
    pub fn dirty_ranges(bits: &AtomicBits, granularity: u64, disk_size: u64) -> Vec<(u64, u64)> {
        bits.runs_from(0)
            .map(|(f, n)| (f * granularity, ((f + n) * granularity).min(disk_size) - f * granularity))
            .collect()
    }

    pub(super) fn header(&self, clean: bool, image_mtime_ns: u64) -> Header {
        let meta = self.meta();
        Header {
            name: self.name.clone(),
            granularity: self.granularity,
            disk_size: self.disk_size,
            generation: meta.generation,
            uuid: meta.uuid,
            enabled: self.enabled.load(SeqCst),
            clean,
            inconsistent: !self.is_consistent(),
            image_mtime_ns,
            identity: self.identity.clone(),
        }
    }

    fn write_header(&self, clean: bool, image_mtime_ns: u64) -> Result<(), BitmapError> {
        self.write_header_as(&self.header(clean, image_mtime_ns))
    }

    fn write_header_as(&self, header: &Header) -> Result<(), BitmapError> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match file.as_mut() {
            Some(f) => {
                f.write_header(header).map_err(|source| BitmapError::Persist { name: self.name.clone(), source })
            }
            None => Ok(()),
        }
    }

    /// Writes back `pages` following the persister's protocol, then syncs.
    pub(crate) fn write_pages(&self, pages: &BTreeSet<u64>) -> std::io::Result<()> {
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = file.as_ref() else { return Ok(()) };
        let nwords = self.bits.word_count();
        let mut written = Vec::new();
        for &page in pages {
            let words: Vec<u64> = (page * WORDS_PER_PAGE..((page + 1) * WORDS_PER_PAGE).min(nwords))
                .map(|w| {
                    let t = self.bits.word(w);
                    self.persisted.and_not_word(w, !t);
                    #[cfg(test)]
                    crate::testkit::at("bitmap.write_pages.between_reads", &self.name);
                    self.bits.word(w)
                })
                .collect();
            file.write_page(page, &words)?;
            written.push((page, words));
        }
        file.sync()?;
        for (page, words) in written {
            for (i, s) in words.into_iter().enumerate() {
                self.persisted.or_word(page * WORDS_PER_PAGE + i as u64, s);
            }
        }
        Ok(())
    }

    fn all_pages(self: &Arc<Self>) -> PageRequest {
        self.page_request(0, self.bits.word_count().saturating_sub(1))
    }

    pub(super) fn page_request(self: &Arc<Self>, first_word: u64, last_word: u64) -> PageRequest {
        PageRequest { bitmap: self.clone(), first_page: page_of(first_word), last_page: page_of(last_word) }
    }

    /// Marks the bitmap untrusted, durably if possible.
    pub(super) fn set_inconsistent(&self, reason: String) {
        tracing::error!(bitmap = %self.name, %reason, "bitmap marked inconsistent");
        self.consistent.store(false, SeqCst);
        self.meta().reason = Some(reason);
    }

    fn check_usable(&self) -> Result<(), BitmapError> {
        let meta = self.meta();
        if let Some(job) = &meta.busy {
            return Err(BitmapError::Busy { name: self.name.clone(), job: job.clone() });
        }
        if !self.is_consistent() {
            let reason = meta.reason.clone().unwrap_or_default();
            return Err(BitmapError::Inconsistent { name: self.name.clone(), reason });
        }
        Ok(())
    }
}

/// Every bitmap of one disk.
#[derive(Debug)]
pub struct DiskBitmaps {
    disk: String,
    dir: PathBuf,
    /// Grows with the disk ([`grow`](Self::grow)), under the drain.
    size: AtomicU64,
    identity: Identity,
    list: Arc<ArcSwap<Vec<Arc<Bitmap>>>>,
    /// Replaced by a log of the new size when the disk grows.
    intent: Arc<ArcSwapOption<Intent>>,
    gate: Arc<Gate>,
    ops: Mutex<()>,
    persister: Persister,
    /// Set by [`close`](Self::close): nothing more is written back, so a
    /// late write makes its bitmaps inconsistent instead of relying on bits
    /// that exist only in memory.
    closed: AtomicBool,
    /// One `persist_failed` at a time.
    failing: Mutex<()>,
}

impl DiskBitmaps {
    /// Loads the bitmaps in `dir` and creates the configured ones that are
    /// missing. `intent_region`: bytes per region of the write-intent log
    /// (0: none, every first write to a clean granule syncs its bitmaps).
    pub fn open(
        dir: &Path,
        disk: &str,
        size: u64,
        identity: Identity,
        configured: &[BitmapConfig],
        intent_region: u64,
    ) -> Result<Self, BitmapError> {
        let io = |source| BitmapError::Persist { name: dir.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut loaded = Vec::new();
        let mut unclean = Vec::new();
        for path in bitmap_files(dir)? {
            let (b, clean) = load(&path, size, &identity);
            let b = Arc::new(b);
            if !clean && b.is_consistent() {
                unclean.push(b.clone());
            }
            loaded.push(b);
        }
        intent::recover(dir, size, &unclean);
        let intent = if intent_region > 0 {
            Some(Arc::new(Intent::create(dir, size, &identity, intent_region).map_err(io)?))
        } else {
            match std::fs::remove_file(dir.join(INTENT_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => None,
            }
        };
        let list = Arc::new(ArcSwap::from_pointee(loaded));
        let intent = Arc::new(ArcSwapOption::new(intent));
        let checkpoint = intent.load().is_some().then(|| {
            let (intent, list, disk) = (intent.clone(), list.clone(), disk.to_owned());
            Box::new(move || {
                let Some(intent) = intent.load_full() else { return };
                if let Err(e) = intent.checkpoint(&list) {
                    tracing::error!(%disk, error = %e, "bitmap checkpoint failed; write-intent regions kept");
                }
            }) as Box<dyn Fn() + Send>
        });
        let me = Self {
            disk: disk.to_owned(),
            dir: dir.to_owned(),
            size: AtomicU64::new(size),
            identity,
            list,
            intent,
            gate: Arc::default(),
            ops: Mutex::new(()),
            persister: Persister::start(disk, checkpoint),
            closed: AtomicBool::new(false),
            failing: Mutex::new(()),
        };
        for b in configured {
            match me.get(&b.name) {
                Ok(existing) if existing.granularity != b.granularity => tracing::warn!(
                    disk, bitmap = %b.name, existing = existing.granularity, configured = b.granularity,
                    "configured granularity differs from the existing bitmap; keeping the existing one"
                ),
                Ok(_) => {}
                Err(_) => {
                    me.add(&b.name, b.granularity, b.enabled)?;
                }
            }
        }
        Ok(me)
    }

    /// Disk name (`VM/DISK`).
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// Disk size the bitmaps cover.
    pub fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    /// Online resize: grows the disk to `size` bytes, every bitmap with it.
    /// Every page of every bitmap is written first, while writes go on (a
    /// lazy writeback queued before, by a job's commit or a clear, would
    /// reach the old bitmap, which has no file then; control operations
    /// wait on `ops`). Then, with writes drained: the pages changed since
    /// are written and the files lengthened; `grow_store` grows the image;
    /// the bitmaps are replaced by grown copies (the new range clean: it
    /// reads as zeroes here, and a backup makes its target read so), their
    /// headers record the new size, and the write-intent log starts over at
    /// the new size (empty: every bit is in the files). No write past the
    /// old end is acknowledged before that, so a crash at any step loads a
    /// superset of the acknowledged writes: a header that still has the old
    /// size (unclean) loads at the disk's size with every bit of its longer
    /// body. Shrinking is refused.
    pub fn grow<E: From<BitmapError>>(&self, size: u64, grow_store: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let _ops = self.ops();
        let old = self.size();
        if size < old {
            return Err(BitmapError::Invalid(format!("cannot shrink {} from {old} to {size} bytes", self.disk)).into());
        }
        if self.closed.load(SeqCst) {
            return Err(BitmapError::Invalid(format!("{} is closing", self.disk)).into());
        }
        let list = self.list.load_full();
        for b in list.iter().filter(|b| b.is_consistent()) {
            let pages = (0..=page_of(b.bits.word_count().saturating_sub(1))).collect();
            b.write_pages(&pages).map_err(|source| BitmapError::Persist { name: b.name.clone(), source })?;
        }
        let _gate = self.exclusive();
        let drained = std::time::Instant::now();
        for b in list.iter() {
            let persist = |source| BitmapError::Persist { name: b.name.clone(), source };
            let done = if b.is_consistent() { b.write_changed_pages() } else { Ok(()) };
            match done.and_then(|()| b.grow_file(size)) {
                Err(e) if b.is_consistent() => return Err(persist(e).into()),
                Err(e) => {
                    tracing::warn!(disk = %self.disk, bitmap = %b.name, error = %e, "cannot lengthen an inconsistent bitmap's file")
                }
                Ok(()) => {}
            }
        }
        #[cfg(test)]
        crate::testkit::at("bitmap.grow.before_store", &self.disk);
        grow_store()?;
        #[cfg(test)]
        crate::testkit::at("bitmap.grow.after_store", &self.disk);
        let grown: Vec<Arc<Bitmap>> = list.iter().map(|b| Arc::new(b.grown(size))).collect();
        for b in &grown {
            // Without it the file still loads as a superset: an unclean header of the old size
            // over a longer body loads at the disk's size with every bit of the body.
            if let Err(e) = b.write_header(false, 0) {
                tracing::warn!(disk = %self.disk, bitmap = %b.name, error = %e, "cannot record the new size in the bitmap file");
            }
        }
        let intent = self.intent.load_full().and_then(|log| {
            match Intent::create(&self.dir, size, &self.identity, log.region()) {
                Ok(new) => Some(Arc::new(new)),
                Err(e) => {
                    // Safe without: every first write into a clean granule syncs the bitmap files.
                    tracing::error!(disk = %self.disk, error = %e, "cannot recreate the write-intent log; bitmap files synced on every first write");
                    None
                }
            }
        });
        self.list.store(Arc::new(grown));
        self.intent.store(intent);
        self.size.store(size, SeqCst);
        let drained_ms = drained.elapsed().as_millis();
        drop(_gate);
        for b in self.list.load().iter() {
            self.save_suspect(b);
        }
        tracing::info!(disk = %self.disk, from = old, to = size, drained_ms, "disk grown; bitmaps grown with it (writes waited drained_ms)");
        Ok(())
    }

    /// Held by every write request across marking and the store write
    /// (owned: an asynchronous write holds it until its store IO completed).
    pub fn write_section(&self) -> OwnedShared {
        self.gate.shared_owned()
    }

    /// [`write_section`](Self::write_section) if that needs no wait, owned
    /// (an asynchronous write holds it until its store IO completed).
    pub fn try_write_section(&self) -> Option<OwnedShared> {
        self.gate.try_shared_owned()
    }

    fn exclusive(&self) -> Exclusive<'_> {
        self.gate.exclusive()
    }

    fn ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `offset..offset+length` dirty in every recording bitmap and
    /// returns once the bits are durable, in the bitmap files or (for the
    /// first write into a clean region) in the write-intent log.
    pub fn mark(&self, offset: u64, length: u64) -> Result<(), BitmapError> {
        self.mark_with(offset, length, true).map(drop)
    }

    /// [`mark`](Self::mark) without waiting: true if the bits are durable
    /// now; false if they would need a sync first (they are set in memory
    /// then; the caller takes the blocking path, whose `mark` syncs them).
    pub fn try_mark(&self, offset: u64, length: u64) -> Result<bool, BitmapError> {
        self.mark_with(offset, length, false)
    }

    fn mark_with(&self, offset: u64, length: u64, wait: bool) -> Result<bool, BitmapError> {
        // Never a silent loss: past the end the bitmaps would drop the bits (the image grew
        // behind the agent's back, say). The write fails instead.
        if offset.saturating_add(length) > self.size() {
            return Err(BitmapError::Invalid(format!(
                "write {offset}+{length} past the {} bytes the bitmaps of {} cover",
                self.size(),
                self.disk
            )));
        }
        let list = self.list.load();
        let mut pending = Vec::new();
        for b in list.iter() {
            if !b.enabled.load(SeqCst) {
                continue;
            }
            // Set even while inconsistent: `persist_failed` turns a bitmap inconsistent only once
            // that is durable, so a bitmap seen inconsistent here stays so.
            let (first, last) = b.granules(offset, length);
            b.bits.set_range(first, last);
            if let Some(successor) = b.successor.load().as_ref() {
                successor.set_range(first, last);
            }
            if b.is_consistent() && !b.persisted.all_set(first, last) {
                pending.push(b.clone());
            }
        }
        if self.closed.load(SeqCst) {
            if !wait {
                return Ok(false);
            }
            let consistent: Vec<Arc<Bitmap>> =
                list.iter().filter(|b| b.enabled.load(SeqCst) && b.is_consistent()).cloned().collect();
            if !consistent.is_empty() {
                return self.persist_failed(&consistent, STOPPED.to_owned()).map(|()| true);
            }
        }
        if pending.is_empty() {
            return Ok(true);
        }
        let requests = match self.intent.load().as_ref() {
            Some(intent) => match intent.note(offset, length) {
                None => return Ok(true),
                Some(request) => vec![request],
            },
            None => pending
                .iter()
                .map(|b| {
                    let (first, last) = b.granules(offset, length);
                    b.page_request(first / 64, last / 64)
                })
                .collect(),
        };
        if !wait {
            return Ok(false);
        }
        self.persister.sync(requests).or_else(|e| self.persist_failed(&pending, e)).map(|()| true)
    }

    /// A writeback failed: the bits may not be durable. The bitmaps become
    /// inconsistent (durably if the header can still be written); if even
    /// that fails the write must fail, or a crash could hide it.
    fn persist_failed(&self, bitmaps: &[Arc<Bitmap>], error: String) -> Result<(), BitmapError> {
        let _one = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        for b in bitmaps.iter().filter(|b| b.is_consistent()) {
            // Durably inconsistent first, then in memory: a bitmap never looks inconsistent to
            // a concurrent write (which then skips its sync) and consistent again afterwards.
            b.meta().generation += 1;
            let mut header = b.header(false, 0);
            header.inconsistent = true;
            if let Err(e) = b.write_header_as(&header) {
                b.meta().generation -= 1;
                return Err(e);
            }
            b.set_inconsistent(format!("bitmap writeback failed: {error}"));
        }
        Ok(())
    }

    /// Runs a write-intent checkpoint now (tests; the persister runs them periodically).
    #[cfg(test)]
    pub(super) fn checkpoint(&self) {
        if let Some(intent) = self.intent.load().as_ref() {
            intent.checkpoint(&self.list).unwrap();
        }
    }

    /// Whether every recording bitmap already has `offset..offset+length`
    /// durably dirty (a write there would not wait for a bitmap sync).
    pub fn all_durable(&self, offset: u64, length: u64) -> bool {
        self.intent.load().as_ref().is_some_and(|intent| intent.covers(offset, length))
            || self.list.load().iter().filter(|b| b.enabled.load(SeqCst) && b.is_consistent()).all(|b| {
                let (first, last) = b.granules(offset, length);
                b.persisted.all_set(first, last)
            })
    }

    /// Looks a bitmap up.
    pub fn get(&self, name: &str) -> Result<Arc<Bitmap>, BitmapError> {
        let list = self.list.load();
        let found = list.iter().find(|b| b.name == name).cloned();
        found.ok_or_else(|| BitmapError::NotFound { disk: self.disk.clone(), name: name.to_owned() })
    }

    /// Every bitmap, sorted by name.
    pub fn list(&self) -> Vec<BitmapInfo> {
        self.list.load().iter().map(|b| b.info()).collect()
    }

    /// Adds a new, empty bitmap.
    pub fn add(&self, name: &str, granularity: u64, enabled: bool) -> Result<BitmapInfo, BitmapError> {
        check_name(name).map_err(BitmapError::Invalid)?;
        check_granularity(granularity).map_err(BitmapError::Invalid)?;
        let _ops = self.ops();
        if self.get(name).is_ok() {
            return Err(BitmapError::Exists(name.to_owned()));
        }
        let meta = Meta { generation: 1, uuid: *uuid::Uuid::new_v4().as_bytes(), busy: None, reason: None };
        let b = Bitmap::new(name, granularity, self.size(), &self.identity, meta);
        b.enabled.store(enabled, SeqCst);
        // A file left by a bitmap of the same name removed before a crash is not this one's.
        suspect::forget(&self.dir, name);
        let path = self.dir.join(format!("{name}.bitmap"));
        let file = BitmapFile::create(&path, &b.header(false, 0), b.bits.word_count())
            .map_err(|source| BitmapError::Persist { name: name.to_owned(), source })?;
        *b.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
        let info = b.info();
        self.replace_list(|list| {
            list.push(Arc::new(b));
            list.sort_by(|a, b| a.name.cmp(&b.name));
        });
        tracing::info!(disk = %self.disk, bitmap = name, granularity, enabled, "bitmap added");
        Ok(info)
    }

    fn replace_list(&self, edit: impl FnOnce(&mut Vec<Arc<Bitmap>>)) {
        let mut list: Vec<Arc<Bitmap>> = self.list.load().as_ref().clone();
        edit(&mut list);
        self.list.store(Arc::new(list));
    }

    /// Removes a bitmap and its file (allowed for inconsistent bitmaps).
    pub fn remove(&self, name: &str) -> Result<(), BitmapError> {
        let _ops = self.ops();
        let b = self.get(name)?;
        if let Some(job) = &b.meta().busy {
            return Err(BitmapError::Busy { name: name.to_owned(), job: job.clone() });
        }
        // The file may come back after a power loss (the unlink not yet durable): with a newer
        // generation it no longer matches any backup chain taken against this bitmap.
        if let Err(e) = self.bump_generation(&b) {
            if b.is_consistent() {
                return Err(e);
            }
        }
        self.replace_list(|list| list.retain(|x| x.name != name));
        *b.file.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let path = self.dir.join(format!("{name}.bitmap"));
        let persist = |source| BitmapError::Persist { name: name.to_owned(), source };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(persist(source)),
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(persist)?;
        suspect::forget(&self.dir, name);
        tracing::info!(disk = %self.disk, bitmap = name, "bitmap removed");
        Ok(())
    }

    /// Drops every bit; bumps the generation (durably, before any bit is dropped on disk).
    pub fn clear(&self, name: &str) -> Result<BitmapInfo, BitmapError> {
        let _ops = self.ops();
        let b = self.get(name)?;
        b.check_usable()?;
        let _gate = self.exclusive();
        self.bump_generation(&b)?;
        #[cfg(test)]
        crate::testkit::at("bitmap.clear.after_bump", name);
        // `persisted` first (the writeback protocol): a writeback that read a word before this
        // must not keep counting its bits as durable once they are gone from memory.
        b.persisted.clear_all();
        b.bits.clear_all();
        b.suspect.clear_all();
        self.persister.lazy(b.all_pages());
        drop(_gate);
        self.save_suspect(&b);
        Ok(b.info())
    }

    /// Brings `NAME.suspect` in step with memory after suspect granules
    /// went (a job's commit, a clear): a stale file would only cost reads
    /// after a crash, as would a failure here (logged).
    fn save_suspect(&self, b: &Bitmap) {
        if let Err(e) = suspect::save(&self.dir, b) {
            tracing::warn!(disk = %self.disk, bitmap = %b.name, error = %e, "cannot save suspect granules");
        }
    }

    /// [`save_suspect`](Self::save_suspect) by name, after a job's commit
    /// (outside the drain, which must stay short).
    pub fn save_suspect_of(&self, name: &str) {
        if let Ok(b) = self.get(name) {
            self.save_suspect(&b);
        }
    }

    /// Gives a bitmap the identity (uuid and generation) of the bitmap it
    /// continues: on a migration's destination, the bitmap goes on recording
    /// the writes since the same backup snapshot, so that snapshot's chain
    /// stays valid for it (the next backup there is incremental).
    pub fn adopt(&self, name: &str, uuid: &str, generation: u64) -> Result<BitmapInfo, BitmapError> {
        let uuid =
            uuid::Uuid::parse_str(uuid).map_err(|e| BitmapError::Invalid(format!("bad bitmap uuid {uuid:?}: {e}")))?;
        let _ops = self.ops();
        let b = self.get(name)?;
        let old = {
            let mut meta = b.meta();
            let old = (meta.uuid, meta.generation);
            (meta.uuid, meta.generation) = (*uuid.as_bytes(), generation);
            old
        };
        if let Err(e) = b.write_header(false, 0) {
            let mut meta = b.meta();
            (meta.uuid, meta.generation) = old;
            return Err(e);
        }
        Ok(b.info())
    }

    fn bump_generation(&self, b: &Bitmap) -> Result<(), BitmapError> {
        b.meta().generation += 1;
        b.write_header(false, 0).inspect_err(|_| b.meta().generation -= 1)
    }

    /// Starts or stops recording writes. Any change bumps the generation:
    /// a bitmap that was disabled at some point since a backup misses
    /// writes, so no backup chain may treat it as a complete record.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<BitmapInfo, BitmapError> {
        let _ops = self.ops();
        let b = self.get(name)?;
        b.check_usable()?;
        let was = b.enabled.swap(enabled, SeqCst);
        if was == enabled {
            return Ok(b.info());
        }
        b.meta().generation += 1;
        b.write_header(false, 0).inspect_err(|_| {
            b.enabled.store(was, SeqCst);
            b.meta().generation -= 1;
        })?;
        Ok(b.info())
    }

    /// Whether the bitmap records writes.
    pub fn is_enabled(&self, name: &str) -> Result<bool, BitmapError> {
        Ok(self.get(name)?.enabled.load(SeqCst))
    }

    /// ORs `sources` into `target` (granularities may differ: a target
    /// granule is dirty if it overlaps any dirty source granule).
    pub fn merge(&self, target: &str, sources: &[String]) -> Result<BitmapInfo, BitmapError> {
        let _ops = self.ops();
        let t = self.get(target)?;
        t.check_usable()?;
        let sources = sources.iter().map(|s| self.get(s)).collect::<Result<Vec<_>, _>>()?;
        for s in &sources {
            if !s.is_consistent() {
                let reason = s.meta().reason.clone().unwrap_or_default();
                return Err(BitmapError::Inconsistent { name: s.name.clone(), reason });
            }
        }
        let _gate = self.exclusive();
        for s in &sources {
            for (offset, length) in Bitmap::dirty_ranges(&s.bits, s.granularity, self.size()) {
                let (first, last) = t.granules(offset, length);
                t.bits.set_range(first, last);
            }
        }
        t.write_pages(&(0..=page_of(t.bits.word_count().saturating_sub(1))).collect())
            .map_err(|source| BitmapError::Persist { name: target.to_owned(), source })?;
        self.bump_generation(&t)?;
        Ok(t.info())
    }

    /// Runs `f` with every in-flight write drained and new writes held:
    /// the atomic moment for job hand-offs (begin/commit) and for
    /// installing point-in-time hooks.
    pub fn drained<R>(&self, f: impl FnOnce(&Drained) -> R) -> R {
        let _ops = self.ops();
        let _gate = self.exclusive();
        f(&Drained(()))
    }

    /// Freezes a bitmap for a job: from now on new writes also go to a
    /// successor; the returned copy is what the job must process.
    pub fn begin_job(&self, _: &Drained, name: &str, job: &str) -> Result<Frozen, BitmapError> {
        let b = self.get(name)?;
        b.check_usable()?;
        b.successor.store(Some(Arc::new(AtomicBits::new(b.bits.len()))));
        let frozen = AtomicBits::from_words(b.bits.len(), &b.bits.snapshot());
        let suspect = b.suspect.among(&frozen);
        let mut meta = b.meta();
        meta.busy = Some(job.to_owned());
        Ok(Frozen {
            bits: frozen,
            suspect,
            granularity: b.granularity,
            generation: meta.generation,
            uuid: uuid::Uuid::from_bytes(meta.uuid).to_string(),
        })
    }

    /// The job succeeded: drop exactly the frozen bits that were not written
    /// again meanwhile, bump the generation; returns the new generation.
    pub fn commit_job(&self, _: &Drained, name: &str, frozen: &Frozen) -> Result<u64, BitmapError> {
        let b = self.get(name)?;
        let successor = b.successor.swap(None);
        let result = self.bump_generation(&b);
        if result.is_ok() {
            for w in frozen.bits.dirty_words() {
                let again = successor.as_ref().map_or(0, |s| s.word(w));
                let dropped = frozen.bits.word(w) & !again;
                // `persisted` first, as in `clear`.
                b.persisted.and_not_word(w, dropped);
                b.bits.and_not_word(w, dropped);
                // Copied or compared: a granule written again since is really dirty.
                b.suspect.and_not_word(w, frozen.bits.word(w));
            }
            self.persister.lazy(b.all_pages());
        }
        b.meta().busy = None;
        result.map(|()| b.generation())
    }

    /// The job failed or was cancelled: every bit stays. Only acts if
    /// `job` holds the bitmap.
    pub fn abort_job(&self, name: &str, job: &str) {
        self.drained(|d| self.abort_job_drained(d, name, job));
    }

    /// [`abort_job`](Self::abort_job) inside [`drained`](Self::drained).
    pub fn abort_job_drained(&self, _: &Drained, name: &str, job: &str) {
        if let Ok(b) = self.get(name) {
            let mut meta = b.meta();
            if meta.busy.as_deref() == Some(job) {
                b.successor.store(None);
                meta.busy = None;
            }
        }
    }

    /// Clean shutdown: exact bitmaps on disk, marked clean with the
    /// image's mtime; then the write-intent log goes (if every bitmap was saved).
    pub fn close(&self, image: &Identity) {
        self.closed.store(true, SeqCst);
        self.persister.stop();
        // A late write's `persist_failed` either ran (the bitmap is skipped here) or runs after
        // this, and its inconsistent header is the last one written.
        let _failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let mut saved = true;
        for b in self.list.load().iter().filter(|b| b.is_consistent()) {
            let pages = (0..=page_of(b.bits.word_count().saturating_sub(1))).collect();
            let done = b
                .write_pages(&pages)
                .map_err(|e| e.to_string())
                .and_then(|()| b.write_header(true, image.modified_ns).map_err(|e| e.to_string()));
            if let Err(e) = done {
                saved = false;
                tracing::error!(disk = %self.disk, bitmap = %b.name, error = %e, "cannot save bitmap at shutdown");
            }
            // After the clean header: a hint that is not saved costs reads, nothing else.
            self.save_suspect(b);
        }
        if self.intent.load().is_some() && saved {
            if let Err(e) = std::fs::remove_file(self.dir.join(INTENT_FILE)) {
                tracing::error!(disk = %self.disk, error = %e, "cannot remove the write-intent log");
            }
        }
    }
}

/// Loads one bitmap file; `clean`: it was saved by a clean shutdown.
fn load(path: &Path, size: u64, identity: &Identity) -> (Bitmap, bool) {
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("?").to_owned();
    let fresh = Meta { generation: 0, uuid: [0; 16], busy: None, reason: None };
    let (file, header, body) = match BitmapFile::open(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            let granularity = 64 << 10;
            let b = Bitmap::new(&name, granularity, size, identity, fresh);
            b.set_inconsistent(load_reason(&e));
            return (b, false);
        }
    };
    let meta = Meta { generation: header.generation, uuid: header.uuid, busy: None, reason: None };
    let b = Bitmap::new(&name, header.granularity, size, identity, meta);
    b.enabled.store(header.enabled, SeqCst);
    b.set_file(Some(file));
    if let Some(reason) = distrust(&name, &header, &body, size, identity) {
        b.set_inconsistent(reason);
        return (b, header.clean);
    }
    for (w, &v) in body.iter().enumerate() {
        b.bits.or_word(w as u64, v);
        b.persisted.or_word(w as u64, v);
    }
    if header.disk_size < size {
        // A grow that a crash interrupted after the image grew, or whose header write failed
        // (see `DiskBitmaps::grow`): no write past the old end was acknowledged before the
        // grown bitmaps were in place, and every one after has its bits in the longer body
        // (read above) or in the write-intent log. The file only needs its full length.
        if let Err(e) = b.grow_file(size) {
            b.set_inconsistent(format!("cannot grow to the disk's new size: {e}"));
            return (b, header.clean);
        }
        tracing::warn!(bitmap = %name, from = header.disk_size, to = size, "bitmap of a disk grown before an unclean stop: grown with it");
    }
    suspect::load(path.parent().unwrap_or(Path::new(".")), &b);
    if let Err(e) = b.write_header(false, 0) {
        b.set_inconsistent(format!("cannot mark in use: {e}"));
    }
    (b, header.clean)
}

/// Why a loaded file must not be trusted, if it must not.
fn distrust(name: &str, h: &Header, body: &[u64], size: u64, identity: &Identity) -> Option<String> {
    if h.name != name {
        return Some(format!("file holds bitmap {:?}", h.name));
    }
    if h.inconsistent {
        return Some("marked inconsistent before the agent stopped (a bitmap writeback had failed)".into());
    }
    // Grown while running (an online resize that a crash interrupted) is
    // recoverable; shrunk, or changed while the agent was stopped, is not.
    if h.disk_size > size || (h.disk_size < size && h.clean) {
        return Some(format!("disk size changed from {} to {} bytes", h.disk_size, size));
    }
    if h.identity != identity.id {
        return Some(format!("image replaced (was {}, now {})", h.identity, identity.id));
    }
    if h.clean && h.image_mtime_ns != identity.modified_ns {
        return Some("image modified while the agent was not running".into());
    }
    // The body may be longer than its header says (a grow); past the disk nothing may be set.
    let len = size.div_ceil(h.granularity);
    if body.iter().enumerate().any(|(w, &v)| v & !valid_mask(len, w as u64) != 0) {
        return Some("bits set past the end of the disk".into());
    }
    None
}

fn bitmap_files(dir: &Path) -> Result<Vec<PathBuf>, BitmapError> {
    let io = |source| BitmapError::Persist { name: dir.display().to_string(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".bitmap.tmp") || name.ends_with(".suspect.tmp") {
            let _ = std::fs::remove_file(&path);
        } else if name.ends_with(".bitmap") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn load_reason(e: &LoadError) -> String {
    match e {
        LoadError::Corrupt { reason, .. } => reason.clone(),
        LoadError::Io { source, .. } => format!("cannot read: {source}"),
    }
}
