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
    failed: BTreeMap<u64, String>,
    stop: bool,
}

struct Shared {
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
        let shared = Arc::new(Shared { queue: Mutex::default(), work: Condvar::new(), done: Condvar::new() });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("bitmap-sync {disk}"))
            .spawn(move || worker.run(checkpoint))
            .expect("spawn bitmap writeback thread");
        Self { shared, thread: Mutex::new(Some(thread)) }
    }

    /// Writes the pages durably and returns when they are; Err names a
    /// bitmap whose file could not be written.
    pub fn sync(&self, requests: Vec<PageRequest>) -> Result<(), String> {
        let mut q = self.shared.lock();
        q.sync.extend(requests);
        let ticket = q.started + 1;
        self.shared.work.notify_one();
        while q.finished < ticket {
            q = self.shared.done.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        match q.failed.get(&ticket) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
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

    fn run(&self, checkpoint: Option<Checkpoint>) {
        let mut last_checkpoint = Instant::now();
        let mut q = self.lock();
        loop {
            if let Some(checkpoint) = checkpoint.as_ref().filter(|_| last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL) {
                drop(q);
                checkpoint();
                last_checkpoint = Instant::now();
                q = self.lock();
            }
            if q.sync.is_empty() && !q.stop {
                let (guard, timeout) = self.work.wait_timeout(q, LAZY_INTERVAL).unwrap_or_else(|p| p.into_inner());
                q = guard;
                let lazy_due = timeout.timed_out() && !q.lazy.is_empty();
                if q.sync.is_empty() && !lazy_due && !q.stop {
                    continue;
                }
            }
            let mut batch = std::mem::take(&mut q.sync);
            batch.append(&mut q.lazy);
            q.started += 1;
            let ticket = q.started;
            let stop = q.stop;
            drop(q);
            let result = write_back(batch);
            q = self.lock();
            if let Err(e) = result {
                q.failed.insert(ticket, e);
            }
            q.finished = ticket;
            q.failed.retain(|&t, _| t + 64 > ticket);
            self.done.notify_all();
            if stop && q.sync.is_empty() && q.lazy.is_empty() {
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
