//! Real QEMU guests for the tests: Debian's kernel, an initramfs built here
//! from `busybox-static` and the kernel's own modules, QEMU under TCG.
//!
//! The guest's init is a small shell program driven over its serial
//! console (a Unix socket): `start N [DEV]` runs a writer that writes random
//! 4 KiB blocks to the first N blocks of `/dev/DEV` (vda) with O_DIRECT and keeps
//! each block's checksum in the guest's RAM (so the checksums migrate with
//! the VM); `stop` ends it; `verify` reads every written block back and
//! compares. Every reply is one line `@@ WORD ...`; every failed write is
//! counted (a guest-visible IO error).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// The guest's program (PID 1).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules.order); do insmod /lib/$m.ko; done
stty -F /dev/ttyS0 -echo
: > /tmp/sums; : > /tmp/errs; : > /tmp/wpids
rnd() { echo $(( 0x$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n') % $1 )); }
writer() {
  while [ ! -e /tmp/stop ]; do
    b=$(rnd $2)
    head -c 4096 /dev/urandom > /tmp/blk.$1
    if dd if=/tmp/blk.$1 of=/dev/$1 bs=4096 seek=$b count=1 oflag=direct conv=notrunc 2>/tmp/dderr.$1; then
      echo "$1 $b $(sha256sum /tmp/blk.$1 | cut -c1-64)" >> /tmp/sums
    else
      echo "$1 $b $(cat /tmp/dderr.$1 | tr '\n' ' ')" >> /tmp/errs
    fi
  done
}
verify() {
  awk '{ last[$1 " " $2] = $3 } END { for (k in last) print k, last[k] }' /tmp/sums > /tmp/last
  n=0; bad=0
  while read -r d b s; do
    dd if=/dev/$d of=/tmp/rb bs=4096 skip=$b count=1 iflag=direct 2>/dev/null
    [ "$(sha256sum /tmp/rb | cut -c1-64)" = "$s" ] || { bad=$((bad + 1)); echo "$d $b" >> /tmp/badblocks; }
    n=$((n + 1))
  done < /tmp/last
  echo "@@ VERIFY $n $bad $(wc -l < /tmp/errs)"
}
echo "@@ READY $(cat /sys/block/vda/size)" > /dev/ttyS0
while read -r cmd a1 a2 a3; do
  case "$cmd" in
    ping) echo "@@ PONG" ;;
    start) rm -f /tmp/stop; writer ${a2:-vda} $a1 & echo $! >> /tmp/wpids; echo "@@ STARTED" ;;
    stop) touch /tmp/stop; for p in $(cat /tmp/wpids); do wait $p 2>/dev/null; done; : > /tmp/wpids; echo "@@ STOPPED $(wc -l < /tmp/sums) $(wc -l < /tmp/errs)" ;;
    blocks) echo "@@ BLOCKS $(awk -v d=${a1:-vda} -v f=${a2:-0} 'NR > f && $1 == d { print $2 }' /tmp/sums | sort -un | tr '\n' ' ')" ;;
    count) echo "@@ COUNT $(wc -l < /tmp/sums) $(wc -l < /tmp/errs)" ;;
    errors) echo "@@ ERRORS $(head -c 300 /tmp/errs | tr '\n' '|')" ;;
    verify) verify ;;
    net) ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; echo "@@ NET $?" ;;
    nbd) nbd-client -N "$a2" 10.0.2.100 "$a1" /dev/nbd0 > /tmp/nbdlog 2>&1; echo "@@ NBD $? $(head -c 200 /tmp/nbdlog | tr '\n' ' ')" ;;
    nbdwrite) head -c 65536 /dev/urandom > /tmp/nw; dd if=/tmp/nw of=/dev/nbd0 bs=65536 seek=$a1 count=1 oflag=direct conv=notrunc 2>/dev/null; r=$?; sync; dd if=/dev/nbd0 of=/tmp/nr bs=65536 skip=$a1 count=1 iflag=direct 2>/dev/null; cmp -s /tmp/nw /tmp/nr; echo "@@ NBDWRITE $r $? $(sha256sum /tmp/nw | cut -c1-64)" ;;
    nbdoff) nbd-client -d /dev/nbd0 > /dev/null 2>&1; echo "@@ NBDOFF $?" ;;
    *) echo "@@ UNKNOWN $cmd" ;;
  esac
done < /dev/ttyS0 > /dev/ttyS0
"#;

/// Kernel modules loaded in this order (virtio disk, virtio net, nbd).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "nbd",
];

/// The kernel and initramfs every guest boots.
#[derive(Debug)]
pub struct GuestImage {
    /// `/boot/vmlinuz-*`.
    pub kernel: PathBuf,
    /// The initramfs built here.
    pub initrd: PathBuf,
}

/// Builds the guest image once per test binary.
pub fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| build_image().unwrap_or_else(|e| panic!("cannot build the guest image: {e:#}")))
}

fn build_image() -> Result<GuestImage> {
    let kernel = std::fs::read_dir("/boot")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .max()
        .context("no /boot/vmlinuz-* (install linux-image-amd64)")?;
    let release = kernel.file_name().and_then(|n| n.to_str()).unwrap_or_default().trim_start_matches("vmlinuz-");
    let modules = PathBuf::from("/lib/modules").join(release);
    let mut files: Vec<(String, u32, Vec<u8>)> = Vec::new();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no busybox (install busybox-static)")?;
    files.push(("bin/busybox".into(), 0o100755, std::fs::read(busybox)?));
    files.push(("init".into(), 0o100755, INIT.as_bytes().to_vec()));
    for m in MODULES {
        let found =
            find_module(&modules, m).with_context(|| format!("kernel module {m} not under {}", modules.display()))?;
        files.push((format!("lib/{m}.ko"), 0o100644, std::fs::read(found)?));
    }
    files.push(("lib/modules.order".into(), 0o100644, MODULES.join("\n").into_bytes()));
    // nbd-client (Debian's) with the libraries it links.
    let nbd_client = ["/usr/sbin/nbd-client", "/sbin/nbd-client"].iter().find(|p| Path::new(p).exists());
    if let Some(nbd_client) = nbd_client {
        files.push(("bin/nbd-client".into(), 0o100755, std::fs::read(nbd_client)?));
        let ldd = Command::new("ldd").arg(nbd_client).output()?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = line.split_whitespace().find(|w| w.starts_with('/'));
            if let Some(path) = path {
                files.push((path.trim_start_matches('/').to_owned(), 0o100755, std::fs::read(path)?));
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("rbdsync-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, newc(&files))?;
    Ok(GuestImage { kernel, initrd })
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(found) = find_module(&p, name) {
                return Some(found);
            }
        } else if p.file_name().and_then(|n| n.to_str()) == Some(&format!("{name}.ko")) {
            return Some(p);
        }
    }
    None
}

/// A cpio archive in the kernel's `newc` format (directories implied by
/// the paths are added first).
fn newc(files: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut dirs: Vec<String> = ["proc", "sys", "dev", "tmp", "bin", "lib", "sbin", "usr", "usr/bin", "usr/sbin"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for (path, _, _) in files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.push(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    let mut out = Vec::new();
    let mut ino = 1;
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        ino += 1;
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    for d in &dirs {
        entry(&mut out, d, 0o040755, &[]);
    }
    for (path, mode, data) in files {
        entry(&mut out, path, *mode, data);
    }
    entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}

/// The QEMU system emulator and its data: `RBDSYNC_QEMU_ROOT` (a tree
/// extracted from Debian's qemu-system-x86 package by tests/run.sh, so the
/// newer qemu-utils stays installed), else the installed one.
fn qemu_command() -> Command {
    match std::env::var_os("RBDSYNC_QEMU_ROOT") {
        Some(root) => {
            let root = PathBuf::from(root);
            let mut cmd = Command::new(root.join("usr/bin/qemu-system-x86_64"));
            cmd.env("QEMU_MODULE_DIR", root.join("usr/lib/x86_64-linux-gnu/qemu"));
            cmd.arg("-L").arg(root.join("usr/share/qemu"));
            cmd.args(["-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"]);
            cmd
        }
        None => Command::new("qemu-system-x86_64"),
    }
}

/// One NBD disk of a guest.
#[derive(Debug, Clone)]
pub struct GuestDisk {
    /// The agent's NBD Unix socket.
    pub socket: PathBuf,
    /// Export name (`VM/DISK`).
    pub export: String,
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Working directory (sockets, logs).
    pub dir: PathBuf,
    /// Disks: the first is `/dev/vda`.
    pub disks: Vec<GuestDisk>,
    /// `-incoming defer` (a migration destination).
    pub incoming: bool,
    /// Forward the guest's 10.0.2.100:PORT to this host TCP port (for /dev/nbd0 in the guest).
    pub forward: Option<(u16, u16)>,
}

/// A running QEMU.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    /// Its directory.
    pub dir: PathBuf,
    console: Option<(UnixStream, BufReader<UnixStream>)>,
    qmp: BufReader<UnixStream>,
    qmp_out: UnixStream,
    /// QMP events read while waiting for command answers, oldest first.
    events: std::collections::VecDeque<Value>,
}

fn connect(path: &Path, limit: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + limit;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => bail!("cannot connect to {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Qemu {
    /// Starts QEMU (256 MiB, TCG) and connects its console and QMP.
    pub fn start(spec: &GuestSpec) -> Result<Qemu> {
        let img = image();
        std::fs::create_dir_all(&spec.dir)?;
        let console = spec.dir.join("console.sock");
        let qmp = spec.dir.join("qmp.sock");
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&qmp);
        let mut cmd = qemu_command();
        cmd.args(["-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none", "-no-user-config"]);
        cmd.arg("-kernel").arg(&img.kernel).arg("-initrd").arg(&img.initrd);
        cmd.args(["-append", "console=ttyS0 quiet loglevel=1 panic=-1"]);
        cmd.arg("-chardev").arg(format!(
            "socket,id=s0,path={},server=on,wait=off,logfile={}",
            console.display(),
            spec.dir.join("console.log").display()
        ));
        cmd.args(["-serial", "chardev:s0"]);
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        // A second monitor for tools run by a test (a QMP socket takes one client at a time).
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", spec.dir.join("qmp-tool.sock").display()));
        for (i, d) in spec.disks.iter().enumerate() {
            let blockdev = json!({
                "driver": "raw", "node-name": format!("disk{i}"), "cache": {"direct": true},
                "file": {"driver": "nbd", "server": {"type": "unix", "path": d.socket}, "export": d.export,
                         "reconnect-delay": 10},
            });
            cmd.arg("-blockdev").arg(blockdev.to_string());
            cmd.arg("-device").arg(format!("virtio-blk-pci,drive=disk{i},id=vd{i}"));
        }
        if let Some((guest_port, host_port)) = spec.forward {
            cmd.arg("-netdev")
                .arg(format!("user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:{guest_port}-tcp:127.0.0.1:{host_port}"));
            cmd.args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        }
        if spec.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let log = std::fs::File::create(spec.dir.join("qemu.log"))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
        let qmp_out = connect(&qmp, Duration::from_secs(20)).with_context(|| {
            format!("QEMU log: {}", std::fs::read_to_string(spec.dir.join("qemu.log")).unwrap_or_default())
        })?;
        let mut q = Qemu {
            child,
            dir: spec.dir.clone(),
            console: None,
            qmp: BufReader::new(qmp_out.try_clone()?),
            qmp_out,
            events: Default::default(),
        };
        let mut greeting = String::new();
        q.qmp.read_line(&mut greeting)?;
        q.qmp("qmp_capabilities", json!({}))?;
        let c = connect(&console, Duration::from_secs(10))?;
        q.console = Some((c.try_clone()?, BufReader::new(c)));
        Ok(q)
    }

    /// Runs a QMP command; its `return` (an `error` is an Err).
    pub fn qmp(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let msg = json!({ "execute": execute, "arguments": arguments });
        writeln!(self.qmp_out, "{msg}")?;
        loop {
            let mut line = String::new();
            if self.qmp.read_line(&mut line)? == 0 {
                bail!("QMP closed during {execute}");
            }
            let v: Value = serde_json::from_str(&line).with_context(|| format!("QMP line {line:?}"))?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {execute}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }

    /// Waits for the console line `@@ READY ...` (the guest booted).
    pub fn wait_ready(&mut self, limit: Duration) -> Result<String> {
        self.expect("READY", limit)
    }

    /// Sends a console command and returns the words after `@@ EXPECT`.
    pub fn command(&mut self, line: &str, expect: &str, limit: Duration) -> Result<String> {
        let (w, _) = self.console.as_mut().ok_or_else(|| anyhow!("no console"))?;
        writeln!(w, "{line}")?;
        self.expect(expect, limit)
    }

    fn expect(&mut self, word: &str, limit: Duration) -> Result<String> {
        let (_, r) = self.console.as_mut().ok_or_else(|| anyhow!("no console"))?;
        r.get_ref().set_read_timeout(Some(limit))?;
        let deadline = Instant::now() + limit;
        let prefix = format!("@@ {word}");
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => bail!("console closed waiting for {word}"),
                Ok(_) => {
                    if let Some(at) = line.find(&prefix) {
                        return Ok(line[at + prefix.len()..].trim().to_owned());
                    }
                }
                Err(e) => bail!("waiting for {word}: {e}; console log: {}", self.console_log_tail()),
            }
            if Instant::now() > deadline {
                bail!("no {word} within {limit:?}; console log: {}", self.console_log_tail());
            }
        }
    }

    /// The end of the console log.
    pub fn console_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        log.chars().rev().take(1500).collect::<String>().chars().rev().collect()
    }

    /// QEMU's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }

    /// Writes and errors so far: (writes, errors).
    pub fn count(&mut self) -> Result<(u64, u64)> {
        let r = self.command("count", "COUNT", Duration::from_secs(30))?;
        two(&r)
    }

    /// Waits until the guest's writer acknowledged `n` more writes.
    pub fn wait_writes(&mut self, n: u64, limit: Duration) -> Result<u64> {
        let start = self.count()?.0;
        let deadline = Instant::now() + limit;
        loop {
            let (w, _) = self.count()?;
            if w >= start + n {
                return Ok(w);
            }
            if Instant::now() > deadline {
                bail!("the guest wrote {} of {n} blocks within {limit:?}", w - start);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The distinct blocks written to `dev` by the writes after the first `after`.
    pub fn blocks(&mut self, dev: &str, after: u64) -> Result<Vec<u64>> {
        let r = self.command(&format!("blocks {dev} {after}"), "BLOCKS", Duration::from_secs(60))?;
        Ok(r.split_whitespace().filter_map(|w| w.parse().ok()).collect())
    }

    /// Stops the writers: (writes, errors).
    pub fn stop_writer(&mut self) -> Result<(u64, u64)> {
        let r = self.command("stop", "STOPPED", Duration::from_secs(60))?;
        two(&r)
    }

    /// Reads every written block back: (blocks, mismatches, write errors).
    pub fn verify(&mut self) -> Result<(u64, u64, u64)> {
        let r = self.command("verify", "VERIFY", Duration::from_secs(300))?;
        let v: Vec<u64> = r.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        match v[..] {
            [n, bad, errs] => Ok((n, bad, errs)),
            _ => bail!("bad VERIFY line {r:?}"),
        }
    }

    /// Reconnects the console (after a migration the guest talks to the destination's).
    pub fn reconnect_console(&mut self) -> Result<()> {
        let c = connect(&self.dir.join("console.sock"), Duration::from_secs(10))?;
        self.console = Some((c.try_clone()?, BufReader::new(c)));
        Ok(())
    }

    /// Waits for QMP event `name` whose `data` satisfies `matches` (events
    /// that came in during earlier commands count; older ones are dropped).
    pub fn wait_event(&mut self, name: &str, matches: impl Fn(&Value) -> bool, limit: Duration) -> Result<Value> {
        while let Some(e) = self.events.pop_front() {
            if e["event"] == name && matches(&e["data"]) {
                return Ok(e);
            }
        }
        let deadline = Instant::now() + limit;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(anyhow!("no QMP event {name} within {limit:?}"));
            }
            self.qmp.get_ref().set_read_timeout(Some(left))?;
            let mut line = String::new();
            match self.qmp.read_line(&mut line) {
                Ok(0) => break Err(anyhow!("QMP closed waiting for {name}")),
                Ok(_) => {
                    let v: Value = serde_json::from_str(&line).with_context(|| format!("QMP line {line:?}"))?;
                    if v["event"] == name && matches(&v["data"]) {
                        break Ok(v);
                    }
                }
                Err(e) => break Err(anyhow!("waiting for QMP event {name}: {e}")),
            }
        };
        self.qmp.get_ref().set_read_timeout(None)?;
        result
    }

    /// `query-migrate` until it reaches one of `states` (or failed).
    pub fn wait_migration(&mut self, states: &[&str], limit: Duration) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let m = self.qmp("query-migrate", json!({}))?;
            let status = m["status"].as_str().unwrap_or_default().to_owned();
            if states.contains(&status.as_str()) {
                return Ok(m);
            }
            if status == "failed" || status == "cancelled" {
                bail!("migration {status}: {m}");
            }
            if Instant::now() > deadline {
                bail!("migration still {status} after {limit:?}: {m}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The VM's run state (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub fn run_state(&mut self) -> Result<String> {
        Ok(self.qmp("query-status", json!({}))?["status"].as_str().unwrap_or_default().to_owned())
    }

    /// Kills QEMU.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

fn two(r: &str) -> Result<(u64, u64)> {
    let v: Vec<u64> = r.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    match v[..] {
        [a, b, ..] => Ok((a, b)),
        _ => bail!("bad reply {r:?}"),
    }
}
