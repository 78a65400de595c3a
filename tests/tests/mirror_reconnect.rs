//! Mirrors across a network blip: the real agent mirrors a disk that
//! qemu-io keeps writing to qemu-nbd through a TCP proxy the test cuts (every
//! connection closed, new ones refused). A cut shorter than
//! `nbd.client_reconnect_secs` (3 s against 5 s) is survived (the destination ends equal to
//! the source); a longer one fails the mirror with every bitmap bit kept.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{capture, qemu_io, run, Agent, AgentBuilder, Rng};

const MIB: u64 = 1 << 20;

/// Where a proxy forwards to.
#[derive(Clone)]
enum Upstream {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

type Halves = (Box<dyn std::io::Read + Send>, Box<dyn std::io::Write + Send>, Box<dyn Fn() + Send>);

impl Upstream {
    /// Reader, writer, and a hang-up of the connection.
    fn connect(&self) -> std::io::Result<Halves> {
        match self {
            Upstream::Unix(p) => {
                let s = UnixStream::connect(p)?;
                let (r, w, h) = (s.try_clone()?, s.try_clone()?, s);
                Ok((Box::new(r), Box::new(w), Box::new(move || drop(h.shutdown(Shutdown::Both)))))
            }
            Upstream::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                let (r, w, h) = (s.try_clone()?, s.try_clone()?, s);
                Ok((Box::new(r), Box::new(w), Box::new(move || drop(h.shutdown(Shutdown::Both)))))
            }
        }
    }
}

/// A TCP proxy that can be cut.
struct Proxy {
    port: u16,
    state: Arc<Mutex<(bool, Vec<TcpStream>)>>,
}

impl Proxy {
    fn start(upstream: Upstream) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new((true, Vec::new())));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let mut s = st.lock().unwrap();
                if !s.0 {
                    drop(conn.shutdown(Shutdown::Both));
                    continue;
                }
                let Ok((mut u_read, mut u_write, hang_up)) = upstream.connect() else { continue };
                s.1.push(conn.try_clone().unwrap());
                let (mut c1, mut c2) = (conn.try_clone().unwrap(), conn);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c1, &mut u_write);
                    hang_up();
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u_read, &mut c2);
                    let _ = c2.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy { port, state }
    }

    /// Closes every connection and refuses new ones for `length`.
    fn cut(&self, length: Duration) {
        {
            let mut s = self.state.lock().unwrap();
            s.0 = false;
            for c in s.1.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        std::thread::sleep(length);
        self.state.lock().unwrap().0 = true;
    }
}

/// `qemu-nbd` serving a raw file on a Unix socket (persistent).
struct QemuNbd(Child);

impl QemuNbd {
    fn start(image: &Path, socket: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["-t", "-f", "raw", "-x", "dest", "--cache=none", "-k"])
            .arg(socket)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn job(agent: &Agent, id: &str) -> Value {
    agent.cli_json(&["job", "show", id]).unwrap()
}

/// Waits (at most 60 s) until mirror `id` is ready with nothing left,
/// completes it, and checks that it succeeded after at least one reconnect.
fn converge_and_complete(agent: &Agent, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(agent, id);
        assert_ne!(j["state"], "concluded", "the mirror failed: {j:#}\n{}", agent.log());
        if j["state"] == "ready" && j["detail"]["remaining_bytes"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the mirror did not converge: {j:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.cli_json(&["job", "complete", id]).unwrap();
    let done = agent.wait_job(id, Duration::from_secs(30)).unwrap();
    assert_eq!(done["result"], "success", "{done:#}");
    assert!(done["summary"]["reconnects"].as_u64().unwrap_or(0) >= 1, "no reconnect counted: {done:#}");
}

fn dirty_bytes(agent: &Agent) -> u64 {
    let list = agent.cli_json(&["bitmap", "list", "vm1/disk0"]).unwrap();
    list[0]["dirty_bytes"].as_u64().unwrap_or_else(|| panic!("{list:#}"))
}

fn setup(dir: &Path, rng: &mut Rng) -> (Agent, QemuNbd, Proxy, PathBuf) {
    let vm = "name: vm1\ndisks:\n  - name: disk0\n    image: file:../images/vm1-disk0.raw\n    size: 32MiB\n    \
              bitmaps: [{name: backup, granularity: 64KiB}]\n";
    let agent = AgentBuilder::new().vm("vm1", vm).start_with_nbd("  client_reconnect_secs: 5\n").unwrap();
    let mut data = vec![0u8; 24 * MIB as usize];
    rng.fill(&mut data);
    let seed = dir.join("seed.raw");
    std::fs::write(&seed, &data).unwrap();
    let uri = agent.unix_uri("vm1/disk0");
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &seed.to_string_lossy(), &uri]).unwrap();
    let dest = dir.join("dest.raw");
    std::fs::File::create(&dest).unwrap().set_len(32 * MIB).unwrap();
    let nbd = QemuNbd::start(&dest, &dir.join("dest.sock"));
    let proxy = Proxy::start(Upstream::Unix(dir.join("dest.sock")));
    (agent, nbd, proxy, dest)
}

#[test]
fn a_mirror_survives_a_cut_shorter_than_the_reconnect_window_and_the_destination_equals_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::from_env(0x7e57_0003);
    let (agent, _nbd, proxy, dest) = setup(dir.path(), &mut rng);
    let uri = agent.unix_uri("vm1/disk0");
    let target = format!("nbd://127.0.0.1:{}/dest", proxy.port);
    // Write-blocking: every guest write is forwarded, so the cut meets guest writes in flight.
    let args = ["mirror", "vm1/disk0", "--target", &target, "--sync", "full", "--copy-mode", "write-blocking"];
    // 4 MiB/s: the pass the cut interrupts has longer to go than the reconnect window (it must not
    // run out the window before reconnecting).
    let started = agent.cli_json(&[&args[..], &["--speed", "4MiB"]].concat()).unwrap();
    let id = started["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(800));
    qemu_io(&uri, &["write -P 0x11 1M 64k", "write -P 0x12 30M 128k"]).unwrap();
    // The cut: 3 s, within the 5 s window; the guest writes through it.
    let cut = Instant::now();
    let cutter = std::thread::spawn(move || {
        proxy.cut(Duration::from_secs(3));
        proxy
    });
    std::thread::sleep(Duration::from_millis(300));
    let during = Instant::now();
    qemu_io(&uri, &["write -P 0x13 5M 64k", "write -P 0x14 20M 4k"]).unwrap();
    assert!(during.elapsed() < Duration::from_secs(1), "a guest write waited on the lost destination");
    let running = job(&agent, &id);
    assert_ne!(running["state"], "concluded", "the mirror ended at the cut: {running:#}\n{}", agent.log());
    let _proxy = cutter.join().unwrap();
    // Reconnected within the window (not after the rest of the throttled pass).
    loop {
        let j = job(&agent, &id);
        if j["detail"]["reconnects"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(cut.elapsed() < Duration::from_secs(5), "no reconnect within the 5 s window: {j:#}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    qemu_io(&uri, &["write -P 0x15 9M 64k"]).unwrap();
    converge_and_complete(&agent, &id);
    let source = dir.path().join("source.raw");
    capture(&uri, &source).unwrap();
    let (a, b) = (std::fs::read(&source).unwrap(), std::fs::read(&dest).unwrap());
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(first.is_none() && a.len() == b.len(), "the destination differs from the source at byte {first:?}");
    let _ = std::io::stderr().flush();
}

#[test]
fn a_mirror_cut_off_longer_than_the_reconnect_window_fails_and_keeps_every_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::from_env(0x7e57_0004);
    let (agent, _nbd, proxy, _dest) = setup(dir.path(), &mut rng);
    let before = dirty_bytes(&agent);
    assert!(before >= 24 * MIB, "{before}");
    let target = format!("nbd://127.0.0.1:{}/dest", proxy.port);
    let args = ["mirror", "vm1/disk0", "--target", &target, "--sync", "incremental", "--bitmap", "backup"];
    let started = agent.cli_json(&[&args[..], &["--speed", "4MiB"]].concat()).unwrap();
    let id = started["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(800));
    let cut = Instant::now();
    let cutter = std::thread::spawn(move || proxy.cut(Duration::from_secs(8)));
    let done = agent.wait_job(&id, Duration::from_secs(30)).unwrap();
    let after = cut.elapsed();
    cutter.join().unwrap();
    assert_eq!(done["result"], "failed", "{done:#}");
    assert!(done["error"].as_str().unwrap_or_default().contains("unreachable"), "{done:#}");
    assert!(after >= Duration::from_secs(5), "failed after {after:?}, before the reconnect window ended");
    assert!(dirty_bytes(&agent) >= before, "bits were lost: {} < {before}", dirty_bytes(&agent));
}

/// Over `nbds://` (the source and the destination are agents with TLS): a
/// destination that vanishes without TLS's close message (a cut, a crash)
/// is reconnected too, and the destination ends equal to the source.
#[test]
fn a_tls_mirror_survives_a_cut_too() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tests::Pki::new(&dir.path().join("pki"));
    let both = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n";
    pki.ca("ca").leaf("node", "ca", both, "2");
    let tls = |mode: &str| {
        format!(
            "  tls: {{mode: {mode}, cert: {}, key: {}, client_ca: {}}}\n  client_reconnect_secs: 5\n",
            pki.cert("node").display(),
            pki.key("node").display(),
            pki.cert("ca").display()
        )
    };
    let disk = |vm: &str| {
        format!("name: {vm}\ndisks:\n  - name: disk0\n    image: file:../images/{vm}-disk0.raw\n    size: 32MiB\n")
    };
    let source = AgentBuilder::new().vm("vm1", &disk("vm1")).start_with_nbd(&tls("optional")).unwrap();
    let dest = AgentBuilder::new().vm("vm2", &disk("vm2")).start_with_nbd(&tls("required")).unwrap();
    let mut rng = Rng::from_env(0x7e57_0005);
    let mut data = vec![0u8; 24 * MIB as usize];
    rng.fill(&mut data);
    let seed = dir.path().join("seed.raw");
    std::fs::write(&seed, &data).unwrap();
    let uri = source.unix_uri("vm1/disk0");
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &seed.to_string_lossy(), &uri]).unwrap();
    let proxy = Proxy::start(Upstream::Tcp(dest.tcp));
    let target = format!("nbds://localhost:{}/vm2/disk0", proxy.port);
    let args = ["mirror", "vm1/disk0", "--target", &target, "--sync", "full", "--copy-mode", "write-blocking"];
    let started = source.cli_json(&[&args[..], &["--speed", "4MiB"]].concat()).unwrap();
    let id = started["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(800));
    let cutter = std::thread::spawn(move || {
        proxy.cut(Duration::from_secs(3));
        proxy
    });
    std::thread::sleep(Duration::from_millis(300));
    qemu_io(&uri, &["write -P 0x21 3M 64k"]).unwrap();
    let _proxy = cutter.join().unwrap();
    converge_and_complete(&source, &id);
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    capture(&uri, &a).unwrap();
    capture(&dest.unix_uri("vm2/disk0"), &b).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "the destination differs from the source");
}
