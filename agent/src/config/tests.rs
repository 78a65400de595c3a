//! Unit tests for the configuration layer: the shipped example, defaults, every error with
//! its file, line, column and key, path resolution, the value parsers, and no-panic proptests.

use std::fs;

use proptest::prelude::*;

use super::*;

const VM_FILE: &str = "vms.d/vm1.yaml";

fn vm_err(yaml: &str) -> String {
    VmConfig::from_str(yaml, Path::new(VM_FILE)).expect_err("should be rejected").to_string()
}

fn agent_err(yaml: &str) -> String {
    AgentConfig::from_str(yaml, Path::new("agent.yaml")).expect_err("should be rejected").to_string()
}

/// A VM file with one disk; `extra` is appended to the disk's mapping (lines 5 onwards).
fn disk_yaml(extra: &str) -> String {
    format!("name: vm1\ndisks:\n  - name: disk0\n    image: rbd:pool/vm1-disk0\n{extra}")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("write test file");
    path
}

#[test]
fn embedded_example_parses() {
    let config = AgentConfig::embedded_default();
    assert!(check_name(&config.node).is_ok(), "node {:?}", config.node);
    assert_eq!(config.state_dir, Path::new("/var/lib/rbdsync"));
    assert_eq!(config.vms_dir.as_deref(), Some(Path::new("/etc/rbdsync/vms.d")));
    let listen: Vec<String> = config.nbd.listen.iter().map(ToString::to_string).collect();
    assert_eq!(listen, ["127.0.0.1:10809", "unix:/run/rbdsync/nbd.sock"]);
    assert_eq!(config.control, ControlConfig::default());
    assert_eq!(config.metrics.map(|m| m.listen.to_string()).as_deref(), Some("127.0.0.1:9860"));
    assert_eq!(config.ceph, None);
    assert_eq!(config.source, Path::new(EMBEDDED_SOURCE));
    let vm = &config.vms[0];
    assert_eq!((vm.name.as_str(), vm.source.as_path()), ("demo", Path::new(EMBEDDED_SOURCE)));
    let expected = DiskConfig {
        name: "disk0".into(),
        image: ImageUri::file("/var/lib/rbdsync/images/demo-disk0.raw"),
        size: Some(GIB),
        read_only: false,
        bitmaps: vec![BitmapConfig::new("backup", 64 * KIB, true).expect("valid bitmap")],
        intent_region: DEFAULT_INTENT_REGION,
        backup: Some(BackupConfig {
            target: "file:/var/lib/rbdsync/backups/demo-disk0".parse().expect("valid URI"),
            bitmap: Some("backup".into()),
            keep: Some(7),
        }),
    };
    assert_eq!(vm.disks, [expected]);
}

/// The examples in PRODUCT.md, whose keys are fixed.
#[test]
fn product_examples_parse() {
    let agent = r#"node: host-a
state_dir: /var/lib/rbdsync            # bitmaps, job records, local overlays
vms_dir: /etc/rbdsync/vms.d            # one YAML file per VM
nbd:
  listen: ["0.0.0.0:10809", "unix:/run/rbdsync/nbd.sock"]
  tls: {mode: required, cert: server.pem, key: server-key.pem, client_ca: ca.pem}
control: {listen: ["unix:/run/rbdsync/control.sock"]}
metrics: {listen: "127.0.0.1:9860"}
ceph:    {conf: /etc/ceph/ceph.conf, client: admin, keyring: /etc/ceph/ceph.client.admin.keyring}
"#;
    let config = AgentConfig::from_str(agent, Path::new("/etc/rbdsync/agent.yaml")).expect("valid");
    assert_eq!(config.node, "host-a");
    assert_eq!(config.nbd.tls.expect("tls").cert, Path::new("/etc/rbdsync/server.pem"));
    let vm = r#"name: vm1
disks:
  - name: disk0
    image: file:/var/lib/rbdsync/images/vm1-disk0.raw
    size: 20GiB                  # created sparse if missing
    bitmaps: [{name: backup, granularity: 64KiB}]
    backup: {target: "rbd:backup/vm1-disk0", bitmap: backup, keep: 7}
"#;
    let vm = VmConfig::from_str(vm, Path::new("/etc/rbdsync/vms.d/vm1.yaml")).expect("valid");
    assert_eq!(vm.disks[0].size, Some(20 * GIB));
    assert_eq!(vm.disks[0].backup.as_ref().map(|b| b.target.to_string()).as_deref(), Some("rbd:backup/vm1-disk0"));
}

#[test]
fn empty_agent_yaml_gets_defaults() {
    let config =
        AgentConfig::from_str("# nothing\n", Path::new("/etc/rbdsync/agent.yaml")).expect("empty config is valid");
    assert_eq!(config.state_dir, Path::new(DEFAULT_STATE_DIR));
    assert_eq!(config.vms_dir, None);
    assert!(config.vms.is_empty());
    assert_eq!(config.nbd, NbdConfig::default());
    assert_eq!(config.nbd.listen, [ListenAddr::Tcp("127.0.0.1:10809".parse().expect("addr"))]);
    assert_eq!(config.nbd.max_connections, 256);
    assert_eq!(config.nbd.max_payload, 32 * 1024 * 1024);
    assert_eq!(config.nbd.handshake_timeout_secs, 10);
    assert_eq!(config.control.listen, [ListenAddr::Unix("/run/rbdsync/control.sock".into())]);
    assert_eq!((config.metrics, config.ceph), (None, None));
}

#[test]
fn section_defaults_apply() {
    let yaml = "nbd: {tls: {cert: c.pem, key: k.pem}, max_payload: 1MiB}\nceph: {}\n";
    let config = AgentConfig::from_str(yaml, Path::new("/etc/rbdsync/agent.yaml")).expect("valid");
    let tls = config.nbd.tls.expect("tls section");
    assert_eq!((tls.mode, tls.client_ca), (TlsMode::Required, None));
    assert_eq!(config.nbd.max_payload, 1024 * 1024);
    let ceph = config.ceph.expect("ceph section");
    assert_eq!(ceph.conf, Path::new("/etc/ceph/ceph.conf"));
    assert_eq!((ceph.client.as_str(), ceph.keyring), ("admin", None));
    let vm = VmConfig::from_str(&disk_yaml("    bitmaps: [{name: b}]\n"), Path::new(VM_FILE)).expect("valid VM");
    let disk = &vm.disks[0];
    assert_eq!((disk.size, disk.read_only, &disk.backup), (None, false, &None));
    assert_eq!(disk.bitmaps[0], BitmapConfig::new("b", DEFAULT_GRANULARITY, true).expect("ok"));
}

#[test]
fn bad_size_names_file_line_column_and_key() {
    let yaml = "# vm1\nname: vm1\ndisks:\n  - name: disk0\n    image: file:/var/lib/x.raw\n    \
                read_only: false\n    size: 20XB\n";
    assert_eq!(vm_err(yaml), r#"vms.d/vm1.yaml:7:11: disks[0].size: bad size "20XB" (expected e.g. 20GiB)"#);
}

#[test]
fn vm_file_errors_name_line_and_key() {
    let cases = [
        // Unknown keys, at the key.
        ("    sise: 1\n", "5:5: disks[0].sise: unknown field `sise`, expected one of name, image, size, read_only, bitmaps, intent_region, backup"),
        ("    value: 1\n", "5:5: disks[0].value: unknown field `value`, expected one of name, image, size, read_only, bitmaps, intent_region, backup"),
        ("    bitmaps: [{name: b, granularity: 64K, enable: true}]\n", "5:43: disks[0].bitmaps[0].enable: unknown field `enable`, expected one of name, granularity, enabled"),
        // Sizes.
        ("    size: 1000\n", "5:11: disks[0].size: size 1000 is not a multiple of 512 bytes"),
        ("    size: 0\n", "5:11: disks[0].size: size must be greater than 0"),
        ("    size: -5\n", r#"5:11: disks[0].size: bad size "-5" (expected e.g. 20GiB)"#),
        ("    size: 1.5GiB\n", r#"5:11: disks[0].size: bad size "1.5GiB" (fractions are not supported; use a smaller unit, e.g. 1536MiB)"#),
        ("    size: 99999999TiB\n", r#"5:11: disks[0].size: size "99999999TiB" is too large"#),
        // Granularity.
        ("    bitmaps:\n      - name: b\n        granularity: 3KiB\n", "7:22: disks[0].bitmaps[0].granularity: bad granularity 3KiB (expected a power of two from 4KiB to 64MiB)"),
        ("    bitmaps: [{name: b, granularity: 128MiB}]\n", "5:38: disks[0].bitmaps[0].granularity: bad granularity 128MiB (expected a power of two from 4KiB to 64MiB)"),
        ("allow: [\"10.0.0.0/33\"]\n", r#"5:9: allow[0]: bad allow entry "10.0.0.0/33" (expected unix, cn:NAME, an IP address or ADDR/PREFIX)"#),
        ("allow: [unix, \"cn:\"]\n", r#"5:15: allow[1]: bad allow entry "cn:" (expected unix, cn:NAME, an IP address or ADDR/PREFIX)"#),
        ("    intent_region: 32KiB\n", "5:20: disks[0].intent_region: bad intent_region 32KiB (expected 0 or a power of two from 64KiB to 64MiB)"),
        ("    intent_region: 96MiB\n", "5:20: disks[0].intent_region: bad intent_region 96MiB (expected 0 or a power of two from 64KiB to 64MiB)"),
        // Duplicates, at the second one, naming the first.
        ("  - name: disk0\n    image: rbd:pool/other\n", r#"5:11: disks[1].name: duplicate disk name "disk0" (first defined at vms.d/vm1.yaml:3:11)"#),
        ("    bitmaps:\n      - name: b\n      - {name: b, enabled: false}\n", r#"7:16: disks[0].bitmaps[1].name: duplicate bitmap name "b" (first defined at vms.d/vm1.yaml:6:15)"#),
        ("  - name: disk1\n    image: rbd:pool/vm1-disk0\n", r#"6:12: disks[1].image: duplicate image "rbd:pool/vm1-disk0" (first defined at vms.d/vm1.yaml:4:12)"#),
        ("    backup: {target: \"rbd:pool/vm1-disk0\"}\n", r#"5:22: disks[0].backup.target: duplicate image "rbd:pool/vm1-disk0" (first defined at vms.d/vm1.yaml:4:12)"#),
        // Backups.
        ("    backup: {target: rbd:backup/x@s1}\n", r#"5:22: disks[0].backup.target: backup target "rbd:backup/x@s1" must not name a snapshot (each backup creates one)"#),
        ("    bitmaps: [{name: a}]\n    backup: {target: rbd:backup/x, bitmap: b}\n", r#"6:44: disks[0].backup.bitmap: no bitmap "b" on this disk (declared: a)"#),
        ("    backup: {target: rbd:backup/x, keep: 0}\n", "5:42: disks[0].backup.keep: keep must be at least 1 (omit it to keep every backup)"),
        ("    backup: {target: \"file:\"}\n", r#"5:22: disks[0].backup.target: bad image URI "file:" (file: needs a path, e.g. file:/var/lib/rbdsync/images/x.raw)"#),
        // Types.
        ("    read_only: yes\n", "5:16: disks[0].read_only: invalid boolean (true or false expected)"),
        ("    bitmaps: {name: b}\n", "5:14: disks[0].bitmaps: expected sequence start"),
    ];
    for (extra, expected) in cases {
        assert_eq!(vm_err(&disk_yaml(extra)), format!("{VM_FILE}:{expected}"), "for {extra:?}");
    }
}

#[test]
fn image_rules_name_line_and_key() {
    let vm = |image: &str, extra: &str| format!("name: vm1\ndisks:\n  - name: d0\n    image: {image}\n{extra}");
    let cases = [
        (
            "rbd:pool/a/b",
            "",
            r#"4:12: disks[0].image: bad image URI "rbd:pool/a/b" (extra "/": expected rbd:pool/image; RBD namespaces are not supported)"#,
        ),
        ("rbd:pool", "", r#"4:12: disks[0].image: bad image URI "rbd:pool" (expected rbd:pool/image)"#),
        (
            "s3:bucket/x",
            "",
            r#"4:12: disks[0].image: bad image URI "s3:bucket/x" (expected file:/path, rbd:pool/image or rbd:pool/image@snap)"#,
        ),
        (
            "rbd:pool/img@s1",
            "",
            r#"4:12: disks[0].image: image "rbd:pool/img@s1" is a snapshot, which is read-only (set read_only: true, or drop "@s1")"#,
        ),
        (
            "rbd:pool/img@s1",
            "    read_only: false\n",
            r#"4:12: disks[0].image: image "rbd:pool/img@s1" is a snapshot, which is read-only (set read_only: true, or drop "@s1")"#,
        ),
    ];
    for (image, extra, expected) in cases {
        assert_eq!(vm_err(&vm(image, extra)), format!("{VM_FILE}:{expected}"), "for {image}");
    }
    let snap = VmConfig::from_str(&vm("rbd:pool/img@s1", "    read_only: true\n"), Path::new(VM_FILE));
    assert_eq!(snap.expect("read-only snapshot is fine").disks[0].image.snap(), Some("s1"));
}

#[test]
fn name_errors_name_line_and_key() {
    let long = "a".repeat(65);
    let cases = [
        (format!("name: {long}\n"), format!(r#"1:7: name: bad name "{long}" (expected 1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or -)"#)),
        ("name: vm1\ndisks:\n  - name: .d0\n    image: rbd:p/a\n".into(), r#"3:11: disks[0].name: bad name ".d0" (expected 1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or -)"#.into()),
        ("name: vm1\ndisks:\n  - name: d0\n    image: rbd:p/a\n    bitmaps: [{name: \"a/b\"}]\n".into(), r#"5:22: disks[0].bitmaps[0].name: bad name "a/b" (expected 1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or -)"#.into()),
        ("disks: []\n".into(), "1:1: missing field `name`".into()),
        ("name: vm1\nname: vm2\n".into(), "2:1: duplicate mapping key `name` is not allowed here".into()),
        ("name: vm1\ndisks: [\n".into(), "2:8: disks: unclosed bracket '['".into()),
    ];
    for (yaml, expected) in cases {
        assert_eq!(vm_err(&yaml), format!("{VM_FILE}:{expected}"), "for {yaml:?}");
    }
}

#[test]
fn agent_errors_name_line_and_key() {
    let cases = [
        ("nbd:\n  lisen: []\n", "2:3: nbd.lisen: unknown field `lisen`, expected one of listen, tls, max_connections, max_payload, handshake_timeout_secs, max_connections_per_export, idle_timeout_secs, client_timeout_secs, incoming_io_timeout_secs, client_reconnect_secs"),
        ("colour: blue\n", "1:1: colour: unknown field `colour`, expected one of node, state_dir, vms_dir, vms, nbd, control, metrics, ceph, migration, jobs"),
        ("nbd:\n  listen: [\"0.0.0.0:10809\", \"foo\"]\n", r#"2:29: nbd.listen[1]: bad listen address "foo" (expected IP:PORT such as 127.0.0.1:10809 or [::1]:10809, or unix:/path)"#),
        ("nbd:\n  listen: []\n", "2:11: nbd.listen: listen needs at least one address"),
        ("nbd:\n  max_payload: 1GiB\n", "2:16: nbd.max_payload: bad max_payload 1GiB (expected 4KiB to 256MiB)"),
        ("nbd:\n  max_connections: 0\n", "2:20: nbd.max_connections: max_connections must be at least 1"),
        ("nbd:\n  handshake_timeout_secs: 0\n", "2:27: nbd.handshake_timeout_secs: bad timeout 0 (expected 1 to 3600 seconds)"),
        ("nbd:\n  tls: {mode: maybe, cert: a, key: b}\n", "2:15: nbd.tls.mode: unknown variant `maybe`, expected one of off, optional, required"),
        ("nbd:\n  tls: {cert: a}\n", "2:9: nbd.tls: missing field `key`"),
        ("control: {listen: [\"unix:\"]}\n", r#"1:20: control.listen[0]: bad listen address "unix:" (unix: needs a socket path)"#),
        ("metrics: {listen: \"unix:/x\"}\n", r#"1:19: metrics.listen: bad listen address "unix:/x" (expected IP:PORT such as 127.0.0.1:9860)"#),
        ("ceph: {client: \"a b\"}\n", r#"1:16: ceph.client: bad name "a b" (expected 1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or -)"#),
        ("node: -x\n", r#"1:7: node: bad name "-x" (expected 1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or -)"#),
        ("state_dir: !include x\n", "1:21: unsupported tag `!include`"),
        ("vms:\n  - name: a\n  - name: a\n", r#"3:11: vms[1].name: duplicate VM name "a" (first defined at agent.yaml:2:11)"#),
        ("vms:\n  - name: a\n    disks:\n      - {name: d, image: rbd:p/a, size: 1Z}\n", r#"4:41: vms[0].disks[0].size: bad size "1Z" (expected e.g. 20GiB)"#),
        ("vms:\n  - name: a\n    disks:\n      - {name: d, image: rbd:p/a@s}\n", r#"4:26: vms[0].disks[0].image: image "rbd:p/a@s" is a snapshot, which is read-only (set read_only: true, or drop "@s")"#),
    ];
    for (yaml, expected) in cases {
        assert_eq!(agent_err(yaml), format!("agent.yaml:{expected}"), "for {yaml:?}");
    }
}

#[test]
fn errors_expose_position_and_key() {
    let err = VmConfig::from_str(&disk_yaml("    size: 1000\n"), Path::new(VM_FILE)).expect_err("bad");
    let at = err.position().expect("located");
    assert_eq!((at.file.as_path(), at.line, at.column), (Path::new(VM_FILE), 5, 11));
    assert_eq!(err.key(), Some("disks[0].size"));
    assert!(matches!(err, ConfigError::Parse { .. }));
    let dup = "  - name: disk0\n    image: rbd:pool/b\n";
    let err = VmConfig::from_str(&disk_yaml(dup), Path::new(VM_FILE)).expect_err("dup");
    assert!(matches!(err, ConfigError::Duplicate { what: Duplicated::DiskName, .. }));
}

#[test]
fn alias_bomb_hits_the_budget() {
    let bitmaps: String = (0..300).map(|i| format!("      - {{name: b{i}, granularity: *g}}\n")).collect();
    let yaml = disk_yaml(&format!("    bitmaps:\n      - {{name: a, granularity: &g 4KiB}}\n{bitmaps}"));
    let err = vm_err(&yaml);
    let expected = "vms.d/vm1.yaml:263:35: disks[0].bitmaps[257]: YAML document too large or too complex";
    assert!(err.starts_with(expected), "{err}");
}

#[test]
fn oversized_input_is_rejected() {
    let yaml = format!("name: vm1\n#{}\n", "x".repeat(MAX_FILE_BYTES));
    assert_eq!(vm_err(&yaml), format!("{VM_FILE}: file is larger than {MAX_FILE_BYTES} bytes"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "big.yaml", &yaml);
    let err = VmConfig::load(&path).expect_err("too large");
    assert!(matches!(err, ConfigError::TooLarge { path: p, .. } if p == path));
}

#[test]
fn missing_file_is_an_io_error() {
    let path = Path::new("/nonexistent/rbdsync/agent.yaml");
    let err = AgentConfig::load(path).expect_err("missing");
    assert_eq!(err.to_string(), "/nonexistent/rbdsync/agent.yaml: cannot read");
    let ConfigError::Io { source, .. } = err else { panic!("not Io: {err:?}") };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn relative_paths_resolve_against_the_files_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    fs::create_dir(root.join("vms.d")).expect("mkdir");
    let agent = "state_dir: state\nvms_dir: vms.d\nnbd:\n  listen: [\"unix:nbd.sock\"]\n  \
                 tls: {cert: tls/cert.pem, key: /abs/key.pem, client_ca: ca.pem}\n\
                 control: {listen: [\"unix:run/control.sock\"]}\n\
                 ceph: {conf: ceph.conf, keyring: keyring}\n\
                 vms:\n  - {name: a, disks: [{name: d, image: file:a.raw}]}\n";
    let path = write(root, "agent.yaml", agent);
    write(&root.join("vms.d"), "b.yaml", "name: b\ndisks: [{name: d, image: file:../b.raw, read_only: true}]\n");
    let config = AgentConfig::load(&path).expect("valid");
    assert_eq!(config.source, path);
    assert_eq!(config.state_dir, root.join("state"));
    assert_eq!(config.vms_dir, Some(root.join("vms.d")));
    assert_eq!(config.nbd.listen, [ListenAddr::Unix(root.join("nbd.sock"))]);
    let tls = config.nbd.tls.as_ref().expect("tls");
    assert_eq!((&tls.cert, &tls.key), (&root.join("tls/cert.pem"), &PathBuf::from("/abs/key.pem")));
    assert_eq!(tls.client_ca, Some(root.join("ca.pem")));
    assert_eq!(config.control.listen, [ListenAddr::Unix(root.join("run/control.sock"))]);
    let ceph = config.ceph.as_ref().expect("ceph");
    assert_eq!((&ceph.conf, &ceph.keyring), (&root.join("ceph.conf"), &Some(root.join("keyring"))));
    let vms = config.load_vms().expect("valid VMs");
    assert_eq!(vms[0].disks[0].image, ImageUri::file(root.join("a.raw")));
    assert_eq!(vms[1].disks[0].image, ImageUri::file(root.join("vms.d/../b.raw")));
    assert_eq!(vms[1].source, root.join("vms.d/b.yaml"));
}

#[test]
fn embedded_relative_paths_resolve_against_the_working_directory() {
    let config = AgentConfig::from_str("state_dir: st\n", Path::new(EMBEDDED_SOURCE)).expect("ok");
    let cwd = std::env::current_dir().expect("cwd");
    assert_eq!(config.state_dir, cwd.join("st"));
}

#[test]
fn load_vms_reads_yaml_files_in_name_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write(root, "b.yml", "name: vm-b\n");
    write(root, "a.yaml", "name: vm-a\ndisks: [{name: d, image: rbd:p/a}]\n");
    write(root, ".hidden.yaml", "not: [valid\n");
    write(root, "notes.txt", "not yaml\n");
    fs::create_dir(root.join("dir.yaml")).expect("mkdir");
    let yaml = format!("vms_dir: {}\nvms: [{{name: inline}}]\n", root.display());
    let config = AgentConfig::from_str(&yaml, Path::new("/etc/rbdsync/agent.yaml")).expect("ok");
    let names: Vec<String> = config.load_vms().expect("valid").into_iter().map(|vm| vm.name).collect();
    assert_eq!(names, ["inline", "vm-a", "vm-b"]);
}

#[test]
fn missing_vms_dir_means_no_vms() {
    let yaml = "vms_dir: /nonexistent/rbdsync/vms.d\n";
    let config = AgentConfig::from_str(yaml, Path::new("agent.yaml")).expect("ok");
    assert_eq!(config.load_vms().expect("no VMs"), []);
    assert_eq!(AgentConfig::from_str("", Path::new("a.yaml")).expect("ok").load_vms().expect("ok"), []);
}

#[test]
fn vms_dir_that_is_a_file_is_an_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "vms.d", "");
    let config = AgentConfig::from_str("vms_dir: vms.d\n", &dir.path().join("agent.yaml")).expect("ok");
    let err = config.load_vms().expect_err("not a directory");
    assert!(matches!(&err, ConfigError::Io { path, .. } if *path == file), "{err:?}");
}

#[test]
fn duplicates_across_files_name_both_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = write(root, "a.yaml", "name: vm1\ndisks: [{name: d, image: rbd:p/a}]\n");
    let b = write(root, "b.yaml", "# copy of a\nname: vm1\n");
    let yaml = format!("vms_dir: {}\n", root.display());
    let config = AgentConfig::from_str(&yaml, Path::new("agent.yaml")).expect("ok");
    let expected =
        format!("{}:2:7: name: duplicate VM name \"vm1\" (first defined at {}:1:7)", b.display(), a.display());
    assert_eq!(config.load_vms().expect_err("dup").to_string(), expected);

    fs::write(&b, "name: vm2\ndisks:\n  - {name: d, image: rbd:p/b, backup: {target: rbd:p/a}}\n").expect("rewrite");
    let expected = format!(
        "{}:3:48: disks[0].backup.target: duplicate image \"rbd:p/a\" (first defined at {}:2:26)",
        b.display(),
        a.display()
    );
    assert_eq!(config.load_vms().expect_err("dup").to_string(), expected);
}

#[test]
fn duplicates_with_inline_vms_name_agent_yaml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = write(dir.path(), "demo.yaml", "name: demo\n");
    let yaml = format!("vms_dir: {}\nvms: [{{name: demo}}]\n", dir.path().display());
    let config = AgentConfig::from_str(&yaml, Path::new("/etc/rbdsync/agent.yaml")).expect("ok");
    let expected =
        format!("{}:1:7: name: duplicate VM name \"demo\" (first defined at /etc/rbdsync/agent.yaml)", vm.display());
    assert_eq!(config.load_vms().expect_err("dup").to_string(), expected);
}

#[test]
fn read_only_images_may_be_shared() {
    let yaml = "name: vm1\ndisks:\n  - {name: a, image: rbd:p/base@s, read_only: true}\n  \
                - {name: b, image: rbd:p/base@s, read_only: true}\n";
    assert_eq!(VmConfig::from_str(yaml, Path::new(VM_FILE)).expect("ok").disks.len(), 2);
}

#[test]
fn sizes_parse() {
    let ok = [
        ("4096", 4096),
        ("0", 0),
        ("512B", 512),
        ("64K", 64 * KIB),
        ("64KiB", 64 * KIB),
        ("64kib", 64 * KIB),
        ("512M", 512 * MIB),
        ("512MiB", 512 * MIB),
        ("20G", 20 * GIB),
        ("20 GiB", 20 * GIB),
        ("1T", TIB),
        ("1TiB", TIB),
        ("2PiB", 2 << 50),
        ("18446744073709551615", u64::MAX),
    ];
    for (input, bytes) in ok {
        assert_eq!(parse_size(input), Ok(bytes), "{input}");
    }
    let bad = ["", "abc", "-1", "+1", "GiB", "20XB", "1GB", "1.5GiB", "1e9", "0x10", "1 2"];
    for input in bad {
        assert!(parse_size(input).is_err(), "{input} should be rejected");
    }
    assert_eq!(parse_size("16384PiB"), Err(r#"size "16384PiB" is too large"#.into()));
    assert_eq!(parse_size("18446744073709551616"), Err(r#"size "18446744073709551616" is too large"#.into()));
    assert_eq!(
        parse_size("1.5GiB"),
        Err(r#"bad size "1.5GiB" (fractions are not supported; use a smaller unit, e.g. 1536MiB)"#.into())
    );
    assert_eq!(format_size(3 * KIB), "3KiB");
    assert_eq!((format_size(0), format_size(1000), format_size(GIB)), ("0".into(), "1000".into(), "1GiB".into()));
}

#[test]
fn sizes_accept_yaml_integers() {
    let vm = VmConfig::from_str(&disk_yaml("    size: 1073741824\n"), Path::new(VM_FILE)).expect("ok");
    assert_eq!(vm.disks[0].size, Some(GIB));
}

#[test]
fn names_checked() {
    for name in ["vm1", "a", "A_b.c-d", "9", &"x".repeat(64)] {
        assert_eq!(check_name(name), Ok(()), "{name}");
    }
    for name in ["", ".a", "-a", "..", "a/b", "a b", "é", &"x".repeat(65)] {
        assert!(check_name(name).is_err(), "{name:?} should be rejected");
    }
}

#[test]
fn granularity_checked() {
    for g in [4 * KIB, 64 * KIB, 64 * MIB] {
        assert_eq!(check_granularity(g), Ok(()));
    }
    for g in [0, 512, 2 * KIB, 3 * KIB, 96 * KIB, 128 * MIB] {
        assert!(check_granularity(g).is_err(), "{g}");
    }
    assert!(BitmapConfig::new("b", 3 * KIB, true).is_err());
    assert!(BitmapConfig::new("/b", 4 * KIB, true).is_err());
}

#[test]
fn uris_round_trip() {
    for uri in ["file:/abs/path", "file:rel/x.raw", "rbd:pool/image", "rbd:pool/image@snap"] {
        let parsed: ImageUri = uri.parse().expect(uri);
        assert_eq!(parsed.to_string(), uri);
    }
    let snap: ImageUri = "rbd:backup/vm1-disk0@s3".parse().expect("ok");
    let expected = ImageUri::Rbd { pool: "backup".into(), image: "vm1-disk0".into(), snap: Some("s3".into()) };
    assert_eq!((snap.snap(), &snap), (Some("s3"), &expected));
    assert_eq!("file:///abs/x".parse::<ImageUri>().map(|u| u.to_string()), Ok("file:/abs/x".into()));
    let bad = [
        "",
        "file:",
        "file://host/x",
        "rbd:",
        "rbd:pool",
        "rbd:/img",
        "rbd:pool/",
        "rbd:pool/a/b",
        "rbd:pool/img@",
        "rbd:po ol/img",
        "rbd:pool/img@a@b",
        "s3:bucket/x",
        "/abs/path",
    ];
    for uri in bad {
        assert!(uri.parse::<ImageUri>().is_err(), "{uri:?} should be rejected");
    }
}

#[test]
fn listen_addrs_round_trip() {
    for addr in ["0.0.0.0:10809", "[::1]:10809", "127.0.0.1:0", "unix:/run/x.sock", "unix:rel.sock"] {
        let parsed: ListenAddr = addr.parse().expect(addr);
        assert_eq!(parsed.to_string(), addr);
    }
    let long = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH));
    for addr in ["", "foo", "unix:", "localhost:10809", "10809", "1.2.3.4", "[::1]", &long] {
        assert!(addr.parse::<ListenAddr>().is_err(), "{addr:?} should be rejected");
    }
}

/// Inserts `c` into the example at char index `at` (mod its length).
fn mutate_example(at: usize, c: char) -> String {
    let mut text: Vec<char> = EXAMPLE_YAML.chars().collect();
    text.insert(at % (text.len() + 1), c);
    text.into_iter().collect()
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
        let _ = AgentConfig::from_str(&s, Path::new("agent.yaml"));
        let _ = VmConfig::from_str(&s, Path::new(VM_FILE));
        let _ = parse_size(&s);
        let _ = s.parse::<ImageUri>();
        let _ = s.parse::<ListenAddr>();
    }

    #[test]
    fn yaml_like_text_never_panics(s in "[a-z_0-9:@/.{}\\[\\],&*!#\"' \n-]{0,300}") {
        let _ = AgentConfig::from_str(&s, Path::new("agent.yaml"));
        let _ = VmConfig::from_str(&s, Path::new(VM_FILE));
    }

    #[test]
    fn mutated_example_never_panics(at in any::<usize>(), c in any::<char>()) {
        let _ = AgentConfig::from_str(&mutate_example(at, c), Path::new("agent.yaml"));
    }

    #[test]
    fn parsed_sizes_round_trip(n in any::<u64>()) {
        prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
        prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
    }

    #[test]
    fn parsed_uris_round_trip(s in "(file:|rbd:)[a-z0-9/@. -]{0,24}") {
        if let Ok(uri) = s.parse::<ImageUri>() {
            prop_assert_eq!(uri.to_string().parse::<ImageUri>(), Ok(uri));
        }
    }
}

#[test]
fn allow_entries_match_addresses_sockets_and_certificate_names() {
    let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
    let a = |s: &str| s.parse::<Allow>().unwrap();
    assert!(a("unix").matches(None, None));
    assert!(!a("unix").matches(ip("127.0.0.1"), None));
    assert!(a("10.1.0.0/16").matches(ip("10.1.200.3"), None));
    assert!(!a("10.1.0.0/16").matches(ip("10.2.0.1"), None));
    assert!(!a("10.1.0.0/16").matches(None, None), "a Unix client has no address");
    assert!(a("10.1.0.0/16").matches(ip("::ffff:10.1.0.9"), None), "IPv4-mapped IPv6 peers match IPv4 entries");
    assert!(a("0.0.0.0/0").matches(ip("192.0.2.1"), None));
    assert!(a("192.0.2.7").matches(ip("192.0.2.7"), None));
    assert!(!a("192.0.2.7").matches(ip("192.0.2.8"), None));
    assert!(a("2001:db8::/32").matches(ip("2001:db8:1::5"), None));
    assert!(!a("2001:db8::/32").matches(ip("2001:db9::5"), None));
    assert!(a("cn:host-b").matches(ip("10.0.0.1"), Some("host-b")));
    assert!(!a("cn:host-b").matches(ip("10.0.0.1"), Some("host-c")));
    assert!(!a("cn:host-b").matches(None, None));
    for bad in ["", "cn:", "10.0.0.0/33", "::/129", "host-b", "10.0.0.0/x", "unix:"] {
        assert!(bad.parse::<Allow>().is_err(), "{bad:?} accepted");
    }
}

#[test]
fn backup_hooks_come_in_pairs_with_a_bounded_timeout() {
    let vm = VmConfig::from_str("name: vm1\nbackup: {freeze: 'f', thaw: 't'}\n", Path::new(VM_FILE)).expect("valid");
    let hooks = vm.hooks.expect("hooks");
    assert_eq!((hooks.freeze.as_str(), hooks.thaw.as_str(), hooks.timeout.as_secs()), ("f", "t", 30));
    assert!(VmConfig::from_str("name: vm1\n", Path::new(VM_FILE)).expect("valid").hooks.is_none());
    let e = vm_err("name: vm1\nbackup: {freeze: 'f'}\n");
    assert!(e.contains("backup") && e.contains("set both or neither"), "{e}");
    let e = vm_err("name: vm1\nbackup: {freeze: 'f', thaw: ' '}\n");
    assert!(e.contains("must not be empty"), "{e}");
    let e = vm_err("name: vm1\nbackup: {freeze: 'f', thaw: 't', hook_timeout_secs: 0}\n");
    assert!(e.contains("hook_timeout_secs"), "{e}");
    let e = vm_err("name: vm1\nbackup: {freeze: 'f', thaw: 't', frezee: 'x'}\n");
    assert!(e.contains("frezee"), "{e}");
}
