//! Block jobs: persisted state machines with progress, speed limits and
//! cooperative pause/cancel.
//!
//! ```text
//!   created ──► (queued) ──► running ◄──► paused
//!                  │  └──► ready ──complete──► completing   (mirror)
//!                  ▼
//!              concluded { success | failed(error) | cancelled }
//! ```
//! A job body is an async function that receives a [`JobHandle`] and calls
//! [`JobHandle::checkpoint`] once per chunk (pause waits there, cancel
//! returns [`JobError::Cancelled`]) and [`JobHandle::throttle`] before each
//! chunk's IO. Whatever happens, the body's own cleanup (abort the bitmap
//! hand-off, drop scratch data) runs before the job concludes.
//!
//! Records live in `STATE_DIR/jobs/ID.json`, rewritten atomically on every
//! state change; on startup a job found unfinished is concluded as failed
//! ("interrupted"), so history survives restarts. Host-wide limits (a
//! shared rate, how many run at once) are in [`limits`].

pub mod backup;
pub mod holds;
pub mod hooks;
pub mod limits;
pub mod mirror;
pub mod pit;
pub mod stream;
pub mod throttle;
pub mod verify;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::limits::{Admission, Admitted, HostLimits};
use self::throttle::TokenBucket;

/// Job states (PRODUCT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, not started.
    Created,
    /// Waiting for a slot (`jobs.max_running`).
    Queued,
    /// Working.
    Running,
    /// Paused by the user.
    Paused,
    /// Converged; waiting for `complete` (mirror).
    Ready,
    /// Finishing after `complete`.
    Completing,
    /// Finished; see `result`.
    Concluded,
}

/// How a concluded job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobResult {
    /// Did what it was asked.
    Success,
    /// Failed; `error` says why.
    Failed,
    /// Cancelled by the user.
    Cancelled,
}

/// Why a job body stopped.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Cancelled by the user.
    #[error("Cancelled")]
    Cancelled,
    /// Failed.
    #[error("{0}")]
    Failed(String),
}

impl JobError {
    /// A failure from any displayable error, with its causes.
    pub fn from_err(context: &str, e: &dyn std::error::Error) -> Self {
        let mut msg = format!("{context}: {e}");
        let mut cause = e.source();
        while let Some(c) = cause {
            msg.push_str(&format!(": {c}"));
            cause = c.source();
        }
        JobError::Failed(msg)
    }
}

/// What the API shows about a job; also its persisted record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id, e.g. `backup-12`.
    pub id: String,
    /// `backup`, `mirror`, `stream` or `verify`.
    pub kind: String,
    /// Disk (`VM/DISK`).
    pub disk: String,
    /// Parameters the job was started with.
    pub params: Value,
    /// Current state.
    pub state: JobState,
    /// Set once concluded.
    pub result: Option<JobResult>,
    /// Why it failed.
    pub error: Option<String>,
    /// Bytes processed.
    pub bytes_done: u64,
    /// Bytes to process (may change while running).
    pub bytes_total: u64,
    /// Current rate, bytes/s.
    pub rate: u64,
    /// Estimated seconds left.
    pub eta_seconds: Option<u64>,
    /// Speed limit, bytes/s (0 = unlimited).
    pub speed: u64,
    /// Unix time created.
    pub created_at: u64,
    /// Unix time concluded.
    pub finished_at: Option<u64>,
    /// Job-specific outcome (snapshot name, mismatches, ...).
    pub summary: Value,
    /// Job-specific live state while it runs (a mirror: `remaining_bytes`,
    /// `write_blocking`, `in_sync`).
    #[serde(default)]
    pub detail: Value,
}

/// A non-negative float as u64 (`as` saturates; NaN becomes 0).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn saturating_u64(x: f64) -> u64 {
    x as u64
}

/// Milliseconds of a duration, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One job.
#[derive(Debug)]
pub struct Job {
    record: Mutex<JobRecord>,
    cancel: CancellationToken,
    paused: watch::Sender<bool>,
    complete: CancellationToken,
    bucket: Mutex<TokenBucket>,
    epoch: Instant,
    done: watch::Sender<bool>,
    samples: Mutex<Vec<(Instant, u64)>>,
    bytes: AtomicU64,
    file: PathBuf,
    settings: watch::Sender<Value>,
    events: crate::events::Events,
    /// When progress was last published (at most one event a second).
    published: Mutex<Option<Instant>>,
    /// The agent's limits (the shared rate).
    host: Arc<HostLimits>,
    /// Whether the shared rate applies ([`Admission::Urgent`] jobs: not).
    host_rate: std::sync::atomic::AtomicBool,
}

impl Job {
    /// Publishes the job's state (and, once concluded, its outcome).
    fn publish_state(&self) {
        let r = self.record();
        let mut body = serde_json::json!({
            "id": r.id, "kind": r.kind, "disk": r.disk, "state": r.state,
            "bytes_done": r.bytes_done, "bytes_total": r.bytes_total,
        });
        if r.state == JobState::Concluded {
            body["result"] = serde_json::json!(r.result);
            body["error"] = serde_json::json!(r.error);
        }
        self.events.publish("job", body);
    }

    fn lock(&self) -> MutexGuard<'_, JobRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot of the record with live progress.
    pub fn record(&self) -> JobRecord {
        let mut r = self.lock().clone();
        r.bytes_done = self.bytes.load(SeqCst);
        if r.state != JobState::Concluded {
            r.rate = self.rate();
            r.eta_seconds = (r.rate > 0).then(|| r.bytes_total.saturating_sub(r.bytes_done) / r.rate);
        }
        r
    }

    fn rate(&self) -> u64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match (samples.first(), samples.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => saturating_u64((b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64()),
            _ => 0,
        }
    }

    fn persist(&self) {
        let record = self.record();
        if let Err(e) = write_atomic(&self.file, &record) {
            tracing::error!(job = %record.id, error = %e, "cannot persist job record");
        }
    }

    fn set_state(&self, state: JobState) {
        let changed = std::mem::replace(&mut self.lock().state, state) != state;
        self.persist();
        // A ready mirror sets `ready` on every pass: subscribers hear of changes only.
        if changed {
            self.publish_state();
        }
    }

    /// Job-specific settings (what `set_setting` recorded).
    pub fn settings(&self) -> Value {
        self.settings.borrow().clone()
    }

    /// Waits until the job concludes; returns its record.
    pub async fn wait(&self) -> JobRecord {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
        self.record()
    }
}

/// What a job body uses to report and to be controlled.
#[derive(Debug, Clone)]
pub struct JobHandle(Arc<Job>);

impl JobHandle {
    /// The job's id.
    pub fn id(&self) -> String {
        self.0.lock().id.clone()
    }

    /// Once per chunk: waits while paused; errors once cancelled.
    pub async fn checkpoint(&self) -> Result<(), JobError> {
        let mut paused = self.0.paused.subscribe();
        if *paused.borrow() {
            self.0.set_state(JobState::Paused);
            tokio::select! {
                _ = paused.wait_for(|p| !*p) => {}
                () = self.0.cancel.cancelled() => {}
            }
            if !self.0.cancel.is_cancelled() {
                self.0.set_state(JobState::Running);
            }
        }
        if self.0.cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        Ok(())
    }

    /// Waits as the speed limit requires before processing `bytes`.
    pub async fn throttle(&self, bytes: u64) -> Result<(), JobError> {
        let own = {
            let mut b = self.0.bucket.lock().unwrap_or_else(|p| p.into_inner());
            b.take(bytes, self.0.epoch.elapsed())
        };
        // Both limits hold: the job's own speed and the agent's shared rate.
        let host = if self.0.host_rate.load(SeqCst) { self.0.host.take(bytes) } else { Duration::ZERO };
        let wait = own.max(host);
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.0.cancel.cancelled() => return Err(JobError::Cancelled),
            }
        }
        Ok(())
    }

    /// Adds processed bytes.
    pub fn progress(&self, bytes: u64) {
        let total = self.0.bytes.fetch_add(bytes, SeqCst) + bytes;
        let mut s = self.0.samples.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.push((now, total));
        let cutoff = now.checked_sub(Duration::from_secs(3));
        s.retain(|(t, _)| cutoff.is_none_or(|c| *t >= c));
        drop(s);
        let due = {
            let mut last = self.0.published.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            let r = self.0.record();
            self.0.events.publish(
                "job_progress",
                serde_json::json!({
                    "id": r.id, "kind": r.kind, "disk": r.disk, "bytes_done": r.bytes_done,
                    "bytes_total": r.bytes_total, "rate": r.rate,
                }),
            );
        }
    }

    /// Sets the total (it may change while running).
    pub fn set_total(&self, total: u64) {
        self.0.lock().bytes_total = total;
    }

    /// Publishes job-specific live state (`detail` of the record).
    pub fn set_detail(&self, detail: Value) {
        self.0.lock().detail = detail;
    }

    /// Moves the job to `state` (running, ready, completing).
    pub fn set_state(&self, state: JobState) {
        self.0.set_state(state);
    }

    /// Resolves when the user asks the job to complete.
    pub async fn completion_requested(&self) {
        self.0.complete.cancelled().await;
    }

    /// Whether the user asked the job to complete.
    pub fn is_completion_requested(&self) -> bool {
        self.0.complete.is_cancelled()
    }

    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancel.is_cancelled()
    }

    /// Resolves when the job is cancelled.
    pub async fn cancelled(&self) {
        self.0.cancel.cancelled().await;
    }

    /// Job-specific settings changed at runtime (e.g. a mirror's copy mode).
    pub fn settings(&self) -> Value {
        self.0.settings.borrow().clone()
    }

    /// Records a setting the job changed itself (e.g. a mirror switching
    /// to write-blocking), so it stays in force and shows.
    pub fn set_setting(&self, key: &str, value: Value) {
        set_in(&self.0.settings, key, value);
    }
}

fn set_in(settings: &watch::Sender<Value>, key: &str, value: Value) {
    settings.send_modify(|s| {
        if !s.is_object() {
            *s = Value::Object(Default::default());
        }
        s[key] = value;
    });
}

/// Errors of job control requests.
#[derive(Debug, thiserror::Error)]
pub enum JobControlError {
    /// No such job.
    #[error("No job {0:?}")]
    NotFound(String),
    /// The request does not fit the job's state.
    #[error("Job {0} is {1:?}: {2}")]
    State(String, JobState, &'static str),
    /// Another job already works on the disk.
    #[error("Disk {disk} is busy with job {job}")]
    Busy {
        /// Disk.
        disk: String,
        /// Running job.
        job: String,
    },
}

/// Owns every job of the agent.
#[derive(Debug)]
pub struct JobManager {
    dir: PathBuf,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    next: AtomicU64,
    tracker: tokio_util::task::TaskTracker,
    events: crate::events::Events,
    limits: Arc<HostLimits>,
}

impl JobManager {
    /// Loads the job history from `dir`; unfinished jobs become failed ("interrupted").
    pub fn load(dir: &Path) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let me = Self {
            dir: dir.to_owned(),
            jobs: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
            tracker: Default::default(),
            events: Default::default(),
            limits: Default::default(),
        };
        let mut max = 0;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let Ok(mut record) = serde_json::from_str::<JobRecord>(&text) else {
                tracing::warn!(file = %path.display(), "ignoring unreadable job record");
                continue;
            };
            max = max.max(record.id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0));
            if record.state != JobState::Concluded {
                let state = serde_json::to_value(record.state).ok().and_then(|v| v.as_str().map(str::to_owned));
                record.state = JobState::Concluded;
                record.result = Some(JobResult::Failed);
                record.error = Some(format!(
                    "Interrupted: the agent stopped while the job was {}",
                    state.unwrap_or_else(|| "running".into())
                ));
                record.finished_at = Some(unix_now());
                let _ = write_atomic(&path, &record);
            }
            let job = me.make_job(record, path);
            job.done.send_replace(true);
            me.jobs().insert(job.record().id, job);
        }
        me.next.store(max + 1, SeqCst);
        Ok(Arc::new(me))
    }

    fn jobs(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_job(&self, record: JobRecord, file: PathBuf) -> Arc<Job> {
        let epoch = Instant::now();
        Arc::new(Job {
            bucket: Mutex::new(TokenBucket::new(record.speed, Duration::ZERO)),
            bytes: AtomicU64::new(record.bytes_done),
            record: Mutex::new(record),
            cancel: CancellationToken::new(),
            paused: watch::channel(false).0,
            complete: CancellationToken::new(),
            epoch,
            done: watch::channel(false).0,
            samples: Mutex::new(Vec::new()),
            file,
            settings: watch::channel(Value::Null).0,
            events: self.events.clone(),
            published: Mutex::new(None),
            host: self.limits.clone(),
            host_rate: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The agent's event channel (jobs publish to it; so do migrations).
    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    /// The running job on `disk`, if any.
    pub fn active_on(&self, disk: &str) -> Option<String> {
        self.jobs()
            .values()
            .map(|j| j.record())
            .find(|r| r.disk == disk && r.state != JobState::Concluded)
            .map(|r| r.id)
    }

    /// The agent's job limits (`jobs:` in `agent.yaml`).
    pub fn limits(&self) -> &Arc<HostLimits> {
        &self.limits
    }

    /// Starts a job on `disk`, queued while `jobs.max_running` jobs run;
    /// fails with Busy if another job (queued or not) has the disk.
    pub fn start<F, Fut>(
        self: &Arc<Self>,
        kind: &str,
        disk: &str,
        params: Value,
        speed: u64,
        body: F,
    ) -> Result<Arc<Job>, JobControlError>
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value, JobError>> + Send + 'static,
    {
        self.start_with(kind, disk, params, speed, Admission::Queue, body)
    }

    /// [`start`](Self::start) admitted as `admission` says (see [`limits`]).
    pub fn start_with<F, Fut>(
        self: &Arc<Self>,
        kind: &str,
        disk: &str,
        params: Value,
        speed: u64,
        admission: Admission,
        body: F,
    ) -> Result<Arc<Job>, JobControlError>
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value, JobError>> + Send + 'static,
    {
        let mut jobs = self.jobs();
        if let Some(job) = jobs.values().map(|j| j.record()).find(|r| r.disk == disk && r.state != JobState::Concluded)
        {
            return Err(JobControlError::Busy { disk: disk.to_owned(), job: job.id });
        }
        let id = format!("{kind}-{}", self.next.fetch_add(1, SeqCst));
        let record = JobRecord {
            id: id.clone(),
            kind: kind.to_owned(),
            disk: disk.to_owned(),
            params,
            state: JobState::Created,
            result: None,
            error: None,
            bytes_done: 0,
            bytes_total: 0,
            rate: 0,
            eta_seconds: None,
            speed,
            created_at: unix_now(),
            finished_at: None,
            summary: Value::Null,
            detail: Value::Null,
        };
        let job = self.make_job(record, self.dir.join(format!("{id}.json")));
        let admitted = self.limits.admit(admission);
        job.host_rate.store(admission != Admission::Urgent, SeqCst);
        if matches!(admitted, Admitted::Queued(_)) {
            job.lock().state = JobState::Queued;
        }
        job.persist();
        job.publish_state();
        jobs.insert(id.clone(), job.clone());
        drop(jobs);
        let handle = JobHandle(job.clone());
        let span = tracing::info_span!("job", id = %id, disk);
        self.tracker.spawn(tracing::Instrument::instrument(
            async move {
                let _slot = match admitted {
                    Admitted::Running(slot) => Some(slot),
                    Admitted::Exempt => None,
                    Admitted::Queued(ticket) => {
                        tracing::info!("job queued (jobs.max_running)");
                        let slot = tokio::select! {
                            biased;
                            () = handle.0.cancel.cancelled() => None,
                            slot = ticket.admitted() => Some(slot),
                        };
                        // A cancel that came with the slot still wins: the body never starts.
                        match slot.filter(|_| !handle.0.cancel.is_cancelled()) {
                            Some(slot) => Some(slot),
                            None => {
                                conclude(&handle.0, Err(JobError::Cancelled));
                                return;
                            }
                        }
                    }
                };
                handle.set_state(JobState::Running);
                tracing::info!("job started");
                let outcome = body(handle.clone()).await;
                conclude(&handle.0, outcome);
            },
            span,
        ));
        Ok(job)
    }

    /// Looks a job up.
    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobControlError> {
        self.jobs().get(id).cloned().ok_or_else(|| JobControlError::NotFound(id.to_owned()))
    }

    /// Jobs, oldest first; concluded ones only with `all`.
    pub fn list(&self, all: bool) -> Vec<JobRecord> {
        let mut v: Vec<JobRecord> =
            self.jobs().values().map(|j| j.record()).filter(|r| all || r.state != JobState::Concluded).collect();
        v.sort_by_key(|r| (r.created_at, r.id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok())));
        v
    }

    fn live(&self, id: &str) -> Result<Arc<Job>, JobControlError> {
        let job = self.get(id)?;
        let state = job.lock().state;
        if state == JobState::Concluded {
            return Err(JobControlError::State(id.to_owned(), state, "already concluded"));
        }
        Ok(job)
    }

    /// Pauses at the next chunk boundary.
    pub fn pause(&self, id: &str) -> Result<JobRecord, JobControlError> {
        let job = self.live(id)?;
        job.paused.send_replace(true);
        Ok(job.record())
    }

    /// Resumes a paused job.
    pub fn resume(&self, id: &str) -> Result<JobRecord, JobControlError> {
        let job = self.live(id)?;
        job.paused.send_replace(false);
        Ok(job.record())
    }

    /// Cancels; the job concludes as cancelled after its cleanup.
    pub fn cancel(&self, id: &str) -> Result<JobRecord, JobControlError> {
        let job = self.live(id)?;
        job.cancel.cancel();
        Ok(job.record())
    }

    /// Asks a ready job to complete.
    pub fn complete(&self, id: &str) -> Result<JobRecord, JobControlError> {
        let job = self.live(id)?;
        let state = job.lock().state;
        if state != JobState::Ready {
            return Err(JobControlError::State(id.to_owned(), state, "only a ready job can complete"));
        }
        job.complete.cancel();
        Ok(job.record())
    }

    /// Changes the speed limit (bytes/s, 0 = unlimited) of a running job.
    pub fn set_speed(&self, id: &str, speed: u64) -> Result<JobRecord, JobControlError> {
        let job = self.live(id)?;
        job.bucket.lock().unwrap_or_else(|p| p.into_inner()).set_rate(speed, job.epoch.elapsed());
        job.lock().speed = speed;
        job.persist();
        Ok(job.record())
    }

    /// Changes a job-specific setting of a running job.
    pub fn set_setting(&self, id: &str, key: &str, value: Value) -> Result<JobRecord, JobControlError> {
        let job = self.live(id)?;
        set_in(&job.settings, key, value);
        Ok(job.record())
    }

    /// Cancels every job and waits for them (agent shutdown).
    pub async fn shutdown(&self) {
        for job in self.jobs().values() {
            job.cancel.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn conclude(job: &Job, outcome: Result<Value, JobError>) {
    let mut r = job.lock();
    r.state = JobState::Concluded;
    r.finished_at = Some(unix_now());
    match outcome {
        Ok(summary) => {
            r.result = Some(JobResult::Success);
            r.summary = summary;
            tracing::info!("job succeeded");
        }
        Err(JobError::Cancelled) => {
            r.result = Some(JobResult::Cancelled);
            r.error = Some("Cancelled".into());
            tracing::info!("job cancelled");
        }
        Err(JobError::Failed(e)) => {
            tracing::error!(error = %e, "job failed");
            r.result = Some(JobResult::Failed);
            r.error = Some(e);
        }
    }
    drop(r);
    job.persist();
    job.done.send_replace(true);
    job.publish_state();
}

fn write_atomic(path: &Path, record: &JobRecord) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    crate::durable::write_file(path, &body)
}
