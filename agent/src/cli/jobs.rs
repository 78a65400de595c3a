//! Job commands: backup, verify, jobs, job show/pause/resume/cancel/complete/set-speed/wait.

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::table;
use crate::api::client::{call, ClientError, Endpoint};
use crate::config::parse_size;

/// `rbdsync backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// VM/DISK, or VM for all its disks (committed together).
    disk: String,
    /// full or incremental (default: incremental when a bitmap is known, full if it cannot be).
    #[arg(long, value_enum)]
    sync: Option<Sync>,
    /// Bitmap tied to the backup chain (default: the disk's backup.bitmap).
    #[arg(long)]
    bitmap: Option<String>,
    /// Target image, e.g. rbd:backup/vm1-disk0 (default: the disk's backup.target).
    #[arg(long)]
    target: Option<String>,
    /// Speed limit in bytes/s (e.g. 100MiB).
    #[arg(long, value_parser = parse_size)]
    speed: Option<u64>,
    /// Fall back to a full backup when an incremental one is impossible.
    #[arg(long)]
    auto: bool,
    /// Wait for the job(s) and show progress; exit non-zero on failure.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sync {
    Full,
    Incremental,
}

/// `rbdsync mirror`.
#[derive(Debug, Args)]
pub struct MirrorArgs {
    /// VM/DISK.
    disk: String,
    /// Destination export: nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long)]
    target: String,
    /// full, top or incremental (incremental copies only the bitmap's dirty blocks).
    #[arg(long, value_parser = ["full", "top", "incremental"])]
    sync: String,
    /// Bitmap seeding an incremental mirror.
    #[arg(long)]
    bitmap: Option<String>,
    /// background or write-blocking.
    #[arg(long, value_parser = ["background", "write-blocking"], default_value = "background")]
    copy_mode: String,
    /// Ready once fewer dirty bytes remain (default 16MiB).
    #[arg(long, value_parser = parse_size)]
    ready_threshold: Option<u64>,
    /// Speed limit in bytes/s.
    #[arg(long, value_parser = parse_size)]
    speed: Option<u64>,
    /// Wait until the mirror is ready (or ends); exit non-zero if it failed.
    #[arg(long)]
    wait: bool,
}

/// `rbdsync stream`.
#[derive(Debug, Args)]
pub struct StreamArgs {
    /// VM/DISK (a disk layered over a backing image, e.g. after a migration).
    disk: String,
    /// Speed limit in bytes/s.
    #[arg(long, value_parser = parse_size)]
    speed: Option<u64>,
    /// Bytes per unit of work (default 4MiB).
    #[arg(long, value_parser = parse_size)]
    chunk: Option<u64>,
    /// Wait and show progress; exit non-zero on failure.
    #[arg(long)]
    wait: bool,
}

/// `rbdsync restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// VM/DISK: configured in a VM file on this host, its image absent.
    disk: String,
    /// The backup snapshot, URI@SNAP (see `rbdsync backups`), e.g. rbd:backup/vm1-disk0@rbdsync-...
    #[arg(long)]
    from: String,
    /// Serve the disk at once, layered on the snapshot, while the rest is copied in the background.
    #[arg(long)]
    live: bool,
    /// Speed limit in bytes/s.
    #[arg(long, value_parser = parse_size)]
    speed: Option<u64>,
    /// Wait and show progress; exit non-zero on failure.
    #[arg(long)]
    wait: bool,
}

/// `rbdsync verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// VM/DISK.
    disk: String,
    /// Image or snapshot to compare with (URI[@SNAP]).
    #[arg(long)]
    against: String,
    /// Speed limit in bytes/s.
    #[arg(long, value_parser = parse_size)]
    speed: Option<u64>,
    /// Wait and show progress; exit non-zero on mismatch or failure.
    #[arg(long)]
    wait: bool,
}

/// `rbdsync job ...`
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Show a job.
    Show {
        /// Job id.
        id: String,
    },
    /// Pause at the next chunk.
    Pause {
        /// Job id.
        id: String,
    },
    /// Resume a paused job.
    Resume {
        /// Job id.
        id: String,
    },
    /// Cancel (nothing is lost: bitmaps keep their bits).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Complete a ready job (mirror cut-over).
    Complete {
        /// Job id.
        id: String,
    },
    /// Change the speed limit (bytes/s, 0 = unlimited).
    SetSpeed {
        /// Job id.
        id: String,
        /// Bytes per second.
        #[arg(value_parser = parse_size)]
        speed: u64,
    },
    /// Switch a mirror between background and write-blocking copying.
    SetCopyMode {
        /// Job id.
        id: String,
        /// background or write-blocking.
        #[arg(value_parser = ["background", "write-blocking"])]
        mode: String,
    },
    /// Wait for a job, showing progress; exit non-zero unless it succeeds.
    Wait {
        /// Job id.
        id: String,
    },
}

pub async fn backup(endpoint: &Endpoint, json_out: bool, a: BackupArgs) -> Result<(), ClientError> {
    let sync = a.sync.map(|s| match s {
        Sync::Full => "full",
        Sync::Incremental => "incremental",
    });
    let body = json!({
        "kind": "backup", "disk": a.disk, "sync": sync, "bitmap": a.bitmap, "target": a.target,
        "speed": a.speed, "auto": a.auto,
    });
    let started = call(endpoint, "POST", "/v1/jobs", Some(body)).await?;
    finish(endpoint, json_out, started, a.wait).await
}

pub async fn mirror(endpoint: &Endpoint, json_out: bool, a: MirrorArgs) -> Result<(), ClientError> {
    let body = json!({
        "kind": "mirror", "disk": a.disk, "target": a.target, "sync": a.sync, "bitmap": a.bitmap,
        "copy_mode": a.copy_mode, "ready_threshold": a.ready_threshold, "speed": a.speed,
    });
    let started = call(endpoint, "POST", "/v1/jobs", Some(body)).await?;
    if !a.wait {
        print_jobs(json_out, &[started]);
        return Ok(());
    }
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    let j = wait_until(endpoint, &id, json_out, |j| j["state"] == "ready").await?;
    print_jobs(json_out, std::slice::from_ref(&j));
    if j["state"] == "concluded" {
        return check_success(&[j]);
    }
    Ok(())
}

pub async fn stream(endpoint: &Endpoint, json_out: bool, a: StreamArgs) -> Result<(), ClientError> {
    let body = json!({ "kind": "stream", "disk": a.disk, "speed": a.speed, "chunk": a.chunk });
    let started = call(endpoint, "POST", "/v1/jobs", Some(body)).await?;
    finish(endpoint, json_out, started, a.wait).await
}

pub async fn restore(endpoint: &Endpoint, json_out: bool, a: RestoreArgs) -> Result<(), ClientError> {
    let body = json!({ "kind": "restore", "disk": a.disk, "from": a.from, "live": a.live, "speed": a.speed });
    let started = call(endpoint, "POST", "/v1/jobs", Some(body)).await?;
    finish(endpoint, json_out, started, a.wait).await
}

pub async fn verify(endpoint: &Endpoint, json_out: bool, a: VerifyArgs) -> Result<(), ClientError> {
    let body = json!({ "kind": "verify", "disk": a.disk, "against": a.against, "speed": a.speed });
    let started = call(endpoint, "POST", "/v1/jobs", Some(body)).await?;
    finish(endpoint, json_out, started, a.wait).await
}

/// Prints started job(s), or waits for them.
async fn finish(endpoint: &Endpoint, json_out: bool, started: Value, wait: bool) -> Result<(), ClientError> {
    let jobs: Vec<Value> = match started {
        Value::Array(v) => v,
        one => vec![one],
    };
    if !wait {
        print_jobs(json_out, &jobs);
        let failed: Vec<Value> = jobs.iter().filter(|j| j["state"] == "concluded").cloned().collect();
        return check_success(&failed);
    }
    let mut done = Vec::new();
    for j in &jobs {
        done.push(wait_for(endpoint, j["id"].as_str().unwrap_or_default(), json_out).await?);
    }
    print_jobs(json_out, &done);
    check_success(&done)
}

fn print_jobs(json_out: bool, jobs: &[Value]) {
    if json_out {
        let v = if jobs.len() == 1 { jobs[0].clone() } else { Value::Array(jobs.to_vec()) };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", render_jobs(&Value::Array(jobs.to_vec())));
    }
}

fn check_success(jobs: &[Value]) -> Result<(), ClientError> {
    for j in jobs {
        if j["result"] != "success" {
            let message = format!(
                "job {} {}: {}",
                j["id"].as_str().unwrap_or("?"),
                j["result"].as_str().unwrap_or("?"),
                j["error"].as_str().unwrap_or("")
            );
            let code = if j["kind"] == "verify" && j["detail"]["differing_bytes"].as_u64().is_some_and(|n| n > 0) {
                "verify_differs"
            } else {
                "job_failed"
            };
            return Err(ClientError::Api { status: 0, code: code.into(), message });
        }
    }
    Ok(())
}

/// Polls a job until it concludes.
async fn wait_for(endpoint: &Endpoint, id: &str, quiet: bool) -> Result<Value, ClientError> {
    wait_until(endpoint, id, quiet, |_| false).await
}

/// Polls a job until it concludes or `stop` holds, with a progress bar on a
/// terminal and plain progress lines otherwise.
pub async fn wait_until(
    endpoint: &Endpoint,
    id: &str,
    quiet: bool,
    stop: impl Fn(&Value) -> bool,
) -> Result<Value, ClientError> {
    let tty = std::io::stderr().is_terminal() && !quiet;
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_prefix(id.to_owned());
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_line = std::time::Instant::now();
    loop {
        // A long poll: the agent answers at the job's end at once, or after 200 ms with its progress.
        let asked = std::time::Instant::now();
        let j = call(endpoint, "GET", &format!("/v1/jobs/{id}?wait_ms=200"), None).await?;
        let (done, total) = (j["bytes_done"].as_u64().unwrap_or(0), j["bytes_total"].as_u64().unwrap_or(0));
        bar.set_length(total);
        bar.set_position(done);
        if j["state"] == "concluded" || stop(&j) {
            bar.finish_and_clear();
            return Ok(j);
        }
        if !tty && !quiet && last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "{id}: {} {}/{} ({}/s)",
                j["state"].as_str().unwrap_or("?"),
                human(done),
                human(total),
                human(j["rate"].as_u64().unwrap_or(0))
            );
            last_line = std::time::Instant::now();
        }
        // An agent that does not hold the request (an older one) is not asked in a busy loop.
        tokio::time::sleep(Duration::from_millis(200).saturating_sub(asked.elapsed())).await;
    }
}

pub async fn job(endpoint: &Endpoint, json_out: bool, cmd: JobCmd) -> Result<(), ClientError> {
    let (id, action, body) = match cmd {
        JobCmd::Show { id } => {
            let j = call(endpoint, "GET", &format!("/v1/jobs/{id}"), None).await?;
            print_jobs(json_out, &[j]);
            return Ok(());
        }
        JobCmd::Wait { id } => {
            let j = wait_for(endpoint, &id, json_out).await?;
            print_jobs(json_out, std::slice::from_ref(&j));
            return check_success(&[j]);
        }
        JobCmd::Pause { id } => (id, "pause", None),
        JobCmd::Resume { id } => (id, "resume", None),
        JobCmd::Cancel { id } => (id, "cancel", None),
        JobCmd::Complete { id } => (id, "complete", None),
        JobCmd::SetSpeed { id, speed } => (id, "speed", Some(json!({ "speed": speed }))),
        JobCmd::SetCopyMode { id, mode } => (id, "copy-mode", Some(json!({ "copy_mode": mode }))),
    };
    let j = call(endpoint, "POST", &format!("/v1/jobs/{id}/{action}"), body).await?;
    print_jobs(json_out, &[j]);
    Ok(())
}

/// Bytes with one decimal in the largest fitting binary unit.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// Jobs as a table.
pub fn render_jobs(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| {
            let state = match j["result"].as_str() {
                Some(r) => r.to_owned(),
                None => j["state"].as_str().unwrap_or("?").to_owned(),
            };
            let (done, total) = (j["bytes_done"].as_u64().unwrap_or(0), j["bytes_total"].as_u64().unwrap_or(0));
            let pct = (done * 100).checked_div(total).map_or_else(|| "-".to_owned(), |p| format!("{p}%"));
            let detail = j["error"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| j["summary"]["snapshot"].as_str().map(str::to_owned))
                .unwrap_or_default();
            vec![
                j["id"].as_str().unwrap_or("?").into(),
                j["disk"].as_str().unwrap_or("?").into(),
                state,
                format!("{}/{}", human(done), human(total)),
                pct,
                detail,
            ]
        })
        .collect();
    table(&["ID", "DISK", "STATE", "BYTES", "DONE", "DETAIL"], &rows)
}
