//! Layering for `file:` images: a child whose unwritten granules read from
//! a parent snapshot (any store's), like an RBD clone or a qcow2 backing file.
//!
//! `IMAGE.owned` holds one bit per granule: set when the child's own data
//! is authoritative there. A write to a granule the child does not own
//! copies the rest of that granule from the parent first (copy-up), under a
//! stripe lock (one per 4 MiB group of granules) that the stream
//! (`copy_up`) takes too, so a guest write is never overwritten by older
//! parent data.
//!
//! Durability: owned bits reach the disk only in [`Layer::flush`], which
//! takes the changed ones, syncs the child's data, then writes them. After
//! a crash, granules written since the last flush may read from the parent
//! again, which the NBD contract allows for unflushed writes; flushed data
//! is never hidden, and an owned bit is never on disk before its data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bits::AtomicBits;
use crate::config::ImageUri;
use crate::store::{BlockStore, Extent, StoreError};

/// Copy-up locks: granules map to stripes in groups of `STRIPE_SPAN` bytes,
/// so a stream chunk (one 4 MiB RBD object) takes one stripe, and chunks in
/// flight on different objects do not wait for each other.
const STRIPES: u64 = 64;
const STRIPE_SPAN: u64 = 4 << 20;

/// The parent side of a layered `file:` image.
#[derive(Debug)]
pub struct Layer {
    parent_uri: ImageUri,
    parent: Arc<dyn BlockStore>,
    granularity: u64,
    shift: u32,
    /// Granules of one stripe group, as a shift.
    group_shift: u32,
    size: u64,
    owned: AtomicBits,
    changed_words: AtomicBits,
    file: File,
    path: PathBuf,
    stripes: Vec<Mutex<()>>,
    /// Held by a flush from taking the changed owned words to persisting them.
    flushing: Mutex<()>,
    /// Read-held while an owned bit and its changed word are set, write-held
    /// while a flush takes the changed words: a flush never runs between the
    /// two, so a write that saw a granule owned (and skipped the copy-up) is
    /// covered by its flush.
    owning: std::sync::RwLock<()>,
    /// Taken around the stream's writes into the child: the kernel runs
    /// writes to one file one at a time anyway (the inode lock), but its
    /// waiters spin; with 8 chunks in flight that spinning took a fifth of
    /// the stream's CPU (`perf`, 25% dirty). Waiters here sleep.
    stream_writes: Mutex<()>,
}

/// Largest stream buffer a thread keeps for its next chunk. A fresh 4 MiB
/// buffer per chunk cost a memset and a page fault per page (~7% of the
/// stream's CPU, perf 2026-11-27). Kept per thread, not per layer: the
/// stream's chunks run on the blocking pool, whose idle threads exit (and
/// free theirs) within seconds once the stream is over.
const SPARE_MAX: usize = 8 << 20;

thread_local! {
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { op, offset, source }
}

/// Path of the owned map of `image`.
pub fn owned_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".owned");
    PathBuf::from(p)
}

/// What copy-up does with one granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Owned by the child: left alone.
    Keep,
    /// Parent data: written.
    Data,
    /// All zero in the parent: cleared in the child.
    Zero,
}

/// This thread's stream buffer while a chunk uses it; handed back on drop.
struct Spare(Vec<u8>);

impl Spare {
    fn take(len: usize) -> Self {
        let mut buf = SPARE.with(std::cell::Cell::take);
        buf.resize(len, 0);
        Self(buf)
    }
}

impl std::ops::Deref for Spare {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Spare {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if self.0.len() <= SPARE_MAX {
            let buf = std::mem::take(&mut self.0);
            // A thread being torn down has no slot left: the buffer is just freed.
            let _ = SPARE.try_with(|s| s.set(buf));
        }
    }
}

impl Layer {
    /// Opens (or with `create`, creates empty) the owned map of a child.
    pub fn open(
        image: &Path,
        parent_uri: ImageUri,
        parent: Arc<dyn BlockStore>,
        size: u64,
        granularity: u64,
        create: bool,
        read_only: bool,
    ) -> Result<Self, StoreError> {
        let path = owned_path(image);
        let open_err = |source| StoreError::Open { path: path.clone(), source };
        let bits = size.div_ceil(granularity);
        let words = bits.div_ceil(64);
        let file = OpenOptions::new().read(true).write(!read_only).create(create).open(&path).map_err(open_err)?;
        if create {
            file.set_len(words * 8).map_err(open_err)?;
            file.sync_all().map_err(open_err)?;
        }
        let mut raw = vec![0u8; usize::try_from(words * 8).unwrap_or(0)];
        file.read_exact_at(&mut raw, 0).map_err(open_err)?;
        let values: Vec<u64> =
            raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        Ok(Self {
            parent_uri,
            parent,
            granularity,
            shift: granularity.trailing_zeros(),
            group_shift: (STRIPE_SPAN / granularity).max(1).trailing_zeros(),
            size,
            owned: AtomicBits::from_words(bits, &values),
            changed_words: AtomicBits::new(words),
            file,
            path,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flushing: Mutex::new(()),
            owning: std::sync::RwLock::new(()),
            stream_writes: Mutex::new(()),
        })
    }

    /// The parent snapshot.
    pub fn parent_uri(&self) -> &ImageUri {
        &self.parent_uri
    }

    /// Whether every granule is owned (the parent is no longer needed).
    pub fn fully_owned(&self) -> bool {
        self.owned.is_empty() || self.owned.all_set(0, self.owned.len() - 1)
    }

    /// Bytes not yet owned by the child.
    pub fn unowned_bytes(&self) -> u64 {
        self.size.saturating_sub(self.owned.count() * self.granularity).min(self.size)
    }

    fn granules(&self, offset: u64, length: u64) -> (u64, u64) {
        (offset >> self.shift, (offset + length.max(1) - 1) >> self.shift)
    }

    /// Locks the stripes of granules `first..=last`, in index order.
    fn lock(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let (first, last) = (first >> self.group_shift, last >> self.group_shift);
        let n = (last - first + 1).min(STRIPES);
        let mut idx: Vec<u64> = (first..first + n).map(|g| g % STRIPES).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.iter()
            .map(|&i| self.stripes[usize::try_from(i).unwrap_or(0)].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    fn set_owned(&self, first: u64, last: u64) {
        let _owning = self.owning.read().unwrap_or_else(|p| p.into_inner());
        self.owned.set_range(first, last);
        #[cfg(test)]
        crate::testkit::at("layer.set_owned", &self.path.display().to_string());
        self.changed_words.set_range(first / 64, last / 64);
    }

    /// Reads through the layer: owned runs from `child`, the rest from the parent.
    pub fn read(&self, child: &File, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let mut done = 0usize;
        let total = buf.len();
        while done < total {
            let pos = offset + done as u64;
            let g = pos >> self.shift;
            let owned = self.owned.get(g);
            let mut end = ((g + 1) << self.shift).min(offset + buf.len() as u64);
            while end < offset + buf.len() as u64 && self.owned.get(end >> self.shift) == owned {
                end = (((end >> self.shift) + 1) << self.shift).min(offset + buf.len() as u64);
            }
            let stop = usize::try_from(end - offset).unwrap_or(total);
            let chunk = &mut buf[done..stop];
            if owned {
                child.read_exact_at(chunk, pos).map_err(io_err("read", pos))?;
            } else {
                self.parent.read_at(chunk, pos)?;
            }
            done = stop;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, copying up the parts of unowned granules
    /// it does not cover first. Only unowned granules are read and
    /// rewritten: an owned granule gets just `data`'s bytes, as on the
    /// lock-free path, so a concurrent write elsewhere in it (which takes
    /// no lock) is never replaced by a stale copy.
    pub fn write(&self, child: &File, data: &[u8], offset: u64) -> Result<(), StoreError> {
        let (first, last) = self.granules(offset, data.len() as u64);
        if self.owned.all_set(first, last) {
            return child.write_all_at(data, offset).map_err(io_err("write", offset));
        }
        let _locks = self.lock(first, last);
        let end = offset + data.len() as u64;
        // Owned bits only change under the stripe locks, so they are stable here.
        let mut g = first;
        while g <= last {
            let owned = self.owned.get(g);
            let mut run_last = g;
            while run_last < last && self.owned.get(run_last + 1) == owned {
                run_last += 1;
            }
            let run_start = g << self.shift;
            let run_end = ((run_last + 1) << self.shift).min(self.size);
            let (from, to) = (run_start.max(offset), run_end.min(end));
            let part = &data[usize::try_from(from - offset).unwrap_or(0)..usize::try_from(to - offset).unwrap_or(0)];
            child.write_all_at(part, from).map_err(io_err("write", from))?;
            if !owned {
                // The rest of the run's edge granules comes from the parent (the whole granule is
                // written, so nothing a crash left in the child file shows through). Head and tail
                // of one granule (a small write) are one parent read; in a longer run they are
                // read apart, not with the written middle.
                let edges: Vec<(u64, u64)> =
                    [(run_start, from), (to, run_end)].into_iter().filter(|(s, e)| e > s).collect();
                let reads = if g == run_last && edges.len() == 2 { vec![(run_start, run_end)] } else { edges.clone() };
                for (lo, hi) in reads {
                    let mut fill = vec![0u8; usize::try_from(hi - lo).unwrap_or(0)];
                    self.parent.read_at(&mut fill, lo)?;
                    for &(s, e) in edges.iter().filter(|&&(s, e)| s >= lo && e <= hi) {
                        let part = &fill[usize::try_from(s - lo).unwrap_or(0)..usize::try_from(e - lo).unwrap_or(0)];
                        child.write_all_at(part, s).map_err(io_err("write", s))?;
                    }
                }
                self.set_owned(g, run_last);
            }
            g = run_last + 1;
        }
        Ok(())
    }

    /// Makes `offset..offset+length` read as zeroes: whole granules are
    /// punched and owned; partial edge granules go through [`write`](Self::write).
    pub fn zero(
        &self,
        child: &File,
        offset: u64,
        length: u64,
        punch: &dyn Fn(u64, u64) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let end = offset + length;
        let inner_start = offset.next_multiple_of(self.granularity).min(end);
        let inner_end = (end & !(self.granularity - 1)).max(inner_start);
        let inner_end = if end == self.size { end } else { inner_end };
        for (s, e) in [(offset, inner_start), (inner_end, end)] {
            if e > s {
                self.write(child, &vec![0u8; usize::try_from(e - s).unwrap_or(0)], s)?;
            }
        }
        if inner_end > inner_start {
            let (first, last) = self.granules(inner_start, inner_end - inner_start);
            let _locks = self.lock(first, last);
            punch(inner_start, inner_end - inner_start)?;
            self.set_owned(first, last);
        }
        Ok(())
    }

    /// Copies every unowned granule of the range from the parent (stream);
    /// returns the bytes read from the parent. Each run of unowned granules
    /// is read from the parent in one request (a stream chunk is one 4 MiB
    /// RBD read, not 64 small ones) and written in runs; all-zero runs are
    /// not written but passed to `clear`, which makes them read as zeroes:
    /// the child may hold an unflushed write there from before a crash,
    /// which must not show up once the granule is owned.
    pub fn copy_up(
        &self,
        child: &File,
        offset: u64,
        length: u64,
        clear: &dyn Fn(u64, u64) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let (first, last) = self.granules(offset, length);
        let last = last.min(self.owned.len().saturating_sub(1));
        let unowned_run = |from: u64, to: u64| {
            let mut end = from;
            while end < to && !self.owned.get(end + 1) {
                end += 1;
            }
            end
        };
        let mut runs = Vec::new();
        let mut g = first;
        while g <= last {
            if self.owned.get(g) {
                g += 1;
                continue;
            }
            let end = unowned_run(g, last);
            runs.push((g, end));
            g = end + 1;
        }
        let bytes = |(g, end): (u64, u64)| ((end + 1) << self.shift).min(self.size) - (g << self.shift);
        let (Some(&(span_first, _)), Some(&(_, span_last))) = (runs.first(), runs.last()) else { return Ok(0) };
        let span_start = span_first << self.shift;
        let span_len = bytes((span_first, span_last));
        // Many runs with small owned gaps between them (a chunk where the mirror wrote a quarter of
        // the granules is ~16 runs) are read from the parent in one request: each request costs
        // the parent and librbd far more CPU than the gap's bytes do. The parent never changes,
        // so reading before the locks is safe; ownership is checked again under them.
        let unowned: u64 = runs.iter().map(|&r| bytes(r)).sum();
        let span = if runs.len() > 1 && span_len <= 2 * unowned {
            let mut buf = Spare::take(usize::try_from(span_len).unwrap_or(0));
            self.parent.read_at(&mut buf, span_start)?;
            Some(buf)
        } else {
            None
        };
        let mut copied = 0;
        for (g, end) in runs {
            let _lock = self.lock(g, end);
            let start = g << self.shift;
            let stop = ((end + 1) << self.shift).min(self.size);
            let own;
            let buf: &[u8] = match &span {
                Some(span) => {
                    &span[usize::try_from(start - span_start).unwrap_or(0)..]
                        [..usize::try_from(stop - start).unwrap_or(0)]
                }
                None => {
                    let mut read = Spare::take(usize::try_from(stop - start).unwrap_or(0));
                    self.parent.read_at(&mut read, start)?;
                    own = read;
                    &own
                }
            };
            copied += stop - start;
            // Granules a guest write owned meanwhile keep the guest's data.
            let byte = |k: u64| usize::try_from(((k << self.shift).min(stop)) - start).unwrap_or(0);
            let fills: Vec<Fill> = (g..=end)
                .map(|k| match (self.owned.get(k), buf[byte(k)..byte(k + 1)].iter().any(|&b| b != 0)) {
                    (true, _) => Fill::Keep,
                    (false, true) => Fill::Data,
                    (false, false) => Fill::Zero,
                })
                .collect();
            let mut k = g;
            for same in fills.chunk_by(|a, b| a == b) {
                let (next, at) = (k + same.len() as u64, k << self.shift);
                let data = &buf[byte(k)..byte(next)];
                let _writing =
                    (same[0] != Fill::Keep).then(|| self.stream_writes.lock().unwrap_or_else(|p| p.into_inner()));
                match same[0] {
                    Fill::Keep => {}
                    Fill::Data => child.write_all_at(data, at).map_err(io_err("copy up", at))?,
                    Fill::Zero => clear(at, data.len() as u64)?,
                }
                if same[0] != Fill::Keep {
                    self.set_owned(k, next - 1);
                }
                k = next;
            }
        }
        Ok(copied)
    }

    /// Makes the child's data and then its owned map durable. Flushes run
    /// one at a time: a flush returns only once every owned bit set before
    /// it started is on disk, including bits another flush had taken.
    pub fn flush(&self, child: &File) -> Result<(), StoreError> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let changes = self.take_changes();
        if let Err(e) = child.sync_data() {
            self.unpersist(&changes);
            return Err(io_err("flush", 0)(e));
        }
        self.persist(&changes)
    }

    /// Takes the owned-map words changed since the last flush, with their
    /// values now. Called *before* the child's data is synced: every bit
    /// in a taken value had its data written before it was set, so the
    /// sync that follows covers it; a bit set after this stays changed
    /// for the next flush. (Taking them after the sync would persist the
    /// bit of a copy-up whose data the sync missed: after a crash the
    /// granule would read the child's zeroes instead of the parent.)
    fn take_changes(&self) -> Vec<(u64, u64)> {
        let _owning = self.owning.write().unwrap_or_else(|p| p.into_inner());
        let words: Vec<u64> = self.changed_words.runs_from(0).flat_map(|(f, n)| f..f + n).collect();
        words
            .into_iter()
            .map(|w| {
                // Cleared before the value is read: a later set marks the word again.
                self.changed_words.and_not_word(w / 64, 1 << (w % 64));
                (w, self.owned.word(w))
            })
            .collect()
    }

    /// Writes taken words durably (after the child's data is synced); on
    /// failure they count as changed again.
    fn persist(&self, changes: &[(u64, u64)]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let written = changes.iter().try_for_each(|&(w, value)| {
            self.file.write_all_at(&value.to_le_bytes(), w * 8).map_err(io_err("write owned map", w * 8))
        });
        let synced = written.and_then(|()| self.file.sync_data().map_err(io_err("sync owned map", 0)));
        if synced.is_err() {
            self.unpersist(changes);
        }
        synced
    }

    /// Marks taken words changed again (their flush failed).
    fn unpersist(&self, changes: &[(u64, u64)]) {
        for &(w, _) in changes {
            self.changed_words.set_range(w, w);
        }
    }

    /// Allocation: owned runs from the child, the rest from the parent.
    pub fn extents(
        &self,
        child: &dyn Fn(u64, u64) -> Result<Vec<Extent>, StoreError>,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, StoreError> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let owned = self.owned.get(pos >> self.shift);
            let mut next = (((pos >> self.shift) + 1) << self.shift).min(end);
            while next < end && self.owned.get(next >> self.shift) == owned {
                next = (((next >> self.shift) + 1) << self.shift).min(end);
            }
            let part = if owned { child(pos, next - pos)? } else { self.parent.extents(pos, next - pos)? };
            for e in part {
                match out.last_mut() {
                    Some(l) if l.kind == e.kind && l.offset + l.length == e.offset => l.length += e.length,
                    _ => out.push(e),
                }
            }
            pos = next;
        }
        Ok(out)
    }

    /// Own-data ranges: owned granules that the child has data in.
    pub fn owned_ranges(&self, offset: u64, length: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(length).min(self.size);
        self.owned
            .runs_from(offset >> self.shift)
            .map(|(f, n)| ((f << self.shift).max(offset), ((f + n) << self.shift).min(end)))
            .take_while(|(s, _)| *s < end)
            .filter(|(s, e)| e > s)
            .map(|(s, e)| (s, e - s))
            .collect()
    }

    /// Path of the owned map.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::store::Stores;

    const MIB: u64 = 1 << 20;

    /// `copy_up`'s `clear` for ranges of the parent without zeroes.
    fn no_zero_runs(at: u64, _: u64) -> Result<(), StoreError> {
        panic!("a zero run at {at}, where the parent has data only");
    }

    /// The parent's byte at `i`: data (never zero) in the first 12 MiB, zeroes after.
    fn parent_byte(i: u64) -> u8 {
        if i < 12 * MIB {
            u8::try_from(i % 251).unwrap() | 1
        } else {
            0
        }
    }

    /// A 16 MiB parent of 64 KiB granules ([`parent_byte`]) and a layer over it.
    fn layer(dir: &Path) -> (Arc<Layer>, File) {
        let uri = ImageUri::file(dir.join("parent.raw"));
        let parent = Stores::new(None).create(&uri, 16 * MIB).unwrap();
        let data: Vec<u8> = (0..16 * MIB).map(parent_byte).collect();
        parent.write_at(&data, 0).unwrap();
        let child_path = dir.join("child.raw");
        let child = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&child_path).unwrap();
        child.set_len(16 * MIB).unwrap();
        (Arc::new(Layer::open(&child_path, uri, parent, 16 * MIB, 64 << 10, true, false).unwrap()), child)
    }

    #[test]
    fn a_stripe_covers_one_rbd_object_of_granules() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, _) = layer(dir.path());
        assert_eq!(layer.lock(0, 63).len(), 1, "the 64 granules of one 4 MiB object share a stripe");
        assert_eq!(layer.lock(63, 64).len(), 2);
        assert_eq!(layer.lock(0, 64 * 200).len(), usize::try_from(STRIPES).unwrap(), "capped at every stripe");
    }

    #[test]
    fn stream_chunks_of_other_objects_do_not_wait_for_a_held_stripe() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, child) = layer(dir.path());
        let held = layer.lock(0, 0);
        let (tx, rx) = mpsc::channel();
        let copier = {
            let layer = layer.clone();
            let child = child.try_clone().unwrap();
            std::thread::spawn(move || {
                tx.send(layer.copy_up(&child, 4 * MIB, 4 * MIB, &no_zero_runs).unwrap()).unwrap()
            })
        };
        // With granule-wise stripes, this chunk needed stripe 0 too and waited forever.
        let copied = rx.recv_timeout(Duration::from_secs(30)).expect("the chunk at 4 MiB waited for object 0's stripe");
        assert_eq!(copied, 4 * MIB);
        drop(held);
        copier.join().unwrap();
        // Reused stream buffers: chunk 0 leaves its data in this thread's buffer, and the chunk
        // at 8 MiB must not show it. A guest write owns a granule in the middle of that chunk
        // first: the chunk is written around it.
        assert_eq!(layer.copy_up(&child, 0, 4 * MIB, &no_zero_runs).unwrap(), 4 * MIB);
        layer.write(&child, &[0xee; 4096], 10 * MIB + 4096).unwrap();
        assert_eq!(
            layer.copy_up(&child, 8 * MIB, 4 * MIB, &no_zero_runs).unwrap(),
            4 * MIB - 65536,
            "the owned granule is not read"
        );
        let mut got = vec![0u8; usize::try_from(8 * MIB).unwrap()];
        layer.read(&child, &mut got, 4 * MIB).unwrap();
        let mut want: Vec<u8> = (4 * MIB..12 * MIB).map(parent_byte).collect();
        let guest = usize::try_from(6 * MIB + 4096).unwrap();
        want[guest..guest + 4096].fill(0xee);
        assert!(got == want, "streamed data differs from the parent and the guest's write");
        assert_eq!(layer.unowned_bytes(), 4 * MIB);
    }

    /// A parent whose reads wait while `held` is set, counting the reads that waited.
    #[derive(Debug)]
    struct GatedParent {
        inner: Arc<dyn BlockStore>,
        held: Mutex<bool>,
        opened: std::sync::Condvar,
        waited: std::sync::atomic::AtomicUsize,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl GatedParent {
        fn open(&self) {
            *self.held.lock().unwrap() = false;
            self.opened.notify_all();
        }
    }

    /// [`layer`] over a [`GatedParent`] (reads wait while `held`).
    fn gated_layer(dir: &Path, held: bool) -> (Arc<GatedParent>, Arc<Layer>, File) {
        let (plain, child) = layer(dir);
        let parent = Arc::new(GatedParent {
            inner: plain.parent.clone(),
            held: Mutex::new(held),
            opened: std::sync::Condvar::new(),
            waited: std::sync::atomic::AtomicUsize::new(0),
            reads: std::sync::atomic::AtomicUsize::new(0),
        });
        drop(plain);
        let uri = ImageUri::file(dir.join("parent.raw"));
        let layer = Layer::open(&dir.join("child.raw"), uri, parent.clone(), 16 * MIB, 64 << 10, false, false).unwrap();
        (parent, Arc::new(layer), child)
    }

    impl BlockStore for GatedParent {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn capabilities(&self) -> crate::store::Capabilities {
            self.inner.capabilities()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut held = self.held.lock().unwrap();
            if *held {
                self.waited.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            while *held {
                held = self.opened.wait(held).unwrap();
            }
            drop(held);
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<(), StoreError> {
            Err(StoreError::ReadOnly)
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), StoreError> {
            Err(StoreError::ReadOnly)
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), StoreError> {
            Err(StoreError::ReadOnly)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError> {
            self.inner.extents(offset, length)
        }
        fn identity(&self) -> Result<crate::store::Identity, StoreError> {
            self.inner.identity()
        }
    }

    #[test]
    fn a_stream_chunk_that_planned_a_granule_before_a_guest_write_owned_it_keeps_the_guest_data() {
        let dir = tempfile::tempdir().unwrap();
        let (parent, layer, child) = gated_layer(dir.path(), true);
        // The guest's partial write of granule 5 copies up: it holds object 0's stripe and waits in
        // its parent read.
        let guest = {
            let (layer, child) = (layer.clone(), child.try_clone().unwrap());
            std::thread::spawn(move || layer.write(&child, &[0xee; 4096], 5 * 65536 + 512).unwrap())
        };
        while parent.waited.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The stream plans object 0 with granule 5 still unowned, then waits for the stripe.
        let stream = {
            let (layer, child) = (layer.clone(), child.try_clone().unwrap());
            std::thread::spawn(move || layer.copy_up(&child, 0, 4 * MIB, &no_zero_runs).unwrap())
        };
        // Give it time to plan and block on the stripe (if it has not yet, the test still checks
        // the outcome, through the plain path).
        std::thread::sleep(Duration::from_millis(200));
        parent.open();
        guest.join().unwrap();
        stream.join().unwrap();
        let mut got = vec![0u8; usize::try_from(4 * MIB).unwrap()];
        layer.read(&child, &mut got, 0).unwrap();
        let mut want: Vec<u8> = (0..4 * MIB).map(parent_byte).collect();
        let at = 5 * 65536 + 512;
        want[at..at + 4096].fill(0xee);
        assert!(got == want, "the stream overwrote the guest's write with parent data");
        assert_eq!(layer.unowned_bytes(), 12 * MIB);
    }

    #[test]
    fn a_write_that_copies_up_leaves_a_concurrent_write_to_an_owned_granule_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (parent, layer, child) = gated_layer(dir.path(), false);
        // Granule 0 is owned (written whole); granule 1 is not.
        layer.write(&child, &[0xaa; 65536], 0).unwrap();
        *parent.held.lock().unwrap() = true;
        // A write across both copies up the rest of granule 1 from the parent, and waits there.
        let across = {
            let (layer, child) = (layer.clone(), child.try_clone().unwrap());
            std::thread::spawn(move || layer.write(&child, &[0xbb; 8192], 65536 - 4096).unwrap())
        };
        while parent.waited.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Meanwhile a write inside owned granule 0 takes the lock-free path and completes.
        layer.write(&child, &[0xcc; 4096], 0).unwrap();
        parent.open();
        across.join().unwrap();
        let mut got = vec![0u8; 2 * 65536];
        layer.read(&child, &mut got, 0).unwrap();
        let mut want: Vec<u8> = (0..2 * 65536).map(parent_byte).collect();
        want[..65536].fill(0xaa);
        want[..4096].fill(0xcc);
        want[65536 - 4096..65536 + 4096].fill(0xbb);
        assert!(got[..4096] == want[..4096], "the copy-up rewrote granule 0 and lost the concurrent write");
        assert!(got == want);
    }

    #[test]
    fn a_chunk_split_by_many_owned_granules_is_one_parent_read() {
        let dir = tempfile::tempdir().unwrap();
        let (parent, layer, child) = gated_layer(dir.path(), false);
        // A quarter of object 0's granules written by the guest (the mirror), every fourth one;
        // in object 1, only granule 0 and the last one are unowned, far apart.
        for g in (1..64).step_by(4) {
            layer.write(&child, &[0xee; 65536], g * 65536).unwrap();
        }
        for g in 65..127 {
            layer.write(&child, &[0xee; 65536], g * 65536).unwrap();
        }
        let reads = |f: &dyn Fn()| {
            let before = parent.reads.load(std::sync::atomic::Ordering::SeqCst);
            f();
            parent.reads.load(std::sync::atomic::Ordering::SeqCst) - before
        };
        assert_eq!(reads(&|| assert_eq!(layer.copy_up(&child, 0, 4 * MIB, &no_zero_runs).unwrap(), 3 * MIB)), 1);
        // Two runs with 62 owned granules between them: two small reads, not 4 MiB.
        assert_eq!(
            reads(&|| assert_eq!(layer.copy_up(&child, 4 * MIB, 4 * MIB, &no_zero_runs).unwrap(), 2 * 65536)),
            2
        );
        let mut got = vec![0u8; usize::try_from(8 * MIB).unwrap()];
        layer.read(&child, &mut got, 0).unwrap();
        let mut want: Vec<u8> = (0..8 * MIB).map(parent_byte).collect();
        for g in (1..64).step_by(4).chain(65..127) {
            want[g * 65536..(g + 1) * 65536].fill(0xee);
        }
        assert!(got == want, "copy-up lost the guest's granules or copied the wrong parent bytes");
        assert_eq!(layer.unowned_bytes(), 8 * MIB);
        // A guest write inside an unowned granule fetches the rest of it in one parent read.
        let at = 150 * 65536 + 4096;
        assert_eq!(reads(&|| layer.write(&child, &[0x11; 4096], at).unwrap()), 1);
        let mut got = vec![0u8; 65536];
        layer.read(&child, &mut got, 150 * 65536).unwrap();
        let mut want: Vec<u8> = (150 * 65536..151 * 65536).map(parent_byte).collect();
        want[4096..8192].fill(0x11);
        assert!(got == want, "the write's granule lost the parent's bytes around it");
    }

    /// The owned bits on disk, one bool per granule.
    fn owned_on_disk(dir: &Path, granules: usize) -> Vec<bool> {
        let raw = std::fs::read(owned_path(&dir.join("child.raw"))).unwrap();
        (0..granules).map(|g| raw[g / 8] & (1 << (g % 8)) != 0).collect()
    }

    #[test]
    fn a_flush_never_persists_an_owned_bit_whose_data_it_did_not_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, child) = layer(dir.path());
        layer.copy_up(&child, 0, 4 * MIB, &no_zero_runs).unwrap();
        // A flush takes the changed words, then a stream chunk lands before its sync.
        let changes = layer.take_changes();
        layer.copy_up(&child, 4 * MIB, 4 * MIB, &no_zero_runs).unwrap();
        child.sync_data().unwrap();
        layer.persist(&changes).unwrap();
        let on_disk = owned_on_disk(dir.path(), 256);
        assert!(on_disk[..64].iter().all(|&b| b), "the first chunk's bits were taken and synced");
        assert!(on_disk[64..].iter().all(|&b| !b), "a bit reached the owned map before a sync covered its data");
        // The next flush persists the rest.
        layer.flush(&child).unwrap();
        let on_disk = owned_on_disk(dir.path(), 256);
        assert!(on_disk[..128].iter().all(|&b| b) && on_disk[128..].iter().all(|&b| !b));
    }

    /// A copy-up sets granule 5's owned bit; before it marks the bit's word changed, a second
    /// write sees the granule owned (no copy-up) and flushes. That flush returns only once the
    /// owned bit is on disk: else after a power loss the granule reads from the parent and the
    /// flushed write is gone.
    #[test]
    fn a_flush_after_a_write_into_a_granule_just_owned_persists_its_owned_bit() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, child) = layer(dir.path());
        let (reached, at_pause) = mpsc::channel();
        let (go, resume) = mpsc::channel::<()>();
        let key = owned_path(&dir.path().join("child.raw")).display().to_string();
        crate::testkit::set("layer.set_owned", &key, move || {
            reached.send(()).unwrap();
            resume.recv().unwrap();
        });
        let copy_up = {
            let (layer, child) = (layer.clone(), child.try_clone().unwrap());
            std::thread::spawn(move || layer.write(&child, &[0xaa; 4096], 5 * 65536).unwrap())
        };
        at_pause.recv().unwrap();
        let (done, flushed) = mpsc::channel();
        let second = {
            let (layer, child) = (layer.clone(), child.try_clone().unwrap());
            std::thread::spawn(move || {
                layer.write(&child, &[0xbb; 4096], 5 * 65536 + 8192).unwrap();
                layer.flush(&child).unwrap();
                done.send(()).unwrap();
            })
        };
        let on_disk = || {
            let mut word = [0u8; 8];
            File::open(&key).unwrap().read_exact_at(&mut word, 0).unwrap();
            u64::from_le_bytes(word) & (1 << 5) != 0
        };
        if flushed.recv_timeout(std::time::Duration::from_millis(300)).is_ok() {
            assert!(on_disk(), "the flush returned, but granule 5's owned bit is not on disk");
        }
        go.send(()).unwrap();
        copy_up.join().unwrap();
        second.join().unwrap();
        assert!(on_disk(), "the flush returned, but granule 5's owned bit is not on disk");
    }
}
