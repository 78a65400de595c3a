//! Security tests against the running agent: NBD over TLS (required,
//! optional, off), client certificates, certificate reload on SIGHUP, and
//! hostile input over raw TCP sockets (requests during the handshake, option
//! floods, huge lengths, slow drip, connection floods, wrapping offsets).
//!
//! Covered elsewhere and not repeated here (`nbd_protocol.rs`): a READ at
//! `u64::MAX - 100` (EINVAL, the offset wraps), an oversized WRITE with its
//! payload (EOVERFLOW, stream stays in sync), garbage negotiations (HTTP,
//! zeroes, bad option magic).
//!
//! Certificates are made with `openssl` per test; TLS clients are qemu-io
//! (`tls-creds-x509`), nbdinfo and libnbd from Python (`nbds://` URIs) and, where a client must
//! send a certificate the server did not ask for by CA name (gnutls will
//! not), Python's `ssl` module doing STARTTLS by hand. Measurements (peak
//! RSS, timings) are printed on stderr: run with `--nocapture` to see them.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use proto::consts::{errno, opt, rep, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, SIMPLE_REPLY_MAGIC};
use proto::{Command as Cmd, Request};
use tests::{Agent, AgentBuilder, Pki};

const EXPORT: &str = "vm1/disk0";

// ---------------------------------------------------------------------------
// Clients (certificates: [`Pki`])

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("spawn {program}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether a qemu-io run succeeded, its patterns included.
fn qemu_io_ok(out: &Output) -> bool {
    let stdout = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !stdout.contains("Pattern verification failed") && !stdout.contains("failed:")
}

/// qemu-io over TLS (TCP, host `localhost`), with the credentials in `creds`.
fn qemu_io_tls(agent: &Agent, creds: &Path, cmds: &[&str]) -> Output {
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", path(creds));
    let image = format!("driver=nbd,host=localhost,port={},export={EXPORT},tls-creds=tls0", agent.tcp.port());
    let mut args = vec!["--object", &object, "--image-opts"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(&image);
    output("qemu-io", &args)
}

/// qemu-io on a plain `nbd://` URI.
fn qemu_io_plain(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    output("qemu-io", &args)
}

/// `nbds://` URI of the export (`export` empty for listing), trusting `creds`.
fn nbds_uri(agent: &Agent, export: &str, creds: &Path) -> String {
    format!("nbds://localhost:{}/{export}?tls-certificates={}", agent.tcp.port(), path(creds))
}

/// The agent's pid, from its runtime file.
fn agent_pid(agent: &Agent) -> u32 {
    let text = std::fs::read_to_string(agent.dir().join("state/agent.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    u32::try_from(v["pid"].as_u64().expect("pid in agent.json")).unwrap()
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} missing"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The agent process exists and is not a zombie (a crashed child of ours
/// stays a zombie: nothing reaps it while the test runs).
fn assert_running(agent: &Agent) {
    let pid = agent_pid(agent);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|_| panic!("agent {pid} is gone:\n{}", agent.log()));
    let state = status.lines().find(|l| l.starts_with("State:")).unwrap_or_default();
    assert!(!state.contains('Z') && !state.contains('X'), "agent {pid} died ({state}):\n{}", agent.log());
}

/// The agent is running and serves a normal client: qemu-io reads over TCP
/// (over TLS with `creds`).
fn assert_serves(agent: &Agent, creds: Option<&Path>, case: &str) {
    assert_running(agent);
    let out = match creds {
        Some(c) => qemu_io_tls(agent, c, &["read 0 64k"]),
        None => qemu_io_plain(&agent.tcp_uri(EXPORT), &["read 0 64k"]),
    };
    assert!(qemu_io_ok(&out), "after {case}: a normal client is not served: {}\n{}", text(&out), agent.log());
}

/// Runs `python3 SCRIPT ARGS...` (the system Python, for `ssl` and `nbd`).
fn python(agent: &Agent, name: &str, script: &str, args: &[&str]) -> Output {
    let file = agent.dir().join(name);
    std::fs::write(&file, script).unwrap();
    let mut all = vec![path(&file)];
    all.extend_from_slice(args);
    output("/usr/bin/python3", &all)
}

/// libnbd (python3-libnbd) reads `LEN` bytes at `OFFSET` of the export at
/// `URI` and checks they all are `BYTE`; `nbds://` URIs with
/// `tls-certificates` need `set_uri_allow_local_file`, which `nbdsh -u` lacks.
const LIBNBD_READ_PY: &str = r#"
import nbd, sys
uri, offset, length, byte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
assert h.get_size() == 16 << 20
assert h.pread(length, offset) == bytes([byte]) * length
h.shutdown()
print('ok')
"#;

/// Reads over `uri` with libnbd and checks the pattern.
fn libnbd_read(agent: &Agent, uri: &str, offset: u64, length: u32, byte: u8) {
    let args = [uri, &offset.to_string(), &length.to_string(), &byte.to_string()];
    let out = python(agent, "libnbd_read.py", LIBNBD_READ_PY, &args);
    assert!(out.status.success(), "libnbd read over {uri}: {}", text(&out));
}

/// STARTTLS by hand with Python's `ssl` (OpenSSL sends the configured client
/// certificate whatever CA names the server asks for, which gnutls does not),
/// then GO. Prints GO-ACK and exits 0 only if the export was granted.
const TLS_CLIENT_PY: &str = r#"
import socket, ssl, struct, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
cert, key = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else (None, None)
IHAVEOPT = 0x49484156454f5054
def recvn(s, n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError('closed after %d of %d bytes' % (len(b), n))
        b += c
    return b
def opt(s, code, data=b''):
    s.sendall(struct.pack('>QII', IHAVEOPT, code, len(data)) + data)
def reply(s):
    magic, o, typ, ln = struct.unpack('>QIII', recvn(s, 20))
    return typ, recvn(s, ln)
s = socket.create_connection(('127.0.0.1', port), timeout=10)
recvn(s, 18)
s.sendall(struct.pack('>I', 3))
opt(s, 5)
typ, _ = reply(s)
if typ != 1:
    print('STARTTLS-REFUSED %#x' % typ); sys.exit(3)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cafile)
if cert: ctx.load_cert_chain(cert, key)
try:
    t = ctx.wrap_socket(s, server_hostname='localhost')
    name = b'vm1/disk0'
    opt(t, 7, struct.pack('>I', len(name)) + name + b'\0\0')
    while True:
        typ, body = reply(t)
        if typ == 1: print('GO-ACK'); sys.exit(0)
        if typ & 0x80000000: print('GO-ERR %#x' % typ); sys.exit(4)
except (ssl.SSLError, EOFError, ConnectionError, OSError) as e:
    print('TLS-FAILED', type(e).__name__, e); sys.exit(5)
"#;

// ---------------------------------------------------------------------------
// Raw sockets

/// Connects over TCP and reads the 18-byte greeting.
fn dial(agent: &Agent) -> TcpStream {
    let mut s = TcpStream::connect(agent.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(u64::from_be_bytes(greeting[..8].try_into().unwrap()), NBD_MAGIC);
    assert_eq!(u64::from_be_bytes(greeting[8..16].try_into().unwrap()), IHAVEOPT);
    s
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u64(IHAVEOPT);
    out.put_u32(code);
    out.put_u32(u32::try_from(data.len()).unwrap());
    out.put_slice(data);
    out.to_vec()
}

fn go_data(export: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u32(u32::try_from(export.len()).unwrap());
    out.put_slice(export.as_bytes());
    out.put_u16(0);
    out.to_vec()
}

/// Client flags (fixed newstyle + no zeroes).
const FLAGS: [u8; 4] = [0, 0, 0, 3];

/// Reads one option reply: (option, type, data).
fn opt_reply(s: &mut TcpStream) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    assert_eq!(u64::from_be_bytes(head[..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
    let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((option, ty, body))
}

/// Negotiates `vm1/disk0` with GO (simple replies) over TCP.
fn negotiated(agent: &Agent) -> TcpStream {
    let mut s = dial(agent);
    s.write_all(&FLAGS).unwrap();
    s.write_all(&option(opt::GO, &go_data(EXPORT))).unwrap();
    loop {
        let (_, ty, body) = opt_reply(&mut s).unwrap();
        assert_eq!(ty & rep::ERR_BIT, 0, "GO refused {ty:#x}: {}", String::from_utf8_lossy(&body));
        if ty == rep::ACK {
            return s;
        }
    }
}

fn request(s: &mut TcpStream, command: Cmd, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
    let mut out = BytesMut::new();
    Request { cookie, command, flags: 0, offset, length }.encode(&mut out);
    out.put_slice(payload);
    s.write_all(&out).unwrap();
}

/// Reads one simple reply (with `data_len` bytes of data if it succeeded):
/// (cookie, errno, data).
fn simple_reply(s: &mut TcpStream, data_len: usize) -> (u64, u32, Vec<u8>) {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(u32::from_be_bytes(head[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
    let err = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
    let mut data = vec![0u8; if err == 0 { data_len } else { 0 }];
    s.read_exact(&mut data).unwrap();
    (cookie, err, data)
}

/// Waits until the server closes `s` (EOF or reset), at most `limit`;
/// returns what it still sent and how long it took. Panics if it stays open.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let left = limit.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("connection still open after {limit:?} (received {} bytes)", got.len())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (got, start.elapsed()), // reset
        }
    }
}

/// A read error that means "closed by the server" (EOF or reset), not a timeout.
fn assert_closed(e: &std::io::Error) {
    assert!(!matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "connection not closed: {e}");
}

/// Polls the agent log until it contains `needle` (lines about a connection
/// are written after it is closed).
fn wait_log(agent: &Agent, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.log().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tls_keys(extra: &str) -> String {
    format!("  tls: {{cert: pki/server-cert.pem, key: pki/server-key.pem{extra}}}\n  handshake_timeout_secs: 2\n")
}

// ---------------------------------------------------------------------------
// 1. TLS modes

#[test]
fn tls_required_serves_tls_clients_and_refuses_plaintext() {
    let builder = AgentBuilder::new().simple_vm("vm1", "16MiB");
    let pki = Pki::new(&builder.dir().join("pki"));
    pki.ca("ca").server("server", "ca");
    let creds = pki.creds("trust", &["ca"], None);
    let agent = builder.start_with_nbd(&tls_keys(", mode: required")).unwrap();

    // TLS clients: qemu-io writes and reads a pattern, nbdinfo lists, libnbd reads.
    let out = qemu_io_tls(&agent, &creds, &["write -P 0xab 0 64k", "read -P 0xab 0 64k"]);
    assert!(qemu_io_ok(&out), "qemu-io over TLS: {}", text(&out));
    let out = output("nbdinfo", &["--list", &nbds_uri(&agent, "", &creds)]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(EXPORT), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("with TLS"), "{}", text(&out));
    libnbd_read(&agent, &nbds_uri(&agent, EXPORT, &creds), 0, 65536, 0xab);

    // Plaintext clients are refused and see neither the export nor its data.
    let out = qemu_io_plain(&agent.tcp_uri(EXPORT), &["read -v 0 512"]);
    assert!(!out.status.success(), "plaintext qemu-io let in: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ab ab"), "{}", text(&out));
    let out = output("nbdinfo", &["--list", &agent.tcp_uri("")]);
    assert!(!out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(EXPORT), "{}", text(&out));
    let out = output("nbdinfo", &[&agent.tcp_uri(EXPORT)]);
    assert!(!out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("16777216"), "{}", text(&out));

    // Raw: every option but STARTTLS/ABORT gets ERR_TLS_REQD with no data;
    // EXPORT_NAME (no error reply exists) closes without export data.
    let mut s = dial(&agent);
    s.write_all(&FLAGS).unwrap();
    for (code, data) in [(opt::LIST, vec![]), (opt::INFO, go_data(EXPORT)), (opt::GO, go_data(EXPORT))] {
        s.write_all(&option(code, &data)).unwrap();
        let (o, ty, _) = opt_reply(&mut s).unwrap();
        assert_eq!((o, ty), (code, rep::ERR_TLS_REQD), "option {code}");
    }
    s.write_all(&option(opt::EXPORT_NAME, EXPORT.as_bytes())).unwrap();
    let (rest, _) = wait_closed(&mut s, Duration::from_secs(5));
    assert!(rest.is_empty(), "EXPORT_NAME without TLS answered {rest:?}");

    // STARTTLS with a plaintext GO in the same packet: the injected option is
    // never answered (CVE-2021-3716-style injection); the connection ends.
    let mut s = dial(&agent);
    let mut out = FLAGS.to_vec();
    out.extend(option(opt::STARTTLS, &[]));
    out.extend(option(opt::GO, &go_data(EXPORT)));
    s.write_all(&out).unwrap();
    let (o, ty, _) = opt_reply(&mut s).unwrap();
    assert_eq!((o, ty), (opt::STARTTLS, rep::ACK));
    let (rest, _) = wait_closed(&mut s, Duration::from_secs(5));
    assert!(rest.is_empty(), "plaintext injected after STARTTLS got {} bytes of answer", rest.len());

    // STARTTLS then garbage instead of a ClientHello: closed at once.
    let mut s = dial(&agent);
    s.write_all(&FLAGS).unwrap();
    s.write_all(&option(opt::STARTTLS, &[])).unwrap();
    assert_eq!(opt_reply(&mut s).unwrap().1, rep::ACK);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (_, took) = wait_closed(&mut s, Duration::from_secs(5));
    assert!(took < Duration::from_millis(1500), "garbage TLS closed after {took:?}");

    // STARTTLS then silence: the TLS handshake is under the handshake timeout (2 s).
    let mut s = dial(&agent);
    s.write_all(&FLAGS).unwrap();
    s.write_all(&option(opt::STARTTLS, &[])).unwrap();
    assert_eq!(opt_reply(&mut s).unwrap().1, rep::ACK);
    let (_, took) = wait_closed(&mut s, Duration::from_secs(10));
    eprintln!("stalled TLS handshake closed after {took:?} (handshake_timeout_secs: 2)");
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}, before the timeout");

    assert_serves(&agent, Some(&creds), "TLS hostile cases");
}

#[test]
fn tls_optional_serves_plaintext_and_tls_clients() {
    let builder = AgentBuilder::new().simple_vm("vm1", "16MiB");
    let pki = Pki::new(&builder.dir().join("pki"));
    pki.ca("ca").server("server", "ca");
    let creds = pki.creds("trust", &["ca"], None);
    let agent = builder.start_with_nbd(&tls_keys(", mode: optional")).unwrap();
    let plain = agent.tcp_uri(EXPORT);

    let out = qemu_io_plain(&plain, &["write -P 0xcd 0 64k"]);
    assert!(qemu_io_ok(&out), "plaintext: {}", text(&out));
    let out = qemu_io_tls(&agent, &creds, &["read -P 0xcd 0 64k", "write -P 0xef 64k 64k"]);
    assert!(qemu_io_ok(&out), "TLS: {}", text(&out));
    let out = qemu_io_plain(&plain, &["read -P 0xef 64k 64k"]);
    assert!(qemu_io_ok(&out), "plaintext: {}", text(&out));

    let out = output("nbdinfo", &["--list", &agent.tcp_uri("")]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(EXPORT), "{}", text(&out));
    let out = output("nbdinfo", &["--list", &nbds_uri(&agent, "", &creds)]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && listing.contains(EXPORT) && listing.contains("with TLS"), "{}", text(&out));
    libnbd_read(&agent, &nbds_uri(&agent, EXPORT, &creds), 65536, 65536, 0xef);
    assert_serves(&agent, Some(&creds), "optional TLS");
    assert_serves(&agent, None, "optional TLS");
}

#[test]
fn tls_off_refuses_starttls_cleanly() {
    let builder = AgentBuilder::new().simple_vm("vm1", "16MiB");
    let pki = Pki::new(&builder.dir().join("pki"));
    pki.ca("ca").server("server", "ca");
    let creds = pki.creds("trust", &["ca"], None);
    let agent = builder.start_with_nbd(&tls_keys(", mode: off")).unwrap();

    let start = Instant::now();
    let out = output("nbdinfo", &[&nbds_uri(&agent, EXPORT, &creds)]);
    assert!(!out.status.success(), "nbds:// client served without TLS: {}", text(&out));
    let out = qemu_io_tls(&agent, &creds, &["read 0 4k"]);
    assert!(!out.status.success(), "qemu-io with tls-creds served without TLS: {}", text(&out));
    assert!(start.elapsed() < Duration::from_secs(5), "TLS clients took {:?} to fail", start.elapsed());

    // Raw: STARTTLS answers ERR_POLICY and the connection stays usable.
    let mut s = dial(&agent);
    s.write_all(&FLAGS).unwrap();
    s.write_all(&option(opt::STARTTLS, &[])).unwrap();
    assert_eq!(opt_reply(&mut s).unwrap().1, rep::ERR_POLICY);
    s.write_all(&option(opt::GO, &go_data(EXPORT))).unwrap();
    loop {
        let (_, ty, _) = opt_reply(&mut s).unwrap();
        assert_eq!(ty & rep::ERR_BIT, 0, "GO after refused STARTTLS: {ty:#x}");
        if ty == rep::ACK {
            break;
        }
    }
    request(&mut s, Cmd::Read, 1, 0, 512, &[]);
    assert_eq!(simple_reply(&mut s, 512).1, 0);
    assert_serves(&agent, None, "TLS off");
}

// ---------------------------------------------------------------------------
// 2. Client certificates

#[test]
fn client_certificates_are_required_and_verified() {
    let builder = AgentBuilder::new().simple_vm("vm1", "16MiB");
    let pki = Pki::new(&builder.dir().join("pki"));
    pki.ca("ca").ca("other").server("server", "ca");
    pki.client("client", "ca", "2").client("stranger", "other", "2").client("expired", "ca", "-1");
    let anonymous = pki.creds("anonymous", &["ca"], None);
    // qemu checks its own certificate against ca-cert.pem, so the stranger's
    // bundle holds both CAs: the refusal must come from the server.
    let stranger = pki.creds("stranger", &["ca", "other"], Some("stranger"));
    let good = pki.creds("good", &["ca"], Some("client"));
    let agent = builder.start_with_nbd(&tls_keys(", client_ca: pki/ca-cert.pem")).unwrap();

    for (who, creds) in [("no certificate", &anonymous), ("certificate from another CA", &stranger)] {
        let out = qemu_io_tls(&agent, creds, &["read -v 0 512"]);
        assert!(!out.status.success(), "qemu-io with {who} let in: {}", text(&out));
        let out = output("nbdinfo", &[&nbds_uri(&agent, EXPORT, creds)]);
        assert!(!out.status.success(), "nbdinfo with {who} let in: {}", text(&out));
    }
    let out = qemu_io_tls(&agent, &good, &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
    assert!(qemu_io_ok(&out), "qemu-io with a client certificate: {}", text(&out));
    let out = output("nbdinfo", &[&nbds_uri(&agent, EXPORT, &good)]);
    assert!(out.status.success(), "nbdinfo with a client certificate: {}", text(&out));

    // gnutls sends no certificate the server did not ask for by CA name, so
    // the cases above end as "no certificate". OpenSSL sends it anyway: the
    // server itself must refuse a certificate from another CA, the server's
    // own certificate (no clientAuth usage) and an expired one.
    let ca = pki.cert("ca");
    let py = |who: &str| {
        let (cert, key) = (pki.cert(who), pki.key(who));
        python(
            &agent,
            "tls_client.py",
            TLS_CLIENT_PY,
            &[&agent.tcp.port().to_string(), path(&ca), path(&cert), path(&key)],
        )
    };
    for who in ["stranger", "server", "expired"] {
        let out = py(who);
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stdout).contains("TLS-FAILED"),
            "{who}: {}",
            text(&out)
        );
    }
    let out = python(&agent, "tls_client.py", TLS_CLIENT_PY, &[&agent.tcp.port().to_string(), path(&ca)]);
    assert!(!out.status.success(), "no certificate: {}", text(&out));
    let out = py("client");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("GO-ACK"), "{}", text(&out));
    for why in ["UnknownIssuer", "Expired", "InvalidPurpose", "NoCertificatesPresented"] {
        wait_log(&agent, why); // the server's own reasons, not the client's
    }
    assert_serves(&agent, Some(&good), "client certificate checks");
}

// ---------------------------------------------------------------------------
// 3. Certificate reload

/// A libnbd client that stays connected across the reload: write and read,
/// say "before", wait for a line on stdin, read and write again, say "after".
const HELD_CLIENT_PY: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
h.pwrite(b'\x71' * 65536, 0)
assert h.pread(65536, 0) == b'\x71' * 65536
print('before', flush=True)
sys.stdin.readline()
assert h.pread(65536, 0) == b'\x71' * 65536
h.pwrite(b'\x72' * 65536, 65536)
h.flush()
assert h.pread(65536, 65536) == b'\x72' * 65536
print('after', flush=True)
h.shutdown()
"#;

/// Replaces `dst` atomically with the contents of `src`.
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

#[test]
fn sighup_reloads_certificates_and_open_connections_survive() {
    let builder = AgentBuilder::new().simple_vm("vm1", "16MiB");
    let pki = Pki::new(&builder.dir().join("pki"));
    pki.ca("ca").server("server", "ca").ca("ca-new").server("server-new", "ca-new");
    let old = pki.creds("old", &["ca"], None);
    let new = pki.creds("new", &["ca-new"], None);
    let agent = builder.start_with_nbd(&tls_keys("")).unwrap();
    let trusted = |creds: &Path| qemu_io_ok(&qemu_io_tls(&agent, creds, &["read 0 4k"]));
    assert!(trusted(&old) && !trusted(&new), "before the reload only the old CA works");

    // A TLS connection opened before the reload.
    let script = agent.dir().join("held.py");
    std::fs::write(&script, HELD_CLIENT_PY).unwrap();
    let mut held = Command::new("/usr/bin/python3")
        .args([path(&script), &nbds_uri(&agent, EXPORT, &old)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = held.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let expect = |word: &str, held: &mut std::process::Child| match lines.recv_timeout(Duration::from_secs(20)) {
        Ok(line) if line == word => {}
        other => {
            let _ = held.kill();
            let mut err = String::new();
            let _ = held.stderr.take().unwrap().read_to_string(&mut err);
            panic!("held client: expected {word}, got {other:?}: {err}\n{}", agent.log());
        }
    };
    expect("before", &mut held);

    // New pair from a new CA; SIGHUP.
    replace(&pki.cert("server-new"), &pki.cert("server"));
    replace(&pki.key("server-new"), &pki.key("server"));
    agent.signal(libc::SIGHUP);
    wait_log(&agent, "NBD TLS certificates reloaded");
    assert!(trusted(&new), "after the reload a client trusting the new CA is refused:\n{}", agent.log());
    assert!(!trusted(&old), "after the reload a client trusting only the old CA still connects");

    // The connection from before the reload keeps working.
    held.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    expect("after", &mut held);
    assert!(held.wait().unwrap().success());

    // A broken certificate on SIGHUP is logged and the last good one stays.
    std::fs::write(pki.cert("server"), "not a certificate\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_log(&agent, "TLS reload failed");
    assert!(trusted(&new) && !trusted(&old), "a failed reload changed the served certificate");
    assert_serves(&agent, Some(&new), "certificate reload");
}

// ---------------------------------------------------------------------------
// 4. Hostile input

#[test]
fn hostile_handshakes_close_only_that_connection() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start_with_nbd("  handshake_timeout_secs: 2\n").unwrap();
    let pid = agent_pid(&agent);
    let hwm0 = proc_kib(pid, "VmHWM");
    let fast = Duration::from_millis(1500);
    let mut header = BytesMut::new();
    Request { cookie: 1, command: Cmd::Read, flags: 0, offset: 0, length: 512 }.encode(&mut header);

    // A transmission request right after the greeting (as client flags).
    let mut s = dial(&agent);
    s.write_all(&header).unwrap();
    let (rest, took) = wait_closed(&mut s, Duration::from_secs(10));
    assert!(rest.is_empty() && took < fast, "request as client flags: {} bytes, closed after {took:?}", rest.len());
    assert_serves(&agent, None, "request before the client flags");

    // Client flags, then a transmission request instead of an option.
    let mut s = dial(&agent);
    s.write_all(&FLAGS).unwrap();
    s.write_all(&header).unwrap();
    let (rest, took) = wait_closed(&mut s, Duration::from_secs(10));
    assert!(rest.is_empty() && took < fast, "request as option: {} bytes, closed after {took:?}", rest.len());
    assert_serves(&agent, None, "request during option haggling");

    // 1025 small options: exactly 1024 are answered, then the connection closes.
    let mut s = dial(&agent);
    let mut flood = FLAGS.to_vec();
    for _ in 0..1025 {
        flood.extend(option(0xdead, &[]));
    }
    s.write_all(&flood).unwrap();
    let mut answered = 0;
    let end = loop {
        match opt_reply(&mut s) {
            Ok((o, ty, _)) => assert_eq!((o, ty), (0xdead, rep::ERR_UNSUP)),
            Err(e) => break e,
        }
        answered += 1;
    };
    assert_closed(&end);
    assert_eq!(answered, 1024, "options answered before the limit closed the connection");
    assert_serves(&agent, None, "1025 options");

    // 20000 options in one go: closed after at most 1024 answers, fast.
    let mut s = dial(&agent);
    let mut flood = FLAGS.to_vec();
    for _ in 0..20000 {
        flood.extend(option(opt::STRUCTURED_REPLY, &[]));
    }
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&flood).is_ok());
    let start = Instant::now();
    let mut answered = 0;
    let end = loop {
        match opt_reply(&mut s) {
            Ok((_, ty, _)) => assert_eq!(ty, rep::ACK),
            Err(e) => break e,
        }
        answered += 1;
    };
    assert_closed(&end);
    let _ = sender.join();
    eprintln!("20000-option flood: {answered} answered, closed after {:?}", start.elapsed());
    assert!(answered <= 1024 && start.elapsed() < Duration::from_secs(5), "{answered} options answered");
    assert_serves(&agent, None, "20000 options");

    // Option lengths over the 64 KiB limit, up to 0xFFFFFFFF: closed at once,
    // nothing allocated for them.
    for len in [0xFFFF_FFFFu32, 0x8000_0000, (64 << 10) + 1] {
        let mut s = dial(&agent);
        let mut out = FLAGS.to_vec();
        out.put_u64(IHAVEOPT);
        out.put_u32(opt::GO);
        out.put_u32(len);
        out.extend_from_slice(&[0u8; 1000]);
        s.write_all(&out).unwrap();
        let (rest, took) = wait_closed(&mut s, Duration::from_secs(10));
        assert!(rest.is_empty() && took < fast, "option length {len:#x}: closed after {took:?}");
        assert_serves(&agent, None, &format!("option length {len:#x}"));
    }
    // The largest allowed option, sent partly, then dropped.
    let mut s = dial(&agent);
    let mut out = FLAGS.to_vec();
    out.put_u64(IHAVEOPT);
    out.put_u32(opt::GO);
    out.put_u32(64 << 10);
    out.extend_from_slice(&[0u8; 30000]);
    s.write_all(&out).unwrap();
    drop(s);
    assert_serves(&agent, None, "partial maximal option");

    let hwm = proc_kib(pid, "VmHWM");
    eprintln!("hostile handshakes: agent VmHWM {hwm0} KiB -> {hwm} KiB");
    assert!(hwm - hwm0 < 64 << 10, "peak RSS grew by {} KiB", hwm - hwm0);
}

#[test]
fn slow_drip_handshake_is_dropped_after_the_timeout() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start_with_nbd("  handshake_timeout_secs: 2\n").unwrap();
    // A valid negotiation, one byte per second.
    let mut bytes = FLAGS.to_vec();
    bytes.extend(option(opt::GO, &go_data(EXPORT)));
    let mut s = dial(&agent);
    let start = Instant::now();
    let mut sent = 0;
    let closed = loop {
        if s.write_all(&bytes[sent..=sent]).is_err() {
            break start.elapsed();
        }
        sent += 1;
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        match s.read(&mut [0u8; 64]) {
            Ok(0) => break start.elapsed(),
            Ok(n) => panic!("server answered {n} bytes to a partial option"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break start.elapsed(),
        }
        assert!(sent < bytes.len(), "the whole handshake dripped in without a timeout");
    };
    eprintln!("slow drip: closed after {closed:?} and {sent} bytes (handshake_timeout_secs: 2)");
    assert!(closed >= Duration::from_millis(1500) && closed < Duration::from_secs(6), "closed after {closed:?}");
    wait_log(&agent, "Negotiation timed out");
    assert_serves(&agent, None, "slow drip");
}

/// Number of open descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Raises the soft open-files limit to at least `want` (within the hard limit).
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn connection_flood_is_bounded_and_the_agent_recovers() {
    raise_nofile(4096);
    let agent = AgentBuilder::new()
        .simple_vm("vm1", "16MiB")
        .start_with_nbd("  max_connections: 256\n  handshake_timeout_secs: 2\n")
        .unwrap();
    let pid = agent_pid(&agent);
    let uri = agent.tcp_uri(EXPORT);
    let hwm0 = proc_kib(pid, "VmHWM");
    let fds0 = open_fds(pid);

    // 200 idle handshakes (under the limit): a normal client still gets in.
    let idle: Vec<TcpStream> = (0..200).map(|_| dial(&agent)).collect();
    let start = Instant::now();
    let out = qemu_io_plain(&uri, &["read 0 64k"]);
    assert!(qemu_io_ok(&out), "with 200 idle handshakes open: {}", text(&out));
    eprintln!("connection flood: qemu-io with 200 idle handshakes open: ok in {:?}", start.elapsed());
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > fds0 {
        assert!(Instant::now() < deadline, "the agent still holds the closed handshakes");
        std::thread::sleep(Duration::from_millis(10));
    }

    // 256 idle handshakes fill every slot: a normal client is refused until
    // the handshake timeout (2 s) frees them. Measure that window.
    let held: Vec<TcpStream> = (0..256).map(|_| dial(&agent)).collect();
    let start = Instant::now();
    let mut attempts = 0;
    while !qemu_io_ok(&qemu_io_plain(&uri, &["read 0 64k"])) {
        attempts += 1;
        assert!(start.elapsed() < Duration::from_secs(10), "no normal client served for 10 s:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "connection flood: with 256 idle handshakes open, qemu-io refused {attempts} times, served after {:?}",
        start.elapsed()
    );
    drop(held);

    // 1000 connections that sit in the handshake. The agent never holds more
    // than 256 of them: its open descriptors are sampled throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(open_fds(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        })
    };
    let start = Instant::now();
    let addr = agent.tcp;
    let mut flood: Vec<TcpStream> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| scope.spawn(move || (0..250).map(|_| TcpStream::connect(addr).unwrap()).collect::<Vec<_>>()))
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let connected = start.elapsed();
    let mut greeted = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut greeting = [0u8; 18];
        if s.read_exact(&mut greeting).is_ok() {
            greeted += 1;
        }
    }
    eprintln!(
        "connection flood: 1000 connects in {connected:?}, {greeted} greeted, {} refused (max_connections: 256)",
        1000 - greeted
    );
    assert!((1..1000).contains(&greeted), "{greeted} of 1000 connections greeted");

    // A normal client while the flood holds the slots: refused until the
    // handshake timeout (2 s) frees them. Measure how long it takes.
    let since_flood = start;
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        if qemu_io_ok(&qemu_io_plain(&uri, &["read 0 64k"])) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no normal client served for 15 s:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "connection flood: qemu-io refused until {:?} after the connects ({:?} after the flood began), \
         served on attempt {attempts}; flood sockets still open",
        start.elapsed(),
        since_flood.elapsed()
    );
    drop(flood);
    stop.store(true, Ordering::Relaxed);
    let max_fds = sampler.join().unwrap();
    eprintln!("connection flood: agent descriptors {fds0} before, at most {max_fds} during the flood");
    assert!(max_fds <= fds0 + 256 + 8, "agent held {} connections at once", max_fds - fds0);
    assert!(agent.log().contains("connection limit reached"));
    assert_serves(&agent, None, "connection flood");
    let hwm = proc_kib(pid, "VmHWM");
    eprintln!("connection flood: agent VmHWM {hwm0} KiB -> {hwm} KiB");
    assert!(hwm < 200 << 10, "peak RSS {hwm} KiB");
}

#[test]
fn huge_lengths_and_wrapping_offsets_in_transmission() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start().unwrap();
    let pid = agent_pid(&agent);
    let hwm0 = proc_kib(pid, "VmHWM");

    // A WRITE of 0xFFFFFFFF bytes with no payload, then close.
    let mut s = negotiated(&agent);
    request(&mut s, Cmd::Write, 1, 0, u32::MAX, &[]);
    drop(s);
    assert_serves(&agent, None, "WRITE of 0xFFFFFFFF without payload");

    // The same followed by 256 MiB of payload: skipped as it streams, not buffered.
    let mut s = negotiated(&agent);
    request(&mut s, Cmd::Write, 1, 0, u32::MAX, &[]);
    let junk = vec![0x66u8; 1 << 20];
    for _ in 0..256 {
        s.write_all(&junk).unwrap();
    }
    drop(s);
    assert_serves(&agent, None, "WRITE of 0xFFFFFFFF with 256 MiB of payload");

    // Offsets whose end wraps past u64::MAX land nowhere (a READ is in
    // nbd_protocol.rs); the data at the wrapped-to offsets is untouched.
    let mut s = negotiated(&agent);
    request(&mut s, Cmd::Write, 1, 0, 8192, &[0x42; 8192]);
    assert_eq!(simple_reply(&mut s, 0).1, 0);
    let near = u64::MAX - 511;
    request(&mut s, Cmd::Write, 2, near, 4096, &[0x99; 4096]);
    request(&mut s, Cmd::WriteZeroes, 3, near, 8192, &[]);
    request(&mut s, Cmd::Trim, 4, near, 8192, &[]);
    request(&mut s, Cmd::Cache, 5, near, 8192, &[]);
    request(&mut s, Cmd::Write, 6, u64::MAX, 1, &[0x99]);
    request(&mut s, Cmd::Read, 7, u64::MAX, u32::MAX, &[]);
    request(&mut s, Cmd::Trim, 8, 0, u32::MAX, &[]);
    let mut got: Vec<(u64, u32)> = (0..7).map(|_| simple_reply(&mut s, 0)).map(|(c, e, _)| (c, e)).collect();
    got.sort_unstable();
    assert_eq!(
        got,
        [
            (2, errno::ENOSPC),
            (3, errno::ENOSPC),
            (4, errno::ENOSPC),
            (5, errno::EINVAL),
            (6, errno::ENOSPC),
            (7, errno::EOVERFLOW),
            (8, errno::ENOSPC)
        ]
    );
    request(&mut s, Cmd::Read, 9, 0, 8192, &[]);
    let (cookie, err, data) = simple_reply(&mut s, 8192);
    assert_eq!((cookie, err), (9, 0));
    assert!(data.iter().all(|&b| b == 0x42), "a wrapping request changed offset 0..8192");
    drop(s);
    assert_serves(&agent, None, "wrapping offsets");

    let hwm = proc_kib(pid, "VmHWM");
    eprintln!("huge lengths: agent VmHWM {hwm0} KiB -> {hwm} KiB");
    assert!(hwm - hwm0 < 128 << 10, "peak RSS grew by {} KiB", hwm - hwm0);
}

/// BUG (reported): replies are queued without bound. A client that pipelines
/// READs and never reads the replies makes the agent hold every reply in
/// memory: each 28-byte READ of 32 MiB adds 32 MiB of RSS (inline page-cache
/// reads bypass the 64 MiB in-flight budget, and the budget's permits are
/// released when a reply is queued, not when it is written; the reply
/// channel is unbounded). Stops sending as soon as the bound is exceeded.
#[test]
fn unread_replies_do_not_grow_memory_without_bound() {
    let agent = AgentBuilder::new().simple_vm("vm1", "64MiB").start().unwrap();
    let pid = agent_pid(&agent);
    let mut s = negotiated(&agent);
    let rss0 = proc_kib(pid, "VmRSS");
    let bound = 256 << 10; // KiB: the 64 MiB budget, one reply in the writer, slack
    let mut grew = 0;
    for cookie in 0..32u64 {
        request(&mut s, Cmd::Read, cookie, 0, 32 << 20, &[]);
        std::thread::sleep(Duration::from_millis(150));
        grew = proc_kib(pid, "VmRSS").saturating_sub(rss0);
        eprintln!("{} unread READs of 32 MiB: RSS +{} MiB", cookie + 1, grew >> 10);
        if grew > bound {
            break;
        }
    }
    drop(s);
    assert!(grew <= bound, "agent RSS grew by {} MiB for unread replies", grew >> 10);
    assert_serves(&agent, None, "unread replies");
}

/// FINDING (reported): `max_connections` is one pool for every listener and
/// a negotiated session holds its slot for as long as the client likes (no
/// idle timeout after the handshake). A network client that opens
/// `max_connections` sessions and sends nothing locks everyone out for good,
/// the VM's own QEMU on the Unix socket included.
#[test]
fn idle_tcp_sessions_do_not_lock_out_the_unix_socket() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start_with_nbd("  max_connections: 16\n").unwrap();
    let idle: Vec<TcpStream> = (0..16).map(|_| negotiated(&agent)).collect();
    std::thread::sleep(Duration::from_secs(3));
    let out = qemu_io_plain(&agent.unix_uri(EXPORT), &["read 0 64k"]);
    assert!(qemu_io_ok(&out), "16 idle TCP sessions lock out the Unix socket: {}", text(&out));
    drop(idle);
}

/// A client that pipelines BLOCK_STATUS over a fragmented image and never reads the replies:
/// each 28-byte request asks for a reply of up to 512 KiB per context. The replies must count
/// against the connection's in-flight budget like READ data, or the agent's memory grows
/// without bound.
#[test]
fn unread_block_status_replies_do_not_grow_memory_without_bound() {
    let builder = AgentBuilder::new().simple_vm("vm1", "64MiB");
    // Every other 4 KiB block holds data: 16384 extents, a 128 KiB reply per request.
    let images = builder.dir().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let image = std::fs::File::create(images.join("vm1-disk0.raw")).unwrap();
    image.set_len(64 << 20).unwrap();
    for block in (0..(64u64 << 20) / 8192).map(|i| i * 8192) {
        std::os::unix::fs::FileExt::write_all_at(&image, &[0xab; 4096], block).unwrap();
    }
    image.sync_all().unwrap();
    let agent = builder.start().unwrap();
    let pid = agent_pid(&agent);
    let mut s = dial(&agent);
    s.write_all(&FLAGS).unwrap();
    s.write_all(&option(opt::STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(opt_reply(&mut s).unwrap().1, rep::ACK);
    let mut meta = BytesMut::new();
    meta.put_u32(u32::try_from(EXPORT.len()).unwrap());
    meta.put_slice(EXPORT.as_bytes());
    meta.put_u32(1);
    meta.put_u32(15);
    meta.put_slice(b"base:allocation");
    s.write_all(&option(opt::SET_META_CONTEXT, &meta)).unwrap();
    while opt_reply(&mut s).unwrap().1 != rep::ACK {}
    s.write_all(&option(opt::GO, &go_data(EXPORT))).unwrap();
    loop {
        let (_, ty, body) = opt_reply(&mut s).unwrap();
        assert_eq!(ty & rep::ERR_BIT, 0, "GO refused {ty:#x}: {}", String::from_utf8_lossy(&body));
        if ty == rep::ACK {
            break;
        }
    }
    let rss0 = proc_kib(pid, "VmRSS");
    let bound = 256 << 10; // KiB: the 64 MiB budget, replies in the writer and the socket, slack
                           // 28-byte requests: 20,000 fit in the socket buffers whether or not the agent reads them.
    let mut out = BytesMut::new();
    for cookie in 0..20_000u64 {
        Request { cookie, command: Cmd::BlockStatus, flags: 0, offset: 0, length: 64 << 20 }.encode(&mut out);
    }
    s.set_nonblocking(true).unwrap();
    let (mut sent, mut grew, mut peak_at) = (0, 0, Instant::now());
    let started = Instant::now();
    // Until the agent's memory stopped growing for 3 s (it holds what the budget allows) or
    // passed the bound; at most 60 s.
    while started.elapsed() < Duration::from_secs(60) && peak_at.elapsed() < Duration::from_secs(3) {
        match s.write(&out[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("sending requests: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = proc_kib(pid, "VmRSS").saturating_sub(rss0);
        if now > grew + 1024 {
            (grew, peak_at) = (now, Instant::now());
            eprintln!("{} requests sent, {:?}: RSS +{} MiB", sent / 28, started.elapsed(), grew >> 10);
        }
        if grew > bound {
            break;
        }
    }
    drop(s);
    assert!(grew <= bound, "agent RSS grew by {} MiB for unread BLOCK_STATUS replies", grew >> 10);
    assert_serves(&agent, None, "unread BLOCK_STATUS replies");
}
