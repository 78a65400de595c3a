//! Mirror jobs: copy a disk to another agent's export over NBD while
//! clients keep writing, converge, and cut over.
//!
//! ```text
//!  seed      incremental: the bitmap's bits (frozen at the start; the bitmap
//!            itself is never consumed) · full: every granule · top: allocated ones
//!  track     a hook marks every new write dirty (before it reaches the store)
//!  copy      passes over the dirty set: lock granules, clear bits, read, send
//!  ready     remaining dirty bytes below the threshold
//!  blocking  write-blocking mode: a write is acknowledged only after it was
//!            also written to the destination; switched to automatically when
//!            background passes stop shrinking the dirty set
//!  complete  hold writes → copy the rest → flush destination → source
//!            read-only → release; downtime = hold → done
//! ```
//! Granule locks are held from reading a granule until the destination
//! acknowledged it, and an active-mirror write takes the same locks, so an
//! older copy can never land after a newer write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Mutex as AsyncMutex;

use super::{JobError, JobHandle, JobState};
use crate::bitmap::AtomicBits;
use crate::export::{Export, WriteData, WriteHook};
use crate::nbd::client::{NbdClient, NbdUri};
use crate::store::{BlockStore, ExtentKind, StoreError};

/// Largest piece sent in one request.
const PIECE: u64 = 4 << 20;
/// Pieces in flight.
const PARALLEL: usize = 8;
const STRIPES: u64 = 256;
/// Background passes that may fail to shrink the dirty set before the
/// mirror switches itself to write-blocking.
const STALLED_PASSES: u32 = 3;

/// What to seed the copy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorSync {
    /// Every granule.
    Full,
    /// Allocated granules only.
    Top,
    /// The granules a bitmap marks dirty (the destination already holds the rest).
    Incremental,
}

/// How guest writes reach the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Copied by the job's passes.
    Background,
    /// Written to both sides before the write is acknowledged.
    WriteBlocking,
}

/// Parameters of a mirror job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorParams {
    /// `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub target: String,
    /// Seed.
    pub sync: MirrorSync,
    /// Bitmap (required for incremental).
    pub bitmap: Option<String>,
    /// Initial copy mode.
    pub copy_mode: CopyMode,
    /// Ready once fewer dirty bytes than this remain.
    pub ready_threshold: u64,
}

/// The mirror's view of the export's writes.
#[derive(Debug)]
pub struct Tracker {
    dirty: AtomicBits,
    shift: u32,
    size: u64,
    locks: Vec<Arc<AsyncMutex<()>>>,
    blocking: AtomicBool,
    client: Arc<NbdClient>,
    /// The disk's store: a forwarded write sends what it holds now.
    source: Arc<dyn BlockStore>,
    runtime: tokio::runtime::Handle,
    sent: AtomicU64,
    /// Why forwarding a guest write failed (the mirror then fails; the
    /// guest's write, already on the authoritative source, succeeds).
    failed: std::sync::Mutex<Option<String>>,
}

impl Tracker {
    fn granules(&self, offset: u64, length: u64) -> (u64, u64) {
        (offset >> self.shift, (offset + length.max(1) - 1) >> self.shift)
    }

    fn stripes(&self, first: u64, last: u64) -> Vec<Arc<AsyncMutex<()>>> {
        let mut idx: Vec<u64> = (first..=last.min(first + STRIPES - 1)).map(|g| g % STRIPES).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.locks[usize::try_from(i).unwrap_or(0)].clone()).collect()
    }

    /// Dirty bytes left.
    fn remaining(&self) -> u64 {
        (self.dirty.count() << self.shift).min(self.size)
    }
}

impl WriteHook for Tracker {
    /// Background mode: the granules become dirty (copied by a later pass).
    /// Write-blocking mode: nothing yet; `after_write` forwards the write,
    /// so granules that were in sync stay in sync (a 4 KiB write must not
    /// make its whole granule dirty, or a mirror under small writes never
    /// converges).
    fn before_write(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        if !self.blocking.load(SeqCst) {
            let (first, last) = self.granules(offset, length);
            self.dirty.set_range(first, last);
        }
        Ok(())
    }

    /// Write-blocking: under the granule locks, send the range as the
    /// source holds it now, then drop the dirty bits of granules it covered
    /// completely. Sending the source's content rather than this write's
    /// data keeps overlapping writes in flight from reaching the
    /// destination in the other order: whichever forward goes last read the
    /// source after both writes were stored. The locks also order it after
    /// any copy of the same granules that read older data. WRITE_ZEROES and
    /// TRIM, and writes when the mode changed since `before_write` or
    /// forwarding fails, make the granules dirty instead (a pass copies
    /// them). A write on a runtime worker (the connection's own task) waits
    /// through [`crate::rt::blocking`].
    fn after_write(&self, offset: u64, data: &WriteData<'_>) -> Result<(), StoreError> {
        let (first, last) = self.granules(offset, data.len());
        if !self.blocking.load(SeqCst) || matches!(data, WriteData::Zeroes(_)) {
            self.dirty.set_range(first, last);
            return Ok(());
        }
        let length = data.len();
        crate::rt::blocking(|| {
            let locks = self.stripes(first, last);
            let guards: Vec<_> = locks.iter().map(|l| l.blocking_lock()).collect();
            let mut now = vec![0u8; usize::try_from(length).unwrap_or(0)];
            let sent = match self.source.read_at(&mut now, offset) {
                Ok(()) => {
                    self.runtime.block_on(self.client.write(offset, Bytes::from(now), false)).map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("reading the source failed: {e}")),
            };
            if let Err(e) = sent {
                self.dirty.set_range(first, last);
                self.blocking.store(false, SeqCst);
                tracing::error!(offset, error = %e, "forwarding a write to the mirror target failed; the mirror fails");
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert_with(|| format!("Forwarding a write to the destination failed: {e}"));
                return;
            }
            self.sent.fetch_add(length, SeqCst);
            let g = 1u64 << self.shift;
            let (full_first, end) = (offset.div_ceil(g), (offset + length) / g);
            for gr in full_first..end {
                self.dirty.and_not_word(gr / 64, 1 << (gr % 64));
            }
            drop(guards);
        });
        Ok(())
    }

    fn write_failed(&self, offset: u64, length: u64) {
        let (first, last) = self.granules(offset, length);
        self.dirty.set_range(first, last);
    }
}

async fn zero(client: &NbdClient, offset: u64, length: u64) -> Result<(), crate::nbd::client::NbdClientError> {
    let mut pos = offset;
    while pos < offset + length {
        let n = (offset + length - pos).min(1 << 30);
        client.write_zeroes(pos, u32::try_from(n).unwrap_or(1 << 30)).await?;
        pos += n;
    }
    Ok(())
}

fn err(context: &str) -> impl FnOnce(&dyn std::fmt::Display) -> JobError + '_ {
    move |e| JobError::Failed(format!("{context}: {e}"))
}

/// Runs the mirror until completed, cancelled or failed.
/// At cut-over the source export turns read-only (in memory); `migrate`
/// fences it durably once the destination is active
/// ([`write_fence`]), or makes it writable again if the migration fails.
pub async fn run(
    job: JobHandle,
    export: Arc<Export>,
    params: MirrorParams,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Value, JobError> {
    let uri: NbdUri = params.target.parse().map_err(JobError::Failed)?;
    let client = Arc::new(
        NbdClient::connect(&uri, tls.as_ref())
            .await
            .map_err(|e| JobError::from_err("Cannot reach the mirror target", &e))?,
    );
    if client.size() != export.size() {
        return Err(JobError::Failed(format!("Mirror target has {} bytes, disk has {}", client.size(), export.size())));
    }
    let tracker = start_tracking(&job, &export, &params, client.clone())?;
    let result = mirror(&job, &export, &params, &tracker).await;
    export.remove_hook(&tracker);
    if let Some(bitmap) = &params.bitmap {
        export.bitmaps().abort_job(bitmap, &job.id());
    }
    let result = result?;
    if let Ok(c) = Arc::try_unwrap(client) {
        c.disconnect().await;
    }
    Ok(result)
}

/// Seeds the dirty set and installs the tracker atomically with respect to writes.
fn start_tracking(
    job: &JobHandle,
    export: &Arc<Export>,
    params: &MirrorParams,
    client: Arc<NbdClient>,
) -> Result<Arc<Tracker>, JobError> {
    let bitmaps = export.bitmaps();
    let size = export.size();
    if params.sync == MirrorSync::Incremental && params.bitmap.is_none() {
        return Err(JobError::Failed("Incremental mirror needs a bitmap".into()));
    }
    bitmaps.drained(|d| {
        let (granularity, seed) = match (&params.bitmap, params.sync) {
            (Some(name), MirrorSync::Incremental) => {
                let frozen = bitmaps.begin_job(d, name, &job.id()).map_err(|e| err("Bitmap")(&e))?;
                (frozen.granularity, Some(frozen.bits))
            }
            (Some(name), _) => (bitmaps.get(name).map_err(|e| err("Bitmap")(&e))?.granularity(), None),
            (None, _) => (64 << 10, None),
        };
        let len = size.div_ceil(granularity);
        let dirty = match (seed, params.sync) {
            (Some(bits), _) => bits,
            (None, MirrorSync::Top) => {
                let bits = AtomicBits::new(len);
                let extents = export.store().extents(0, size).map_err(|e| err("Allocation map")(&e))?;
                for e in extents.iter().filter(|e| e.kind == ExtentKind::Data) {
                    bits.set_range(e.offset / granularity, (e.offset + e.length - 1) / granularity);
                }
                bits
            }
            (None, _) => {
                let bits = AtomicBits::new(len);
                bits.set_all();
                bits
            }
        };
        let tracker = Arc::new(Tracker {
            dirty,
            shift: granularity.trailing_zeros(),
            size,
            locks: (0..STRIPES).map(|_| Arc::new(AsyncMutex::new(()))).collect(),
            blocking: AtomicBool::new(params.copy_mode == CopyMode::WriteBlocking),
            client,
            source: export.store().clone(),
            runtime: tokio::runtime::Handle::current(),
            sent: AtomicU64::new(0),
            failed: std::sync::Mutex::new(None),
        });
        export.add_hook(d, tracker.clone());
        Ok(tracker)
    })
}

async fn mirror(
    job: &JobHandle,
    export: &Arc<Export>,
    params: &MirrorParams,
    t: &Arc<Tracker>,
) -> Result<Value, JobError> {
    let started = Instant::now();
    let initial = t.remaining();
    job.set_total(initial);
    let (mut passes, mut stalled, mut best) = (0u32, 0u32, u64::MAX);
    let mut switched_at = None;
    loop {
        job.checkpoint().await?;
        if let Some(mode) =
            job.settings().get("copy_mode").and_then(|m| serde_json::from_value::<CopyMode>(m.clone()).ok())
        {
            t.blocking.store(mode == CopyMode::WriteBlocking, SeqCst);
        }
        pass(job, export, t).await?;
        passes += 1;
        let left = t.remaining();
        job.set_total(t.sent.load(SeqCst) + left);
        if left <= params.ready_threshold {
            job.set_state(JobState::Ready);
        }
        if job.is_completion_requested() {
            break;
        }
        if left >= best && left > params.ready_threshold && !t.blocking.load(SeqCst) {
            stalled += 1;
            if stalled >= STALLED_PASSES {
                tracing::warn!(remaining = left, "mirror not converging; switching to write-blocking");
                t.blocking.store(true, SeqCst);
                // Recorded as the job's setting: the next pass applies it instead of an older
                // `copy_mode` that would switch it back.
                job.set_setting("copy_mode", json!(CopyMode::WriteBlocking));
                switched_at = Some(passes);
            }
        } else {
            stalled = 0;
        }
        best = best.min(left);
        if left == 0 || left <= params.ready_threshold {
            tokio::select! {
                () = job.completion_requested() => break,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
    job.set_state(JobState::Completing);
    let cutover = Instant::now();
    let guard = export.quiesce().await;
    let held = Instant::now();
    while t.remaining() > 0 {
        pass(job, export, t).await?;
    }
    t.client.flush().await.map_err(|e| JobError::from_err("Flushing the destination failed", &e))?;
    export.set_read_only();
    drop(guard);
    let downtime = cutover.elapsed();
    Ok(json!({
        "target": params.target,
        "initial_dirty_bytes": initial,
        "bytes_sent": t.sent.load(SeqCst),
        "disk_size": export.size(),
        "passes": passes,
        "switched_to_write_blocking_after_pass": switched_at,
        "duration_ms": super::millis(started.elapsed()),
        "downtime_ms": super::millis(downtime),
        "drain_ms": super::millis(held.duration_since(cutover)),
    }))
}

/// Records durably that `disk` now lives at `target`.
pub fn write_fence(path: &std::path::Path, disk: &str, target: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let body = json!({ "disk": disk, "target": target, "at": super::unix_now() }).to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(std::path::Path::new(".")))?.sync_all()
}

/// One pass over the dirty set.
async fn pass(job: &JobHandle, export: &Arc<Export>, t: &Arc<Tracker>) -> Result<(), JobError> {
    if let Some(e) = t.failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Err(JobError::Failed(e));
    }
    let g = 1u64 << t.shift;
    let runs: Vec<(u64, u64)> = t.dirty.runs_from(0).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (first, count) in runs {
        let mut start = first;
        while start < first + count {
            let n = (first + count - start).min(PIECE / g).max(1);
            job.checkpoint().await?;
            job.throttle(n * g).await?;
            while tasks.len() >= PARALLEL {
                join(&mut tasks, job).await?;
            }
            tasks.spawn(copy_piece(export.clone(), t.clone(), start, start + n - 1));
            start += n;
        }
    }
    while !tasks.is_empty() {
        join(&mut tasks, job).await?;
    }
    Ok(())
}

async fn join(tasks: &mut tokio::task::JoinSet<Result<u64, JobError>>, job: &JobHandle) -> Result<(), JobError> {
    match tasks.join_next().await {
        Some(Ok(Ok(bytes))) => {
            job.progress(bytes);
            Ok(())
        }
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(JobError::Failed(format!("internal error: {e}"))),
        None => Ok(()),
    }
}

/// Copies granules `first..=last` under their locks; returns bytes sent.
async fn copy_piece(export: Arc<Export>, t: Arc<Tracker>, first: u64, last: u64) -> Result<u64, JobError> {
    let locks = t.stripes(first, last);
    let mut guards = Vec::with_capacity(locks.len());
    for l in &locks {
        guards.push(l.clone().lock_owned().await);
    }
    let mut todo = Vec::new();
    for g in first..=last {
        if t.dirty.get(g) {
            t.dirty.and_not_word(g / 64, 1 << (g % 64));
            todo.push(g);
        }
    }
    let Some((&lo, &hi)) = todo.first().zip(todo.last()) else { return Ok(0) };
    let start = lo << t.shift;
    let end = ((hi + 1) << t.shift).min(t.size);
    let store = export.store().clone();
    let len = usize::try_from(end - start).unwrap_or(0);
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        store.read_at(&mut buf, start).map(|()| buf)
    })
    .await
    .map_err(|e| JobError::Failed(e.to_string()))?;
    let data = match read {
        Ok(d) => d,
        Err(e) => {
            todo.iter().for_each(|&g| {
                t.dirty.set_range(g, g);
            });
            return Err(JobError::from_err("Reading the source failed", &e));
        }
    };
    let sent = if data.iter().all(|&b| b == 0) {
        zero(&t.client, start, end - start).await
    } else {
        t.client.write(start, Bytes::from(data), false).await
    };
    if let Err(e) = sent {
        todo.iter().for_each(|&g| {
            t.dirty.set_range(g, g);
        });
        return Err(JobError::from_err("Writing to the destination failed", &e));
    }
    t.sent.fetch_add(end - start, SeqCst);
    drop(guards);
    Ok(end - start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;
    use crate::store::Stores;
    use std::process::{Child, Command, Stdio};

    /// `qemu-nbd` serving a raw file on a Unix socket (the mirror's destination), killed on drop.
    struct QemuNbd(Child);

    impl Drop for QemuNbd {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Two overlapping writes are stored A then B; their forwards run B first, then A, A's in a
    /// task on a runtime worker (a write on the connection's own task, which can meet a write-blocking
    /// mirror that started while it waited for the gate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_of_overlapping_writes_in_the_other_order_leave_the_destination_as_the_source() {
        const SIZE: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(None);
        let source: Arc<dyn BlockStore> =
            Arc::new(FileStore::create(&dir.path().join("src.raw"), SIZE, &stores).unwrap());
        let dest = dir.path().join("dst.raw");
        std::fs::File::create(&dest).unwrap().set_len(SIZE).unwrap();
        let socket = dir.path().join("dst.sock");
        let _server = QemuNbd(
            Command::new("qemu-nbd")
                .args(["-t", "-f", "raw", "-k"])
                .arg(&socket)
                .arg(&dest)
                .stdin(Stdio::null())
                .spawn()
                .expect("qemu-nbd (qemu-utils) must be installed"),
        );
        let uri: NbdUri = format!("nbd+unix:///?socket={}", socket.display()).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = loop {
            match NbdClient::connect(&uri, None).await {
                Ok(c) => break Arc::new(c),
                Err(e) if Instant::now() > deadline => panic!("connecting to qemu-nbd: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let tracker = Arc::new(Tracker {
            dirty: AtomicBits::new(SIZE >> 16),
            shift: 16,
            size: SIZE,
            locks: (0..STRIPES).map(|_| Arc::new(AsyncMutex::new(()))).collect(),
            blocking: AtomicBool::new(true),
            client: client.clone(),
            source: source.clone(),
            runtime: tokio::runtime::Handle::current(),
            sent: AtomicU64::new(0),
            failed: std::sync::Mutex::new(None),
        });
        let (a, b) = (vec![0xaa; 8192], vec![0xbb; 8192]);
        tracker.before_write(4096, 8192).unwrap();
        source.write_at(&a, 4096).unwrap();
        tracker.before_write(8192, 8192).unwrap();
        source.write_at(&b, 8192).unwrap();
        let t = tracker.clone();
        tokio::task::spawn_blocking(move || t.after_write(8192, &WriteData::Data(&b))).await.unwrap().unwrap();
        let t = tracker.clone();
        tokio::spawn(async move { t.after_write(4096, &WriteData::Data(&a)) }).await.unwrap().unwrap();
        assert!(tracker.failed.lock().unwrap().is_none());
        client.flush().await.unwrap();
        let got = client.read(0, 32768).await.unwrap();
        let mut want = vec![0u8; 32768];
        source.read_at(&mut want, 0).unwrap();
        assert!(got[..] == want[..], "the destination kept the older write where the two overlap");
        assert_eq!(tracker.remaining(), 0, "no granule was left dirty");
    }
}
