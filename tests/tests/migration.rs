//! Incremental migration end to end: two real agents, the real `rbdsync
//! migrate` CLI, real NBD clients. The source disk is backed up (full, then
//! incrementals), a client keeps writing to it through NBD while the mirror
//! runs, and the destination must end up byte for byte equal to a model of
//! every acknowledged write; then the stream job detaches it from the
//! backup. Faults: destination killed mid-mirror, source killed during the
//! cut-over, migration aborted on the destination mid-mirror, backup cluster
//! hanging during the stream; a mirror that must switch itself to
//! write-blocking to converge; and the fencing of a migrated-away source
//! (never two writable copies, also across restarts and a failed fence).
//!
//! RBD tests need `RBDSYNC_TEST_CEPH_CONF` (the ceph.conf of a cluster from
//! `deploy/dev/ceph-cluster.sh`, pool `backup`); without it they fail. Random
//! content is seeded (printed; `TEST_SEED=N` replays a run).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use proto::consts::errno;
use serde_json::Value;
use tests::ceph::{ceph_exclusive, ceph_shared, StoppedOsd, TestCeph};
use tests::{agent_bin, nbd::NbdConn, run, show, Agent, AgentBuilder, Rng};

const MIB: u64 = 1 << 20;
const GRANULE: u64 = 64 << 10;
const DISK: &str = "vm1/disk0";

// ---------------------------------------------------------------- client CLI

fn control(agent: &Agent) -> String {
    format!("unix:{}", agent.dir().join("control.sock").display())
}

fn rbdsync(agent: &Agent) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("--control").arg(control(agent)).stdin(Stdio::null());
    cmd
}

fn logs(a: &Agent, b: &Agent) -> String {
    format!("\n--- source log:\n{}\n--- destination log:\n{}", a.log_tail(), b.log_tail())
}

/// Runs a command, killing it after `limit`.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    finish_within(child, limit, |_| {})
}

/// Collects a spawned child's output, killing it after `limit`; `on_line`
/// sees each stderr line the moment it arrives (on the reader thread).
fn finish_within(mut child: Child, limit: Duration, mut on_line: impl FnMut(&str) + Send + 'static) -> Output {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let stderr = child.stderr.take().expect("piped stderr");
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            on_line(&line);
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.join().unwrap_or_default()),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = err.join().unwrap_or_default().into_bytes();
    Output { status, stdout: out.join().unwrap_or_default(), stderr }
}

fn migrate_cmd(a: &Agent, b: &Agent, json: bool, extra: &[&str]) -> Command {
    let mut cmd = rbdsync(a);
    if json {
        cmd.arg("--json");
    }
    cmd.args(["migrate", "vm1", "--to", &control(b)]).args(extra);
    cmd
}

/// `rbdsync --json migrate vm1 --to B EXTRA...`, which must succeed; its summary.
fn migrate_ok(a: &Agent, b: &Agent, extra: &[&str], limit: Duration) -> Value {
    let started = Instant::now();
    let out = output_within(migrate_cmd(a, b, true, extra), limit);
    assert!(out.status.success(), "migrate {extra:?} failed: {}{}", show(&out), logs(a, b));
    let summary: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("migrate: bad JSON ({e}): {}", show(&out)));
    eprintln!("migrate {extra:?} took {:?}: {summary}", started.elapsed());
    summary
}

/// The one disk of a migration summary.
fn migrated_disk(summary: &Value) -> &Value {
    let disks = summary["disks"].as_array().unwrap_or_else(|| panic!("no disks in {summary:#}"));
    assert_eq!(disks.len(), 1, "{summary:#}");
    assert_eq!(disks[0]["disk"], DISK, "{summary:#}");
    &disks[0]
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The control API through curl (for what the CLI does not offer).
fn api(agent: &Agent, method: &str, path: &str) -> (u16, Value) {
    api_with(agent, method, path, None)
}

/// [`api`] with a JSON body.
fn api_with(agent: &Agent, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let sock = agent.dir().join("control.sock");
    let url = format!("http://agent{path}");
    let mut args = vec!["-sS", "--unix-socket", sock.to_str().unwrap(), "-X", method, "-w", "\n%{http_code}"];
    let body = body.map(Value::to_string);
    if let Some(body) = &body {
        args.extend(["-H", "content-type: application/json", "--data-binary", body]);
    }
    args.push(&url);
    let out = run("curl", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl: {text}"));
    let code: u16 = code.trim().parse().unwrap_or_else(|_| panic!("curl: no status in {text}"));
    let body = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(body.into()) };
    (code, body)
}

fn migrations(agent: &Agent) -> Vec<Value> {
    let (code, list) = api(agent, "GET", "/v1/migrations");
    assert_eq!(code, 200, "GET /v1/migrations: {list}");
    list.as_array().unwrap_or_else(|| panic!("{list}")).clone()
}

/// The states of an agent's migrations, sorted (records only have
/// second-resolution timestamps, so their order is not known).
fn migration_states(agent: &Agent) -> Vec<String> {
    let mut states: Vec<String> =
        migrations(agent).iter().map(|m| m["state"].as_str().unwrap_or("?").to_owned()).collect();
    states.sort();
    states
}

/// The jobs of `kind` on an agent, oldest first.
fn jobs_of(agent: &Agent, kind: &str) -> Vec<Value> {
    let all = agent.json(&["jobs", "--all"]);
    all.as_array().unwrap().iter().filter(|j| j["kind"] == kind).cloned().collect()
}

/// Backs up vm1/disk0 (full the first time, incremental after) and waits.
fn backup(agent: &Agent) -> Value {
    let out = agent.json(&["backup", DISK, "--wait"]);
    let job = if out.is_array() { out[0].clone() } else { out };
    assert_eq!(job["result"], "success", "backup failed: {job:#}\nlog:\n{}", agent.log_tail());
    job
}

fn bitmap(agent: &Agent) -> Value {
    let list = agent.json(&["bitmap", "list", DISK]);
    list.as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == "backup"))
        .cloned()
        .unwrap_or_else(|| panic!("no bitmap backup on {DISK}: {list}"))
}

fn disk_info(agent: &Agent) -> Value {
    let list = agent.json(&["disks"]);
    list.as_array()
        .and_then(|l| l.iter().find(|d| d["name"] == DISK))
        .cloned()
        .unwrap_or_else(|| panic!("no {DISK} on the agent: {list}"))
}

/// Export names `nbdinfo --list` shows on the agent's Unix socket.
fn listed_exports(agent: &Agent) -> Vec<String> {
    let uri = format!("nbd+unix://?socket={}", agent.socket().display());
    let json = run("nbdinfo", &["--list", "--json", &uri]).unwrap();
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    v["exports"].as_array().into_iter().flatten().filter_map(|e| e["export-name"].as_str().map(String::from)).collect()
}

// ------------------------------------------------------------ configuration

/// Where the source's backups go (and what the destination is layered on).
enum Backing<'a> {
    Rbd(&'a TestCeph, String),
    File(PathBuf),
}

impl Backing<'_> {
    fn uri(&self) -> String {
        match self {
            Backing::Rbd(_, image) => format!("rbd:{image}"),
            Backing::File(path) => format!("file:{}", path.display()),
        }
    }

    fn builder(&self) -> AgentBuilder {
        match self {
            Backing::Rbd(ceph, _) => AgentBuilder::new().extra(&ceph.agent_yaml()),
            Backing::File(_) => AgentBuilder::new(),
        }
    }

    /// Backup snapshot names present.
    fn snaps(&self) -> Vec<String> {
        match self {
            Backing::Rbd(ceph, image) => ceph.snaps(image),
            Backing::File(path) => {
                let dir = PathBuf::from(format!("{}.snapshots", path.display()));
                let mut names: Vec<String> = std::fs::read_dir(&dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".raw")).map(String::from))
                    .collect();
                names.sort();
                names
            }
        }
    }
}

/// Source agent: vm1/disk0 of `size` bytes with bitmap `backup` and backups to `backing`.
fn source(backing: &Backing, size: u64) -> Agent {
    source_with(backing, size, "")
}

/// Source agent with extra `nbd:` keys (lines indented by two spaces).
fn source_with(backing: &Backing, size: u64, nbd_keys: &str) -> Agent {
    let yaml = format!(
        "name: vm1\ndisks:\n  - name: disk0\n    image: file:../images/vm1-disk0.raw\n    size: {}MiB\n    \
         bitmaps: [{{name: backup, granularity: 64KiB}}]\n    backup: {{target: \"{}\", bitmap: backup}}\n",
        size / MIB,
        backing.uri()
    );
    backing.builder().vm("vm1", &yaml).start_with_nbd(nbd_keys).unwrap()
}

/// Destination agent: empty vms.d, able to read the backups.
fn destination(backing: &Backing) -> Agent {
    backing.builder().start().unwrap()
}

/// The sidecar of the destination's image of vm1/disk0.
fn dest_sidecar(b: &Agent) -> Value {
    let path = b.dir().join("state/images/vm1-disk0.raw.rbdsync");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

// ------------------------------------------------------------------ NBD I/O

/// What the disk must contain: every acknowledged write, in order.
type Model = Arc<Mutex<Vec<u8>>>;

fn new_model(size: u64) -> Model {
    Arc::new(Mutex::new(vec![0u8; size as usize]))
}

/// Writes random data over `ranges` (in pieces of at most 1 MiB); each must be acknowledged.
fn write_ranges(conn: &mut NbdConn, model: &Model, rng: &mut Rng, ranges: &[(u64, u64)]) {
    let mut buf = vec![0u8; MIB as usize];
    for &(offset, length) in ranges {
        let mut pos = offset;
        while pos < offset + length {
            let n = MIB.min(offset + length - pos) as usize;
            rng.fill(&mut buf[..n]);
            let err = conn.write(pos, &buf[..n]).unwrap();
            assert_eq!(err, 0, "write of {n} bytes at {pos} failed: NBD errno {err}");
            model.lock().unwrap()[pos as usize..pos as usize + n].copy_from_slice(&buf[..n]);
            pos += n as u64;
        }
    }
}

/// Granule indexes that `ranges` touch.
fn granules_of(ranges: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
    ranges.iter().flat_map(|&(o, l)| o / GRANULE..(o + l).div_ceil(GRANULE)).collect()
}

/// `count` random 64 KiB-aligned ranges of 64 KiB to 1 MiB inside `0..size`.
fn random_ranges(rng: &mut Rng, size: u64, count: usize) -> Vec<(u64, u64)> {
    (0..count)
        .map(|_| {
            let len = GRANULE * (1 + rng.below(16));
            (GRANULE * rng.below((size - len) / GRANULE + 1), len)
        })
        .collect()
}

/// The export's content, read with `qemu-img convert` (a client independent of ours).
fn read_export(uri: &str, scratch: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(scratch);
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", uri, scratch.to_str().unwrap()]).unwrap();
    let data = std::fs::read(scratch).unwrap();
    let _ = std::fs::remove_file(scratch);
    data
}

/// The export at `uri` must hold exactly the model's bytes.
fn assert_model(what: &str, uri: &str, model: &Model, scratch: &Path) {
    let actual = read_export(uri, scratch);
    let expected = model.lock().unwrap();
    assert_eq!(actual.len(), expected.len(), "{what}: size differs");
    if actual[..] != expected[..] {
        let first = actual.iter().zip(expected.iter()).position(|(x, y)| x != y).unwrap_or(0);
        let bad: Vec<usize> = actual
            .chunks(GRANULE as usize)
            .zip(expected.chunks(GRANULE as usize))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i)
            .collect();
        let zeroes = bad
            .iter()
            .filter(|&&g| actual[g * GRANULE as usize..(g + 1) * GRANULE as usize].iter().all(|&b| b == 0))
            .count();
        panic!(
            "{what}: {uri} differs from the acknowledged writes: first difference at byte {first}, {} of {} 64 KiB \
             granules differ ({zeroes} of them read as zeroes): granules {:?}",
            bad.len(),
            actual.len() / GRANULE as usize,
            &bad[..bad.len().min(32)]
        );
    }
}

/// Two exports must be identical (`qemu-img compare`).
fn assert_identical(what: &str, a: &str, b: &str) {
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]).output().unwrap();
    assert!(out.status.success(), "{what}: qemu-img compare {a} {b}: {}", show(&out));
}

// ------------------------------------------------------------------- writer

/// How a writer ended.
#[derive(Debug, Default)]
struct WriterLog {
    acked: u64,
    /// Granules its acknowledged writes touched.
    granules: std::collections::BTreeSet<u64>,
    /// The NBD errno that stopped it (EPERM once the source is read-only).
    refused: Option<u32>,
    error: Option<String>,
}

/// A client writing random 64 KiB granules (picked from `granules`) at
/// `rate` bytes/s, one request at a time, until stopped or refused; every
/// acknowledged write goes into the model.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<WriterLog>>,
}

impl Writer {
    fn start(socket: PathBuf, model: Model, granules: Vec<u64>, rate: u64, seed: u64) -> Writer {
        Self::start_pieces(socket, model, granules, rate, seed, GRANULE)
    }

    /// Like `start`, writing `piece` bytes (a divisor of GRANULE) at a random aligned offset of the granule.
    fn start_pieces(socket: PathBuf, model: Model, granules: Vec<u64>, rate: u64, seed: u64, piece: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (stop2, acked2) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let mut log = WriterLog::default();
            if let Err(e) = Self::body(&socket, &model, &granules, (rate, piece), seed, &stop2, &acked2, &mut log) {
                log.error = Some(format!("{e:#}"));
            }
            log
        });
        Writer { stop, acked, thread: Some(thread) }
    }

    #[allow(clippy::too_many_arguments)]
    fn body(
        socket: &Path,
        model: &Model,
        granules: &[u64],
        (rate, piece): (u64, u64),
        seed: u64,
        stop: &AtomicBool,
        acked: &AtomicU64,
        log: &mut WriterLog,
    ) -> Result<()> {
        let mut conn = NbdConn::connect(socket, DISK)?;
        let mut rng = Rng::new(seed);
        let mut buf = vec![0u8; piece as usize];
        let interval = Duration::from_secs_f64(piece as f64 / rate as f64);
        let mut next = Instant::now();
        while !stop.load(SeqCst) {
            let g = granules[rng.below(granules.len() as u64) as usize];
            let offset = g * GRANULE + rng.below(GRANULE / piece) * piece;
            rng.fill(&mut buf);
            let err = conn.write(offset, &buf)?;
            if err != 0 {
                log.refused = Some(err);
                return Ok(());
            }
            let at = offset as usize;
            model.lock().unwrap()[at..at + buf.len()].copy_from_slice(&buf);
            log.acked += 1;
            log.granules.insert(g);
            acked.fetch_add(1, SeqCst);
            next += interval;
            match next.checked_duration_since(Instant::now()) {
                Some(wait) => std::thread::sleep(wait),
                None => next = Instant::now(),
            }
        }
        Ok(())
    }

    fn acked(&self) -> u64 {
        self.acked.load(SeqCst)
    }

    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until at least `n` writes were acknowledged in total.
    fn wait_acked(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.acked() < n {
            assert!(self.running(), "writer ended early");
            assert!(Instant::now() < deadline, "writer made no progress ({} writes)", self.acked());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the writer (if it did not end by itself) and returns its log.
    fn finish(mut self) -> WriterLog {
        self.stop.store(true, SeqCst);
        self.thread.take().unwrap().join().expect("writer panicked")
    }

    /// Waits up to `limit` for the writer to end by itself (refused), then stops it.
    fn wait_refused(self, limit: Duration) -> WriterLog {
        let deadline = Instant::now() + limit;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.finish()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

// ===================================================================== tests

/// Data, a full backup and two incrementals with writes in between, then
/// more writes; returns the granules dirtied since the last backup.
fn build_backup_chain(a: &Agent, model: &Model, rng: &mut Rng, size: u64) -> std::collections::BTreeSet<u64> {
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    let chunks = size / MIB;
    // Every other MiB, some more at random, and always the last one.
    let data: Vec<(u64, u64)> =
        (0..chunks).filter(|&i| i % 2 == 0 || i == chunks - 1 || rng.below(3) == 0).map(|i| (i * MIB, MIB)).collect();
    write_ranges(&mut conn, model, rng, &data);
    let full = backup(a);
    assert_eq!(full["summary"]["sync"], "full", "{full:#}");
    for round in 0..2 {
        let ranges = random_ranges(rng, size, 12);
        write_ranges(&mut conn, model, rng, &ranges);
        let dirty = u(&bitmap(a)["dirty_bytes"]);
        assert_eq!(dirty, granules_of(&ranges).len() as u64 * GRANULE, "round {round}: bitmap dirty bytes");
        let inc = backup(a);
        assert_eq!(inc["summary"]["sync"], "incremental", "round {round}: {inc:#}");
        assert!(u(&inc["summary"]["bytes_written"]) <= dirty, "round {round}: {inc:#}");
    }
    // The writes since the last backup: the mirror is seeded with exactly these.
    let mut ranges = random_ranges(rng, size, 8);
    ranges.push((size / 2, 2 * MIB));
    write_ranges(&mut conn, model, rng, &ranges);
    granules_of(&ranges)
}

/// Full lifecycle: chain of backups, migration under writes, equality,
/// stream, backups removed, destination independent and writable.
fn lifecycle(backing: &Backing, default_seed: u64) {
    let size = 64 * MIB;
    let mut rng = Rng::from_env(default_seed);
    let mut a = source(backing, size);
    let mut b = destination(backing);
    let scratch = b.dir().join("scratch.raw");
    let model = new_model(size);
    let seeded = build_backup_chain(&a, &model, &mut rng, size);
    let snaps = backing.snaps();
    assert_eq!(snaps.len(), 3, "a full and two incremental backups: {snaps:?}");
    let d0 = u(&bitmap(&a)["dirty_bytes"]);
    assert_eq!(d0, seeded.len() as u64 * GRANULE, "bitmap dirty bytes after the last writes");

    // A client keeps writing random granules anywhere on the disk (1 MiB/s)
    // through the whole migration, until the source refuses writes.
    let everywhere: Vec<u64> = (0..size / GRANULE).collect();
    let writer = Writer::start(a.socket(), model.clone(), everywhere, MIB, rng.next_u64());
    writer.wait_acked(5);
    let before = writer.acked();
    let (events_a, events_b) = (tests::EventLog::follow(&a).unwrap(), tests::EventLog::follow(&b).unwrap());
    let started = Instant::now();
    let summary = migrate_ok(&a, &b, &["--speed", "4MiB", "--ready-threshold", "256KiB"], Duration::from_secs(60));
    let took = started.elapsed();
    // Both agents pushed the migration's state changes as they happened.
    let states = |events: Vec<Value>, role: &str| -> Vec<String> {
        let of = |e: &&Value| e["type"] == "migration" && e["role"] == role;
        events.iter().filter(of).filter_map(|e| e["state"].as_str().map(str::to_owned)).collect()
    };
    let seen_a = states(events_a.wait_for(Duration::from_secs(10), |e| e["state"] == "completed").unwrap(), "source");
    assert_eq!(seen_a.first().map(String::as_str), Some("mirroring"), "{seen_a:?}");
    assert!(
        seen_a.iter().any(|s| s == "cutting-over") && seen_a.last().map(String::as_str) == Some("completed"),
        "{seen_a:?}"
    );
    let seen_b = states(events_b.wait_for(Duration::from_secs(10), |e| e["state"] == "active").unwrap(), "destination");
    assert_eq!(seen_b.first().map(String::as_str), Some("prepared"), "{seen_b:?}");
    assert_eq!(seen_b.last().map(String::as_str), Some("active"), "{seen_b:?}");
    let mirrors = events_a.stop().iter().filter(|e| e["type"] == "job" && e["kind"] == "mirror").count();
    assert!(mirrors >= 3, "the source's mirror job's states were not pushed");
    events_b.stop();
    let log = writer.wait_refused(Duration::from_secs(10));
    assert!(log.error.is_none(), "writer failed: {log:?}");
    assert_eq!(
        log.refused,
        Some(errno::EPERM),
        "after the cut-over the source must refuse writes with EPERM (writer: {} writes acknowledged)",
        log.acked
    );
    let during = log.acked - before;
    let d = migrated_disk(&summary);
    let (sent, initial, disk_size) = (u(&d["bytes_sent"]), u(&d["initial_dirty_bytes"]), u(&d["disk_size"]));
    let written = log.granules.len() as u64 * GRANULE;
    let bound = ((d0 + log.acked * GRANULE) as f64 * 1.1 / GRANULE as f64).ceil() as u64 * GRANULE;
    eprintln!(
        "migration via {}: {took:?}; dirty at start {d0} (mirror seeded with {initial}), writer: {} writes \
         acknowledged ({during} after migrate started, {written} bytes of distinct granules) then {:?}; \
         bytes_sent {sent} (bound {bound}), disk {disk_size}, downtime {} ms, passes {}",
        backing.uri(),
        log.acked,
        log.refused,
        d["downtime_ms"],
        d["passes"]
    );
    assert_eq!(disk_size, size);
    assert!(during >= 5, "the writer barely wrote during the migration ({during} writes)");
    assert!(initial >= d0, "the mirror was seeded with {initial} bytes, but {d0} were dirty before it started");
    assert!(initial <= d0 + written, "seeded with {initial} > dirty {d0} + written {written}");
    assert!(sent >= initial, "sent {sent} < seeded {initial}: dirty granules were never sent");
    assert!(
        sent <= bound,
        "sent {sent} bytes, more than 1.1 x (dirty {d0} + {} written) = {bound}",
        log.acked * GRANULE
    );
    assert!(sent < size / 4, "sent {sent} of {size} bytes: not incremental");
    assert!(u(&d["downtime_ms"]) < 5000, "downtime {} ms", d["downtime_ms"]);
    let stream_jobs = summary["stream_jobs"].as_array().unwrap_or_else(|| panic!("{summary:#}")).clone();
    assert_eq!(stream_jobs.len(), 1, "{summary:#}");

    // The source is read-only now; the destination serves the disk, equal to
    // the source and to every acknowledged write, before anything writes to it.
    assert_eq!(disk_info(&a)["read_only"], true, "the source disk must be read-only after the cut-over");
    assert!(NbdConn::connect(&a.socket(), DISK).unwrap().read_only(), "the source export must advertise READ_ONLY");
    assert!(listed_exports(&b).contains(&DISK.to_owned()), "{DISK} not listed on the destination");
    assert_identical("source vs destination after the cut-over", &a.unix_uri(DISK), &b.unix_uri(DISK));
    assert_model("destination after the cut-over", &b.unix_uri(DISK), &model, &scratch);
    let records = migrations(&b);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["state"], "active", "{records:?}");
    assert!(records[0].get("token").is_none(), "the API shows the migration token: {records:?}");

    // The stream copies the rest from the backup and detaches it.
    let streams: Vec<Value> = jobs_of(&b, "stream").iter().map(|j| j["id"].clone()).collect();
    assert_eq!(streams, stream_jobs, "`jobs --all` on the destination");
    let stream = b.concluded(stream_jobs[0].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(stream["result"], "success", "stream failed: {stream:#}{}", logs(&a, &b));
    assert_eq!(stream["kind"], "stream");
    let latest = snaps.last().unwrap();
    assert_eq!(stream["summary"]["parent"], format!("{}@{latest}", backing.uri()), "{stream:#}");
    let sidecar = dest_sidecar(&b);
    assert_eq!(sidecar["parent"], Value::Null, "the destination still has a parent: {sidecar:#}");
    assert!(!b.dir().join("state/images/vm1-disk0.raw.owned").exists(), "owned map left behind");

    // The backups can go now.
    match backing {
        Backing::Rbd(ceph, image) => {
            ceph.rbd(&["snap", "purge", image]).unwrap();
            assert!(ceph.snaps(image).is_empty());
        }
        Backing::File(path) => {
            let meta = std::fs::read_to_string(format!("{}.rbdsync", path.display())).unwrap();
            let meta: Value = serde_json::from_str(&meta).unwrap();
            assert_eq!(
                meta["children"],
                serde_json::json!([]),
                "the detached destination is still registered as a child of the backup: {meta:#}"
            );
            let dir = path.parent().unwrap();
            std::fs::rename(dir, dir.with_extension("gone")).unwrap();
        }
    }
    assert_model("destination after the backups were removed", &b.unix_uri(DISK), &model, &scratch);
    b = b.restart().unwrap();
    assert_model("destination restarted without its backups", &b.unix_uri(DISK), &model, &scratch);

    // The destination is an ordinary writable disk.
    let mut conn = NbdConn::connect(&b.socket(), DISK).unwrap();
    assert!(!conn.read_only());
    assert_eq!(conn.size, size);
    let ranges = random_ranges(&mut rng, size, 8);
    write_ranges(&mut conn, &model, &mut rng, &ranges);
    conn.flush().unwrap();
    drop(conn);
    assert_model("destination after writes", &b.unix_uri(DISK), &model, &scratch);
    assert!(b.stop().unwrap().success(), "destination did not stop cleanly:\n{}", b.log_tail());
    assert!(a.stop().unwrap().success(), "source did not stop cleanly:\n{}", a.log_tail());
}

#[test]
fn migration_on_rbd_backups_under_writes_is_exact_and_streams_off_the_backup() {
    let _ceph = ceph_shared();
    let ceph = TestCeph::new("mig");
    let backing = Backing::Rbd(&ceph, ceph.image("life"));
    lifecycle(&backing, 0x3141_0001);
}

#[test]
fn migration_on_file_backups_under_writes_is_exact_and_streams_off_the_backup() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    lifecycle(&backing, 0x3141_0002);
}

/// A 32 MiB source with a full backup and `dirty_mib` MiB written since.
fn small_setup(
    backing: &Backing,
    rng: &mut Rng,
    dirty_mib: u64,
) -> (Agent, Agent, Model, std::collections::BTreeSet<u64>) {
    small_setup_with(backing, rng, dirty_mib, "")
}

/// [`small_setup`] with extra `nbd:` keys for the source.
fn small_setup_with(
    backing: &Backing,
    rng: &mut Rng,
    dirty_mib: u64,
    nbd_keys: &str,
) -> (Agent, Agent, Model, std::collections::BTreeSet<u64>) {
    let size = 32 * MIB;
    let a = source_with(backing, size, nbd_keys);
    let b = destination(backing);
    let model = new_model(size);
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    let data: Vec<(u64, u64)> = (0..size / MIB).filter(|_| rng.below(4) != 0).map(|i| (i * MIB, MIB)).collect();
    write_ranges(&mut conn, &model, rng, &data);
    backup(&a);
    let ranges: Vec<(u64, u64)> = (0..dirty_mib).map(|i| (2 * i * MIB, MIB)).collect();
    write_ranges(&mut conn, &model, rng, &ranges);
    (a, b, model, granules_of(&ranges))
}

enum MirrorFault {
    /// SIGKILL the destination agent.
    KillDestination,
    /// Abort the migration on the destination (what a lost network looks like
    /// to the source: the mirror's NBD connection is closed).
    AbortOnDestination,
}

/// Interrupts a slow mirror while a client writes to the source: the
/// migration fails, the source keeps working with its bitmap intact, a retry
/// succeeds and the destination equals every acknowledged write.
fn interrupted_mirror(fault: MirrorFault, default_seed: u64) {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(default_seed);
    // The mirror reconnects to a lost destination for 2 s (nbd.client_reconnect_secs), then fails.
    let (a, mut b, model, seeded) = small_setup_with(&backing, &mut rng, 8, "  client_reconnect_secs: 2\n");
    let scratch = a.dir().join("scratch.raw");
    let before = bitmap(&a);
    assert_eq!(u(&before["dirty_bytes"]), seeded.len() as u64 * GRANULE);

    let everywhere: Vec<u64> = (0..32 * MIB / GRANULE).collect();
    let writer = Writer::start(a.socket(), model.clone(), everywhere, MIB, rng.next_u64());
    writer.wait_acked(3);
    // 8 MiB at 1 MiB/s, never ready (threshold 0 while the writer writes).
    let child = migrate_cmd(&a, &b, false, &["--speed", "1MiB", "--ready-threshold", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the mirror copied some of it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mirror = loop {
        let running: Vec<Value> = jobs_of(&a, "mirror").into_iter().filter(|j| j["state"] == "running").collect();
        if let Some(j) = running.first().filter(|j| u(&j["bytes_done"]) >= 2 * MIB) {
            break j.clone();
        }
        assert!(Instant::now() < deadline, "no mirror progress on the source{}", logs(&a, &b));
        std::thread::sleep(Duration::from_millis(50));
    };
    let id = mirror["id"].as_str().unwrap().to_owned();
    eprintln!("mirror {id} at {} of {} bytes: interrupting it", mirror["bytes_done"], mirror["bytes_total"]);
    let fault_at = Instant::now();
    match fault {
        MirrorFault::KillDestination => {
            b.kill9().unwrap();
        }
        MirrorFault::AbortOnDestination => {
            let records = migrations(&b);
            let prepared: Vec<&Value> = records.iter().filter(|m| m["state"] == "prepared").collect();
            assert_eq!(prepared.len(), 1, "{records:?}");
            let mid = prepared[0]["id"].as_str().unwrap();
            let (code, body) = api(&b, "POST", &format!("/v1/migrations/{mid}/abort"));
            assert_eq!(code, 200, "abort: {body}");
            assert_eq!(body["state"], "aborted", "{body}");
        }
    }
    let out = finish_within(child, Duration::from_secs(30), |_| {});
    let failed_after = fault_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("migrate failed {failed_after:?} after the fault: {}", stderr.trim());
    assert!(!out.status.success(), "migrate succeeded although the mirror was interrupted: {}", show(&out));
    assert!(
        stderr.contains("mirror of vm1/disk0 ended") && stderr.contains("the source is unchanged"),
        "migrate must say why it failed and that the source is unchanged: {stderr}"
    );
    assert!(failed_after < Duration::from_secs(10), "migrate took {failed_after:?} to notice the fault");
    let mirror = a.concluded(&id, Duration::from_secs(10));
    assert_eq!(mirror["result"], "failed", "{mirror:#}");
    eprintln!("mirror error: {}", mirror["error"]);

    // The source is still writable, and its bitmap lost nothing.
    let acked = writer.acked();
    writer.wait_acked(acked + 3);
    let log = writer.finish();
    assert!(
        log.error.is_none() && log.refused.is_none(),
        "the source refused writes after a failed migration: {log:?}"
    );
    assert_eq!(disk_info(&a)["read_only"], false);
    let after = bitmap(&a);
    let expected: std::collections::BTreeSet<u64> = seeded.union(&log.granules).copied().collect();
    assert_eq!(
        u(&after["dirty_bytes"]),
        expected.len() as u64 * GRANULE,
        "bitmap after the failed migration (before: {before}, after: {after})"
    );
    assert_eq!(after["busy"], false, "{after}");
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_model("source after the failed migration", &a.unix_uri(DISK), &model, &scratch);

    // The destination shows nothing of it, also after a restart.
    if matches!(fault, MirrorFault::KillDestination) {
        b = b.respawn().unwrap();
    }
    assert!(!listed_exports(&b).contains(&DISK.to_owned()), "half-copied {DISK} visible on the destination");
    let records = migrations(&b);
    eprintln!("destination migrations after the fault: {records:?}");
    assert_eq!(records.len(), 1, "{records:?}");
    match fault {
        MirrorFault::KillDestination => assert_eq!(records[0]["state"], "prepared", "{records:?}"),
        MirrorFault::AbortOnDestination => {
            assert_eq!(records[0]["state"], "aborted", "{records:?}");
            assert!(!b.dir().join("vms.d/vm1.yaml").exists(), "abort left the VM file");
            assert!(!b.dir().join("state/images/vm1-disk0.raw").exists(), "abort left the image");
        }
    }

    // A retry works and is exact.
    let summary = migrate_ok(&a, &b, &[], Duration::from_secs(60));
    let d = migrated_disk(&summary);
    assert_eq!(u(&d["initial_dirty_bytes"]), expected.len() as u64 * GRANULE, "{summary:#}");
    assert_identical("source vs destination after the retry", &a.unix_uri(DISK), &b.unix_uri(DISK));
    assert_model("destination after the retry", &b.unix_uri(DISK), &model, &scratch);
    assert_eq!(migration_states(&b), ["aborted", "active"], "destination migrations");
}

#[test]
fn destination_killed_mid_mirror_fails_the_migration_cleanly_and_a_retry_succeeds() {
    interrupted_mirror(MirrorFault::KillDestination, 0x3141_0003);
}

#[test]
fn migration_aborted_on_the_destination_mid_mirror_fails_cleanly_and_a_retry_succeeds() {
    interrupted_mirror(MirrorFault::AbortOnDestination, 0x3141_0004);
}

#[test]
fn source_killed_during_the_cut_over_stays_authoritative_and_the_destination_stays_hidden() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0005);
    let (mut a, b, model, _) = small_setup(&backing, &mut rng, 4);
    let scratch = b.dir().join("scratch.raw");
    let dirty_before = u(&bitmap(&a)["dirty_bytes"]);
    for (round, trigger, extra) in [(0u64, "cutting over", &[][..]), (1, "cutting over", &["--verify"][..])] {
        // SIGKILL the source the moment migrate says it reached `trigger`
        // (from the thread reading migrate's stderr, so it lands within
        // microseconds: in the cut-over, or during the verification).
        let pid = libc::pid_t::try_from(u(&a.json(&["status"])["pid"])).unwrap();
        let killed = Arc::new(AtomicBool::new(false));
        let k = killed.clone();
        let child = migrate_cmd(&a, &b, false, extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let out = finish_within(child, Duration::from_secs(60), move |line| {
            if !k.load(SeqCst) && line.contains(trigger) {
                // SAFETY: kill(2) on the source agent's pid (our child, still running).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                k.store(true, SeqCst);
            }
        });
        assert!(killed.load(SeqCst), "round {round}: migrate never printed {trigger:?}: {}", show(&out));
        let _ = a.kill9();
        eprintln!("round {round}: source killed at {trigger:?}; migrate: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "round {round}: migrate succeeded without its source: {}", show(&out));
        a = a.respawn().unwrap();
        let prev = std::fs::read_to_string(a.dir().join("agent.prev.log")).unwrap_or_default();
        let seen: Vec<&str> = prev
            .lines()
            .filter(|l| l.contains("job{id=mirror") || l.contains("job{id=verify") || l.contains("fence"))
            .filter(|l| ["job started", "job succeeded", "job failed", "fence"].iter().any(|k| l.contains(k)))
            .collect();
        eprintln!("round {round}: the source logged before the kill:\n{}", seen.join("\n"));

        // The destination never went live, so the source is authoritative
        // again: writable, bitmap usable (a superset of the writes), content intact.
        let info = disk_info(&a);
        let mirrors = jobs_of(&a, "mirror");
        let mirror = mirrors.last().unwrap();
        eprintln!(
            "round {round}: after the restart the source is {}; its mirror job: {} {}",
            if info["read_only"] == true { "read-only" } else { "writable" },
            mirror["result"],
            mirror["error"]
        );
        assert_eq!(
            info["read_only"], false,
            "round {round}: the source came back read-only although the destination never went live \
             (mirror job: {} {}): no writable copy of {DISK} anywhere",
            mirror["result"], mirror["error"]
        );
        let bm = bitmap(&a);
        eprintln!(
            "round {round}: bitmap dirty bytes {dirty_before} before the migration, {} after the restart",
            bm["dirty_bytes"]
        );
        assert!(bm["consistent"] == true && bm["busy"] == false, "round {round}: bitmap after the kill: {bm}");
        assert!(u(&bm["dirty_bytes"]) >= dirty_before, "round {round}: the bitmap lost bits: {bm}");
        let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
        write_ranges(&mut conn, &model, &mut rng, &[(20 * MIB + round * MIB, MIB)]);
        drop(conn);
        assert_model(&format!("round {round}: source after the kill"), &a.unix_uri(DISK), &model, &scratch);

        // The destination never exposes the disk.
        assert!(
            !listed_exports(&b).contains(&DISK.to_owned()),
            "round {round}: {DISK} visible on the destination although the migration never completed"
        );
        let states = migration_states(&b);
        eprintln!("round {round}: destination migrations: {states:?}");
        assert_eq!(states.len() as u64, round + 1, "{states:?}");
        assert!(
            states.iter().all(|s| s == "aborted" || s == "prepared"),
            "round {round}: destination migrations {states:?}"
        );
    }
    // A retry works; the earlier attempts end up aborted.
    migrate_ok(&a, &b, &["--verify"], Duration::from_secs(60));
    assert_model("destination after the retry", &b.unix_uri(DISK), &model, &scratch);
    assert_eq!(migration_states(&b), ["aborted", "aborted", "active"], "destination migrations");
}

/// Reads of a region the destination still takes from the backup fail (EIO,
/// after the agent's librados op timeout, CEPH_TIMEOUT = 30 s in
/// agent/src/store/rbd/mod.rs) instead of returning zeroes; the stream job
/// fails at the same wall. Note: nothing restarts a failed stream, so the
/// disk stays layered on the backup snapshot afterwards.
#[test]
fn destination_reads_fail_with_eio_while_the_backup_cluster_hangs_during_the_stream() {
    let _ceph = ceph_exclusive();
    let ceph = TestCeph::new("mig");
    let backing = Backing::Rbd(&ceph, ceph.image("osd"));
    let mut rng = Rng::from_env(0x3141_0006);
    let size = 32 * MIB;
    let a = source(&backing, size);
    let b = destination(&backing);
    let model = new_model(size);
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    write_ranges(&mut conn, &model, &mut rng, &[(0, size)]);
    backup(&a);
    write_ranges(&mut conn, &model, &mut rng, &[(0, MIB)]);
    drop(conn);
    // 1 MiB/s: the stream (4 MiB per step) is far from the end of the disk for
    // half a minute. Nothing reads the destination before the OSD stops, so
    // no cache can answer for it.
    let summary = migrate_ok(&a, &b, &["--speed", "1MiB"], Duration::from_secs(60));
    let stream_id = summary["stream_jobs"][0].as_str().unwrap().to_owned();
    let osd = StoppedOsd::stop(&ceph);
    let mut conn = NbdConn::connect(&b.socket(), DISK).unwrap();
    let offset = size - 4 * MIB;
    let started = Instant::now();
    let read = conn.read(offset, GRANULE as u32).unwrap();
    let took = started.elapsed();
    let expected = model.lock().unwrap()[offset as usize..(offset + GRANULE) as usize].to_vec();
    match &read {
        Err(e) => eprintln!("read of an unstreamed region with the OSD stopped: NBD errno {e} after {took:?}"),
        Ok(data) if data.iter().all(|&x| x == 0) => {
            panic!("the destination returned zeroes for an unstreamed region while the OSD was stopped ({took:?})")
        }
        Ok(data) if *data != expected => panic!("the destination returned wrong data while the OSD was stopped"),
        Ok(_) => panic!("the destination returned the data although the OSD was stopped ({took:?}): cached?"),
    }
    assert_eq!(read, Err(errno::EIO), "the read must fail with EIO");
    assert!(took < Duration::from_secs(45), "the read took {took:?} to fail");
    // The stream hits the same wall: it must end (failed) rather than hang or finish.
    let stream = b.concluded(&stream_id, Duration::from_secs(45));
    eprintln!("stream with the OSD stopped: {} {}", stream["result"], stream["error"]);
    assert_eq!(stream["result"], "failed", "{stream:#}");
    drop(osd);

    // Once the OSD is back, the same read returns the right data, the disk is
    // whole, still layered on the backup (the stream did not finish).
    let again = conn.read(offset, GRANULE as u32).unwrap();
    assert!(again.as_ref().is_ok_and(|d| *d == expected), "read after the OSD came back: {:?}", again.err());
    drop(conn);
    assert_model("destination after the OSD came back", &b.unix_uri(DISK), &model, &b.dir().join("scratch.raw"));
    let sidecar = dest_sidecar(&b);
    assert_eq!(sidecar["parent"], format!("{}@{}", backing.uri(), backing.snaps()[0]), "{sidecar:#}");

    // The failed stream is restartable: `rbdsync stream` copies what is
    // left (not what the first one did) and detaches the backing.
    let restarted = b.json(&["stream", DISK, "--wait"]);
    let restarted = restarted.as_array().and_then(|a| a.first()).cloned().unwrap_or(restarted);
    assert_eq!(restarted["result"], "success", "{restarted:#}");
    eprintln!("restarted stream: {}", restarted["summary"]);
    assert!(dest_sidecar(&b)["parent"].is_null(), "still layered after the restarted stream: {:#}", dest_sidecar(&b));
    assert_model("destination after the restarted stream", &b.unix_uri(DISK), &model, &b.dir().join("scratch.raw"));
}

/// A hot set of 48 granules, every other one (so each dirty granule is a
/// piece of its own for the mirror), all dirty before the mirror starts, and
/// a writer that rewrites it at 4 MiB/s (the tests let the mirror send 2 MiB/s).
fn outpacing_writer(a: &Agent, model: &Model, rng: &mut Rng) -> Writer {
    let hot: Vec<u64> = (0..48).map(|i| 64 + 2 * i).collect();
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    let ranges: Vec<(u64, u64)> = hot.iter().map(|&g| (g * GRANULE, GRANULE)).collect();
    write_ranges(&mut conn, model, rng, &ranges);
    drop(conn);
    let writer = Writer::start(a.socket(), model.clone(), hot, 4 * MIB, rng.next_u64());
    writer.wait_acked(5);
    writer
}

#[test]
fn mirror_outpaced_by_writes_switches_itself_to_write_blocking_and_completes() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0007);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 0);
    let scratch = b.dir().join("scratch.raw");
    let writer = outpacing_writer(&a, &model, &mut rng);
    let summary = migrate_ok(&a, &b, &["--speed", "2MiB", "--ready-threshold", "0"], Duration::from_secs(90));
    let log = writer.wait_refused(Duration::from_secs(10));
    assert!(log.error.is_none(), "writer failed: {log:?}");
    assert_eq!(log.refused, Some(errno::EPERM), "{log:?}");
    let mirror = jobs_of(&a, "mirror").pop().unwrap();
    let s = &mirror["summary"];
    eprintln!(
        "convergence: {} writes; mirror summary: passes {}, switched after pass {}, sent {}, downtime {} ms, \
         duration {} ms",
        log.acked,
        s["passes"],
        s["switched_to_write_blocking_after_pass"],
        s["bytes_sent"],
        s["downtime_ms"],
        s["duration_ms"]
    );
    assert_eq!(mirror["result"], "success", "{mirror:#}");
    assert!(
        s["switched_to_write_blocking_after_pass"].is_u64(),
        "the mirror never switched itself to write-blocking: {mirror:#}"
    );
    assert_eq!(u(&migrated_disk(&summary)["bytes_sent"]), u(&s["bytes_sent"]));
    assert_identical("source vs destination", &a.unix_uri(DISK), &b.unix_uri(DISK));
    assert_model("destination", &b.unix_uri(DISK), &model, &scratch);
}

/// An operator's `set-copy-mode background` must not undo the mirror's own
/// switch to write-blocking on every later pass (it then never converged).
#[test]
fn a_copy_mode_set_by_hand_does_not_keep_undoing_the_switch_to_write_blocking() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_000b);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 0);
    let scratch = b.dir().join("scratch.raw");
    let writer = outpacing_writer(&a, &model, &mut rng);
    let child = migrate_cmd(&a, &b, true, &["--speed", "2MiB", "--ready-threshold", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn migrate");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut child = Some(child);
    let id = loop {
        if let Some(job) = jobs_of(&a, "mirror").into_iter().find(|j| j["state"] == "running") {
            break job["id"].as_str().unwrap().to_owned();
        }
        if Instant::now() > deadline {
            let out = finish_within(child.take().unwrap(), Duration::from_secs(1), |_| {});
            panic!("no running mirror job on the source: {}; jobs {:?}", show(&out), jobs_of(&a, "mirror"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let child = child.take().unwrap();
    let set = a.json(&["job", "set-copy-mode", &id, "background"]);
    eprintln!("set-copy-mode background: {set}");
    let out = finish_within(child, Duration::from_secs(90), |_| {});
    assert!(out.status.success(), "migrate failed: {}{}", show(&out), logs(&a, &b));
    let log = writer.wait_refused(Duration::from_secs(10));
    assert!(log.error.is_none(), "writer failed: {log:?}");
    let mirror = jobs_of(&a, "mirror").pop().unwrap();
    assert_eq!(mirror["result"], "success", "{mirror:#}");
    assert!(mirror["summary"]["switched_to_write_blocking_after_pass"].is_u64(), "{mirror:#}");
    assert_identical("source vs destination", &a.unix_uri(DISK), &b.unix_uri(DISK));
    assert_model("destination", &b.unix_uri(DISK), &model, &scratch);
}

/// A fence follows a cut-over, which leaves the disk read-only; a disk that
/// is writable (again) may have taken writes the destination lacks.
#[test]
fn fencing_a_writable_disk_is_refused() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_000c);
    let (a, _b, model, _) = small_setup(&backing, &mut rng, 0);
    let sock = a.dir().join("control.sock");
    let out = run(
        "curl",
        &[
            "-sS",
            "--unix-socket",
            sock.to_str().unwrap(),
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"target": "elsewhere"}"#,
            "-w",
            "\n%{http_code}",
            &format!("http://agent/v1/disks/{DISK}/fence"),
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("\n409"), "fencing a writable disk: {text}");
    assert_eq!(disk_info(&a)["read_only"], false, "a refused fence changed the disk");
    assert!(!a.dir().join("state/fenced").join("vm1__disk0.json").exists(), "a refused fence left a fence file");
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    assert_eq!(conn.write(0, &vec![0x11; GRANULE as usize]).unwrap(), 0, "the disk is not writable");
    drop(model);
}

#[test]
fn source_stays_read_only_after_a_restart_following_a_completed_migration() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0008);
    let (mut a, b, model, _) = small_setup(&backing, &mut rng, 2);
    migrate_ok(&a, &b, &[], Duration::from_secs(60));
    assert_eq!(disk_info(&a)["read_only"], true);
    // The disk lives on the destination now. A restart of the source agent
    // (upgrade, reboot) must not hand the old copy back to writers.
    assert!(a.stop().unwrap().success());
    let a = a.respawn().unwrap();
    let info = disk_info(&a);
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    let err = conn.write(0, &vec![0xee; GRANULE as usize]).unwrap();
    assert!(
        info["read_only"] == true && err == errno::EPERM,
        "after a restart the source serves the migrated-away disk {DISK} writable again (disks: {info}; a write \
         got NBD errno {err}): two writable copies of one disk (split brain)"
    );
    // Nothing modifies a fenced disk: a stream (copy, flatten, detach) is refused.
    let (code, answer) = api_with(&a, "POST", "/v1/jobs", Some(&serde_json::json!({ "kind": "stream", "disk": DISK })));
    assert_eq!(code, 409, "a stream on a fenced disk: {answer}");
    // The operator takes the disk back (the destination is gone, say): a fence
    // read at start-up lifts like one set by the cut-over.
    let (code, answer) = api_with(&a, "DELETE", "/v1/disks/vm1/disk0/fence", None);
    assert_eq!(code, 200, "unfence after a restart: {answer}");
    assert_eq!(disk_info(&a)["read_only"], false, "still read-only after the unfence: {}", disk_info(&a));
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    assert_eq!(conn.write(0, &vec![0xee; GRANULE as usize]).unwrap(), 0, "unfenced after a restart, yet not writable");
    drop(model);
}

#[test]
fn a_fence_that_cannot_be_written_never_leaves_two_writable_copies() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0009);
    let (mut a, b, model, _) = small_setup(&backing, &mut rng, 2);
    // Fault injection: a file where the source keeps its fences
    // (STATE_DIR/fenced/), so recording the cut-over durably fails.
    std::fs::write(a.dir().join("state/fenced"), b"not a directory").unwrap();
    let out = output_within(migrate_cmd(&a, &b, true, &[]), Duration::from_secs(60));
    let live = listed_exports(&b).contains(&DISK.to_owned());
    eprintln!(
        "migrate with an unwritable fence: {} ({}); destination live: {live}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(a.stop().unwrap().success());
    let a = a.respawn().unwrap();
    let info = disk_info(&a);
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    let err = conn.write(0, &vec![0xee; GRANULE as usize]).unwrap();
    let source_writable = err == 0;
    assert!(
        !(live && source_writable),
        "the destination serves {DISK} and the restarted source accepts writes too (disks: {info}); migrate said: \
         {}",
        show(&out)
    );
    if !live {
        assert!(source_writable, "neither copy is writable (disks: {info}): {}", show(&out));
        assert!(!out.status.success(), "migrate succeeded but the destination is not live: {}", show(&out));
    }
    drop(model);
}

#[test]
fn write_blocking_under_small_writes_converges_in_few_passes() {
    // 4 KiB writes into 64 KiB granules: in write-blocking mode each one is
    // forwarded, so it must not leave its whole granule dirty again (or the
    // mirror keeps re-copying the hot set and never gets to the cut-over).
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0009);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 0);
    let hot: Vec<u64> = (0..48).map(|i| 64 + 2 * i).collect();
    // 1024 writes/s spread over the hot set while a pass copies at 1 MiB/s
    // (3 s for the set): every granule is written during every pass.
    let writer = Writer::start_pieces(a.socket(), model.clone(), hot, 4 * MIB, rng.next_u64(), 4096);
    writer.wait_acked(5);
    let summary = migrate_ok(
        &a,
        &b,
        &["--copy-mode", "write-blocking", "--ready-threshold", "0", "--speed", "1MiB"],
        Duration::from_secs(60),
    );
    let log = writer.wait_refused(Duration::from_secs(10));
    assert!(log.error.is_none(), "writer failed: {log:?}");
    let mirror = jobs_of(&a, "mirror").pop().unwrap();
    let s = &mirror["summary"];
    eprintln!("small writes, write-blocking: {} writes; passes {}, sent {}", log.acked, s["passes"], s["bytes_sent"]);
    assert_eq!(mirror["result"], "success", "{mirror:#}");
    assert!(u(&s["passes"]) <= 5, "write-blocking mirror needed {} passes under 4 KiB writes", s["passes"]);
    assert_eq!(u(&migrated_disk(&summary)["bytes_sent"]), u(&s["bytes_sent"]));
    assert_identical("source vs destination", &a.unix_uri(DISK), &b.unix_uri(DISK));
    assert_model("destination", &b.unix_uri(DISK), &model, &b.dir().join("scratch.raw"));
}

#[test]
fn a_mirror_seeded_from_a_bitmap_that_moved_on_since_the_chain_check_is_refused() {
    // `migrate` checks the chain, the destination layers on the latest snapshot S1, then the
    // mirror is seeded from the bitmap. A backup that commits in between (S2) drops every write
    // between S1 and S2 from the bitmap: seeded from it, the destination would miss them.
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0013);
    let (a, b, _, seeded) = small_setup(&backing, &mut rng, 2);
    let (code, chain) = api(&a, "GET", &format!("/v1/disks/{DISK}/chain"));
    assert_eq!(code, 200, "{chain}");
    assert_eq!(chain["matches"], true, "{chain}");
    backup(&a);
    let prepare = serde_json::json!({"vm": "vm1", "disks": [{"name": "disk0", "backing": chain["backing"]}]});
    let (code, prep) = api_with(&b, "POST", "/v1/migrations", Some(&prepare));
    assert!((200..300).contains(&code), "prepare: {code} {prep}");
    let export = prep["disks"][0]["export"].as_str().unwrap();
    let mirror = serde_json::json!({
        "kind": "mirror", "disk": DISK, "sync": "incremental", "bitmap": "backup",
        "target": format!("nbd+unix:///{export}?socket={}", b.socket().display()),
        "expect": chain["bitmap_state"],
    });
    let (code, started) = api_with(&a, "POST", "/v1/jobs", Some(&mirror));
    assert!((200..300).contains(&code), "starting the mirror: {code} {started}");
    let job = a.concluded(started["id"].as_str().unwrap(), Duration::from_secs(30));
    assert_eq!(job["result"], "failed", "a mirror seeded from a newer bitmap state ran: {job:#}");
    assert!(
        job["error"].as_str().unwrap_or_default().contains("changed since the backup chain was checked"),
        "{job:#}"
    );
    let after = bitmap(&a);
    assert!(after["busy"].is_null() || after["busy"] == false, "the refused mirror left the bitmap busy: {after}");
    assert!(seeded.len() > 1, "the test needs writes between the two backups");
}

#[test]
fn a_destination_that_cannot_record_the_migration_refuses_it() {
    // The destination's migration records cannot be written (here: `state/migrations` is a
    // file). A restart of that agent would find the VM file but no record, and serve the disk
    // writable with only the backup's content: prepare must fail, and nothing be left behind.
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0011);
    let (a, b, model, seeded) = small_setup(&backing, &mut rng, 2);
    let records = b.dir().join("state/migrations");
    let _ = std::fs::remove_dir_all(&records);
    std::fs::write(&records, "not a directory").unwrap();
    let out = output_within(migrate_cmd(&a, &b, false, &[]), Duration::from_secs(60));
    assert!(!out.status.success(), "migrate succeeded without a migration record on the destination: {}", show(&out));
    assert!(!b.dir().join("vms.d/vm1.yaml").exists(), "the destination kept the VM file{}", logs(&a, &b));
    assert!(listed_exports(&b).is_empty(), "the destination serves {:?}", listed_exports(&b));
    assert_eq!(disk_info(&a)["read_only"], false);
    assert_eq!(u(&bitmap(&a)["dirty_bytes"]), seeded.len() as u64 * GRANULE);
    assert_model("source", &a.unix_uri(DISK), &model, &a.dir().join("scratch.raw"));
}

#[test]
fn complete_and_abort_of_one_incoming_migration_never_both_succeed() {
    // Both check that the migration is prepared, then act: without one lock around each, an
    // abort that is removing the disks and a complete that activates them could both succeed.
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0012);
    let (a, b, _, _) = small_setup(&backing, &mut rng, 0);
    let (code, chain) = api(&a, "GET", &format!("/v1/disks/{DISK}/chain"));
    assert_eq!(code, 200, "{chain}");
    let prepare = serde_json::json!({"vm": "vm1", "disks": [{"name": "disk0", "backing": chain["backing"]}]});
    // The abort goes first; the complete follows after a shorter wait each round, until it wins.
    for (round, delay_us) in (0..40u64).rev().map(|i| i * 500).enumerate() {
        let (code, prep) = api_with(&b, "POST", "/v1/migrations", Some(&prepare));
        assert!((200..300).contains(&code), "prepare: {code} {prep}{}", logs(&a, &b));
        let id = prep["id"].as_str().unwrap().to_owned();
        let (abort, complete) = std::thread::scope(|s| {
            let abort = s.spawn(|| api(&b, "POST", &format!("/v1/migrations/{id}/abort")));
            std::thread::sleep(Duration::from_micros(delay_us));
            let body = serde_json::json!({"stream": false});
            let complete = api_with(&b, "POST", &format!("/v1/migrations/{id}/complete"), Some(&body));
            (abort.join().unwrap(), complete)
        });
        eprintln!("round {round} (+{delay_us} µs): abort {}, complete {}", abort.0, complete.0);
        let ok = |code: u16| (200..300).contains(&code);
        assert!(
            !ok(abort.0) || !ok(complete.0),
            "abort and complete both succeeded: {abort:?} {complete:?}{}",
            logs(&a, &b)
        );
        let (_, record) = api(&b, "GET", &format!("/v1/migrations/{id}"));
        if record["state"] == "active" {
            assert!(ok(complete.0), "{record}");
            assert!(listed_exports(&b).contains(&DISK.to_owned()), "active, but {DISK} is not served");
            break;
        }
        assert_eq!(record["state"], "aborted", "{record}");
        assert!(!b.dir().join("vms.d/vm1.yaml").exists(), "aborted, but the VM file stayed");
    }
}

#[test]
fn the_cut_over_ignores_the_speed_limit_so_guest_writes_are_not_held_for_long() {
    // Guest writes are held from the start of the cut-over until the last
    // dirty granule reached the destination. That copy must not keep to the
    // job's speed limit: a 256 KiB/s mirror with megabytes dirty at the
    // cut-over held the guest for tens of seconds.
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0010);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 0);
    let everywhere: Vec<u64> = (0..32 * MIB / GRANULE).collect();
    let writer = Writer::start(a.socket(), model.clone(), everywhere, 4 * MIB, rng.next_u64());
    writer.wait_acked(20);
    let summary = migrate_ok(&a, &b, &["--speed", "256KiB", "--ready-threshold", "1GiB"], Duration::from_secs(120));
    let log = writer.wait_refused(Duration::from_secs(10));
    assert!(log.error.is_none(), "writer failed: {log:?}");
    let mirror = jobs_of(&a, "mirror").pop().unwrap();
    let s = &mirror["summary"];
    eprintln!(
        "cut-over at 256 KiB/s: downtime {} ms, copied {} during it, sent {}, passes {}",
        s["downtime_ms"], s["cutover_bytes"], s["bytes_sent"], s["passes"]
    );
    assert_eq!(mirror["result"], "success", "{mirror:#}");
    assert!(u(&s["cutover_bytes"]) > 0, "nothing was left to copy at the cut-over: the test proves nothing ({s})");
    // At 256 KiB/s, each MiB left at the cut-over would hold the guest for 4 s.
    assert!(u(&s["downtime_ms"]) < 4000, "the cut-over held guest writes for {} ms", s["downtime_ms"]);
    assert_eq!(u(&migrated_disk(&summary)["bytes_sent"]), u(&s["bytes_sent"]));
    assert_identical("source vs destination", &a.unix_uri(DISK), &b.unix_uri(DISK));
    assert_model("destination", &b.unix_uri(DISK), &model, &b.dir().join("scratch.raw"));
}

#[test]
fn a_stalled_destination_fails_the_mirror_within_the_client_timeout_and_guest_writes_go_on() {
    // The destination agent is frozen (SIGSTOP: a hung host, a black-holed
    // network) during a write-blocking mirror. The source must not hang its
    // guest: the NBD client gives up after nbd.client_timeout_secs, the
    // mirror fails, the write that could not be forwarded succeeds on the
    // (still authoritative) source and stays dirty in the bitmap.
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_000a);
    let (a, b, model, seeded) = small_setup_with(&backing, &mut rng, 8, "  client_timeout_secs: 3\n");
    let scratch = a.dir().join("scratch.raw");
    let everywhere: Vec<u64> = (0..32 * MIB / GRANULE).collect();
    let writer = Writer::start(a.socket(), model.clone(), everywhere, MIB, rng.next_u64());
    writer.wait_acked(3);
    let child =
        migrate_cmd(&a, &b, false, &["--speed", "1MiB", "--ready-threshold", "0", "--copy-mode", "write-blocking"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let running: Vec<Value> = jobs_of(&a, "mirror").into_iter().filter(|j| j["state"] == "running").collect();
        if let Some(j) = running.first().filter(|j| u(&j["bytes_done"]) >= MIB) {
            break j["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no mirror progress on the source{}", logs(&a, &b));
        std::thread::sleep(Duration::from_millis(50));
    };
    b.signal(libc::SIGSTOP);
    let stalled_at = Instant::now();
    let mirror = a.concluded(&id, Duration::from_secs(20));
    let noticed = stalled_at.elapsed();
    // Guest writes go on while the destination is still frozen.
    let acked = writer.acked();
    writer.wait_acked(acked + 5);
    b.signal(libc::SIGCONT);
    eprintln!("stalled destination: mirror failed after {noticed:?}: {}", mirror["error"]);
    assert_eq!(mirror["result"], "failed", "{mirror:#}");
    assert!(mirror["error"].as_str().unwrap_or_default().contains("did not answer within 3 s"), "{mirror:#}");
    assert!(noticed < Duration::from_secs(15), "the mirror took {noticed:?} to give up");
    let out = finish_within(child, Duration::from_secs(30), |_| {});
    assert!(!out.status.success(), "migrate succeeded with a frozen destination: {}", show(&out));
    let log = writer.finish();
    assert!(log.error.is_none() && log.refused.is_none(), "the source failed guest writes: {log:?}");
    assert_eq!(disk_info(&a)["read_only"], false);
    let after = bitmap(&a);
    let expected: std::collections::BTreeSet<u64> = seeded.union(&log.granules).copied().collect();
    assert_eq!(u(&after["dirty_bytes"]), expected.len() as u64 * GRANULE, "bitmap after the failed migration: {after}");
    assert_model("source after the stalled migration", &a.unix_uri(DISK), &model, &scratch);
}

/// Hold keys (`rbdsync.hold.SNAP/HOLDER`) in the metadata of a file backup.
fn file_holds(path: &Path) -> Vec<String> {
    let meta = std::fs::read_to_string(format!("{}.rbdsync", path.display())).unwrap();
    let meta: Value = serde_json::from_str(&meta).unwrap();
    let keys = meta["metadata"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    keys.into_iter().filter(|k| k.starts_with("rbdsync.hold.")).collect()
}

#[test]
fn the_backup_snapshot_a_destination_reads_from_is_held_until_the_stream_detaches() {
    let store = tempfile::tempdir().unwrap();
    let path = store.path().join("backups/vm1-disk0.raw");
    let backing = Backing::File(path.clone());
    let mut rng = Rng::from_env(0x3141_000b);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 2);
    assert!(file_holds(&path).is_empty());
    migrate_ok(&a, &b, &["--no-stream"], Duration::from_secs(60));
    let snap = backing.snaps().pop().unwrap();
    // The destination ("test" node) holds the snapshot its disk is layered on.
    assert_eq!(file_holds(&path), [format!("rbdsync.hold.{snap}/test:vm1/disk0")]);
    let streamed = b.json(&["stream", DISK, "--wait"]);
    let streamed = streamed.as_array().and_then(|a| a.first()).cloned().unwrap_or(streamed);
    assert_eq!(streamed["result"], "success", "{streamed:#}");
    assert!(file_holds(&path).is_empty(), "the hold outlived the detach: {:?}", file_holds(&path));
    assert_model("destination after the stream", &b.unix_uri(DISK), &model, &b.dir().join("scratch.raw"));
}

#[test]
fn migration_to_an_rbd_clone_destination_flattens_it_and_drops_the_hold() {
    // The destination disk is an RBD clone of the backup snapshot (not a
    // `file:` overlay): the stream flattens it, then the hold goes.
    let _ceph = ceph_shared();
    let ceph = TestCeph::new("mig");
    let backing = Backing::Rbd(&ceph, ceph.image("clsrc"));
    let dest = ceph.image("cldst");
    let mut rng = Rng::from_env(0x3141_000c);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 3);
    let Backing::Rbd(_, image) = &backing else { unreachable!() };
    let holds = || -> Vec<String> {
        let out = ceph.rbd(&["image-meta", "list", "--format", "json", image]).unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_object()
            .map(|m| m.keys().filter(|k| k.starts_with("rbdsync.hold.")).cloned().collect())
            .unwrap_or_default()
    };
    migrate_ok(&a, &b, &["--dest-image", &format!("rbd:{dest}"), "--no-stream"], Duration::from_secs(60));
    assert_identical("source vs RBD clone destination", &a.unix_uri(DISK), &b.unix_uri(DISK));
    let snap = backing.snaps().pop().unwrap();
    assert_eq!(holds(), [format!("rbdsync.hold.{snap}/test:vm1/disk0")], "the destination holds its backing");
    let stream = b.json(&["stream", DISK, "--wait"]);
    let stream = stream.as_array().and_then(|a| a.first()).cloned().unwrap_or(stream);
    assert_eq!(stream["result"], "success", "{stream:#}{}", logs(&a, &b));
    assert_eq!(stream["summary"]["flattened"], true, "{stream:#}");
    let info: Value = serde_json::from_slice(&ceph.rbd(&["info", "--format", "json", &dest]).unwrap().stdout).unwrap();
    assert!(info.get("parent").is_none(), "the clone still has a parent: {info:#}");
    assert!(holds().is_empty(), "the hold outlived the flatten: {:?}", holds());
    ceph.rbd(&["snap", "purge", image]).unwrap();
    assert_model("RBD clone destination without its backup", &b.unix_uri(DISK), &model, &b.dir().join("scratch.raw"));
}

/// `qemu-nbd` serving a raw file on a Unix socket, killed on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_deep_queue_writer_through_a_write_blocking_mirror_keeps_going_and_the_agent_still_stops() {
    // fio with 256 writes in flight through a write-blocking mirror: each guest write waits for
    // its granules' locks on a blocking-pool thread, so the writes can fill the pool (128
    // threads) while a copy piece holds those locks. The piece must not need a pool thread to
    // finish (it once queued its source read there: guest IO stopped for good, the job could not
    // be cancelled, SIGTERM did not stop the agent).
    let mut a = AgentBuilder::new().simple_vm("vm1", "64MiB").start().unwrap();
    let dest = a.dir().join("dest.raw");
    std::fs::File::create(&dest).unwrap().set_len(64 * MIB).unwrap();
    let sock = a.dir().join("dest.sock");
    let _server = QemuNbd(
        Command::new("qemu-nbd")
            .args(["-t", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(&dest)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let target = format!("nbd+unix:///?socket={}", sock.display());
    let started = a.json(&[
        "mirror",
        DISK,
        "--target",
        &target,
        "--sync",
        "full",
        "--copy-mode",
        "write-blocking",
        "--speed",
        "8MiB",
    ]);
    let id = started["id"].as_str().unwrap().to_owned();
    let fio = Command::new("fio")
        .args([
            "--name=deep",
            "--ioengine=nbd",
            &format!("--uri={}", a.unix_uri(DISK)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=256",
            "--size=64M",
            "--time_based",
            "--runtime=6",
            "--output-format=terse",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (with its nbd engine)");
    let out = output_of_within(fio, Duration::from_secs(60));
    let out = out.unwrap_or_else(|| panic!("fio hung: guest IO stopped under the mirror{}", log_tail_of(&a)));
    assert!(out.status.success(), "fio failed: {}", show(&out));
    let fields: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().trim().split(';').collect();
    let writes: u64 = fields.get(48).and_then(|f| f.parse().ok()).unwrap_or(0);
    eprintln!("deep queue: fio wrote {writes} times in 6 s through the write-blocking mirror");
    assert!(writes > 256, "fio made no progress ({writes} writes): {}", show(&out));
    let job = a.json(&["job", "show", &id]);
    assert_ne!(job["state"], "concluded", "the mirror ended under the writes: {job:#}");
    a.json(&["job", "cancel", &id]);
    let job = a.concluded(&id, Duration::from_secs(20));
    assert_eq!(job["result"], "cancelled", "{job:#}");
    let stopped = a.stop();
    assert!(stopped.is_ok(), "the agent did not stop on SIGTERM: {stopped:?}");
}

/// Waits for a child's output, at most `limit`; None (and the child killed) if it is still running.
fn output_of_within(mut child: Child, limit: Duration) -> Option<Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

fn log_tail_of(a: &Agent) -> String {
    format!("\n--- agent log:\n{}", a.log_tail())
}

/// States an outgoing migration ends in.
const ENDED: [&str; 3] = ["completed", "failed", "aborted"];

/// Polls the source's outgoing migration of vm1 until `done` (at most 60 s).
fn outgoing_when(a: &Agent, b: &Agent, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, m) = api(a, "GET", "/v1/migrations/outgoing/vm1");
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: not there within 60 s: {m}{}", logs(a, b));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The outgoing migration belongs to the source agent: the `migrate` CLI
/// killed while it waits changes nothing, and the source agent killed -9 in
/// each state (mirroring, ready, and right after a cut-over request) comes
/// back with either the source writable and unfenced and the destination not
/// live, or the source fenced and the destination live — never both
/// writable, never read-only without a fence; a retry then works.
#[test]
fn killing_the_cli_or_the_source_agent_in_each_state_never_splits_the_disk() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0021);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 4);
    let scratch = b.dir().join("scratch.raw");
    // The CLI killed at once: the agent carries the migration on (auto) to the end.
    let mut child =
        migrate_cmd(&a, &b, false, &["--speed", "4MiB"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let _ = child.wait();
    let done = outgoing_when(&a, &b, "without its CLI", |m| ENDED.contains(&m["state"].as_str().unwrap_or("")));
    assert_eq!(done["state"], "completed", "the migration did not go on without its CLI: {done:#}{}", logs(&a, &b));
    assert_model("destination after the CLI was killed", &b.unix_uri(DISK), &model, &scratch);
    drop((a, b));

    for (round, at) in ["mirroring", "ready", "cutover requested"].iter().enumerate() {
        let store = tempfile::tempdir().unwrap();
        let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
        let (mut a2, b2, model2, _) = small_setup(&backing, &mut rng, 4);
        let scratch = b2.dir().join("scratch.raw");
        let speed: &[&str] = if *at == "mirroring" { &["--speed", "1MiB"] } else { &[] };
        let mut child = migrate_cmd(&a2, &b2, true, &[&["--cutover", "manual"][..], speed].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let want = if *at == "mirroring" { "mirroring" } else { "ready" };
        outgoing_when(&a2, &b2, &format!("round {round}: {want}"), |m| {
            m["state"] == want && m["disks"][0]["job"].is_string()
        });
        let _ = child.kill();
        let _ = child.wait();
        if *at == "ready" {
            // A manual migration's mirrors stay running and write-blocking: no pause, no
            // background mode, no completing one disk alone.
            let job = api(&a2, "GET", "/v1/migrations/outgoing/vm1").1["disks"][0]["job"].as_str().unwrap().to_owned();
            for (path, body) in [
                (format!("/v1/jobs/{job}/pause"), None),
                (format!("/v1/jobs/{job}/complete"), None),
                (format!("/v1/jobs/{job}/copy-mode"), Some(serde_json::json!({"copy_mode": "background"}))),
            ] {
                let (code, answer) = api_with(&a2, "POST", &path, body.as_ref());
                assert_eq!(code, 409, "{path} on a ready migration's mirror: {answer}");
            }
        }
        if *at == "cutover requested" {
            // Asked for without waiting: the CLI says so and succeeds (the cut-over is not over).
            let out = rbdsync(&a2).args(["migration", "cutover", "vm1", "--no-wait"]).output().unwrap();
            assert!(out.status.success(), "migration cutover --no-wait: {}", show(&out));
        }
        let (_, before) = api(&a2, "GET", "/v1/migrations/outgoing/vm1");
        a2.kill9().unwrap();
        eprintln!("round {round}: source killed at {at} (state {})", before["state"]);
        a2 = a2.respawn().unwrap();
        let after = outgoing_when(&a2, &b2, &format!("round {round}: after the restart"), |m| {
            ENDED.contains(&m["state"].as_str().unwrap_or(""))
        });
        let info = disk_info(&a2);
        let fenced = a2.dir().join("state/fenced/vm1__disk0.json").exists();
        let live = migration_states(&b2).iter().any(|s| s == "active");
        eprintln!(
            "round {round}: after the restart: {} (source read-only {}, fenced {fenced}; destination live {live})",
            after["state"], info["read_only"]
        );
        assert!(!(live && info["read_only"] == false), "round {round}: two writable copies{}", logs(&a2, &b2));
        assert_eq!(
            info["read_only"] == true,
            fenced,
            "round {round}: read-only without a fence (or the reverse): {info}"
        );
        assert_eq!(live, after["state"] == "completed", "round {round}: record {after} vs destination live {live}");
        if live {
            assert_model(&format!("round {round}: destination"), &b2.unix_uri(DISK), &model2, &scratch);
        } else {
            assert_model(&format!("round {round}: source"), &a2.unix_uri(DISK), &model2, &scratch);
            assert_eq!(bitmap(&a2)["busy"], false);
            // A retry works.
            migrate_ok(&a2, &b2, &[], Duration::from_secs(60));
            assert_model(&format!("round {round}: destination after the retry"), &b2.unix_uri(DISK), &model2, &scratch);
        }
    }
}

/// A `first-io` migration waits in `ready` for the destination's first
/// write. If the destination's migration goes live by another hand (its
/// `complete` called directly) the source must not stay writable beside it:
/// the migration fails and the source disk ends fenced and read-only (two
/// writable copies otherwise, with the source's watcher waiting forever).
#[test]
fn a_first_io_migration_whose_destination_went_live_elsewhere_fences_the_source() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0031);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 2);
    let out = output_within(migrate_cmd(&a, &b, true, &["--cutover", "first-io"]), Duration::from_secs(60));
    assert!(out.status.success(), "migrate --cutover first-io: {}", show(&out));
    let (_, m) = api(&a, "GET", "/v1/migrations/outgoing/vm1");
    assert_eq!(m["state"], "ready", "{m}");
    let id = m["id"].as_str().unwrap().to_owned();
    // Its cut-over is the destination VM's first write, not a request while the VM may still
    // run here (that would be taken for the trigger and never rolled back).
    let (code, answer) = api(&a, "POST", "/v1/migrations/outgoing/vm1/cutover");
    assert_eq!(code, 409, "migration cutover on a first-io migration: {answer}");
    let (code, answer) =
        api_with(&b, "POST", &format!("/v1/migrations/{id}/complete"), Some(&serde_json::json!({ "stream": false })));
    assert_eq!(code, 200, "complete on the destination: {answer}");
    let after = outgoing_when(&a, &b, "after the destination went live", |m| {
        ENDED.contains(&m["state"].as_str().unwrap_or(""))
    });
    eprintln!("source migration after the destination went live elsewhere: {after}");
    assert_eq!(after["state"], "failed", "{after:#}{}", logs(&a, &b));
    let info = disk_info(&a);
    assert_eq!(info["read_only"], true, "the source stayed writable beside a live destination: {info}");
    assert!(a.dir().join("state/fenced/vm1__disk0.json").exists(), "read-only without a fence");
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    assert_eq!(conn.write(0, &vec![0x5a; GRANULE as usize]).unwrap(), errno::EPERM, "the source took a write");
    drop(conn);
    // Fenced across restarts; once the operator takes the disk back, it stays writable.
    let mut a = a;
    assert!(a.stop().unwrap().success());
    a = a.respawn().unwrap();
    assert_eq!(disk_info(&a)["read_only"], true, "a restart unfenced the source beside a live destination");
    let (code, answer) = api_with(&a, "DELETE", "/v1/disks/vm1/disk0/fence", None);
    assert_eq!(code, 200, "unfence: {answer}");
    assert!(a.stop().unwrap().success());
    let a = a.respawn().unwrap();
    assert_eq!(disk_info(&a)["read_only"], false, "a restart fenced again a disk the operator took back");
    drop(model);
}

/// The source agent killed after a `first-io` trigger and before its
/// fences are written (a file system that never finishes creating the
/// fence holds it there): QEMU's migration is over at that point, the VM
/// runs on the destination and its first write waits for the cut-over. The
/// restarted source rolls forward (fences, activates the destination) and
/// that write succeeds; a rollback would fail it with EIO and leave the VM
/// with no disk.
#[test]
fn a_source_killed_after_the_first_io_trigger_rolls_forward_and_the_held_write_succeeds() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0032);
    let (mut a, b, model, _) = small_setup(&backing, &mut rng, 2);
    let scratch = b.dir().join("scratch.raw");
    let fences = tests::fusefs::PowerCutFs::mount_stalling(&a.dir().join("state/fenced")).unwrap();
    let out = output_within(migrate_cmd(&a, &b, true, &["--cutover", "first-io"]), Duration::from_secs(60));
    assert!(out.status.success(), "migrate --cutover first-io: {}", show(&out));
    // The destination VM's first write (by the disk's own name): held until the cut-over.
    let offset = 20 * MIB;
    let data: Vec<u8> = (0..GRANULE).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let socket = b.socket();
    let payload = data.clone();
    let first_write = std::thread::spawn(move || {
        let mut conn = NbdConn::connect(&socket, DISK)?;
        conn.write(offset, &payload)
    });
    outgoing_when(&a, &b, "the cut-over after the first write", |m| m["state"] == "cutting-over");
    // Give the cut-over time to reach the fence (it stalls creating the file).
    std::thread::sleep(Duration::from_millis(500));
    // What the destination holds is not trusted after the crash (a failed forward, a cut-over
    // requested before the sync, nothing flushed): spoil a mirrored granule behind its back.
    {
        use std::os::unix::fs::FileExt;
        let image = std::fs::OpenOptions::new().write(true).open(b.dir().join("state/images/vm1-disk0.raw")).unwrap();
        image.write_all_at(&vec![0xee; GRANULE as usize], 0).unwrap();
    }
    a.signal(libc::SIGKILL);
    fences.kill().unwrap();
    a.kill9().unwrap();
    let a = a.respawn().unwrap();
    let after = outgoing_when(&a, &b, "after the restart", |m| ENDED.contains(&m["state"].as_str().unwrap_or("")));
    eprintln!("after the restart: {after}");
    let held = first_write.join().unwrap().unwrap();
    assert_eq!(held, 0, "the destination VM's held first write failed (NBD errno {held}){}", logs(&a, &b));
    assert_eq!(after["state"], "completed", "{after:#}");
    assert_eq!(migration_states(&b), vec!["active".to_owned()]);
    let info = disk_info(&a);
    assert_eq!(info["read_only"], true, "{info}");
    assert!(a.dir().join("state/fenced/vm1__disk0.json").exists(), "the source is not fenced");
    model.lock().unwrap()[offset as usize..(offset + GRANULE) as usize].copy_from_slice(&data);
    assert_model("destination after the roll-forward", &b.unix_uri(DISK), &model, &scratch);
}

/// After a first-io trigger the VM runs on the destination: a cut-over
/// that fails there (the source cannot write its fences) is retried, never
/// rolled back (a rollback would fail the VM's held write and delete its
/// disk). While it fails the source stays read-only and the destination
/// holds reads as well as writes; once the fences can be written the
/// retry completes and the held write succeeds.
#[test]
fn a_first_io_cut_over_that_fails_is_retried_and_the_held_write_succeeds() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0033);
    let (a, b, model, _) = small_setup(&backing, &mut rng, 2);
    let scratch = b.dir().join("scratch.raw");
    let out = output_within(migrate_cmd(&a, &b, true, &["--cutover", "first-io"]), Duration::from_secs(60));
    assert!(out.status.success(), "migrate --cutover first-io: {}", show(&out));
    // Fault injection: a file where the source keeps its fences.
    let fences = a.dir().join("state/fenced");
    let _ = std::fs::remove_dir(&fences);
    std::fs::write(&fences, b"not a directory").unwrap();
    let offset = 24 * MIB;
    let data: Vec<u8> = (0..GRANULE).map(|i| (i % 241) as u8 ^ 0xa5).collect();
    let (socket, payload) = (b.socket(), data.clone());
    let first_write = std::thread::spawn(move || {
        let mut conn = NbdConn::connect(&socket, DISK)?;
        conn.write(offset, &payload)
    });
    // The cut-over fails at the fence and is retried: never back to the source.
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let (_, m) = api(&a, "GET", "/v1/migrations/outgoing/vm1");
        if m["error"].as_str().is_some_and(|e| e.contains("retrying")) {
            break m;
        }
        assert!(!ENDED.contains(&m["state"].as_str().unwrap_or("")), "the migration ended: {m:#}{}", logs(&a, &b));
        assert!(Instant::now() < deadline, "no retry within 30 s: {m:#}{}", logs(&a, &b));
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("while the fences fail: {m}");
    assert_eq!(m["state"], "cutting-over", "{m:#}");
    assert_eq!(disk_info(&a)["read_only"], true, "the source is writable again after the trigger");
    assert_eq!(migration_states(&b), vec!["prepared".to_owned()]);
    // Reads by the disk's own name wait as well while the destination is mirrored again.
    let socket = b.socket();
    let reader = std::thread::spawn(move || {
        let mut conn = NbdConn::connect(&socket, DISK)?;
        conn.read(0, 4096)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reader.is_finished(), "the destination served a read while mirrored again");
    // The fences can be written again: the next attempt completes.
    std::fs::remove_file(&fences).unwrap();
    let after =
        outgoing_when(&a, &b, "after the fences work again", |m| ENDED.contains(&m["state"].as_str().unwrap_or("")));
    assert_eq!(after["state"], "completed", "{after:#}{}", logs(&a, &b));
    let held = first_write.join().unwrap().unwrap();
    assert_eq!(held, 0, "the destination VM's held first write failed (NBD errno {held})");
    assert!(reader.join().unwrap().unwrap().is_ok(), "the held read failed");
    assert!(a.dir().join("state/fenced/vm1__disk0.json").exists(), "the source is not fenced");
    model.lock().unwrap()[offset as usize..(offset + GRANULE) as usize].copy_from_slice(&data);
    assert_model("destination after the retried cut-over", &b.unix_uri(DISK), &model, &scratch);
}

/// A disk that was never backed up: `migrate` refuses and says what to do;
/// `migrate --full` mirrors the whole disk onto a plain destination image,
/// which ends up equal to every acknowledged write.
#[test]
fn migrate_without_a_backup_refuses_and_full_mirrors_the_whole_disk() {
    let store = tempfile::tempdir().unwrap();
    let backing = Backing::File(store.path().join("backups/vm1-disk0.raw"));
    let mut rng = Rng::from_env(0x3141_0022);
    let size = 16 * MIB;
    let a = source(&backing, size);
    let b = destination(&backing);
    let scratch = b.dir().join("scratch.raw");
    let model = new_model(size);
    let mut conn = NbdConn::connect(&a.socket(), DISK).unwrap();
    let data: Vec<(u64, u64)> = (0..size / MIB).filter(|_| rng.below(3) != 0).map(|i| (i * MIB, MIB)).collect();
    write_ranges(&mut conn, &model, &mut rng, &data);
    drop(conn);
    let out = output_within(migrate_cmd(&a, &b, false, &[]), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("migrate without a backup: {}", stderr.trim());
    assert!(!out.status.success(), "migrate succeeded without a backup: {}", show(&out));
    assert!(stderr.contains("--full") && stderr.contains("backup"), "the refusal must say what to do: {stderr}");
    assert!(migrations(&b).is_empty(), "the destination was prepared although migrate refused: {:?}", migrations(&b));
    let summary = migrate_ok(&a, &b, &["--full"], Duration::from_secs(60));
    assert_eq!(summary["state"], "completed", "{summary:#}");
    let sent = u(&migrated_disk(&summary)["bytes_sent"]);
    assert!(sent >= size, "a full mirror sent only {sent} of {size} bytes");
    assert_model("destination after migrate --full", &b.unix_uri(DISK), &model, &scratch);
    assert_eq!(disk_info(&a)["read_only"], true, "the source is not fenced after migrate --full");
}
