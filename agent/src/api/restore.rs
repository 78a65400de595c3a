//! Restore: a disk configured in a VM file whose image is absent (its host
//! is gone, say) is created from a backup snapshot on this host.
//!
//! ```text
//!  check    the disk is configured, not served, its image absent; the
//!           snapshot exists; whether it can be the base of the chain
//!  create   the image as a child layered on the snapshot, the snapshot held
//!           (retention keeps it while it is a parent); the disk is marked
//!           hidden first (in memory and by a marker file), so no client
//!           finds it before it is served
//!  open     reload: the disk opens with fresh bitmaps (stale state of an
//!           earlier disk of that name is removed); it must be the image
//!           just created, on the snapshot
//!  chain    the backup bitmap gets a uuid of its own and a continuation
//!           record on the target (backup::Continues), so the next backup
//!           is incremental; ranges where the target's head differs from
//!           the snapshot are marked dirty
//!  serve    --live: at once, while a restore job streams the rest;
//!           else the job streams first and the disk is served at its end
//! ```
//! A non-live restore that fails leaves the disk hidden; `restore` again
//! resumes its stream. The marker (`STATE_DIR/restores/VM/DISK`) keeps the
//! disk hidden across restarts until it is served; `restore` again then
//! finishes it. A live restore's disk once served is an ordinary layered
//! disk: after a restart, `stream` finishes its copy.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{to_json, ApiError, Control};
use crate::config::{DiskConfig, ImageUri};
use crate::export::{Export, Incoming};
use crate::jobs::backup::{self, SnapMeta};
use crate::jobs::stream::{self, StreamParams};
use crate::jobs::JobError;
use crate::store::{OpenOptions, StoreError};

use crate::export::RESTORE_TOKEN_PREFIX as TOKEN_PREFIX;

/// `params` of a restore job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreParams {
    /// The snapshot restored (`URI@SNAP`).
    pub from: String,
    /// Served from the start (true) or once copied.
    pub live: bool,
    /// The stream that copies the snapshot's data.
    pub stream: StreamParams,
    /// The backup bitmap that continues the snapshot's chain, if one does.
    pub chain_bitmap: Option<String>,
    /// Why the next backup cannot be incremental, if it cannot.
    pub chain_note: Option<String>,
}

/// What the check step learned about the snapshot.
struct Source {
    /// The snapshot's backup record, if it is a backup snapshot.
    meta: Option<SnapMeta>,
    /// Whether it is the newest backup snapshot of its image.
    latest: bool,
}

impl Source {
    /// What `target`'s backup records say about its snapshot `snap`.
    fn read(target: &dyn crate::store::BlockStore, snap: &str) -> Result<Self, StoreError> {
        let backups = backup::backup_snapshots(target)?;
        let latest = backups.last().is_some_and(|(n, _)| n == snap);
        let meta = backups.into_iter().find(|(n, _)| n == snap).map(|(_, m)| m);
        Ok(Self { meta, latest })
    }
}

impl Control {
    /// The stream that copies a restored disk's data (its hold is `NODE:VM/DISK`).
    fn restore_stream(&self, disk: &str) -> StreamParams {
        StreamParams::for_disk(&self.env.node, disk, 4 << 20)
    }

    /// Starts (or resumes) the restore of `disk` from `from` (`URI@SNAP`).
    pub(super) async fn start_restore(
        &self,
        disk: &str,
        from: &str,
        live: bool,
        speed: u64,
    ) -> Result<Value, ApiError> {
        let config = self.disk_config(disk).ok_or_else(|| ApiError::DiskNotFound(disk.to_owned()))?;
        if config.read_only {
            return Err(ApiError::BadRequest(format!("{disk} is read_only in its VM file; a restore writes it")));
        }
        let from_uri: ImageUri = from.parse().map_err(ApiError::BadRequest)?;
        let Some(snap) = from_uri.snap().map(str::to_owned) else {
            return Err(ApiError::BadRequest(format!("--from {from} must name a snapshot (URI@SNAP)")));
        };
        let env = self.migration_env()?;
        // One restore or migration step at a time: the image check and its creation must not
        // interleave with another's.
        let _steps = env.steps.lock().await;
        if let Some(export) = self.exports.get(disk) {
            return match export.incoming() {
                Some(token) if token.starts_with(TOKEN_PREFIX) => {
                    self.resume(disk, export, &from_uri, live, speed).await
                }
                _ => Err(ApiError::Conflict(format!(
                    "{disk} is served here; a restore only creates a disk whose image is absent"
                ))),
            };
        }
        if self.env.fence(disk).exists() {
            return Err(ApiError::Conflict(format!(
                "{disk} is fenced here (migrated away: {}); remove the fence first if it is to live here again",
                self.env.fence(disk).display()
            )));
        }
        let source = self.check_source(&config, disk, &from_uri, &snap).await?;
        let (chain_bitmap, chain_note) = match chain_base(disk, &config, &from_uri, &source) {
            Ok(bitmap) => (Some(bitmap), None),
            Err(why) => (None, Some(why)),
        };
        // Bitmap state of an earlier disk of this name describes an image that is gone.
        let bitmaps_dir = env.state_dir.join("bitmaps").join(disk);
        match std::fs::remove_dir_all(&bitmaps_dir) {
            Ok(()) => {
                tracing::warn!(disk, dir = %bitmaps_dir.display(), "removed the bitmaps of an earlier disk of this name")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ApiError::Internal(format!(
                    "Cannot remove the stale bitmaps {}: {e}",
                    bitmaps_dir.display()
                )))
            }
        }
        let token = format!("{TOKEN_PREFIX}{}", uuid::Uuid::new_v4().simple());
        env.incoming.insert(disk, &token);
        // Durably before the image exists: a restart keeps a half-copied disk hidden (a live
        // restore removes it once the chain is set up, before the disk is served).
        if let Err(e) = crate::durable::write_file(&marker(&env.state_dir, disk), token.as_bytes()) {
            env.incoming.remove(disk);
            return Err(ApiError::Internal(format!("Cannot record the restore of {disk}: {e}")));
        }
        let (vm, name) = disk.split_once('/').unwrap_or_default();
        let plan = super::migrations::Planned {
            name: name.to_owned(),
            backing: Some(from_uri.clone()),
            size: 0,
            image: config.image.clone(),
        };
        let (stores, holder) = (self.env.stores.clone(), crate::jobs::holds::vm_holders(&self.env.node, vm));
        let plan2 = plan.clone();
        let created =
            tokio::task::spawn_blocking(move || super::migrations::create_children(&stores, &[plan2], &holder))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = created {
            // Nothing was created (create_children undoes its own work).
            let _ = crate::durable::remove_file(&marker(&env.state_dir, disk));
            env.incoming.remove(disk);
            return Err(ApiError::BadRequest(e));
        }
        let reloaded = self.reload().await;
        // The disk that opened must be the image just created, on the snapshot (the VM file
        // may have changed meanwhile).
        let opened = match self.exports.get(disk) {
            Some(export) => match self.parent_of(&export).await {
                Ok(Some(parent))
                    if parent == from_uri && self.disk_config(disk).is_some_and(|c| c.image == plan.image) =>
                {
                    Ok(export)
                }
                Ok(other) => Err(format!("it opened on another image (parent {other:?}); the VM file changed")),
                Err(e) => Err(e),
            },
            None => Err(reloaded.err().map_or_else(|| "it did not open".to_owned(), |e| e.to_string())),
        };
        let export = match opened {
            Ok(export) => export,
            Err(why) => {
                // The image this restore created is removed unless it is what is served now.
                let ours_served =
                    self.exports.get(disk).is_some() && self.disk_config(disk).is_some_and(|c| c.image == plan.image);
                if !ours_served {
                    self.undo_restore(disk, &plan).await;
                }
                return Err(ApiError::Internal(format!("Cannot open the restored disk {disk}: {why}")));
            }
        };
        let (chain_bitmap, chain_note) = match chain_bitmap {
            Some(bitmap) => match self.continue_chain(&export, &bitmap, &from_uri, &snap, &source).await {
                Ok(()) => (Some(bitmap), None),
                Err(e) => {
                    // The disk is there and right; only the next backup is full.
                    tracing::warn!(disk, bitmap, error = %e, "cannot continue the backup chain; the next backup is full");
                    (None, Some(format!("cannot continue the backup chain: {e}")))
                }
            },
            None => (None, chain_note),
        };
        tracing::info!(disk, from, live, chain_bitmap = ?chain_bitmap, "restore: disk created");
        let stream = self.restore_stream(disk);
        let params = RestoreParams { from: from.to_owned(), live, stream, chain_bitmap, chain_note };
        self.run_restore(disk, export, params, speed)
    }

    /// The parent snapshot of a disk's image.
    async fn parent_of(&self, export: &Arc<Export>) -> Result<Option<ImageUri>, String> {
        let store = export.store().clone();
        tokio::task::spawn_blocking(move || store.parent()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }

    /// Makes the disk's backup bitmap continue the snapshot's chain, before
    /// any client reaches the disk: the bitmap gets a uuid of its own and a
    /// continuation record on the target; every range where the target's
    /// head differs from the snapshot (a backup that died before its
    /// snapshot, say) is marked dirty, so the next incremental rewrites it.
    async fn continue_chain(
        &self,
        export: &Arc<Export>,
        bitmap: &str,
        from: &ImageUri,
        snap: &str,
        source: &Source,
    ) -> Result<(), String> {
        let generation = source.meta.as_ref().and_then(|m| m.generation).unwrap_or(0);
        let uuid = uuid::Uuid::new_v4().to_string();
        let (stores, base, snap, export, bitmap2, uuid2) = (
            self.env.stores.clone(),
            from.with_snap(None),
            snap.to_owned(),
            export.clone(),
            bitmap.to_owned(),
            uuid.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let target = stores.open(&base, &OpenOptions::default()).map_err(|e| format!("cannot open {base}: {e}"))?;
            let size = target.size();
            let changed = target
                .changed_extents(Some(&snap), 0, size)
                .map_err(|e| format!("cannot compare the head of {base} with {snap}: {e}"))?;
            // Past the disk's size (a target grown after that snapshot): the next backup sizes
            // the target's head to the disk.
            for &(offset, length) in &changed {
                let length = (offset + length).min(export.size()).saturating_sub(offset);
                if length > 0 {
                    export.bitmaps().mark(offset, length).map_err(|e| e.to_string())?;
                }
            }
            if !changed.is_empty() {
                let bytes: u64 = changed.iter().map(|c| c.1).sum();
                tracing::warn!(
                    disk = export.name(),
                    bytes,
                    "the backup target changed after the snapshot; those ranges are dirty"
                );
            }
            let record =
                serde_json::to_string(&backup::Continues { snapshot: snap, generation }).map_err(|e| e.to_string())?;
            target
                .set_meta(&format!("{}{uuid2}", backup::CONTINUES_KEY_PREFIX), &record)
                .map_err(|e| format!("cannot write the continuation record on {base}: {e}"))?;
            export.bitmaps().adopt(&bitmap2, &uuid2, generation).map(drop).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// A restore whose job ended before the disk was served: its stream again.
    async fn resume(
        &self,
        disk: &str,
        export: Arc<Export>,
        from: &ImageUri,
        live: bool,
        speed: u64,
    ) -> Result<Value, ApiError> {
        if let Some(job) = self.jobs.active_on(disk) {
            return Err(crate::jobs::JobControlError::Busy { disk: disk.to_owned(), job }.into());
        }
        match self.parent_of(&export).await.map_err(ApiError::Internal)? {
            Some(parent) if parent != *from => {
                return Err(ApiError::Conflict(format!("{disk} is being restored from {parent}, not {from}")))
            }
            _ => {}
        }
        tracing::info!(disk, %from, "resuming the restore");
        // The first attempt may have stopped before the chain was set up (the disk is still
        // hidden: nothing wrote to it but the copy).
        let (chain_bitmap, chain_note) = match self.resume_chain(disk, &export, from).await {
            Ok(Some(bitmap)) => (Some(bitmap), None),
            Ok(None) => (None, Some("resumed: the first attempt set up the chain".to_owned())),
            Err(why) => (None, Some(why)),
        };
        let stream = self.restore_stream(disk);
        let params = RestoreParams { from: from.to_string(), live, stream, chain_bitmap, chain_note };
        self.run_restore(disk, export, params, speed)
    }

    /// Sets the chain up on a resumed restore if the first attempt did not:
    /// `Some(bitmap)` if it did now, `None` if it was done already.
    async fn resume_chain(&self, disk: &str, export: &Arc<Export>, from: &ImageUri) -> Result<Option<String>, String> {
        let config = self.disk_config(disk).ok_or_else(|| format!("no disk {disk}"))?;
        let snap = from.snap().ok_or("no snapshot")?.to_owned();
        let (stores, base, snap2) = (self.env.stores.clone(), from.with_snap(None), snap.clone());
        let (source, records) = tokio::task::spawn_blocking(move || {
            let target = stores.open(&base, &OpenOptions { read_only: true, ..Default::default() })?;
            Ok::<_, StoreError>((Source::read(target.as_ref(), &snap2)?, target.list_meta()?))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read the backups of {from}: {e}"))?;
        let bitmap = chain_base(disk, &config, from, &source)?;
        let uuid = export.bitmaps().get(&bitmap).map_err(|e| e.to_string())?.uuid();
        if records.contains_key(&format!("{}{uuid}", backup::CONTINUES_KEY_PREFIX)) {
            return Ok(None);
        }
        self.continue_chain(export, &bitmap, from, &snap, &source).await?;
        Ok(Some(bitmap))
    }

    /// Serves a live restore at once, then streams; a non-live one is
    /// served when the stream succeeded.
    fn run_restore(
        &self,
        disk: &str,
        export: Arc<Export>,
        params: RestoreParams,
        speed: u64,
    ) -> Result<Value, ApiError> {
        let env = self.migration_env()?;
        let (incoming, marker) = (env.incoming.clone(), marker(&env.state_dir, disk));
        if params.live {
            served(&export, &incoming, &marker)?;
        }
        let stores = self.env.stores.clone();
        let (disk2, p) = (disk.to_owned(), params.clone());
        let job = self.jobs.start("restore", disk, to_json(&params), speed, move |handle| async move {
            let streamed = stream::run(handle, export.clone(), p.stream.clone(), stores).await;
            let mut summary = match streamed {
                Ok(summary) => summary,
                Err(e) if !p.live => {
                    tracing::warn!(disk = %disk2, error = %e, "restore failed; the disk stays hidden (restore again to resume)");
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if !p.live {
                served(&export, &incoming, &marker).map_err(|e| JobError::Failed(e.to_string()))?;
                tracing::info!(disk = %disk2, "restore copied; disk served");
            }
            summary["from"] = json!(p.from);
            summary["live"] = json!(p.live);
            summary["chain_bitmap"] = json!(p.chain_bitmap);
            summary["chain_note"] = json!(p.chain_note);
            Ok(summary)
        })?;
        Ok(to_json(job.record()))
    }

    /// The snapshot exists and the disk's image does not.
    async fn check_source(
        &self,
        config: &DiskConfig,
        disk: &str,
        from: &ImageUri,
        snap: &str,
    ) -> Result<Source, ApiError> {
        let (stores, image, from, snap) =
            (self.env.stores.clone(), config.image.clone(), from.clone(), snap.to_owned());
        let disk = disk.to_owned();
        tokio::task::spawn_blocking(move || {
            if stores.exists(&image).map_err(|e| ApiError::Internal(format!("Cannot reach {image}: {e}")))? {
                return Err(ApiError::Conflict(format!(
                    "The image of {disk} ({image}) exists; a restore never overwrites an image (remove it, or name \
                     another image in the VM file)"
                )));
            }
            let base = from.with_snap(None);
            let target = match stores.open(&base, &OpenOptions { read_only: true, ..Default::default() }) {
                Err(e @ (StoreError::NotFound(_) | StoreError::Missing(_))) => {
                    return Err(ApiError::NotFound(format!("No image {base}: {e}")))
                }
                other => other.map_err(|e| ApiError::Internal(format!("Cannot open {base}: {e}")))?,
            };
            let snaps = target.list_snapshots().map_err(|e| ApiError::Internal(format!("Cannot list {base}: {e}")))?;
            if !snaps.iter().any(|s| s.name == snap) {
                return Err(ApiError::NotFound(format!("{base} has no snapshot {snap:?}")));
            }
            Source::read(target.as_ref(), &snap)
                .map_err(|e| ApiError::Internal(format!("Cannot read the backups of {base}: {e}")))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
    }

    /// Removes what a failed restore created (the disk never opened).
    async fn undo_restore(&self, disk: &str, plan: &super::migrations::Planned) {
        let (stores, plan) = (self.env.stores.clone(), plan.clone());
        let holder = crate::jobs::holds::holder(&self.env.node, disk);
        // The image first: while the marker and token stand, a reload cannot serve it.
        let _ = tokio::task::spawn_blocking(move || {
            drop(stores.remove(&plan.image));
            if let Some(backing) = &plan.backing {
                drop(crate::jobs::holds::release(&stores, backing, &holder));
            }
        })
        .await;
        if let Ok(env) = self.migration_env() {
            let _ = crate::durable::remove_file(&marker(&env.state_dir, disk));
            env.incoming.remove(disk);
        }
    }
}

/// `STATE_DIR/restores/VM/DISK`: a non-live restore not done yet.
fn marker(state_dir: &std::path::Path, disk: &str) -> std::path::PathBuf {
    state_dir.join("restores").join(disk)
}

/// Serves a restored disk by its name: its marker goes first (a restart
/// must not hide a disk clients already use).
fn served(export: &Export, incoming: &Incoming, marker: &std::path::Path) -> Result<(), ApiError> {
    match crate::durable::remove_file(marker) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ApiError::Internal(format!("Cannot remove the restore marker {}: {e}", marker.display())))
        }
        _ => {}
    }
    export.activate();
    incoming.remove(export.name());
    Ok(())
}

/// Hides the disks of non-live restores not done yet (at start-up, before
/// any disk opens): `restore` again finishes them.
pub fn load_markers(state_dir: &std::path::Path, incoming: &Incoming) {
    for vm in std::fs::read_dir(state_dir.join("restores")).into_iter().flatten().flatten() {
        for disk in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
            let Ok(token) = std::fs::read_to_string(disk.path()) else { continue };
            let name = format!("{}/{}", vm.file_name().to_string_lossy(), disk.file_name().to_string_lossy());
            if token.starts_with(TOKEN_PREFIX) {
                tracing::warn!(disk = %name, "a restore did not finish: the disk stays hidden until `rbdsync restore` finishes it");
                incoming.insert(&name, token.trim());
            }
        }
    }
}

/// The backup bitmap that continues the snapshot's chain after the restore,
/// or why none does (the next backup is then full).
fn chain_base(disk: &str, config: &DiskConfig, from: &ImageUri, source: &Source) -> Result<String, String> {
    let backup = config.backup.as_ref().ok_or("the disk has no backup target")?;
    let bitmap = backup.bitmap.clone().ok_or("the disk has no backup bitmap")?;
    if backup.target != from.with_snap(None) {
        return Err(format!("the snapshot is not on the disk's backup target {}", backup.target));
    }
    let meta = source.meta.as_ref().ok_or("the snapshot is not a backup snapshot")?;
    if meta.disk != disk {
        return Err(format!("the snapshot is a backup of {}", meta.disk));
    }
    if meta.bitmap.as_deref() != Some(bitmap.as_str()) || meta.bitmap_uuid.is_none() || meta.generation.is_none() {
        return Err(format!("the snapshot was not taken against bitmap {bitmap}"));
    }
    if !source.latest {
        return Err("a newer backup follows the snapshot on the target (its head holds the newer data)".into());
    }
    Ok(bitmap)
}
