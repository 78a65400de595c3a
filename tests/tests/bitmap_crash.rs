//! Crash consistency and untrusted on-disk state of the dirty bitmaps.
//!
//! - Writers (python libnbd) log every acknowledged WRITE / WRITE_ZEROES /
//!   TRIM; the agent is killed with SIGKILL at a random moment and started
//!   again on the same directory; every logged request's granules must be
//!   dirty in the loaded bitmaps (md write-intent: bits durable before the
//!   ack), so must every sector of the image that holds written data (bits
//!   durable before the data reaches the image), and the extra dirty bits
//!   are bounded by the requests that can have been in flight.
//! - The same after `rbdsync bitmap clear` (bits dropped on disk lazily):
//!   every request sent after the clear returned survives SIGKILL.
//! - A corrupt or truncated bitmap file, or an image changed or replaced
//!   while the agent was stopped, must not be offered as
//!   `qemu:dirty-bitmap:NAME` (an empty or stale bitmap would make an
//!   incremental backup silently miss data), while the disk is still served
//!   and the other bitmaps are unaffected.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::fusefs::PowerCutFs;

use anyhow::{bail, ensure, Context, Result};
use tests::{export_contexts, map_extents, qemu_io, run, stdout, Agent, AgentBuilder, Rng};

const MIB: u64 = 1 << 20;
/// The bitmaps of every disk here: name and granularity.
const BITMAPS: [(&str, u64); 2] = [("backup", 64 << 10), ("fine", 4 << 10)];
/// Longest request a writer sends.
const MAX_REQUEST: u64 = MIB;

/// The VM file; `intent_region: None` keeps the default (64 MiB).
fn vm_yaml(size: u64, intent_region: Option<u64>) -> String {
    let intent = intent_region.map(|r| format!("    intent_region: {r}\n")).unwrap_or_default();
    format!(
        "name: vm1\ndisks:\n  - name: disk0\n    image: file:../images/vm1-disk0.raw\n    size: {size}\n    \
         bitmaps: [{{name: backup, granularity: 64KiB}}, {{name: fine, granularity: 4KiB}}]\n{intent}"
    )
}

/// Sends random 512-aligned writes (70 %), write-zeroes and trims (15 % each)
/// of 512 B to `most` sectors (90 % at most 128 KiB) until the connection dies, appending `offset length
/// issued` to the log (one `write`, O_APPEND) after each acknowledged
/// request; `issued` is CLOCK_MONOTONIC in ns just before it was sent. With
/// depth > 1 it keeps that many requests in flight (aio) and logs each as it
/// completes successfully.
const WRITER: &str = r#"
import nbd, os, random, sys, time
uri, log, seed, depth, most = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rnd = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
data = rnd.randbytes(1 << 20)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(fd, b"ready\n")

def pick():
    if rnd.random() < 0.9:
        length = 512 * rnd.randrange(1, min(most, 256) + 1)
    else:
        length = 512 * rnd.randrange(1, most + 1)
    offset = 512 * rnd.randrange(0, (size - length) // 512 + 1)
    r = rnd.random()
    op = "w" if r < 0.7 else ("z" if r < 0.85 else "t")
    return op, offset, length

def done(offset, length, issued):
    os.write(fd, b"%d %d %d\n" % (offset, length, issued))

try:
    if depth == 1:
        while True:
            op, offset, length = pick()
            issued = time.monotonic_ns()
            if op == "w":
                h.pwrite(data[:length], offset)
            elif op == "z":
                h.zero(length, offset)
            else:
                h.trim(length, offset)
            done(offset, length, issued)
    inflight = {}
    while True:
        while len(inflight) < depth:
            op, offset, length = pick()
            issued = time.monotonic_ns()
            buf = None
            if op == "w":
                buf = nbd.Buffer.from_bytearray(bytearray(data[:length]))
                cookie = h.aio_pwrite(buf, offset)
            elif op == "z":
                cookie = h.aio_zero(length, offset)
            else:
                cookie = h.aio_trim(length, offset)
            inflight[cookie] = (offset, length, issued, buf)
        h.poll(-1)
        for cookie in list(inflight):
            if h.aio_command_completed(cookie):
                offset, length, issued, _ = inflight.pop(cookie)
                done(offset, length, issued)
except nbd.Error as e:
    sys.stderr.write("writer stopped: %s\n" % e)
    sys.exit(3)
"#;

/// An acknowledged request: its range and when it was sent (CLOCK_MONOTONIC ns).
#[derive(Clone, Copy)]
struct Acked {
    offset: u64,
    length: u64,
    issued: u64,
}

/// CLOCK_MONOTONIC in ns, the clock of python's `time.monotonic_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A background writer process and its log.
struct Writer {
    child: Child,
    log: PathBuf,
}

impl Writer {
    fn spawn(uri: &str, log: PathBuf, seed: u64, depth: u32, max_request: u64) -> Result<Writer> {
        let child = Command::new("/usr/bin/python3")
            .args(["-c", WRITER, uri])
            .arg(&log)
            .args([seed.to_string(), depth.to_string(), (max_request / 512).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn writer")?;
        Ok(Writer { child, log })
    }

    /// Waits until the writer had its first request acknowledged.
    fn wait_first_ack(&mut self, deadline: Instant) -> Result<()> {
        while std::fs::read_to_string(&self.log).unwrap_or_default().lines().count() < 2 {
            if let Some(status) = self.child.try_wait()? {
                bail!("writer exited before its first write was acknowledged ({status}): {}", self.stderr());
            }
            ensure!(Instant::now() < deadline, "writer: no write acknowledged within 10 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut s);
        }
        s
    }

    /// Waits for the writer to give up on the dead agent; returns the acknowledged requests.
    fn finish(mut self) -> Result<Vec<Acked>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("writer still running 10 s after the agent was killed");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // It must have failed because the agent died, not for another reason.
        let err = self.stderr();
        ensure!(status.code() == Some(3) && err.contains("writer stopped"), "writer: {status}: {err}");
        let text = std::fs::read_to_string(&self.log)?;
        let mut acked = Vec::new();
        for line in text.lines().skip(1) {
            let f: Vec<u64> = line.split(' ').map(str::parse).collect::<Result<_, _>>()?;
            ensure!(f.len() == 3, "bad log line {line:?}");
            acked.push(Acked { offset: f[0], length: f[1], issued: f[2] });
        }
        Ok(acked)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Offsets of the 512-byte sectors of a sparse image that are not all zero
/// (only its data regions are read).
fn written_sectors(path: &Path) -> Result<Vec<u64>> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let len = i64::try_from(file.metadata()?.len())?;
    let mut out = Vec::new();
    let mut pos = 0i64;
    let mut buf = vec![0u8; MIB as usize];
    while pos < len {
        // SAFETY: lseek(2) on a descriptor we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        ensure!(hole > data, "lseek SEEK_HOLE failed");
        let mut at = data as u64;
        while at < hole as u64 {
            let n = (hole as u64 - at).min(MIB) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            for (i, sector) in buf[..n].chunks(512).enumerate() {
                if sector.iter().any(|&b| b != 0) {
                    out.push(at + i as u64 * 512);
                }
            }
            at += n as u64;
        }
        pos = hole;
    }
    Ok(out)
}

/// Dirty granules of bitmap `name` (granularity `g`), as a vector of flags.
fn dirty_granules(uri: &str, name: &str, g: u64, size: u64) -> Result<Vec<bool>> {
    let map = map_extents(uri, &format!("qemu:dirty-bitmap:{name}"))?;
    let mut dirty = vec![false; size.div_ceil(g) as usize];
    let mut end = 0;
    for (offset, length, kind) in map {
        ensure!(offset.is_multiple_of(g), "{name}: extent at {offset} not on a granule boundary");
        ensure!((offset + length).is_multiple_of(g) || offset + length == size, "{name}: extent end off-granule");
        if kind == 1 {
            dirty[(offset / g) as usize..(offset + length).div_ceil(g) as usize].fill(true);
        }
        end = offset + length;
    }
    ensure!(end == size, "{name}: map covers {end} of {size} bytes");
    Ok(dirty)
}

/// Totals over the iterations of a crash test.
#[derive(Default)]
struct Totals {
    iterations: u32,
    acked: usize,
    worst_extra: [u64; 2],
    max_acked: usize,
    min_acked: usize,
}

/// One crash: start a fresh agent, run `depths.len()` writers (the i-th with
/// that many requests in flight), SIGKILL the agent 0..300 ms after every
/// writer had its first request acknowledged, start it again and check both bitmaps against the writers' logs.
fn crash_once(rng: &mut Rng, depths: &[u32], region: u64, totals: &mut Totals) -> Result<()> {
    crash_with(rng, depths, region, totals, false)
}

/// [`crash_once`]; with `power_cut` the agent's state directory is on a
/// [`PowerCutFs`], cut together with the SIGKILL (only synced data stays).
fn crash_with(rng: &mut Rng, depths: &[u32], region: u64, totals: &mut Totals, power_cut: bool) -> Result<()> {
    let size = 256 * MIB;
    let builder = AgentBuilder::new().vm("vm1", &vm_yaml(size, Some(region)));
    let fs = if power_cut { Some(PowerCutFs::mount(&builder.dir().join("state"))?) } else { None };
    let agent = builder.start()?;
    let mut writers = Vec::new();
    for (i, &depth) in depths.iter().enumerate() {
        // Unix and TCP connections alike.
        let uri = if i % 2 == 0 { agent.unix_uri("vm1/disk0") } else { agent.tcp_uri("vm1/disk0") };
        writers.push(Writer::spawn(
            &uri,
            agent.dir().join(format!("writer{i}.log")),
            rng.next_u64(),
            depth,
            MAX_REQUEST,
        )?);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for w in &mut writers {
        w.wait_first_ack(deadline)?;
    }
    let delay = rng.below(300);
    std::thread::sleep(Duration::from_millis(delay));
    let mut agent = agent;
    agent.kill9()?;
    if let Some(fs) = fs {
        fs.cut()?;
    }
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.finish()?);
    }
    let written = written_sectors(&agent.dir().join("images/vm1-disk0.raw"))?;
    let agent = agent.respawn()?;
    let extra = check_after_crash(&agent, size, &acked, &written, depths, region, delay).with_context(|| {
        let before = std::fs::read_to_string(agent.dir().join("agent.prev.log")).unwrap_or_default();
        format!(
            "SIGKILL {delay} ms after the first acks; agent log before the kill:\n{before}\nafter the restart:\n{}",
            agent.log()
        )
    })?;
    for (worst, extra) in totals.worst_extra.iter_mut().zip(extra) {
        *worst = (*worst).max(extra);
    }
    totals.iterations += 1;
    totals.acked += acked.len();
    totals.max_acked = totals.max_acked.max(acked.len());
    totals.min_acked = if totals.iterations == 1 { acked.len() } else { totals.min_acked.min(acked.len()) };
    Ok(())
}

/// Checks both bitmaps of the restarted agent against the acknowledged
/// requests and the image content; returns the extra dirty bytes of each.
/// `region`: the write-intent region (0: exact), within which a first write
/// may leave the whole region dirty after a crash.
fn check_after_crash(
    agent: &Agent,
    size: u64,
    acked: &[Acked],
    written: &[u64],
    depths: &[u32],
    region: u64,
    delay: u64,
) -> Result<[u64; 2]> {
    let uri = agent.unix_uri("vm1/disk0");
    let contexts = export_contexts(&uri)?;
    ensure!(
        contexts == ["base:allocation", "qemu:dirty-bitmap:backup", "qemu:dirty-bitmap:fine"],
        "bitmaps not offered after the crash: {contexts:?}"
    );
    let mut extras = [0; 2];
    for (i, (name, g)) in BITMAPS.into_iter().enumerate() {
        let dirty = dirty_granules(&uri, name, g, size)?;
        let mut logged = vec![false; dirty.len()];
        // Granules of every intent region an acknowledged request touched.
        let unit = region.max(g);
        let mut covered = vec![false; dirty.len()];
        for &Acked { offset, length, .. } in acked {
            let (first, last) = (offset / unit * unit / g, ((offset + length).div_ceil(unit) * unit).min(size) / g);
            covered[first as usize..last as usize].fill(true);
        }
        for &Acked { offset, length, .. } in acked {
            let (first, last) = (offset / g, (offset + length - 1) / g);
            for granule in first..=last {
                ensure!(
                    dirty[granule as usize],
                    "{name}: acknowledged request {offset}+{length} (granule {granule}) is not dirty after \
                     SIGKILL at {delay} ms ({} requests acknowledged)",
                    acked.len()
                );
                logged[granule as usize] = true;
            }
        }
        // Stronger than "acknowledged writes are dirty": the bits go to disk
        // before the data reaches the image, so every sector that differs
        // from the initial all-zero image - written by a request acknowledged
        // or not - lies in a dirty granule.
        for &offset in written {
            ensure!(
                dirty[(offset / g) as usize],
                "{name}: the image holds written data at {offset} but granule {} is clean after SIGKILL at {delay} ms",
                offset / g
            );
        }
        let bytes = |v: &[bool]| v.iter().filter(|&&d| d).count() as u64 * g;
        let extra = bytes(&dirty) - bytes(&logged);
        // Beyond the intent regions of acknowledged requests, only requests
        // in flight at the kill may have left extra bits: at most `depth`
        // per writer, each at most MAX_REQUEST long, in whole regions.
        let in_flight: u64 = depths.iter().map(|&d| u64::from(d)).sum();
        let bound = in_flight * (MAX_REQUEST + 2 * unit);
        let outside = dirty.iter().zip(&covered).filter(|(d, c)| **d && !**c).count() as u64 * g;
        ensure!(
            outside <= bound,
            "{name}: {outside} dirty bytes outside the intent regions of acknowledged requests after the crash, \
             more than {bound} could be in flight (region {region})"
        );
        ensure!(bytes(&logged) < size, "{name}: every granule written; the check means little");
        extras[i] = extra;
    }
    Ok(extras)
}

#[test]
fn a_power_cut_never_loses_an_acknowledged_write_from_the_bitmaps() {
    // The state directory forgets everything not synced at the moment of the kill: what the
    // bitmaps claim after the restart rests only on the syncs the agent did before each ack.
    let probe = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(&probe.path().join("state")).unwrap();
    let (synced, unsynced) = (probe.path().join("state/synced"), probe.path().join("state/unsynced"));
    let mut f = std::fs::File::create(&synced).unwrap();
    std::io::Write::write_all(&mut f, b"kept").unwrap();
    f.sync_data().unwrap();
    std::fs::write(&unsynced, b"lost").unwrap();
    fs.cut().unwrap();
    assert_eq!(std::fs::read(&synced).unwrap(), b"kept", "the power cut lost synced data");
    assert_eq!(std::fs::read(&unsynced).unwrap(), b"", "the power cut kept unsynced data: it cuts nothing");

    let mut rng = Rng::from_env(0xc4a5_0009);
    let mut totals = Totals::default();
    let started = Instant::now();
    for (i, region) in [1 << 20, 0, 64 * MIB, 1 << 20].into_iter().enumerate() {
        crash_with(&mut rng, &[1, 8], region, &mut totals, true)
            .with_context(|| format!("iteration {i} (intent region {region})"))
            .unwrap();
    }
    report("power cut", &totals, started);
}

fn report(what: &str, totals: &Totals, started: Instant) {
    eprintln!(
        "{what}: {} iterations, {} acknowledged requests checked ({}..{} per crash), worst extra dirty bytes: \
         backup (64 KiB) {}, fine (4 KiB) {}; {:.1} s",
        totals.iterations,
        totals.acked,
        totals.min_acked,
        totals.max_acked,
        totals.worst_extra[0],
        totals.worst_extra[1],
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn sigkill_never_loses_an_acknowledged_write_from_the_bitmaps() {
    let mut rng = Rng::from_env(0xc4a5_0001);
    let started = Instant::now();
    let mut totals = Totals::default();
    for i in 0..50 {
        // Exact write intent and 64 KiB intent regions, alternately.
        let region = if i % 2 == 0 { 0 } else { 64 << 10 };
        crash_once(&mut rng, &[1], region, &mut totals).with_context(|| format!("iteration {i}")).unwrap();
    }
    report("one writer", &totals, started);
}

#[test]
fn sigkill_with_concurrent_writers_never_loses_an_acknowledged_write() {
    let mut rng = Rng::from_env(0xc4a5_0002);
    let started = Instant::now();
    let mut totals = Totals::default();
    for i in 0..25 {
        // Two synchronous connections and one with 8 requests in flight.
        let region = if i % 2 == 0 { 0 } else { 64 << 10 };
        crash_once(&mut rng, &[1, 1, 8], region, &mut totals).with_context(|| format!("iteration {i}")).unwrap();
    }
    report("three writers", &totals, started);
}

/// The agent's CLI on its control socket.
fn cli(agent: &Agent, args: &[&str]) -> Result<String> {
    let control = format!("unix:{}", agent.dir().join("control.sock").display());
    let mut all = vec!["--control", &control];
    all.extend(args);
    stdout(tests::agent_bin().to_str().context("agent path")?, &all)
}

#[test]
fn sigkill_after_a_clear_keeps_every_write_issued_after_the_clear() {
    // One agent directory throughout: each round clears both bitmaps while a
    // writer runs, kills the agent 0..1 s later (the cleared pages are written
    // back lazily, every 500 ms), restarts it and checks that every request
    // sent after `bitmap clear` returned is dirty. Bits from before the
    // clear may come back after a crash (bits are dropped on disk lazily);
    // their amount is reported, not checked.
    let mut rng = Rng::from_env(0xc4a5_0004);
    // Large disk, small requests: the bitmaps stay far from all dirty.
    let (size, max_request) = (1024 * MIB, 8192);
    let started = Instant::now();
    let mut agent = AgentBuilder::new().vm("vm1", &vm_yaml(size, None)).start().unwrap();
    let (mut checked, mut rounds, mut stale_max) = (0, 0, [0u64; 2]);
    for round in 0..16 {
        let depth = if round % 2 == 0 { 1 } else { 8 };
        let log = agent.dir().join(format!("clear{round}.log"));
        let mut writer = Writer::spawn(&agent.unix_uri("vm1/disk0"), log, rng.next_u64(), depth, max_request).unwrap();
        writer.wait_first_ack(Instant::now() + Duration::from_secs(10)).unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(100)));
        let mut cleared = [0u64; 2];
        for (i, (name, _)) in BITMAPS.into_iter().enumerate() {
            cli(&agent, &["bitmap", "clear", "vm1/disk0", name]).unwrap();
            cleared[i] = monotonic_ns();
        }
        let delay = rng.below(1000);
        std::thread::sleep(Duration::from_millis(delay));
        agent.kill9().unwrap();
        let acked = writer.finish().unwrap();
        agent = agent.respawn().unwrap();
        let uri = agent.unix_uri("vm1/disk0");
        for (i, (name, g)) in BITMAPS.into_iter().enumerate() {
            let dirty = dirty_granules(&uri, name, g, size).unwrap();
            let mut after = vec![false; dirty.len()];
            for a in acked.iter().filter(|a| a.issued > cleared[i]) {
                for granule in a.offset / g..=(a.offset + a.length - 1) / g {
                    assert!(
                        dirty[granule as usize],
                        "round {round}: {name}: request {}+{} sent after the clear is not dirty after SIGKILL \
                         {delay} ms after the clear:\n{}",
                        a.offset,
                        a.length,
                        agent.log()
                    );
                    after[granule as usize] = true;
                }
                checked += usize::from(i == 0);
            }
            assert!(after.iter().any(|a| !a), "round {round}: {name}: every granule written, the check means little");
            let stale = dirty.iter().zip(&after).filter(|(d, a)| **d && !**a).count() as u64 * g;
            stale_max[i] = stale_max[i].max(stale);
        }
        rounds += 1;
    }
    // `clear` does clear: with nothing writing, the maps are empty afterwards.
    for (name, _) in BITMAPS {
        cli(&agent, &["bitmap", "clear", "vm1/disk0", name]).unwrap();
        assert_eq!(map(&agent.unix_uri("vm1/disk0"), name), [(0, size, 0)], "{name} after clear");
    }
    eprintln!(
        "clear then SIGKILL: {rounds} rounds, {checked} requests sent after a clear checked; most dirty bytes \
         not explained by them (pre-clear bits, requests in flight): backup {}, fine {}; {:.1} s",
        stale_max[0],
        stale_max[1],
        started.elapsed().as_secs_f64()
    );
    assert!(checked > 0, "no request was sent after a clear");
}

#[test]
fn a_write_after_a_clear_to_granules_dirty_before_it_survives_sigkill() {
    // A clear drops bits in memory at once and on disk later; a write after
    // it to a granule that is still set on disk must not take the bit on disk
    // for granted once the lazy writeback has cleared it. So: dirty a region,
    // clear, wait from 0 to 1.5 s (past the writeback), rewrite parts of the
    // region, SIGKILL right after the acknowledgement.
    let size = 64 * MIB;
    let mut agent = AgentBuilder::new().vm("vm1", &vm_yaml(size, None)).start().unwrap();
    for wait_ms in [0, 200, 700, 1500] {
        let uri = agent.unix_uri("vm1/disk0");
        qemu_io(&uri, &["write -P 1 0 4M"]).unwrap();
        for (name, _) in BITMAPS {
            cli(&agent, &["bitmap", "clear", "vm1/disk0", name]).unwrap();
            assert_eq!(map(&uri, name), [(0, size, 0)], "{name} right after clear");
        }
        std::thread::sleep(Duration::from_millis(wait_ms));
        qemu_io(&uri, &["write -P 2 1M 64k", "write -z 3M 4k", "write -P 3 5M 4k"]).unwrap();
        agent.kill9().unwrap();
        agent = agent.respawn().unwrap();
        let uri = agent.unix_uri("vm1/disk0");
        for (name, g) in BITMAPS {
            let dirty = dirty_granules(&uri, name, g, size).unwrap();
            for (offset, length) in [(MIB, 64 << 10), (3 * MIB, 4096), (5 * MIB, 4096)] {
                let granules = offset / g..=(offset + length - 1) / g;
                assert!(
                    granules.clone().all(|i| dirty[i as usize]),
                    "{name}: write {offset}+{length} after a clear ({wait_ms} ms later) lost by SIGKILL:\n{}",
                    agent.log()
                );
            }
        }
    }
}

fn bitmap_file(agent: &Agent, name: &str) -> PathBuf {
    agent.dir().join(format!("state/bitmaps/vm1/disk0/{name}.bitmap"))
}

fn image(agent: &Agent) -> PathBuf {
    agent.dir().join("images/vm1-disk0.raw")
}

/// The dirty map of one bitmap.
fn map(uri: &str, name: &str) -> Vec<(u64, u64, u64)> {
    map_extents(uri, &format!("qemu:dirty-bitmap:{name}")).unwrap()
}

/// Ways to damage `fine.bitmap` of a stopped agent.
fn damage(kind: &str, file: &Path, rng: &mut Rng) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(file)?;
    let len = f.metadata()?.len();
    match kind {
        // Both header slots overwritten: no valid header left.
        "garbage headers" => {
            let mut junk = vec![0u8; 8192];
            rng.fill(&mut junk);
            f.write_all_at(&junk, 0)?;
        }
        "truncated to 100 bytes" => f.set_len(100)?,
        "body cut short" => f.set_len(len - 8)?,
        // A valid file, but of another bitmap.
        "other bitmap's file" => std::fs::copy(file.with_file_name("backup.bitmap"), file).map(drop)?,
        // The disk has 4099 granules of 4 KiB: bit 63 of the last word lies past its end.
        "bits past the end" => f.write_all_at(&[0x80], len - 1)?,
        _ => bail!("unknown damage {kind}"),
    }
    f.sync_all()?;
    Ok(())
}

#[test]
fn a_damaged_bitmap_file_is_not_offered_and_the_other_bitmap_is_unaffected() {
    let mut rng = Rng::from_env(0xc4a5_0003);
    // 4099 granules of 4 KiB: the last body word of `fine` is partly past the end.
    let size = 16 * MIB + 12 * 1024;
    for kind in
        ["garbage headers", "truncated to 100 bytes", "body cut short", "other bitmap's file", "bits past the end"]
    {
        let mut agent = AgentBuilder::new().vm("vm1", &vm_yaml(size, None)).start().unwrap();
        let uri = agent.unix_uri("vm1/disk0");
        qemu_io(&uri, &["write -P 0x5a 1M 100k", "write -z 9M 4k", "discard 12M 64k"]).unwrap();
        let backup = map(&uri, "backup");
        assert_eq!(
            backup,
            [
                (0, MIB, 0),
                (MIB, 128 << 10, 1),
                (MIB + (128 << 10), 8 * MIB - (128 << 10), 0),
                (9 * MIB, 64 << 10, 1),
                (9 * MIB + (64 << 10), 3 * MIB - (64 << 10), 0),
                (12 * MIB, 64 << 10, 1),
                (12 * MIB + (64 << 10), size - 12 * MIB - (64 << 10), 0)
            ]
        );
        agent.stop().unwrap();
        damage(kind, &bitmap_file(&agent, "fine"), &mut rng).unwrap();

        let agent = agent.respawn().unwrap();
        let uri = agent.unix_uri("vm1/disk0");
        let contexts = export_contexts(&uri).unwrap();
        assert_eq!(contexts, ["base:allocation", "qemu:dirty-bitmap:backup"], "{kind}:\n{}", agent.log());
        let err = map_extents(&uri, "qemu:dirty-bitmap:fine").unwrap_err().to_string();
        assert!(err.contains("fine"), "{kind}: {err}");
        // The disk is served, the other bitmap is exact and keeps recording.
        qemu_io(&uri, &["read -P 0x5a 1M 100k", "read -P 0 9M 4k"]).unwrap();
        assert_eq!(map(&uri, "backup"), backup, "{kind}");
        qemu_io(&uri, &["write -P 1 15M 512"]).unwrap();
        let mut expected = backup.clone();
        expected.pop();
        expected.extend([
            (12 * MIB + (64 << 10), 3 * MIB - (64 << 10), 0),
            (15 * MIB, 64 << 10, 1),
            (15 * MIB + (64 << 10), size - 15 * MIB - (64 << 10), 0),
        ]);
        assert_eq!(map(&uri, "backup"), expected, "{kind}");

        // Another restart does not quietly replace it with a fresh, empty
        // bitmap of the configured name: it stays out of the export.
        let agent = agent.restart().unwrap();
        let uri = agent.unix_uri("vm1/disk0");
        assert_eq!(export_contexts(&uri).unwrap(), contexts, "{kind}, after another restart");
        assert_eq!(map(&uri, "backup"), expected, "{kind}, after another restart");
    }
}

#[test]
fn an_image_changed_or_replaced_while_stopped_makes_its_bitmaps_untrusted() {
    let all = ["base:allocation", "qemu:dirty-bitmap:backup", "qemu:dirty-bitmap:fine"];
    for change in ["dd into the image", "image replaced by a copy"] {
        let agent = AgentBuilder::new().vm("vm1", &vm_yaml(16 * MIB, None)).start().unwrap();
        qemu_io(&agent.unix_uri("vm1/disk0"), &["write -P 0x11 0 64k"]).unwrap();
        // Control: an untouched image keeps its bitmaps over a clean restart.
        let mut agent = agent.restart().unwrap();
        assert_eq!(export_contexts(&agent.unix_uri("vm1/disk0")).unwrap(), all);
        agent.stop().unwrap();

        let img = image(&agent);
        let img_s = img.to_str().unwrap();
        match change {
            "dd into the image" => {
                let of = format!("of={img_s}");
                run("dd", &["if=/dev/urandom", &of, "bs=4096", "count=2", "seek=1000", "conv=notrunc", "status=none"])
                    .unwrap();
            }
            _ => {
                let copy = img.with_extension("copy");
                std::fs::copy(&img, &copy).unwrap();
                std::fs::write(&copy, [0x22u8; 4096].repeat(16 * 256)).unwrap();
                std::fs::rename(&copy, &img).unwrap();
            }
        }

        let agent = agent.respawn().unwrap();
        let uri = agent.unix_uri("vm1/disk0");
        assert_eq!(export_contexts(&uri).unwrap(), ["base:allocation"], "{change}:\n{}", agent.log());
        assert!(agent.log().contains("bitmap marked inconsistent"), "{change}:\n{}", agent.log());
        // Still served, with the changed content.
        match change {
            "dd into the image" => drop(qemu_io(&uri, &["read -P 0x11 0 64k"]).unwrap()),
            _ => drop(qemu_io(&uri, &["read -P 0x22 0 16M"]).unwrap()),
        }
        // And it stays untrusted over another restart.
        let agent = agent.restart().unwrap();
        assert_eq!(export_contexts(&agent.unix_uri("vm1/disk0")).unwrap(), ["base:allocation"], "{change}");
    }
}
