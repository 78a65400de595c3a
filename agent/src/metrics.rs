//! Prometheus metrics, every name prefixed `rbdsync_`.
//!
//! Counters on the data path are cloned once per NBD session ([`NbdMetrics`])
//! so a request costs a few atomic adds and no lookups. Everything that
//! describes state (bitmaps, jobs, backups) is read from the owners at
//! scrape time ([`Metrics::encode`]), so nothing can drift and removed disks
//! disappear. Nothing resets when read: any number of scrapers see the same
//! monotonic counters.
//!
//! Sample (`curl -s 127.0.0.1:9860/metrics`):
//! ```text
//! rbdsync_nbd_requests_total{disk="vm1/disk0",op="write"} 1532
//! rbdsync_nbd_request_duration_seconds_bucket{disk="vm1/disk0",op="write",le="0.001"} 1490
//! rbdsync_bitmap_dirty_bytes{disk="vm1/disk0",bitmap="backup"} 65536
//! rbdsync_backup_last_success_timestamp_seconds{disk="vm1/disk0"} 1795765360
//! ```

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::export::Exports;
use crate::jobs::{JobManager, JobResult, JobState};

/// OpenMetrics content type of `/metrics` (sent when the scraper accepts it;
/// plain Prometheus text 0.0.4 otherwise).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskOp {
    disk: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabel {
    disk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BitmapLabel {
    disk: String,
    bitmap: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job_id: String,
    kind: String,
    disk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobStateLabel {
    job_id: String,
    kind: String,
    disk: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    kind: String,
    result: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// NBD operations with their own series.
pub const OPS: [&str; 8] = ["read", "write", "flush", "trim", "zero", "cache", "block_status", "other"];

/// All metrics of the agent.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<DiskOp, Counter>,
    bytes: Family<DiskOp, Counter>,
    errors: Family<DiskOp, Counter>,
    latency: Family<DiskOp, Histogram, fn() -> Histogram>,
    connections: Family<DiskLabel, Gauge>,
    inflight: Family<DiskLabel, Gauge>,
    disk_size: Family<DiskLabel, Gauge>,
    bitmap_dirty: Family<BitmapLabel, Gauge>,
    bitmap_granularity: Family<BitmapLabel, Gauge>,
    bitmap_consistent: Family<BitmapLabel, Gauge>,
    job_done: Family<JobLabel, Gauge>,
    job_total: Family<JobLabel, Gauge>,
    job_rate: Family<JobLabel, Gauge>,
    job_state: Family<JobStateLabel, Gauge>,
    jobs_concluded: Family<ResultLabel, Counter>,
    backup_last: Family<DiskLabel, Gauge>,
    backup_bytes: Family<DiskLabel, Gauge>,
    backup_chain: Family<DiskLabel, Gauge>,
    mirror_sent: Family<DiskLabel, Gauge>,
    downtime: Family<DiskLabel, GaugeF>,
    scrape: Mutex<()>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("rbdsync");
        let build: Family<VersionLabel, Gauge> = Family::default();
        build.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("build_info", "Agent version (always 1)", build);
        let m = Self {
            requests: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency),
            connections: Family::default(),
            inflight: Family::default(),
            disk_size: Family::default(),
            bitmap_dirty: Family::default(),
            bitmap_granularity: Family::default(),
            bitmap_consistent: Family::default(),
            job_done: Family::default(),
            job_total: Family::default(),
            job_rate: Family::default(),
            job_state: Family::default(),
            jobs_concluded: Family::default(),
            backup_last: Family::default(),
            backup_bytes: Family::default(),
            backup_chain: Family::default(),
            mirror_sent: Family::default(),
            downtime: Family::default(),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("nbd_requests", "NBD requests handled", m.requests.clone());
        r.register("nbd_bytes", "Bytes read or written by NBD requests", m.bytes.clone());
        r.register("nbd_errors", "NBD requests answered with an error", m.errors.clone());
        r.register("nbd_request_duration_seconds", "NBD request latency", m.latency.clone());
        r.register("nbd_connections", "Open NBD connections", m.connections.clone());
        r.register("nbd_inflight_requests", "NBD requests being processed", m.inflight.clone());
        r.register("disk_size_bytes", "Disk size", m.disk_size.clone());
        r.register("bitmap_dirty_bytes", "Bytes covered by dirty granules", m.bitmap_dirty.clone());
        r.register("bitmap_granularity_bytes", "Bytes per bitmap bit", m.bitmap_granularity.clone());
        r.register("bitmap_consistent", "1 if the bitmap can be trusted", m.bitmap_consistent.clone());
        r.register("job_done_bytes", "Bytes processed by a running job", m.job_done.clone());
        r.register("job_total_bytes", "Bytes a running job has to process", m.job_total.clone());
        r.register("job_rate_bytes_per_second", "Current rate of a running job", m.job_rate.clone());
        r.register("job_state", "1 for the state a running job is in", m.job_state.clone());
        r.register(
            "jobs_concluded",
            "Jobs concluded since the agent's state (STATE_DIR/jobs) began, by kind and result",
            m.jobs_concluded.clone(),
        );
        r.register(
            "backup_last_success_timestamp_seconds",
            "When the last successful backup of the disk ended",
            m.backup_last.clone(),
        );
        r.register("backup_last_written_bytes", "Bytes the last successful backup wrote", m.backup_bytes.clone());
        r.register(
            "backup_chain_length",
            "Backup snapshots on the disk's target after its last backup",
            m.backup_chain.clone(),
        );
        r.register("mirror_last_sent_bytes", "Bytes the last completed mirror of the disk sent", m.mirror_sent.clone());
        r.register("migration_last_downtime_seconds", "Write downtime of the disk's last cut-over", m.downtime.clone());
        // Every kind's counters exist from the start at 0, so the first failure of a kind is an
        // increase (rate() and increase() miss a series that appears at 1).
        for kind in ["backup", "verify", "mirror", "stream", "restore"] {
            for result in ["success", "failed", "cancelled"] {
                drop(m.jobs_concluded.get_or_create(&ResultLabel { kind: kind.into(), result: result.into() }));
            }
        }
        Arc::new(Self { registry, ..m })
    }

    /// Per-session handles for the NBD data path of `disk`.
    pub fn nbd(self: &Arc<Self>, disk: &str) -> NbdMetrics {
        let label = |op| DiskOp { disk: disk.to_owned(), op };
        let d = DiskLabel { disk: disk.to_owned() };
        let conn = self.connections.get_or_create_owned(&d);
        conn.inc();
        NbdMetrics {
            requests: OPS.map(|op| self.requests.get_or_create_owned(&label(op))),
            bytes: OPS.map(|op| self.bytes.get_or_create_owned(&label(op))),
            errors: OPS.map(|op| self.errors.get_or_create_owned(&label(op))),
            latency: OPS.map(|op| self.latency.get_or_create_owned(&label(op))),
            inflight: self.inflight.get_or_create_owned(&d),
            connections: conn,
        }
    }

    /// Reads state from the owners and encodes everything, as OpenMetrics
    /// text or (`openmetrics: false`) Prometheus text 0.0.4.
    pub fn encode(&self, exports: &Exports, jobs: &JobManager, openmetrics: bool) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(exports, jobs);
        let mut out = String::new();
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = encoded {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }

    fn refresh(&self, exports: &Exports, jobs: &JobManager) {
        for f in [&self.bitmap_dirty, &self.bitmap_granularity, &self.bitmap_consistent] {
            f.clear();
        }
        self.disk_size.clear();
        for e in exports.list() {
            let disk = e.name().to_owned();
            set(&self.disk_size, DiskLabel { disk: disk.clone() }, e.size());
            for b in e.bitmaps().list() {
                let l = BitmapLabel { disk: disk.clone(), bitmap: b.name.clone() };
                set(&self.bitmap_dirty, l.clone(), b.dirty_bytes);
                set(&self.bitmap_granularity, l.clone(), b.granularity);
                set(&self.bitmap_consistent, l, u64::from(b.consistent));
            }
        }
        for f in [&self.job_done, &self.job_total, &self.job_rate] {
            f.clear();
        }
        self.job_state.clear();
        let mut concluded: std::collections::HashMap<ResultLabel, u64> = Default::default();
        for f in [&self.backup_last, &self.backup_bytes, &self.backup_chain, &self.mirror_sent] {
            f.clear();
        }
        self.downtime.clear();
        for r in jobs.list(true) {
            if r.state != JobState::Concluded {
                let l = JobLabel { job_id: r.id.clone(), kind: r.kind.clone(), disk: r.disk.clone() };
                set(&self.job_done, l.clone(), r.bytes_done);
                set(&self.job_total, l.clone(), r.bytes_total);
                set(&self.job_rate, l, r.rate);
                let state =
                    serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                set(&self.job_state, JobStateLabel { job_id: r.id, kind: r.kind, disk: r.disk, state }, 1);
                continue;
            }
            let result =
                serde_json::to_value(r.result).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            *concluded.entry(ResultLabel { kind: r.kind.clone(), result }).or_default() += 1;
            if r.result != Some(JobResult::Success) {
                continue;
            }
            let d = DiskLabel { disk: r.disk.clone() };
            match r.kind.as_str() {
                "backup" => {
                    set(&self.backup_last, d.clone(), r.finished_at.unwrap_or(0));
                    set(&self.backup_bytes, d.clone(), r.summary["bytes_written"].as_u64().unwrap_or(0));
                    if let Some(n) = r.summary["chain_length"].as_u64() {
                        set(&self.backup_chain, d, n);
                    }
                }
                "mirror" => {
                    set(&self.mirror_sent, d.clone(), r.summary["bytes_sent"].as_u64().unwrap_or(0));
                    let ms = r.summary["downtime_ms"].as_u64().unwrap_or(0);
                    self.downtime.get_or_create(&d).set(ms as f64 / 1000.0);
                }
                _ => {}
            }
        }
        // The job history is never pruned, so these counts only grow: the counters follow them.
        for (label, n) in concluded {
            let counter = self.jobs_concluded.get_or_create(&label);
            counter.inc_by(n.saturating_sub(counter.get()));
        }
    }
}

fn set<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>(
    f: &Family<L, Gauge>,
    l: L,
    v: u64,
) {
    f.get_or_create(&l).set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// One NBD session's handles.
#[derive(Debug)]
pub struct NbdMetrics {
    requests: [Counter; 8],
    bytes: [Counter; 8],
    errors: [Counter; 8],
    latency: [Histogram; 8],
    inflight: Gauge,
    connections: Gauge,
}

impl NbdMetrics {
    /// A request started.
    pub fn start(&self) -> Instant {
        self.inflight.inc();
        Instant::now()
    }

    /// A request of kind `op` (index into [`OPS`]) ended.
    pub fn done(&self, op: usize, bytes: u64, ok: bool, started: Instant) {
        self.inflight.dec();
        let op = op.min(OPS.len() - 1);
        self.requests[op].inc();
        self.bytes[op].inc_by(bytes);
        if !ok {
            self.errors[op].inc();
        }
        self.latency[op].observe(started.elapsed().as_secs_f64());
    }
}

impl Drop for NbdMetrics {
    fn drop(&mut self) {
        self.connections.dec();
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown`.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    exports: Arc<Exports>,
    jobs: Arc<JobManager>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let (m, e, j) = (metrics.clone(), exports.clone(), jobs.clone());
            let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let open = accept.contains("application/openmetrics-text");
            async move {
                let body = tokio::task::spawn_blocking(move || m.encode(&e, &j, open)).await.unwrap_or_default();
                let ty = if open { CONTENT_TYPE } else { prometheus_client::encoding::prometheus_text::CONTENT_TYPE };
                ([(axum::http::header::CONTENT_TYPE, ty)], body).into_response()
            }
        }),
    );
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    }))
}
