//! Job commands of the control API: start backups and verifies, control jobs.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{to_json, ApiError, Control, Size};
use crate::config::DiskConfig;
use crate::export::Export;
use crate::jobs::backup::{self, BackupParams, Group, Member, SyncMode};
use crate::jobs::hooks;
use crate::jobs::limits::Admission;
use crate::jobs::mirror::{self, CopyMode, MirrorParams, MirrorSync};
use crate::jobs::stream::{self, StreamParams};
use crate::jobs::verify::{self, VerifyParams};
use crate::nbd::client::NbdUri;

/// Body of `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StartJob {
    /// Back up a disk (`VM/DISK`) or every disk of a VM (`VM`) as a group.
    Backup {
        /// `VM/DISK` or `VM`.
        disk: String,
        /// `full` or `incremental` (default: incremental when a bitmap is
        /// known, falling back to full with the reason; else full).
        #[serde(default)]
        sync: Option<SyncMode>,
        /// Bitmap (default: the disk's `backup.bitmap`).
        #[serde(default)]
        bitmap: Option<String>,
        /// Target image (default: the disk's `backup.target`).
        #[serde(default)]
        target: Option<String>,
        /// Speed limit, bytes/s.
        #[serde(default)]
        speed: Option<Size>,
        /// Fall back to full when incremental is impossible.
        #[serde(default)]
        auto: bool,
    },
    /// Mirror a disk to another agent's NBD export.
    Mirror {
        /// `VM/DISK`.
        disk: String,
        /// `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
        target: String,
        /// `full`, `top` or `incremental`.
        sync: MirrorSync,
        /// Bitmap (required for incremental).
        #[serde(default)]
        bitmap: Option<String>,
        /// `background` (default) or `write-blocking`.
        #[serde(default)]
        copy_mode: Option<CopyMode>,
        /// Ready below this many dirty bytes (default 16 MiB).
        #[serde(default)]
        ready_threshold: Option<Size>,
        /// Speed limit, bytes/s.
        #[serde(default)]
        speed: Option<Size>,
        /// Refuse to start unless the bitmap still has this uuid and
        /// generation (what `GET .../chain` reported), checked atomically
        /// with seeding the mirror.
        #[serde(default)]
        expect: Option<mirror::BitmapState>,
    },
    /// Copy what a layered disk still reads from its parent (backing) into
    /// the disk, then detach the parent. Restartable: a stream that failed
    /// or was cancelled resumes where it stopped.
    Stream {
        /// `VM/DISK`.
        disk: String,
        /// Bytes per unit of work (default 4 MiB, one RBD object; 64 KiB to 64 MiB).
        #[serde(default)]
        chunk: Option<Size>,
        /// Speed limit, bytes/s.
        #[serde(default)]
        speed: Option<Size>,
    },
    /// Create a disk whose image is absent from a backup snapshot (`rbdsync restore`).
    Restore {
        /// `VM/DISK`, configured in a VM file, its image absent.
        disk: String,
        /// The snapshot, `URI@SNAP`.
        from: String,
        /// Serve the disk at once, layered on the snapshot, while the job copies the rest.
        #[serde(default)]
        live: bool,
        /// Speed limit, bytes/s.
        #[serde(default)]
        speed: Option<Size>,
    },
    /// Compare a disk at this moment with an image or snapshot.
    Verify {
        /// `VM/DISK`.
        disk: String,
        /// `rbd:pool/img@snap`, `file:/x@snap`, ...
        against: String,
        /// Speed limit, bytes/s.
        #[serde(default)]
        speed: Option<Size>,
    },
}

/// A request to an existing job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Cancel.
    Cancel,
    /// Complete a ready job.
    Complete,
    /// Change the speed limit (bytes/s).
    SetSpeed(u64),
    /// Change a mirror's copy mode.
    SetCopyMode(CopyMode),
}

impl Control {
    pub(super) fn job_action(&self, id: &str, action: JobAction) -> Result<Value, ApiError> {
        if let Some(vm) = self.jobs.get(id)?.settings().get("migration").and_then(Value::as_str) {
            // The VM's disks cut over together; once it is ready the mirrors must stay
            // write-blocking (the destination serves reads as in sync).
            let refuse = match action {
                JobAction::Complete => true,
                // Manual and first-io migrations pin their mirrors to write-blocking once ready
                // (the destination then serves reads as in sync) and complete them all at once.
                JobAction::SetCopyMode(_) | JobAction::Pause => !self.outgoing_tunable(vm),
                _ => false,
            };
            if refuse {
                return Err(ApiError::Conflict(format!(
                    "Job {id} mirrors a disk of VM {vm} for its migration: its disks cut over together \
                     (rbdsync migration cutover {vm}) and, for a manual or first-io cut-over, stay running and \
                     write-blocking"
                )));
            }
        }
        let record = match action {
            JobAction::Pause => self.jobs.pause(id)?,
            JobAction::Resume => self.jobs.resume(id)?,
            JobAction::Cancel => self.jobs.cancel(id)?,
            JobAction::Complete => self.jobs.complete(id)?,
            JobAction::SetSpeed(speed) => self.jobs.set_speed(id, speed)?,
            JobAction::SetCopyMode(mode) => self.jobs.set_setting(id, "copy_mode", to_json(mode))?,
        };
        Ok(to_json(record))
    }

    pub(super) fn disk_config(&self, disk: &str) -> Option<DiskConfig> {
        let (vm, name) = disk.split_once('/')?;
        let vms = self.vms.load();
        let vm = vms.iter().find(|v| v.name == vm)?;
        vm.disks.iter().find(|d| d.name == name).cloned()
    }

    /// Starts the job(s); a backup answers once its point in time is fixed.
    /// Starts one backup job per plan (a group when there are several, so
    /// they share one point in time); answers once every point in time is
    /// fixed (or its job failed).
    async fn start_backups(
        &self,
        plans: Vec<(Arc<Export>, BackupParams)>,
        speed: u64,
        hooks: Option<(backup::Thawed, std::time::Duration)>,
    ) -> Result<Value, ApiError> {
        // A member that does not start (or fails before its end) reports a failure when
        // its place is dropped, so the started ones never wait for it.
        let mut members: Vec<Option<Member>> =
            if plans.len() > 1 { Group::members(plans.len()).into_iter().map(Some).collect() } else { vec![None] };
        let mut started = Vec::new();
        // The disks of a VM share one point in time, and a frozen guest must not wait for a
        // slot: such backups never queue (they count against jobs.max_running all the same).
        let now = plans.len() > 1 || hooks.is_some();
        for ((export, params), group) in plans.into_iter().zip(members.drain(..)) {
            let (env, name) = (self.env.clone(), export.name().to_owned());
            let (tx, rx) = tokio::sync::oneshot::channel();
            let thawed = hooks.as_ref().map(|h| h.0.clone());
            let recorded = to_json(&params);
            let body = move |handle| backup::run(handle, env, export, params, group, tx, thawed);
            let admission = if now { Admission::Now } else { Admission::Queue };
            let job = self.jobs.start_with("backup", &name, recorded, speed, admission, body);
            match job {
                Ok(job) => started.push((job, rx)),
                Err(e) => {
                    // A group member could not start: the others must not wait for it.
                    for (job, _) in &started {
                        let _ = self.jobs.cancel(&job.record().id);
                    }
                    return Err(e.into());
                }
            }
        }
        let deadline = hooks.map(|h| tokio::time::Instant::now() + h.1);
        let mut records = Vec::new();
        for (job, frozen) in started {
            // A queued backup's point in time is when it leaves the queue: answer now.
            if job.record().state == crate::jobs::JobState::Queued {
                records.push(job.record());
                continue;
            }
            match deadline {
                Some(at) => {
                    if tokio::time::timeout_at(at, frozen).await.is_err() {
                        tracing::warn!(job = %job.record().id, "no point in time within the hook timeout; thawing the guest first");
                    }
                }
                None => {
                    let _ = frozen.await;
                }
            }
            records.push(job.record());
        }
        Ok(if records.len() == 1 { to_json(&records[0]) } else { to_json(records) })
    }

    pub(super) async fn start_job(&self, start: StartJob) -> Result<Value, ApiError> {
        let bytes = |s: &Option<Size>| s.as_ref().map(Size::bytes).transpose().map(Option::unwrap_or_default);
        match start {
            StartJob::Backup { disk, sync, bitmap, target, speed, auto } => {
                self.start_backup_request(&disk, sync, bitmap, target, bytes(&speed)?, auto).await
            }
            StartJob::Mirror { disk, target, sync, bitmap, copy_mode, ready_threshold, speed, expect } => {
                let ready_threshold = ready_threshold.as_ref().map(Size::bytes).transpose()?.unwrap_or(16 << 20);
                let params = MirrorParams {
                    target,
                    sync,
                    bitmap,
                    copy_mode: copy_mode.unwrap_or(CopyMode::Background),
                    ready_threshold,
                    expect,
                    reconnect_secs: self.env.mirror_reconnect_secs,
                };
                self.start_mirror(&disk, params, bytes(&speed)?)
            }
            StartJob::Stream { disk, chunk, speed } => {
                let chunk = chunk.as_ref().map(Size::bytes).transpose()?.unwrap_or(4 << 20);
                self.start_stream(&disk, chunk, bytes(&speed)?)
            }
            StartJob::Restore { disk, from, live, speed } => {
                self.start_restore(&disk, &from, live, bytes(&speed)?).await
            }
            StartJob::Verify { disk, against, speed } => {
                self.start_verify(&disk, against, bytes(&speed)?, Admission::Queue)
            }
        }
    }

    /// A backup of one disk (`VM/DISK`) or of every disk of a VM (`VM`, one
    /// point in time, around the VM's freeze and thaw hooks if it has them).
    async fn start_backup_request(
        &self,
        disk: &str,
        sync: Option<SyncMode>,
        bitmap: Option<String>,
        target: Option<String>,
        speed: u64,
        auto: bool,
    ) -> Result<Value, ApiError> {
        let disks: Vec<String> = if disk.contains('/') {
            vec![disk.to_owned()]
        } else {
            let vms = self.vms.load();
            let vm = vms.iter().find(|v| v.name == disk).ok_or_else(|| ApiError::DiskNotFound(disk.to_owned()))?;
            vm.disks.iter().map(|d| format!("{}/{}", vm.name, d.name)).collect()
        };
        if disks.len() > 1 && (target.is_some()) {
            return Err(ApiError::BadRequest("--target applies to one disk; back up the disks one by one".into()));
        }
        let mut plans = Vec::new();
        for disk in &disks {
            if let Some(job) = self.jobs.active_on(disk) {
                return Err(crate::jobs::JobControlError::Busy { disk: disk.clone(), job }.into());
            }
            plans.push(self.backup_plan(disk, sync, bitmap.clone(), target.clone(), auto)?);
        }
        let vm = disks[0].split('/').next().unwrap_or_default().to_owned();
        let hooks = self.vms.load().iter().find(|v| v.name == vm).and_then(|v| v.hooks.clone());
        let Some(hooks) = hooks else { return self.start_backups(plans, speed, None).await };
        let lock = {
            let mut locks = self.hook_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(vm.clone()).or_default().clone()
        };
        // Another backup of this VM between its freeze and its thaw would thaw the guest
        // under it (or fail to freeze a frozen one).
        let _one_at_a_time = lock.lock().await;
        // Quiesce the guest before any disk is drained; resume it once every point in time
        // is fixed, whatever happened (see jobs::hooks). The jobs learn how the thaw went
        // before they report whether the backup is application-consistent.
        let freeze = match hooks::run("freeze", &hooks.freeze, &vm, hooks.timeout).await {
            Ok(()) => backup::FROZEN.to_owned(),
            Err(e) => {
                tracing::warn!(%vm, error = %e, "freeze failed; the backup is crash-consistent");
                e
            }
        };
        for (_, params) in &mut plans {
            params.freeze = Some(freeze.clone());
        }
        let (thawed_tx, thawed) = tokio::sync::watch::channel(backup::ThawState::default());
        // Past the hook timeout the guest is thawed first and the backups go on crash-consistent.
        let started = self.start_backups(plans, speed, Some((thawed, hooks.timeout))).await;
        thawed_tx.send_modify(|s| s.started = true);
        let thaw = hooks::run("thaw", &hooks.thaw, &vm, hooks.timeout).await;
        if let Err(e) = &thaw {
            tracing::error!(%vm, error = %e, "thaw failed: the guest may still be frozen");
        }
        thawed_tx.send_modify(|s| s.outcome = Some(thaw));
        started
    }

    /// A mirror of `disk` to another agent's NBD export.
    fn start_mirror(&self, disk: &str, params: MirrorParams, speed: u64) -> Result<Value, ApiError> {
        if params.sync == MirrorSync::Incremental && params.bitmap.is_none() {
            return Err(ApiError::BadRequest("Incremental mode must specify the bitmap name (--bitmap)".into()));
        }
        params.target.parse::<NbdUri>().map_err(ApiError::BadRequest)?;
        let export = self.disk(disk)?;
        if let Some(name) = &params.bitmap {
            self.check_bitmap(&export, name)?;
            if params.sync == MirrorSync::Incremental && !export.bitmaps().is_enabled(name)? {
                return Err(crate::bitmap::BitmapError::Disabled(name.clone()).into());
            }
        }
        let nbd = self.env.nbd_client();
        // Mirrors take no slot of jobs.max_running (they live until their cut-over).
        let job = self.jobs.start_with("mirror", disk, to_json(&params), speed, Admission::Exempt, move |h| {
            mirror::run(h, export, params, nbd, None)
        })?;
        Ok(to_json(job.record()))
    }

    /// A stream of a layered `disk` from its backing, then its detach.
    fn start_stream(&self, disk: &str, chunk: u64, speed: u64) -> Result<Value, ApiError> {
        if !(64 << 10..=64 << 20).contains(&chunk) {
            return Err(ApiError::BadRequest(format!("chunk must be 64KiB to 64MiB, not {chunk}")));
        }
        let export = self.disk(disk)?;
        if export.incoming().is_some() {
            return Err(ApiError::Conflict(format!("{disk} is an incoming migration target; complete it first")));
        }
        // A stream writes to the store (copy, flatten, detach) and drops holds: never on
        // a disk that is read-only here (fenced after a migration, or by configuration).
        if export.read_only() {
            return Err(ApiError::Conflict(format!(
                "{disk} is read-only here (fenced, or read_only): a stream would modify it"
            )));
        }
        let params = StreamParams::for_disk(&self.env.node, disk, chunk);
        let stores = self.env.stores.clone();
        let job = self.jobs.start("stream", disk, to_json(&params), speed, move |handle| {
            stream::run(handle, export, params, stores)
        })?;
        Ok(to_json(job.record()))
    }

    /// Starts a verify job admitted as `admission` says (a migration's
    /// cut-over verify is urgent: the VM's disks are read-only meanwhile).
    pub(super) fn start_verify(
        &self,
        disk: &str,
        against: String,
        speed: u64,
        admission: Admission,
    ) -> Result<Value, ApiError> {
        let export = self.disk(disk)?;
        let params = VerifyParams { against };
        let env = self.env.clone();
        let job = self.jobs.start_with("verify", disk, to_json(&params), speed, admission, move |handle| {
            verify::run(handle, env, export, params)
        })?;
        Ok(to_json(job.record()))
    }

    /// Fences a migrated-away disk: read-only now and after restarts. Only
    /// a disk that is read-only already (since a mirror's cut-over) can be
    /// fenced: one that is writable again (the agent restarted or reloaded
    /// it) may have taken writes the destination lacks.
    pub(super) fn fence(&self, disk: &str, target: &str) -> Result<Value, ApiError> {
        let export = self.disk(disk)?;
        if !export.read_only() {
            return Err(ApiError::Conflict(format!(
                "{disk} is writable: a fence follows a mirror's cut-over, which leaves the disk read-only \
                 (writes since may be missing on the destination)"
            )));
        }
        mirror::write_fence(&self.env.fence(disk), disk, target)
            .map_err(|e| ApiError::Internal(format!("Cannot write the fence of {disk}: {e}")))?;
        export.set_read_only();
        tracing::warn!(disk, target, "disk fenced: it lives elsewhere now");
        Ok(to_json(Self::disk_info_of(&export)))
    }

    /// Removes a fence (or the in-memory read-only state after a cut-over): writable again.
    pub(super) fn unfence(&self, disk: &str) -> Result<Value, ApiError> {
        let export = self.disk(disk)?;
        match crate::durable::remove_file(&self.env.fence(disk)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ApiError::Internal(format!("Cannot remove the fence of {disk}: {e}")))
            }
            _ => {}
        }
        export.set_writable();
        if let Ok(env) = self.outgoing() {
            env.fence_lifted(disk, |d| self.env.fence(d).exists());
        }
        tracing::warn!(disk, "disk unfenced: writable here again");
        Ok(to_json(Self::disk_info_of(&export)))
    }

    /// A disk's export, its configured backup target and backup bitmap.
    fn backup_config(&self, disk: &str) -> Result<(Arc<Export>, crate::config::ImageUri, Option<String>), ApiError> {
        let export = self.disk(disk)?;
        let backup = self
            .disk_config(disk)
            .and_then(|d| d.backup)
            .ok_or_else(|| ApiError::BadRequest(format!("Disk {disk} has no backup target configured")))?;
        Ok((export, backup.target, backup.bitmap))
    }

    /// The disk's backup chain and whether `bitmap` (default: the disk's
    /// backup bitmap) holds exactly the writes since its latest snapshot.
    pub(super) async fn chain(&self, disk: &str, bitmap: Option<String>) -> Result<Value, ApiError> {
        let (export, target, default_bitmap) = self.backup_config(disk)?;
        let bitmap = bitmap.or(default_bitmap);
        let stores = self.env.stores.clone();
        let t = target.clone();
        let (snaps, meta) = tokio::task::spawn_blocking(move || {
            let img = stores.open(&t, &crate::store::OpenOptions::default())?;
            Ok::<_, crate::store::StoreError>((backup::backup_snapshots(img.as_ref())?, img.list_meta()?))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::BadRequest(format!("Cannot read the backup chain of {disk} at {target}: {e}")))?;
        let latest = snaps.last().cloned();
        let (state, reason) = chain_state(Some(&export), disk, bitmap.as_deref(), latest.as_ref(), &meta);
        Ok(serde_json::json!({
            "disk": disk,
            "target": target.to_string(),
            "latest": latest.as_ref().map(|(n, _)| n),
            "backing": latest.as_ref().map(|(n, _)| target.with_snap(Some(n)).to_string()),
            "bitmap": state.as_ref().map(|s| s.0.clone()),
            "bitmap_state": state.as_ref().map(|s| mirror::BitmapState { uuid: s.1.clone(), generation: s.2 }),
            "matches": reason.is_none(),
            "reason": reason,
            "size": export.size(),
            "latest_size": latest.as_ref().map(|(_, m)| m.size),
        }))
    }

    /// The restore points of a disk: every backup snapshot on its backup
    /// target, oldest first, with its chain position, time, bytes written,
    /// bitmap generation, holds, and which one the next incremental builds on.
    /// A target not created yet has none. The disk need not be served here
    /// (its image absent: these are what `restore` can use).
    pub(super) async fn backups(&self, disk: &str) -> Result<Value, ApiError> {
        let backup = self.disk_config(disk).ok_or_else(|| ApiError::DiskNotFound(disk.to_owned()))?.backup;
        let backup =
            backup.ok_or_else(|| ApiError::BadRequest(format!("Disk {disk} has no backup target configured")))?;
        let (export, target, bitmap) = (self.disk(disk).ok(), backup.target, backup.bitmap);
        let (stores, t) = (self.env.stores.clone(), target.clone());
        // One listing for the points and for the chain check, so both describe the same moment.
        let listed = tokio::task::spawn_blocking(move || {
            use crate::store::StoreError;
            let img = match stores.open(&t, &crate::store::OpenOptions::default()) {
                Err(StoreError::NotFound(_) | StoreError::Missing(_)) => return Ok((Vec::new(), Default::default())),
                other => other?,
            };
            Ok::<_, StoreError>((backup::backup_snapshots(img.as_ref())?, img.list_meta()?))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        let (snaps, meta) =
            listed.map_err(|e| ApiError::Internal(format!("Cannot read the backups of {disk} at {target}: {e}")))?;
        let (_, reason) = chain_state(export.as_deref(), disk, bitmap.as_deref(), snaps.last(), &meta);
        let base = reason.is_none().then(|| snaps.last().map(|(n, _)| Value::from(n.as_str()))).flatten();
        let points: Vec<Value> = snaps
            .iter()
            .enumerate()
            .map(|(i, (snap, m))| {
                serde_json::json!({
                    "snapshot": snap,
                    "uri": target.with_snap(Some(snap)).to_string(),
                    "position": i + 1,
                    "point_in_time": m.point_in_time,
                    "sync": m.sync,
                    "bytes_written": m.bytes_written,
                    "previous": m.previous,
                    "node": m.node,
                    "disk": m.disk,
                    "bitmap": m.bitmap,
                    "bitmap_generation": m.generation,
                    "base_of_next_incremental": base.as_ref().and_then(Value::as_str) == Some(snap.as_str()),
                    "holds": crate::jobs::holds::holders(&meta, snap),
                })
            })
            .collect();
        Ok(serde_json::json!({
            "disk": disk,
            "target": target.to_string(),
            "bitmap": bitmap,
            "incremental_possible": reason.is_none(),
            "reason": reason,
            "restore_points": points,
        }))
    }

    /// Resolves defaults and checks what can be checked before starting.
    fn backup_plan(
        &self,
        disk: &str,
        sync: Option<SyncMode>,
        bitmap: Option<String>,
        target: Option<String>,
        auto: bool,
    ) -> Result<(Arc<Export>, BackupParams), ApiError> {
        let export = self.disk(disk)?;
        let defaults = self.disk_config(disk).and_then(|d| d.backup);
        let target = target.or_else(|| defaults.as_ref().map(|b| b.target.to_string())).ok_or_else(|| {
            ApiError::BadRequest(format!("No backup target for {disk}: pass --target or set backup.target"))
        })?;
        let target_uri: crate::config::ImageUri = target.parse().map_err(ApiError::BadRequest)?;
        if target_uri.snap().is_some() {
            return Err(ApiError::BadRequest(format!("Backup target {target} names a snapshot; give the image")));
        }
        let same = |a: &crate::config::ImageUri, b: &crate::config::ImageUri| match (a, b) {
            (crate::config::ImageUri::File { path: x, .. }, crate::config::ImageUri::File { path: y, .. }) => {
                x == y || matches!((std::fs::canonicalize(x), std::fs::canonicalize(y)), (Ok(p), Ok(q)) if p == q)
            }
            _ => a.with_snap(None) == b.with_snap(None),
        };
        let served = self
            .vms
            .load()
            .iter()
            .flat_map(|v| v.disks.iter().map(move |d| (v.name.clone(), d.clone())))
            .find(|(_, d)| same(&d.image, &target_uri));
        if let Some((vm, d)) = served {
            return Err(ApiError::BadRequest(format!(
                "Backup target {target} is the image of disk {vm}/{}; refusing",
                d.name
            )));
        }
        let bitmap = bitmap.or_else(|| defaults.as_ref().and_then(|b| b.bitmap.clone()));
        let (sync, auto) = match (sync, &bitmap) {
            (Some(SyncMode::Incremental), None) => {
                return Err(ApiError::BadRequest("Incremental backup needs a bitmap (--bitmap NAME)".into()))
            }
            (Some(s), _) => (s, auto),
            (None, Some(_)) => (SyncMode::Incremental, true),
            (None, None) => (SyncMode::Full, auto),
        };
        let mut sync = sync;
        if let Some(name) = &bitmap {
            self.check_bitmap(&export, name)?;
            // A disabled bitmap misses writes: it cannot carry an incremental.
            if sync == SyncMode::Incremental && !export.bitmaps().is_enabled(name)? {
                if !auto {
                    return Err(crate::bitmap::BitmapError::Disabled(name.clone()).into());
                }
                sync = SyncMode::Full;
            }
        }
        let keep = defaults.as_ref().and_then(|b| b.keep);
        Ok((export, BackupParams { sync, bitmap, target, auto, keep, freeze: None }))
    }

    /// A bitmap a job can use: exists, consistent, not busy.
    fn check_bitmap(&self, export: &Export, name: &str) -> Result<(), ApiError> {
        let disk = export.name();
        {
            let list = export.bitmaps().list();
            let info = list
                .iter()
                .find(|b| b.name == name)
                .ok_or_else(|| crate::bitmap::BitmapError::NotFound { disk: disk.to_owned(), name: name.to_owned() })?;
            if !info.consistent {
                let reason = info.inconsistent_reason.clone().unwrap_or_default();
                return Err(crate::bitmap::BitmapError::Inconsistent { name: name.to_owned(), reason }.into());
            }
            if let Some(job) = &info.busy_job {
                return Err(crate::bitmap::BitmapError::Busy { name: name.to_owned(), job: job.clone() }.into());
            }
        }
        Ok(())
    }
}

/// A bitmap's identity as a backup chain sees it: name, uuid, generation, consistent.
type ChainBitmap = (String, String, u64, bool);

/// The state of `bitmap` on `export` and why an incremental backup cannot
/// build on `latest` (`None`: it can).
fn chain_state(
    export: Option<&Export>,
    disk: &str,
    bitmap: Option<&str>,
    latest: Option<&(String, backup::SnapMeta)>,
    records: &std::collections::BTreeMap<String, String>,
) -> (Option<ChainBitmap>, Option<String>) {
    let state = bitmap
        .and_then(|name| export?.bitmaps().get(name).ok())
        .map(|b| (b.name().to_owned(), b.uuid(), b.generation(), b.is_consistent()));
    let reason = match (latest, &state) {
        (None, _) => Some("the backup target has no backup snapshot".to_owned()),
        _ if export.is_none() => Some(format!("{disk} is not served here (restore it from one of these)")),
        (_, None) => Some(format!("no bitmap {bitmap:?} on {disk}")),
        (_, Some((_, _, _, false))) => Some("the bitmap is inconsistent".to_owned()),
        (Some((snap, meta)), Some((name, uuid, generation, true))) => {
            let same = meta.bitmap_uuid.as_deref() == Some(uuid.as_str()) && meta.generation == Some(*generation);
            if meta.disk != disk
                || meta.bitmap.as_deref() != Some(name.as_str())
                || !(same || backup::continues(records, snap, uuid, *generation))
            {
                Some(format!(
                    "bitmap {name} (generation {generation}) does not belong to snapshot {snap} (recorded {:?} generation {:?})",
                    meta.bitmap, meta.generation
                ))
            } else {
                None
            }
        }
    };
    (state, reason)
}
