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

/// systemd's notification protocol, with the test as the service manager (a
/// datagram socket in `NOTIFY_SOCKET`): READY=1 only once the agent serves
/// (its runtime file written, the export listed), watchdog pings at half of
/// `WATCHDOG_USEC`, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 on
/// SIGTERM.
#[test]
fn the_agent_speaks_systemds_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut agent = AgentBuilder::new()
        .simple_vm("vm1", "1MiB")
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .start()
        .unwrap();
    let mut messages: Vec<String> = Vec::new();
    let mut next = |what: &str, want: &dyn Fn(&str) -> bool| -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no {what} from the agent: {e}; got {messages:?}"));
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            messages.push(m.clone());
            if want(&m) {
                return m;
            }
        }
    };
    let has = |key: &'static str| move |m: &str| m.lines().any(|l| l == key);
    let ready = next("READY=1", &has("READY=1"));
    assert!(ready.contains("STATUS=serving 1 disks"), "{ready:?}");
    // `start` returned only after the runtime file appeared: READY came with the agent serving.
    assert_eq!(exports(&agent), ["vm1/disk0"]);
    let started = Instant::now();
    next("WATCHDOG=1", &has("WATCHDOG=1"));
    next("a second WATCHDOG=1", &has("WATCHDOG=1"));
    assert!(started.elapsed() < Duration::from_secs(2), "two pings took {:?} at a 0.4 s watchdog", started.elapsed());
    agent.signal(libc::SIGHUP);
    let reloading = next("RELOADING=1", &has("RELOADING=1"));
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    next("READY=1 after the reload", &has("READY=1"));
    assert!(agent.stop().unwrap().success());
    next("STOPPING=1", &has("STOPPING=1"));
    let before_ready = messages.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(
        messages[..before_ready].iter().any(|m| m.contains("EXTEND_TIMEOUT_USEC=")),
        "no start-timeout extension before READY: {messages:?}"
    );
}

/// The CLI's exit statuses tell a script what happened: 2 bad arguments, 3
/// agent unreachable, 4 refused by the agent, 5 a job it waited for failed,
/// 6 `verify` found differences; with `--json` the error on stderr is JSON
/// with a stable code.
#[test]
fn cli_exit_statuses_and_json_errors_say_what_happened() {
    let agent = AgentBuilder::new().simple_vm("vm1", "1MiB").start().unwrap();
    let run = |args: &[&str]| {
        let out = agent.cli().args(args).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Usage: clap's own errors and a malformed disk name.
    assert_eq!(run(&["bitmap", "list"]).0, 2);
    assert_eq!(run(&["bitmap", "list", "not-a-disk"]).0, 2);
    // Unreachable, in text and in JSON.
    let dead = agent.dir().join("nobody.sock");
    let out =
        Command::new(agent_bin()).args(["--control", &format!("unix:{}", dead.display()), "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(agent_bin())
        .args(["--json", "--control", &format!("unix:{}", dead.display()), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let error: serde_json::Value = serde_json::from_slice(&out.stderr).expect("a JSON error on stderr");
    assert_eq!(error["error"]["code"], "unreachable", "{error}");
    // Refused: no such disk, a bitmap that exists already.
    assert_eq!(run(&["bitmap", "list", "vm9/disk0"]).0, 4);
    assert_eq!(run(&["bitmap", "add", "vm1/disk0", "b1"]).0, 0);
    let (code, stderr) = run(&["--json", "bitmap", "add", "vm1/disk0", "b1"]);
    assert_eq!(code, 4, "{stderr}");
    let error: serde_json::Value = serde_json::from_str(stderr.trim()).expect("a JSON error on stderr");
    assert_eq!(error["error"]["code"], "bitmap_exists", "{error}");
    // A job that fails: verify against an image of another size.
    let small = agent.dir().join("small.raw");
    std::fs::File::create(&small).unwrap().set_len(4096).unwrap();
    let against = format!("file:{}", small.display());
    assert_eq!(run(&["verify", "vm1/disk0", "--against", &against, "--wait"]).0, 5);
    // Verify that finds differences: same size, other content.
    let other = agent.dir().join("other.raw");
    std::fs::write(&other, vec![0x5a; 1 << 20]).unwrap();
    let against = format!("file:{}", other.display());
    let (code, stderr) = run(&["verify", "vm1/disk0", "--against", &against, "--wait"]);
    assert_eq!(code, 6, "{stderr}");
    let equal = agent.dir().join("equal.raw");
    std::fs::File::create(&equal).unwrap().set_len(1 << 20).unwrap();
    assert_eq!(run(&["verify", "vm1/disk0", "--against", &format!("file:{}", equal.display()), "--wait"]).0, 0);
}

/// Shell completions and the man page come from the CLI's own definition:
/// the bash script parses and completes the subcommands, the man page is
/// roff naming every subcommand.
#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    let bash = stdout(agent_bin().to_str().unwrap(), &["completions", "bash"]).unwrap();
    let checked = Command::new("bash").args(["-n", "-c", &bash]).status().unwrap();
    assert!(checked.success(), "the bash completion script does not parse");
    // Completing `rbdsync mi` in bash offers migrate and migration.
    let script = format!(
        "{bash}\nCOMP_WORDS=(rbdsync mi); COMP_CWORD=1; COMP_LINE='rbdsync mi'; COMP_POINT=10; _rbdsync rbdsync mi rbdsync; echo \"${{COMPREPLY[@]}}\""
    );
    let offered = stdout("bash", &["-c", &script]).unwrap();
    assert!(offered.contains("migrate") && offered.contains("migration"), "completions for `rbdsync mi`: {offered:?}");
    for shell in ["zsh", "fish"] {
        let s = stdout(agent_bin().to_str().unwrap(), &["completions", shell]).unwrap();
        assert!(s.contains("rbdsync") && s.contains("migrate"), "{shell} completions: {s}");
    }
    let man = stdout(agent_bin().to_str().unwrap(), &["man"]).unwrap();
    assert!(man.contains(".TH rbdsync 1"), "{man}");
    for sub in ["agent", "backup", "migrate", "migration", "verify", "completions"] {
        assert!(man.contains(sub), "the man page does not name {sub}");
    }
    assert!(man.contains("Exit status"), "the man page lacks the exit statuses");
}

/// `rbdsync agent` without `--config` reads /etc/rbdsync/agent.yaml when it
/// exists and runs on the embedded example otherwise, saying which in its
/// first log line. Each case runs in private mount and network namespaces
/// whose /etc/rbdsync, /var/lib and /run are fresh tmpfs (the embedded
/// example's state and sockets live there) and whose loopback is down (its
/// ports bind nowhere), so the host is not touched beyond an empty
/// /etc/rbdsync directory to mount on.
#[test]
fn without_config_the_agent_reads_etc_rbdsync_or_the_embedded_example_and_says_which() {
    use std::io::BufRead;
    std::fs::create_dir_all("/etc/rbdsync").expect("the tests run as root");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let yaml = format!(
        "state_dir: {d}/state\nvms_dir: {d}/vms.d\nnbd:\n  listen: [\"unix:{d}/nbd.sock\"]\ncontrol:\n  listen: [\"unix:{d}/control.sock\"]\n"
    );
    std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
    let bin = agent_bin();
    for host_config in [true, false] {
        let copy = if host_config { format!("cp {d}/agent.yaml /etc/rbdsync/agent.yaml && ") } else { String::new() };
        let script = format!(
            "for d in /etc/rbdsync /var/lib /run; do mount -t tmpfs rbdsync-test $d || exit 9; done && {copy}exec {} agent",
            bin.display()
        );
        let mut child = Command::new("unshare")
            .args(["-m", "-n", "sh", "-c", &script])
            .env("RBDSYNC_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(10)).expect("a first log line");
        if host_config {
            assert!(first.contains("/etc/rbdsync/agent.yaml") && first.contains("host's configuration"), "{first}");
            let socket = dir.path().join("control.sock");
            wait_for("the control socket of the host's configuration", || socket.exists());
        } else {
            assert!(
                first.contains("embedded example configuration") && first.contains("no /etc/rbdsync/agent.yaml"),
                "{first}"
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
