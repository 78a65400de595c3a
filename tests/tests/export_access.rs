//! Per-VM `allow` lists and connection limits of the NBD exports, with
//! real clients (python libnbd, nbdinfo):
//! - an export a client is not allowed to use is unknown to it, and not
//!   listed (by source address, by Unix socket, by TLS client-certificate CN);
//! - `allow` changes apply on SIGHUP;
//! - `nbd.max_connections_per_export` refuses further clients with a
//!   message, and frees the slot when a client leaves;
//! - `nbd.idle_timeout_secs` closes idle connections.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tests::{Agent, AgentBuilder, Pki};

fn vm(name: &str, allow: &str) -> String {
    format!(
        "name: {name}\ndisks:\n  - name: disk0\n    image: file:../images/{name}-disk0.raw\n    size: 1MiB\n{allow}"
    )
}

/// Runs python libnbd code with `uri` as `sys.argv[1]`.
fn py(code: &str, uri: &str) -> Output {
    Command::new("/usr/bin/python3").args(["-c", code, uri]).output().expect("spawn python3")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Export names `nbdinfo --list` shows for `uri` (a server URI without export).
fn listed(uri: &str) -> Vec<String> {
    let out = Command::new("nbdinfo").args(["--list", "--json", uri]).output().expect("spawn nbdinfo");
    assert!(out.status.success(), "nbdinfo --list {uri}: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = v["exports"].as_array().unwrap();
    for e in exports {
        let description = e["description"].as_str().unwrap_or_default();
        assert!(!description.contains(".raw") && !description.contains("file:"), "image location leaked: {e}");
    }
    let mut names: Vec<String> = exports.iter().map(|e| e["export-name"].as_str().unwrap().to_owned()).collect();
    names.sort();
    names
}

/// Whether a client can open `uri` and read from it.
fn opens(uri: &str) -> Result<(), String> {
    let code = "import nbd, sys\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(sys.argv[1])\nh.pread(512, 0)\n";
    let out = py(code, uri);
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

/// libnbd's words for NBD_REP_ERR_UNKNOWN.
fn unknown(err: &str) -> bool {
    err.contains("has no export named")
}

fn tcp_base(agent: &Agent) -> String {
    format!("nbd://127.0.0.1:{}", agent.tcp.port())
}

fn unix_base(agent: &Agent) -> String {
    format!("nbd+unix://?socket={}", agent.socket().display())
}

#[test]
fn allow_lists_hide_exports_by_address_and_socket_and_follow_reloads() {
    let agent = AgentBuilder::new()
        .vm("open", &vm("open", ""))
        .vm("local", &vm("local", "allow: [\"127.0.0.0/8\", \"::1\"]\n"))
        .vm("remote", &vm("remote", "allow: [\"10.9.9.0/24\"]\n"))
        .vm("sock", &vm("sock", "allow: [unix]\n"))
        .start()
        .unwrap();
    assert_eq!(listed(&tcp_base(&agent)), ["local/disk0", "open/disk0"]);
    assert_eq!(listed(&unix_base(&agent)), ["open/disk0", "sock/disk0"]);
    opens(&agent.tcp_uri("local/disk0")).unwrap();
    opens(&agent.tcp_uri("open/disk0")).unwrap();
    opens(&agent.unix_uri("sock/disk0")).unwrap();
    for uri in [agent.tcp_uri("remote/disk0"), agent.tcp_uri("sock/disk0"), agent.unix_uri("local/disk0")] {
        let err = opens(&uri).expect_err(&uri);
        assert!(unknown(&err), "{uri}: not allowed must look unknown: {err}");
    }
    // Nor do its meta contexts leak: the same answer as for a missing export.
    let out = py(
        "import nbd, sys\nh = nbd.NBD()\nh.set_opt_mode(True)\nh.connect_uri(sys.argv[1])\n\
         h.set_export_name('remote/disk0')\nprint(h.opt_list_meta_context(lambda n: 0))\n",
        &tcp_base(&agent),
    );
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).trim() == "0", "{}", text(&out));

    // Reload: `remote` now admits loopback, `local` only unix.
    std::fs::write(agent.dir().join("vms.d/remote.yaml"), vm("remote", "allow: [\"10.9.9.0/24\", \"127.0.0.1\"]\n"))
        .unwrap();
    std::fs::write(agent.dir().join("vms.d/local.yaml"), vm("local", "allow: [unix]\n")).unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed(&tcp_base(&agent)) != ["open/disk0", "remote/disk0"] {
        assert!(Instant::now() < deadline, "reload did not apply: {:?}", listed(&tcp_base(&agent)));
        std::thread::sleep(Duration::from_millis(50));
    }
    opens(&agent.tcp_uri("remote/disk0")).unwrap();
    assert!(opens(&agent.tcp_uri("local/disk0")).is_err());
    opens(&agent.unix_uri("local/disk0")).unwrap();
}

#[test]
fn allow_lists_match_the_tls_client_certificate_cn() {
    let builder = AgentBuilder::new()
        .vm("alices", &vm("alices", "allow: [\"cn:alice\"]\n"))
        .vm("bobs", &vm("bobs", "allow: [\"cn:bob\", unix]\n"));
    let pki = Pki::new(&builder.dir().join("pki"));
    pki.ca("ca").server("server", "ca").client("alice", "ca", "2").client("bob", "ca", "2");
    let agent = builder
        .start_with_nbd(
            "  tls: {mode: required, cert: pki/server-cert.pem, key: pki/server-key.pem, client_ca: pki/ca-cert.pem}\n",
        )
        .unwrap();
    let port = agent.tcp.port();
    let tls = |who: &str| {
        let creds = pki.creds(&format!("creds-{who}"), &["ca"], Some(who));
        (format!("nbds://localhost:{port}/?tls-certificates={}", creds.display()), move |export: &str| {
            format!("nbds://localhost:{port}/{export}?tls-certificates={}", creds.display())
        })
    };
    let (alice_base, alice) = tls("alice");
    let (bob_base, bob) = tls("bob");
    assert_eq!(listed(&alice_base), ["alices/disk0"]);
    assert_eq!(listed(&bob_base), ["bobs/disk0"]);
    opens(&alice("alices/disk0")).unwrap();
    opens(&bob("bobs/disk0")).unwrap();
    assert!(unknown(&opens(&alice("bobs/disk0")).unwrap_err()));
    assert!(unknown(&opens(&bob("alices/disk0")).unwrap_err()));
    // The Unix socket (TLS optional there): no certificate, so only `unix` entries match.
    assert_eq!(listed(&unix_base(&agent)), ["bobs/disk0"]);
}

#[test]
fn per_export_connection_limit_refuses_with_a_message_and_frees_slots() {
    let agent = AgentBuilder::new()
        .vm("vm1", &vm("vm1", ""))
        .vm("vm2", &vm("vm2", ""))
        .start_with_nbd("  max_connections_per_export: 2\n")
        .unwrap();
    let code = r#"
import nbd, sys
base = sys.argv[1]
def conn(export):
    h = nbd.NBD()
    h.connect_uri(base + export)
    h.pread(512, 0)
    return h
a, b = conn("vm1/disk0"), conn("vm1/disk0")
other = conn("vm2/disk0")          # another export has its own slots
try:
    conn("vm1/disk0")
    print("third connection admitted")
    sys.exit(1)
except nbd.Error as e:
    print("refused:", e)
a.shutdown()
del a
import time
for _ in range(100):
    try:
        c = conn("vm1/disk0")
        break
    except nbd.Error:
        time.sleep(0.05)
else:
    print("slot not freed")
    sys.exit(1)
print("slot freed")
"#;
    let out = py(code, &format!("{}/", tcp_base(&agent)));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("refused:") && stdout.contains("policy"), "{stdout}");
    assert!(stdout.contains("slot freed"), "{stdout}");
    assert!(agent.log().contains("export connection limit reached"), "{}", agent.log());
}

#[test]
fn idle_connections_are_closed_after_the_timeout() {
    let agent = AgentBuilder::new().vm("vm1", &vm("vm1", "")).start_with_nbd("  idle_timeout_secs: 1\n").unwrap();
    let code = r#"
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for _ in range(6):                 # busy for 3 s: not idle
    h.pread(512, 0)
    time.sleep(0.5)
time.sleep(2.5)                    # idle past the timeout
try:
    h.pread(512, 0)
    print("still open")
except nbd.Error as e:
    print("closed:", e)
"#;
    let out = py(code, &agent.tcp_uri("vm1/disk0"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("closed:"), "{}", text(&out));
    assert!(agent.log().contains("closing idle connection"), "{}", agent.log());
}
