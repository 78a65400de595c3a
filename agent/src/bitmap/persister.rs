//! Group commit of bitmap pages: one thread per disk writes the pages that
//! writers need durable, syncs each touched file once per batch, and wakes
//! every writer whose pages were in the batch.
//!
//! Per word, a writeback follows one protocol (writers only set bits, then
//! read `persisted`):
//! 1. `t = bits[w]`; `persisted[w] &= t`  (bits cleared in memory stop counting as durable)
//! 2. `s = bits[w]`; write `s`; sync
//! 3. `persisted[w] |= s`
//!
//! A writer that sets a bit after step 2's read sees it missing from
//! `persisted` (step 1 ran before) and asks for another writeback, so no
//! acknowledged write relies on a bit the file does not hold.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::disk::Bitmap;
use super::intent::CHECKPOINT_INTERVAL;
use super::persist::WORDS_PER_PAGE;

/// Why a sync after [`Persister::stop`] fails.
pub(crate) const STOPPED: &str = "the disk's bitmaps are closed";

/// How often lazily cleared pages are written back.
const LAZY_INTERVAL: Duration = Duration::from_millis(500);

/// Pages of one bitmap to write back.
pub(crate) struct PageRequest {
    pub bitmap: Arc<Bitmap>,
    pub first_page: u64,
    pub last_page: u64,
}

#[derive(Default)]
struct Queue {
    sync: Vec<PageRequest>,
    lazy: Vec<PageRequest>,
    started: u64,
    finished: u64,
    /// Why a batch failed, kept until every writer waiting for it has read it.
    failed: BTreeMap<u64, String>,
    /// Writers waiting for each batch.
    waiting: BTreeMap<u64, usize>,
    stop: bool,
    /// The thread has ended: nothing will be written any more.
    exited: bool,
}

impl Queue {
    /// Whether a writer waits for the next batch.
    fn awaited(&self) -> bool {
        self.waiting.contains_key(&(self.started + 1))
    }
}

struct Shared {
    #[cfg(test)]
    disk: String,
    queue: Mutex<Queue>,
    work: Condvar,
    done: Condvar,
}

/// Work the thread does every [`CHECKPOINT_INTERVAL`] (see [`super::intent`]).
pub(crate) type Checkpoint = Box<dyn Fn() + Send>;

/// The writeback thread of one disk's bitmaps.
pub(crate) struct Persister {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Persister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Persister")
    }
}

impl Persister {
    pub fn start(disk: &str, checkpoint: Option<Checkpoint>) -> Self {
        Self::start_with(disk, checkpoint, write_back)
    }

    fn start_with(
        disk: &str,
        checkpoint: Option<Checkpoint>,
        write: impl Fn(Vec<PageRequest>) -> Result<(), String> + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            #[cfg(test)]
            disk: disk.to_owned(),
            queue: Mutex::default(),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("bitmap-sync {disk}"))
            .spawn(move || worker.run(checkpoint, write))
            .expect("spawn bitmap writeback thread");
        Self { shared, thread: Mutex::new(Some(thread)) }
    }

    /// Writes the pages durably and returns when they are; Err names a
    /// bitmap whose file could not be written.
    pub fn sync(&self, requests: Vec<PageRequest>) -> Result<(), String> {
        let mut q = self.shared.lock();
        if q.exited {
            return Err(STOPPED.to_owned());
        }
        q.sync.extend(requests);
        let ticket = q.started + 1;
        *q.waiting.entry(ticket).or_default() += 1;
        self.shared.work.notify_one();
        while q.finished < ticket && !q.exited {
            q = self.shared.done.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.finished < ticket {
            return Err(STOPPED.to_owned());
        }
        #[cfg(test)]
        let mut q = {
            drop(q);
            crate::testkit::at("persister.sync.woken", &self.shared.disk);
            self.shared.lock()
        };
        let failed = q.failed.get(&ticket).cloned();
        if let Some(n) = q.waiting.get_mut(&ticket) {
            *n -= 1;
            if *n == 0 {
                q.waiting.remove(&ticket);
                q.failed.remove(&ticket);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Queues pages for a writeback nobody waits for (after bits were cleared).
    pub fn lazy(&self, request: PageRequest) {
        self.shared.lock().lazy.push(request);
    }

    /// Writes every queued page, then stops the thread.
    pub fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, checkpoint: Option<Checkpoint>, write: impl Fn(Vec<PageRequest>) -> Result<(), String>) {
        let mut last_checkpoint = Instant::now();
        let mut q = self.lock();
        loop {
            if let Some(checkpoint) = checkpoint.as_ref().filter(|_| last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL) {
                drop(q);
                checkpoint();
                last_checkpoint = Instant::now();
                q = self.lock();
            }
            if !q.awaited() && !q.stop {
                let (guard, timeout) = self.work.wait_timeout(q, LAZY_INTERVAL).unwrap_or_else(|p| p.into_inner());
                q = guard;
                let lazy_due = timeout.timed_out() && !q.lazy.is_empty();
                if !q.awaited() && !lazy_due && !q.stop {
                    continue;
                }
            }
            let mut batch = std::mem::take(&mut q.sync);
            batch.append(&mut q.lazy);
            q.started += 1;
            let ticket = q.started;
            let stop = q.stop;
            drop(q);
            let result = write(batch);
            q = self.lock();
            // Kept only for writers that wait for it (each removes it once all have read it).
            if let (Err(e), true) = (result, q.waiting.contains_key(&ticket)) {
                q.failed.insert(ticket, e);
            }
            q.finished = ticket;
            self.done.notify_all();
            if stop && !q.awaited() && q.lazy.is_empty() {
                q.exited = true;
                self.done.notify_all();
                return;
            }
        }
    }
}

/// Writes every requested page of every bitmap, syncs each file once.
fn write_back(batch: Vec<PageRequest>) -> Result<(), String> {
    let mut by_bitmap: BTreeMap<String, (Arc<Bitmap>, BTreeSet<u64>)> = BTreeMap::new();
    for r in batch {
        let entry = by_bitmap.entry(r.bitmap.name().to_owned()).or_insert_with(|| (r.bitmap.clone(), BTreeSet::new()));
        entry.1.extend(r.first_page..=r.last_page);
    }
    let mut first_error = None;
    for (bitmap, pages) in by_bitmap.into_values() {
        if let Err(e) = bitmap.write_pages(&pages) {
            tracing::error!(bitmap = bitmap.name(), error = %e, "bitmap writeback failed");
            first_error.get_or_insert(format!("bitmap {:?}: {e}", bitmap.name()));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Page holding word `w`.
pub(crate) fn page_of(word: u64) -> u64 {
    word / WORDS_PER_PAGE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose batch failed is slow to wake up; 64 more batches finish meanwhile. It must
    /// still see its failure (its bits may not be durable), not a success.
    #[test]
    fn a_slow_waiter_still_sees_its_failed_batch_after_many_later_batches() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let persister = Arc::new(Persister::start_with("persister-test/slow-waiter", None, move |_| {
            match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Err("disk full".to_owned()),
                _ => Ok(()),
            }
        }));
        let later = persister.clone();
        crate::testkit::set("persister.sync.woken", "persister-test/slow-waiter", move || {
            for _ in 0..100 {
                later.sync(Vec::new()).unwrap();
            }
        });
        assert_eq!(persister.sync(Vec::new()), Err("disk full".to_owned()));
        let q = persister.shared.lock();
        assert!(q.failed.is_empty() && q.waiting.is_empty(), "failures are kept only while someone waits");
    }
}
