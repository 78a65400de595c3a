//! Restore on another host: a first agent backs a disk up to the test Ceph
//! cluster and is killed with its state directory deleted (the host is
//! gone); a second agent, whose VM files name the disks with their images
//! absent, restores them with and without `--live` while real clients
//! (qemu-io, qemu-img) read and write, and the next backup stays
//! incremental. Random content is seeded (`TEST_SEED=N` replays a run).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::ceph::{ceph_shared, TestCeph};
use tests::{capture, qemu_io, run, Agent, AgentBuilder, Rng};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// First differing byte of two images, if any.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, expected: &[u8], actual: &[u8]) {
    if let Some(at) = first_difference(expected, actual) {
        panic!("{what}: differs at byte {at} (sizes {} / {})", expected.len(), actual.len());
    }
}

fn ok(agent: &Agent, job: &Value) -> Value {
    let id = job["id"].as_str().unwrap_or_else(|| panic!("no job id in {job}"));
    let done = agent.wait_job(id, Duration::from_secs(120)).unwrap();
    assert_eq!(done["result"], "success", "{done:#}\nagent log:\n{}", agent.log());
    done
}

fn holds_of(agent: &Agent, disk: &str, snap: &str) -> Vec<Value> {
    let list = agent.cli_json(&["backups", disk]).unwrap();
    let point = list["restore_points"].as_array().unwrap().iter().find(|p| p["snapshot"] == snap).cloned();
    point.unwrap_or_else(|| panic!("no restore point {snap}: {list:#}"))["holds"].as_array().unwrap().clone()
}

/// Applies a qemu-io `write -P PATTERN OFFSET LEN` to an expected image.
fn apply(image: &mut [u8], pattern: u8, offset: u64, len: u64) {
    image[offset as usize..(offset + len) as usize].fill(pattern);
}

#[test]
fn a_disk_restored_on_another_host_live_and_not_equals_its_snapshot_and_the_chain_goes_on() {
    let _ceph = ceph_shared();
    let rbd = TestCeph::new("rs");
    let image = rbd.image("restore");
    let target = format!("rbd:{image}");
    let mut rng = Rng::from_env(0x7e57_0001);
    let scratch = tempfile::tempdir().unwrap();

    // ---- the first host: a disk with data, a full and an incremental backup.
    let disk_yaml = |size: &str, backup: bool| {
        let backup =
            if backup { format!("    backup: {{target: \"{target}\", bitmap: backup}}\n") } else { String::new() };
        format!("  - name: disk0\n    image: file:../images/DISK.raw\n{size}    bitmaps: [{{name: backup, granularity: 64KiB}}]\n{backup}")
    };
    let vm1 = format!("name: vm1\ndisks:\n{}", disk_yaml("    size: 32MiB\n", true)).replace("DISK", "vm1-disk0");
    let mut first = AgentBuilder::new().extra(&rbd.agent_yaml()).vm("vm1", &vm1).start().unwrap();
    let uri = first.unix_uri("vm1/disk0");
    let mut content = vec![0u8; SIZE as usize];
    rng.fill(&mut content[..24 * MIB as usize]);
    let seed = scratch.path().join("seed.raw");
    std::fs::write(&seed, &content).unwrap();
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &seed.to_string_lossy(), &uri]).unwrap();
    let full = ok(&first, &first.cli_json(&["backup", "vm1/disk0", "--sync", "full"]).unwrap());
    let snap1 = full["summary"]["snapshot"].as_str().unwrap().to_owned();
    qemu_io(&uri, &["write -P 0x5a 4M 1M", "write -P 0x33 20M 64k"]).unwrap();
    let incr = ok(&first, &first.cli_json(&["backup", "vm1/disk0"]).unwrap());
    assert_eq!(incr["summary"]["sync"], "incremental", "{incr:#}");
    let snap2 = incr["summary"]["snapshot"].as_str().unwrap().to_owned();
    let at_snap2 = scratch.path().join("snap2.raw");
    capture(&uri, &at_snap2).unwrap();
    first.kill9().unwrap();
    drop(first); // its directory (state, bitmaps, images) is gone with it
                 // As if the first host died in a backup's copy: data written into the target's head after snap2.
    rbd.rbd(&["bench", "--io-type", "write", "--io-size", "64K", "--io-total", "64K", "--io-pattern", "seq", &image])
        .unwrap();

    // ---- the second host: the VM files name the disks, their images absent.
    let vm2 = format!("name: vm2\ndisks:\n{}", disk_yaml("", false)).replace("DISK", "vm2-disk0");
    let b = AgentBuilder::new().extra(&rbd.agent_yaml());
    let vm3 = vm2.replace("vm2", "vm3");
    let second = b.vm("vm1", &vm1.replace("    size: 32MiB\n", "")).vm("vm2", &vm2).vm("vm3", &vm3);
    let mut second = second.start().unwrap();
    let points = second.cli_json(&["backups", "vm1/disk0"]).unwrap();
    let names: Vec<&str> =
        points["restore_points"].as_array().unwrap().iter().filter_map(|p| p["snapshot"].as_str()).collect();
    assert_eq!(names, [snap1.as_str(), snap2.as_str()], "{points:#}");
    assert_eq!(points["incremental_possible"], false, "{points:#}");
    let refused = second.cli_fails(&["restore", "vm1/disk0", "--from", &target]).unwrap();
    assert!(refused.contains("snapshot"), "{refused}");
    let refused = second.cli_fails(&["restore", "vm1/nope", "--from", &format!("{target}@{snap2}")]).unwrap();
    assert!(refused.contains("nope"), "{refused}");
    let refused = second.cli_fails(&["restore", "vm1/disk0", "--from", &format!("{target}@no-such-snap")]).unwrap();
    assert!(refused.contains("no-such-snap"), "{refused}");

    // ---- live: served at once; a reader and a writer while the rest streams in.
    let from2 = format!("{target}@{snap2}");
    let job = second.cli_json(&["restore", "vm1/disk0", "--from", &from2, "--live", "--speed", "4MiB"]).unwrap();
    let uri = second.unix_uri("vm1/disk0");
    assert_eq!(holds_of(&second, "vm1/disk0", &snap2).len(), 1, "the snapshot is held while it is a parent");
    let mut expected = read(&at_snap2);
    let during = scratch.path().join("during.raw");
    capture(&uri, &during).unwrap();
    assert_same("the live-restored disk read during its stream", &expected, &read(&during));
    qemu_io(&uri, &["write -P 0x77 1M 64k", "write -P 0x78 30M 64k", "read -P 0x5a 4M 1M"]).unwrap();
    apply(&mut expected, 0x77, MIB, 64 << 10);
    apply(&mut expected, 0x78, 30 * MIB, 64 << 10);
    let running = second.cli_json(&["job", "show", job["id"].as_str().unwrap()]).unwrap();
    assert_ne!(running["state"], "concluded", "the stream ended before the reader and writer ran: {running:#}");
    let done = ok(&second, &job);
    assert_eq!(done["kind"], "restore");
    assert_eq!(
        (&done["summary"]["live"], &done["summary"]["chain_bitmap"]),
        (&Value::Bool(true), &Value::from("backup")),
        "{done:#}"
    );
    assert!(holds_of(&second, "vm1/disk0", &snap2).is_empty(), "the hold outlived the stream");
    let after = scratch.path().join("after.raw");
    capture(&uri, &after).unwrap();
    assert_same("the live-restored disk after its stream (snapshot plus the writes)", &expected, &read(&after));

    // ---- the chain goes on with a bitmap of its own (a copy of the disk still alive elsewhere
    // carries the snapshot's identity): the next backup writes the two granules written since the
    // restore and rewrites what the head of the target gained after the snapshot.
    let info = second.cli_json(&["bitmap", "list", "vm1/disk0"]).unwrap();
    let uuid = info[0]["uuid"].as_str().unwrap_or_else(|| panic!("{info:#}")).to_owned();
    let meta = rbd.meta(&image);
    assert!(meta.contains_key(&format!("rbdsync.continues.{uuid}")), "no continuation record for {uuid}: {meta:#?}");
    let snap2_meta: Value = serde_json::from_str(&meta[&format!("rbdsync.snap.{snap2}")]).unwrap();
    assert_ne!(snap2_meta["bitmap_uuid"], uuid.as_str(), "the restored bitmap took the snapshot's uuid");
    let next = ok(&second, &second.cli_json(&["backup", "vm1/disk0"]).unwrap());
    assert_eq!(next["summary"]["sync"], "incremental", "{next:#}");
    let written = next["summary"]["bytes_written"].as_u64().unwrap();
    assert!((3 * 64 * 1024..=2 * 64 * 1024 + 4 * MIB).contains(&written), "{next:#}");
    let snap3 = next["summary"]["snapshot"].as_str().unwrap();
    let exported = scratch.path().join("snap3.raw");
    rbd.export(&format!("{image}@{snap3}"), &exported);
    assert_same("the first backup after the restore", &expected, &read(&exported));

    // ---- not live, from the older snapshot, onto a disk without a backup target.
    let from1 = format!("{target}@{snap1}");
    let job = second.cli_json(&["restore", "vm2/disk0", "--from", &from1, "--wait"]).unwrap();
    assert_eq!(job["result"], "success", "{job:#}");
    assert_eq!(job["summary"]["live"], false, "{job:#}");
    assert!(job["summary"]["chain_note"].as_str().is_some_and(|n| n.contains("no backup target")), "{job:#}");
    let restored = scratch.path().join("vm2.raw");
    capture(&second.unix_uri("vm2/disk0"), &restored).unwrap();
    let exported = scratch.path().join("snap1.raw");
    rbd.export(&format!("{image}@{snap1}"), &exported);
    assert_same("the restored disk", &read(&exported), &read(&restored));
    assert!(holds_of(&second, "vm1/disk0", &snap1).is_empty(), "the hold outlived the restore");

    // ---- a served disk is never restored over.
    let refused = second.cli_fails(&["restore", "vm2/disk0", "--from", &from1]).unwrap();
    assert!(refused.contains("served"), "{refused}");

    // ---- an agent killed mid-restore keeps the half-copied disk hidden; restore again finishes it.
    let job = second.cli_json(&["restore", "vm3/disk0", "--from", &from1, "--speed", "4MiB"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let hidden = run("nbdinfo", &[&second.unix_uri("vm3/disk0")]);
    assert!(hidden.is_err(), "a client found the disk by name before its restore served it: {hidden:?}");
    let running = second.cli_json(&["job", "show", job["id"].as_str().unwrap()]).unwrap();
    assert_ne!(running["state"], "concluded", "{running:#}");
    second.kill9().unwrap();
    let second = second.respawn().unwrap();
    let resumed = second.cli_json(&["restore", "vm3/disk0", "--from", &from1, "--wait"]).unwrap();
    assert_eq!(resumed["result"], "success", "the restore did not resume: {resumed:#}\n{}", second.log());
    capture(&second.unix_uri("vm3/disk0"), &restored).unwrap();
    assert_same("the restore finished after a restart", &read(&exported), &read(&restored));
    assert!(holds_of(&second, "vm1/disk0", &snap1).is_empty(), "the hold outlived the restore");
}
