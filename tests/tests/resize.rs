//! Online resize: a disk grows while a real NBD client (nbdsh) is connected
//! and a full backup to the test Ceph cluster runs. The connected client
//! keeps its size and its writes; a new client sees the new size and writes
//! past the old end; the bitmap holds exactly the writes since the backup's
//! point in time; the next backup grows the RBD target, stays incremental,
//! and equals the disk; a restart with the old `size:` in the VM file
//! serves the grown disk with its bitmap intact. Random content is seeded
//! (`TEST_SEED=N` replays a run).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tests::ceph::{ceph_shared, TestCeph};
use tests::{capture, map_extents, qemu_io, run, stdout, AgentBuilder, EventLog, Rng};

const MIB: u64 = 1 << 20;
const GRAN: u64 = 64 << 10;
/// Not granule-aligned: the last granule lies partly past the old end.
const OLD: u64 = 32 * MIB + 8192;
const NEW: u64 = 48 * MIB;

/// A child process killed if the test fails before it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The dirty granules of `context` on the export at `uri`, as byte ranges.
fn dirty(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let extents = map_extents(uri, context).unwrap();
    extents.into_iter().filter(|e| e.2 != 0).map(|e| (e.0, e.1)).collect()
}

#[test]
fn a_disk_grows_under_a_connected_client_and_a_running_backup_and_the_chain_stays_incremental() {
    let _ceph = ceph_shared();
    let rbd = TestCeph::new("rz");
    let image = rbd.image("resize");
    let target = format!("rbd:{image}");
    let mut rng = Rng::from_env(0x7e57_0012);
    let scratch = tempfile::tempdir().unwrap();
    let vm = format!(
        "name: vm1\ndisks:\n  - name: disk0\n    image: file:../images/vm1-disk0.raw\n    size: {OLD}\n    \
         bitmaps: [{{name: backup, granularity: 64KiB}}]\n    backup: {{target: \"{target}\", bitmap: backup}}\n"
    );
    let agent = AgentBuilder::new().extra(&rbd.agent_yaml()).vm("vm1", &vm).start().unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    let mut content = vec![0u8; OLD as usize];
    rng.fill(&mut content[..24 * MIB as usize]);
    let seed = scratch.path().join("seed.raw");
    std::fs::write(&seed, &content).unwrap();
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &seed.to_string_lossy(), &uri]).unwrap();

    // A client that stays connected across the resize: one write before, one after.
    let go = scratch.path().join("go");
    let script = format!(
        "import os, time\n\
         h.pwrite(b'\\x41' * 4096, {a})\nh.flush()\nprint('ready', flush=True)\n\
         while not os.path.exists({go:?}): time.sleep(0.02)\n\
         h.pwrite(b'\\x42' * 4096, {b})\nh.flush()\nprint('size', h.get_size(), flush=True)\n",
        a = MIB,
        b = 2 * MIB,
        go = go.to_string_lossy(),
    );
    // nbdsh under the system Python (python3-libnbd), as `tests::nbdsh` runs it.
    let mut client = Command::new("/usr/bin/python3")
        .args(["-m", "nbd", "-u", &uri, "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let mut client = KillOnDrop(client);
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    content[MIB as usize..(MIB + 4096) as usize].fill(0x41);

    // A full backup, slow enough to still run across the resize.
    let backup = agent.cli_json(&["backup", "vm1/disk0", "--sync", "full", "--speed", "4MiB"]).unwrap();
    let id = backup["id"].as_str().unwrap().to_owned();

    // Bad sizes are refused with a reason.
    let shrink = agent.cli_fails(&["disk", "resize", "vm1/disk0", "16MiB"]).unwrap();
    assert!(shrink.contains("shrinking is not supported"), "{shrink}");
    let odd = agent.cli_fails(&["disk", "resize", "vm1/disk0", "40000100"]).unwrap();
    assert!(odd.contains("multiple of 512"), "{odd}");
    let huge = agent.cli_fails(&["disk", "resize", "vm1/disk0", &(1u64 << 59).to_string()]).unwrap();
    assert!(huge.contains("MiB of memory"), "{huge}");
    let absurd = agent.cli_fails(&["disk", "resize", "vm1/disk0", &(1u64 << 62).to_string()]).unwrap();
    assert!(absurd.contains("larger than"), "{absurd}");

    let events = EventLog::follow(&agent).unwrap();
    let resized = agent.cli_json(&["disk", "resize", "vm1/disk0", "48MiB"]).unwrap();
    assert_eq!(resized["size"], NEW, "{resized:#}");
    events
        .wait_for(Duration::from_secs(10), |e| {
            e["type"] == "disk"
                && e["disk"] == "vm1/disk0"
                && e["change"] == "resized"
                && e["from"] == OLD
                && e["size"] == NEW
        })
        .unwrap();
    drop(events.stop());
    let during = agent.cli_json(&["job", "show", &id]).unwrap();
    assert_eq!(during["state"], "running", "the backup must still run across the resize: {during:#}");

    // The connected client keeps its size and goes on writing.
    std::fs::write(&go, b"").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), format!("size {OLD}"));
    assert!(client.0.wait().unwrap().success());
    // A new client sees the new size and writes past the old end, first inside the last old
    // granule, which the running backup still has to copy.
    assert_eq!(stdout("nbdinfo", &["--size", &uri]).unwrap().trim(), NEW.to_string());
    let writes = [
        format!("write -P 0x76 {} 4k", OLD + 8192),
        "write -P 0x77 40M 64k".into(),
        format!("write -P 0x78 {} 4k", NEW - 4096),
    ];
    qemu_io(&uri, &writes.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let still = agent.cli_json(&["job", "show", &id]).unwrap();
    assert_eq!(still["state"], "running", "the backup must still run after the writes past the old end: {still:#}");

    let done = agent.wait_job(&id, Duration::from_secs(120)).unwrap();
    assert_eq!(done["result"], "success", "{done:#}\nagent log:\n{}", agent.log());
    let s1 = done["summary"]["snapshot"].as_str().unwrap().to_owned();
    // The backup is the point in time it started at: the old size, the first write, not the later ones.
    let s1_file = scratch.path().join("s1.raw");
    rbd.export(&format!("{image}@{s1}"), &s1_file);
    assert!(std::fs::read(&s1_file).unwrap() == content, "the full backup is not the disk as it was at its start");
    let record: Value = serde_json::from_str(&rbd.meta(&image)[&format!("rbdsync.snap.{s1}")]).unwrap();
    assert_eq!(record["size"], OLD, "the snapshot record has the point in time's size: {record:#}");

    // Exactly the writes since the point in time are dirty, past the old end too.
    let want = vec![(2 * MIB, GRAN), (32 * MIB, GRAN), (40 * MIB, GRAN), (NEW - GRAN, GRAN)];
    assert_eq!(dirty(&uri, "qemu:dirty-bitmap:backup"), want);
    let bitmaps = agent.cli_json(&["bitmap", "list", "vm1/disk0"]).unwrap();
    assert_eq!(bitmaps[0]["consistent"], true, "{bitmaps:#}");
    assert_eq!(bitmaps[0]["dirty_bytes"], 4 * GRAN, "{bitmaps:#}");

    // The next backup grows the target and stays incremental.
    let incr = agent.cli_json(&["backup", "vm1/disk0"]).unwrap();
    let incr = agent.wait_job(incr["id"].as_str().unwrap(), Duration::from_secs(120)).unwrap();
    assert_eq!(incr["result"], "success", "{incr:#}\nagent log:\n{}", agent.log());
    assert_eq!(incr["summary"]["sync"], "incremental", "{incr:#}");
    assert!(incr["summary"]["bytes_written"].as_u64().unwrap() <= 4 * GRAN, "{incr:#}");
    assert_eq!(rbd.size(&image), NEW);
    let s2 = incr["summary"]["snapshot"].as_str().unwrap().to_owned();
    let (disk_file, s2_file) = (scratch.path().join("disk.raw"), scratch.path().join("s2.raw"));
    capture(&uri, &disk_file).unwrap();
    rbd.export(&format!("{image}@{s2}"), &s2_file);
    assert!(std::fs::read(&disk_file).unwrap() == std::fs::read(&s2_file).unwrap(), "backup after the resize differs");
    assert_eq!(dirty(&uri, "qemu:dirty-bitmap:backup"), vec![]);

    // A restart with the old size still in the VM file serves the grown disk, its bitmap trusted.
    qemu_io(&uri, &["write -P 0x79 44M 4k"]).unwrap();
    let agent = agent.restart().unwrap();
    assert_eq!(stdout("nbdinfo", &["--size", &uri]).unwrap().trim(), NEW.to_string());
    let bitmaps: Value = agent.cli_json(&["bitmap", "list", "vm1/disk0"]).unwrap();
    assert_eq!(bitmaps[0]["consistent"], true, "{bitmaps:#}\n{}", agent.log());
    assert_eq!(dirty(&uri, "qemu:dirty-bitmap:backup"), vec![(44 * MIB, GRAN)]);
}

/// After a resize the target of an incremental backup must read as the disk does past the
/// latest snapshot's size, whatever its head holds there (an unfinished backup of a copy of
/// the disk, say, left data past that size): the backup zeroes that range first.
#[test]
fn the_first_backup_after_a_resize_zeroes_what_the_target_head_holds_past_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.raw");
    let vm = format!(
        "name: vm1\ndisks:\n  - name: disk0\n    image: file:../images/vm1-disk0.raw\n    size: 8MiB\n    \
         bitmaps: [{{name: backup, granularity: 64KiB}}]\n    backup: {{target: \"file:{}\", bitmap: backup}}\n",
        target.display()
    );
    let agent = AgentBuilder::new().vm("vm1", &vm).start().unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    qemu_io(&uri, &["write -P 0x11 0 1M"]).unwrap();
    let full = agent.cli_json(&["backup", "vm1/disk0", "--sync", "full", "--wait"]).unwrap();
    assert_eq!(full["result"], "success", "{full:#}");
    agent.cli_json(&["disk", "resize", "vm1/disk0", "12MiB"]).unwrap();
    qemu_io(&uri, &["write -P 0x22 9M 4k"]).unwrap();
    // The head of the target grown and written behind the agent's back past the snapshot's size.
    {
        use std::os::unix::fs::FileExt;
        let head = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        head.set_len(12 * MIB).unwrap();
        head.write_all_at(&[0xee; 65536], 10 * MIB).unwrap();
    }
    let incr = agent.cli_json(&["backup", "vm1/disk0", "--wait"]).unwrap();
    assert_eq!(incr["result"], "success", "{incr:#}\n{}", agent.log());
    assert_eq!(incr["summary"]["sync"], "incremental", "{incr:#}");
    let snap = incr["summary"]["snapshot"].as_str().unwrap();
    let against = format!("file:{}@{snap}", target.display());
    let v = agent.cli_json(&["verify", "vm1/disk0", "--against", &against, "--wait"]).unwrap();
    assert_eq!(v["result"], "success", "the backup differs from the disk: {v:#}");
}

/// A disk back at a size from before a resize (restored from an older snapshot) backs up into
/// its own, larger target: the head is sized to the disk, the older snapshots stay.
#[test]
fn a_disk_smaller_than_its_own_target_backs_up_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.raw");
    let vm = |size: &str, image: &str| {
        format!(
            "name: vm1\ndisks:\n  - name: disk0\n    image: file:{image}\n    size: {size}\n    \
             bitmaps: [{{name: backup, granularity: 64KiB}}]\n    backup: {{target: \"file:{}\", bitmap: backup}}\n",
            target.display()
        )
    };
    let disk = dir.path().join("disk0.raw");
    let agent = AgentBuilder::new().vm("vm1", &vm("8MiB", &disk.to_string_lossy())).start().unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    qemu_io(&uri, &["write -P 0x11 0 1M"]).unwrap();
    agent.json(&["backup", "vm1/disk0", "--sync", "full", "--wait"]);
    agent.json(&["disk", "resize", "vm1/disk0", "12MiB"]);
    qemu_io(&uri, &["write -P 0x22 10M 64k"]).unwrap();
    let s2 = agent.json(&["backup", "vm1/disk0", "--wait"]);
    assert_eq!(s2["summary"]["sync"], "incremental", "{s2:#}");

    // The disk back at its old size (as restored from the first snapshot).
    let mut agent = agent;
    agent.stop().unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 * MIB).unwrap();
    let agent = agent.respawn().unwrap();
    // Its bitmap starts afresh, as a restored disk's does.
    agent.json(&["bitmap", "remove", "vm1/disk0", "backup"]);
    agent.json(&["bitmap", "add", "vm1/disk0", "backup"]);
    let full = agent.json(&["backup", "vm1/disk0", "--sync", "full", "--wait"]);
    assert_eq!(full["result"], "success", "{full:#}\n{}", agent.log_tail());
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 8 * MIB, "the target's head follows the disk");
    let snap = full["summary"]["snapshot"].as_str().unwrap();
    let v = agent.json(&["verify", "vm1/disk0", "--against", &format!("file:{}@{snap}", target.display()), "--wait"]);
    assert_eq!(v["result"], "success", "{v:#}");
    let points = agent.json(&["backups", "vm1/disk0"]);
    assert_eq!(points["restore_points"].as_array().unwrap().len(), 3, "{points:#}");
}
