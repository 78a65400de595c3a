//! The NBD export driven by the real clients users run: qemu-io, qemu-img,
//! nbdinfo, nbdcopy and nbdsh (libnbd), over TCP and Unix sockets.

use tests::{nbdsh, qemu_io, run, stdout, AgentBuilder, Rng};

#[test]
fn qemu_io_patterns_round_trip_over_tcp_and_unix() {
    let agent = AgentBuilder::new().simple_vm("vm1", "64MiB").start().unwrap();
    let tcp = agent.tcp_uri("vm1/disk0");
    let unix = agent.unix_uri("vm1/disk0");
    qemu_io(&tcp, &["write -P 0xaa 0 1M", "write -P 0xbb 1M 64k", "write -P 0xcc 63M 1M", "flush"]).unwrap();
    qemu_io(&unix, &["read -P 0xaa 0 1M", "read -P 0xbb 1M 64k", "read -P 0 2M 1M", "read -P 0xcc 63M 1M"]).unwrap();
    // FUA writes and unaligned (sub-sector) writes go through qemu's read-modify-write.
    qemu_io(&unix, &["write -f -P 0x11 5M 4k", "write -P 0x22 6M 100"]).unwrap();
    qemu_io(&tcp, &["read -P 0x11 5M 4k", "read -P 0x22 6M 100", "read -P 0 6291556 412"]).unwrap();
    // A mismatching pattern is detected, so the checks above can fail.
    assert!(qemu_io(&tcp, &["read -P 0x99 0 4k"]).is_err());
}

#[test]
fn qemu_img_convert_in_and_out_compares_equal() {
    let agent = AgentBuilder::new().simple_vm("vm1", "32MiB").start().unwrap();
    let src = agent.dir().join("src.raw");
    let back = agent.dir().join("back.raw");
    let mut data = vec![0u8; 32 << 20];
    let mut rng = Rng::from_env(0x51ce);
    for _ in 0..64 {
        let off = rng.below(32 << 20 >> 16) << 16;
        rng.fill(&mut data[off as usize..off as usize + 16384]);
    }
    std::fs::write(&src, &data).unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri]).unwrap();
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &agent.tcp_uri("vm1/disk0"), back.to_str().unwrap()])
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &uri]).unwrap();
    let info = stdout("qemu-img", &["info", "--output=json", &uri]).unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 32 << 20);
}

#[test]
fn nbdinfo_lists_exports_and_reports_size_flags_and_block_sizes() {
    let agent = AgentBuilder::new()
        .simple_vm("vm1", "16MiB")
        .vm("vm2", "name: vm2\ndisks:\n  - {name: data, image: file:../images/vm2.raw, size: 8MiB, read_only: true}\n")
        .start()
        .unwrap();
    let list = stdout("nbdinfo", &["--list", "--json", &format!("nbd://{}", agent.tcp)]).unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let names: Vec<&str> = exports.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["vm1/disk0", "vm2/data"]);
    assert_eq!(exports[0]["export-size"], 16 << 20);
    assert_eq!(exports[1]["is_read_only"], true);
    assert_eq!(exports[0]["is_read_only"], false);
    assert_eq!(exports[0]["can_trim"], true);
    assert_eq!(exports[0]["can_zero"], true);
    assert_eq!(exports[0]["can_flush"], true);
    assert_eq!(exports[0]["can_fua"], true);
    assert_eq!(exports[0]["can_multi_conn"], true);
    assert_eq!(exports[0]["block_size_minimum"], 512);
    assert_eq!(exports[0]["block_size_maximum"], 32 << 20);
    let contexts = exports[0]["contexts"].as_array().unwrap();
    assert!(contexts.iter().any(|c| c == "base:allocation"), "{contexts:?}");
    // A write to the read-only export is refused with EPERM.
    let err = qemu_io(&agent.unix_uri("vm2/data"), &["write -P 1 0 4k"]).unwrap_err().to_string();
    assert!(
        err.contains("Operation not permitted") || err.contains("read-only") || err.contains("Permission"),
        "{err}"
    );
}

#[test]
fn nbdinfo_map_shows_real_holes_and_data() {
    let agent = AgentBuilder::new().simple_vm("vm1", "8MiB").start().unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    qemu_io(&uri, &["write -P 1 1M 1M", "write -P 2 4M 64k", "write -z -u 4M 64k"]).unwrap();
    let map = stdout("nbdinfo", &["--map", "--json", &uri]).unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let runs: Vec<(u64, u64, u64)> = map
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    assert_eq!(runs, vec![(0, 1 << 20, 3), (1 << 20, 1 << 20, 0), (2 << 20, 6 << 20, 3)], "{runs:?}");
}

#[test]
fn nbdcopy_round_trips_a_256_mib_image_with_holes() {
    let agent = AgentBuilder::new().simple_vm("vm1", "256MiB").start().unwrap();
    let src = agent.dir().join("src.raw");
    let back = agent.dir().join("back.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(256 << 20).unwrap();
    let mut rng = Rng::from_env(0xc0b1);
    let mut block = vec![0u8; 1 << 20];
    use std::os::unix::fs::FileExt;
    for i in 0..256u64 {
        if i % 4 == 1 {
            rng.fill(&mut block);
            f.write_all_at(&block, i << 20).unwrap();
        }
    }
    drop(f);
    let uri = agent.tcp_uri("vm1/disk0");
    run("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).unwrap();
    run("nbdcopy", &[&agent.unix_uri("vm1/disk0"), back.to_str().unwrap()]).unwrap();
    run("cmp", &[src.to_str().unwrap(), back.to_str().unwrap()]).unwrap();
    // Holes stayed holes on the export: a quarter of the image is data.
    let map = stdout("nbdinfo", &["--map", "--totals", &uri]).unwrap();
    let data_line = map.lines().find(|l| l.contains("data")).unwrap_or_default().to_owned();
    let bytes: u64 = data_line.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(bytes, 64 << 20, "{map}");
}

#[test]
fn nbdsh_errors_leave_the_connection_usable() {
    let agent = AgentBuilder::new().simple_vm("vm1", "1MiB").start().unwrap();
    let script = r#"
import errno
h.set_strict_mode(0)
def expect(fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == errno.errorcode[code], (e.errno, e.string)
        return
    raise AssertionError("no error")
size = h.get_size()
expect(lambda: h.pread(4096, size - 512), errno.EINVAL)        # read past the end
expect(lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC)       # write past the end
expect(lambda: h.pread(512, 100), errno.EINVAL)                 # unaligned offset
expect(lambda: h.pread(100, 0), errno.EINVAL)                   # unaligned length
expect(lambda: h.zero(512, size), errno.ENOSPC)                 # zero past the end
expect(lambda: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)  # flag not valid for READ
h.pwrite(b"ok" * 256, 0)
assert h.pread(512, 0) == b"ok" * 256
h.zero(4096, 4096)
h.trim(4096, 8192)
h.flush()
h.cache(4096, 0)
h.pwrite(b"\x01" * 512, 0, nbd.CMD_FLAG_FUA)
assert h.pread(512, 0) == b"\x01" * 512
print("ok")
"#;
    assert_eq!(nbdsh(&agent.unix_uri("vm1/disk0"), script).unwrap().trim(), "ok");
}

#[test]
fn many_clients_write_distinct_regions_concurrently() {
    let agent = AgentBuilder::new().simple_vm("vm1", "64MiB").start().unwrap();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let uri = if i % 2 == 0 { agent.tcp_uri("vm1/disk0") } else { agent.unix_uri("vm1/disk0") };
            std::thread::spawn(move || {
                let cmd = format!("aio_write -P {} {}M 4M", i + 1, i * 8);
                qemu_io(&uri, &[&cmd, "aio_flush"]).unwrap();
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    let checks: Vec<String> = (0..8).map(|i| format!("read -P {} {}M 4M", i + 1, i * 8)).collect();
    let refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    qemu_io(&agent.unix_uri("vm1/disk0"), &refs).unwrap();
}
