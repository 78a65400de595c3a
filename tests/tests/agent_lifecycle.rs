//! The agent as a process: startup errors, graceful stop, reload on SIGHUP.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::{agent_bin, stdout, AgentBuilder};

fn exports(agent: &tests::Agent) -> Vec<String> {
    let list = stdout("nbdinfo", &["--list", "--json", &format!("nbd://{}", agent.tcp)]).unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap().to_owned()).collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_stops_cleanly_and_acknowledged_writes_persist() {
    let mut agent = AgentBuilder::new().simple_vm("vm1", "4MiB").start().unwrap();
    stdout("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 64k", &agent.unix_uri("vm1/disk0")]).unwrap();
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}\n{}", agent.log());
    assert!(!agent.socket().exists(), "unix socket left behind");
    assert!(!agent.dir().join("state/agent.json").exists());
    let image = std::fs::read(agent.dir().join("images/vm1-disk0.raw")).unwrap();
    assert!(image[..65536].iter().all(|&b| b == 0x42));
    assert!(agent.log().contains("agent stopped"));
}

#[test]
fn sighup_adds_and_removes_exports_and_keeps_old_config_on_error() {
    let agent = AgentBuilder::new().simple_vm("vm1", "1MiB").start().unwrap();
    assert_eq!(exports(&agent), ["vm1/disk0"]);
    let vms = agent.dir().join("vms.d");
    std::fs::write(
        vms.join("vm2.yaml"),
        "name: vm2\ndisks:\n  - {name: d, image: file:../images/vm2.raw, size: 1MiB}\n",
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("vm2 export", || exports(&agent).len() == 2);
    assert_eq!(exports(&agent), ["vm1/disk0", "vm2/d"]);

    std::fs::write(vms.join("bad.yaml"), "name: vm3\ndisks:\n  - name: d\n    image: file:x.raw\n    size: 12XB\n")
        .unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("reload error in log", || agent.log().contains("reload failed"));
    let log = agent.log();
    assert!(log.contains("bad.yaml:5"), "error should name file and line:\n{log}");
    assert_eq!(exports(&agent), ["vm1/disk0", "vm2/d"]);

    std::fs::remove_file(vms.join("bad.yaml")).unwrap();
    std::fs::remove_file(vms.join("vm2.yaml")).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("vm2 removed", || exports(&agent).len() == 1);
}

#[test]
fn bad_config_fails_at_startup_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(&cfg, "node: a\nstate_dir: s\nnbd:\n  listen: [\"127.0.0.1:0\"]\n  lisen: oops\n").unwrap();
    let out = Command::new(agent_bin()).args(["agent", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.yaml:5") && err.contains("lisen"), "{err}");
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused() {
    let agent = AgentBuilder::new().simple_vm("vm1", "1MiB").start().unwrap();
    let cfg = agent.dir().join("agent2.yaml");
    let sock = agent.socket();
    std::fs::write(
        &cfg,
        format!(
            "state_dir: state2\nnbd:\n  listen: [\"unix:{}\"]\ncontrol:\n  listen: [\"unix:control2.sock\"]\n",
            sock.display()
        ),
    )
    .unwrap();
    let out = Command::new(agent_bin()).args(["agent", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(exports(&agent), ["vm1/disk0"]);
}
