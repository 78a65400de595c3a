//! Dirty bitmaps checked against QEMU as an oracle: the same writes go to a
//! qcow2 image with persistent bitmaps (through qemu-io) and to an rbdsync
//! export (through qemu-io over NBD); `nbdinfo --map=qemu:dirty-bitmap:NAME`
//! must then report the same dirty extents from `qemu-nbd -B NAME` and from
//! the agent.
//!
//! What QEMU does (checked with qemu 10.0 while writing this test, and
//! re-checked by every run through the independent model below): the block
//! layer marks `[offset, offset + bytes)` of every write, write-zeroes and
//! discard request, rounded out to whole granules, whether or not the qcow2
//! clusters were allocated and whether the discard did anything - a 1000-byte
//! discard at an unaligned offset of an unallocated qcow2 dirties its granule.
//! So discards have the same semantics as on the agent (TRIM marks) and are
//! compared too. One difference is in the client, not the bitmap: qemu's NBD
//! client forwards the unaligned head and tail of a discard as-is (e.g.
//! `discard 10000000 1000` sends TRIM 10000000+384) although the agent
//! advertises a 512-byte minimum block size, and the agent rightly answers
//! EINVAL; discards are therefore generated 512-aligned. Unaligned writes and
//! write-zeroes are fine: qemu does read-modify-write over NBD, which widens
//! the request to 512 bytes, which never reaches another granule.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tests::{export_contexts, map_extents, qemu_io_on, run, AgentBuilder, Rng};

const MIB: u64 = 1 << 20;
const BACKUP: u64 = 64 << 10;
const FINE: u64 = 4 << 10;

/// A qcow2 image of `size` bytes with persistent bitmaps `backup` (64 KiB) and `fine` (4 KiB).
fn qcow2_with_bitmaps(dir: &Path, size: u64) -> Result<PathBuf> {
    let image = dir.join("oracle.qcow2");
    let path = image.to_str().context("path")?;
    run("qemu-img", &["create", "-q", "-f", "qcow2", path, &size.to_string()])?;
    run("qemu-img", &["bitmap", "--add", path, "backup", "-g", &BACKUP.to_string()])?;
    run("qemu-img", &["bitmap", "--add", path, "fine", "-g", &FINE.to_string()])?;
    Ok(image)
}

/// `qemu-nbd -r -B backup -B fine` on a Unix socket, killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(image: &Path) -> Result<Self> {
        let socket = image.with_extension("sock");
        let child = Command::new("qemu-nbd")
            .args(["-t", "-r", "-f", "qcow2", "-B", "backup", "-B", "fine", "-k"])
            .arg(&socket)
            .arg(image)
            .stdin(Stdio::null())
            .spawn()
            .context("spawn qemu-nbd")?;
        let mut me = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            if let Some(status) = me.child.try_wait()? {
                bail!("qemu-nbd exited early: {status}");
            }
            ensure!(Instant::now() < deadline, "qemu-nbd socket not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The VM file of a disk with both bitmaps.
fn vm_yaml(size: u64) -> String {
    format!(
        "name: vm1\ndisks:\n  - name: disk0\n    image: file:../images/vm1-disk0.raw\n    size: {size}\n    \
         bitmaps: [{{name: backup, granularity: 64KiB}}, {{name: fine, granularity: 4KiB}}]\n"
    )
}

/// One qemu-io command and the byte range it touches.
struct Op {
    cmd: String,
    offset: u64,
    length: u64,
}

/// `n` random operations on a disk of `size` bytes: unaligned sub-granule
/// writes, writes straddling a granule boundary, large writes, unaligned
/// write-zeroes (with and without unmap) and 512-aligned discards.
fn random_ops(rng: &mut Rng, n: usize, size: u64) -> Vec<Op> {
    let mut ops = Vec::new();
    for i in 0..n {
        let pattern = 1 + rng.below(254);
        let g = if rng.below(2) == 0 { BACKUP } else { FINE };
        let kind = i % 6;
        let (offset, length) = match kind {
            // Inside one granule, at any byte offset.
            0 => {
                let offset = rng.below(size / g) * g + rng.below(g - 1);
                let room = g - offset % g;
                (offset, 1 + rng.below(room.min(3000)))
            }
            // Straddling a granule boundary by a few bytes to a few KiB either side.
            1 => {
                let boundary = (1 + rng.below(size / g - 1)) * g;
                let (before, after) = (1 + rng.below(g.min(6000)), 1 + rng.below(g.min(6000)));
                (boundary - before, before + after)
            }
            // Large, unaligned.
            2 => (rng.below(size - 2 * MIB), 1 + rng.below(2 * MIB)),
            // Write-zeroes, unaligned.
            3 | 4 => (rng.below(size - MIB), 1 + rng.below(300 << 10)),
            // Discard, 512-aligned (see the module comment).
            _ => (rng.below(size / 512 - 1024) * 512, 512 * (1 + rng.below(1024))),
        };
        let length = length.min(size - offset);
        let cmd = match kind {
            3 => format!("write -z {offset} {length}"),
            4 => format!("write -z -u {offset} {length}"),
            5 => format!("discard {offset} {length}"),
            _ => format!("write -P {pattern} {offset} {length}"),
        };
        ops.push(Op { cmd, offset, length });
    }
    ops
}

/// The dirty map an exact bitmap of granularity `g` must show after `ops`,
/// in the merged form of [`map_extents`].
fn model(ops: &[&Op], size: u64, g: u64) -> Vec<(u64, u64, u64)> {
    let mut dirty = vec![false; size.div_ceil(g) as usize];
    for op in ops {
        for granule in op.offset / g..=(op.offset + op.length - 1) / g {
            dirty[granule as usize] = true;
        }
    }
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (i, &d) in dirty.iter().enumerate() {
        let (start, end) = (i as u64 * g, ((i as u64 + 1) * g).min(size));
        match out.last_mut() {
            Some(last) if last.2 == u64::from(d) => last.1 += end - start,
            _ => out.push((start, end - start, u64::from(d))),
        }
    }
    out
}

fn dirty_bytes(map: &[(u64, u64, u64)]) -> u64 {
    map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum()
}

/// Compares the agent's maps of both bitmaps with qemu-nbd's and with the model.
fn compare(agent_uri: &str, qcow2: &Path, ops: &[&Op], size: u64) -> Result<Vec<Vec<(u64, u64, u64)>>> {
    let qemu = QemuNbd::start(qcow2)?;
    let mut maps = Vec::new();
    for (name, g) in [("backup", BACKUP), ("fine", FINE)] {
        let context = format!("qemu:dirty-bitmap:{name}");
        let ours = map_extents(agent_uri, &context)?;
        let theirs = map_extents(&qemu.uri(), &context)?;
        let expected = model(ops, size, g);
        ensure!(theirs == expected, "qemu's {name} map differs from the model:\nqemu: {theirs:?}\nmodel: {expected:?}");
        let dirty_runs = ours.iter().filter(|e| e.2 == 1).count();
        eprintln!("{name}: {dirty_runs} dirty runs, {} dirty bytes of {size}", dirty_bytes(&ours));
        ensure!(ours == theirs, "{name}: rbdsync and qemu-nbd disagree:\nrbdsync: {ours:?}\nqemu-nbd: {theirs:?}");
        ensure!(dirty_runs >= 10 && dirty_bytes(&ours) < size / 2, "{name}: map too trivial to mean much: {ours:?}");
        maps.push(ours);
    }
    Ok(maps)
}

#[test]
fn dirty_maps_match_qemu_for_random_writes_zeroes_and_discards_at_4k_and_64k() {
    let size = 64 * MIB;
    let builder = AgentBuilder::new().vm("vm1", &vm_yaml(size));
    let qcow2 = qcow2_with_bitmaps(builder.dir(), size).unwrap();
    let agent = builder.start().unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    let mut rng = Rng::from_env(0x0bac_0001);
    let ops = random_ops(&mut rng, 60, size);
    // A fresh bitmap is all clean on both sides.
    assert_eq!(map_extents(&uri, "qemu:dirty-bitmap:backup").unwrap(), vec![(0, size, 0)]);
    let cmds: Vec<String> = ops.iter().map(|o| o.cmd.clone()).collect();
    qemu_io_on("qcow2", qcow2.to_str().unwrap(), &cmds).unwrap();
    // Over NBD in two connections, TCP and Unix, to the same bitmaps.
    qemu_io_on("raw", &agent.tcp_uri("vm1/disk0"), &cmds[..30]).unwrap();
    qemu_io_on("raw", &uri, &cmds[30..]).unwrap();
    let all: Vec<&Op> = ops.iter().collect();
    compare(&uri, &qcow2, &all, size).unwrap();
    // Reads do not dirty anything.
    qemu_io_on("raw", &uri, &["read 0 4M".to_owned(), "read 40M 8M".to_owned()]).unwrap();
    compare(&uri, &qcow2, &all, size).unwrap();
}

#[test]
fn clean_restart_keeps_the_exact_bitmap_and_recording_continues() {
    // Not a multiple of either granularity: the last granule is partial.
    let size = 48 * MIB + 4096 + 512;
    let builder = AgentBuilder::new().vm("vm1", &vm_yaml(size));
    let qcow2 = qcow2_with_bitmaps(builder.dir(), size).unwrap();
    let agent = builder.start().unwrap();
    let mut rng = Rng::from_env(0x0bac_0002);
    let mut ops = random_ops(&mut rng, 40, size);
    // The partial last granule, and the very first byte.
    ops.push(Op { cmd: format!("write -P 7 {} 100", size - 100), offset: size - 100, length: 100 });
    ops.push(Op { cmd: "write -P 8 0 1".to_owned(), offset: 0, length: 1 });
    let (first, second) = ops.split_at(ops.len() / 2);
    let cmds = |ops: &[Op]| ops.iter().map(|o| o.cmd.clone()).collect::<Vec<_>>();

    qemu_io_on("qcow2", qcow2.to_str().unwrap(), &cmds(first)).unwrap();
    qemu_io_on("raw", &agent.unix_uri("vm1/disk0"), &cmds(first)).unwrap();
    let before = compare(&agent.unix_uri("vm1/disk0"), &qcow2, &first.iter().collect::<Vec<_>>(), size).unwrap();

    // SIGTERM and start again on the same directory: the exact same maps.
    let agent = agent.restart().unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    assert_eq!(
        export_contexts(&uri).unwrap(),
        ["base:allocation", "qemu:dirty-bitmap:backup", "qemu:dirty-bitmap:fine"]
    );
    assert_eq!(maps(&uri), before, "maps changed across a clean restart");

    // The restarted agent keeps recording on top of the loaded bits.
    qemu_io_on("qcow2", qcow2.to_str().unwrap(), &cmds(second)).unwrap();
    qemu_io_on("raw", &uri, &cmds(second)).unwrap();
    compare(&uri, &qcow2, &ops.iter().collect::<Vec<_>>(), size).unwrap();

    // A second clean restart (now of a bitmap that was loaded, not created) is exact too.
    let before = maps(&uri);
    let agent = agent.restart().unwrap();
    assert_eq!(maps(&agent.unix_uri("vm1/disk0")), before, "maps changed across the second restart");
}

/// Both maps of the agent's disk.
fn maps(uri: &str) -> Vec<Vec<(u64, u64, u64)>> {
    ["backup", "fine"].iter().map(|n| map_extents(uri, &format!("qemu:dirty-bitmap:{n}")).unwrap()).collect()
}

/// Issues BLOCK_STATUS for `qemu:dirty-bitmap:NAME` at each `offset length
/// req_one` line of stdin (req_one 1: with NBD_CMD_FLAG_REQ_ONE); prints one JSON line per reply: the flat list of
/// (length, flags) pairs the server returned.
const QUERIES: &str = r#"
import json, nbd, sys
uri, context = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
assert h.can_meta_context(context)
for line in sys.stdin:
    offset, length, flags = map(int, line.split())
    got = []
    def cb(ctx, off, entries, err):
        assert ctx == context and off == offset, (ctx, off)
        got.extend(entries)
        return 0
    h.block_status(length, offset, cb, nbd.CMD_FLAG_REQ_ONE if flags else 0)
    print(json.dumps(got))
"#;

#[test]
fn block_status_at_unaligned_offsets_and_with_req_one_agrees_with_the_whole_map() {
    let size = 32 * MIB;
    let agent = AgentBuilder::new().vm("vm1", &vm_yaml(size)).start().unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    let mut rng = Rng::from_env(0x0bac_0003);
    let cmds: Vec<String> = random_ops(&mut rng, 40, size).into_iter().map(|o| o.cmd).collect();
    qemu_io_on("raw", &uri, &cmds).unwrap();
    for (name, g) in [("backup", BACKUP), ("fine", FINE)] {
        let context = format!("qemu:dirty-bitmap:{name}");
        // Per-512-byte-sector flags from the whole-disk map (itself checked against qemu above).
        let mut sectors = Vec::new();
        for (_, length, kind) in map_extents(&uri, &context).unwrap() {
            sectors.extend(std::iter::repeat_n(kind, (length / 512) as usize));
        }
        let mut queries = Vec::new();
        for i in 0..300 {
            // Offsets inside granules, near the end, lengths down to one sector; every third with REQ_ONE.
            let offset =
                if i % 10 == 0 { size - 512 * (1 + rng.below(2 * g / 512)) } else { rng.below(size / 512) * 512 };
            let length = (512 * (1 + rng.below(if i % 2 == 0 { 4 * g / 512 } else { 8192 }))).min(size - offset);
            queries.push((offset, length, if i % 3 == 0 { 1 } else { 0 }));
        }
        let input: String = queries.iter().map(|(o, l, f)| format!("{o} {l} {f}\n")).collect();
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", QUERIES, &uri, &context])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let replies: Vec<Vec<u64>> =
            String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(replies.len(), queries.len());
        for (&(offset, length, flags), reply) in queries.iter().zip(&replies) {
            let what = format!("{name}: BLOCK_STATUS {offset}+{length} flags {flags}: {reply:?}");
            assert!(!reply.is_empty() && reply.len() % 2 == 0, "{what}");
            if flags == 1 {
                assert_eq!(reply.len(), 2, "REQ_ONE: {what}");
            }
            let mut pos = offset;
            for pair in reply.chunks(2) {
                let (len, kind) = (pair[0], pair[1]);
                assert!(len > 0 && len % 512 == 0 && pos + len <= size, "{what}");
                let expected = &sectors[(pos / 512) as usize..((pos + len) / 512) as usize];
                assert!(expected.iter().all(|&k| k == kind), "{what}: {pos}+{len} is not all {kind}");
                pos += len;
            }
            // The reply ends at the request's end, or at a change of state before it.
            let end = offset + length;
            assert!(pos == end || (pos < end && sectors[(pos / 512) as usize] != reply[reply.len() - 1]), "{what}");
        }
    }
}
