//! `rbdsync migrate VM --to DEST` and `rbdsync migration ...`: clients of
//! the outgoing migration the source agent holds (see
//! `agent::api::outgoing`). `migrate` starts it and follows its states; the
//! agent carries it through (killing the CLI changes nothing).

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::jobs::human;
use crate::api::client::{call, ClientError, Endpoint};
use crate::config::parse_size;

/// `rbdsync migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// VM to migrate (all its disks).
    vm: String,
    /// Destination agent's control address (unix:PATH or https://HOST:PORT).
    #[arg(long)]
    to: String,
    /// Bitmap seeding the mirrors (default: each disk's backup.bitmap).
    #[arg(long)]
    bitmap: Option<String>,
    /// Mirror and stream speed limit, bytes/s.
    #[arg(long, value_parser = parse_size)]
    speed: Option<u64>,
    /// Cut over once fewer dirty bytes than this remain on every disk.
    #[arg(long, value_parser = parse_size, default_value = "16MiB")]
    ready_threshold: u64,
    /// Mirror copy mode at start: background (switches itself to
    /// write-blocking if it does not converge) or write-blocking.
    #[arg(long, default_value = "background", value_parser = ["background", "write-blocking"])]
    copy_mode: String,
    /// Compare destination and source at cut-over (reads both disks in full; adds to the downtime).
    #[arg(long)]
    verify: bool,
    /// Do not start the stream jobs on the destination.
    #[arg(long)]
    no_stream: bool,
    /// What starts the cut-over once every disk is ready: auto (at once),
    /// manual (`rbdsync migration cutover VM`), first-io (the first IO a
    /// client sends on the destination, i.e. the VM resumed there).
    #[arg(long, default_value = "auto", value_parser = ["auto", "manual", "first-io"])]
    cutover: String,
    /// With manual or first-io: wait until the migration ended (else return once ready).
    #[arg(long)]
    wait: bool,
    /// Mirror whole disks onto plain destination images (no backup needed).
    #[arg(long)]
    full: bool,
    /// Destination image per disk, with {vm} and {disk} filled in, e.g.
    /// `rbd:vms/{vm}-{disk}` for an RBD clone of the backup (default: a
    /// `file:` image under the destination's state_dir).
    #[arg(long)]
    dest_image: Option<String>,
}

/// `rbdsync migration ...`: the outgoing migrations of the agent.
#[derive(Debug, Subcommand)]
pub enum MigrationCmd {
    /// Every outgoing migration (running and ended).
    List,
    /// One VM's outgoing migration.
    Show {
        /// VM name.
        vm: String,
    },
    /// Cut a ready migration over now (all the VM's disks together).
    Cutover {
        /// VM name.
        vm: String,
        /// Return at once instead of waiting for the outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Roll the migration back: the source keeps serving the VM's disks.
    Abort {
        /// VM name.
        vm: String,
    },
}

fn fail(message: String) -> ClientError {
    ClientError::Api { status: 0, code: "migration_failed".into(), message }
}

fn say(json_out: bool, msg: &str) {
    if !json_out {
        eprintln!("migrate: {msg}");
    }
}

pub async fn migrate(source: &Endpoint, json_out: bool, a: MigrateArgs) -> Result<(), ClientError> {
    let body = json!({
        "vm": a.vm, "to": a.to, "bitmap": a.bitmap, "speed": a.speed, "ready_threshold": a.ready_threshold,
        "copy_mode": a.copy_mode, "cutover": a.cutover, "full": a.full, "verify": a.verify,
        "stream": !a.no_stream, "dest_image": a.dest_image,
    });
    let started = call(source, "POST", "/v1/migrations/outgoing", Some(body)).await?;
    say(
        json_out,
        &format!(
            "mirroring {} disk(s) to {} (migration {})",
            started["disks"].as_array().map_or(0, Vec::len),
            a.to,
            started["id"].as_str().unwrap_or("?")
        ),
    );
    let until_ready = a.cutover != "auto" && !a.wait;
    let record = follow(source, json_out, &a.vm, started, until_ready).await?;
    finish(json_out, &record)
}

/// Follows the migration's states (printing each) until it ended, or
/// until it is ready when `until_ready`.
async fn follow(
    source: &Endpoint,
    json_out: bool,
    vm: &str,
    mut r: Value,
    until_ready: bool,
) -> Result<Value, ClientError> {
    let mut last = String::new();
    loop {
        let state = r["state"].as_str().unwrap_or("?").to_owned();
        if state != last {
            say(
                json_out,
                &match state.as_str() {
                    "ready" => format!(
                        "ready: every disk mirrored in write-blocking mode ({})",
                        match r["cutover"].as_str() {
                            Some("manual") => format!("cut over with `rbdsync migration cutover {vm}`"),
                            Some("first-io") => "cuts over on the destination's first IO".into(),
                            _ => "cutting over".into(),
                        }
                    ),
                    "cutting-over" => "cutting over".into(),
                    other => other.to_owned(),
                },
            );
            last = state.clone();
        }
        if matches!(state.as_str(), "completed" | "aborted" | "failed") || (until_ready && state == "ready") {
            return Ok(r);
        }
        r = call(source, "GET", &format!("/v1/migrations/outgoing/{vm}?wait={state}&timeout=30"), None).await?;
    }
}

/// Prints the outcome; an aborted or failed migration is an error.
fn finish(json_out: bool, r: &Value) -> Result<(), ClientError> {
    let summary = summarize(r);
    match r["state"].as_str() {
        Some("completed" | "ready") => {
            if json_out {
                println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
            } else {
                print_summary(&summary);
            }
            Ok(())
        }
        _ => {
            let source = if r["fence_due"] == true {
                "the source disks stay fenced (the destination serves them)"
            } else {
                "the source is unchanged and keeps serving its disks"
            };
            Err(fail(format!(
                "migration of {} {}: {}; {source}",
                r["vm"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?"),
                r["error"].as_str().unwrap_or("?")
            )))
        }
    }
}

/// `rbdsync migration ...`.
pub async fn migration(source: &Endpoint, json_out: bool, cmd: MigrationCmd) -> Result<(), ClientError> {
    match cmd {
        MigrationCmd::List => {
            let list = call(source, "GET", "/v1/migrations/outgoing", None).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                println!("{:<16} {:<13} {:<9} {:>10} TO", "VM", "STATE", "CUTOVER", "DOWNTIME");
                for r in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {:<13} {:<9} {:>10} {}",
                        r["vm"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                        r["cutover"].as_str().unwrap_or("?"),
                        r["downtime_ms"].as_u64().map_or("-".into(), |d| format!("{d} ms")),
                        r["to"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(())
        }
        MigrationCmd::Show { vm } => {
            let r = call(source, "GET", &format!("/v1/migrations/outgoing/{vm}"), None).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print_summary(&summarize(&r));
                if let Some(e) = r["error"].as_str() {
                    println!("  error: {e}");
                }
            }
            Ok(())
        }
        MigrationCmd::Cutover { vm, no_wait } => {
            let r = call(source, "POST", &format!("/v1/migrations/outgoing/{vm}/cutover"), None).await?;
            if no_wait && !matches!(r["state"].as_str(), Some("failed" | "aborted")) {
                // Asked for; not over yet.
                if json_out {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    print_summary(&summarize(&r));
                }
                return Ok(());
            }
            if no_wait {
                return finish(json_out, &r);
            }
            let r = follow(source, json_out, &vm, r, false).await?;
            finish(json_out, &r)
        }
        MigrationCmd::Abort { vm } => {
            let r = call(source, "POST", &format!("/v1/migrations/outgoing/{vm}/abort"), None).await?;
            let r = follow(source, true, &vm, r, false).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "migration of {vm}: {} ({})",
                    r["state"].as_str().unwrap_or("?"),
                    r["error"].as_str().unwrap_or("")
                );
            }
            // Done only if it ended aborted (a first-io migration past its trigger completes).
            match r["state"].as_str() {
                Some("aborted") => Ok(()),
                other => Err(fail(format!("migration of {vm} ended {}, not aborted", other.unwrap_or("?")))),
            }
        }
    }
}

fn summarize(r: &Value) -> Value {
    let disks: Vec<Value> = r["disks"].as_array().cloned().unwrap_or_default();
    let max = disks.iter().filter_map(|d| d["downtime_ms"].as_u64()).max();
    json!({
        "vm": r["vm"], "migration": r["id"], "state": r["state"], "cutover": r["cutover"], "disks": disks,
        "max_downtime_ms": max, "downtime_ms": r["downtime_ms"], "verified": r["verify"],
        "duration_ms": r["duration_ms"], "stream_jobs": r["stream_jobs"], "error": r["error"],
    })
}

fn print_summary(s: &Value) {
    println!(
        "migration of {} ({}): {}; {} ms; downtime {} ms (disks held {} ms); verified: {}",
        s["vm"].as_str().unwrap_or("?"),
        s["migration"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        s["duration_ms"],
        s["downtime_ms"],
        s["max_downtime_ms"],
        s["verified"]
    );
    for d in s["disks"].as_array().into_iter().flatten() {
        let (sent, size) = (d["bytes_sent"].as_u64().unwrap_or(0), d["disk_size"].as_u64().unwrap_or(0));
        println!(
            "  {}: sent {} of {} ({:.1}%), downtime {} ms",
            d["disk"].as_str().unwrap_or("?"),
            human(sent),
            human(size),
            sent as f64 * 100.0 / size.max(1) as f64,
            d["downtime_ms"]
        );
    }
    println!("  stream jobs on the destination: {}", s["stream_jobs"]);
}
