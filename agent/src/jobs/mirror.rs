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
use crate::bits::AtomicBits;
use crate::export::{Export, WriteData, WriteHook};
use crate::nbd::client::{ClientOptions, NbdClient, NbdClientError, NbdUri};
use crate::store::{BlockStore, ExtentKind, StoreError};
use arc_swap::ArcSwap;

/// Largest piece sent in one request.
const PIECE: u64 = 4 << 20;
/// Pieces in flight.
const PARALLEL: usize = 8;
const STRIPES: u64 = 256;
/// Granularity of a mirror without a bitmap.
const DEFAULT_GRANULARITY: u64 = 64 << 10;
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
    /// The bitmap state the caller checked against its backup chain (a
    /// migration: the destination is layered on the snapshot taken at that
    /// state). Checked under the drain that seeds the mirror: if the bitmap
    /// moved on since (a backup committed, a clear, a merge), the seed would
    /// miss writes the destination lacks, so the mirror refuses to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<BitmapState>,
    /// Seconds to keep reconnecting to a destination that went away (0: fail at once).
    #[serde(default)]
    pub reconnect_secs: u64,
}

/// A bitmap's identity and generation, as a backup snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapState {
    /// The bitmap's uuid.
    pub uuid: String,
    /// Its generation.
    pub generation: u64,
}

/// The mirror's view of the export's writes.
#[derive(Debug)]
pub struct Tracker {
    dirty: AtomicBits,
    shift: u32,
    size: u64,
    locks: Vec<Arc<AsyncMutex<()>>>,
    blocking: AtomicBool,
    /// The connection to the destination (replaced on a reconnect).
    client: ArcSwap<NbdClient>,
    /// The destination, for reconnects.
    uri: NbdUri,
    nbd: ClientOptions,
    /// How long a lost connection is retried (zero: the mirror fails).
    reconnect: Duration,
    /// Since when, and why, the connection is lost (`None`: connected).
    lost: std::sync::Mutex<Option<(Instant, String)>>,
    lost_flag: AtomicBool,
    /// Granules the destination acknowledged since its last flush: after a
    /// reconnect they are sent again (a destination that restarted may
    /// have lost them).
    unflushed: AtomicBits,
    /// When the destination was last flushed (see [`flush_if_due`]).
    last_flush: std::sync::Mutex<Instant>,
    /// When the cut-over began holding guest writes (bounds reconnects then).
    cutover: std::sync::Mutex<Option<Instant>>,
    /// The job, told at once when the connection is lost (a migration must
    /// not report the disks in sync from then on).
    job: std::sync::OnceLock<JobHandle>,
    reconnects: AtomicU64,
    /// The disk's store: a forwarded write sends what it holds now.
    source: Arc<dyn BlockStore>,
    runtime: tokio::runtime::Handle,
    /// Forwards cover whole blocks of this size (the destination's minimum
    /// block size, at most a granule), so a destination that requires
    /// aligned requests takes unaligned guest writes too.
    align: u64,
    sent: AtomicU64,
    /// Why forwarding a guest write failed (the mirror then fails; the
    /// guest's write, already on the authoritative source, succeeds).
    failed: std::sync::Mutex<Option<String>>,
}

impl Tracker {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dirty: AtomicBits,
        granularity: u64,
        size: u64,
        blocking: bool,
        client: Arc<NbdClient>,
        source: Arc<dyn BlockStore>,
        uri: NbdUri,
        nbd: ClientOptions,
        reconnect: Duration,
    ) -> Self {
        let len = dirty.len();
        Self {
            dirty,
            shift: granularity.trailing_zeros(),
            size,
            locks: (0..STRIPES).map(|_| Arc::new(AsyncMutex::new(()))).collect(),
            blocking: AtomicBool::new(blocking),
            align: client.min_block(),
            client: ArcSwap::new(client),
            uri,
            nbd,
            reconnect,
            lost: std::sync::Mutex::new(None),
            lost_flag: AtomicBool::new(false),
            unflushed: AtomicBits::new(len),
            cutover: std::sync::Mutex::new(None),
            last_flush: std::sync::Mutex::new(Instant::now()),
            job: std::sync::OnceLock::new(),
            reconnects: AtomicU64::new(0),
            source,
            runtime: tokio::runtime::Handle::current(),
            sent: AtomicU64::new(0),
            failed: std::sync::Mutex::new(None),
        }
    }

    /// Whether the connection is lost (a pass reconnects first).
    fn is_lost(&self) -> bool {
        self.lost_flag.load(SeqCst)
    }

    /// A request on `client` failed (the caller made its granules dirty
    /// again): true if the mirror goes on (reconnecting), false if it
    /// fails. Only a connection that is gone for sure (closed, reset) is
    /// replaced: after a timeout the old connection may still deliver its
    /// queued writes later, over newer data sent on a new one.
    fn connection_lost(&self, client: &Arc<NbdClient>, e: &NbdClientError) -> bool {
        let connection = matches!(e, NbdClientError::Io(..) | NbdClientError::Closed);
        if self.reconnect.is_zero() || !connection {
            return false;
        }
        if !Arc::ptr_eq(client, &self.client.load()) {
            // A straggler of a connection already replaced.
            return true;
        }
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        self.lost_flag.store(true, SeqCst);
        if lost.is_none() {
            tracing::warn!(error = %e, secs = self.reconnect.as_secs(), "lost the mirror target; reconnecting");
            *lost = Some((Instant::now(), e.to_string()));
            self.show_unsynced(true);
        }
        true
    }

    /// Shows the job out of sync at once (called under `lost`, which the
    /// main loop holds for its own report, so a stale "in sync" cannot
    /// follow): a migration must not tell its destination the disks are in
    /// sync from now on.
    fn show_unsynced(&self, reconnecting: bool) {
        if let Some(job) = self.job.get() {
            job.set_detail(json!({
                "remaining_bytes": self.remaining(), "write_blocking": self.blocking.load(SeqCst),
                "in_sync": false, "reconnecting": reconnecting, "reconnects": self.reconnects.load(SeqCst),
            }));
        }
    }

    /// `start..end` was acknowledged on `client`: unflushed until the next
    /// flush, or dirty again if `client` was replaced meanwhile (after the
    /// set: a reconnect takes the unflushed bits after replacing it).
    fn acked(&self, client: &Arc<NbdClient>, start: u64, end: u64) {
        let (first, last) = self.granules(start, end - start);
        self.unflushed.set_range(first, last);
        if !Arc::ptr_eq(client, &self.client.load()) {
            self.dirty.set_range(first, last);
        }
        self.sent.fetch_add(end - start, SeqCst);
    }

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

    /// Sends `start..end` as the source holds it now (the caller holds the
    /// granule locks). On failure the granules are dirty again and the
    /// mirror fails.
    fn forward(&self, start: u64, end: u64) {
        let g = 1u64 << self.shift;
        let full_end = if end == self.size { end.div_ceil(g) } else { end / g };
        // Dropped before the source is read: a write stored after the read sets its bit again.
        for gr in start.div_ceil(g)..full_end {
            self.dirty.and_not_word(gr / 64, 1 << (gr % 64));
        }
        let (first, last) = self.granules(start, end - start);
        if self.is_lost() {
            // Nothing to send to: a pass after the reconnect copies it.
            self.dirty.set_range(first, last);
            return;
        }
        let client = self.client.load_full();
        let mut now = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        let nbd = |e: NbdClientError| (e.to_string(), self.connection_lost(&client, &e));
        let sent = match self.source.read_at(&mut now, start) {
            Ok(()) if now.iter().all(|&b| b == 0) => {
                self.runtime.block_on(zero(&client, start, end - start)).map_err(nbd)
            }
            Ok(()) => self.runtime.block_on(client.write(start, Bytes::from(now), false)).map_err(nbd),
            Err(e) => Err((format!("reading the source failed: {e}"), false)),
        };
        match sent {
            Ok(()) => self.acked(&client, start, end),
            Err((_, true)) => {
                self.dirty.set_range(first, last);
            }
            Err((e, false)) => {
                self.dirty.set_range(first, last);
                self.blocking.store(false, SeqCst);
                tracing::error!(offset = start, error = %e, "forwarding a write to the mirror target failed; the mirror fails");
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert_with(|| format!("Forwarding a write to the destination failed: {e}"));
                drop(failed);
                let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
                self.show_unsynced(lost.is_some());
            }
        }
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

    /// Write-blocking: under the granule locks, drop the dirty bits of the
    /// granules the forward covers completely, then send the range (widened
    /// to the destination's block size) as the source holds it now. Sending
    /// the source's content rather than this write's data keeps overlapping
    /// writes in flight from reaching the destination in the other order:
    /// whichever forward goes last read the source after both writes were
    /// stored. The locks also order it after any copy of the same granules
    /// that read older data.
    ///
    /// Bits are only ever dropped *before* the source is read (here and in
    /// [`copy_piece`]), and set only *after* a write reached the store, so a
    /// bit set by a concurrent write (a WRITE_ZEROES, a failed write, a write
    /// in background mode) can never be dropped by a copy that read older
    /// data: either the copy read after that write, or the bit stays. Those
    /// sets therefore need no lock. WRITE_ZEROES and TRIM, and writes when
    /// the mode changed since `before_write` or forwarding fails, make the
    /// granules dirty (a pass copies them). A write on a runtime worker (the
    /// connection's own task) waits through [`crate::rt::blocking`].
    fn after_write(&self, offset: u64, data: &WriteData<'_>) -> Result<(), StoreError> {
        if !self.blocking.load(SeqCst) {
            let (first, last) = self.granules(offset, data.len());
            self.dirty.set_range(first, last);
            return Ok(());
        }
        // WRITE_ZEROES and TRIM are forwarded too (as zeroes), in pieces: in write-blocking
        // mode the dirty set never grows, so a mirror in sync stays in sync.
        let start = offset & !(self.align - 1);
        let end = (offset + data.len()).next_multiple_of(self.align).min(self.size);
        let mut at = start;
        while at < end {
            let to = (at + PIECE).min(end);
            let (first, last) = self.granules(at, to - at);
            crate::rt::blocking(|| {
                let locks = self.stripes(first, last);
                let guards: Vec<_> = locks.iter().map(|l| l.blocking_lock()).collect();
                self.forward(at, to);
                drop(guards);
            });
            at = to;
        }
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
    nbd: ClientOptions,
    group: Option<Arc<CutOverGroup>>,
) -> Result<Value, JobError> {
    // Dropped without arriving (a failure anywhere, a cancel): the group's cut-over fails.
    let mut member = group.map(|group| Member { group, arrived: false });
    let uri: NbdUri = params.target.parse().map_err(JobError::Failed)?;
    let client = Arc::new(
        NbdClient::connect(&uri, &nbd).await.map_err(|e| JobError::from_err("Cannot reach the mirror target", &e))?,
    );
    if client.size() != export.size() {
        return Err(JobError::Failed(format!("Mirror target has {} bytes, disk has {}", client.size(), export.size())));
    }
    let tracker = start_tracking(&job, &export, &params, client, uri, nbd)?;
    let result = mirror(&job, &export, &params, &tracker, member.as_mut()).await;
    if result.is_err() {
        // Out of sync from now on, before the job concludes (a migration reads this).
        let lost = tracker.lost.lock().unwrap_or_else(|p| p.into_inner());
        tracker.show_unsynced(lost.is_some());
    }
    export.remove_hook(&tracker);
    if let Some(bitmap) = &params.bitmap {
        export.bitmaps().abort_job(bitmap, &job.id());
    }
    let result = result?;
    let client = tracker.client.load_full();
    drop(tracker);
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
    uri: NbdUri,
    nbd: ClientOptions,
) -> Result<Arc<Tracker>, JobError> {
    let bitmaps = export.bitmaps();
    let size = export.size();
    if params.sync == MirrorSync::Incremental && params.bitmap.is_none() {
        return Err(JobError::Failed("Incremental mirror needs a bitmap".into()));
    }
    let granularity = match &params.bitmap {
        Some(name) => bitmaps.get(name).map_err(|e| err("Bitmap")(&e))?.granularity(),
        None => DEFAULT_GRANULARITY,
    };
    if granularity < client.min_block() {
        return Err(JobError::Failed(format!(
            "The destination's minimum block size ({} bytes) is larger than the mirror's granularity ({granularity} bytes)",
            client.min_block()
        )));
    }
    bitmaps.drained(|d| {
        if export.size() != size {
            return Err(JobError::Failed(format!(
                "Disk {} was resized while the mirror started ({size} -> {} bytes); start it again",
                export.name(),
                export.size()
            )));
        }
        let seed = match (&params.bitmap, params.sync) {
            (Some(name), MirrorSync::Incremental) => {
                let frozen = bitmaps.begin_job(d, name, &job.id()).map_err(|e| err("Bitmap")(&e))?;
                let moved = |e: &&BitmapState| e.uuid != frozen.uuid || e.generation != frozen.generation;
                if let Some(expect) = params.expect.as_ref().filter(moved) {
                    bitmaps.abort_job_drained(d, name, &job.id());
                    return Err(JobError::Failed(format!(
                        "Bitmap {name} changed since the backup chain was checked (uuid {}, generation {};                          expected uuid {}, generation {}): the destination's backing misses writes; start over",
                        frozen.uuid, frozen.generation, expect.uuid, expect.generation
                    )));
                }
                Some(frozen.bits)
            }
            _ => None,
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
        let tracker = Arc::new(Tracker::new(
            dirty,
            granularity,
            size,
            params.copy_mode == CopyMode::WriteBlocking,
            client.clone(),
            export.store().clone(),
            uri.clone(),
            nbd.clone(),
            Duration::from_secs(params.reconnect_secs),
        ));
        let _ = tracker.job.set(job.clone());
        export.add_hook(d, tracker.clone());
        Ok(tracker)
    })
}

async fn mirror(
    job: &JobHandle,
    export: &Arc<Export>,
    params: &MirrorParams,
    t: &Arc<Tracker>,
    member: Option<&mut Member>,
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
        pass(job, t, Pace::Job).await?;
        passes += 1;
        flush_if_due(t).await?;
        let left = t.remaining();
        job.set_total(t.sent.load(SeqCst) + left);
        // In write-blocking mode with nothing left the destination holds every acknowledged
        // write, and keeps doing so (the dirty set no longer grows): "in sync".
        // Under `lost`: a loss (or a failed forward) shows itself after this report, never
        // before it (see `show_unsynced`).
        let (left, lost) = {
            let held = t.lost.lock().unwrap_or_else(|p| p.into_inner());
            let lost = held.is_some();
            let failed = t.failed.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            let (left, blocking) = (t.remaining(), t.blocking.load(SeqCst));
            job.set_detail(json!({
                "remaining_bytes": left, "write_blocking": blocking,
                "in_sync": blocking && left == 0 && !lost && !failed,
                "reconnecting": lost, "reconnects": t.reconnects.load(SeqCst),
            }));
            (left, lost)
        };
        if left <= params.ready_threshold {
            job.set_state(JobState::Ready);
        }
        if job.is_completion_requested() {
            break;
        }
        if left >= best && left > params.ready_threshold && !t.blocking.load(SeqCst) && !lost {
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
    let held_from = unix_ms();
    let guard = export.quiesce().await;
    let held = Instant::now();
    *t.cutover.lock().unwrap_or_else(|p| p.into_inner()) = Some(held);
    let sent_before = t.sent.load(SeqCst);
    loop {
        while t.remaining() > 0 || t.is_lost() {
            pass(job, t, Pace::CutOver).await?;
        }
        match flush_destination(t).await {
            Ok(()) if t.remaining() == 0 && !t.is_lost() => break,
            Ok(()) => {}
            Err((c, e)) if t.connection_lost(&c, &e) => {}
            Err((_, e)) => return Err(JobError::from_err("Flushing the destination failed", &e)),
        }
    }
    if let Some(member) = member {
        // Writes stay held until every disk of the group got here: all turn read-only, or none.
        if !member.arrive(|| job.is_cancelled()).await {
            drop(guard);
            return Err(JobError::Failed(
                "Another disk of the VM could not cut over, so this one did not either (it stays writable here)".into(),
            ));
        }
    }
    export.set_read_only();
    drop(guard);
    let downtime = cutover.elapsed();
    let held_until = unix_ms();
    Ok(json!({
        "target": params.target,
        "initial_dirty_bytes": initial,
        "bytes_sent": t.sent.load(SeqCst),
        "disk_size": export.size(),
        "passes": passes,
        "switched_to_write_blocking_after_pass": switched_at,
        "reconnects": t.reconnects.load(SeqCst),
        "duration_ms": super::millis(started.elapsed()),
        "downtime_ms": super::millis(downtime),
        "drain_ms": super::millis(held.duration_since(cutover)),
        "cutover_bytes": t.sent.load(SeqCst) - sent_before,
        "held_from_unix_ms": held_from,
        "held_until_unix_ms": held_until,
    }))
}

/// Longest a disk holds its guest writes waiting for the rest of its group
/// at the cut-over; then the group fails (all stay writable).
const GROUP_WAIT: Duration = Duration::from_secs(30);

/// The cut-over of several disks (a VM's) as one: each member holds its
/// guest writes and copies the rest, and none turns read-only until every
/// member got that far; if one fails (or is dropped before), none does.
#[derive(Debug)]
pub struct CutOverGroup {
    members: usize,
    /// Members arrived, and whether one failed.
    state: tokio::sync::watch::Sender<(usize, bool)>,
}

impl CutOverGroup {
    /// A group of `members` mirrors.
    pub fn new(members: usize) -> Arc<Self> {
        Arc::new(Self { members, state: tokio::sync::watch::Sender::new((0, false)) })
    }

    fn fail(&self) {
        self.state.send_modify(|s| s.1 = true);
    }
}

/// One mirror's place in a [`CutOverGroup`].
#[derive(Debug)]
struct Member {
    group: Arc<CutOverGroup>,
    arrived: bool,
}

impl Member {
    /// Arrives and waits for the others: true once all arrived, false if
    /// one failed, this job was cancelled before all arrived, or the others
    /// did not arrive within [`GROUP_WAIT`] (guest writes are held meanwhile).
    /// The outcome is decided once for all: after the last arrival a cancel
    /// no longer fails the group.
    async fn arrive(&mut self, cancelled: impl Fn() -> bool) -> bool {
        self.arrived = true;
        let group = &self.group;
        let members = group.members;
        group.state.send_modify(|s| s.0 += 1);
        let mut state = group.state.subscribe();
        let deadline = Instant::now() + GROUP_WAIT;
        loop {
            let done = tokio::time::timeout(Duration::from_millis(50), state.wait_for(|s| s.1 || s.0 == members));
            if let Ok(Ok(s)) = done.await {
                return !s.1;
            }
            if cancelled() || Instant::now() > deadline {
                let mut go = false;
                group.state.send_modify(|s| {
                    if s.0 == members && !s.1 {
                        go = true;
                    } else {
                        s.1 = true;
                    }
                });
                return go;
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if !self.arrived {
            self.group.fail();
        }
    }
}

/// Milliseconds since the Unix epoch (when writes were held, comparable across disks).
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, super::millis)
}

/// Records durably that `disk` now lives at `target`.
pub fn write_fence(path: &std::path::Path, disk: &str, target: &str) -> std::io::Result<()> {
    let body = json!({ "disk": disk, "target": target, "at": super::unix_now() }).to_string();
    crate::durable::write_file(path, body.as_bytes())
}

/// How a pass paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// Before the cut-over: waits while paused, keeps to the speed limit.
    Job,
    /// During the cut-over, with guest writes held: as fast as it can, so
    /// neither a pause nor a low speed holds the guest without bound (a
    /// cancel still ends it, and the source stays writable).
    CutOver,
}

/// One pass over the dirty set.
async fn pass(job: &JobHandle, t: &Arc<Tracker>, pace: Pace) -> Result<(), JobError> {
    if let Some(e) = t.failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Err(JobError::Failed(e));
    }
    if t.is_lost() {
        // Shown before the reconnect (which checks whether the destination was told the
        // disks are in sync): a migration must not tell it so meanwhile.
        job.set_detail(json!({
            "remaining_bytes": t.remaining(), "write_blocking": t.blocking.load(SeqCst), "in_sync": false,
            "reconnecting": true, "reconnects": t.reconnects.load(SeqCst),
        }));
        reconnect(job, t).await?;
    }
    let g = 1u64 << t.shift;
    let runs: Vec<(u64, u64)> = t.dirty.runs_from(0).collect();
    let mut tasks = tokio::task::JoinSet::new();
    'runs: for (first, count) in runs {
        let mut start = first;
        while start < first + count {
            let n = (first + count - start).min(PIECE / g).max(1);
            if t.is_lost() {
                // The rest waits for the reconnect (the next pass), not for the speed limit.
                break 'runs;
            }
            match pace {
                // Completion requested: the cut-over copies the rest at full speed; a pass that
                // went on at the speed limit (or paused) would hold the disks of the VM that
                // already hold their guest writes.
                Pace::Job if job.is_completion_requested() => break 'runs,
                Pace::Job => {
                    // A pause or a speed-limit wait ends when completion is requested too.
                    let paced = async {
                        job.checkpoint().await?;
                        job.throttle(n * g).await
                    };
                    tokio::select! {
                        paced = paced => paced?,
                        () = job.completion_requested() => break 'runs,
                    }
                }
                Pace::CutOver if job.is_cancelled() => return Err(JobError::Cancelled),
                Pace::CutOver => {}
            }
            while tasks.len() >= PARALLEL {
                join(&mut tasks, job).await?;
            }
            if pace == Pace::Job {
                flush_if_due(t).await?;
            }
            tasks.spawn(copy_piece(t.clone(), start, start + n - 1));
            start += n;
        }
    }
    while !tasks.is_empty() {
        join(&mut tasks, job).await?;
    }
    Ok(())
}

/// Reconnects to the destination within the reconnect window (from the
/// moment the connection was lost), then makes every granule the old
/// connection acknowledged but never flushed dirty again. A migration whose
/// destination was told the disks are in sync (it serves reads as such)
/// fails instead: its reads would miss writes made meanwhile.
async fn reconnect(job: &JobHandle, t: &Tracker) -> Result<(), JobError> {
    let (since, mut why) =
        t.lost.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or((Instant::now(), String::new()));
    if job.settings().get("synced") == Some(&Value::Bool(true)) {
        return Err(JobError::Failed(format!("Lost the destination after it was told the disks are in sync: {why}")));
    }
    // One window per loss, and one in all for a cut-over (guest writes are held meanwhile).
    let mut deadline = since + t.reconnect;
    if let Some(held) = *t.cutover.lock().unwrap_or_else(|p| p.into_inner()) {
        deadline = deadline.min(held + t.reconnect);
    }
    let mut attempts = 0;
    loop {
        if job.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let cutting_over = t.cutover.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if left.is_zero() && (attempts > 0 || cutting_over) {
            return Err(JobError::Failed(format!(
                "The mirror target was unreachable for more than {} s (nbd.client_reconnect_secs): {why}",
                t.reconnect.as_secs()
            )));
        }
        attempts += 1;
        let limit = left.max(Duration::from_secs(1));
        let connect = tokio::time::timeout(limit, NbdClient::connect(&t.uri, &t.nbd));
        let connected = tokio::select! {
            c = connect => c,
            () = job.cancelled() => return Err(JobError::Cancelled),
        };
        match connected {
            Ok(Ok(c)) if job.settings().get("synced") == Some(&Value::Bool(true)) => {
                drop(c);
                return Err(JobError::Failed(format!(
                    "Lost the destination while it was told the disks are in sync: {why}"
                )));
            }
            Ok(Ok(c)) if c.size() == t.size && c.min_block() <= t.align => {
                // The new connection first; then the old one's unflushed granules (see `acked`).
                t.client.store(Arc::new(c));
                for w in 0..t.unflushed.word_count() {
                    let bits = t.unflushed.take_word(w);
                    if bits != 0 {
                        t.dirty.or_word(w, bits);
                    }
                }
                let mut lost = t.lost.lock().unwrap_or_else(|p| p.into_inner());
                *lost = None;
                t.lost_flag.store(false, SeqCst);
                t.reconnects.fetch_add(1, SeqCst);
                // Still out of sync (the dirty set is being copied again), no longer reconnecting.
                t.show_unsynced(false);
                drop(lost);
                tracing::info!(
                    after_ms = super::millis(since.elapsed()),
                    "reconnected to the mirror target; resuming from the dirty set"
                );
                return Ok(());
            }
            Ok(Ok(c)) => {
                return Err(JobError::Failed(format!(
                    "The mirror target came back with {} bytes and {}-byte blocks (was {} and {})",
                    c.size(),
                    c.min_block(),
                    t.size,
                    t.align
                )))
            }
            // Reachable, but the export is gone (the destination aborted): no point waiting.
            Ok(Err(
                e @ NbdClientError::Handshake(
                    _,
                    proto::client::ClientError::Refused { code: proto::consts::rep::ERR_UNKNOWN, .. },
                ),
            )) => {
                return Err(JobError::from_err("The mirror target refused the reconnect", &e));
            }
            Ok(Err(e)) => {
                why = e.to_string();
                tokio::time::sleep(left.min(Duration::from_millis(250))).await;
            }
            Err(_) => {}
        }
    }
}

/// What the destination acknowledged is made durable there about once a
/// second (between passes and between the pieces of a long one): a
/// reconnect resends only what came after. Not without reconnects.
async fn flush_if_due(t: &Tracker) -> Result<(), JobError> {
    let due = {
        let mut last = t.last_flush.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.elapsed() >= Duration::from_secs(1)
            && !t.reconnect.is_zero()
            && !t.is_lost()
            && t.unflushed.count() > 0;
        if due {
            *last = Instant::now();
        }
        due
    };
    if due {
        if let Err((c, e)) = flush_destination(t).await {
            if !t.connection_lost(&c, &e) {
                return Err(JobError::from_err("Flushing the destination failed", &e));
            }
        }
    }
    Ok(())
}

/// Flushes the destination: the granules acknowledged before it are
/// durable there. On failure they are dirty again.
async fn flush_destination(t: &Tracker) -> Result<(), (Arc<NbdClient>, NbdClientError)> {
    let client = t.client.load_full();
    let taken: Vec<(u64, u64)> = (0..t.unflushed.word_count())
        .filter_map(|w| Some(t.unflushed.take_word(w)).filter(|&b| b != 0).map(|b| (w, b)))
        .collect();
    let flushed = client.flush().await;
    // A flush on another connection than the writes' covers nothing of theirs.
    if flushed.is_err() || !Arc::ptr_eq(&client, &t.client.load()) {
        for (w, bits) in taken {
            t.dirty.or_word(w, bits);
        }
    }
    flushed.map_err(|e| (client, e))
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
async fn copy_piece(t: Arc<Tracker>, first: u64, last: u64) -> Result<u64, JobError> {
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
    if t.is_lost() {
        // The pass after the reconnect copies them.
        todo.iter().for_each(|&g| {
            t.dirty.set_range(g, g);
        });
        return Ok(0);
    }
    let start = lo << t.shift;
    let end = ((hi + 1) << t.shift).min(t.size);
    let len = usize::try_from(end - start).unwrap_or(0);
    // Read on this task's own thread, not the blocking pool: guest writes waiting for these
    // granule locks may hold every blocking-pool thread (`after_write` in write-blocking mode),
    // and a read queued behind them would never run while the locks are held.
    let read = crate::rt::blocking(|| {
        let mut buf = vec![0u8; len];
        t.source.read_at(&mut buf, start).map(|()| buf)
    });
    let data = match read {
        Ok(d) => d,
        Err(e) => {
            todo.iter().for_each(|&g| {
                t.dirty.set_range(g, g);
            });
            return Err(JobError::from_err("Reading the source failed", &e));
        }
    };
    let client = t.client.load_full();
    let sent = if data.iter().all(|&b| b == 0) {
        zero(&client, start, end - start).await
    } else {
        client.write(start, Bytes::from(data), false).await
    };
    if let Err(e) = sent {
        todo.iter().for_each(|&g| {
            t.dirty.set_range(g, g);
        });
        if t.connection_lost(&client, &e) {
            return Ok(0);
        }
        return Err(JobError::from_err("Writing to the destination failed", &e));
    }
    t.acked(&client, start, end);
    drop(guards);
    Ok(end - start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;
    use crate::store::{Extent, Stores};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    const SIZE: u64 = 1 << 20;

    /// An NBD server (the mirror's destination) serving a raw file on a Unix socket, killed on drop.
    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `program args… SOCKET more…` serving `dir/dst.raw` (SIZE bytes), and a client of it.
    async fn destination(dir: &Path, program: &str, args: &[&str], more: &[&str]) -> (Server, Arc<NbdClient>) {
        let dest = dir.join("dst.raw");
        std::fs::File::create(&dest).unwrap().set_len(SIZE).unwrap();
        let socket = dir.join("dst.sock");
        let more: Vec<String> = more.iter().map(|m| m.replace("DEST", &dest.display().to_string())).collect();
        let server = Server(
            Command::new(program)
                .args(args)
                .arg(&socket)
                .args(&more)
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{program} must be installed: {e}")),
        );
        let uri: NbdUri = format!("nbd+unix:///?socket={}", socket.display()).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = loop {
            match NbdClient::connect(&uri, &ClientOptions::default()).await {
                Ok(c) => break Arc::new(c),
                Err(e) if Instant::now() > deadline => panic!("connecting to {program}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        (server, client)
    }

    /// `qemu-nbd` serving `dir/dst.raw`.
    async fn qemu_nbd(dir: &Path) -> (Server, Arc<NbdClient>) {
        destination(dir, "qemu-nbd", &["-t", "-f", "raw", "-k"], &["DEST"]).await
    }

    fn source(dir: &Path) -> Arc<dyn BlockStore> {
        Arc::new(FileStore::create(&dir.join("src.raw"), SIZE, &Stores::new(None)).unwrap())
    }

    /// A write-blocking tracker of `source` with 64 KiB granules.
    fn tracker(client: &Arc<NbdClient>, source: Arc<dyn BlockStore>) -> Arc<Tracker> {
        let uri: NbdUri = "nbd://127.0.0.1:1/unused".parse().unwrap();
        Arc::new(Tracker::new(
            AtomicBits::new(SIZE >> 16),
            1 << 16,
            SIZE,
            true,
            client.clone(),
            source,
            uri,
            ClientOptions::default(),
            Duration::ZERO,
        ))
    }

    /// Asserts that every 64 KiB granule where the destination differs from the source is dirty
    /// (a later pass copies exactly those: anything else is lost on the destination).
    async fn assert_differences_dirty(t: &Tracker) {
        t.client.load().flush().await.unwrap();
        let got = t.client.load().read(0, u32::try_from(SIZE).unwrap()).await.unwrap();
        let mut want = vec![0u8; usize::try_from(SIZE).unwrap()];
        t.source.read_at(&mut want, 0).unwrap();
        for (g, (a, b)) in got.chunks(1 << 16).zip(want.chunks(1 << 16)).enumerate() {
            assert!(a == b || t.dirty.get(g as u64), "granule {g} differs on the destination and is not dirty");
        }
    }

    /// Two overlapping writes are stored A then B; their forwards run B first, then A, A's in a
    /// task on a runtime worker (a write on the connection's own task, which can meet a write-blocking
    /// mirror that started while it waited for the gate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_of_overlapping_writes_in_the_other_order_leave_the_destination_as_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let source = source(dir.path());
        let (_server, client) = qemu_nbd(dir.path()).await;
        let tracker = tracker(&client, source.clone());
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

    type Hook = Box<dyn FnOnce() + Send>;

    /// A source whose next read runs `hook` after reading (while the reader holds its granule locks).
    struct HookedSource {
        inner: Arc<dyn BlockStore>,
        hook: std::sync::Mutex<Option<Hook>>,
    }

    impl std::fmt::Debug for HookedSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("HookedSource")
        }
    }

    impl BlockStore for HookedSource {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn capabilities(&self) -> crate::store::Capabilities {
            self.inner.capabilities()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
            self.inner.read_at(buf, offset)?;
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), StoreError> {
            self.inner.write_zeroes(offset, length, may_unmap)
        }
        fn discard(&self, offset: u64, length: u64) -> Result<(), StoreError> {
            self.inner.discard(offset, length)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError> {
            self.inner.extents(offset, length)
        }
        fn identity(&self) -> Result<crate::store::Identity, StoreError> {
            self.inner.identity()
        }
    }

    /// A WRITE_ZEROES lands on the source after a forward of an overlapping whole-granule write read
    /// the source. In write-blocking mode it is forwarded too: it waits for the granule locks the
    /// first forward holds, then sends what the source holds (zeroes), so the destination ends up
    /// equal to the source (or the difference stays dirty).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_zeroes_during_a_forward_reaches_the_destination_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let inner = source(dir.path());
        let (_server, client) = qemu_nbd(dir.path()).await;
        let hooked = Arc::new(HookedSource { inner: inner.clone(), hook: std::sync::Mutex::new(None) });
        let tracker = tracker(&client, hooked.clone());
        let data = vec![0x5a; 1 << 16];
        tracker.before_write(0, 1 << 16).unwrap();
        inner.write_at(&data, 0).unwrap();
        let t = tracker.clone();
        let (stored_tx, stored_rx) = std::sync::mpsc::channel();
        let zeroing = Arc::new(std::sync::Mutex::new(None));
        let z = zeroing.clone();
        let handle = tokio::runtime::Handle::current();
        *hooked.hook.lock().unwrap() = Some(Box::new(move || {
            // Another writer, concurrent with the forward that holds the locks.
            *z.lock().unwrap() = Some(std::thread::spawn(move || {
                let _rt = handle.enter();
                t.before_write(0, 4096).unwrap();
                t.source.write_zeroes(0, 4096, false).unwrap();
                stored_tx.send(()).unwrap();
                t.after_write(0, &WriteData::Zeroes(4096)).unwrap();
            }));
            stored_rx.recv().unwrap();
        }));
        let t = tracker.clone();
        tokio::task::spawn_blocking(move || t.after_write(0, &WriteData::Data(&data))).await.unwrap().unwrap();
        let zero_writer = zeroing.lock().unwrap().take().expect("the hook ran");
        tokio::task::spawn_blocking(move || zero_writer.join()).await.unwrap().unwrap();
        assert!(tracker.failed.lock().unwrap().is_none());
        assert_differences_dirty(&tracker).await;
    }

    /// A destination that requires 512-byte aligned requests (nbdkit's blocksize-policy filter)
    /// gets a guest's unaligned write as whole blocks read from the source.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unaligned_guest_write_reaches_a_destination_that_requires_aligned_requests() {
        let dir = tempfile::tempdir().unwrap();
        let source = source(dir.path());
        let (_server, client) = destination(
            dir.path(),
            "nbdkit",
            &["-f", "--filter=blocksize-policy", "-U"],
            &["file", "DEST", "blocksize-minimum=512", "blocksize-error-policy=error"],
        )
        .await;
        assert_eq!(client.min_block(), 512);
        let tracker = tracker(&client, source.clone());
        let data = vec![0x77; 1000];
        tracker.before_write(100_000, 1000).unwrap();
        source.write_at(&data, 100_000).unwrap();
        let t = tracker.clone();
        tokio::task::spawn_blocking(move || t.after_write(100_000, &WriteData::Data(&data))).await.unwrap().unwrap();
        let failed = tracker.failed.lock().unwrap().clone();
        assert!(failed.is_none(), "forwarding failed: {failed:?}");
        assert_differences_dirty(&tracker).await;
        assert_eq!(tracker.remaining(), 0);
    }

    /// Guest writes waiting for a granule lock fill the blocking pool while a copy piece holds that
    /// lock: the piece's source read must still run (it once queued on the full pool: deadlock).
    #[test]
    fn a_copy_piece_finishes_while_guest_writes_waiting_for_its_locks_fill_the_blocking_pool() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let source = source(dir.path());
            let (_server, client) = qemu_nbd(dir.path()).await;
            let tracker = tracker(&client, source.clone());
            tracker.dirty.set_range(0, 1);
            // Granule 1's stripe is held, so the piece takes granule 0's and waits for granule 1's.
            let held = tracker.locks[1].clone().lock_owned().await;
            let piece = tokio::spawn(copy_piece(tracker.clone(), 0, 1));
            while tracker.locks[0].try_lock().is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let writers: Vec<_> = (0..2u8)
                .map(|i| {
                    let t = tracker.clone();
                    tokio::task::spawn_blocking(move || {
                        let data = vec![i + 1; 4096];
                        t.source.write_at(&data, u64::from(i) * 4096).unwrap();
                        t.after_write(u64::from(i) * 4096, &WriteData::Data(&data)).unwrap();
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(held);
            let done = tokio::time::timeout(Duration::from_secs(20), async {
                piece.await.unwrap().unwrap();
                for w in writers {
                    w.await.unwrap();
                }
            })
            .await;
            assert!(done.is_ok(), "the copy piece and the guest writes waiting for its locks deadlocked");
            assert!(tracker.failed.lock().unwrap().is_none());
            assert_differences_dirty(&tracker).await;
        });
    }

    /// A VM's disk whose mirror ends before it reaches the cut-over (failed, cancelled) makes the
    /// others give up too: none turns read-only.
    #[tokio::test]
    async fn a_group_member_gone_before_arriving_fails_the_others() {
        let group = CutOverGroup::new(2);
        let mut a = Member { group: group.clone(), arrived: false };
        let b = Member { group: group.clone(), arrived: false };
        let waiting = tokio::spawn(async move { a.arrive(|| false).await });
        tokio::time::sleep(Duration::from_millis(80)).await;
        drop(b);
        assert!(!waiting.await.unwrap(), "a disk cut over although its sibling never arrived");
    }

    /// Once every member arrived the outcome is decided: a cancel seen afterwards (the agent
    /// stopping) must not fail the group, or one disk would turn read-only and the other not.
    #[tokio::test]
    async fn once_every_member_arrived_a_cancel_no_longer_splits_the_group() {
        let group = CutOverGroup::new(2);
        let mut a = Member { group: group.clone(), arrived: false };
        let g = group.clone();
        // The sibling arrives just as this member notices its cancel.
        let go = a.arrive(move || {
            g.state.send_modify(|s| s.0 += 1);
            true
        });
        assert!(go.await, "every disk arrived, yet this one gave up (its sibling went read-only)");
        assert!(!group.state.borrow().1, "the group was failed after everyone arrived");
    }
}
