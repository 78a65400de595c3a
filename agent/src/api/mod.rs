//! The control plane: every operation the CLI and automation can ask for.
//!
//! HTTP handlers ([`http`]) only parse a request into a [`Command`];
//! [`Control::execute`] is the one place that carries commands out, and
//! [`ApiError`] the one place that decides HTTP statuses and error codes.
//! The CLI talks to it through [`client`].

mod access;
pub mod client;
pub mod http;
mod jobs;
pub mod migrations;
pub mod outgoing;
mod resize;
pub mod restore;

pub use jobs::{JobAction, StartJob};
pub use migrations::{Complete, MigrationEnv, Prepare};
pub use outgoing::{OutState, OutgoingEnv, StartMigration};

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use arc_swap::ArcSwap;

use crate::bitmap::{BitmapError, BitmapInfo};
use crate::config::{parse_size, VmConfig};
use crate::export::{Export, Exports};
use crate::jobs::backup::BackupEnv;
use crate::jobs::{JobControlError, JobManager};

/// One control operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Agent status.
    Status,
    /// Every disk with its bitmaps.
    Disks,
    /// One disk.
    Disk(String),
    /// Bitmaps of a disk.
    BitmapList(String),
    /// One bitmap.
    BitmapGet(String, String),
    /// Add a bitmap.
    BitmapAdd(String, BitmapAdd),
    /// Remove a bitmap.
    BitmapRemove(String, String),
    /// Clear a bitmap.
    BitmapClear(String, String),
    /// Enable (true) or disable a bitmap.
    BitmapEnable(String, String, bool),
    /// Merge sources into a target bitmap.
    BitmapMerge(String, String, Vec<String>),
    /// Start a job (backup of a disk or VM, verify).
    StartJob(StartJob),
    /// Jobs (`true`: concluded ones too).
    Jobs(bool),
    /// One job; waiting up to the milliseconds given for it to conclude.
    Job(String, u64),
    /// Control a job.
    JobAction(String, JobAction),
    /// Prepare an incoming migration (destination).
    PrepareMigration(Prepare),
    /// Activate an incoming migration and start streaming.
    CompleteMigration(String, Complete),
    /// Undo a prepared incoming migration.
    AbortMigration(String),
    /// Incoming migrations.
    Migrations,
    /// One incoming migration.
    Migration(String),
    /// A disk's backup chain against a bitmap.
    Chain(String, Option<String>),
    /// A disk's restore points.
    Backups(String),
    /// The source reports an incoming migration's disks in sync.
    MigrationSynced(String, bool),
    /// Wait for the first IO on an incoming migration's exports (seconds).
    FirstIo(String, u64),
    /// Start an outgoing migration (source).
    StartOutgoing(StartMigration),
    /// Outgoing migrations.
    OutgoingList,
    /// One outgoing migration, by VM; optionally once its state differs
    /// from the one given (waiting at most the seconds given).
    OutgoingShow(String, Option<OutState>, u64),
    /// Cut an outgoing migration over now.
    OutgoingCutover(String),
    /// Abort an outgoing migration.
    OutgoingAbort(String),
    /// Fence a disk that was migrated away.
    Fence(String, String),
    /// Remove a disk's fence.
    Unfence(String),
    /// Grow a disk online.
    Resize(String, Size),
}

/// Body of `POST /v1/disks/{vm}/{disk}/bitmaps`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapAdd {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit: a number or a size string such as `64KiB` (default 64 KiB).
    #[serde(default)]
    pub granularity: Option<Size>,
    /// Create it without recording writes.
    #[serde(default)]
    pub disabled: bool,
}

/// A size given as a number of bytes or a string with a unit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// `64KiB` and the like.
    Text(String),
}

impl Size {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, ApiError> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => parse_size(t).map_err(ApiError::BadRequest),
        }
    }
}

/// Body of `POST .../bitmaps/{name}/merge`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MergeBody {
    /// Bitmaps to merge into the target.
    pub sources: Vec<String>,
}

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or invalid.
    #[error("{0}")]
    BadRequest(String),
    /// No such disk.
    #[error("No disk {0:?}")]
    DiskNotFound(String),
    /// No such route.
    #[error("No such resource")]
    NoRoute,
    /// The route exists but not with this method.
    #[error("Method not allowed on this resource")]
    MethodNotAllowed,
    /// No valid credential on a TCP connection.
    #[error("Authentication required: send Authorization: Bearer TOKEN (control.token_file) or a client certificate")]
    Unauthorized,
    /// The request body is over the limit.
    #[error("Request body larger than {0} bytes")]
    TooLarge(usize),
    /// No such resource (named).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// A bitmap operation failed.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// A job request failed.
    #[error(transparent)]
    Job(#[from] JobControlError),
    /// An internal task failed.
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status and stable error code.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Self::BadRequest(_) => (400, "bad_request"),
            Self::DiskNotFound(_) => (404, "disk_not_found"),
            Self::NoRoute | Self::NotFound(_) => (404, "not_found"),
            Self::MethodNotAllowed => (405, "method_not_allowed"),
            Self::Unauthorized => (401, "unauthorized"),
            Self::TooLarge(_) => (413, "body_too_large"),
            Self::Conflict(_) => (409, "conflict"),
            Self::Bitmap(e) => match e {
                BitmapError::NotFound { .. } => (404, e.code()),
                BitmapError::Invalid(_) => (400, e.code()),
                BitmapError::Persist { .. } => (500, e.code()),
                BitmapError::Exists(_)
                | BitmapError::Busy { .. }
                | BitmapError::Inconsistent { .. }
                | BitmapError::Disabled(_) => (409, e.code()),
            },
            Self::Job(e) => match e {
                JobControlError::NotFound(_) => (404, "job_not_found"),
                JobControlError::State(..) => (409, "job_state"),
                JobControlError::Busy { .. } => (409, "disk_busy"),
            },
            Self::Internal(_) => (500, "internal"),
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> Value {
        json!({ "error": { "code": self.status().1, "message": self.to_string() } })
    }
}

/// What a disk looks like in the API.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    /// `VM/DISK`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Exported read-only.
    pub read_only: bool,
    /// Its bitmaps.
    pub bitmaps: Vec<BitmapInfo>,
}

/// Carries out commands against the agent's state.
#[derive(Debug)]
pub struct Control {
    node: String,
    exports: Arc<Exports>,
    jobs: Arc<JobManager>,
    env: BackupEnv,
    vms: ArcSwap<Vec<VmConfig>>,
    migrations: std::sync::OnceLock<MigrationEnv>,
    outgoing: std::sync::OnceLock<OutgoingEnv>,
    started: Instant,
    /// One freeze-to-thaw sequence per VM at a time (see `jobs::hooks`).
    hook_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Control {
    /// Control over the agent's exports and jobs.
    pub fn new(node: String, exports: Arc<Exports>, jobs: Arc<JobManager>, env: BackupEnv) -> Self {
        Self {
            node,
            exports,
            jobs,
            env,
            vms: ArcSwap::default(),
            migrations: Default::default(),
            outgoing: Default::default(),
            started: Instant::now(),
            hook_locks: Default::default(),
        }
    }

    /// The agent's event channel.
    pub fn events(&self) -> &crate::events::Events {
        self.jobs.events()
    }

    /// Enables the migration endpoints (once the servers are bound).
    pub fn set_migration_env(&self, env: MigrationEnv) {
        let _ = self.migrations.set(env);
    }

    /// Enables the outgoing migrations (records loaded).
    pub fn set_outgoing_env(&self, env: OutgoingEnv) {
        let _ = self.outgoing.set(env);
    }

    /// An export by name, incoming ones included.
    fn disk_any(&self, name: &str) -> Result<Arc<Export>, ApiError> {
        self.exports.get(name).ok_or_else(|| ApiError::DiskNotFound(name.to_owned()))
    }

    /// The VM configuration in force (after startup and each reload).
    pub fn set_vms(&self, vms: Vec<VmConfig>) {
        self.vms.store(Arc::new(vms));
    }

    fn disk(&self, name: &str) -> Result<Arc<Export>, ApiError> {
        self.exports.get(name).filter(|e| e.incoming().is_none()).ok_or_else(|| ApiError::DiskNotFound(name.to_owned()))
    }

    fn disk_info_of(export: &Export) -> DiskInfo {
        Self::disk_info(export)
    }

    fn disk_info(export: &Export) -> DiskInfo {
        DiskInfo {
            name: export.name().to_owned(),
            size: export.size(),
            read_only: export.read_only(),
            bitmaps: export.bitmaps().list(),
        }
    }

    /// Runs one command; returns the JSON result (`null` for "no content").
    pub async fn execute(self: &Arc<Self>, command: Command) -> Result<Value, ApiError> {
        match command {
            Command::Status => Ok(json!({
                "node": self.node,
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "uptime_seconds": self.started.elapsed().as_secs(),
                "disks": self.exports.list().len(),
            })),
            Command::Disks => Ok(to_json(self.exports.list().iter().map(|e| Self::disk_info(e)).collect::<Vec<_>>())),
            Command::Disk(disk) => Ok(to_json(Self::disk_info(self.disk(&disk)?.as_ref()))),
            Command::BitmapList(disk) => Ok(to_json(self.disk(&disk)?.bitmaps().list())),
            Command::BitmapGet(disk, name) => {
                let list = self.disk(&disk)?.bitmaps().list();
                let found = list.into_iter().find(|b| b.name == name);
                let found = found.ok_or(BitmapError::NotFound { disk, name })?;
                Ok(to_json(found))
            }
            Command::StartJob(start) => self.start_job(start).await,
            Command::Jobs(all) => Ok(to_json(self.jobs.list(all))),
            Command::Job(id, wait_ms) => {
                let job = self.jobs.get(&id)?;
                let record = match tokio::time::timeout(Duration::from_millis(wait_ms), job.wait()).await {
                    Ok(concluded) => concluded,
                    Err(_) => job.record(),
                };
                Ok(to_json(record))
            }
            Command::JobAction(id, action) => self.job_action(&id, action),
            Command::PrepareMigration(p) => self.prepare_migration(p).await,
            Command::CompleteMigration(id, c) => self.complete_migration(&id, c).await,
            Command::AbortMigration(id) => self.abort_migration(&id).await,
            Command::Migrations => self.list_migrations(),
            Command::Migration(id) => self.record(&id),
            Command::Chain(disk, bitmap) => self.chain(&disk, bitmap).await,
            Command::Backups(disk) => self.backups(&disk).await,
            Command::MigrationSynced(id, synced) => self.migration_synced(&id, synced).await,
            Command::FirstIo(id, wait) => self.first_io(&id, std::time::Duration::from_secs(wait.min(60))).await,
            Command::StartOutgoing(start) => self.start_outgoing(start).await,
            Command::OutgoingList => self.list_outgoing(),
            Command::OutgoingShow(vm, wait, secs) => {
                self.show_outgoing(&vm, wait, std::time::Duration::from_secs(secs.min(60))).await
            }
            Command::OutgoingCutover(vm) => self.cutover_outgoing(&vm),
            Command::OutgoingAbort(vm) => self.abort_outgoing(&vm),
            Command::Fence(disk, target) => self.fence(&disk, &target),
            Command::Resize(disk, size) => self.resize(&disk, &size).await,
            Command::Unfence(disk) => {
                let export = self.exports.get(&disk).ok_or_else(|| ApiError::DiskNotFound(disk.clone()))?;
                drop(export);
                self.unfence(&disk)
            }
            other => self.bitmap_op(other).await,
        }
    }

    /// Bitmap operations do file IO: run them on the blocking pool.
    async fn bitmap_op(&self, command: Command) -> Result<Value, ApiError> {
        let disk_name = match &command {
            Command::BitmapAdd(d, _)
            | Command::BitmapRemove(d, _)
            | Command::BitmapClear(d, _)
            | Command::BitmapEnable(d, _, _)
            | Command::BitmapMerge(d, _, _) => d.clone(),
            _ => return Err(ApiError::NoRoute),
        };
        let bitmaps = self.disk(&disk_name)?.bitmaps().clone();
        let run = move || -> Result<Value, ApiError> {
            Ok(match command {
                Command::BitmapAdd(_, add) => {
                    let granularity = add.granularity.as_ref().map(Size::bytes).transpose()?.unwrap_or(64 << 10);
                    to_json(bitmaps.add(&add.name, granularity, !add.disabled)?)
                }
                Command::BitmapRemove(_, name) => {
                    bitmaps.remove(&name)?;
                    Value::Null
                }
                Command::BitmapClear(_, name) => to_json(bitmaps.clear(&name)?),
                Command::BitmapEnable(_, name, on) => to_json(bitmaps.set_enabled(&name, on)?),
                Command::BitmapMerge(_, target, sources) => to_json(bitmaps.merge(&target, &sources)?),
                _ => return Err(ApiError::NoRoute),
            })
        };
        tokio::task::spawn_blocking(run).await.map_err(|e| ApiError::Internal(e.to_string()))?
    }
}

pub(crate) fn to_json<T: Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

#[cfg(test)]
mod openapi_tests;
