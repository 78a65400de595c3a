//! Verify jobs: compare a disk, at the job's start, with an image or a
//! snapshot chunk by chunk, and report every extent that differs. Ranges
//! that are holes on both sides (the disk's allocation at the job's start,
//! the other side's `SEEK_DATA` / `rbd diff` map) are not read; a hole on
//! one side is compared with zeroes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::backup::{BackupEnv, CHUNK};
use super::pit::PointInTime;
use super::{JobError, JobHandle};
use crate::config::ImageUri;
use crate::export::Export;
use crate::nbd::client::{NbdClient, NbdUri};
use crate::store::{BlockStore, Extent, ExtentKind, OpenOptions, StoreError};

/// Comparison granularity inside a chunk (the reported extents' unit).
const UNIT: usize = 64 << 10;
/// Bytes whose allocation is looked up at once (holes on both sides cost no read).
const SPAN: u64 = 256 << 20;
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
        let client = NbdClient::connect(&uri, &env.nbd_client())
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
    let pit = export.bitmaps().drained(|d| {
        if export.size() != size {
            return Err(JobError::Failed(format!(
                "Disk {} was resized while the verify started ({size} -> {} bytes); start it again",
                export.name(),
                export.size()
            )));
        }
        let pit = PointInTime::whole(export.store().clone(), UNIT as u64, &scratch)
            .map_err(|e| JobError::from_err("Cannot freeze the disk", &e))?;
        let pit = Arc::new(pit);
        export.add_hook(d, pit.clone());
        Ok(pit)
    })?;
    let mut read = 0;
    let result = compare(&job, &pit, &other, size, &mut read).await;
    export.remove_hook(&pit);
    let mismatches = result?;
    let differing: u64 = mismatches.iter().map(|m| m.1).sum();
    if differing > 0 {
        // What the CLI's exit status tells apart from a verify that could not run.
        job.set_detail(
            json!({ "differing_bytes": differing, "differing_extents": mismatches.len(), "bytes_read": read }),
        );
        let listed: Vec<String> = mismatches.iter().take(MAX_LISTED).map(|(o, l)| format!("{o}+{l}")).collect();
        return Err(JobError::Failed(format!(
            "Verify failed: {differing} bytes differ in {} extents: {}",
            mismatches.len(),
            listed.join(", ")
        )));
    }
    Ok(
        json!({ "against": params.against, "bytes_compared": size, "bytes_read": read, "equal": true, "mismatches": [] }),
    )
}

async fn compare(
    job: &JobHandle,
    pit: &Arc<PointInTime>,
    other: &Arc<dyn BlockStore>,
    size: u64,
    read: &mut u64,
) -> Result<Vec<(u64, u64)>, JobError> {
    job.set_total(size);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        job.checkpoint().await?;
        let span = SPAN.min(size - pos);
        let (p, o) = (pit.clone(), other.clone());
        let segments = blocking(move || Ok(overlay(&p.extents(pos, span)?, &o.extents(pos, span)?, pos, span))).await?;
        // Chunk by chunk; a chunk with holes on both sides throughout costs nothing.
        let mut at = pos;
        let mut first = 0;
        while at < pos + span {
            let n = CHUNK.min(pos + span - at);
            while segments[first].1 <= at {
                first += 1;
            }
            let parts: Vec<(u64, u64, bool, bool)> = segments[first..]
                .iter()
                .take_while(|s| s.0 < at + n)
                .map(|&(a, b, here, there)| (a.max(at), b.min(at + n), here, there))
                .filter(|s| s.2 || s.3)
                .collect();
            if parts.is_empty() {
                // The view need not keep what is not there.
                pit.release(at, n);
            } else {
                job.checkpoint().await?;
                job.throttle(n).await?;
                let (p, o) = (pit.clone(), other.clone());
                let diff = blocking(move || compare_chunk(&p, o.as_ref(), at, n, &parts, size)).await?;
                *read += diff.read;
                for (o, l) in diff.differing {
                    match out.last_mut() {
                        // A unit split between chunks is listed once.
                        Some(last) if last.0 + last.1 > o => {}
                        Some(last) if last.0 + last.1 == o => last.1 += l,
                        _ => out.push((o, l)),
                    }
                }
            }
            job.progress(n);
            at += n;
        }
        pos += span;
    }
    // Holes were taken from the view's allocation: it must still hold the moment at the end.
    pit.intact().map_err(|e| JobError::from_err("The point-in-time view was lost", &e))?;
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, JobError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?
        .map_err(|e| JobError::from_err("Read failed", &e))
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

/// What one chunk's comparison found: the differing units (whole, as
/// `(offset, length)`) and the bytes it read (both sides).
struct ChunkDiff {
    differing: Vec<(u64, u64)>,
    read: u64,
}

/// Runs of `offset..offset+length` with one allocation state on each side:
/// `(start, end, data_here, data_there)`.
fn overlay(here: &[Extent], there: &[Extent], offset: u64, length: u64) -> Vec<(u64, u64, bool, bool)> {
    let end = offset + length;
    // The state at `pos` of a map walked in order; unreported ranges count as data (read them).
    let at = |map: &[Extent], i: &mut usize, pos: u64| -> (bool, u64) {
        while *i < map.len() && map[*i].offset + map[*i].length <= pos {
            *i += 1;
        }
        match map.get(*i) {
            Some(e) if e.offset <= pos => (e.kind == ExtentKind::Data, e.offset + e.length),
            Some(e) => (true, e.offset),
            None => (true, end),
        }
    };
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (a, a_end) = at(here, &mut i, pos);
        let (b, b_end) = at(there, &mut j, pos);
        let stop = a_end.min(b_end).min(end).max(pos + 1);
        match out.last_mut() {
            Some(last) if (last.2, last.3) == (a, b) => last.1 = stop,
            _ => out.push((pos, stop, a, b)),
        }
        pos = stop;
    }
    out
}

/// Compares the chunk `offset..offset+length`: its `parts` with data on
/// at least one side (`(start, end, data_here, data_there)`), each read from
/// the sides that hold data (a hole reads as zeroes).
fn compare_chunk(
    pit: &PointInTime,
    other: &dyn BlockStore,
    offset: u64,
    length: u64,
    parts: &[(u64, u64, bool, bool)],
    size: u64,
) -> Result<ChunkDiff, StoreError> {
    let unit = UNIT as u64;
    let mut read = 0;
    let mut differing: Vec<(u64, u64)> = Vec::new();
    for &(start, stop, here, there) in parts {
        let n = usize::try_from(stop - start).unwrap_or(0);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        if here {
            a = vec![0u8; n];
            pit.read(&mut a, start)?;
            read += n as u64;
        }
        if there {
            b = vec![0u8; n];
            other.read_at(&mut b, start)?;
            read += n as u64;
        }
        // Unit by unit (aligned to the disk), so the report names whole units.
        let mut pos = start;
        while pos < stop {
            let next = ((pos / unit + 1) * unit).min(stop);
            let range = usize::try_from(pos - start).unwrap_or(0)..usize::try_from(next - start).unwrap_or(0);
            let equal = match (here, there) {
                (true, true) => a[range.clone()] == b[range],
                (true, false) => a[range].iter().all(|&x| x == 0),
                _ => b[range].iter().all(|&x| x == 0),
            };
            let u = pos / unit * unit;
            if !equal && differing.last().is_none_or(|l| l.0 != u) {
                differing.push((u, (u + unit).min(size) - u));
            }
            pos = next;
        }
    }
    pit.release(offset, length);
    Ok(ChunkDiff { differing, read })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64, data: bool) -> Extent {
        Extent { offset, length, kind: if data { ExtentKind::Data } else { ExtentKind::Hole } }
    }

    #[test]
    fn the_overlay_of_two_maps_splits_where_either_changes_and_reads_what_is_unreported() {
        let here = [e(0, 10, true), e(10, 20, false), e(30, 10, true)];
        let there = [e(0, 5, false), e(5, 30, false)]; // 35..40 unreported
        assert_eq!(
            overlay(&here, &there, 0, 40),
            vec![(0, 10, true, false), (10, 30, false, false), (30, 35, true, false), (35, 40, true, true)]
        );
        // A window inside the maps.
        assert_eq!(overlay(&here, &there, 12, 10), vec![(12, 22, false, false)]);
    }
}
