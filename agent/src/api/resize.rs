//! Online resize of a served disk: `POST /v1/disks/{vm}/{disk}/resize`.
//!
//! Grow only. The image and every bitmap of the disk grow together while
//! the disk's writes are drained ([`crate::bitmap::DiskBitmaps::grow`]);
//! a running backup goes on with the point in time it fixed (its next
//! incremental grows the backup target). Connected NBD clients keep the
//! size they negotiated until they reconnect: NBD has no way to announce a
//! new size.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{to_json, ApiError, Control, Size};
use crate::jobs::JobState;
use crate::store::StoreError;

/// Body of `POST /v1/disks/{vm}/{disk}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeBody {
    /// The new size: bytes, or a string such as `30GiB`; not smaller than
    /// the disk, a multiple of 512.
    pub size: Size,
}

/// Job kinds that may run while their disk grows: a backup works from the
/// point in time it fixed, at the size it had then.
const COMPATIBLE: &[&str] = &["backup"];

/// Largest size accepted (1 EiB; images and file systems stop well before).
const MAX_SIZE: u64 = 1 << 60;

/// Most memory the grown bitmaps of one disk may take (each bit set is
/// held twice: the bits and what is durable of them).
const MAX_BITMAP_MEMORY: u64 = 1 << 30;

impl Control {
    /// Grows `disk` to `size` bytes (the same size again is a no-op).
    pub(super) async fn resize(self: &Arc<Self>, disk: &str, size: &Size) -> Result<Value, ApiError> {
        let size = size.bytes()?;
        let export = self.disk(disk)?;
        let current = export.size();
        if size == 0 || !size.is_multiple_of(512) {
            return Err(ApiError::BadRequest(format!("Size {size} is not a positive multiple of 512 bytes")));
        }
        if size > MAX_SIZE {
            return Err(ApiError::BadRequest(format!("Size {size} is larger than {MAX_SIZE} bytes")));
        }
        let memory: u64 = export.bitmaps().list().iter().map(|b| size.div_ceil(b.granularity).div_ceil(64) * 16).sum();
        if memory > MAX_BITMAP_MEMORY {
            return Err(ApiError::BadRequest(format!(
                "{disk}'s bitmaps would take {} MiB of memory at {size} bytes; use coarser granularities",
                memory >> 20
            )));
        }
        if size < current {
            return Err(ApiError::BadRequest(format!(
                "{disk} has {current} bytes; shrinking is not supported (it would drop data and backups)"
            )));
        }
        if size == current {
            return Ok(to_json(Self::disk_info_of(&export)));
        }
        if export.read_only() {
            return Err(ApiError::Conflict(format!("{disk} is read-only (fenced, or cut over to another host)")));
        }
        let store = export.store().clone();
        let probe = store.clone();
        let parent = tokio::task::spawn_blocking(move || probe.parent())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("Cannot read the parent of {disk}: {e}")))?;
        if let Some(parent) = parent {
            return Err(ApiError::Conflict(format!(
                "{disk} is still layered on {parent}; resize it after its stream job detached it"
            )));
        }
        let (control, name, exp) = (self.clone(), disk.to_owned(), export.clone());
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            exp.bitmaps().grow(size, || {
                // Under the drain: a job that starts now begins after the grow and sees the new size.
                if let Some(job) = control.jobs.list(true).into_iter().find(|j| {
                    j.disk == name && j.state != JobState::Concluded && !COMPATIBLE.contains(&j.kind.as_str())
                }) {
                    return Err(ApiError::Conflict(format!(
                        "{name} has a {} job running ({}); resize it after the job ends",
                        job.kind, job.id
                    )));
                }
                store.resize(size).map_err(|e| match e {
                    StoreError::ReadOnly => ApiError::Conflict(format!("{name} is read-only")),
                    e => ApiError::Internal(format!("Cannot grow the image of {name}: {e}")),
                })
            })
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        self.events()
            .publish("disk", serde_json::json!({ "disk": disk, "change": "resized", "from": current, "size": size }));
        tracing::info!(
            disk,
            from = current,
            to = size,
            took_ms = started.elapsed().as_millis(),
            "disk resized online; NBD clients see the new size when they reconnect"
        );
        Ok(to_json(Self::disk_info_of(&export)))
    }
}
