//! Outgoing migrations: the source agent's side of `rbdsync migrate`.
//!
//! The migration is a resource of the source agent, persisted in
//! `STATE_DIR/migrations/outgoing/VM.json`; the CLI only starts it and
//! watches it. Its states:
//!
//! ```text
//!  mirroring     destination prepared (disks layered on the backup snapshots,
//!                or plain for --full), one mirror per disk seeded from the bitmaps
//!  ready         every mirror converged and in write-blocking mode: the
//!                destination holds every acknowledged write; it serves the
//!                disks by their own names, IO held ("incoming")
//!  cutting-over  trigger: at once (auto), `migration cutover` (manual), or the
//!                destination's first IO (first-io). All disks hold their writes
//!                together, copy the rest, turn read-only together (a
//!                CutOverGroup); then fences (durable), then the destination
//!                activates: the point of no return
//!  completed     the destination serves the disks; the source's stay fenced
//!  aborted       by `migration abort`, or a restart before the cut-over: the
//!                source never stopped being authoritative
//!  failed        a mirror or the cut-over failed before the point of no return:
//!                as aborted, with the error
//! ```
//!
//! Safety rules: a source disk turns read-only only together with its VM's
//! other disks and only after the destination has every write; it is fenced
//! durably before the destination goes live, and unfenced only once the
//! destination shows it did not (and cannot any more). A restarted agent
//! finds the record: before the fences it aborts (the source is writable:
//! nothing went read-only durably); with every fence written it completes
//! the destination (retrying until the destination answers).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::client::{ClientError, Credentials, Endpoint};
use super::{to_json, ApiError, Control, Size};
use crate::jobs::limits::Admission::Exempt;
use crate::jobs::mirror::{self, BitmapState, CopyMode, CutOverGroup, MirrorParams, MirrorSync};
use crate::jobs::{unix_now, JobState};

/// What starts the cut-over once every mirror is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Cutover {
    /// At once (a stopped VM, or a disk-only move).
    #[default]
    Auto,
    /// `migration cutover VM`.
    Manual,
    /// The first IO a client sends on the destination's incoming export.
    FirstIo,
}

/// Where an outgoing migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutState {
    /// Mirrors running, not all converged yet.
    Mirroring,
    /// Every mirror converged, in write-blocking mode, waiting for the trigger.
    Ready,
    /// The cut-over runs.
    CuttingOver,
    /// The destination serves the disks.
    Completed,
    /// Rolled back: the source serves the disks.
    Aborted,
    /// Failed before the point of no return: the source serves the disks.
    Failed,
}

impl OutState {
    /// Whether the migration is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Aborted | Self::Failed)
    }
}

/// Body of `POST /v1/migrations/outgoing`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    /// VM to migrate (all its disks).
    pub vm: String,
    /// The destination agent's control address (`unix:PATH`, `http://` or `https://HOST:PORT`).
    pub to: String,
    /// Bitmap seeding the mirrors (default: each disk's `backup.bitmap`).
    #[serde(default)]
    pub bitmap: Option<String>,
    /// Mirror and stream speed limit, bytes/s.
    #[serde(default)]
    pub speed: Option<Size>,
    /// Ready below this many dirty bytes per disk (default 16 MiB).
    #[serde(default)]
    pub ready_threshold: Option<Size>,
    /// Mirror copy mode at start (default background).
    #[serde(default)]
    pub copy_mode: Option<CopyMode>,
    /// `auto` (default), `manual` or `first-io`.
    #[serde(default)]
    pub cutover: Cutover,
    /// Mirror whole disks onto plain destination images (no backup needed).
    #[serde(default)]
    pub full: bool,
    /// Compare each destination disk with its source during the cut-over.
    #[serde(default)]
    pub verify: bool,
    /// Start stream jobs on the destination (default true).
    #[serde(default)]
    pub stream: Option<bool>,
    /// Destination image per disk with `{vm}` and `{disk}` filled in.
    #[serde(default)]
    pub dest_image: Option<String>,
}

/// One disk of an outgoing migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutDisk {
    /// `VM/DISK`.
    pub disk: String,
    /// Its mirror job.
    #[serde(default)]
    pub job: Option<String>,
    /// The mirror's NBD target (with the destination's token: never shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Bytes the mirror sent.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Dirty bytes the mirror was seeded with.
    #[serde(default)]
    pub initial_dirty_bytes: u64,
    /// Disk size.
    #[serde(default)]
    pub disk_size: u64,
    /// Guest writes held on this disk during the cut-over, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Whether its fence is written.
    #[serde(default)]
    pub fenced: bool,
    /// The bitmap that seeded its mirror (none: a whole-disk mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// That bitmap's state when the chain was checked, which the
    /// destination's backing matches (a mirror seeded again after a restart
    /// must find it unchanged, or copy the whole disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Value>,
}

/// An outgoing migration as persisted and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutRecord {
    /// VM.
    pub vm: String,
    /// Destination control address.
    pub to: String,
    /// The destination's migration id.
    #[serde(default)]
    pub id: Option<String>,
    /// Trigger.
    pub cutover: Cutover,
    /// State.
    pub state: OutState,
    /// Whole-disk mirrors.
    #[serde(default)]
    pub full: bool,
    /// Verify at cut-over.
    #[serde(default)]
    pub verify: bool,
    /// Stream on the destination.
    #[serde(default = "yes")]
    pub stream: bool,
    /// Speed limit, bytes/s (0: none).
    #[serde(default)]
    pub speed: u64,
    /// Disks.
    pub disks: Vec<OutDisk>,
    /// Unix time of the start.
    pub created_at: u64,
    /// Unix time of the last change.
    #[serde(default)]
    pub updated_at: u64,
    /// From the trigger to the destination's activation (disks writable
    /// nowhere meanwhile), ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Mirrors' start to the end, ms.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Stream jobs on the destination.
    #[serde(default)]
    pub stream_jobs: Value,
    /// Why it failed or was aborted.
    #[serde(default)]
    pub error: Option<String>,
    /// The source disks must stay fenced whatever the state says (the
    /// destination went live outside this migration): a restart writes
    /// their fences again before serving them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fence_due: bool,
}

fn yes() -> bool {
    true
}

/// What the driver is asked to do from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    None,
    CutOver,
    Abort,
}

/// One outgoing migration in memory.
#[derive(Debug)]
struct Handle {
    record: Mutex<OutRecord>,
    /// Bumped on every change (long polls wait on it).
    changed: watch::Sender<u64>,
    request: watch::Sender<Request>,
}

impl Handle {
    fn new(record: OutRecord) -> Arc<Self> {
        Arc::new(Self {
            record: Mutex::new(record),
            changed: watch::Sender::new(0),
            request: watch::Sender::new(Request::None),
        })
    }

    fn get(&self) -> OutRecord {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The outgoing migrations of this agent.
#[derive(Debug)]
pub struct OutgoingEnv {
    dir: PathBuf,
    map: Mutex<BTreeMap<String, Arc<Handle>>>,
    events: crate::events::Events,
    /// How destinations' control APIs on `https://` are called (`migration:`).
    credentials: Arc<Credentials>,
}

impl OutgoingEnv {
    /// Loads the records of `STATE_DIR/migrations/outgoing`.
    pub fn load(dir: PathBuf, events: crate::events::Events, credentials: Arc<Credentials>) -> Self {
        let mut map = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
            match serde_json::from_str::<OutRecord>(&text) {
                Ok(r) => {
                    map.insert(r.vm.clone(), Handle::new(r));
                }
                Err(e) => {
                    tracing::error!(file = %entry.path().display(), error = %e, "unreadable outgoing migration record")
                }
            }
        }
        Self { dir, map: Mutex::new(map), events, credentials }
    }

    /// Disks to fence before they are served after a restart: those of a
    /// record marked `fence_due`, and those of a `first-io` migration that
    /// was cutting over. Its trigger was the
    /// destination VM's first write, so the VM runs there: the source disks
    /// must never be writable again (the restart rolls the migration
    /// forward), not even between opening and recovery. `(disk, fence
    /// target)` pairs.
    pub fn fences_due_at_start(&self) -> Vec<(String, String)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .map(|h| h.get())
            .filter(|r| r.fence_due || (r.cutover == Cutover::FirstIo && r.state == OutState::CuttingOver))
            .flat_map(|r| {
                let target = format!("{} {}", r.to, r.id.clone().unwrap_or_default());
                r.disks.iter().map(move |d| (d.disk.clone(), target.clone())).collect::<Vec<_>>()
            })
            .collect()
    }

    /// An operator took `disk` back (unfence): once no disk of its VM's
    /// record is fenced any more (`fenced` says whether one is), the record
    /// no longer keeps fences due.
    pub fn fence_lifted(&self, disk: &str, fenced: impl Fn(&str) -> bool) {
        let vm = disk.split('/').next().unwrap_or_default();
        if let Some(h) = self.handle(vm).filter(|h| h.get().fence_due) {
            if !h.get().disks.iter().any(|d| fenced(&d.disk)) {
                let _ = self.save(&h, |r| r.fence_due = false);
            }
        }
    }

    fn handle(&self, vm: &str) -> Option<Arc<Handle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(vm).cloned()
    }

    /// Writes the record durably, then shows it.
    fn save(&self, h: &Handle, edit: impl FnOnce(&mut OutRecord)) -> Result<OutRecord, ApiError> {
        let mut r = h.get();
        let was = r.state;
        edit(&mut r);
        r.updated_at = unix_now();
        let path = self.dir.join(format!("{}.json", r.vm));
        let text = serde_json::to_string_pretty(&r).unwrap_or_default();
        crate::durable::write_file(&path, text.as_bytes())
            .map_err(|e| ApiError::Internal(format!("Cannot persist the migration record {}: {e}", path.display())))?;
        *h.record.lock().unwrap_or_else(|p| p.into_inner()) = r.clone();
        h.changed.send_modify(|v| *v += 1);
        if r.state != was {
            self.publish(&r);
        }
        Ok(r)
    }

    /// Publishes the record's state (see `crate::events`).
    fn publish(&self, r: &OutRecord) {
        let body = serde_json::json!({ "role": "source", "vm": r.vm, "state": r.state, "error": r.error });
        self.events.publish("migration", body);
    }
}

/// The record as the API shows it (no tokens).
fn shown(mut r: OutRecord) -> Value {
    for d in &mut r.disks {
        d.target = None;
    }
    to_json(r)
}

fn dest_err(e: ClientError) -> ApiError {
    match e {
        ClientError::Api { status, message, .. } if (400..500).contains(&status) => {
            ApiError::BadRequest(format!("The destination refused: {message}"))
        }
        e => ApiError::Internal(format!("The destination: {e}")),
    }
}

/// One request to the destination's control API, given up after 60 s (a
/// hung destination must not hold the migration, or a rollback, forever).
async fn call(dest: &Endpoint, method: &str, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
    match tokio::time::timeout(Duration::from_secs(60), super::client::call(dest, method, path, body)).await {
        Ok(answer) => answer,
        Err(_) => Err(ClientError::Http(format!("the destination did not answer {method} {path} within 60 s"))),
    }
}

/// Picks an NBD address of the destination reachable from here.
fn nbd_uri(prep: &Value, dest: &Endpoint, export: &str) -> Result<String, ApiError> {
    let s = if prep["nbd_tls"] == true { "s" } else { "" };
    let addrs: Vec<&str> = prep["nbd"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if let Some(tcp) = addrs.iter().find(|a| !a.starts_with("unix:")) {
        let host = match (tcp.rsplit_once(':'), dest) {
            (Some((ip, port)), Endpoint::Http(h) | Endpoint::Https(h, _)) if ip == "0.0.0.0" || ip == "[::]" => {
                format!("{}:{port}", h.rsplit_once(':').map_or(h.as_str(), |x| x.0))
            }
            _ => (*tcp).to_owned(),
        };
        return Ok(format!("nbd{s}://{host}/{export}"));
    }
    let unix = addrs
        .iter()
        .find_map(|a| a.strip_prefix("unix:"))
        .ok_or_else(|| ApiError::Internal("The destination serves NBD nowhere".into()))?;
    Ok(format!("nbd{s}+unix:///{export}?socket={unix}"))
}

impl Control {
    pub(super) fn outgoing(&self) -> Result<&OutgoingEnv, ApiError> {
        self.outgoing.get().ok_or_else(|| ApiError::Internal("migrations are not ready".into()))
    }

    /// A destination's control API, called with this agent's `migration:` credentials.
    fn destination(&self, to: &str) -> Result<Endpoint, String> {
        let endpoint: Endpoint = to.parse()?;
        Ok(match self.outgoing() {
            Ok(env) => endpoint.with_credentials(&env.credentials),
            Err(_) => endpoint,
        })
    }

    /// Whether the mirrors of `vm`'s outgoing migration may be paused or
    /// switched by hand: only an `auto` one, while it is still mirroring.
    pub(super) fn outgoing_tunable(&self, vm: &str) -> bool {
        let h = self.outgoing().ok().and_then(|env| env.handle(vm));
        h.is_some_and(|h| {
            let r = h.get();
            r.state == OutState::Mirroring && r.cutover == Cutover::Auto
        })
    }

    /// Every outgoing migration.
    pub(super) fn list_outgoing(&self) -> Result<Value, ApiError> {
        let env = self.outgoing()?;
        let map = env.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Value::Array(map.values().map(|h| shown(h.get())).collect()))
    }

    /// One outgoing migration; with `wait`, once its state differs from
    /// `wait` (or after `timeout`).
    pub(super) async fn show_outgoing(
        &self,
        vm: &str,
        wait: Option<OutState>,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let h =
            self.outgoing()?.handle(vm).ok_or_else(|| ApiError::NotFound(format!("No outgoing migration of {vm}")))?;
        if let Some(state) = wait {
            let mut changed = h.changed.subscribe();
            let deadline = tokio::time::Instant::now() + timeout;
            while h.get().state == state {
                if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                    break;
                }
            }
        }
        Ok(shown(h.get()))
    }

    /// `migration cutover VM`: starts the cut-over of a ready migration.
    pub(super) fn cutover_outgoing(&self, vm: &str) -> Result<Value, ApiError> {
        let h =
            self.outgoing()?.handle(vm).ok_or_else(|| ApiError::NotFound(format!("No outgoing migration of {vm}")))?;
        let r = h.get();
        if r.cutover == Cutover::FirstIo && !r.state.is_terminal() {
            // Its cut-over is the destination VM's first write; one asked for here while the VM
            // may still run on the source would be taken for that (and never rolled back).
            return Err(ApiError::Conflict(format!(
                "The migration of {vm} cuts over on the destination VM's first write (first-io); abort it \
                 and migrate with --cutover manual to cut over by hand"
            )));
        }
        match r.state {
            OutState::Mirroring | OutState::Ready | OutState::CuttingOver => {
                h.request.send_if_modified(|q| {
                    let changed = *q == Request::None;
                    if changed {
                        *q = Request::CutOver;
                    }
                    changed
                });
                Ok(shown(h.get()))
            }
            s => Err(ApiError::Conflict(format!("The migration of {vm} is {}", to_json(s).as_str().unwrap_or("?")))),
        }
    }

    /// `migration abort VM`: back to the source (before the cut-over).
    pub(super) fn abort_outgoing(&self, vm: &str) -> Result<Value, ApiError> {
        let h =
            self.outgoing()?.handle(vm).ok_or_else(|| ApiError::NotFound(format!("No outgoing migration of {vm}")))?;
        match h.get().state {
            OutState::Mirroring | OutState::Ready => {
                h.request.send_if_modified(|q| {
                    let changed = *q != Request::Abort;
                    *q = Request::Abort;
                    changed
                });
                Ok(shown(h.get()))
            }
            OutState::CuttingOver => Err(ApiError::Conflict(format!(
                "The migration of {vm} is cutting over; it ends completed or rolled back by itself"
            ))),
            s => Err(ApiError::Conflict(format!("The migration of {vm} is {}", to_json(s).as_str().unwrap_or("?")))),
        }
    }

    /// Starts an outgoing migration: checks, prepares the destination,
    /// starts the mirrors, and leaves the rest to a task of the agent.
    pub(super) async fn start_outgoing(self: &Arc<Self>, req: StartMigration) -> Result<Value, ApiError> {
        let env = self.outgoing()?;
        let dest: Endpoint = self.destination(&req.to).map_err(ApiError::BadRequest)?;
        let vm = self
            .vms
            .load()
            .iter()
            .find(|v| v.name == req.vm)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("No VM {} on this agent", req.vm)))?;
        if vm.disks.is_empty() {
            return Err(ApiError::BadRequest(format!("VM {} has no disks", req.vm)));
        }
        if env.handle(&req.vm).is_some_and(|h| !h.get().state.is_terminal()) {
            return Err(ApiError::Conflict(format!(
                "VM {} is being migrated already (see `rbdsync migration show`)",
                req.vm
            )));
        }
        if req.verify && req.cutover == Cutover::FirstIo {
            return Err(ApiError::BadRequest(
                "--verify reads both disks in full during the cut-over, while the resumed VM's first write waits \
                 (and times out): use it with --cutover auto or manual"
                    .into(),
            ));
        }
        let speed = req.speed.as_ref().map(Size::bytes).transpose()?.unwrap_or(0);
        let ready_threshold = req.ready_threshold.as_ref().map(Size::bytes).transpose()?.unwrap_or(16 << 20);
        // Every disk is checked before anything is created anywhere.
        let mut disks = Vec::new();
        for d in &vm.disks {
            let name = format!("{}/{}", vm.name, d.name);
            let export = self.disk(&name)?;
            if export.read_only() {
                return Err(ApiError::Conflict(format!(
                    "{name} is read-only here (fenced, or read_only): nothing to migrate"
                )));
            }
            if let Some(job) = self.jobs.active_on(&name) {
                return Err(crate::jobs::JobControlError::Busy { disk: name, job }.into());
            }
            let chain = if req.full {
                None
            } else {
                let chain = self.chain(&name, req.bitmap.clone()).await.map_err(|e| {
                    ApiError::BadRequest(format!(
                        "{name}: cannot mirror incrementally: {e}; back the disk up first, or migrate --full"
                    ))
                })?;
                if chain["matches"] != true {
                    return Err(ApiError::BadRequest(format!(
                        "{name}: cannot mirror incrementally: {}; back the disk up first (rbdsync backup {name}), or migrate --full",
                        chain["reason"].as_str().unwrap_or("?")
                    )));
                }
                // The destination layers on the snapshot, which has the size the disk had then.
                if chain["latest_size"].as_u64() != Some(export.size()) {
                    return Err(ApiError::BadRequest(format!(
                        "{name}: cannot mirror incrementally: the disk grew to {} bytes since backup {} ({} bytes); back it up first (rbdsync backup {name}), or migrate --full",
                        export.size(),
                        chain["latest"].as_str().unwrap_or("?"),
                        chain["latest_size"]
                    )));
                }
                Some(chain)
            };
            disks.push((d.clone(), export, chain));
        }
        let prepare = json!({
            "vm": vm.name,
            "allow": vm.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "disks": disks.iter().map(|(d, export, chain)| {
                let image = req.dest_image.as_ref().map(|t| t.replace("{vm}", &vm.name).replace("{disk}", &d.name));
                let bitmaps: Vec<Value> = export.bitmaps().list().iter().filter(|b| b.consistent).map(|b| {
                    let mut v = json!({ "name": b.name, "granularity": b.granularity, "enabled": b.recording });
                    // The bitmap the chain was checked with continues on the destination.
                    if chain.as_ref().is_some_and(|c| c["bitmap"] == b.name.as_str()) {
                        v["uuid"] = b.uuid.clone().into();
                        v["generation"] = b.generation.into();
                    }
                    v
                }).collect();
                let mut disk = json!({
                    "name": d.name, "image": image, "size": export.size(), "bitmaps": bitmaps,
                    "intent_region": d.intent_region,
                    "backing": chain.as_ref().map(|c| c["backing"].clone()),
                });
                if let Some(b) = &d.backup {
                    disk["backup"] = json!({ "target": b.target.to_string(), "bitmap": b.bitmap, "keep": b.keep });
                }
                disk
            }).collect::<Vec<_>>(),
        });
        let h = Handle::new(OutRecord {
            vm: vm.name.clone(),
            to: req.to.clone(),
            id: None,
            cutover: req.cutover,
            state: OutState::Mirroring,
            full: req.full,
            verify: req.verify,
            stream: req.stream.unwrap_or(true),
            speed,
            disks: disks
                .iter()
                .map(|(d, e, chain)| OutDisk {
                    disk: format!("{}/{}", vm.name, d.name),
                    bitmap: chain.as_ref().and_then(|c| c["bitmap"].as_str().map(str::to_owned)),
                    expect: chain.as_ref().map(|c| c["bitmap_state"].clone()).filter(|v| !v.is_null()),
                    job: None,
                    target: None,
                    bytes_sent: 0,
                    initial_dirty_bytes: 0,
                    disk_size: e.size(),
                    downtime_ms: None,
                    fenced: false,
                })
                .collect(),
            created_at: unix_now(),
            updated_at: 0,
            downtime_ms: None,
            duration_ms: None,
            stream_jobs: Value::Array(vec![]),
            error: None,
            fence_due: false,
        });
        {
            let mut map = env.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&vm.name).is_some_and(|h| !h.get().state.is_terminal()) {
                return Err(ApiError::Conflict(format!("VM {} is being migrated already", vm.name)));
            }
            map.insert(vm.name.clone(), h.clone());
        }
        // Recorded first: a restart at any later step finds it (and aborts the destination).
        let created = env.save(&h, |_| {})?;
        env.publish(&created);
        let prep = match call(&dest, "POST", "/v1/migrations", Some(prepare)).await {
            Ok(p) => p,
            Err(e) => {
                let e = dest_err(e);
                let _ = env.save(&h, |r| {
                    r.state = OutState::Failed;
                    r.error = Some(format!("preparing the destination failed: {e}"));
                });
                return Err(e);
            }
        };
        let id = prep["id"].as_str().unwrap_or_default().to_owned();
        let mut targets = Vec::new();
        for (d, _, _) in &disks {
            let name = format!("{}/{}", vm.name, d.name);
            let export = prep["disks"].as_array().into_iter().flatten().find(|x| x["disk"] == name.as_str());
            targets.push(nbd_uri(&prep, &dest, export.and_then(|x| x["export"].as_str()).unwrap_or_default())?);
        }
        env.save(&h, |r| {
            r.id = Some(id.clone());
            for (d, t) in r.disks.iter_mut().zip(&targets) {
                d.target = Some(t.clone());
            }
        })?;
        let group = CutOverGroup::new(disks.len());
        let mut jobs = Vec::new();
        let mut failed = None;
        for ((d, export, chain), target) in disks.iter().zip(&targets) {
            let name = format!("{}/{}", vm.name, d.name);
            let params = MirrorParams {
                target: target.clone(),
                sync: if chain.is_some() { MirrorSync::Incremental } else { MirrorSync::Full },
                bitmap: chain.as_ref().and_then(|c| c["bitmap"].as_str().map(str::to_owned)),
                copy_mode: req.copy_mode.unwrap_or(CopyMode::Background),
                ready_threshold,
                expect: chain.as_ref().and_then(|c| serde_json::from_value(c["bitmap_state"].clone()).ok()),
                reconnect_secs: self.env.mirror_reconnect_secs,
            };
            let (nbd, export, group) = (self.env.nbd_client(), export.clone(), group.clone());
            // Mirrors take no slot of jobs.max_running (they live until their cut-over).
            match self.jobs.start_with("mirror", &name, to_json(&params), speed, Exempt, move |handle| {
                mirror::run(handle, export, params, nbd, Some(group))
            }) {
                Ok(job) => {
                    let id = job.record().id;
                    // `migration cutover` completes it (with the VM's other disks), not `job complete`.
                    let _ = self.jobs.set_setting(&id, "migration", json!(vm.name));
                    jobs.push(id);
                }
                Err(e) => {
                    failed = Some(ApiError::from(e));
                    break;
                }
            }
        }
        let saved = env.save(&h, |r| {
            for (d, j) in r.disks.iter_mut().zip(&jobs) {
                d.job = Some(j.clone());
            }
        });
        if let Some(e) = failed.or(saved.err()) {
            self.roll_back(&h, OutState::Failed, format!("starting the mirrors failed: {e}")).await;
            return Err(e);
        }
        tracing::info!(vm = %vm.name, migration = %id, cutover = ?req.cutover, "outgoing migration started");
        let me = self.clone();
        let driven = h.clone();
        tokio::spawn(async move { me.drive(driven).await });
        Ok(shown(h.get()))
    }

    /// Runs a migration from its mirrors to its end.
    async fn drive(self: Arc<Self>, h: Arc<Handle>) {
        let started = Instant::now();
        let vm = h.get().vm;
        let outcome = self.converge_and_wait(&h).await;
        let result = match outcome {
            Ok(()) => self.cut_over(&h).await,
            Err(e) => Err(e),
        };
        if let Err((state, e)) = result {
            let r = h.get();
            if r.cutover == Cutover::FirstIo && r.state == OutState::Ready {
                // The destination may lack a write whose forward failed: its reads wait from now on.
                if let (Ok(dest), Some(id)) = (self.destination(&r.to), &r.id) {
                    let _ = call(&dest, "DELETE", &format!("/v1/migrations/{id}/synced"), None).await;
                }
            }
            let past_trigger = r.cutover == Cutover::FirstIo
                && (r.state == OutState::CuttingOver
                    || (r.state == OutState::Ready && self.destination_took_first_io(&r).await));
            if past_trigger {
                // Past the first-io trigger the VM runs on the destination: forward, not back.
                tracing::warn!(vm = %vm, error = %e, "the first-io cut-over failed; mirroring again");
                self.roll_forward_until_done(&h).await;
            } else {
                tracing::warn!(vm = %vm, error = %e, "outgoing migration rolled back");
                self.roll_back(&h, state, e).await;
            }
        }
        if let Ok(env) = self.outgoing() {
            let _ = env.save(&h, |r| r.duration_ms = Some(crate::jobs::millis(started.elapsed())));
        }
    }

    /// Whether every mirror reports the destination in sync.
    fn all_in_sync(&self, h: &Handle) -> bool {
        Self::jobs_of(h).iter().all(|(_, id)| {
            self.jobs.get(id).is_ok_and(|j| {
                let r = j.record();
                r.state != JobState::Concluded && r.detail["in_sync"] == true
            })
        })
    }

    fn jobs_of(h: &Handle) -> Vec<(String, String)> {
        h.get().disks.iter().filter_map(|d| Some((d.disk.clone(), d.job.clone()?))).collect()
    }

    /// Until every mirror is ready (then write-blocking), and the trigger.
    async fn converge_and_wait(&self, h: &Arc<Handle>) -> Result<(), (OutState, String)> {
        let env = self.outgoing().map_err(|e| (OutState::Failed, e.to_string()))?;
        let r = h.get();
        let mut request = h.request.subscribe();
        let mut first_io: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
        let mut blocking = false;
        let result = loop {
            let mut ready = 0;
            let mut ended = None;
            for (disk, id) in Self::jobs_of(h) {
                let rec = match self.jobs.get(&id) {
                    Ok(job) => job.record(),
                    Err(e) => {
                        ended = Some(format!("the mirror of {disk} is gone: {e}"));
                        break;
                    }
                };
                match rec.state {
                    // A mirror that ended (failed, cancelled by hand) ends the migration.
                    JobState::Concluded => {
                        ended = Some(format!("the mirror of {disk} ended: {}", rec.error.unwrap_or_default()));
                        break;
                    }
                    JobState::Ready => ready += 1,
                    _ => {}
                }
            }
            if let Some(e) = ended {
                break Err((OutState::Failed, e));
            }
            let all_ready = ready == r.disks.len();
            if all_ready && !blocking && r.cutover != Cutover::Auto {
                // Write-blocking from here on: every write acknowledged from now is on the destination too.
                for (_, id) in Self::jobs_of(h) {
                    let _ = self.jobs.set_setting(&id, "copy_mode", to_json(CopyMode::WriteBlocking));
                }
                blocking = true;
            }
            // Ready for a trigger once the destination holds every acknowledged write and keeps
            // doing so (it then serves reads by the disks' own names: the incoming QEMU's probes).
            let mut in_sync = all_ready && (r.cutover == Cutover::Auto || self.all_in_sync(h));
            if in_sync && h.get().state == OutState::Mirroring && r.cutover != Cutover::Auto {
                // From here a mirror that loses its destination fails instead of reconnecting: the
                // destination serves reads as in sync. A mirror reconnecting shows it before it
                // checks this setting, so one of the two sees the other.
                for (_, id) in Self::jobs_of(h) {
                    let _ = self.jobs.set_setting(&id, "synced", json!(true));
                }
                if !self.all_in_sync(h) {
                    for (_, id) in Self::jobs_of(h) {
                        let _ = self.jobs.set_setting(&id, "synced", json!(false));
                    }
                    in_sync = false;
                }
            }
            if in_sync && h.get().state == OutState::Mirroring {
                if r.cutover != Cutover::Auto {
                    let id = r.id.clone().unwrap_or_default();
                    let dest: Result<Endpoint, String> = self.destination(&r.to);
                    let told = match dest {
                        Ok(dest) => call(&dest, "POST", &format!("/v1/migrations/{id}/synced"), None)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = told {
                        break Err((OutState::Failed, format!("the destination did not take the in-sync notice: {e}")));
                    }
                }
                if let Err(e) = env.save(h, |r| r.state = OutState::Ready) {
                    break Err((OutState::Failed, e.to_string()));
                }
                tracing::info!(vm = %r.vm, "outgoing migration ready: every mirror converged, write-blocking");
                if r.cutover == Cutover::FirstIo {
                    let (dest, id) = (self.destination(&r.to), r.id.clone().unwrap_or_default());
                    first_io = Some(tokio::spawn(async move { wait_first_io(dest, &id).await }));
                }
            }
            let requested = *request.borrow_and_update();
            match requested {
                Request::Abort => break Err((OutState::Aborted, "aborted (migration abort)".into())),
                Request::CutOver if all_ready => break Ok(()),
                _ => {}
            }
            if in_sync && r.cutover == Cutover::Auto {
                break Ok(());
            }
            if let Some(task) = first_io.as_mut().filter(|t| t.is_finished()) {
                match task.await {
                    Ok(Ok(())) => {
                        tracing::info!(vm = %r.vm, "the destination took its first IO: cutting over");
                        break Ok(());
                    }
                    // The destination's migration was aborted (or completed elsewhere): this one cannot go on.
                    Ok(Err(e)) if e.starts_with(FATAL) => {
                        break Err((OutState::Failed, e.trim_start_matches(FATAL).to_owned()));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(vm = %r.vm, error = %e, "watching the destination for its first IO failed; retrying")
                    }
                    Err(e) => tracing::warn!(vm = %r.vm, error = %e, "first-IO watcher ended"),
                }
                let (dest, id) = (self.destination(&r.to), r.id.clone().unwrap_or_default());
                tokio::time::sleep(Duration::from_millis(200)).await;
                first_io = Some(tokio::spawn(async move { wait_first_io(dest, &id).await }));
                continue;
            }
            tokio::select! {
                _ = request.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(if all_ready { 5 } else { 50 })) => {}
            }
        };
        if let Some(task) = first_io {
            task.abort();
        }
        result
    }

    /// The cut-over: all disks at once, then fences, then the destination.
    async fn cut_over(&self, h: &Arc<Handle>) -> Result<(), (OutState, String)> {
        let env = self.outgoing().map_err(|e| (OutState::Failed, e.to_string()))?;
        let trigger = Instant::now();
        let r = env.save(h, |r| r.state = OutState::CuttingOver).map_err(|e| (OutState::Failed, e.to_string()))?;
        tracing::info!(vm = %r.vm, "outgoing migration cutting over");
        let jobs = Self::jobs_of(h);
        for (_, id) in &jobs {
            let _ = self.jobs.set_setting(id, "copy_mode", to_json(CopyMode::WriteBlocking));
            // A mirror paused by hand (an auto migration allows it) runs on to its cut-over.
            let _ = self.jobs.resume(id);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.jobs.get(id).is_ok_and(|j| j.record().state == JobState::Paused) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Err(e) = self.jobs.complete(id) {
                return Err((OutState::Failed, format!("completing mirror {id}: {e}")));
            }
        }
        let mut failures = Vec::new();
        let mut summaries = Vec::new();
        for (disk, id) in &jobs {
            let rec = match self.jobs.get(id) {
                Ok(job) => job.wait().await,
                Err(e) => return Err((OutState::Failed, e.to_string())),
            };
            if rec.result != Some(crate::jobs::JobResult::Success) {
                failures.push(format!("{disk}: {}", rec.error.unwrap_or_default()));
            }
            summaries.push(rec.summary);
        }
        let _ = env.save(h, |r| {
            for (d, s) in r.disks.iter_mut().zip(&summaries) {
                d.bytes_sent = s["bytes_sent"].as_u64().unwrap_or(0);
                d.initial_dirty_bytes = s["initial_dirty_bytes"].as_u64().unwrap_or(0);
                d.downtime_ms = s["downtime_ms"].as_u64();
            }
        });
        if !failures.is_empty() {
            return Err((OutState::Failed, format!("the cut-over failed: {}", failures.join("; "))));
        }
        // Every source disk is read-only now (all together); the destination has every write.
        let dest: Endpoint = self.destination(&r.to).map_err(|e: String| (OutState::Failed, e))?;
        let id = r.id.clone().unwrap_or_default();
        if r.verify {
            for d in &r.disks {
                if let Err(e) = self.verify_against(d).await {
                    return Err((OutState::Failed, format!("verification of {} failed: {e}", d.disk)));
                }
            }
        }
        // Fenced durably before the destination goes live: "source fenced, destination
        // hidden" is recoverable; "both writable" never happens.
        for d in &r.disks {
            if let Err(e) = self.fence(&d.disk, &format!("{} {id}", r.to)) {
                return Err((OutState::Failed, format!("fencing {}: {e}", d.disk)));
            }
            // Recorded, or the destination is not asked to go live: a restart decides from
            // these marks whether it may complete the destination.
            let saved = env.save(h, |r| {
                if let Some(x) = r.disks.iter_mut().find(|x| x.disk == d.disk) {
                    x.fenced = true;
                }
            });
            if let Err(e) = saved {
                return Err((OutState::Failed, format!("recording the fence of {}: {e}", d.disk)));
            }
        }
        self.activate_destination(h, &dest, &id, trigger).await
    }

    /// Asks the destination to go live; on a definite "no" the source takes
    /// its disks back, on no answer it keeps asking (the disks stay fenced).
    async fn activate_destination(
        &self,
        h: &Arc<Handle>,
        dest: &Endpoint,
        id: &str,
        trigger: Instant,
    ) -> Result<(), (OutState, String)> {
        let env = self.outgoing().map_err(|e| (OutState::Failed, e.to_string()))?;
        let r = h.get();
        let body = json!({ "stream": r.stream, "speed": r.speed });
        let mut delay = Duration::from_millis(100);
        loop {
            let answer = call(dest, "POST", &format!("/v1/migrations/{id}/complete"), Some(body.clone())).await;
            let active = match answer {
                Ok(active) => Some(active),
                Err(e) => match call(dest, "GET", &format!("/v1/migrations/{id}"), None).await {
                    Ok(m) if m["state"] == "active" => Some(m),
                    // Still prepared after a refused complete: abort it there, then take the disks
                    // back; never after a first-io trigger (the VM runs there): keep asking.
                    Ok(m) if m["state"] == "prepared" && r.cutover != Cutover::FirstIo => {
                        if call(dest, "POST", &format!("/v1/migrations/{id}/abort"), None).await.is_ok() {
                            return Err((OutState::Failed, format!("the destination did not activate: {e}")));
                        }
                        None
                    }
                    Ok(m) if m["state"] == "aborted" || m["state"] == "aborting" => {
                        return Err((OutState::Failed, format!("the destination aborted the migration: {e}")))
                    }
                    other => {
                        tracing::warn!(migration = %id, error = %e, answer = ?other.err(), "the destination did not answer; the source stays fenced, retrying");
                        None
                    }
                },
            };
            if let Some(active) = active {
                let downtime = crate::jobs::millis(trigger.elapsed());
                let _ = env.save(h, |r| {
                    r.state = OutState::Completed;
                    r.downtime_ms = Some(downtime);
                    r.stream_jobs = active["stream_jobs"].clone();
                });
                tracing::info!(vm = %r.vm, migration = %id, downtime_ms = downtime, "outgoing migration completed");
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Compares a source disk (read-only now) with its destination.
    async fn verify_against(&self, d: &OutDisk) -> Result<(), String> {
        let against = d.target.clone().ok_or("no target")?;
        // Never queued nor held to the shared rate: the VM's disks are read-only until it ends.
        let started = self
            .start_verify(&d.disk, against, 0, crate::jobs::limits::Admission::Urgent)
            .map_err(|e| e.to_string())?;
        let id = started["id"].as_str().unwrap_or_default().to_owned();
        let rec = self.jobs.get(&id).map_err(|e| e.to_string())?.wait().await;
        if rec.result == Some(crate::jobs::JobResult::Success) {
            Ok(())
        } else {
            Err(rec.error.unwrap_or_default())
        }
    }

    /// Back to the source: mirrors end, the destination is aborted, the
    /// source disks are unfenced and writable. Only before the destination
    /// went live (callers make sure; a destination found live keeps the
    /// source fenced instead, see [`keep_fenced`](Self::keep_fenced)).
    async fn roll_back(&self, h: &Arc<Handle>, state: OutState, error: String) {
        let Ok(env) = self.outgoing() else { return };
        let r = h.get();
        for (_, id) in Self::jobs_of(h) {
            let _ = self.jobs.cancel(&id);
        }
        let mut notes = vec![error.clone()];
        if let (Some(id), Ok(dest)) = (&r.id, self.destination(&r.to)) {
            // Never hand the disks back while the destination serves them.
            let there = call(&dest, "GET", &format!("/v1/migrations/{id}"), None).await;
            if there.as_ref().is_ok_and(|m| m["state"] == "active") {
                self.keep_fenced(h, error).await;
                return;
            }
            // Aborted at once (before the mirrors are waited for): a destination VM that resumes
            // from now on finds no disk instead of having its first write taken and then failed.
            if let Err(e) = call(&dest, "POST", &format!("/v1/migrations/{id}/abort"), None).await {
                let state = call(&dest, "GET", &format!("/v1/migrations/{id}"), None).await.map(|m| m["state"].clone());
                if matches!(&state, Ok(s) if s == "active") {
                    self.keep_fenced(h, error).await;
                    return;
                }
                if !matches!(state, Ok(s) if s == "aborted") {
                    notes.push(format!("the destination could not be aborted ({e}); a retry of migrate replaces it"));
                }
            }
        }
        for (_, id) in Self::jobs_of(h) {
            if let Ok(job) = self.jobs.get(&id) {
                let _ = tokio::time::timeout(Duration::from_secs(60), job.wait()).await;
            }
        }
        for d in &r.disks {
            // Writable again: the mirror ended before the cut-over, or the cut-over failed as a group.
            if let Err(e) = self.unfence(&d.disk) {
                notes.push(format!("{} could not be unfenced: {e}", d.disk));
            }
        }
        let _ = env.save(h, |r| {
            r.state = state;
            r.error = Some(notes.join("; "));
            for d in &mut r.disks {
                d.fenced = false;
            }
        });
    }

    /// The destination serves the disks (activated outside this migration):
    /// the migration fails, the mirrors end, and the source disks stay
    /// read-only and fenced, across restarts too (`fence_due`).
    async fn keep_fenced(&self, h: &Arc<Handle>, error: String) {
        let Ok(env) = self.outgoing() else { return };
        let r = h.get();
        let id = r.id.clone().unwrap_or_default();
        let _ = env.save(h, |r| r.fence_due = true);
        for d in &r.disks {
            if let Ok(export) = self.disk(&d.disk) {
                export.set_read_only();
            }
            if let Err(e) = self.fence(&d.disk, &format!("{} {id}", r.to)) {
                tracing::error!(disk = %d.disk, error = %e, "cannot fence a disk the destination serves");
            }
        }
        for (_, job) in Self::jobs_of(h) {
            let _ = self.jobs.cancel(&job);
        }
        tracing::error!(vm = %r.vm, "rollback refused: the destination serves the disks; the source is fenced");
        let note = "the destination is live (activated outside this migration): the source stays fenced";
        let _ = env.save(h, |r| {
            r.state = OutState::Failed;
            r.error = Some(format!("{error}; {note}"));
        });
    }

    /// Whether a client wrote on the destination's incoming exports (the
    /// destination records it once the source was told, so its own restart
    /// does not forget it). An unreachable destination is asked again for
    /// a minute; then the answer counts as no (the migration rolls back).
    async fn destination_took_first_io(&self, r: &OutRecord) -> bool {
        let (Ok(dest), Some(id)) = (self.destination(&r.to), &r.id) else { return false };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match call(&dest, "GET", &format!("/v1/migrations/{id}/first-io?wait=0"), None).await {
                Ok(answer) => return answer["first_io"] == true,
                Err(e) if Instant::now() > deadline => {
                    tracing::error!(vm = %r.vm, error = %e, "the destination does not answer whether its VM resumed; rolling back");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(vm = %r.vm, error = %e, "asking the destination whether its VM resumed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// Finishes a first-io cut-over that failed or that the agent was
    /// killed in. QEMU's migration is over then: the VM runs on the
    /// destination, whose first write waits, so a rollback would fail the
    /// VM. Every attempt mirrors every disk again (see [`roll_forward`]);
    /// a failed one is retried with backoff. Only a destination whose
    /// migration ended there (aborted, or activated by another hand) ends
    /// it in a rollback, which keeps the source fenced if it is live.
    ///
    /// [`roll_forward`]: Self::roll_forward
    async fn roll_forward_until_done(self: &Arc<Self>, h: &Arc<Handle>) {
        let mut delay = Duration::from_secs(2);
        let mut attempts = 0;
        loop {
            self.cancel_mirrors(h).await;
            // After two failed attempts, whole disks (an incremental seed that keeps failing,
            // an inconsistent bitmap say, must not hold the VM forever).
            let Err((_, e)) = self.roll_forward(h, attempts >= 2).await else { return };
            attempts += 1;
            let r = h.get();
            if let (Ok(dest), Some(id)) = (self.destination(&r.to), &r.id) {
                if let Ok(m) = call(&dest, "GET", &format!("/v1/migrations/{id}"), None).await {
                    if m["state"] == "active" {
                        // Live there by another hand: the source stays fenced (never unfenced on a
                        // second look that might fail).
                        self.keep_fenced(h, e).await;
                        return;
                    }
                    if m["state"] == "aborted" || m["state"] == "aborting" {
                        self.roll_back(h, OutState::Failed, format!("{e}; the destination aborted the migration"))
                            .await;
                        return;
                    }
                }
            }
            tracing::error!(vm = %r.vm, error = %e, retry_in = ?delay, "completing the cut-over after a first-io trigger failed; the source stays read-only, retrying");
            if let Ok(env) = self.outgoing() {
                let _ = env.save(h, |r| r.error = Some(format!("{e}; retrying in {} s", delay.as_secs())));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }

    /// Cancels the migration's mirrors and waits for them to end.
    async fn cancel_mirrors(&self, h: &Arc<Handle>) {
        for (_, id) in Self::jobs_of(h) {
            let _ = self.jobs.cancel(&id);
        }
        for (_, id) in Self::jobs_of(h) {
            if let Ok(job) = self.jobs.get(&id) {
                let _ = tokio::time::timeout(Duration::from_secs(60), job.wait()).await;
            }
        }
    }

    /// One attempt at a first-io cut-over after a failure or a restart.
    /// What the destination holds is not trusted (a forward may have failed
    /// just before a kill, a manual cut-over request may have come before
    /// the mirrors were in sync, nothing was flushed): the destination stops
    /// serving reads, every disk is made read-only once its in-flight
    /// writes drained, and mirrored again into the same incoming target,
    /// from the bitmap the destination's backing matches (its state as
    /// recorded at the start: every write since that backup, those since a
    /// restart included) or, if that bitmap moved on, whole. The usual cut-over follows: the
    /// destination flushed, the fences written durably, the destination
    /// activated, and its held first write runs.
    async fn roll_forward(self: &Arc<Self>, h: &Arc<Handle>, whole: bool) -> Result<(), (OutState, String)> {
        let failed = |e: &dyn std::fmt::Display| (OutState::Failed, e.to_string());
        let env = self.outgoing().map_err(|e| failed(&e))?;
        let r = env
            .save(h, |r| {
                r.state = OutState::CuttingOver;
                r.error = Some("completing a first-io cut-over: mirroring again".into());
            })
            .map_err(|e| failed(&e))?;
        let dest: Endpoint = self.destination(&r.to).map_err(|e: String| failed(&e))?;
        let id = r.id.clone().unwrap_or_default();
        // The resumed VM's reads wait too until the destination has every block again.
        call(&dest, "DELETE", &format!("/v1/migrations/{id}/synced"), None)
            .await
            .map_err(|e| failed(&format!("withdrawing the in-sync report: {e}")))?;
        let mut exports = Vec::new();
        for d in &r.disks {
            let export = self.disk(&d.disk).map_err(|e| failed(&e))?;
            let held = export.quiesce().await;
            export.set_read_only();
            drop(held);
            exports.push(export);
        }
        let group = CutOverGroup::new(r.disks.len());
        for (i, (d, export)) in r.disks.iter().zip(&exports).enumerate() {
            let target = d.target.clone().ok_or_else(|| failed(&format!("{}: no mirror target recorded", d.disk)))?;
            // Incremental while the bitmap is still where the destination's backing has it (the
            // mirror checks it again under its drain); whole disks otherwise.
            let expect: Option<BitmapState> =
                d.expect.clone().and_then(|v| serde_json::from_value(v).ok()).filter(|e: &BitmapState| {
                    let now = d.bitmap.as_ref().and_then(|b| export.bitmaps().get(b).ok());
                    !whole && !r.full && now.is_some_and(|b| b.uuid() == e.uuid && b.generation() == e.generation)
                });
            let bitmap = d.bitmap.clone().filter(|_| expect.is_some());
            let params = MirrorParams {
                target,
                sync: if bitmap.is_some() { MirrorSync::Incremental } else { MirrorSync::Full },
                bitmap,
                copy_mode: CopyMode::Background,
                ready_threshold: 16 << 20,
                // Checked under the drain that seeds the mirror: a bitmap that moved on since
                // the start (a backup committed after the restart) refuses, and the next
                // attempt copies whole disks.
                expect,
                reconnect_secs: self.env.mirror_reconnect_secs,
            };
            let (nbd, export, group) = (self.env.nbd_client(), export.clone(), group.clone());
            let job = self
                .jobs
                .start_with("mirror", &d.disk, to_json(&params), 0, Exempt, move |handle| {
                    mirror::run(handle, export, params, nbd, Some(group))
                })
                .map_err(|e| failed(&e))?;
            let job_id = job.record().id;
            let _ = self.jobs.set_setting(&job_id, "migration", json!(r.vm));
            // Recorded at once: a later failure cancels it with the others.
            if let Err(e) = env.save(h, |r| r.disks[i].job = Some(job_id.clone())) {
                let _ = self.jobs.cancel(&job_id);
                return Err(failed(&e));
            }
        }
        // Nothing writes the source any more: the mirrors only copy, then cut over together.
        loop {
            let mut ready = 0;
            for (disk, job_id) in Self::jobs_of(h) {
                let rec = self.jobs.get(&job_id).map_err(|e| failed(&e))?.record();
                match rec.state {
                    JobState::Concluded => {
                        return Err(failed(&format!(
                            "mirroring {disk} again failed: {}",
                            rec.error.unwrap_or_default()
                        )))
                    }
                    JobState::Ready => ready += 1,
                    _ => {}
                }
            }
            if ready == r.disks.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.cut_over(h).await
    }

    /// After a restart: every migration that was not over is ended.
    pub async fn recover_outgoing(self: &Arc<Self>) {
        let Ok(env) = self.outgoing() else { return };
        let open: Vec<Arc<Handle>> = {
            let map = env.map.lock().unwrap_or_else(|p| p.into_inner());
            map.values().filter(|h| !h.get().state.is_terminal()).cloned().collect()
        };
        for h in open {
            let r = h.get();
            let all_fenced = r.state == OutState::CuttingOver && r.disks.iter().all(|d| d.fenced);
            let me = self.clone();
            if r.cutover == Cutover::FirstIo
                && matches!(r.state, OutState::Ready | OutState::CuttingOver)
                && !all_fenced
            {
                // A first-io trigger means QEMU's migration completed: the VM runs on the
                // destination, whose first write waits for this cut-over. A rollback would fail
                // that write (and the source QEMU is stopped): go forward if it came.
                tokio::spawn(async move {
                    let triggered = r.state == OutState::CuttingOver || me.destination_took_first_io(&r).await;
                    if triggered {
                        tracing::warn!(vm = %r.vm, "the agent restarted after a first-io trigger: completing the cut-over");
                        me.roll_forward_until_done(&h).await;
                    } else {
                        me.roll_back(&h, OutState::Aborted, "the source agent restarted before the cut-over".into())
                            .await;
                    }
                });
            } else if all_fenced {
                // Every disk had cut over and was fenced: the destination has every write.
                tracing::warn!(vm = %r.vm, "resuming an outgoing migration after a restart: activating the destination");
                tokio::spawn(async move {
                    let (dest, id) = (me.destination(&r.to), r.id.clone().unwrap_or_default());
                    let Ok(dest) = dest else { return };
                    if let Err((state, e)) = me.activate_destination(&h, &dest, &id, Instant::now()).await {
                        me.roll_back(&h, state, e).await;
                    }
                });
            } else {
                tracing::warn!(vm = %r.vm, state = ?r.state, "the agent restarted during an outgoing migration: rolling it back");
                tokio::spawn(async move {
                    me.roll_back(
                        &h,
                        OutState::Aborted,
                        "the source agent restarted before the cut-over completed".into(),
                    )
                    .await;
                });
            }
        }
    }
}

/// Marks an error of [`wait_first_io`] that ends the migration.
const FATAL: &str = "fatal: ";

/// Long-polls the destination until a client sent IO on one of the
/// migration's incoming exports.
async fn wait_first_io(dest: Result<Endpoint, String>, id: &str) -> Result<(), String> {
    let dest = dest?;
    loop {
        let asked = Instant::now();
        let answer = call(&dest, "GET", &format!("/v1/migrations/{id}/first-io?wait=20"), None)
            .await
            .map_err(|e| e.to_string())?;
        if answer["first_io"] == true {
            return Ok(());
        }
        if answer["state"] != "prepared" {
            // Aborted there (or completed by someone else): this migration cannot go on.
            return Err(format!("{FATAL}the destination's migration is {} (not by this source)", answer["state"]));
        }
        // A long poll that came back early (the destination restarted, say) is not retried hot.
        if asked.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
