//! Backups end to end: the real agent backs up disks that real clients keep
//! writing to, to `rbd:` images of a test Ceph cluster and to `file:` images,
//! and every snapshot is compared byte for byte with the disk content at the
//! moment the backup froze it. Also: faults (full target, stopped OSD, agent
//! killed mid-backup), refused requests, VM groups and retention.
//!
//! RBD tests need `RBDSYNC_TEST_CEPH_CONF` (the ceph.conf of a cluster from
//! `deploy/dev/ceph-cluster.sh`, pools `rbd` and `backup`); without it they
//! fail. Random content is seeded (`TEST_SEED=N` replays a run).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;
use tests::ceph::{ceph_exclusive, ceph_shared, StoppedOsd, TestCeph};
use tests::{nbd::NbdConn, run, show, Agent, AgentBuilder, Rng};

const MIB: u64 = 1 << 20;
const GRANULE: u64 = 64 << 10;

// ---------------------------------------------------------------- client CLI

fn id(record: &Value) -> String {
    record["id"].as_str().unwrap_or_else(|| panic!("no job id in {record}")).to_owned()
}

fn assert_success(agent: &Agent, job: &Value) {
    assert_eq!(job["result"], "success", "job failed: {job:#}\nagent log:\n{}", agent.log_tail());
}

/// Starts a backup (`args` = `backup ...`; the command returns once the disk
/// is frozen) and waits for it to succeed.
fn backup_ok(agent: &Agent, args: &[&str]) -> Value {
    let started = agent.json(args);
    let done = agent.concluded(&id(&started), Duration::from_secs(60));
    assert_success(agent, &done);
    done
}

fn bitmap(agent: &Agent, disk: &str, name: &str) -> Value {
    let list = agent.json(&["bitmap", "list", disk]);
    list.as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no bitmap {name} on {disk}: {list}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn snapshot_of(job: &Value) -> String {
    job["summary"]["snapshot"].as_str().unwrap_or_else(|| panic!("no snapshot in {job:#}")).to_owned()
}

// ------------------------------------------------------------ configuration

/// One disk entry of a VM file: bitmap `backup` (64 KiB) and backup defaults.
fn disk_yaml(vm: &str, name: &str, size: &str, target: Option<&str>, keep: Option<u32>) -> String {
    let mut s = format!(
        "  - name: {name}\n    image: file:../images/{vm}-{name}.raw\n    size: {size}\n    bitmaps: [{{name: backup, granularity: 64KiB}}]\n"
    );
    if let Some(t) = target {
        let keep = keep.map(|k| format!(", keep: {k}")).unwrap_or_default();
        s.push_str(&format!("    backup: {{target: \"{t}\", bitmap: backup{keep}}}\n"));
    }
    s
}

fn vm_yaml(vm: &str, disks: &[String]) -> String {
    format!("name: {vm}\ndisks:\n{}", disks.concat())
}

/// An agent with `vm1/disk0` of `size` backed up (bitmap `backup`) to a
/// `file:` target in its directory: the agent, the target's path, its URI.
fn file_target_agent(size: &str) -> (Agent, PathBuf, String) {
    let b = AgentBuilder::new();
    let target = b.dir().join("backups/vm1-disk0.raw");
    let uri = format!("file:{}", target.display());
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", size, Some(&uri), None)]);
    (b.vm("vm1", &yaml).start().unwrap(), target, uri)
}

// ------------------------------------------------------------ raw NBD writes

/// Writes random data over `ranges` of an export (through NBD, so bitmaps see it).
fn write_random(agent: &Agent, export: &str, rng: &mut Rng, ranges: &[(u64, u64)]) {
    let mut conn = NbdConn::connect(&agent.socket(), export).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for &(offset, length) in ranges {
        let mut pos = offset;
        while pos < offset + length {
            let n = MIB.min(offset + length - pos) as usize;
            rng.fill(&mut buf[..n]);
            conn.write_ok(pos, &buf[..n]).unwrap();
            pos += n as u64;
        }
    }
}

/// The export's current content in a file (`qemu-img convert` over NBD).
fn capture(agent: &Agent, export: &str, out: &Path) {
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &agent.unix_uri(export), out.to_str().unwrap()]).unwrap();
}

/// Compares two images byte for byte; on a difference names the first
/// differing offset and how many 64 KiB blocks differ.
fn assert_same_content(what: &str, expected: &Path, actual: &Path) {
    let a = std::fs::read(expected).unwrap_or_else(|e| panic!("{what}: read {}: {e}", expected.display()));
    let b = std::fs::read(actual).unwrap_or_else(|e| panic!("{what}: read {}: {e}", actual.display()));
    assert_eq!(a.len(), b.len(), "{what}: sizes differ ({} vs {})", expected.display(), actual.display());
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
        let blocks = a.chunks(GRANULE as usize).zip(b.chunks(GRANULE as usize)).filter(|(x, y)| x != y).count();
        panic!(
            "{what}: {} differs from {}: first difference at byte {first}, {blocks} of {} 64 KiB blocks differ",
            actual.display(),
            expected.display(),
            a.len() / GRANULE as usize
        );
    }
}

/// A client that keeps writing random data into a window of the disk from a
/// background thread, one request at a time, until paused or stopped.
struct Writer {
    shared: Arc<(Mutex<WriterState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WriterState {
    pause: bool,
    paused: bool,
    stop: bool,
    window: (u64, u64),
    writes: u64,
    error: Option<String>,
}

impl Writer {
    fn start(socket: PathBuf, export: &str, seed: u64, window: (u64, u64)) -> Writer {
        let shared = Arc::new((Mutex::new(WriterState { window, ..Default::default() }), Condvar::new()));
        let (s2, export) = (shared.clone(), export.to_owned());
        let thread = std::thread::spawn(move || {
            if let Err(e) = Self::body(&s2, &socket, &export, seed) {
                let (m, cv) = &*s2;
                m.lock().unwrap().error = Some(format!("{e:#}"));
                cv.notify_all();
            }
        });
        Writer { shared, thread: Some(thread) }
    }

    fn body(shared: &(Mutex<WriterState>, Condvar), socket: &Path, export: &str, seed: u64) -> Result<()> {
        let mut conn = NbdConn::connect(socket, export)?;
        let mut rng = Rng::new(seed);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let (start, len) = {
                let (m, cv) = shared;
                let mut st = m.lock().unwrap();
                while st.pause && !st.stop {
                    st.paused = true;
                    cv.notify_all();
                    st = cv.wait(st).unwrap();
                }
                st.paused = false;
                if st.stop {
                    return Ok(());
                }
                st.window
            };
            let n = 4096 * (1 + rng.below(16));
            let offset = start + 4096 * rng.below((len - n) / 4096 + 1);
            rng.fill(&mut buf[..n as usize]);
            conn.write_ok(offset, &buf[..n as usize])?;
            shared.0.lock().unwrap().writes += 1;
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Returns once no write is in flight and none will start until `resume`.
    fn pause(&self) {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap();
        st.pause = true;
        cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !st.paused {
            assert!(st.error.is_none(), "writer failed: {}", st.error.as_deref().unwrap_or_default());
            assert!(Instant::now() < deadline, "writer did not pause");
            st = cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
        }
    }

    fn resume(&self, window: (u64, u64)) {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap();
        assert!(st.error.is_none(), "writer failed: {}", st.error.as_deref().unwrap_or_default());
        st.window = window;
        st.pause = false;
        cv.notify_all();
    }

    fn writes(&self) -> u64 {
        self.shared.0.lock().unwrap().writes
    }

    fn stop(mut self) -> u64 {
        {
            let (m, cv) = &*self.shared;
            m.lock().unwrap().stop = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread panicked");
        }
        let st = self.shared.0.lock().unwrap();
        assert!(st.error.is_none(), "writer failed: {}", st.error.as_deref().unwrap_or_default());
        st.writes
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        if let Ok(mut st) = m.lock() {
            st.stop = true;
        }
        cv.notify_all();
    }
}

// --------------------------------------------------------------------- Ceph

/// Where a test's backups go.
enum Target<'a> {
    Rbd(&'a TestCeph, String),
    File(PathBuf),
}

impl Target<'_> {
    fn uri(&self) -> String {
        match self {
            Target::Rbd(_, image) => format!("rbd:{image}"),
            Target::File(path) => format!("file:{}", path.display()),
        }
    }

    /// Backup snapshots present (RBD: oldest first; file: by name).
    fn snaps(&self) -> Vec<String> {
        match self {
            Target::Rbd(rbd, image) => rbd.snaps(image),
            Target::File(path) => {
                let dir = PathBuf::from(format!("{}.snapshots", path.display()));
                let mut names: Vec<String> = std::fs::read_dir(&dir)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .filter_map(|e| {
                                e.file_name().to_str().and_then(|n| n.strip_suffix(".raw")).map(String::from)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                names
            }
        }
    }

    /// A file holding snapshot `snap` (exported to `scratch` for RBD).
    fn snapshot_file(&self, snap: &str, scratch: &Path) -> PathBuf {
        match self {
            Target::Rbd(rbd, image) => {
                rbd.export(&format!("{image}@{snap}"), scratch);
                scratch.to_owned()
            }
            Target::File(path) => PathBuf::from(format!("{}.snapshots/{snap}.raw", path.display())),
        }
    }
}

// ===================================================================== tests

/// A full and then incremental backups while a client keeps writing: each
/// snapshot equals the disk as it was when that backup's command returned.
fn chain_under_writes(target: &Target, agent: &Agent, seed: u64) {
    let disk = "vm1/disk0";
    let dir = agent.dir().to_owned();
    let mut rng = Rng::from_env(seed);
    // Some data everywhere, then a writer that keeps going.
    let ranges: Vec<(u64, u64)> = (0..32).filter(|_| rng.below(2) == 0).map(|i| (i * MIB, MIB)).collect();
    write_random(agent, disk, &mut rng, &ranges);
    let window = |round: u64| ((16 + 2 * round) * MIB, 4 * MIB);
    let writer = Writer::start(agent.socket(), disk, rng.next_u64(), window(0));
    writer.pause();
    let mut generation = None;
    let mut scratch_total = 0;
    let mut snaps = Vec::new();
    for round in 0..4u64 {
        let reference = dir.join(format!("ref{round}.raw"));
        let dirty = u(&bitmap(agent, disk, "backup")["dirty_bytes"]);
        capture(agent, disk, &reference);
        let sync = if round == 0 { "full" } else { "incremental" };
        // Round 0 and 2 are throttled so that the writer hits granules not yet copied.
        let speed = match round {
            0 => Some("16MiB"),
            2 => Some("2MiB"),
            _ => None,
        };
        let mut args = vec!["backup", disk, "--sync", sync];
        if let Some(s) = speed {
            args.extend(["--speed", s]);
        }
        let started = agent.json(&args);
        let before = writer.writes();
        writer.resume(window(round + 1));
        let t0 = Instant::now();
        let job = agent.concluded(&id(&started), Duration::from_secs(60));
        assert_success(agent, &job);
        let s = &job["summary"];
        eprintln!(
            "round {round}: {sync} in {:?}, dirty {dirty}, written {}, scratch {}, {} writes during the job",
            t0.elapsed(),
            s["bytes_written"],
            s["scratch_bytes"],
            writer.writes() - before
        );
        assert_eq!(s["sync"], sync, "{job:#}");
        let written = u(&s["bytes_written"]);
        assert!(written > 0, "round {round}: nothing written: {job:#}");
        if round > 0 {
            assert_eq!(s["note"], Value::Null, "{job:#}");
            // Only what was dirty when the backup froze the disk: the writer's
            // previous window, never most of the disk.
            assert!(dirty > 0 && dirty <= 4 * MIB + GRANULE, "round {round}: dirty {dirty} at the freeze");
            assert!(written <= dirty, "round {round}: wrote {written} bytes but only {dirty} were dirty: {job:#}");
            assert_eq!(u(&job["bytes_total"]), dirty, "round {round}: bytes_total is not the dirty bytes");
        }
        let g = u(&s["bitmap_generation"]);
        if let Some(prev) = generation {
            assert_eq!(g, prev + 1, "round {round}: bitmap generation must go up by one: {job:#}");
        }
        generation = Some(g);
        assert_eq!(u(&bitmap(agent, disk, "backup")["generation"]), g, "bitmap list disagrees with the job");
        scratch_total += u(&s["scratch_bytes"]);
        let snap = snapshot_of(&job);
        if let Target::Rbd(rbd, image) = target {
            // What the target records about the snapshot: its place in the chain.
            let meta = rbd.meta(image);
            let key = format!("rbdsync.snap.{snap}");
            let m: Value =
                serde_json::from_str(meta.get(&key).unwrap_or_else(|| panic!("no {key}: {meta:?}"))).unwrap();
            assert_eq!(m["disk"], disk, "{m}");
            assert_eq!(m["sync"], sync, "{m}");
            assert_eq!(m["generation"], g, "{m}");
            assert_eq!(m["previous"].as_str(), snaps.last().map(String::as_str), "{m}");
            assert_eq!(meta.get("rbdsync.disk").map(String::as_str), Some(disk));
        }
        let file = target.snapshot_file(&snap, &dir.join("snap.raw"));
        assert_same_content(&format!("round {round} ({sync}) snapshot {snap}"), &reference, &file);
        snaps.push(snap);
        let mut present = target.snaps();
        present.sort();
        let mut expected = snaps.clone();
        expected.sort();
        assert_eq!(present, expected, "round {round}: snapshots on {}", target.uri());
        writer.pause();
    }
    assert!(scratch_total > 0, "the writer never hit a granule a backup still needed (copy-before-write untested)");
    // The disk moved on since the last backup: verify against it must say so ...
    let last = format!("{}@{}", target.uri(), snaps.last().unwrap());
    let (job, err) = agent.refused(&["verify", disk, "--against", &last, "--wait"]);
    let job = job.expect("verify prints its job");
    assert_eq!(job["result"], "failed", "{job:#}");
    assert!(job["error"].as_str().unwrap().contains("differ"), "{job:#}\n{err}");
    // ... and one more incremental with the writer paused verifies equal.
    let job = backup_ok(agent, &["backup", disk, "--sync", "incremental"]);
    assert_eq!(u(&job["summary"]["bitmap_generation"]), generation.unwrap() + 1);
    let against = format!("{}@{}", target.uri(), snapshot_of(&job));
    let v = agent.json(&["verify", disk, "--against", &against, "--wait"]);
    assert_eq!(v["result"], "success", "{v:#}");
    assert_eq!(v["summary"]["equal"], true, "{v:#}");
    let writes = writer.stop();
    eprintln!("writer: {writes} writes");
}

#[test]
fn full_and_incremental_backups_to_rbd_under_writes_match_the_disk() {
    let _ceph = ceph_shared();
    let rbd = TestCeph::new("bk");
    let image = rbd.image("chain");
    let b = AgentBuilder::new().extra(&rbd.agent_yaml());
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "32MiB", Some(&format!("rbd:{image}")), None)]);
    let mut agent = b.vm("vm1", &yaml).start().unwrap();
    let target = Target::Rbd(&rbd, image.clone());
    chain_under_writes(&target, &agent, 0xb0c4_0001);
    agent.stop().unwrap();
}

#[test]
fn full_and_incremental_backups_to_file_under_writes_match_the_disk() {
    let b = AgentBuilder::new();
    let path = b.dir().join("backups/vm1-disk0.raw");
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "32MiB", Some(&format!("file:{}", path.display())), None)]);
    let mut agent = b.vm("vm1", &yaml).start().unwrap();
    chain_under_writes(&Target::File(path), &agent, 0xb0c4_0002);
    agent.stop().unwrap();
}

/// A tmpfs mounted for one test; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        run("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.path().to_str().unwrap()])
            .expect("mount a tmpfs (the backup tests run as root)");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        run("mount", &["-o", &format!("remount,size={size}"), self.path().to_str().unwrap()]).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.path().to_str().unwrap()]);
    }
}

/// Two agents back up their own `vm1/disk0` to one target in turn (the
/// destination of a migration going on with the source's target, or the
/// same VM on a new host): jobs are numbered per agent and a pair often
/// falls in the same second, so snapshot names must not be built from the
/// time and the job number alone. Every backup succeeds, every snapshot
/// has its own name and keeps its own record.
#[test]
fn two_agents_backing_up_to_one_target_in_the_same_second_never_collide() {
    let store = tempfile::tempdir().unwrap();
    let uri = format!("file:{}", store.path().join("vm1-disk0.raw").display());
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "4MiB", Some(&uri), None)]);
    let a = AgentBuilder::new().vm("vm1", &yaml).start().unwrap();
    let b = AgentBuilder::new().vm("vm1", &yaml).start().unwrap();
    let mut names = std::collections::BTreeSet::new();
    for round in 0..5 {
        for agent in [&a, &b] {
            let done = agent.json(&["backup", "vm1/disk0", "--sync", "full", "--wait"]);
            assert_eq!(done["result"], "success", "round {round}: {done:#}\n{}", agent.log_tail());
            assert!(names.insert(snapshot_of(&done)), "round {round}: snapshot name reused: {done:#}");
        }
    }
    // Every snapshot keeps its own record (`rbdsync.snap.NAME` in the target's metadata).
    let sidecar = std::fs::read_to_string(store.path().join("vm1-disk0.raw.rbdsync")).unwrap();
    let sidecar: Value = serde_json::from_str(&sidecar).unwrap();
    let records: std::collections::BTreeSet<String> = sidecar["metadata"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|k| k.strip_prefix("rbdsync.snap.").map(str::to_owned))
        .collect();
    assert_eq!(records, names, "snapshot records vs the backups' snapshots");
}

#[test]
fn full_backup_to_a_full_filesystem_fails_cleanly_and_succeeds_once_there_is_room() {
    let tmpfs = Tmpfs::mount("4M");
    let target = tmpfs.path().join("vm1-disk0.raw");
    let uri = format!("file:{}", target.display());
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", Some(&uri), None)]);
    let mut agent = AgentBuilder::new().vm("vm1", &yaml).start().unwrap();
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_0003);
    write_random(&agent, disk, &mut rng, &[(0, 12 * MIB)]);
    let before = bitmap(&agent, disk, "backup");
    let (job, err) = agent.refused(&["backup", disk, "--sync", "full", "--wait"]);
    let job = job.expect("backup --wait prints its job");
    assert_eq!(job["result"], "failed", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "the error must say the target is full: {error}\n{err}");
    let after = bitmap(&agent, disk, "backup");
    assert_eq!(after["busy"], false, "{after}");
    assert_eq!(after["consistent"], true, "{after}");
    assert_eq!(after["dirty_bytes"], before["dirty_bytes"], "a failed backup must not drop bits: {after}");
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_eq!(Target::File(target.clone()).snaps(), Vec::<String>::new(), "a failed backup left a snapshot");

    tmpfs.resize("64M");
    let reference = agent.dir().join("ref.raw");
    capture(&agent, disk, &reference);
    let job = backup_ok(&agent, &["backup", disk]);
    assert_eq!(job["summary"]["sync"], "full", "{job:#}");
    assert!(job["summary"]["note"].as_str().is_some_and(|n| n.contains("no backup")), "{job:#}");
    assert_eq!(u(&job["summary"]["bitmap_generation"]), u(&before["generation"]) + 1);
    let snap = snapshot_of(&job);
    let file = Target::File(target.clone()).snapshot_file(&snap, Path::new("/nonexistent"));
    assert_same_content("snapshot after the retry", &reference, &file);
    let v = agent.json(&["verify", disk, "--against", &format!("{uri}@{snap}"), "--wait"]);
    assert_eq!(v["result"], "success", "{v:#}");
    assert_eq!(bitmap(&agent, disk, "backup")["dirty_bytes"], 0);
    agent.stop().unwrap();
}

/// Skipped by default (run it with `--ignored`): the agent bounds each
/// librados op by CEPH_TIMEOUT (30 s, agent/src/store/rbd/mod.rs), but librbd
/// chains ops (a write waits for the exclusive lock, then an object-map update,
/// whose failure triggers an object-map invalidation, each with its own 30 s),
/// so the job fails 30, 60 or 120 s after the OSD stops (all three observed).
/// Also, a PG of the single-OSD test cluster often stays `laggy` after such a
/// SIGSTOP (a Ceph bug; ops wait "for readable" until the PG re-peers), which
/// the guard repairs by marking the OSD down, a cluster-wide disturbance.
#[test]
#[ignore = "slow (30-120 s while holding the test cluster) and wedges single-OSD clusters; run with --ignored"]
fn incremental_backup_fails_when_the_osd_hangs_and_the_next_one_succeeds() {
    let _ceph = ceph_exclusive();
    let rbd = TestCeph::new("bk");
    let image = rbd.image("osd");
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", Some(&format!("rbd:{image}")), None)]);
    let mut agent = AgentBuilder::new().extra(&rbd.agent_yaml()).vm("vm1", &yaml).start().unwrap();
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_0004);
    write_random(&agent, disk, &mut rng, &[(0, 16 * MIB)]);
    backup_ok(&agent, &["backup", disk, "--sync", "full"]);
    write_random(&agent, disk, &mut rng, &[(MIB, 3 * MIB), (8 * MIB, 6 * MIB)]);
    let before = bitmap(&agent, disk, "backup");
    let snaps = rbd.snaps(&image);

    let started = agent.json(&["backup", disk, "--sync", "incremental", "--speed", "4MiB"]);
    let osd = StoppedOsd::stop(&rbd);
    let t0 = Instant::now();
    let job = agent.concluded(&id(&started), Duration::from_secs(200));
    let took = t0.elapsed();
    eprintln!("job concluded {took:?} after the OSD stopped: {}", job["error"]);
    assert_eq!(job["result"], "failed", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("timed out"), "the error must name the timeout: {error}");
    let after = bitmap(&agent, disk, "backup");
    assert_eq!(after["busy"], false, "{after}");
    assert_eq!(after["dirty_bytes"], before["dirty_bytes"], "{after}");
    assert_eq!(after["generation"], before["generation"], "{after}");
    drop(osd);

    assert_eq!(rbd.snaps(&image), snaps, "a failed backup left a snapshot");
    let reference = agent.dir().join("ref.raw");
    capture(&agent, disk, &reference);
    let job = backup_ok(&agent, &["backup", disk, "--sync", "incremental"]);
    assert_eq!(u(&job["summary"]["bitmap_generation"]), u(&before["generation"]) + 1);
    let exported = agent.dir().join("snap.raw");
    rbd.export(&format!("{image}@{}", snapshot_of(&job)), &exported);
    assert_same_content("incremental after the OSD came back", &reference, &exported);
    agent.stop().unwrap();
}

#[test]
fn agent_killed_mid_backup_reports_the_job_interrupted_and_the_next_incremental_is_exact() {
    let (mut agent, target, uri) = file_target_agent("32MiB");
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_0005);
    write_random(&agent, disk, &mut rng, &[(0, 32 * MIB)]);
    backup_ok(&agent, &["backup", disk, "--sync", "full"]);
    write_random(&agent, disk, &mut rng, &[(0, 24 * MIB)]);
    let before = bitmap(&agent, disk, "backup");

    let started = agent.json(&["backup", disk, "--sync", "incremental", "--speed", "8MiB"]);
    let job_id = id(&started);
    // Rewrite the end of the dirty region, which the job has not copied yet.
    write_random(&agent, disk, &mut rng, &[(20 * MIB, 4 * MIB)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = agent.json(&["job", "show", &job_id]);
        assert_ne!(j["state"], "concluded", "the job ended before it could be killed: {j:#}");
        if u(&j["bytes_done"]) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {j:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill9().unwrap();
    let agent = agent.respawn().unwrap();

    let jobs = agent.json(&["jobs", "--all"]);
    let job = jobs.as_array().unwrap().iter().find(|j| j["id"] == job_id.as_str()).expect("the job survives restarts");
    assert_eq!(job["state"], "concluded", "{job:#}");
    assert_eq!(job["result"], "failed", "{job:#}");
    assert!(job["error"].as_str().unwrap_or_default().contains("Interrupted"), "{job:#}");
    let after = bitmap(&agent, disk, "backup");
    assert_eq!(after["consistent"], true, "{after}");
    assert_eq!(after["busy"], false, "{after}");
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert!(u(&after["dirty_bytes"]) >= u(&before["dirty_bytes"]), "bits lost: {before} -> {after}");

    let reference = agent.dir().join("ref.raw");
    capture(&agent, disk, &reference);
    let job = backup_ok(&agent, &["backup", disk, "--sync", "incremental"]);
    assert_eq!(job["summary"]["sync"], "incremental", "{job:#}");
    let snap = snapshot_of(&job);
    let file = Target::File(target).snapshot_file(&snap, Path::new("/nonexistent"));
    assert_same_content("incremental after the kill", &reference, &file);
    let v = agent.json(&["verify", disk, "--against", &format!("{uri}@{snap}"), "--wait"]);
    assert_eq!(v["result"], "success", "{v:#}");
    // The killed job's copy-before-write scratch file must not live forever.
    let stale = agent.dir().join(format!("state/scratch/{job_id}.pit"));
    assert!(!stale.exists(), "scratch file of the killed job left behind: {}", stale.display());
}

/// After kill -9 the write-intent log brings back whole 64 MiB regions as
/// dirty (a superset of the acknowledged writes). The granules it added are
/// suspect: the next incremental compares them with its target and writes
/// only those that differ, so it costs what the crash risked, not whole
/// regions. The suspect set survives a clean restart, and the snapshot is
/// exact.
#[test]
fn after_sigkill_the_next_incremental_writes_what_changed_not_whole_regions() {
    let (mut agent, target, _) = file_target_agent("256MiB");
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_0011);
    // 8 MiB of data in each of the four 64 MiB regions.
    let data: Vec<(u64, u64)> = (0..4).map(|r| (r * 64 * MIB, 8 * MIB)).collect();
    write_random(&agent, disk, &mut rng, &data);
    backup_ok(&agent, &["backup", disk, "--sync", "full"]);
    // Five granule-sized writes: four over data, one over a hole; then the crash.
    let writes: Vec<(u64, u64)> =
        [MIB, 65 * MIB, 130 * MIB + GRANULE, 195 * MIB, 250 * MIB].iter().map(|&o| (o, GRANULE)).collect();
    write_random(&agent, disk, &mut rng, &writes);
    agent.kill9().unwrap();
    let agent = agent.respawn().unwrap();
    let recovered = bitmap(&agent, disk, "backup");
    assert!(u(&recovered["dirty_bytes"]) >= 64 * MIB, "the crash did not bring a region back: {recovered}");
    assert!(
        u(&recovered["suspect_bytes"]) >= u(&recovered["dirty_bytes"]) - writes.len() as u64 * GRANULE,
        "{recovered}"
    );
    // A clean restart keeps the suspect set.
    let agent = agent.restart().unwrap();
    let restarted = bitmap(&agent, disk, "backup");
    assert_eq!(
        (&restarted["dirty_bytes"], &restarted["suspect_bytes"]),
        (&recovered["dirty_bytes"], &recovered["suspect_bytes"]),
        "{restarted}"
    );

    let reference = agent.dir().join("ref.raw");
    capture(&agent, disk, &reference);
    let job = backup_ok(&agent, &["backup", disk, "--sync", "incremental"]);
    let summary = &job["summary"];
    assert_eq!(summary["sync"], "incremental", "{job:#}");
    let written = u(&summary["bytes_written"]);
    assert!(
        written <= writes.len() as u64 * GRANULE,
        "the first incremental after the crash wrote {written} bytes for {} bytes of writes: {summary:#}",
        writes.len() as u64 * GRANULE
    );
    assert!(u(&summary["suspect_unchanged_bytes"]) > 0, "{summary:#}");
    let snap = snapshot_of(&job);
    let file = Target::File(target).snapshot_file(&snap, Path::new("/nonexistent"));
    assert_same_content("incremental after the crash", &reference, &file);
    let after = bitmap(&agent, disk, "backup");
    assert_eq!((u(&after["dirty_bytes"]), u(&after["suspect_bytes"])), (0, 0), "{after}");
    eprintln!(
        "after SIGKILL: {} dirty ({} suspect) for {} bytes written; the incremental wrote {written}",
        recovered["dirty_bytes"],
        recovered["suspect_bytes"],
        writes.len() as u64 * GRANULE
    );
}

/// Verify reads what is there: a 1 GiB disk holding 384 KiB of data is
/// verified against its backup without reading the holes, and every kind
/// of difference is still found (data changed, data over a hole, a hole
/// over data), each named by its 64 KiB unit.
#[test]
fn verify_of_a_sparse_disk_reads_only_its_data_and_still_finds_every_difference() {
    let (agent, _, uri) = file_target_agent("1GiB");
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_0012);
    let data = [(0, 128 << 10), (300 * MIB, 128 << 10), (1023 * MIB, 128 << 10)];
    write_random(&agent, disk, &mut rng, &data);
    let against = format!("{uri}@{}", snapshot_of(&backup_ok(&agent, &["backup", disk, "--sync", "full"])));
    let v = agent.json(&["verify", disk, "--against", &against, "--wait"]);
    assert_eq!(v["result"], "success", "{v:#}");
    let read = u(&v["summary"]["bytes_read"]);
    assert!(read <= 8 * MIB, "verify read {read} bytes of two images holding 384 KiB each: {v:#}");

    // Data changed; data over a hole; a hole (punched) over data.
    write_random(&agent, disk, &mut rng, &[(300 * MIB + GRANULE, GRANULE), (700 * MIB, GRANULE)]);
    tests::qemu_io(&agent.unix_uri(disk), &["write -z -u 1023M 64k"]).unwrap();
    let (job, err) = agent.refused(&["verify", disk, "--against", &against, "--wait"]);
    let job = job.expect("verify prints its job");
    assert_eq!(job["result"], "failed", "{job:#}\n{err}");
    assert_eq!(
        (u(&job["detail"]["differing_extents"]), u(&job["detail"]["differing_bytes"])),
        (3, 3 * GRANULE),
        "{job:#}"
    );
    let error = job["error"].as_str().unwrap_or_default();
    for extent in
        [format!("{}+65536", 300 * MIB + GRANULE), format!("{}+65536", 700 * MIB), format!("{}+65536", 1023 * MIB)]
    {
        assert!(error.contains(&extent), "{extent} not reported: {error}");
    }
    eprintln!("verify of a 1 GiB disk holding 384 KiB: read {read} bytes");
}

/// A VM's freeze and thaw commands run around every backup's point in
/// time: what the freeze writes (a guest flushing as it freezes) is in the
/// snapshot, what the thaw writes is not, thaw follows freeze, and thaw runs
/// also when the freeze fails or hangs (killed at hook_timeout_secs), which
/// leaves a crash-consistent backup that says so.
#[test]
fn freeze_and_thaw_run_around_the_point_in_time_and_thaw_always_runs() {
    let b = AgentBuilder::new();
    let dir = b.dir().to_owned();
    let log = dir.join("hooks.log");
    let uri = |vm: &str| format!("nbd+unix:///{vm}/disk0?socket={}", dir.join("nbd.sock").display());
    let write = |vm: &str, pattern: &str, offset: &str| {
        format!("qemu-io -f raw -c 'write -P {pattern} {offset} 64k' '{}' >/dev/null", uri(vm))
    };
    let vm = |name: &str, freeze: &str, thaw: &str, timeout: u64| {
        let target = format!("file:{}", dir.join(format!("backups/{name}.raw")).display());
        let disk = disk_yaml(name, "disk0", "8MiB", Some(&target), None);
        format!(
            "name: {name}\nbackup:\n  freeze: \"{freeze}\"\n  thaw: \"{thaw}\"\n  hook_timeout_secs: {timeout}\ndisks:\n{disk}"
        )
    };
    let note = |what: &str| format!("echo $RBDSYNC_VM-$RBDSYNC_HOOK-{what} >> {}", log.display());
    let good = vm(
        "good",
        &format!("{}; {}", note("begin"), write("good", "0x55", "0")),
        &format!("{}; {}", write("good", "0xaa", "64k"), note("end")),
        30,
    );
    let failing = vm("failing", &format!("{}; exit 3", note("begin")), &note("end"), 30);
    let hanging = vm("hanging", &format!("{}; sleep 60", note("begin")), &note("end"), 1);
    let thaw_fails = vm("thawfails", &note("begin"), &format!("{}; echo VSS timed out >&2; exit 4", note("end")), 30);
    let agent = b
        .vm("good", &good)
        .vm("failing", &failing)
        .vm("hanging", &hanging)
        .vm("thawfails", &thaw_fails)
        .start()
        .unwrap();

    let job = backup_ok(&agent, &["backup", "good/disk0", "--sync", "full"]);
    assert_eq!(job["summary"]["application_consistent"], true, "{job:#}");
    let snap = Target::File(dir.join("backups/good.raw")).snapshot_file(&snapshot_of(&job), Path::new("/nonexistent"));
    let data = std::fs::read(&snap).unwrap();
    assert!(data[..65536].iter().all(|&x| x == 0x55), "the freeze command's write is not in the backup");
    assert!(data[65536..131072].iter().all(|&x| x == 0), "the thaw command's write is in the backup");
    let disk = std::fs::read(dir.join("images/good-disk0.raw")).unwrap();
    assert!(disk[65536..131072].iter().all(|&x| x == 0xaa), "the thaw command did not run");

    let started = Instant::now();
    for (name, expected) in [("failing", "failed"), ("hanging", "killed"), ("thawfails", "VSS timed out")] {
        let job = backup_ok(&agent, &["backup", &format!("{name}/disk0"), "--sync", "full"]);
        assert_eq!(job["summary"]["application_consistent"], false, "{job:#}");
        let why = job["summary"]["freeze"].as_str().unwrap_or_default();
        assert!(why.contains(expected), "{name}: {job:#}");
    }
    assert!(started.elapsed() < Duration::from_secs(30), "the hanging freeze was not cut off at its timeout");
    let order = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        order.lines().collect::<Vec<_>>(),
        [
            "good-freeze-begin",
            "good-thaw-end",
            "failing-freeze-begin",
            "failing-thaw-end",
            "hanging-freeze-begin",
            "hanging-thaw-end",
            "thawfails-freeze-begin",
            "thawfails-thaw-end"
        ],
        "{order}"
    );
}

/// `rbdsync backups DISK` lists the restore points: every backup snapshot
/// of the disk's target, oldest first, with what each backup wrote and
/// which one the next incremental builds on (none after a bitmap clear).
#[test]
fn backups_lists_the_restore_points_and_the_base_of_the_next_incremental() {
    let (agent, _, uri) = file_target_agent("16MiB");
    let disk = "vm1/disk0";
    // Before the first backup the target does not exist: no restore points, the next backup is full.
    let none = agent.json(&["backups", disk]);
    assert_eq!(
        (&none["restore_points"], &none["incremental_possible"]),
        (&Value::Array(vec![]), &Value::Bool(false)),
        "{none:#}"
    );
    let mut rng = Rng::from_env(0xb0c4_0013);
    let mut jobs = Vec::new();
    for (sync, range) in [("full", (0, 16 * MIB)), ("incremental", (MIB, 2 * MIB)), ("incremental", (8 * MIB, GRANULE))]
    {
        write_random(&agent, disk, &mut rng, &[range]);
        jobs.push(backup_ok(&agent, &["backup", disk, "--sync", sync]));
    }
    let list = agent.json(&["backups", disk]);
    assert_eq!(list["incremental_possible"], true, "{list:#}");
    let points = list["restore_points"].as_array().expect("restore points");
    assert_eq!(points.len(), 3, "{list:#}");
    for (i, (p, job)) in points.iter().zip(&jobs).enumerate() {
        assert_eq!(p["snapshot"], job["summary"]["snapshot"], "{list:#}");
        assert_eq!(p["position"], i + 1);
        assert_eq!(p["sync"], job["summary"]["sync"]);
        assert_eq!(p["bytes_written"], job["summary"]["bytes_written"]);
        assert_eq!(p["bitmap_generation"], job["summary"]["bitmap_generation"]);
        assert_eq!(p["uri"], format!("{uri}@{}", snapshot_of(job)));
        assert_eq!(p["base_of_next_incremental"], i == 2, "{list:#}");
        assert_eq!(p["previous"], if i == 0 { Value::Null } else { points[i - 1]["snapshot"].clone() });
    }
    assert_eq!(u(&points[2]["bytes_written"]), GRANULE);
    let out = agent.cli().args(["backups", disk]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains(&snapshot_of(&jobs[2])) && table.contains("yes"), "{table}");
    // A restore point is a verifiable URI.
    let v = agent.json(&["verify", disk, "--against", points[2]["uri"].as_str().unwrap(), "--wait"]);
    assert_eq!(v["result"], "success", "{v:#}");
    // After a clear, no restore point is the base of an incremental, and the table says why.
    agent.json(&["bitmap", "clear", disk, "backup"]);
    let list = agent.json(&["backups", disk]);
    assert_eq!(list["incremental_possible"], false, "{list:#}");
    assert!(list["restore_points"].as_array().unwrap().iter().all(|p| p["base_of_next_incremental"] == false));
    let table = String::from_utf8_lossy(&agent.cli().args(["backups", disk]).output().unwrap().stdout).into_owned();
    assert!(table.contains("next backup: full"), "{table}");
}

/// `rbdsync events` sees a backup job from its creation to its outcome,
/// with its progress, as it happens.
#[test]
fn events_follow_a_backup_from_creation_to_its_outcome() {
    let (agent, _, _) = file_target_agent("32MiB");
    let disk = "vm1/disk0";
    write_random(&agent, disk, &mut Rng::from_env(0xb0c4_0014), &[(0, 32 * MIB)]);
    let log = tests::EventLog::follow(&agent).unwrap();
    let job = backup_ok(&agent, &["backup", disk, "--sync", "full", "--speed", "16MiB"]);
    let id = job["id"].as_str().unwrap().to_owned();
    let events =
        log.wait_for(Duration::from_secs(20), |e| e["id"] == id.as_str() && e["state"] == "concluded").unwrap();
    log.stop();
    let mine: Vec<&Value> = events.iter().filter(|e| e["id"] == id.as_str()).collect();
    let states: Vec<&str> = mine.iter().filter(|e| e["type"] == "job").filter_map(|e| e["state"].as_str()).collect();
    assert_eq!(states, ["created", "running", "concluded"], "{mine:#?}");
    let last = mine.iter().rev().find(|e| e["type"] == "job").unwrap();
    assert_eq!(
        (&last["result"], &last["kind"], &last["disk"]),
        (&Value::from("success"), &Value::from("backup"), &Value::from(disk))
    );
    // At 16 MiB/s the 32 MiB take 2 s: progress arrives while it runs, at most about once a second.
    let progress: Vec<u64> = mine.iter().filter(|e| e["type"] == "job_progress").map(|e| u(&e["bytes_done"])).collect();
    assert!((1..=4).contains(&progress.len()) && progress.windows(2).all(|w| w[0] <= w[1]), "{mine:#?}");
}

#[test]
fn backup_requests_that_cannot_work_are_refused_with_a_reason() {
    let b = AgentBuilder::new();
    let tdir = b.dir().join("backups");
    let t = |n: &str| format!("file:{}/{n}.raw", tdir.display());
    let nobitmap = "  - name: plain\n    image: file:../images/vm1-plain.raw\n    size: 16MiB\n".to_owned();
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", Some(&t("disk0")), None), nobitmap]);
    let agent = b.vm("vm1", &yaml).start().unwrap();
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_0006);
    write_random(&agent, disk, &mut rng, &[(0, 16 * MIB)]);
    write_random(&agent, "vm1/plain", &mut rng, &[(0, MIB)]);

    // Incremental without any bitmap.
    let (_, err) = agent.refused(&["backup", "vm1/plain", "--sync", "incremental", "--target", &t("plain")]);
    assert!(err.contains("needs a bitmap"), "{err}");
    // A bitmap that does not exist.
    let (_, err) = agent.refused(&["backup", disk, "--bitmap", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    assert!(err.to_lowercase().contains("no bitmap") || err.contains("not found"), "{err}");
    // A disk that does not exist.
    let (_, err) = agent.refused(&["backup", "vm1/nosuch"]);
    assert!(err.contains("vm1/nosuch"), "{err}");
    // No target anywhere.
    let (_, err) = agent.refused(&["backup", "vm1/plain"]);
    assert!(err.contains("No backup target"), "{err}");

    // A second backup while one runs: busy.
    let before = bitmap(&agent, disk, "backup");
    let slow = agent.json(&["backup", disk, "--speed", "1MiB"]);
    let busy = bitmap(&agent, disk, "backup");
    assert_eq!(busy["busy"], true, "{busy}");
    assert_eq!(busy["busy_job"], slow["id"], "{busy}");
    for args in [&["backup", disk][..], &["backup", disk, "--sync", "full", "--target", &t("other")][..]] {
        let (_, err) = agent.refused(args);
        assert!(err.contains("busy"), "{args:?}: {err}");
    }
    agent.json(&["job", "cancel", &id(&slow)]);
    let job = agent.concluded(&id(&slow), Duration::from_secs(20));
    assert_eq!(job["result"], "cancelled", "{job:#}");
    let after = bitmap(&agent, disk, "backup");
    assert_eq!(after["busy"], false, "{after}");
    assert_eq!(after["dirty_bytes"], before["dirty_bytes"], "cancel dropped bits: {after}");
    assert_eq!(after["generation"], before["generation"], "{after}");

    // An inconsistent bitmap: its file corrupted while the agent was stopped.
    let mut agent = agent;
    agent.stop().unwrap();
    let file = agent.dir().join("state/bitmaps/vm1/disk0/backup.bitmap");
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(1000).unwrap();
    let mut agent = agent.respawn().unwrap();
    let b = bitmap(&agent, disk, "backup");
    assert_eq!(b["consistent"], false, "{b}");
    let (_, err) = agent.refused(&["backup", disk]);
    assert!(err.contains("inconsistent"), "{err}");
    let (_, err) = agent.refused(&["backup", disk, "--sync", "full"]);
    assert!(err.contains("inconsistent"), "{err}");
    assert!(Target::File(tdir.join("disk0.raw")).snaps().is_empty(), "a refused backup left a snapshot");
    agent.stop().unwrap();
}

#[test]
fn backup_refuses_rbd_targets_that_do_not_fit_and_leaves_them_alone() {
    let _ceph = ceph_shared();
    let rbd = TestCeph::new("bk");
    let (ta, tb) = (rbd.image("owner-a"), rbd.image("owner-b"));
    let (small, large, foreign) = (rbd.image("small"), rbd.image("large"), rbd.image("foreign"));
    let disks = [
        disk_yaml("vm1", "a", "16MiB", Some(&format!("rbd:{ta}")), None),
        disk_yaml("vm1", "b", "16MiB", Some(&format!("rbd:{tb}")), None),
    ];
    let mut agent = AgentBuilder::new().extra(&rbd.agent_yaml()).vm("vm1", &vm_yaml("vm1", &disks)).start().unwrap();
    let mut rng = Rng::from_env(0xb0c4_0007);
    write_random(&agent, "vm1/a", &mut rng, &[(0, 4 * MIB)]);
    write_random(&agent, "vm1/b", &mut rng, &[(4 * MIB, 4 * MIB)]);
    let dir = agent.dir().to_owned();

    // A target that belongs to another disk.
    let first = backup_ok(&agent, &["backup", "vm1/a"]);
    let (snaps, meta) = (rbd.snaps(&ta), rbd.meta(&ta));
    rbd.export(&ta, &dir.join("ta-before.raw"));
    let b_before = bitmap(&agent, "vm1/b", "backup");
    for sync in ["full", "incremental"] {
        let (job, err) =
            agent.refused(&["backup", "vm1/b", "--sync", sync, "--target", &format!("rbd:{ta}"), "--wait"]);
        let error = job.map(|j| j["error"].as_str().unwrap_or_default().to_owned()).unwrap_or_default();
        assert!(error.contains("belongs to disk vm1/a"), "{sync}: {error}\n{err}");
    }
    assert_eq!(rbd.snaps(&ta), snaps, "the other disk's target got a snapshot");
    assert_eq!(rbd.meta(&ta), meta, "the other disk's target metadata changed");
    rbd.export(&ta, &dir.join("ta-after.raw"));
    assert_same_content("the other disk's target", &dir.join("ta-before.raw"), &dir.join("ta-after.raw"));
    let b_after = bitmap(&agent, "vm1/b", "backup");
    assert_eq!((&b_after["dirty_bytes"], &b_after["generation"]), (&b_before["dirty_bytes"], &b_before["generation"]));
    assert_eq!(b_after["busy"], false);
    // vm1/a's chain is intact: its next incremental still works.
    let next = backup_ok(&agent, &["backup", "vm1/a", "--sync", "incremental"]);
    assert_eq!(next["summary"]["sync"], "incremental");
    assert_ne!(snapshot_of(&next), snapshot_of(&first));

    // Targets of the wrong size, and one holding somebody else's data.
    rbd.create(&small, "8M");
    rbd.create(&large, "32M");
    rbd.create(&foreign, "16M");
    rbd.rbd(&["bench", "--io-type", "write", "--io-size", "64K", "--io-total", "1M", &foreign]).unwrap();
    for (image, expect) in [(&small, "8388608 bytes"), (&large, "33554432 bytes"), (&foreign, "not written by rbdsync")]
    {
        let (job, err) = agent.refused(&["backup", "vm1/b", "--target", &format!("rbd:{image}"), "--wait"]);
        let error = job.map(|j| j["error"].as_str().unwrap_or_default().to_owned()).unwrap_or_default();
        assert!(error.contains(expect) && error.contains("refusing"), "{image}: {error}\n{err}");
        assert!(rbd.snaps(image).is_empty(), "{image} got a snapshot");
        assert!(rbd.meta(image).is_empty(), "{image} got metadata: {:?}", rbd.meta(image));
    }
    assert_eq!(rbd.size(&small), 8 * MIB, "the small target was resized");
    let b_after = bitmap(&agent, "vm1/b", "backup");
    assert_eq!((&b_after["dirty_bytes"], &b_after["busy"]), (&b_before["dirty_bytes"], &Value::Bool(false)));
    agent.stop().unwrap();
}

#[test]
fn incremental_after_the_chain_broke_is_refused_and_auto_falls_back_to_full() {
    let b = AgentBuilder::new();
    let path = b.dir().join("backups/vm1-disk0.raw");
    let uri = format!("file:{}", path.display());
    let mut agent =
        b.vm("vm1", &vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", Some(&uri), None)])).start().unwrap();
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_0008);
    write_random(&agent, disk, &mut rng, &[(0, 8 * MIB)]);
    backup_ok(&agent, &["backup", disk, "--sync", "full"]);
    write_random(&agent, disk, &mut rng, &[(2 * MIB, MIB)]);
    agent.json(&["bitmap", "clear", disk, "backup"]);
    let cleared = bitmap(&agent, disk, "backup");
    let snaps = Target::File(path.clone()).snaps();

    let (job, err) = agent.refused(&["backup", disk, "--sync", "incremental", "--wait"]);
    let error = job.map(|j| j["error"].as_str().unwrap_or_default().to_owned()).unwrap_or_default();
    assert!(error.contains("Cannot back up incrementally") && error.contains("generation"), "{error}\n{err}");
    assert_eq!(Target::File(path.clone()).snaps(), snaps);
    let b = bitmap(&agent, disk, "backup");
    assert_eq!((&b["generation"], &b["busy"]), (&cleared["generation"], &Value::Bool(false)), "{b}");

    let reference = agent.dir().join("ref.raw");
    capture(&agent, disk, &reference);
    let job = backup_ok(&agent, &["backup", disk, "--sync", "incremental", "--auto"]);
    let s = &job["summary"];
    assert_eq!(s["sync"], "full", "{job:#}");
    let note = s["note"].as_str().unwrap_or_default();
    assert!(note.contains("full instead of incremental") && note.contains("generation"), "{job:#}");
    let file = Target::File(path.clone()).snapshot_file(&snapshot_of(&job), Path::new("/nonexistent"));
    assert_same_content("full backup after the chain broke", &reference, &file);
    // The chain is whole again.
    let job = backup_ok(&agent, &["backup", disk, "--sync", "incremental"]);
    assert_eq!(job["summary"]["sync"], "incremental", "{job:#}");
    agent.stop().unwrap();
}

#[test]
fn a_backup_refused_before_the_freeze_fails_the_command_even_without_wait() {
    let b = AgentBuilder::new();
    let small = b.dir().join("small.raw");
    std::fs::File::create(&small).unwrap().set_len(8 * MIB).unwrap();
    let uri = format!("file:{}", small.display());
    let mut agent =
        b.vm("vm1", &vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", Some(&uri), None)])).start().unwrap();
    // `backup` returns once the point in time is fixed; a backup whose target
    // is refused never gets there, so the command must not report success.
    let out = agent.cli().args(["--json", "backup", "vm1/disk0"]).output().unwrap();
    let record: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    assert!(
        !out.status.success(),
        "`rbdsync backup` exited 0 for a backup the agent refused: {}\n(job: {})",
        show(&out),
        record.map(|r| format!("{} {} {}", r["state"], r["result"], r["error"])).unwrap_or_default()
    );
    agent.stop().unwrap();
}

/// Backs up all disks of VM `g` and checks each snapshot against `refs`.
fn group_backup(agent: &Agent, rbd: &TestCeph, images: &[&str; 2], refs: &[PathBuf; 2]) -> Vec<Value> {
    let out = agent.json(&["backup", "g", "--wait"]);
    let jobs = out.as_array().unwrap_or_else(|| panic!("a VM backup returns one job per disk: {out:#}")).clone();
    assert_eq!(jobs.len(), 2, "{out:#}");
    for (i, disk) in ["g/d1", "g/d2"].iter().enumerate() {
        let job = jobs.iter().find(|j| j["disk"] == *disk).unwrap_or_else(|| panic!("no job for {disk}: {out:#}"));
        assert_success(agent, job);
        let exported = agent.dir().join("snap.raw");
        rbd.export(&format!("{}@{}", images[i], snapshot_of(job)), &exported);
        assert_same_content(&format!("{disk} in the group backup"), &refs[i], &exported);
    }
    jobs
}

#[test]
fn vm_backup_commits_all_disks_together_or_none() {
    let _ceph = ceph_shared();
    let rbd = TestCeph::new("bk");
    let (t1, t2) = (rbd.image("group-1"), rbd.image("group-2"));
    let disks = [
        disk_yaml("g", "d1", "16MiB", Some(&format!("rbd:{t1}")), None),
        disk_yaml("g", "d2", "16MiB", Some(&format!("rbd:{t2}")), None),
    ];
    let mut agent = AgentBuilder::new().extra(&rbd.agent_yaml()).vm("g", &vm_yaml("g", &disks)).start().unwrap();
    let mut rng = Rng::from_env(0xb0c4_0009);
    let dir = agent.dir().to_owned();
    let refs = [dir.join("ref1.raw"), dir.join("ref2.raw")];
    write_random(&agent, "g/d1", &mut rng, &[(0, 6 * MIB)]);
    write_random(&agent, "g/d2", &mut rng, &[(8 * MIB, 6 * MIB)]);
    capture(&agent, "g/d1", &refs[0]);
    capture(&agent, "g/d2", &refs[1]);
    let jobs = group_backup(&agent, &rbd, &[&t1, &t2], &refs);
    assert!(jobs.iter().all(|j| j["summary"]["sync"] == "full"), "{jobs:#?}");

    // Disk 2's target becomes unusable: the whole VM backup fails, and disk 1
    // keeps its chain and its bits.
    write_random(&agent, "g/d1", &mut rng, &[(MIB, 2 * MIB)]);
    write_random(&agent, "g/d2", &mut rng, &[(9 * MIB, 2 * MIB)]);
    rbd.remove(&t2);
    rbd.create(&t2, "8M");
    let d1 = bitmap(&agent, "g/d1", "backup");
    let (snaps1, meta1) = (rbd.snaps(&t1), rbd.meta(&t1));
    let (out, err) = agent.refused(&["backup", "g", "--wait"]);
    let out = out.expect("backup --wait prints the jobs");
    let jobs = out.as_array().unwrap_or_else(|| panic!("{out:#}"));
    let by_disk = |d: &str| jobs.iter().find(|j| j["disk"] == d).unwrap_or_else(|| panic!("no job for {d}: {out:#}"));
    assert_eq!(by_disk("g/d2")["result"], "failed", "{out:#}");
    assert!(by_disk("g/d2")["error"].as_str().unwrap_or_default().contains("refusing"), "{out:#}\n{err}");
    assert_eq!(by_disk("g/d1")["result"], "failed", "disk 1 must not commit alone: {out:#}");
    assert!(by_disk("g/d1")["error"].as_str().unwrap_or_default().contains("rolled back"), "{out:#}");
    assert_eq!(rbd.snaps(&t1), snaps1, "disk 1 kept a snapshot of a failed VM backup");
    assert_eq!(rbd.meta(&t1), meta1, "disk 1's target kept metadata of a failed VM backup");
    let after = bitmap(&agent, "g/d1", "backup");
    assert_eq!(after["dirty_bytes"], d1["dirty_bytes"], "disk 1 lost bits: {d1} -> {after}");
    assert_eq!(after["generation"], d1["generation"], "{after}");
    assert_eq!(after["busy"], false, "{after}");

    // With disk 2's target gone, the next VM backup succeeds: disk 1
    // incrementally on its intact chain, disk 2 in full to a new target.
    rbd.remove(&t2);
    capture(&agent, "g/d1", &refs[0]);
    capture(&agent, "g/d2", &refs[1]);
    let jobs = group_backup(&agent, &rbd, &[&t1, &t2], &refs);
    let sync = |d: &str| jobs.iter().find(|j| j["disk"] == d).unwrap()["summary"]["sync"].clone();
    assert_eq!(sync("g/d1"), "incremental", "{jobs:#?}");
    assert_eq!(sync("g/d2"), "full", "{jobs:#?}");
    agent.stop().unwrap();
}

#[test]
fn vm_backup_with_one_disk_busy_leaves_no_job_behind() {
    let b = AgentBuilder::new();
    let base = b.dir().join("backups");
    let t = |n: &str| format!("file:{}/{n}.raw", base.display());
    let disks = [disk_yaml("h", "a", "16MiB", Some(&t("a")), None), disk_yaml("h", "b", "16MiB", Some(&t("b")), None)];
    let mut agent = b.vm("h", &vm_yaml("h", &disks)).start().unwrap();
    let mut rng = Rng::from_env(0xb0c4_000a);
    write_random(&agent, "h/a", &mut rng, &[(0, 4 * MIB)]);
    write_random(&agent, "h/b", &mut rng, &[(0, 16 * MIB)]);
    let jobs = agent.json(&["backup", "h", "--wait"]);
    let snap_b = jobs.as_array().unwrap().iter().find(|j| j["disk"] == "h/b").map(snapshot_of).unwrap();
    write_random(&agent, "h/a", &mut rng, &[(0, MIB)]);
    // A slow verify occupies disk b (it does not use the bitmap).
    let verify = agent.json(&["verify", "h/b", "--against", &format!("{}@{snap_b}", t("b")), "--speed", "1MiB"]);
    let (_, err) = agent.refused(&["backup", "h"]);
    assert!(err.contains("busy"), "{err}");
    // Whatever the agent did with disk a, nothing may stay running there.
    std::thread::sleep(Duration::from_secs(2));
    let running = agent.json(&["jobs"]);
    let stuck: Vec<&Value> = running.as_array().unwrap().iter().filter(|j| j["disk"] == "h/a").collect();
    let a = bitmap(&agent, "h/a", "backup");
    assert!(
        stuck.is_empty() && a["busy"] == false,
        "a refused VM backup left a job on h/a: {stuck:#?}\nbitmap: {a}\nagent log:\n{}",
        agent.log_tail()
    );
    agent.json(&["job", "cancel", &id(&verify)]);
    agent.stop().expect("the agent must stop on SIGTERM");
}

#[test]
fn retention_keeps_the_newest_backups_and_never_the_latest_or_foreign_snapshots() {
    let _ceph = ceph_shared();
    let rbd = TestCeph::new("bk");
    let image = rbd.image("keep");
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", Some(&format!("rbd:{image}")), Some(2))]);
    let mut agent = AgentBuilder::new().extra(&rbd.agent_yaml()).vm("vm1", &yaml).start().unwrap();
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_000b);
    let mut backups: Vec<String> = Vec::new();
    for round in 0..4usize {
        write_random(&agent, disk, &mut rng, &[(round as u64 * 3 * MIB, MIB)]);
        let reference = agent.dir().join("ref.raw");
        capture(&agent, disk, &reference);
        let job = backup_ok(&agent, &["backup", disk]);
        let s = &job["summary"];
        assert_eq!(s["sync"], if round == 0 { "full" } else { "incremental" }, "{job:#}");
        let snap = snapshot_of(&job);
        backups.push(snap.clone());
        let removed: Vec<&str> =
            s["removed_snapshots"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let expect_removed: Vec<&str> = if round >= 2 { vec![backups[round - 2].as_str()] } else { vec![] };
        assert_eq!(removed, expect_removed, "round {round}: removed snapshots: {job:#}");
        if round == 0 {
            // Somebody else's snapshot on the target is none of retention's business.
            rbd.rbd(&["snap", "create", &format!("{image}@operator-keep")]).unwrap();
        }
        let kept = &backups[round.saturating_sub(1)..];
        let mut expected: Vec<String> = kept.to_vec();
        expected.push("operator-keep".into());
        expected.sort();
        let present = rbd.snaps(&image);
        assert!(present.contains(&snap), "round {round}: the latest backup {snap} is gone: {present:?}");
        let mut sorted = present.clone();
        sorted.sort();
        assert_eq!(sorted, expected, "round {round}: snapshots on the target");
        let meta = rbd.meta(&image);
        let mut described: Vec<&str> = meta.keys().filter_map(|k| k.strip_prefix("rbdsync.snap.")).collect();
        described.sort();
        let mut kept_sorted: Vec<&str> = kept.iter().map(String::as_str).collect();
        kept_sorted.sort();
        assert_eq!(described, kept_sorted, "round {round}: snapshot metadata on the target");
        let exported = agent.dir().join("snap.raw");
        rbd.export(&format!("{image}@{snap}"), &exported);
        assert_same_content(&format!("round {round}"), &reference, &exported);
    }
    agent.stop().unwrap();
}

#[test]
fn incremental_backup_never_misses_writes_made_while_the_bitmap_was_disabled() {
    let b = AgentBuilder::new();
    let path = b.dir().join("backups/vm1-disk0.raw");
    let uri = format!("file:{}", path.display());
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", Some(&uri), None)]);
    let mut agent = b.vm("vm1", &yaml).start().unwrap();
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_000c);
    write_random(&agent, disk, &mut rng, &[(0, 4 * MIB)]);
    backup_ok(&agent, &["backup", disk, "--sync", "full"]);
    agent.json(&["bitmap", "disable", disk, "backup"]);
    write_random(&agent, disk, &mut rng, &[(8 * MIB, MIB)]);
    agent.json(&["bitmap", "enable", disk, "backup"]);
    write_random(&agent, disk, &mut rng, &[(MIB, MIB)]);
    let reference = agent.dir().join("ref.raw");
    capture(&agent, disk, &reference);
    // The bitmap missed the write at 8 MiB: an incremental backup may be
    // refused, but if it succeeds its snapshot must still be the disk.
    let exact_or_refused = |what: &str, reference: &Path| {
        let out = agent.cli().args(["--json", "backup", disk, "--sync", "incremental", "--wait"]).output().unwrap();
        if out.status.success() {
            let job: Value = serde_json::from_slice(&out.stdout).unwrap();
            let file = Target::File(path.clone()).snapshot_file(&snapshot_of(&job), Path::new("/nonexistent"));
            assert_same_content(what, reference, &file);
        }
    };
    exact_or_refused("incremental after a disable/enable cycle", &reference);
    // A chain based while the bitmap is disabled: the full backup is exact,
    // but the bitmap records nothing after it.
    agent.json(&["bitmap", "disable", disk, "backup"]);
    backup_ok(&agent, &["backup", disk, "--sync", "full"]);
    write_random(&agent, disk, &mut rng, &[(12 * MIB, MIB)]);
    capture(&agent, disk, &reference);
    exact_or_refused("incremental on a chain based while the bitmap was disabled", &reference);
    agent.json(&["bitmap", "enable", disk, "backup"]);
    exact_or_refused("incremental on a chain based while the bitmap was disabled, re-enabled", &reference);
    agent.stop().unwrap();
}

#[test]
fn agent_stopped_mid_backup_concludes_the_job_and_keeps_the_bits() {
    let (mut agent, target, _) = file_target_agent("32MiB");
    let disk = "vm1/disk0";
    let mut rng = Rng::from_env(0xb0c4_000d);
    write_random(&agent, disk, &mut rng, &[(0, 32 * MIB)]);
    backup_ok(&agent, &["backup", disk, "--sync", "full"]);
    write_random(&agent, disk, &mut rng, &[(0, 24 * MIB)]);
    let before = bitmap(&agent, disk, "backup");
    let started = agent.json(&["backup", disk, "--sync", "incremental", "--speed", "4MiB"]);
    std::thread::sleep(Duration::from_millis(500));
    let status = agent.stop().expect("SIGTERM stops the agent while a backup runs");
    assert!(status.success(), "{status}");
    let agent = agent.respawn().unwrap();
    let job = agent.json(&["job", "show", &id(&started)]);
    assert_eq!(job["state"], "concluded", "{job:#}");
    assert_ne!(job["result"], "success", "{job:#}");
    let after = bitmap(&agent, disk, "backup");
    assert_eq!(after["consistent"], true, "{after}");
    assert_eq!(after["busy"], false, "{after}");
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_eq!(after["dirty_bytes"], before["dirty_bytes"], "bits lost at shutdown: {after}");
    let reference = agent.dir().join("ref.raw");
    capture(&agent, disk, &reference);
    let job = backup_ok(&agent, &["backup", disk, "--sync", "incremental"]);
    let file = Target::File(target).snapshot_file(&snapshot_of(&job), Path::new("/nonexistent"));
    assert_same_content("incremental after a stop mid-backup", &reference, &file);
}

#[test]
fn backup_target_that_is_a_served_disk_is_refused() {
    let b = AgentBuilder::new();
    let other = b.dir().join("images/vm1-fresh.raw");
    let fresh = "  - name: fresh\n    image: file:../images/vm1-fresh.raw\n    size: 16MiB\n".to_owned();
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "16MiB", None, None), fresh]);
    let mut agent = b.vm("vm1", &yaml).start().unwrap();
    let mut rng = Rng::from_env(0xb0c4_000e);
    write_random(&agent, "vm1/disk0", &mut rng, &[(0, 4 * MIB)]);
    // vm1/fresh is a new, still empty disk of a VM: a backup of vm1/disk0
    // must not take it as its target and overwrite it.
    let out = agent
        .cli()
        .args(["--json", "backup", "vm1/disk0", "--target", &format!("file:{}", other.display()), "--wait"])
        .output()
        .unwrap();
    let seen = agent.dir().join("fresh.raw");
    capture(&agent, "vm1/fresh", &seen);
    let content = std::fs::read(&seen).unwrap();
    let overwritten = content.iter().any(|&b| b != 0);
    assert!(
        !out.status.success() && !overwritten,
        "a backup used the live disk vm1/fresh as its target ({} bytes of it now non-zero): {}",
        content.iter().filter(|&&b| b != 0).count(),
        show(&out)
    );
    agent.stop().unwrap();
}

#[test]
fn a_backup_keeps_fewer_chunks_in_flight_while_the_guest_writes() {
    let b = AgentBuilder::new();
    let path = b.dir().join("backups/vm1-disk0.raw");
    let yaml = vm_yaml("vm1", &[disk_yaml("vm1", "disk0", "64MiB", Some(&format!("file:{}", path.display())), None)]);
    let mut agent = b.vm("vm1", &yaml).start().unwrap();
    let disk = "vm1/disk0";
    // Idle guest: every chunk runs at full parallelism.
    let idle = backup_ok(&agent, &["backup", disk, "--sync", "full", "--bitmap", "backup", "--wait"]);
    assert_eq!(u(&idle["summary"]["guest_busy_chunks"]), 0, "no guest write, yet the backup backed off: {idle}");
    // A writer that keeps writing; the speed limit spreads the 16 chunks over ~4 s, so guest
    // writes arrive between every two admissions.
    let writer = Writer::start(agent.socket(), disk, 0xb0c4_0b05, (0, 64 * MIB));
    let deadline = Instant::now() + Duration::from_secs(30);
    while writer.writes() < 10 {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let args = ["backup", disk, "--sync", "full", "--bitmap", "backup", "--speed", &(16 * MIB).to_string(), "--wait"];
    let busy = backup_ok(&agent, &args);
    let writes = writer.stop();
    let chunks = u(&busy["summary"]["guest_busy_chunks"]);
    assert!(chunks >= 1, "{writes} guest writes during the backup, yet it never backed off: {busy}");
    assert!(chunks <= 16, "more chunks than the disk has: {busy}");
    agent.stop().unwrap();
}

/// A guest writes a counter to disk 1, and once that is acknowledged the same value to disk 2,
/// over and over. A VM backup must take both disks at one point in time: disk 2's snapshot may
/// never hold a value newer than disk 1's (each disk freezing on its own let disk 2 freeze later
/// and see writes that came after disk 1's point in time).
#[test]
fn a_vm_backup_takes_every_disk_at_one_point_in_time() {
    let store = tempfile::tempdir().unwrap();
    let targets = [store.path().join("t1.raw"), store.path().join("t2.raw")];
    let disks = [
        disk_yaml("g", "d1", "16MiB", Some(&format!("file:{}", targets[0].display())), None),
        disk_yaml("g", "d2", "16MiB", Some(&format!("file:{}", targets[1].display())), None),
    ];
    let agent = AgentBuilder::new().vm("g", &vm_yaml("g", &disks)).start().unwrap();
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={}", agent.socket().display());
    let stop = agent.dir().join("stop-writer");
    let script = r#"
import nbd, os, sys
h1, h2 = nbd.NBD(), nbd.NBD()
h1.connect_uri(sys.argv[1]); h2.connect_uri(sys.argv[2])
n = 0
while not os.path.exists(sys.argv[3]):
    n += 1
    block = n.to_bytes(8, "little") * 512
    h1.pwrite(block, 0)
    h2.pwrite(block, 0)
print(n)
"#;
    let writer = Command::new("/usr/bin/python3")
        .args(["-c", script, &uri("g/d1"), &uri("g/d2"), stop.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let counter = |path: &Path| {
        let mut word = [0u8; 8];
        std::io::Read::read_exact(&mut std::fs::File::open(path).unwrap(), &mut word).unwrap();
        u64::from_le_bytes(word)
    };
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..8 {
        let out = agent.json(&["backup", "g", "--wait"]);
        let jobs = out.as_array().unwrap_or_else(|| panic!("{out:#}"));
        let snap = |disk: &str, target: &Path| {
            let job = jobs.iter().find(|j| j["disk"] == disk).unwrap_or_else(|| panic!("no job for {disk}: {out:#}"));
            assert_success(&agent, job);
            counter(&PathBuf::from(format!("{}.snapshots/{}.raw", target.display(), snapshot_of(job))))
        };
        let (c1, c2) = (snap("g/d1", &targets[0]), snap("g/d2", &targets[1]));
        eprintln!("round {round}: disk 1 at write {c1}, disk 2 at write {c2}");
        assert!(c2 <= c1, "disk 2's snapshot holds write {c2}, made after disk 1's write {c1} was acknowledged");
        assert!(c1 > 0, "the writer made no progress");
    }
    std::fs::write(&stop, "").unwrap();
    let done = writer.wait_with_output().unwrap();
    assert!(done.status.success(), "writer: {}", String::from_utf8_lossy(&done.stderr));
}
