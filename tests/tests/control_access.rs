//! Who may use the control API (issue: operations and security).
//!
//! - Unix socket: mode 0600, no credential needed.
//! - TCP: only with `control.tls`, and then only with the bearer token from
//!   `control.token_file` or a client certificate signed by
//!   `control.tls.client_ca`. Configurations that would let anyone in do not
//!   start. Clients are the real CLI (`--control https://…`) and `curl`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use tests::{agent_bin, Agent, AgentBuilder, Pki};

/// Runs a command to completion, whatever its exit status.
fn run(program: &str, args: &[&str]) -> std::io::Result<Output> {
    std::process::Command::new(program).args(args).stdin(std::process::Stdio::null()).output()
}

const TOKEN: &str = "s3cret-token-0123456789abcdef";

fn pki(dir: &Path) -> Pki {
    let pki = Pki::new(&dir.join("pki"));
    pki.ca("ca").server("server", "ca").client("admin", "ca", "2");
    pki.ca("other").client("stranger", "other", "2");
    pki
}

fn write_token(dir: &Path, mode: u32) {
    let path = dir.join("control.token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `control:` keys: a Unix socket plus TLS on 127.0.0.1 with `auth` lines.
fn control_keys(auth: &str) -> String {
    format!(
        "  listen: [\"unix:control.sock\", \"127.0.0.1:0\"]\n  tls: {{cert: pki/server-cert.pem, key: pki/server-key.pem{}}}\n{}",
        if auth.contains("client_ca") { ", client_ca: pki/ca-cert.pem" } else { "" },
        auth.lines().filter(|l| !l.contains("client_ca")).map(|l| format!("{l}\n")).collect::<String>()
    )
}

fn cli(agent: &Agent, args: &[&str]) -> Output {
    let url = format!("https://127.0.0.1:{}", agent.control_tcp().unwrap().port());
    let ca = agent.dir().join("pki/ca-cert.pem");
    let mut all = vec!["--control", &url, "--ca-cert", ca.to_str().unwrap()];
    all.extend(args);
    run(agent_bin().to_str().unwrap(), &all).unwrap()
}

fn curl(agent: &Agent, args: &[&str]) -> (String, String) {
    let url = format!("https://127.0.0.1:{}/v1/status", agent.control_tcp().unwrap().port());
    let ca = agent.dir().join("pki/ca-cert.pem");
    let mut all = vec!["-sS", "--max-time", "10", "--cacert", ca.to_str().unwrap(), "-w", "\n%{http_code}"];
    all.extend(args);
    all.push(&url);
    let out = run("curl", &all).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn status_of(body: &str) -> &str {
    body.rsplit('\n').next().unwrap_or_default()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn configurations_that_would_let_anyone_in_do_not_start() {
    let cases: [(&str, u32, &str); 4] = [
        ("  listen: [\"127.0.0.1:0\"]\n", 0o600, "needs control.tls"),
        (&control_keys(""), 0o600, "needs control.token_file or control.tls.client_ca"),
        (&control_keys("  token_file: control.token"), 0o644, "readable by others"),
        (&control_keys("  token_file: missing.token"), 0o600, "missing.token"),
    ];
    for (keys, mode, expected) in cases {
        let builder = AgentBuilder::new().simple_vm("vm1", "1MiB").control_keys(keys);
        pki(builder.dir());
        write_token(builder.dir(), mode);
        let err = match builder.start() {
            Ok(_) => panic!("agent started with control keys {keys:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(expected), "{keys:?}: expected {expected:?} in:\n{err}");
    }
}

#[test]
fn tcp_needs_the_bearer_token_and_the_unix_socket_stays_owner_only() {
    let builder =
        AgentBuilder::new().simple_vm("vm1", "1MiB").control_keys(&control_keys("  token_file: control.token"));
    pki(builder.dir());
    write_token(builder.dir(), 0o600);
    let agent = builder.start().unwrap();
    let token_file = agent.dir().join("control.token");

    // The CLI with the token: works.
    let out = cli(&agent, &["--token-file", token_file.to_str().unwrap(), "--json", "disks"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("vm1/disk0"), "{}", text(&out));
    // Without --ca-cert the CLI trusts the platform's store (here SSL_CERT_FILE names the test
    // CA); with the system's own bundle the agent's certificate is not trusted.
    let url = format!("https://127.0.0.1:{}", agent.control_tcp().unwrap().port());
    let token = token_file.to_str().unwrap();
    let platform = |env: Option<&Path>| {
        let mut cmd = std::process::Command::new(agent_bin());
        cmd.args(["--control", &url, "--token-file", token, "--json", "disks"]).env_remove("SSL_CERT_DIR");
        match env {
            Some(ca) => cmd.env("SSL_CERT_FILE", ca),
            None => cmd.env_remove("SSL_CERT_FILE"),
        };
        cmd.output().unwrap()
    };
    let out = platform(Some(&agent.dir().join("pki/ca-cert.pem")));
    assert!(out.status.success(), "{}", text(&out));
    let out = platform(None);
    assert!(!out.status.success(), "a certificate of the test CA was trusted by the system store: {}", text(&out));
    // Without it: refused with a clear one-line error and a failing exit code.
    let out = cli(&agent, &["disks"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("Authentication required"), "{}", text(&out));

    // curl: no token, a wrong one, the right one.
    let (body, _) = curl(&agent, &[]);
    assert_eq!(status_of(&body), "401", "{body}");
    assert!(body.contains("\"code\":\"unauthorized\""), "{body}");
    let (body, _) = curl(&agent, &["-H", "Authorization: Bearer s3cret-token-0123456789abcdeX"]);
    assert_eq!(status_of(&body), "401", "{body}");
    let (body, _) = curl(&agent, &["-H", "Authorization: Bearer s3cret-token-0123456789abcde"]);
    assert_eq!(status_of(&body), "401", "a prefix of the token is not the token: {body}");
    let (body, _) = curl(&agent, &["-H", &format!("Authorization: Bearer {TOKEN}")]);
    assert_eq!(status_of(&body), "200", "{body}");
    // Plain HTTP on the TLS port gets no answer.
    let port = agent.control_tcp().unwrap().port();
    let out = run("curl", &["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/v1/status")]).unwrap();
    assert!(!out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("node"), "{}", text(&out));
    // A client certificate is not asked for (no client_ca): the token stays mandatory.
    let pki = agent.dir().join("pki");
    let (body, _) = curl(
        &agent,
        &["--cert", pki.join("admin-cert.pem").to_str().unwrap(), "--key", pki.join("admin-key.pem").to_str().unwrap()],
    );
    assert_eq!(status_of(&body), "401", "{body}");

    // The Unix socket needs no token and is the owner's only.
    let socket = agent.dir().join("control.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let control = format!("unix:{}", socket.display());
    let out = run(agent_bin().to_str().unwrap(), &["--control", &control, "status"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn client_certificates_signed_by_the_ca_stand_in_for_the_token() {
    // client_ca without a token file: the certificate is mandatory.
    let builder = AgentBuilder::new().simple_vm("vm1", "1MiB").control_keys(&control_keys("  client_ca"));
    let pki = pki(builder.dir());
    let agent = builder.start().unwrap();
    let (admin, admin_key) = (pki.cert("admin"), pki.key("admin"));
    let out = cli(
        &agent,
        &["--client-cert", admin.to_str().unwrap(), "--client-key", admin_key.to_str().unwrap(), "--json", "status"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let (body, err) = curl(&agent, &["--cert", admin.to_str().unwrap(), "--key", admin_key.to_str().unwrap()]);
    assert_eq!(status_of(&body), "200", "{body} {err}");
    // No certificate, or one from another CA: no TLS session at all.
    let (body, err) = curl(&agent, &[]);
    assert_ne!(status_of(&body), "200", "{body} {err}");
    let (stranger, stranger_key) = (pki.cert("stranger"), pki.key("stranger"));
    let (body, err) = curl(&agent, &["--cert", stranger.to_str().unwrap(), "--key", stranger_key.to_str().unwrap()]);
    assert_ne!(status_of(&body), "200", "{body} {err}");
    let (body, err) = curl(&agent, &["-H", &format!("Authorization: Bearer {TOKEN}")]);
    assert_ne!(status_of(&body), "200", "no token file configured: {body} {err}");
    drop(agent);

    // client_ca and a token file: either credential.
    let builder = AgentBuilder::new()
        .simple_vm("vm1", "1MiB")
        .control_keys(&control_keys("  client_ca\n  token_file: control.token"));
    let pki = self::pki(builder.dir());
    write_token(builder.dir(), 0o600);
    let agent = builder.start().unwrap();
    let (stranger, stranger_key) = (pki.cert("stranger"), pki.key("stranger"));
    let (body, err) = curl(&agent, &["--cert", stranger.to_str().unwrap(), "--key", stranger_key.to_str().unwrap()]);
    assert_ne!(
        status_of(&body),
        "200",
        "a certificate from another CA is refused even with a token file: {body} {err}"
    );
    let (admin, admin_key) = (pki.cert("admin"), pki.key("admin"));
    let (body, _) = curl(&agent, &["--cert", admin.to_str().unwrap(), "--key", admin_key.to_str().unwrap()]);
    assert_eq!(status_of(&body), "200", "{body}");
    let (body, _) = curl(&agent, &["-H", &format!("Authorization: Bearer {TOKEN}")]);
    assert_eq!(status_of(&body), "200", "{body}");
    let (body, _) = curl(&agent, &[]);
    assert_eq!(status_of(&body), "401", "{body}");
}

/// An outgoing migration to a destination whose control API is on https
/// with a bearer token: the source agent calls it with the credentials of
/// its `migration:` section (without them it cannot, and says why; the
/// source keeps its disk).
#[test]
fn a_migration_reaches_an_https_destination_with_the_migration_credentials() {
    let store = tempfile::tempdir().unwrap();
    let dest = AgentBuilder::new().control_keys(&control_keys("  token_file: control.token"));
    pki(dest.dir());
    write_token(dest.dir(), 0o600);
    let b = dest.start().unwrap();
    let to = format!("https://127.0.0.1:{}", b.control_tcp().unwrap().port());
    for with_credentials in [false, true] {
        // A backup target per round (snapshot names are per second and job number).
        let vm = format!(
            "name: vm1\ndisks:\n  - name: disk0\n    image: file:../images/vm1-disk0.raw\n    size: 4MiB\n    \
             bitmaps: [{{name: backup}}]\n    backup: {{target: \"file:{}/vm1-disk0-{with_credentials}.raw\", bitmap: backup}}\n",
            store.path().display()
        );
        let mut source = AgentBuilder::new().vm("vm1", &vm);
        if with_credentials {
            source = source.extra(&format!(
                "migration:\n  ca_cert: {}\n  token_file: {}\n",
                b.dir().join("pki/ca-cert.pem").display(),
                b.dir().join("control.token").display()
            ));
        }
        let a = source.start().unwrap();
        a.cli_json(&["backup", "vm1", "--wait", "--auto"]).unwrap();
        let out = a.cli().args(["--json", "migrate", "vm1", "--to", &to]).output().unwrap();
        eprintln!("credentials {with_credentials}: {}", text(&out));
        if with_credentials {
            assert!(out.status.success(), "migrate to {to} failed: {}\n{}", text(&out), a.log());
            let disks = b.cli_json(&["disks"]).unwrap();
            assert_eq!(disks[0]["name"], "vm1/disk0", "{disks}");
            assert_eq!(disks[0]["read_only"], false, "{disks}");
        } else {
            assert!(!out.status.success(), "migrate without credentials succeeded");
            assert!(text(&out).contains("destination"), "the error must name the destination: {}", text(&out));
            let disks = a.cli_json(&["disks"]).unwrap();
            assert_eq!(disks[0]["read_only"], false, "{disks}");
        }
    }
}
