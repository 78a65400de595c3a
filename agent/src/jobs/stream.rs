//! Stream jobs: copy every region a layered disk still reads from its
//! parent (the backup snapshot) into the disk, while clients use it, then
//! detach the parent.
//!
//! Stream writes go to the store directly, not through the export, so they
//! dirty no bitmap; the store's copy-up locking guarantees that a client's
//! write is never overwritten by older parent data. Stores without chunked
//! copy (RBD clones) are flattened by librbd in one call instead.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{JobError, JobHandle};
use crate::export::Export;
use crate::store::StoreError;

/// Parameters of a stream job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamParams {
    /// Bytes per unit of work (default 4 MiB: one RBD object).
    pub chunk: u64,
    /// Hold on the parent snapshot to drop once detached (`NODE:VM/DISK`).
    #[serde(default)]
    pub holder: Option<String>,
}

/// Streams the parent's data into the disk and detaches the parent.
pub async fn run(
    job: JobHandle,
    export: Arc<Export>,
    params: StreamParams,
    stores: Arc<crate::store::Stores>,
) -> Result<Value, JobError> {
    let store = export.store().clone();
    let parent = {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.parent()).await.map_err(|e| JobError::Failed(e.to_string()))?
    }
    .map_err(|e| JobError::from_err("Cannot read the parent", &e))?;
    let Some(parent) = parent else {
        return Ok(json!({ "parent": null, "bytes_copied": 0, "note": "the disk has no parent" }));
    };
    let size = export.size();
    job.set_total(size);
    let chunk = params.chunk.clamp(64 << 10, 64 << 20);
    let mut copied = 0;
    let mut pos = 0;
    while pos < size {
        job.checkpoint().await?;
        let n = chunk.min(size - pos);
        job.throttle(n).await?;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.copy_from_parent(pos, n))
            .await
            .map_err(|e| JobError::Failed(e.to_string()))?
        {
            Ok(bytes) => copied += bytes,
            Err(StoreError::Unsupported(_)) if pos == 0 => {
                let result = flatten(&job, &export, parent.to_string()).await?;
                release_hold(&stores, &parent, params.holder.as_deref()).await;
                return Ok(result);
            }
            Err(e) => return Err(JobError::from_err(&format!("Streaming from {parent} failed at offset {pos}"), &e)),
        }
        job.progress(n);
        pos += n;
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.detach_parent())
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?
        .map_err(|e| JobError::from_err("Cannot detach the parent", &e))?;
    release_hold(&stores, &parent, params.holder.as_deref()).await;
    Ok(json!({ "parent": parent.to_string(), "bytes_copied": copied, "detached": true }))
}

/// Drops the hold on the detached parent snapshot; a failure only leaves
/// the backup snapshot around longer (logged).
async fn release_hold(stores: &Arc<crate::store::Stores>, parent: &crate::config::ImageUri, holder: Option<&str>) {
    let Some(holder) = holder.map(str::to_owned) else { return };
    let (stores, parent) = (stores.clone(), parent.clone());
    let released = tokio::task::spawn_blocking(move || super::holds::release(&stores, &parent, &holder)).await;
    if let Ok(Err(e)) = released {
        tracing::warn!(error = %e, "cannot drop the hold on the detached backup snapshot; retention keeps it");
    }
}

/// Whole-image flatten for stores that only offer that (RBD clones).
async fn flatten(job: &JobHandle, export: &Arc<Export>, parent: String) -> Result<Value, JobError> {
    let store = export.store().clone();
    let done = Arc::new(AtomicU64::new(0));
    let seen = done.clone();
    let work = tokio::task::spawn_blocking(move || store.flatten(&mut |d, _| seen.store(d, SeqCst)));
    tokio::pin!(work);
    let mut last = 0;
    loop {
        tokio::select! {
            r = &mut work => {
                r.map_err(|e| JobError::Failed(e.to_string()))?.map_err(|e| JobError::from_err("Flatten failed", &e))?;
                break;
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                let now = done.load(SeqCst);
                job.progress(now.saturating_sub(last));
                last = now;
            }
        }
    }
    job.progress(export.size().saturating_sub(last));
    Ok(json!({ "parent": parent, "flattened": true, "detached": true }))
}
