//! The `rbdsync` client commands: parse arguments, call the control API,
//! print a table (or JSON with `--json`). Exit status is non-zero on any
//! failure.

mod jobs;
mod migrate;

use std::path::Path;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::api::client::{call, ClientError, Endpoint};
use crate::config::{format_size, parse_size, AgentConfig, ListenAddr};

/// Default agent configuration read to find the control socket.
pub const DEFAULT_AGENT_CONFIG: &str = "/etc/rbdsync/agent.yaml";

/// Client subcommands.
#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// Agent status.
    Status,
    /// Disks served by the agent, with their bitmaps.
    Disks,
    /// Dirty bitmaps of a disk.
    #[command(subcommand)]
    Bitmap(BitmapCmd),
    /// Act on a served disk: resize.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Back up a disk (VM/DISK) or all disks of a VM (VM) as one group.
    Backup(jobs::BackupArgs),
    /// Restore points of a disk: the backup snapshots on its target, oldest first.
    Backups {
        /// Disk as VM/DISK.
        disk: String,
    },
    /// Create a disk whose image is absent from a backup snapshot (on any host); --live serves it at once.
    Restore(jobs::RestoreArgs),
    /// Mirror a disk to another agent's NBD export (full, top or incremental).
    Mirror(jobs::MirrorArgs),
    /// Copy the rest of a layered disk from its backing, then detach it.
    Stream(jobs::StreamArgs),
    /// Compare a disk, as it is now, with an image or snapshot.
    Verify(jobs::VerifyArgs),
    /// Migrate a VM to another agent: incremental mirror seeded from the bitmap, cut-over, stream.
    Migrate(migrate::MigrateArgs),
    /// The outgoing migrations this agent holds: list, show, cutover, abort.
    #[command(subcommand)]
    Migration(migrate::MigrationCmd),
    /// List jobs.
    Jobs {
        /// Include concluded jobs.
        #[arg(long)]
        all: bool,
    },
    /// Show or control one job.
    #[command(subcommand)]
    Job(jobs::JobCmd),
    /// Follow job and migration events as they happen (one line each; --json: one JSON object each).
    Events,
}

/// `rbdsync bitmap ...`
#[derive(Debug, Subcommand)]
pub enum BitmapCmd {
    /// Add a bitmap that records writes from now on.
    Add {
        /// Disk as VM/DISK.
        disk: String,
        /// Bitmap name.
        name: String,
        /// Bytes per bit (power of two, 4KiB to 64MiB).
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        granularity: u64,
        /// Create it disabled (not recording).
        #[arg(long)]
        disabled: bool,
    },
    /// Remove a bitmap (also allowed for inconsistent ones).
    Remove {
        /// Disk as VM/DISK.
        disk: String,
        /// Bitmap name.
        name: String,
    },
    /// Forget every recorded write (bumps the generation).
    Clear {
        /// Disk as VM/DISK.
        disk: String,
        /// Bitmap name.
        name: String,
    },
    /// Start recording writes.
    Enable {
        /// Disk as VM/DISK.
        disk: String,
        /// Bitmap name.
        name: String,
    },
    /// Stop recording writes.
    Disable {
        /// Disk as VM/DISK.
        disk: String,
        /// Bitmap name.
        name: String,
    },
    /// Merge source bitmaps into a target bitmap.
    Merge {
        /// Disk as VM/DISK.
        disk: String,
        /// Target bitmap.
        target: String,
        /// Source bitmaps.
        #[arg(required = true)]
        sources: Vec<String>,
    },
    /// List a disk's bitmaps.
    List {
        /// Disk as VM/DISK.
        disk: String,
    },
}

/// `rbdsync disk ...`
#[derive(Debug, Subcommand)]
pub enum DiskCmd {
    /// Grow a disk while it is served (NBD clients see the new size when they reconnect).
    Resize {
        /// Disk as VM/DISK.
        disk: String,
        /// New size (bytes or 30GiB and the like; grow only, a multiple of 512).
        #[arg(value_parser = parse_size)]
        size: u64,
    },
}

/// The control endpoint: `--control`, else `RBDSYNC_CONTROL` (clap), else
/// the first control listener of `/etc/rbdsync/agent.yaml`, else the default socket.
pub fn resolve_endpoint(explicit: Option<&str>) -> Result<Endpoint, String> {
    if let Some(addr) = explicit {
        return addr.parse();
    }
    let from_config = Path::new(DEFAULT_AGENT_CONFIG)
        .exists()
        .then(|| AgentConfig::load(Path::new(DEFAULT_AGENT_CONFIG)).ok())
        .flatten()
        .and_then(|c| c.control.listen.into_iter().next());
    match from_config {
        Some(ListenAddr::Unix(p)) => Ok(Endpoint::Unix(p)),
        Some(ListenAddr::Tcp(a)) => Ok(Endpoint::Https(a.to_string(), Default::default())),
        None => crate::config::DEFAULT_CONTROL_LISTEN.parse(),
    }
}

fn disk_path(disk: &str) -> Result<String, ClientError> {
    match disk.split_once('/') {
        Some((vm, d)) if !vm.is_empty() && !d.is_empty() && !d.contains('/') => Ok(format!("/v1/disks/{vm}/{d}")),
        _ => Err(ClientError::Api {
            status: 0,
            code: "usage".into(),
            message: format!("bad disk name {disk:?} (expected VM/DISK)"),
        }),
    }
}

/// Runs a client command; prints its result.
pub async fn run(endpoint: &Endpoint, json_out: bool, cmd: ClientCmd) -> Result<(), ClientError> {
    let (value, render): (Value, fn(&Value) -> String) = match cmd {
        ClientCmd::Status => (call(endpoint, "GET", "/v1/status", None).await?, render_status),
        ClientCmd::Disks => (call(endpoint, "GET", "/v1/disks", None).await?, render_disks),
        ClientCmd::Bitmap(b) => bitmap(endpoint, b).await?,
        ClientCmd::Disk(DiskCmd::Resize { disk, size }) => {
            let path = format!("{}/resize", disk_path(&disk)?);
            (call(endpoint, "POST", &path, Some(json!({ "size": size }))).await?, |v| {
                let table = render_disks(&json!([v]));
                format!("{table}Connected NBD clients see the new size when they reconnect.\n")
            })
        }
        ClientCmd::Backup(args) => return jobs::backup(endpoint, json_out, args).await,
        ClientCmd::Backups { disk } => {
            (call(endpoint, "GET", &format!("{}/backups", disk_path(&disk)?), None).await?, render_backups)
        }
        ClientCmd::Stream(args) => return jobs::stream(endpoint, json_out, args).await,
        ClientCmd::Restore(args) => return jobs::restore(endpoint, json_out, args).await,
        ClientCmd::Verify(args) => return jobs::verify(endpoint, json_out, args).await,
        ClientCmd::Mirror(args) => return jobs::mirror(endpoint, json_out, args).await,
        ClientCmd::Migrate(args) => return migrate::migrate(endpoint, json_out, args).await,
        ClientCmd::Migration(cmd) => return migrate::migration(endpoint, json_out, cmd).await,
        ClientCmd::Jobs { all } => {
            (call(endpoint, "GET", &format!("/v1/jobs?all={all}"), None).await?, jobs::render_jobs)
        }
        ClientCmd::Job(cmd) => return jobs::job(endpoint, json_out, cmd).await,
        ClientCmd::Events => {
            return crate::api::client::follow_events(endpoint, |e| {
                use std::io::Write;
                let line = if json_out { e.to_string() } else { render_event(&e) };
                // A closed stdout (`rbdsync events | head`) ends the command.
                writeln!(std::io::stdout(), "{line}").and_then(|()| std::io::stdout().flush()).is_ok()
            })
            .await;
        }
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    } else {
        print!("{}", render(&value));
    }
    Ok(())
}

async fn bitmap(endpoint: &Endpoint, cmd: BitmapCmd) -> Result<(Value, fn(&Value) -> String), ClientError> {
    let one: fn(&Value) -> String = |v| render_bitmaps(&json!([v]));
    Ok(match cmd {
        BitmapCmd::Add { disk, name, granularity, disabled } => {
            let body = json!({"name": name, "granularity": granularity, "disabled": disabled});
            (call(endpoint, "POST", &format!("{}/bitmaps", disk_path(&disk)?), Some(body)).await?, one)
        }
        BitmapCmd::Remove { disk, name } => {
            let v = call(endpoint, "DELETE", &format!("{}/bitmaps/{name}", disk_path(&disk)?), None).await?;
            (v, |_| String::new())
        }
        BitmapCmd::Clear { disk, name } => (action(endpoint, &disk, &name, "clear", None).await?, one),
        BitmapCmd::Enable { disk, name } => (action(endpoint, &disk, &name, "enable", None).await?, one),
        BitmapCmd::Disable { disk, name } => (action(endpoint, &disk, &name, "disable", None).await?, one),
        BitmapCmd::Merge { disk, target, sources } => {
            (action(endpoint, &disk, &target, "merge", Some(json!({ "sources": sources }))).await?, one)
        }
        BitmapCmd::List { disk } => {
            (call(endpoint, "GET", &format!("{}/bitmaps", disk_path(&disk)?), None).await?, render_bitmaps)
        }
    })
}

async fn action(
    endpoint: &Endpoint,
    disk: &str,
    name: &str,
    what: &str,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    call(endpoint, "POST", &format!("{}/bitmaps/{name}/{what}", disk_path(disk)?), body).await
}

fn render_status(v: &Value) -> String {
    format!(
        "node     {}\nversion  {}\npid      {}\nuptime   {}s\ndisks    {}\n",
        v["node"].as_str().unwrap_or("?"),
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        v["uptime_seconds"],
        v["disks"]
    )
}

fn size(v: &Value) -> String {
    v.as_u64().map(format_size).unwrap_or_else(|| "?".into())
}

fn render_disks(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let bitmaps: Vec<&str> =
                d["bitmaps"].as_array().into_iter().flatten().filter_map(|b| b["name"].as_str()).collect();
            vec![
                d["name"].as_str().unwrap_or("?").to_owned(),
                size(&d["size"]),
                if d["read_only"] == true { "ro" } else { "rw" }.to_owned(),
                bitmaps.join(","),
            ]
        })
        .collect();
    table(&["DISK", "SIZE", "MODE", "BITMAPS"], &rows)
}

fn render_bitmaps(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let state = if b["consistent"] != true {
                format!("inconsistent: {}", b["inconsistent_reason"].as_str().unwrap_or("?"))
            } else if b["busy"] == true {
                format!("busy ({})", b["busy_job"].as_str().unwrap_or("?"))
            } else if b["recording"] == true {
                "recording".into()
            } else {
                "disabled".into()
            };
            vec![
                b["name"].as_str().unwrap_or("?").to_owned(),
                size(&b["granularity"]),
                size(&b["dirty_bytes"]),
                b["generation"].to_string(),
                state,
            ]
        })
        .collect();
    table(&["NAME", "GRANULARITY", "DIRTY", "GEN", "STATE"], &rows)
}

fn render_backups(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["restore_points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let when = p["point_in_time"].as_u64().map_or_else(|| "?".into(), utc);
            vec![
                p["position"].to_string(),
                p["snapshot"].as_str().unwrap_or("?").to_owned(),
                when,
                p["sync"].as_str().unwrap_or("?").to_owned(),
                size(&p["bytes_written"]),
                p["bitmap_generation"].as_u64().map_or_else(|| "-".into(), |g| g.to_string()),
                if p["base_of_next_incremental"] == true { "yes".into() } else { String::new() },
                p["holds"]
                    .as_array()
                    .map(|h| h.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = format!("{} -> {}\n", v["disk"].as_str().unwrap_or("?"), v["target"].as_str().unwrap_or("?"));
    out.push_str(&table(&["#", "SNAPSHOT", "TIME", "SYNC", "WRITTEN", "GEN", "NEXT BASE", "HOLDS"], &rows));
    if v["incremental_possible"] != true {
        out.push_str(&format!("next backup: full ({})\n", v["reason"].as_str().unwrap_or("no chain")));
    }
    out
}

/// One line for an event: time, what, state or progress.
fn render_event(e: &Value) -> String {
    let when = e["time_ms"].as_u64().map_or_else(|| "?".into(), |ms| utc(ms / 1000));
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
    match e["type"].as_str().unwrap_or("?") {
        "job" => {
            let outcome = e["result"].as_str().map(|r| format!(" {r}")).unwrap_or_default();
            let error = e["error"].as_str().map(|r| format!(": {r}")).unwrap_or_default();
            format!("{when} job {} {} {}{outcome}{error}", s("id"), s("disk"), s("state"))
        }
        "job_progress" => {
            format!("{when} job {} {} {}/{}", s("id"), s("disk"), size(&e["bytes_done"]), size(&e["bytes_total"]))
        }
        "migration" => format!("{when} migration {} ({}) {}", s("vm"), s("role"), s("state")),
        "disk" => format!("{when} disk {} {} {} -> {}", s("disk"), s("change"), size(&e["from"]), size(&e["size"])),
        "lagged" => format!("{when} missed {} events (too slow)", e["missed"]),
        "subscribed" => "following the agent's events".to_owned(),
        other => format!("{when} {other} {e}"),
    }
}

/// RFC 3339 (UTC, seconds) of a Unix time.
fn utc(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string()
}

/// Formats rows as an aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}
