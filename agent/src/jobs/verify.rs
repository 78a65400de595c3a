//! Verify jobs: compare a disk, at the job's start, with an image or a
//! snapshot chunk by chunk, and report every extent that differs.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::backup::{BackupEnv, CHUNK};
use super::pit::PointInTime;
use super::{JobError, JobHandle};
use crate::config::ImageUri;
use crate::export::Export;
use crate::nbd::client::{NbdClient, NbdUri};
use crate::store::{BlockStore, OpenOptions, StoreError};

/// Comparison granularity inside a chunk (the reported extents' unit).
const UNIT: usize = 64 << 10;
/// Most mismatching extents listed.
const MAX_LISTED: usize = 64;

/// Parameters of a verify job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyParams {
    /// Image or snapshot to compare with (`rbd:pool/img@snap`, `file:/x@snap`).
    pub against: String,
}

/// Compares the disk (frozen at the job's start) with `params.against`.
pub async fn run(job: JobHandle, env: BackupEnv, export: Arc<Export>, params: VerifyParams) -> Result<Value, JobError> {
    let other: Arc<dyn BlockStore> = if params.against.starts_with("nbd") {
        let uri: NbdUri = params.against.parse().map_err(JobError::Failed)?;
        let client = NbdClient::connect(&uri, env.tls.client().as_ref())
            .await
            .map_err(|e| JobError::from_err("Cannot reach the export to verify against", &e))?;
        Arc::new(NbdReader { client, runtime: tokio::runtime::Handle::current() })
    } else {
        let uri: ImageUri = params.against.parse().map_err(JobError::Failed)?;
        let stores = env.stores.clone();
        tokio::task::spawn_blocking(move || stores.open(&uri, &OpenOptions { create_size: None, read_only: true }))
            .await
            .map_err(|e| JobError::Failed(e.to_string()))?
            .map_err(|e| JobError::from_err("Cannot open the image to verify against", &e))?
    };
    let size = export.size();
    if other.size() != size {
        return Err(JobError::Failed(format!("{} has {} bytes, disk has {size}", params.against, other.size())));
    }
    let scratch = env.scratch_dir.join(format!("{}.pit", job.id()));
    let pit = export
        .bitmaps()
        .drained(|d| {
            let pit = Arc::new(PointInTime::whole(export.store().clone(), UNIT as u64, &scratch)?);
            export.add_hook(d, pit.clone());
            Ok::<_, StoreError>(pit)
        })
        .map_err(|e| JobError::from_err("Cannot freeze the disk", &e))?;
    let result = compare(&job, &pit, &other, size).await;
    export.remove_hook(&pit);
    let mismatches = result?;
    let differing: u64 = mismatches.iter().map(|m| m.1).sum();
    if differing > 0 {
        // What the CLI's exit status tells apart from a verify that could not run.
        job.set_detail(json!({ "differing_bytes": differing, "differing_extents": mismatches.len() }));
        let listed: Vec<String> = mismatches.iter().take(MAX_LISTED).map(|(o, l)| format!("{o}+{l}")).collect();
        return Err(JobError::Failed(format!(
            "Verify failed: {differing} bytes differ in {} extents: {}",
            mismatches.len(),
            listed.join(", ")
        )));
    }
    Ok(json!({ "against": params.against, "bytes_compared": size, "equal": true, "mismatches": [] }))
}

async fn compare(
    job: &JobHandle,
    pit: &Arc<PointInTime>,
    other: &Arc<dyn BlockStore>,
    size: u64,
) -> Result<Vec<(u64, u64)>, JobError> {
    job.set_total(size);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        job.checkpoint().await?;
        let n = CHUNK.min(size - pos);
        job.throttle(n).await?;
        let (pit, other) = (pit.clone(), other.clone());
        let diffs = tokio::task::spawn_blocking(move || compare_chunk(&pit, other.as_ref(), pos, n))
            .await
            .map_err(|e| JobError::Failed(e.to_string()))?
            .map_err(|e| JobError::from_err("Read failed", &e))?;
        for (o, l) in diffs {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => out.push((o, l)),
            }
        }
        job.progress(n);
        pos += n;
    }
    Ok(out)
}

/// A remote NBD export read as a (read-only) store, for verification.
#[derive(Debug)]
struct NbdReader {
    client: NbdClient,
    runtime: tokio::runtime::Handle,
}

impl BlockStore for NbdReader {
    fn size(&self) -> u64 {
        self.client.size()
    }
    fn capabilities(&self) -> crate::store::Capabilities {
        crate::store::Capabilities { read_only: true, ..Default::default() }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let len = u32::try_from(buf.len()).map_err(|_| StoreError::Unsupported("reads over 4 GiB"))?;
        let data = self.runtime.block_on(self.client.read(offset, len)).map_err(|e| StoreError::Io {
            op: "nbd read",
            offset,
            source: std::io::Error::other(e.to_string()),
        })?;
        if data.len() != buf.len() {
            let short = format!("the server answered {} of {} bytes", data.len(), buf.len());
            return Err(StoreError::Io { op: "nbd read", offset, source: std::io::Error::other(short) });
        }
        buf.copy_from_slice(&data);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<crate::store::Extent>, StoreError> {
        Ok(vec![crate::store::Extent { offset, length, kind: crate::store::ExtentKind::Data }])
    }
    fn identity(&self) -> Result<crate::store::Identity, StoreError> {
        Ok(crate::store::Identity { id: self.client.uri().to_string(), modified_ns: 0 })
    }
}

fn compare_chunk(
    pit: &PointInTime,
    other: &dyn BlockStore,
    offset: u64,
    length: u64,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let len = usize::try_from(length).unwrap_or(0);
    let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
    pit.read(&mut a, offset)?;
    other.read_at(&mut b, offset)?;
    pit.release(offset, length);
    Ok(a.chunks(UNIT)
        .zip(b.chunks(UNIT))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, (x, _))| (offset + (i * UNIT) as u64, x.len() as u64))
        .collect())
}
