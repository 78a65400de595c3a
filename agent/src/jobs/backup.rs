//! Backup jobs: a disk's content at the job's start copied to a target
//! image, ending in a snapshot that records which bitmap state it matches.
//!
//! ```text
//!  prepare   open/create target; refuse a target that belongs to another disk,
//!            is smaller or larger; find the chain's latest backup snapshot; for
//!            incremental, prove bitmap (uuid, generation) == latest snapshot's
//!  freeze    writes drained: bitmap hand-off (successor) + point-in-time view
//!  copy      chunks of the frozen view → target (holes stay holes), throttled
//!  finish    flush target, record metadata, snapshot, retention, and only then
//!            commit the bitmap (drop the copied bits, generation + 1)
//!  on error  abort the hand-off: the bitmap keeps old bits + new writes
//! ```
//! A VM backup runs one job per disk in a [`Group`]: every disk snapshots,
//! then all commit, or all drop their new snapshot and keep their bits.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::pit::PointInTime;
use super::{unix_now, JobError, JobHandle};
use crate::bitmap::Frozen;
use crate::bits::AtomicBits;
use crate::config::ImageUri;
use crate::export::Export;
use crate::store::{BlockStore, OpenOptions, StoreError, Stores};

/// Largest chunk copied at once (one RBD object).
pub const CHUNK: u64 = 4 << 20;
/// Chunks in flight at once.
const PARALLEL: usize = 4;
/// Chunks in flight while the guest is writing: the guest comes first, as
/// md's resync drops to `speed_limit_min` when the array has other IO.
/// (2 cores, `tests/bench/backup.sh`: 4 chunks in flight cost the guest's
/// 4K random writes about a quarter of their IOPS.)
const PARALLEL_GUEST_BUSY: usize = 1;
/// Image metadata key naming the disk a target belongs to.
pub const DISK_KEY: &str = "rbdsync.disk";
/// Prefix of the metadata key describing a backup snapshot.
pub const SNAP_KEY_PREFIX: &str = "rbdsync.snap.";

/// `full` or `incremental`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Everything.
    Full,
    /// Only what the bitmap says changed since the latest backup.
    Incremental,
}

/// Parameters of one disk's backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupParams {
    /// Full or incremental.
    pub sync: SyncMode,
    /// Bitmap tied to the chain (required for incremental).
    pub bitmap: Option<String>,
    /// Target image (no snapshot).
    pub target: String,
    /// Fall back to a full backup when an incremental is impossible.
    pub auto: bool,
    /// Backup snapshots to keep.
    pub keep: Option<u32>,
    /// The VM's freeze hook, if it has one: `frozen`, or why it failed
    /// (the backup is then crash-consistent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<String>,
}

/// [`BackupParams::freeze`] of a freeze command that succeeded.
pub const FROZEN: &str = "frozen";

/// How the VM's thaw went (`None` until it ran), for a backup whose freeze
/// hook ran: a backup is application-consistent only if the guest stayed
/// frozen until its point in time, which a failed thaw puts in doubt
/// (the QEMU guest agent's VSS support fails the thaw past its 10 s).
pub type Thawed = tokio::sync::watch::Receiver<ThawState>;

/// See [`Thawed`].
#[derive(Debug, Clone, Default)]
pub struct ThawState {
    /// The thaw command was started (the guest may run from now on).
    pub started: bool,
    /// How it ended.
    pub outcome: Option<Result<(), String>>,
}

/// What each backup snapshot records (image metadata `rbdsync.snap.NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapMeta {
    /// Disk (`VM/DISK`).
    pub disk: String,
    /// Agent node that took it.
    pub node: String,
    /// Full or incremental.
    pub sync: SyncMode,
    /// Bitmap whose state this snapshot is the base of.
    pub bitmap: Option<String>,
    /// That bitmap's uuid.
    pub bitmap_uuid: Option<String>,
    /// The bitmap generation that holds exactly the writes after this snapshot.
    pub generation: Option<u64>,
    /// Previous backup snapshot in the chain.
    pub previous: Option<String>,
    /// Unix time of the job's start (the point in time).
    pub point_in_time: u64,
    /// Disk size.
    pub size: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
}

/// Shared services a backup needs.
#[derive(Debug, Clone)]
pub struct BackupEnv {
    /// Image stores.
    pub stores: Arc<Stores>,
    /// Where scratch files go.
    pub scratch_dir: PathBuf,
    /// This agent's node name.
    pub node: String,
    /// TLS for outgoing NBD connections (`nbds://` mirror targets).
    pub tls: Arc<crate::nbd::tls::Tls>,
    /// `STATE_DIR/fenced`: one file per disk migrated away (served read-only).
    pub fence_dir: PathBuf,
    /// How long a mirror tries to reconnect to its destination (`nbd.client_reconnect_secs`).
    pub mirror_reconnect_secs: u64,
    /// How long the NBD client waits for a connect or a reply (`nbd.client_timeout_secs`).
    pub nbd_client_timeout: std::time::Duration,
}

impl BackupEnv {
    /// How outgoing NBD connections (mirrors, verify against `nbd://`) are made now
    /// (the TLS client configuration as last reloaded).
    pub fn nbd_client(&self) -> crate::nbd::client::ClientOptions {
        crate::nbd::client::ClientOptions { tls: self.tls.client(), timeout: self.nbd_client_timeout }
    }

    /// The fence file of `disk` (`VM/DISK`).
    pub fn fence(&self, disk: &str) -> PathBuf {
        fence_path(&self.fence_dir, disk)
    }
}

/// The fence file of `disk` (`VM/DISK`) in `fence_dir` (`STATE_DIR/fenced`).
pub fn fence_path(fence_dir: &std::path::Path, disk: &str) -> PathBuf {
    fence_dir.join(format!("{}.json", disk.replace('/', "__")))
}

/// A set of backups that share one point in time and commit together.
///
/// The point in time: every member prepares (opens its target), waits
/// until all are prepared, then freezes its disk inside that disk's drain
/// and keeps the drain until every member froze. At the moment the last one
/// froze, every disk of the group is drained at once, so no write acknowledged
/// on one disk before that moment is missing while a later one on another
/// disk is in (QEMU's transactions freeze all disks at one point likewise).
#[derive(Debug)]
pub struct Group {
    pending: AtomicUsize,
    failed: Mutex<bool>,
    decided: watch::Sender<Option<bool>>,
    /// Members not yet prepared (or gone).
    unprepared: watch::Sender<usize>,
    /// Members not yet frozen (or gone); waited for on plain threads, not
    /// runtime timers (a runtime whose workers all block can drive none).
    unfrozen: Mutex<usize>,
    all_frozen: std::sync::Condvar,
}

/// Longest a member holds its disk drained waiting for the others to freeze
/// (they are all prepared: only local work remains); past it the group fails.
const FREEZE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn count_down(n: &watch::Sender<usize>) {
    n.send_modify(|n| *n = n.saturating_sub(1));
}

/// One member's place in a [`Group`]. Every member reports exactly once:
/// through [`Member::arrive`], or, on any other way out (an early error,
/// a job that never started, a dropped task), by being dropped, which
/// reports a failure without waiting. So the others never wait for a
/// member that will not come.
#[derive(Debug)]
pub struct Member {
    group: Arc<Group>,
    reported: bool,
    prepared: bool,
    frozen: bool,
}

impl Group {
    /// A group of `n` members: their places.
    pub fn members(n: usize) -> Vec<Member> {
        let group = Arc::new(Self {
            pending: AtomicUsize::new(n),
            failed: Mutex::new(false),
            decided: watch::channel(None).0,
            unprepared: watch::channel(n).0,
            unfrozen: Mutex::new(n),
            all_frozen: std::sync::Condvar::new(),
        });
        (0..n).map(|_| Member { group: group.clone(), reported: false, prepared: false, frozen: false }).collect()
    }

    /// Fails the group; members waiting to freeze stop waiting.
    fn fail(&self) {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let _frozen = self.unfrozen.lock().unwrap_or_else(|p| p.into_inner());
        self.all_frozen.notify_all();
    }

    fn has_failed(&self) -> bool {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one member's outcome; the last one decides for all.
    fn report(&self, ok: bool) {
        if !ok {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        }
        if self.pending.fetch_sub(1, SeqCst) == 1 {
            let failed = *self.failed.lock().unwrap_or_else(|p| p.into_inner());
            self.decided.send_replace(Some(!failed));
        }
    }
}

impl Member {
    /// This member is ready to freeze; waits until every member is (or gone).
    async fn prepared(&mut self) {
        self.leave_prepare();
        let _ = self.group.unprepared.subscribe().wait_for(|n| *n == 0).await;
    }

    /// Called inside this member's drain once it froze: holds the drain
    /// until every member froze (or is gone). Blocks (a plain thread, see
    /// [`freeze_apart`]). Past [`FREEZE_WAIT`] the group fails.
    fn frozen(&mut self) {
        self.leave_freeze();
        let left = self.group.unfrozen.lock().unwrap_or_else(|p| p.into_inner());
        let (left, waited) = self
            .group
            .all_frozen
            .wait_timeout_while(left, FREEZE_WAIT, |n| *n > 0 && !self.group.has_failed())
            .unwrap_or_else(|p| p.into_inner());
        drop(left);
        if waited.timed_out() {
            tracing::error!("the other disks of the VM backup did not freeze in time; the group fails");
            self.group.fail();
        }
    }

    fn leave_prepare(&mut self) {
        if !std::mem::replace(&mut self.prepared, true) {
            count_down(&self.group.unprepared);
        }
    }

    fn leave_freeze(&mut self) {
        self.leave_prepare();
        if !std::mem::replace(&mut self.frozen, true) {
            let mut left = self.group.unfrozen.lock().unwrap_or_else(|p| p.into_inner());
            *left = left.saturating_sub(1);
            self.group.all_frozen.notify_all();
        }
    }

    /// Reports this member's outcome and waits for the group's: true = commit.
    async fn arrive(mut self, ok: bool) -> bool {
        self.leave_freeze();
        self.reported = true;
        self.group.report(ok);
        let mut rx = self.group.decided.subscribe();
        let decided = rx.wait_for(Option::is_some).await.map(|d| *d);
        decided.ok().flatten().unwrap_or(false)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.leave_freeze();
        if !self.reported {
            self.group.report(false);
        }
    }
}

fn store_err(context: &'static str) -> impl FnOnce(StoreError) -> JobError {
    move |e| JobError::from_err(context, &e)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, JobError> + Send + 'static) -> Result<T, JobError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| JobError::Failed(format!("internal error: {e}")))?
}

/// The chain as found on the target.
#[derive(Debug)]
struct Chain {
    target: Arc<dyn BlockStore>,
    fresh: bool,
    latest: Option<(String, SnapMeta)>,
    /// Continuation records (see [`CONTINUES_KEY_PREFIX`]).
    continues: std::collections::BTreeMap<String, String>,
    /// Where the head must be zeroed up to the disk's size before the copy.
    zero_from: Option<u64>,
}

/// Backup snapshots of a target with their metadata, oldest first.
pub fn backup_snapshots(target: &dyn BlockStore) -> Result<Vec<(String, SnapMeta)>, StoreError> {
    let meta = target.list_meta()?;
    let mut out = Vec::new();
    for s in target.list_snapshots()? {
        if let Some(m) = meta.get(&format!("{SNAP_KEY_PREFIX}{}", s.name)).and_then(|v| serde_json::from_str(v).ok()) {
            out.push((s.name, m));
        }
    }
    Ok(out)
}

fn open_target(env: &BackupEnv, disk: &str, size: u64, uri: &ImageUri) -> Result<Chain, JobError> {
    if uri.snap().is_some() {
        return Err(JobError::Failed(format!("Backup target {uri} names a snapshot; give the image")));
    }
    let (target, fresh) = if env.stores.exists(uri).map_err(store_err("Cannot reach the backup target"))? {
        (env.stores.open(uri, &OpenOptions::default()).map_err(store_err("Cannot open the backup target"))?, false)
    } else {
        let t = env.stores.create(uri, size).map_err(store_err("Cannot create the backup target"))?;
        t.set_meta(DISK_KEY, disk).map_err(store_err("Cannot label the backup target"))?;
        (t, true)
    };
    let owner = target.get_meta(DISK_KEY).map_err(store_err("Cannot read target metadata"))?;
    // Only this disk's own target follows its size (`disk resize`; a disk restored from a
    // snapshot older than a resize); any other size is refused.
    let resized = owner.as_deref() == Some(disk) && target.size() != size;
    if target.size() != size && !resized {
        return Err(JobError::Failed(format!(
            "Backup target {uri} has {} bytes but disk {disk} has {size}; refusing",
            target.size()
        )));
    }
    match owner.as_deref() {
        Some(d) if d == disk => {}
        Some(other) => {
            return Err(JobError::Failed(format!("Backup target {uri} belongs to disk {other}, not {disk}; refusing")))
        }
        None => {
            let empty = target.list_snapshots().map_err(store_err("Cannot list target snapshots"))?.is_empty()
                && target.changed_extents(None, 0, size).map_err(store_err("Cannot read target"))?.is_empty();
            if !empty {
                return Err(JobError::Failed(format!(
                    "Backup target {uri} holds data not written by rbdsync; refusing"
                )));
            }
            target.set_meta(DISK_KEY, disk).map_err(store_err("Cannot label the backup target"))?;
        }
    }
    let was = target.size();
    if resized {
        // Only the head changes size: the chain's snapshots keep theirs. Grown, the new range
        // reads as zeroes, as on the disk; shrunk (a disk restored from a snapshot older than
        // the resize), what goes is past every snapshot the disk can build on.
        tracing::info!(disk, target = %uri, from = was, to = size, "resizing the backup target's head to its disk");
        target.resize(size).map_err(store_err("Cannot resize the backup target"))?;
    }
    let backups = backup_snapshots(target.as_ref()).map_err(store_err("Cannot read the backup chain"))?;
    let meta = target.list_meta().map_err(store_err("Cannot read target metadata"))?;
    let continues = meta.into_iter().filter(|(k, _)| k.starts_with(CONTINUES_KEY_PREFIX)).collect();
    let latest = backups.last().cloned();
    // Past the latest snapshot's own size (from the store, not its record) the disk grew: it
    // reads as zeroes there, and so must the target, whatever an unfinished backup left in the
    // head (a head just grown from exactly there reads as zeroes already).
    let snap_size = match &latest {
        Some((snap, _)) => target
            .list_snapshots()
            .map_err(store_err("Cannot list target snapshots"))?
            .into_iter()
            .find(|s| &s.name == snap)
            .map(|s| s.size),
        None => None,
    };
    let zero_from = snap_size.filter(|&s| s < size && !(resized && was == s));
    Ok(Chain { target, fresh, latest, continues, zero_from })
}

/// Target metadata key prefix of continuation records: `PREFIX + UUID` =
/// `{"snapshot", "generation"}` says that the bitmap with that uuid, at that
/// generation, holds exactly the writes since that snapshot. A restore
/// writes one for the fresh bitmap of the disk it creates: the bitmap gets
/// a uuid of its own (never the snapshot's, which a disk still alive
/// elsewhere may carry on), and the chain goes on while the snapshot is
/// the newest backup.
pub const CONTINUES_KEY_PREFIX: &str = "rbdsync.continues.";

/// A continuation record's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continues {
    /// The backup snapshot the bitmap continues.
    pub snapshot: String,
    /// The bitmap generation that holds exactly the writes since it.
    pub generation: u64,
}

/// Whether a continuation record among `records` (target metadata) says
/// that bitmap `uuid` at `generation` continues snapshot `snap`.
pub fn continues(
    records: &std::collections::BTreeMap<String, String>,
    snap: &str,
    uuid: &str,
    generation: u64,
) -> bool {
    records
        .get(&format!("{CONTINUES_KEY_PREFIX}{uuid}"))
        .and_then(|v| serde_json::from_str::<Continues>(v).ok())
        .is_some_and(|c| c.snapshot == snap && c.generation == generation)
}

/// Why an incremental backup cannot build on the chain, if it cannot.
fn chain_mismatch(chain: &Chain, disk: &str, bitmap: &str, uuid: &str, generation: u64) -> Option<String> {
    let Some((snap, meta)) = &chain.latest else { return Some("the target has no backup yet".into()) };
    if meta.disk != disk {
        return Some(format!("latest backup {snap} is of disk {}", meta.disk));
    }
    if meta.bitmap.as_deref() != Some(bitmap) {
        return Some(format!("latest backup {snap} was taken against another bitmap ({:?})", meta.bitmap));
    }
    if continues(&chain.continues, snap, uuid, generation) {
        return None;
    }
    if meta.bitmap_uuid.as_deref() != Some(uuid) {
        return Some(format!("latest backup {snap} was taken against another bitmap ({:?})", meta.bitmap));
    }
    if meta.generation != Some(generation) {
        return Some(format!(
            "bitmap {bitmap} is at generation {generation} but latest backup {snap} expects {:?} (cleared, merged or a backup was lost)",
            meta.generation
        ));
    }
    None
}

/// Everything the copy and finish phases need.
struct Frozen2 {
    pit: Arc<PointInTime>,
    frozen: Option<Frozen>,
    /// Incremental only: dirty granules that may be clean (crash recovery).
    suspect: Option<Arc<Suspect>>,
    mode: SyncMode,
    note: Option<String>,
}

/// Runs one disk's backup; `group` is set for VM backups. `frozen` fires
/// once the point in time is fixed (dropped unfired if the job fails first),
/// so the API can answer only then.
pub async fn run(
    job: JobHandle,
    env: BackupEnv,
    export: Arc<Export>,
    params: BackupParams,
    group: Option<Member>,
    frozen: tokio::sync::oneshot::Sender<()>,
    thawed: Option<Thawed>,
) -> Result<Value, JobError> {
    let started = unix_now();
    let target_uri: ImageUri = params.target.parse().map_err(JobError::Failed)?;
    let disk = export.name().to_owned();
    let size = export.size();
    let chain = {
        let (env, disk, uri) = (env.clone(), disk.clone(), target_uri.clone());
        blocking(move || open_target(&env, &disk, size, &uri)).await
    };
    let chain = match chain {
        Ok(c) => c,
        Err(e) => return finish_group(group, Err(e)).await,
    };
    let (frozen_state, group, chain) = match group {
        Some(mut member) => {
            member.prepared().await;
            // A member lost with a failed thread was dropped there: it reported a failure.
            let (state, member, chain) = freeze_apart(&job, &env, &export, &params, chain, member).await?;
            (state, Some(member), chain)
        }
        None => (freeze(&job, &env, &export, &params, &chain, None), None, chain),
    };
    let state = match frozen_state {
        Ok(s) => s,
        Err(e) => return finish_group(group, Err(e)).await,
    };
    // The thaw can only have run on time if this point in time was fixed before it.
    let thawed_before = thawed.as_ref().is_some_and(|t| t.borrow().started);
    let _ = frozen.send(());
    let copied = copy(&job, &state, &chain, size).await;
    let consistency = match (&params.freeze, thawed) {
        (Some(f), _) if f != FROZEN => Err(f.clone()),
        (Some(_), _) if thawed_before => Err("the guest was thawed before this point in time was fixed".to_owned()),
        (Some(_), Some(mut t)) => match t.wait_for(|s| s.outcome.is_some()).await {
            Ok(s) => s.outcome.clone().unwrap_or(Ok(())).map_err(|e| format!("frozen, but {e}")),
            Err(_) => Err("the thaw's outcome was lost".to_owned()),
        },
        (Some(_), None) => Ok(()),
        (None, _) => Err("no freeze hook".to_owned()),
    };
    let result = match copied {
        Ok(copied) => finish(&job, &env, &export, &params, &chain, &state, copied, started, group, consistency).await,
        Err(e) => finish_group(group, Err(e)).await,
    };
    export.remove_hook(&state.pit);
    if result.is_err() {
        if let Some(bitmap) = &params.bitmap {
            export.bitmaps().abort_job(bitmap, &job.id());
        }
    }
    result
}

/// A group member's [`freeze`] on a thread of its own: it holds the disk
/// drained until the whole group froze, which must not take a runtime worker
/// or a blocking-pool thread (guest writes waiting for the drain may fill
/// the pool, and the other members' tasks need the workers to get there).
async fn freeze_apart(
    job: &JobHandle,
    env: &BackupEnv,
    export: &Arc<Export>,
    params: &BackupParams,
    chain: Chain,
    mut member: Member,
) -> Result<(Result<Frozen2, JobError>, Member, Chain), JobError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (job, env, export, params) = (job.clone(), env.clone(), export.clone(), params.clone());
    std::thread::Builder::new()
        .name("backup-freeze".into())
        .spawn(move || {
            let frozen = freeze(&job, &env, &export, &params, &chain, Some(&mut member));
            let _ = tx.send((frozen, member, chain));
        })
        .map_err(|e| JobError::Failed(format!("Cannot start the freeze thread: {e}")))?;
    rx.await.map_err(|_| JobError::Failed("The freeze thread died".into()))
}

async fn finish_group(group: Option<Member>, result: Result<Value, JobError>) -> Result<Value, JobError> {
    if let Some(g) = group {
        g.arrive(false).await;
    }
    result
}

fn freeze(
    job: &JobHandle,
    env: &BackupEnv,
    export: &Arc<Export>,
    params: &BackupParams,
    chain: &Chain,
    member: Option<&mut Member>,
) -> Result<Frozen2, JobError> {
    let bitmaps = export.bitmaps();
    let scratch = env.scratch_dir.join(format!("{}.pit", job.id()));
    let (source, disk, id) = (export.store().clone(), export.name(), job.id());
    if params.sync == SyncMode::Incremental && params.bitmap.is_none() {
        return Err(JobError::Failed("Incremental backup needs a bitmap (--bitmap NAME)".into()));
    }
    bitmaps.drained(|d| {
        let frozen = freeze_drained(d, export, params, chain, &scratch, &source, disk, &id);
        match (member, &frozen) {
            (Some(member), Ok(_)) => member.frozen(),
            // Nothing to hold the drain for: the group fails, and the others stop waiting.
            (Some(member), Err(_)) => {
                member.group.fail();
                member.leave_freeze();
            }
            (None, _) => {}
        }
        frozen
    })
}

/// [`freeze`] inside the disk's drain.
#[allow(clippy::too_many_arguments)]
fn freeze_drained(
    d: &crate::bitmap::Drained,
    export: &Arc<Export>,
    params: &BackupParams,
    chain: &Chain,
    scratch: &std::path::Path,
    source: &Arc<dyn BlockStore>,
    disk: &str,
    id: &str,
) -> Result<Frozen2, JobError> {
    let bitmaps = export.bitmaps();
    let failed = |e: &dyn std::fmt::Display| JobError::Failed(e.to_string());
    if export.size() != chain.target.size() {
        return Err(JobError::Failed(format!(
            "Disk {disk} was resized while the backup started ({} bytes, target {}); start it again",
            export.size(),
            chain.target.size()
        )));
    }
    {
        let (mut mode, mut note) = (params.sync, None);
        if let (SyncMode::Incremental, Some(name)) = (mode, &params.bitmap) {
            let b = bitmaps.get(name).map_err(|e| failed(&e))?;
            if let Some(why) = chain_mismatch(chain, disk, name, &b.uuid(), b.generation()) {
                if !params.auto {
                    return Err(JobError::Failed(format!(
                        "Cannot back up incrementally: {why}; run a full backup (or pass --auto)"
                    )));
                }
                tracing::warn!(reason = %why, "incremental backup impossible; falling back to full (--auto)");
                note = Some(format!("full instead of incremental: {why}"));
                mode = SyncMode::Full;
            }
        }
        let frozen = match &params.bitmap {
            Some(name) => Some(bitmaps.begin_job(d, name, id).map_err(|e| failed(&e))?),
            None => None,
        };
        let pit = match (mode, &frozen) {
            (SyncMode::Incremental, Some(f)) => {
                let needed = AtomicBits::from_words(f.bits.len(), &f.bits.snapshot());
                PointInTime::new(source.clone(), f.granularity, needed, scratch)
            }
            (_, f) => PointInTime::whole(source.clone(), f.as_ref().map_or(64 << 10, |f| f.granularity), scratch),
        };
        let pit = match pit {
            Ok(p) => Arc::new(p),
            Err(e) => {
                if let Some(name) = &params.bitmap {
                    bitmaps.abort_job_drained(d, name, id);
                }
                return Err(JobError::from_err("Cannot create the point-in-time view", &e));
            }
        };
        export.add_hook(d, pit.clone());
        let suspect = match (mode, &frozen) {
            (SyncMode::Incremental, Some(Frozen { suspect: Some(bits), granularity, .. })) => Some(Arc::new(Suspect {
                bits: AtomicBits::from_words(bits.len(), &bits.snapshot()),
                granularity: *granularity,
            })),
            _ => None,
        };
        Ok(Frozen2 { pit, frozen, suspect, mode, note })
    }
}

/// Byte ranges the job copies: dirty granules (incremental) or everything.
fn plan(state: &Frozen2, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut push = |start: u64, len: u64| {
        let mut pos = start;
        while pos < start + len {
            let n = CHUNK.min(start + len - pos);
            out.push((pos, n));
            pos += n;
        }
    };
    match (state.mode, &state.frozen) {
        (SyncMode::Incremental, Some(f)) => {
            for (offset, length) in crate::bitmap::Bitmap::dirty_ranges(&f.bits, f.granularity, size) {
                push(offset, length);
            }
        }
        _ => push(0, size),
    }
    out
}

/// What the copy phase did.
#[derive(Debug, Clone, Copy, Default)]
struct Copied {
    /// Data bytes written to the target.
    written: u64,
    /// Chunks started with fewer in flight because the guest was writing.
    guest_busy_chunks: u64,
    /// Suspect bytes compared with the target.
    suspect: u64,
    /// Of those, bytes equal to the target's, not written.
    suspect_unchanged: u64,
}

/// What one chunk did.
#[derive(Debug, Clone, Copy, Default)]
struct ChunkDone {
    length: u64,
    written: u64,
    suspect: u64,
    suspect_unchanged: u64,
}

/// Granules of an incremental backup that crash recovery marked dirty but
/// that may be clean (see `bitmap::suspect`): compared before they are copied.
#[derive(Debug)]
struct Suspect {
    bits: AtomicBits,
    granularity: u64,
}

impl Suspect {
    /// The suspect granules of the chunk at `offset`, as byte ranges
    /// `(start, end)` relative to it (clipped to the chunk), in order.
    fn pieces(&self, offset: u64, length: u64) -> Vec<(usize, usize)> {
        let g = self.granularity;
        let end = offset + length;
        let rel = |x: u64| usize::try_from(x - offset).unwrap_or(usize::MAX);
        (offset / g..end.div_ceil(g))
            .filter(|&i| self.bits.get(i))
            .map(|i| (rel((i * g).max(offset)), rel(((i + 1) * g).min(end))))
            .collect()
    }

    /// The parts of `buf` (the view's chunk at `offset`) that the target
    /// already holds: suspect granules, read from the target (one read per
    /// contiguous run) and compared.
    fn unchanged(
        &self,
        buf: &[u8],
        offset: u64,
        target: &dyn BlockStore,
        done: &mut ChunkDone,
    ) -> Result<Vec<(usize, usize)>, StoreError> {
        let pieces = self.pieces(offset, buf.len() as u64);
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < pieces.len() {
            let mut j = i + 1;
            while j < pieces.len() && pieces[j].0 == pieces[j - 1].1 {
                j += 1;
            }
            let (a, b) = (pieces[i].0, pieces[j - 1].1);
            let mut current = vec![0u8; b - a];
            if let Err(e) = target.read_at(&mut current, offset + a as u64) {
                // Compared or not, the granules are written: a target that cannot be read here
                // must not fail a backup that only needs to write.
                tracing::warn!(offset = offset + a as u64, error = %e, "cannot read suspect granules from the target; copying them");
                i = j;
                continue;
            }
            done.suspect += (b - a) as u64;
            for &(x, y) in &pieces[i..j] {
                if buf[x..y] == current[x - a..y - a] {
                    done.suspect_unchanged += (y - x) as u64;
                    match out.last_mut() {
                        Some(last) if last.1 == x => last.1 = y,
                        _ => out.push((x, y)),
                    }
                }
            }
            i = j;
        }
        Ok(out)
    }
}

/// `runs` (from [`zero_runs`]) without the `skip` ranges (sorted, disjoint).
fn without(runs: Vec<(usize, usize, bool)>, skip: &[(usize, usize)]) -> Vec<(usize, usize, bool)> {
    if skip.is_empty() {
        return runs;
    }
    let mut out = Vec::new();
    for (start, end, zero) in runs {
        let mut at = start;
        for &(a, b) in skip.iter().filter(|&&(a, b)| a < end && b > start) {
            if a > at {
                out.push((at, a, zero));
            }
            at = at.max(b);
        }
        if at < end {
            out.push((at, end, zero));
        }
    }
    out
}

async fn copy(job: &JobHandle, state: &Frozen2, chain: &Chain, size: u64) -> Result<Copied, JobError> {
    let mut tasks = tokio::task::JoinSet::new();
    let result = copy_chunks(job, state, chain, size, &mut tasks).await;
    if result.is_err() {
        // Let the chunks in flight finish (not abort them: a librbd write already submitted would
        // still land), so that none writes to the target after the job has ended, where it could
        // overwrite what a retry wrote there.
        while tasks.join_next().await.is_some() {}
    }
    result
}

/// Zeroes the target's head in `from..size` (past the latest snapshot's size, see
/// `Chain::zero_from`), in pieces the job can pause or cancel between.
async fn zero_past(job: &JobHandle, chain: &Chain, from: u64, size: u64) -> Result<(), JobError> {
    const PIECE: u64 = 1 << 30;
    tracing::info!(job = %job.id(), from, to = size, "zeroing the backup target past the latest snapshot's size");
    let mut at = from;
    while at < size {
        job.checkpoint().await?;
        let (target, n) = (chain.target.clone(), PIECE.min(size - at));
        blocking(move || target.write_zeroes(at, n, true).map_err(store_err("Cannot zero the backup target"))).await?;
        at += n;
    }
    Ok(())
}

async fn copy_chunks(
    job: &JobHandle,
    state: &Frozen2,
    chain: &Chain,
    size: u64,
    tasks: &mut tokio::task::JoinSet<Result<ChunkDone, StoreError>>,
) -> Result<Copied, JobError> {
    if let Some(from) = chain.zero_from {
        zero_past(job, chain, from, size).await?;
    }
    let chunks = plan(state, size);
    job.set_total(chunks.iter().map(|c| c.1).sum());
    let mut copied = Copied::default();
    let mut guest_writes = state.pit.guest_writes();
    for (offset, length) in chunks {
        job.checkpoint().await?;
        job.throttle(length).await?;
        // Fewer chunks in flight while guest writes came in since the last admission.
        let seen = std::mem::replace(&mut guest_writes, state.pit.guest_writes());
        let limit = if guest_writes == seen {
            PARALLEL
        } else {
            copied.guest_busy_chunks += 1;
            PARALLEL_GUEST_BUSY
        };
        while tasks.len() >= limit {
            join_one(tasks, job, &mut copied).await?;
        }
        let (pit, target, fresh) = (state.pit.clone(), chain.target.clone(), chain.fresh);
        let suspect = state.suspect.clone();
        if target.async_io().is_some() {
            tasks.spawn(copy_chunk_async(pit, target, fresh, suspect, offset, length));
        } else {
            tasks.spawn_blocking(move || copy_chunk(&pit, target.as_ref(), fresh, suspect.as_deref(), offset, length));
        }
    }
    while !tasks.is_empty() {
        join_one(tasks, job, &mut copied).await?;
    }
    Ok(copied)
}

async fn join_one(
    tasks: &mut tokio::task::JoinSet<Result<ChunkDone, StoreError>>,
    job: &JobHandle,
    copied: &mut Copied,
) -> Result<(), JobError> {
    match tasks.join_next().await {
        Some(Ok(Ok(done))) => {
            job.progress(done.length);
            copied.written += done.written;
            copied.suspect += done.suspect;
            copied.suspect_unchanged += done.suspect_unchanged;
            Ok(())
        }
        Some(Ok(Err(e))) => Err(JobError::from_err("Copy failed", &e)),
        Some(Err(e)) => Err(JobError::Failed(format!("internal error: {e}"))),
        None => Ok(()),
    }
}

/// Zero detection unit inside a chunk: runs of all-zero units are not
/// written (a fresh target keeps its holes) or are zeroed cheaply.
const ZERO_UNIT: usize = 64 << 10;

/// Runs of `buf` that are all zero or hold data, in [`ZERO_UNIT`]s:
/// `(start, end, zero)`, in order, covering it.
fn zero_runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let zero = buf[at..(at + ZERO_UNIT).min(buf.len())].iter().all(|&b| b == 0);
        let mut end = (at + ZERO_UNIT).min(buf.len());
        while end < buf.len() && buf[end..(end + ZERO_UNIT).min(buf.len())].iter().all(|&b| b == 0) == zero {
            end = (end + ZERO_UNIT).min(buf.len());
        }
        runs.push((at, end, zero));
        at = end;
    }
    runs
}

/// [`copy_chunk`] for a target with an asynchronous data path (RBD): the
/// view is read on the blocking pool, the data runs are written with aio
/// (no thread parked per write, and librbd sends the buffer without a copy).
async fn copy_chunk_async(
    pit: Arc<PointInTime>,
    target: Arc<dyn BlockStore>,
    fresh: bool,
    suspect: Option<Arc<Suspect>>,
    offset: u64,
    length: u64,
) -> Result<ChunkDone, StoreError> {
    let (view, current) = (pit.clone(), target.clone());
    let (buf, runs, mut done) = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
        view.read(&mut buf, offset)?;
        let mut done = ChunkDone { length, ..ChunkDone::default() };
        let skip = match &suspect {
            Some(s) => s.unchanged(&buf, offset, current.as_ref(), &mut done)?,
            None => Vec::new(),
        };
        let runs = without(zero_runs(&buf), &skip);
        Ok::<_, StoreError>((buf, runs, done))
    })
    .await
    .map_err(|e| StoreError::Io { op: "backup read", offset, source: std::io::Error::other(e.to_string()) })??;
    let data = bytes::Bytes::from(buf);
    for (at, end, zero) in runs {
        let pos = offset + at as u64;
        if !zero {
            let aio = target.async_io().ok_or(StoreError::Unsupported("asynchronous IO"))?;
            aio.write(data.slice(at..end), pos).await?;
            done.written += (end - at) as u64;
        } else if !fresh {
            let t = target.clone();
            tokio::task::spawn_blocking(move || t.write_zeroes(pos, (end - at) as u64, true)).await.map_err(
                |e| StoreError::Io { op: "backup zero", offset: pos, source: std::io::Error::other(e.to_string()) },
            )??;
        }
    }
    pit.release(offset, length);
    Ok(done)
}

/// Copies one chunk of the frozen view.
fn copy_chunk(
    pit: &PointInTime,
    target: &dyn BlockStore,
    fresh: bool,
    suspect: Option<&Suspect>,
    offset: u64,
    length: u64,
) -> Result<ChunkDone, StoreError> {
    let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
    pit.read(&mut buf, offset)?;
    let mut done = ChunkDone { length, ..ChunkDone::default() };
    let skip = match suspect {
        Some(s) => s.unchanged(&buf, offset, target, &mut done)?,
        None => Vec::new(),
    };
    for (at, end, zero) in without(zero_runs(&buf), &skip) {
        let pos = offset + at as u64;
        if !zero {
            target.write_at(&buf[at..end], pos)?;
            done.written += (end - at) as u64;
        } else if !fresh {
            target.write_zeroes(pos, (end - at) as u64, true)?;
        }
    }
    pit.release(offset, length);
    Ok(done)
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    job: &JobHandle,
    env: &BackupEnv,
    export: &Arc<Export>,
    params: &BackupParams,
    chain: &Chain,
    state: &Frozen2,
    copied: Copied,
    started: u64,
    group: Option<Member>,
    consistency: Result<(), String>,
) -> Result<Value, JobError> {
    let written = copied.written;
    job.checkpoint().await?;
    // Unique across agents and their restarts: another agent's backup of the same disk to the
    // same target (the destination after a migration, say) within the same second with the same
    // job number must neither fail nor overwrite this snapshot's record.
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let snap = format!("rbdsync-{}-{}-{}", started, job.id(), &nonce[..8]);
    let meta = SnapMeta {
        disk: export.name().to_owned(),
        node: env.node.clone(),
        sync: state.mode,
        bitmap: params.bitmap.clone(),
        bitmap_uuid: state.frozen.as_ref().map(|f| f.uuid.clone()),
        generation: state.frozen.as_ref().map(|f| f.generation + 1),
        previous: chain.latest.as_ref().map(|(n, _)| n.clone()),
        point_in_time: started,
        // The point in time's size (the disk may have grown since).
        size: chain.target.size(),
        bytes_written: written,
    };
    let target = chain.target.clone();
    let (snap2, meta_json) = (snap.clone(), serde_json::to_string(&meta).unwrap_or_default());
    blocking(move || {
        target.flush().map_err(store_err("Cannot flush the backup target"))?;
        let key = format!("{SNAP_KEY_PREFIX}{snap2}");
        // Never overwrite the record of a snapshot that is there.
        if target.get_meta(&key).map_err(store_err("Cannot read the backup records"))?.is_some() {
            return Err(JobError::Failed(format!("Backup snapshot {snap2} exists already on the target; refusing")));
        }
        target.set_meta(&key, &meta_json).map_err(store_err("Cannot record the backup"))?;
        target.create_snapshot(&snap2).map_err(store_err("Cannot snapshot the backup target"))
    })
    .await?;
    if let Some(g) = group {
        if !g.arrive(true).await {
            let target = chain.target.clone();
            let snap2 = snap.clone();
            let _ = blocking(move || drop_snapshot(target.as_ref(), &snap2).map_err(store_err("cleanup"))).await;
            return Err(JobError::Failed("Another disk of the VM failed; this disk's backup was rolled back".into()));
        }
    }
    let generation = match (&params.bitmap, &state.frozen) {
        (Some(name), Some(frozen)) => {
            let bitmaps = export.bitmaps().clone();
            let (name, frozen_bits) = (name.clone(), frozen);
            let generation = bitmaps
                .drained(|d| bitmaps.commit_job(d, &name, frozen_bits))
                .map_err(|e| JobError::Failed(e.to_string()))?;
            if state.suspect.is_some() {
                blocking(move || {
                    bitmaps.save_suspect_of(&name);
                    Ok(())
                })
                .await?;
            }
            Some(generation)
        }
        _ => None,
    };
    let removed = match params.keep {
        Some(keep) => {
            let (target, snap2) = (chain.target.clone(), snap.clone());
            blocking(move || retention(target.as_ref(), keep, &snap2).map_err(store_err("Retention failed"))).await?
        }
        None => Vec::new(),
    };
    let target = chain.target.clone();
    let chain_length =
        blocking(move || backup_snapshots(target.as_ref()).map(|v| v.len()).map_err(store_err("Cannot list backups")))
            .await
            .unwrap_or(0);
    Ok(json!({
        "target": params.target,
        "snapshot": snap,
        "chain_length": chain_length,
        "sync": state.mode,
        "note": state.note,
        "bytes_written": written,
        "scratch_bytes": state.pit.scratch_bytes(),
        "guest_busy_chunks": copied.guest_busy_chunks,
        "application_consistent": consistency.is_ok(),
        "freeze": params.freeze.as_ref().map(|_| match &consistency {
            Ok(()) => FROZEN.to_owned(),
            Err(why) => why.clone(),
        }),
        "suspect_bytes": copied.suspect,
        "suspect_unchanged_bytes": copied.suspect_unchanged,
        "bitmap_generation": generation,
        "removed_snapshots": removed,
    }))
}

/// Removes a backup snapshot, its record and the continuation records
/// that name it.
fn drop_snapshot(target: &dyn BlockStore, snap: &str) -> Result<(), StoreError> {
    target.remove_snapshot(snap)?;
    target.remove_meta(&format!("{SNAP_KEY_PREFIX}{snap}"))?;
    for (key, value) in target.list_meta()? {
        let names_it = serde_json::from_str::<Continues>(&value).is_ok_and(|c| c.snapshot == snap);
        if key.starts_with(CONTINUES_KEY_PREFIX) && names_it {
            target.remove_meta(&key)?;
        }
    }
    Ok(())
}

/// Removes the oldest backup snapshots beyond `keep` (never `newest`).
pub(crate) fn retention(target: &dyn BlockStore, keep: u32, newest: &str) -> Result<Vec<String>, StoreError> {
    let backups = backup_snapshots(target)?;
    let excess = backups.len().saturating_sub(usize::try_from(keep.max(1)).unwrap_or(usize::MAX));
    let meta = target.list_meta()?;
    let mut removed = Vec::new();
    for (name, _) in backups.into_iter().take(excess) {
        if name == newest {
            continue;
        }
        let holders = super::holds::holders(&meta, &name);
        if !holders.is_empty() {
            tracing::info!(snapshot = %name, ?holders, "keeping backup snapshot: a layered disk reads from it");
            continue;
        }
        match drop_snapshot(target, &name) {
            Ok(()) => removed.push(name),
            Err(StoreError::Busy(..)) => tracing::warn!(snapshot = %name, "keeping backup snapshot in use by a clone"),
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspect_granules_equal_to_the_target_are_left_out_and_the_rest_written() {
        // Granule 4 KiB; the chunk starts mid-granule; suspect: granules 1, 2, 3 and 5.
        let g = 4096u64;
        let dir = tempfile::tempdir().unwrap();
        let stores = crate::store::Stores::new(None);
        let target = crate::store::file::FileStore::create(&dir.path().join("t.raw"), 8 * g, &stores).unwrap();
        let old: Vec<u8> = (0..8 * g).map(|i| (i % 251) as u8).collect();
        target.write_at(&old, 0).unwrap();
        let bits = AtomicBits::new(8);
        for i in [1, 2, 3, 5] {
            bits.set_range(i, i);
        }
        let suspect = Suspect { bits, granularity: g };
        let offset = g + 2048;
        let at = |x: u64| usize::try_from(x - offset).unwrap();
        let mut buf = old[usize::try_from(offset).unwrap()..].to_vec();
        buf[at(2 * g + 10)] ^= 1; // granule 2 changed
        buf[at(4 * g)] ^= 1; // granule 4 changed (not suspect)
        let mut done = ChunkDone::default();
        let skip = suspect.unchanged(&buf, offset, &target, &mut done).unwrap();
        assert_eq!(skip, vec![(0, at(2 * g)), (at(3 * g), at(4 * g)), (at(5 * g), at(6 * g))]);
        assert_eq!(done.suspect, 4 * g - 2048);
        assert_eq!(done.suspect_unchanged, 3 * g - 2048);
        let runs = without(zero_runs(&buf), &skip);
        assert_eq!(
            runs,
            vec![(at(2 * g), at(3 * g), false), (at(4 * g), at(5 * g), false), (at(6 * g), buf.len(), false)]
        );
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), f).await.expect("a group member waited forever")
    }

    #[tokio::test]
    async fn a_group_commits_only_when_every_member_arrived_ok() {
        let mut m = Group::members(2);
        let (a, b) = (m.remove(0), m.remove(0));
        let (a, b) = within(async { tokio::join!(a.arrive(true), b.arrive(true)) }).await;
        assert!(a && b);
        let mut m = Group::members(2);
        let (a, b) = (m.remove(0), m.remove(0));
        let (a, b) = within(async { tokio::join!(a.arrive(true), b.arrive(false)) }).await;
        assert!(!a && !b);
    }

    #[tokio::test]
    async fn a_member_that_never_arrives_fails_the_group_instead_of_holding_it() {
        // One member's job never starts (or leaves on an early error): its place is dropped.
        let mut m = Group::members(3);
        let (a, b) = (m.remove(0), m.remove(0));
        drop(m);
        let (a, b) = within(async { tokio::join!(a.arrive(true), b.arrive(true)) }).await;
        assert!(!a && !b, "the group committed without one of its disks");
    }
}
