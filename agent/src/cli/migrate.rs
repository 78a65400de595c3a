//! `rbdsync migrate VM --to DEST`: the whole incremental migration,
//! orchestrated from the CLI against both agents' control APIs.
//!
//! 1. source: each disk's backup chain must match its bitmap (the bitmap
//!    holds exactly the writes since the latest backup snapshot);
//! 2. destination: prepare (disks layered on those snapshots, hidden behind a token);
//! 3. source: incremental mirrors seeded from the bitmaps, until all are ready;
//! 4. all mirrors switch to write-blocking, then complete (source read-only);
//! 5. optionally verify destination against source;
//! 6. destination: activate and stream the rest from the backups.
//!
//! Any failure before step 4 cancels the mirrors and aborts the destination:
//! the source stays authoritative with every bitmap bit.

use std::time::{Duration, Instant};

use clap::Args;
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
    /// Compare destination and source at cut-over (reads both disks in full).
    #[arg(long)]
    verify: bool,
    /// Do not start the stream jobs on the destination.
    #[arg(long)]
    no_stream: bool,
    /// Destination image per disk, with {vm} and {disk} filled in, e.g.
    /// `rbd:vms/{vm}-{disk}` for an RBD clone of the backup (default: a
    /// `file:` image under the destination's state_dir).
    #[arg(long)]
    dest_image: Option<String>,
}

fn fail(message: String) -> ClientError {
    ClientError::Api { status: 0, code: "migration_failed".into(), message }
}

fn say(json_out: bool, msg: &str) {
    if !json_out {
        eprintln!("migrate: {msg}");
    }
}

/// Picks an NBD address of the destination reachable from here.
fn nbd_uri(prep: &Value, dest: &Endpoint, export: &str) -> Result<String, ClientError> {
    let s = if prep["nbd_tls"] == true { "s" } else { "" };
    let addrs: Vec<&str> = prep["nbd"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if let Some(tcp) = addrs.iter().find(|a| !a.starts_with("unix:")) {
        let host = match (tcp.rsplit_once(':'), dest) {
            (Some((ip, port)), Endpoint::Http(h) | Endpoint::Https(h)) if ip == "0.0.0.0" || ip == "[::]" => {
                format!("{}:{port}", h.rsplit_once(':').map_or(h.as_str(), |x| x.0))
            }
            _ => (*tcp).to_owned(),
        };
        return Ok(format!("nbd{s}://{host}/{export}"));
    }
    let unix = addrs
        .iter()
        .find_map(|a| a.strip_prefix("unix:"))
        .ok_or_else(|| fail("the destination serves NBD nowhere".into()))?;
    Ok(format!("nbd{s}+unix:///{export}?socket={unix}"))
}

pub async fn migrate(source: &Endpoint, json_out: bool, a: MigrateArgs) -> Result<(), ClientError> {
    let dest: Endpoint = a.to.parse().map_err(fail)?;
    let started = Instant::now();
    let disks: Vec<Value> = call(source, "GET", "/v1/disks", None).await?.as_array().cloned().unwrap_or_default();
    let disks: Vec<Value> = disks
        .into_iter()
        .filter(|d| d["name"].as_str().is_some_and(|n| n.starts_with(&format!("{}/", a.vm))))
        .collect();
    if disks.is_empty() {
        return Err(fail(format!("no disks of VM {} on the source", a.vm)));
    }
    let mut plan = Vec::new();
    for d in &disks {
        let name = d["name"].as_str().unwrap_or_default();
        let query = a.bitmap.as_ref().map(|b| format!("?bitmap={b}")).unwrap_or_default();
        let chain = call(source, "GET", &format!("/v1/disks/{name}/chain{query}"), None).await?;
        if chain["matches"] != true {
            return Err(fail(format!(
                "{name}: cannot mirror incrementally: {}",
                chain["reason"].as_str().unwrap_or("?")
            )));
        }
        plan.push(chain);
    }
    let prepare = json!({
        "vm": a.vm,
        "disks": plan.iter().map(|c| {
            let disk = c["disk"].as_str().unwrap_or_default().split('/').nth(1).unwrap_or_default();
            let image = a.dest_image.as_ref().map(|t| t.replace("{vm}", &a.vm).replace("{disk}", disk));
            json!({ "name": disk, "backing": c["backing"], "image": image })
        }).collect::<Vec<_>>(),
    });
    say(json_out, &format!("preparing {} disk(s) on the destination", plan.len()));
    let prep = call(&dest, "POST", "/v1/migrations", Some(prepare)).await?;
    let id = prep["id"].as_str().unwrap_or_default().to_owned();
    let mut mirrors = Vec::new();
    let started_mirrors = start_mirrors(source, &dest, &a, &plan, &prep, &mut mirrors).await;
    let converged = match started_mirrors {
        Ok(()) => converge(source, json_out, &mirrors).await,
        Err(e) => Err(e),
    };
    if let Err(e) = converged {
        for (_, job) in &mirrors {
            let _ = call(source, "POST", &format!("/v1/jobs/{job}/cancel"), None).await;
        }
        let _ = call(&dest, "POST", &format!("/v1/migrations/{id}/abort"), None).await;
        return Err(fail(format!("{e}; mirrors cancelled, destination cleaned up, the source is unchanged")));
    }
    let results = match cut_over(source, json_out, &mirrors).await {
        Ok(r) => r,
        Err(e) => return Err(back_out(source, &id, &mirrors, e).await),
    };
    if a.verify {
        if let Err(e) = verify(source, json_out, &prep, &dest).await {
            return Err(back_out(source, &id, &mirrors, e).await);
        }
    }
    // Fence the source durably *before* the destination goes live: "source
    // fenced, destination hidden" is safe (a retry or DELETE .../fence
    // recovers it); "both writable" never happens.
    for (disk, _) in &mirrors {
        // The agent refuses to fence a disk that is writable again since the cut-over (restarted
        // or reloaded): writes may have landed that the destination lacks.
        let body = json!({ "target": format!("{} {id}", a.to) });
        if let Err(e) = call(source, "POST", &format!("/v1/disks/{disk}/fence"), Some(body)).await {
            return Err(back_out(source, &id, &mirrors, e).await);
        }
    }
    let complete = json!({ "stream": !a.no_stream, "speed": a.speed });
    let active = match call(&dest, "POST", &format!("/v1/migrations/{id}/complete"), Some(complete)).await {
        Ok(active) => active,
        // The source takes its disks back only if the destination shows that none went live
        // (`complete` is all or nothing); an answer lost on the way must not make both writable.
        Err(e) => match call(&dest, "GET", &format!("/v1/migrations/{id}"), None).await {
            Ok(m) if m["state"] == "active" => m,
            // Aborted (possible only while prepared), it can no longer go live later.
            Ok(m)
                if m["state"] == "prepared"
                    && call(&dest, "POST", &format!("/v1/migrations/{id}/abort"), None).await.is_ok() =>
            {
                return Err(back_out(source, &id, &mirrors, e).await)
            }
            _ => {
                return Err(fail(format!(
                    "{e}; whether the destination went live is unknown, so the source stays fenced \
                     (read-only): see GET /v1/migrations/{id} on the destination, then complete it there, \
                     or abort it and DELETE /v1/disks/DISK/fence on the source"
                )))
            }
        },
    };
    let summary = summarize(&a.vm, &id, &results, &active, a.verify, started.elapsed());
    if json_out {
        println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    } else {
        print_summary(&summary);
    }
    Ok(())
}

/// After a failed cut-over or verify: the destination never went live, so
/// the source takes its disks back (writable again, if it is reachable).
/// The destination stays prepared and hidden; a retry of `migrate` aborts
/// it and starts over.
async fn back_out(source: &Endpoint, id: &str, mirrors: &[(String, String)], e: ClientError) -> ClientError {
    // Every mirror ends first: one still running (or completing) would later set its disk
    // read-only again with no fence, or run on with its bitmap busy.
    let mut source_back = true;
    for (_, job) in mirrors {
        let _ = call(source, "POST", &format!("/v1/jobs/{job}/cancel"), None).await;
    }
    for (_, job) in mirrors {
        source_back &= wait_concluded(source, job, Duration::from_secs(60)).await.is_ok();
    }
    if source_back {
        for (disk, _) in mirrors {
            source_back &= call(source, "DELETE", &format!("/v1/disks/{disk}/fence"), None).await.is_ok();
        }
    }
    let source = if source_back {
        "the source is writable again"
    } else {
        "the source did not confirm that its mirrors ended and its disks are writable (see `rbdsync jobs`)"
    };
    fail(format!("{e}; {source}; the destination stays hidden (migration {id} prepared; a retry replaces it)"))
}

async fn start_mirrors(
    source: &Endpoint,
    dest: &Endpoint,
    a: &MigrateArgs,
    plan: &[Value],
    prep: &Value,
    mirrors: &mut Vec<(String, String)>,
) -> Result<(), ClientError> {
    for (chain, target) in plan.iter().zip(prep["disks"].as_array().into_iter().flatten()) {
        let disk = chain["disk"].as_str().unwrap_or_default().to_owned();
        let uri = nbd_uri(prep, dest, target["export"].as_str().unwrap_or_default())?;
        let body = json!({
            "kind": "mirror", "disk": disk, "target": uri, "sync": "incremental", "bitmap": chain["bitmap"],
            "ready_threshold": a.ready_threshold, "speed": a.speed, "copy_mode": a.copy_mode,
            // The state the destination's backing was checked against: refused if a backup (or a
            // clear, a merge) moved the bitmap on since.
            "expect": chain["bitmap_state"],
        });
        let job = call(source, "POST", "/v1/jobs", Some(body)).await?;
        mirrors.push((disk, job["id"].as_str().unwrap_or_default().to_owned()));
    }
    Ok(())
}

async fn job(source: &Endpoint, id: &str) -> Result<Value, ClientError> {
    call(source, "GET", &format!("/v1/jobs/{id}"), None).await
}

/// Polls a job until it concluded (at most `limit`).
async fn wait_concluded(source: &Endpoint, id: &str, limit: Duration) -> Result<Value, ClientError> {
    let deadline = Instant::now().checked_add(limit);
    loop {
        let j = job(source, id).await?;
        if j["state"] == "concluded" {
            return Ok(j);
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Err(fail(format!("job {id} did not end within {} s", limit.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every mirror is ready.
async fn converge(source: &Endpoint, json_out: bool, mirrors: &[(String, String)]) -> Result<(), ClientError> {
    let mut last = Instant::now();
    loop {
        let mut ready = 0;
        for (disk, id) in mirrors {
            let j = job(source, id).await?;
            if j["state"] == "concluded" {
                return Err(fail(format!("mirror of {disk} ended: {}", j["error"].as_str().unwrap_or("?"))));
            }
            if j["state"] == "ready" {
                ready += 1;
            }
        }
        if ready == mirrors.len() {
            return Ok(());
        }
        if last.elapsed() > Duration::from_secs(2) {
            say(json_out, &format!("{ready}/{} mirrors ready", mirrors.len()));
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Switches every mirror to write-blocking, completes them, waits for the results.
async fn cut_over(
    source: &Endpoint,
    json_out: bool,
    mirrors: &[(String, String)],
) -> Result<Vec<(String, Value)>, ClientError> {
    for (_, id) in mirrors {
        call(source, "POST", &format!("/v1/jobs/{id}/copy-mode"), Some(json!({"copy_mode": "write-blocking"}))).await?;
    }
    say(json_out, "all mirrors ready; cutting over");
    for (_, id) in mirrors {
        call(source, "POST", &format!("/v1/jobs/{id}/complete"), None).await?;
    }
    let mut out = Vec::new();
    for (disk, id) in mirrors {
        let j = wait_concluded(source, id, Duration::MAX).await?;
        if j["result"] != "success" {
            return Err(fail(format!("cut-over of {disk} failed: {}", j["error"].as_str().unwrap_or("?"))));
        }
        out.push((disk.clone(), j));
    }
    Ok(out)
}

/// Compares each source disk (now read-only) with its destination.
async fn verify(source: &Endpoint, json_out: bool, prep: &Value, dest: &Endpoint) -> Result<(), ClientError> {
    for d in prep["disks"].as_array().into_iter().flatten() {
        let disk = d["disk"].as_str().unwrap_or_default();
        let uri = nbd_uri(prep, dest, d["export"].as_str().unwrap_or_default())?;
        say(json_out, &format!("verifying {disk}"));
        let j = call(source, "POST", "/v1/jobs", Some(json!({"kind": "verify", "disk": disk, "against": uri}))).await?;
        let id = j["id"].as_str().unwrap_or_default().to_owned();
        let done = loop {
            let j = job(source, &id).await?;
            if j["state"] == "concluded" {
                break j;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if done["result"] != "success" {
            return Err(fail(format!("verification of {disk} failed: {}", done["error"].as_str().unwrap_or("?"))));
        }
    }
    Ok(())
}

fn summarize(vm: &str, id: &str, results: &[(String, Value)], active: &Value, verified: bool, took: Duration) -> Value {
    let disks: Vec<Value> = results
        .iter()
        .map(|(disk, j)| {
            let s = &j["summary"];
            json!({
                "disk": disk,
                "disk_size": s["disk_size"], "bytes_sent": s["bytes_sent"], "initial_dirty_bytes": s["initial_dirty_bytes"],
                "downtime_ms": s["downtime_ms"], "mirror_ms": s["duration_ms"], "passes": s["passes"],
            })
        })
        .collect();
    let downtime = results.iter().filter_map(|(_, j)| j["summary"]["downtime_ms"].as_u64()).max();
    json!({
        "vm": vm, "migration": id, "disks": disks, "max_downtime_ms": downtime, "verified": verified,
        "duration_ms": crate::jobs::millis(took), "stream_jobs": active["stream_jobs"],
    })
}

fn print_summary(s: &Value) {
    println!(
        "migrated {} ({}) in {} ms; downtime {} ms; verified: {}",
        s["vm"].as_str().unwrap_or("?"),
        s["migration"].as_str().unwrap_or("?"),
        s["duration_ms"],
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
