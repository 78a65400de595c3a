//! Incoming migrations (the destination side of `rbdsync migrate`).
//!
//! `prepare` creates each disk as a child layered on the given backup
//! snapshot, writes the VM file, and serves the disks hidden: only
//! `migration/TOKEN/VM/DISK` reaches them, so only the source (which got the
//! one-time token) can write. `complete` serves them under their own names
//! and starts the stream jobs; `abort` removes what `prepare` created.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{to_json, ApiError, Control, Size};
use crate::config::{check_name, ImageUri};
use crate::export::{Incoming, MIGRATION_PREFIX};
use crate::jobs::holds;
use crate::jobs::stream::{self, StreamParams};
use crate::jobs::unix_now;

/// Asks the daemon to re-read the VM files; answers with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// What the migration endpoints need from the daemon.
#[derive(Debug)]
pub struct MigrationEnv {
    /// Where VM files are written.
    pub vms_dir: Option<PathBuf>,
    /// Where destination images go by default.
    pub images_dir: PathBuf,
    /// Incoming tokens by disk.
    pub incoming: Arc<Incoming>,
    /// Triggers a reload of the VM files.
    pub reload: mpsc::Sender<ReloadRequest>,
    /// NBD addresses this agent serves on.
    pub nbd: ArcSwap<Vec<String>>,
    /// Whether the source should connect with TLS (`nbds://`).
    pub nbd_tls: bool,
    /// Migrations by id (with their tokens), persisted in `dir`.
    pub records: Mutex<BTreeMap<String, Value>>,
    /// `STATE_DIR/migrations`.
    pub dir: PathBuf,
    /// `STATE_DIR` (a restore removes stale bitmaps under it).
    pub state_dir: PathBuf,
    /// Held through each prepare, complete and abort: they check a record's
    /// state and then act on it, so two of them must never interleave.
    pub steps: tokio::sync::Mutex<()>,
    /// Where state changes are published.
    pub events: crate::events::Events,
}

impl MigrationEnv {
    /// Loads persisted migrations; prepared ones get their disks hidden
    /// again (so a restart never exposes a half-copied destination).
    pub fn load_records(dir: &std::path::Path, incoming: &Incoming) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
            let Ok(record) = serde_json::from_str::<Value>(&text) else { continue };
            let Some(id) = record["id"].as_str().map(str::to_owned) else { continue };
            // `aborting`: killed while undoing; the VM file may still be there.
            if record["state"] == "prepared" || record["state"] == "aborting" {
                let token = record["token"].as_str().unwrap_or_default();
                for d in record["disks"].as_array().into_iter().flatten() {
                    if let Some(disk) = d["disk"].as_str() {
                        incoming.insert(disk, token);
                    }
                }
            }
            out.insert(id, record);
        }
        out
    }

    /// Writes a record durably, then shows it; a record that could not be
    /// written fails the step (a restart must find what the agent did).
    fn save(&self, record: &Value) -> Result<(), ApiError> {
        let id = record["id"].as_str().ok_or_else(|| ApiError::Internal("migration record without id".into()))?;
        let path = self.dir.join(format!("{id}.json"));
        crate::durable::write_file(&path, record.to_string().as_bytes())
            .map_err(|e| ApiError::Internal(format!("Cannot persist migration record {}: {e}", path.display())))?;
        self.records.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), record.clone());
        let body = serde_json::json!({ "role": "destination", "id": id, "vm": record["vm"], "state": record["state"] });
        self.events.publish("migration", body);
        Ok(())
    }
}

/// Body of `POST /v1/migrations`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Prepare {
    /// VM name.
    pub vm: String,
    /// Its disks.
    pub disks: Vec<IncomingDisk>,
    /// The VM's `allow` list (who may open its disks once they are here).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// One disk of an incoming migration, with the state it carries over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingDisk {
    /// Disk name.
    pub name: String,
    /// Backup snapshot to layer on (`rbd:pool/img@snap` or `file:/x@snap`);
    /// absent: a plain image of `size` bytes, which a full mirror fills.
    #[serde(default)]
    pub backing: Option<String>,
    /// Disk size in bytes (required without `backing`).
    #[serde(default)]
    pub size: Option<u64>,
    /// Destination image (default `file:STATE_DIR/images/VM-DISK.raw`).
    #[serde(default)]
    pub image: Option<String>,
    /// The source's bitmaps; `uuid` and `generation` make one continue the
    /// source's (its backup chain stays valid here).
    #[serde(default)]
    pub bitmaps: Vec<IncomingBitmap>,
    /// The source's `backup:` section.
    #[serde(default)]
    pub backup: Option<IncomingBackup>,
    /// The source's `intent_region` in bytes.
    #[serde(default)]
    pub intent_region: Option<u64>,
}

/// A bitmap an incoming disk carries over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingBitmap {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Recording writes.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The source bitmap's uuid.
    #[serde(default)]
    pub uuid: Option<String>,
    /// The source bitmap's generation.
    #[serde(default)]
    pub generation: Option<u64>,
}

fn yes() -> bool {
    true
}

/// A disk's `backup:` section, carried over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingBackup {
    /// Backup target URI.
    pub target: String,
    /// Bitmap for incremental backups.
    #[serde(default)]
    pub bitmap: Option<String>,
    /// Backup snapshots to keep.
    #[serde(default)]
    pub keep: Option<u32>,
}

/// What `prepare` creates for one disk.
#[derive(Debug, Clone)]
pub(super) struct Planned {
    pub(super) name: String,
    pub(super) backing: Option<ImageUri>,
    pub(super) size: u64,
    pub(super) image: ImageUri,
}

/// Body of `POST /v1/migrations/{id}/complete`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Complete {
    /// Start a stream job per disk (default true).
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream speed limit, bytes/s.
    #[serde(default)]
    pub speed: Option<Size>,
}

impl Control {
    pub(super) fn migration_env(&self) -> Result<&MigrationEnv, ApiError> {
        self.migrations.get().ok_or_else(|| ApiError::Internal("migrations are not ready".into()))
    }

    pub(super) async fn reload(&self) -> Result<(), ApiError> {
        let env = self.migration_env()?;
        let (tx, rx) = oneshot::channel();
        env.reload.send(tx).await.map_err(|_| ApiError::Internal("agent is stopping".into()))?;
        rx.await.map_err(|_| ApiError::Internal("agent is stopping".into()))?.map_err(ApiError::Internal)
    }

    /// Creates the layered disks and serves them hidden behind a token.
    pub(super) async fn prepare_migration(&self, req: Prepare) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let _steps = env.steps.lock().await;
        check_name(&req.vm).map_err(ApiError::BadRequest)?;
        let vms_dir = env
            .vms_dir
            .clone()
            .ok_or_else(|| ApiError::BadRequest("This agent has no vms_dir to add a VM to".into()))?;
        let vm_file = vms_dir.join(format!("{}.yaml", req.vm));
        let stale: Vec<String> = {
            let records = env.records.lock().unwrap_or_else(|p| p.into_inner());
            records
                .values()
                .filter(|r| r["vm"] == req.vm.as_str() && (r["state"] == "prepared" || r["state"] == "aborting"))
                .filter_map(|r| r["id"].as_str().map(str::to_owned))
                .collect()
        };
        for id in stale {
            tracing::warn!(migration = %id, "aborting an earlier, never activated migration of the same VM");
            self.abort_locked(&id).await?;
        }
        let taken = self.vms.load().iter().any(|v| v.name == req.vm) || vm_file.exists();
        if taken {
            return Err(ApiError::Conflict(format!("VM {} already exists on this agent", req.vm)));
        }
        if req.disks.is_empty() {
            return Err(ApiError::BadRequest("A migration needs at least one disk".into()));
        }
        let mut plan = Vec::new();
        for d in &req.disks {
            check_name(&d.name).map_err(ApiError::BadRequest)?;
            let backing: Option<ImageUri> =
                d.backing.as_deref().map(str::parse).transpose().map_err(ApiError::BadRequest)?;
            if backing.as_ref().is_some_and(|b| b.snap().is_none()) {
                return Err(ApiError::BadRequest(format!("Backing {:?} must name a snapshot", d.backing)));
            }
            let size = match (&backing, d.size) {
                (_, Some(size)) if size > 0 && size % 512 == 0 => size,
                (Some(_), None) => 0,
                (_, size) => {
                    return Err(ApiError::BadRequest(format!(
                        "Disk {}: a size (a positive multiple of 512) is needed without a backing, got {size:?}",
                        d.name
                    )))
                }
            };
            let image = match &d.image {
                Some(i) => i.parse().map_err(ApiError::BadRequest)?,
                None => ImageUri::file(env.images_dir.join(format!("{}-{}.raw", req.vm, d.name))),
            };
            plan.push(Planned { name: d.name.clone(), backing, size, image });
        }
        // The VM file is checked as the agent will load it before anything is created.
        let vm_text = vm_file_text(&req, &plan);
        crate::config::VmConfig::from_str(&vm_text, &vm_file)
            .map_err(|e| ApiError::BadRequest(format!("The VM's settings do not make a valid VM file here: {e}")))?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("migration-{}-{}", req.vm, &token[..8]);
        let exports: Vec<Value> = plan
            .iter()
            .map(|p| {
                serde_json::json!({
                    "disk": format!("{}/{}", req.vm, p.name),
                    "export": format!("{MIGRATION_PREFIX}{token}/{}/{}", req.vm, p.name),
                    "backing": p.backing.as_ref().map(ToString::to_string),
                    "size": p.size,
                    "image": p.image.to_string(),
                })
            })
            .collect();
        let mut record = serde_json::json!({
            "id": id, "vm": req.vm, "state": "prepared", "created_at": unix_now(), "token": token,
            "disks": exports, "nbd": env.nbd.load().as_ref().clone(), "nbd_tls": env.nbd_tls, "stream_jobs": [],
        });
        // The record first, durably: an agent restarted at any later step finds it and keeps the
        // disks hidden (a VM file without its record would serve them writable by their own name).
        env.save(&record)?;
        for p in &plan {
            env.incoming.insert(&format!("{}/{}", req.vm, p.name), &token);
        }
        let done = self.create_and_serve(&req, &plan, &vm_file, &vm_text).await;
        if let Err((e, undone)) = done {
            // `aborted` only if the undo is complete (else the record stays prepared: its disks
            // stay hidden, also after a restart, and a retry aborts it).
            if undone {
                record["state"] = "aborted".into();
                if let Err(saved) = env.save(&record) {
                    tracing::error!(migration = %id, error = %saved, "cannot record the failed prepare");
                }
            }
            return Err(e);
        }
        tracing::info!(migration = %id, vm = %req.vm, "incoming migration prepared");
        Ok(record)
    }

    /// Creates the layered disks, writes the VM file and loads it (the disks
    /// are already marked incoming), then gives the bitmaps the source's
    /// identities; undoes everything on failure. The error says whether the
    /// undo is complete (else the VM file may still be there, with its disks
    /// hidden by their markers).
    async fn create_and_serve(
        &self,
        req: &Prepare,
        plan: &[Planned],
        vm_file: &std::path::Path,
        vm_text: &str,
    ) -> Result<(), (ApiError, bool)> {
        let vm = req.vm.as_str();
        let stores = self.env.stores.clone();
        let created = {
            let (plan, holder) = (plan.to_vec(), holds::vm_holders(&self.env.node, vm));
            tokio::task::spawn_blocking(move || create_children(&stores, &plan, &holder))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        };
        if let Err(e) = created {
            // `create_children` removed what it created; nothing else to undo but the markers.
            if let Ok(env) = self.migration_env() {
                for p in plan {
                    env.incoming.remove(&format!("{vm}/{}", p.name));
                }
            }
            return Err((ApiError::BadRequest(e), true));
        }
        let write = crate::durable::write_file(vm_file, vm_text.as_bytes())
            .map_err(|e| ApiError::Internal(format!("Cannot write {}: {e}", vm_file.display())));
        if let Err(e) = write {
            // The write may have failed after its rename: the file may be there.
            return Err((e, self.undo(vm, plan, Some(vm_file)).await));
        }
        if let Err(e) = self.reload().await {
            return Err((e, self.undo(vm, plan, Some(vm_file)).await));
        }
        if let Err(e) = self.adopt_bitmaps(req) {
            return Err((e, self.undo(vm, plan, Some(vm_file)).await));
        }
        Ok(())
    }

    /// Gives each carried-over bitmap the source's uuid and generation
    /// (before the source can write: it has no token yet).
    fn adopt_bitmaps(&self, req: &Prepare) -> Result<(), ApiError> {
        for d in &req.disks {
            let disk = format!("{}/{}", req.vm, d.name);
            let export = self.disk_any(&disk)?;
            for b in &d.bitmaps {
                if let (Some(uuid), Some(generation)) = (&b.uuid, b.generation) {
                    export.bitmaps().adopt(&b.name, uuid, generation)?;
                }
            }
        }
        Ok(())
    }

    /// Removes the VM file (durably), reloads so its disks are detached,
    /// then forgets their incoming markers and removes the images. If the VM
    /// file cannot be removed nothing else is undone (the markers keep the
    /// disks hidden, also on a reload) and the answer is false.
    async fn undo(&self, vm: &str, plan: &[Planned], vm_file: Option<&std::path::Path>) -> bool {
        if let Some(f) = vm_file {
            if let Err(e) = crate::durable::remove_file(f) {
                tracing::error!(file = %f.display(), error = %e, "cannot remove the VM file of an undone migration");
                return false;
            }
            let _ = self.reload().await;
        }
        if let Ok(env) = self.migration_env() {
            for p in plan {
                env.incoming.remove(&format!("{vm}/{}", p.name));
            }
        }
        let stores = self.env.stores.clone();
        let holder = holds::vm_holders(&self.env.node, vm);
        let plan = plan.to_vec();
        let _ = tokio::task::spawn_blocking(move || {
            for p in &plan {
                drop(stores.remove(&p.image));
                if let Some(backing) = &p.backing {
                    drop(holds::release(&stores, backing, &format!("{holder}{}", p.name)));
                }
            }
        })
        .await;
        true
    }

    /// A migration record as stored (with its token).
    fn stored(&self, id: &str) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let records = env.records.lock().unwrap_or_else(|p| p.into_inner());
        records.get(id).cloned().ok_or_else(|| ApiError::NotFound(format!("No migration {id:?}")))
    }

    /// A migration record as shown (without its token).
    pub(super) fn record(&self, id: &str) -> Result<Value, ApiError> {
        Ok(redact(self.stored(id)?))
    }

    /// Serves the disks under their own names and starts streaming.
    pub(super) async fn complete_migration(&self, id: &str, req: Complete) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let _steps = env.steps.lock().await;
        let mut record = self.stored(id)?;
        if record["state"] != "prepared" {
            return Err(ApiError::Conflict(format!("Migration {id} is {}", record["state"])));
        }
        #[cfg(test)]
        crate::testkit::at("migration.complete.checked", id);
        let speed = req.speed.as_ref().map(Size::bytes).transpose()?.unwrap_or(0);
        let disks: Vec<String> = record["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["disk"].as_str().map(str::to_owned))
            .collect();
        // All or nothing: every disk is found before any goes live, and once they are live the
        // answer is success (the source's `migrate` backs out on an error, which must mean
        // that nothing went live). A stream that cannot start is reported, not an error.
        let exports = disks.iter().map(|disk| self.disk_any(disk)).collect::<Result<Vec<_>, _>>()?;
        // Recorded active before any disk goes live: if the record cannot be written, nothing
        // went live (and a restart never finds a live disk whose record says prepared).
        record["state"] = "active".into();
        record["activated_at"] = unix_now().into();
        env.save(&record)?;
        for (disk, export) in disks.iter().zip(&exports) {
            export.activate();
            env.incoming.remove(disk);
        }
        tracing::info!(migration = %id, "incoming migration activated");
        let (mut jobs, mut stream_errors) = (Vec::new(), Vec::new());
        for (disk, export) in disks.iter().zip(exports).filter(|_| req.stream.unwrap_or(true)) {
            let params = StreamParams::for_disk(&self.env.node, disk, 4 << 20);
            let stores = self.env.stores.clone();
            match self
                .jobs
                .start("stream", disk, to_json(&params), speed, move |h| stream::run(h, export, params, stores))
            {
                Ok(job) => jobs.push(job.record().id),
                Err(e) => {
                    tracing::warn!(migration = %id, disk = %disk, error = %e, "the stream job did not start");
                    stream_errors.push(serde_json::json!({ "disk": disk, "error": e.to_string() }));
                }
            }
        }
        record["stream_jobs"] = to_json(&jobs);
        if !stream_errors.is_empty() {
            record["stream_errors"] = stream_errors.into();
        }
        // The disks are live whatever happens here: a record that misses its stream jobs is
        // only logged (the answer must say "active", or the source would take its disks back).
        if let Err(e) = env.save(&record) {
            tracing::error!(migration = %id, error = %e, "cannot record the stream jobs");
        }
        Ok(redact(record))
    }

    /// Removes what `prepare` created (only before `complete`).
    pub(super) async fn abort_migration(&self, id: &str) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let _steps = env.steps.lock().await;
        self.abort_locked(id).await
    }

    /// [`abort_migration`](Self::abort_migration) under the steps lock.
    async fn abort_locked(&self, id: &str) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let mut record = self.stored(id)?;
        if record["state"] != "prepared" && record["state"] != "aborting" {
            return Err(ApiError::Conflict(format!(
                "Migration {id} is {}; only a prepared one can be aborted",
                record["state"]
            )));
        }
        #[cfg(test)]
        crate::testkit::at("migration.abort.checked", id);
        let vm = record["vm"].as_str().unwrap_or_default().to_owned();
        let plan: Vec<Planned> = record["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| {
                Some(Planned {
                    name: d["disk"].as_str()?.split('/').nth(1)?.to_owned(),
                    backing: d["backing"].as_str().and_then(|b| b.parse().ok()),
                    size: d["size"].as_u64().unwrap_or(0),
                    image: d["image"].as_str()?.parse().ok()?,
                })
            })
            .collect();
        let vm_file = env.vms_dir.as_ref().map(|d| d.join(format!("{vm}.yaml")));
        // `aborting` first: complete refuses it, and a restart keeps its disks hidden (the VM
        // file may outlive a crash here); `aborted` once the VM file is gone for sure.
        record["state"] = "aborting".into();
        env.save(&record)?;
        if !self.undo(&vm, &plan, vm_file.as_deref()).await {
            return Err(ApiError::Internal(format!(
                "Migration {id} is aborting: its VM file could not be removed (the disks stay hidden; retry the abort)"
            )));
        }
        record["state"] = "aborted".into();
        env.save(&record)?;
        Ok(redact(record))
    }

    /// The source reports every disk in sync (write-blocking, nothing left to
    /// copy): reads by the disks' own names are served from now on (writes
    /// still wait for the cut-over). `synced: false` withdraws it (a
    /// restarted source mirrors again): reads wait again.
    pub(super) async fn migration_synced(&self, id: &str, synced: bool) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let _steps = env.steps.lock().await;
        let mut record = self.stored(id)?;
        if record["state"] != "prepared" {
            return Err(ApiError::Conflict(format!("Migration {id} is {}", record["state"])));
        }
        // Recorded first when withdrawn, last when given: a restart never serves reads that
        // were withdrawn.
        record["synced"] = synced.into();
        if !synced {
            env.save(&record)?;
        }
        for d in record["disks"].as_array().into_iter().flatten() {
            if let Some(export) = d["disk"].as_str().and_then(|disk| self.exports.get(disk)) {
                if synced {
                    export.set_synced();
                } else {
                    export.set_unsynced();
                }
            }
        }
        if synced {
            env.save(&record)?;
        }
        Ok(redact(record))
    }

    /// Waits (at most `wait`) until a client sent IO by its own name on one
    /// of the migration's incoming exports (the `first-io` trigger; the
    /// source long-polls this).
    pub(super) async fn first_io(&self, id: &str, wait: std::time::Duration) -> Result<Value, ApiError> {
        let record = self.stored(id)?;
        let mut watches: Vec<_> = record["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| self.exports.get(d["disk"].as_str()?))
            .map(|e| e.first_io())
            .collect();
        let seen = |w: &mut Vec<tokio::sync::watch::Receiver<bool>>| w.iter_mut().any(|r| *r.borrow_and_update());
        let mut fired = record["state"] == "prepared" && (record["first_io"] == true || seen(&mut watches));
        if record["state"] == "prepared" && !fired {
            let (tx, mut rx) = mpsc::channel::<()>(1);
            let tasks: Vec<_> = watches
                .into_iter()
                .map(|mut w| {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if w.wait_for(|v| *v).await.is_ok() {
                            let _ = tx.send(()).await;
                        }
                    })
                })
                .collect();
            drop(tx);
            // Also ends when the migration leaves `prepared` (aborted, or completed by another
            // hand): the source must learn that at once, not at the end of its long poll.
            let deadline = tokio::time::Instant::now() + wait;
            fired = loop {
                tokio::select! {
                    got = rx.recv() => break got.is_some(),
                    () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
                if tokio::time::Instant::now() >= deadline || self.stored(id)?["state"] != "prepared" {
                    break false;
                }
            };
            for t in tasks {
                t.abort();
            }
        }
        if fired && record["first_io"] != true {
            // Recorded before the source hears of it: a restart here does not forget that the
            // destination VM resumed (the source then rolls forward, never back).
            let env = self.migration_env()?;
            let _steps = env.steps.lock().await;
            let mut record = self.stored(id)?;
            fired = record["state"] == "prepared";
            if fired {
                record["first_io"] = true.into();
                env.save(&record)?;
            }
        }
        Ok(serde_json::json!({ "id": id, "state": self.stored(id)?["state"], "first_io": fired }))
    }

    /// Every migration this agent received.
    pub(super) fn list_migrations(&self) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let records = env.records.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Value::Array(records.values().cloned().map(redact).collect()))
    }
}

/// A record without its secret token (the token is only returned by `prepare`).
fn redact(mut record: Value) -> Value {
    if let Some(o) = record.as_object_mut() {
        o.remove("token");
    }
    for d in record["disks"].as_array_mut().into_iter().flatten() {
        if let Some(o) = d.as_object_mut() {
            o.remove("export");
        }
    }
    record
}

/// Creates each disk (layered on its backup snapshot, or plain) and holds
/// the snapshot (`holder_prefix` + disk name) so retention keeps it until
/// the stream detaches the disk; undoes everything on the first failure.
pub(super) fn create_children(
    stores: &Arc<crate::store::Stores>,
    plan: &[Planned],
    holder_prefix: &str,
) -> Result<(), String> {
    let mut done: Vec<(&Planned, String)> = Vec::new();
    for p in plan {
        let holder = format!("{holder_prefix}{}", p.name);
        let image = &p.image;
        let exists = stores.exists(image).map_err(|e| e.to_string())?;
        let result = if exists {
            Err(format!("Destination image {image} already exists; refusing to overwrite it"))
        } else if let Some(backing) = &p.backing {
            stores
                .clone_image(backing, image)
                .map_err(|e| format!("Cannot create {image} over {backing}: {e}"))
                .and_then(|child| match child.size() {
                    // The source sends its size: a backing older than a resize is not its image.
                    n if p.size != 0 && n != p.size => {
                        drop(child);
                        let _ = stores.remove(image);
                        Err(format!(
                            "Backing {backing} has {n} bytes but the disk has {}; back the disk up first",
                            p.size
                        ))
                    }
                    _ => Ok(()),
                })
                .and_then(|()| {
                    holds::hold(stores, backing, &holder, "migration destination layered on it").map_err(|e| {
                        let _ = stores.remove(image);
                        format!("Cannot hold {backing} for {image}: {e}")
                    })
                })
        } else {
            stores.create(image, p.size).map(drop).map_err(|e| format!("Cannot create {image}: {e}"))
        };
        if let Err(e) = result {
            for (p, holder) in done {
                let _ = stores.remove(&p.image);
                if let Some(backing) = &p.backing {
                    let _ = holds::release(stores, backing, &holder);
                }
            }
            return Err(e);
        }
        done.push((p, holder));
    }
    Ok(())
}

/// The destination's VM file: the source's settings with the new images.
/// Written as JSON, which is YAML too (no quoting rules to get wrong).
fn vm_file_text(req: &Prepare, plan: &[Planned]) -> String {
    let disks: Vec<Value> = req
        .disks
        .iter()
        .zip(plan)
        .map(|(d, p)| {
            let mut disk = serde_json::json!({ "name": d.name, "image": p.image.to_string() });
            if !d.bitmaps.is_empty() {
                disk["bitmaps"] = d
                    .bitmaps
                    .iter()
                    .map(|b| serde_json::json!({ "name": b.name, "granularity": b.granularity, "enabled": b.enabled }))
                    .collect();
            }
            if let Some(b) = &d.backup {
                let mut backup = serde_json::json!({ "target": b.target });
                if let Some(bitmap) = &b.bitmap {
                    backup["bitmap"] = bitmap.as_str().into();
                }
                if let Some(keep) = b.keep {
                    backup["keep"] = keep.into();
                }
                disk["backup"] = backup;
            }
            if let Some(region) = d.intent_region {
                disk["intent_region"] = region.into();
            }
            disk
        })
        .collect();
    let mut vm = serde_json::json!({ "name": req.vm, "disks": disks });
    if !req.allow.is_empty() {
        vm["allow"] = req.allow.clone().into();
    }
    format!(
        "# Written by rbdsync for an incoming migration.\n{}\n",
        serde_json::to_string_pretty(&vm).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::Exports;
    use crate::jobs::backup::BackupEnv;
    use crate::jobs::JobManager;
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    fn control(dir: &std::path::Path, record: Value) -> Arc<Control> {
        let env = BackupEnv {
            stores: crate::store::Stores::new(None),
            scratch_dir: dir.join("scratch"),
            node: "test".into(),
            tls: Arc::new(crate::nbd::tls::Tls::load(None).unwrap()),
            fence_dir: dir.join("fenced"),
            mirror_reconnect_secs: 0,
            nbd_client_timeout: Duration::from_secs(30),
        };
        let jobs = JobManager::load(&dir.join("jobs")).unwrap();
        let control = Arc::new(Control::new("test".into(), Arc::new(Exports::default()), jobs, env));
        let id = record["id"].as_str().unwrap().to_owned();
        control.set_migration_env(MigrationEnv {
            vms_dir: None,
            images_dir: dir.join("images"),
            incoming: Arc::new(Incoming::default()),
            reload: mpsc::channel(1).0,
            nbd: ArcSwap::from_pointee(Vec::new()),
            nbd_tls: false,
            records: Mutex::new(BTreeMap::from([(id, record)])),
            dir: dir.join("migrations"),
            state_dir: dir.to_owned(),
            steps: tokio::sync::Mutex::new(()),
            events: Default::default(),
        });
        control
    }

    /// Complete and abort of one prepared migration, the abort arriving while
    /// the complete sits right after its state check: at most one succeeds
    /// (both passing their "prepared" check would serve a disk whose images
    /// the abort deletes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn complete_and_abort_never_both_pass_their_check() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("migrations")).unwrap();
        let id = "migration-vm1-race";
        let record = serde_json::json!({ "id": id, "vm": "vm1", "state": "prepared", "token": "t", "disks": [] });
        let control = control(dir.path(), record);
        // The complete pauses after its check until the abort passed its own (or 1 s went by:
        // under the steps lock the abort cannot get there first).
        let (passed_tx, passed_rx) = std_mpsc::channel::<()>();
        let (seen_tx, seen_rx) = std_mpsc::channel::<bool>();
        let (reached_tx, reached_rx) = oneshot::channel::<()>();
        crate::testkit::set("migration.complete.checked", id, move || {
            let _ = reached_tx.send(());
            let _ = seen_tx.send(passed_rx.recv_timeout(Duration::from_secs(1)).is_ok());
        });
        crate::testkit::set("migration.abort.checked", id, move || {
            let _ = passed_tx.send(());
        });
        let c = control.clone();
        let complete =
            tokio::spawn(async move { c.complete_migration(id, Complete { stream: None, speed: None }).await });
        reached_rx.await.unwrap();
        let aborted = control.abort_migration(id).await;
        let completed = complete.await.unwrap();
        eprintln!("complete: {completed:?}; abort: {aborted:?}");
        assert!(
            !seen_rx.recv().unwrap(),
            "the abort passed its \"prepared\" check while the complete stood between its own check and its action"
        );
        assert!(
            !(completed.is_ok() && aborted.is_ok()),
            "both the complete and the abort of one migration succeeded: {completed:?} / {aborted:?}"
        );
        assert!(completed.is_ok(), "the complete came first and must win: {completed:?}");
        assert_eq!(control.stored(id).unwrap()["state"], "active");
    }
}
