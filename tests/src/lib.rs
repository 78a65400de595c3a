//! Helpers shared by the black-box tests: start the real `rbdsync` binary on
//! a throw-away configuration, and run the real NBD clients against it.
//!
//! The agent binary is taken from `RBDSYNC_BIN`, or else from the cargo
//! target directory of the profile the tests were built with; the README's
//! test command builds it first.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod ceph;
pub mod fusefs;
pub mod guest;
pub mod nbd;
mod pki;
pub use pki::Pki;

/// Path of the agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("RBDSYNC_BIN") {
        return bin.into();
    }
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join(profile).join("rbdsync");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --{profile} -p agent` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// One VM file for [`AgentBuilder::vm`].
pub struct Vm {
    /// File name in vms.d.
    pub file: String,
    /// YAML body.
    pub yaml: String,
}

/// Builds an agent configuration in a temporary directory.
pub struct AgentBuilder {
    dir: tempfile::TempDir,
    vms: Vec<Vm>,
    extra: String,
    control: String,
    env: Vec<(String, String)>,
}

/// The `control:` section of every test agent unless replaced.
const DEFAULT_CONTROL: &str = "  listen: [\"unix:control.sock\"]\n";

impl Default for AgentBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentBuilder {
    /// A builder with an empty vms.d.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            vms: Vec::new(),
            extra: String::new(),
            control: DEFAULT_CONTROL.to_owned(),
            env: Vec::new(),
        }
    }

    /// An environment variable for the agent process (kept across restarts).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Adds a VM file (`name.yaml`).
    pub fn vm(mut self, name: &str, yaml: &str) -> Self {
        self.vms.push(Vm { file: format!("{name}.yaml"), yaml: yaml.to_owned() });
        self
    }

    /// Adds a VM with one raw disk `disk0` of `size` under the test directory.
    pub fn simple_vm(self, vm: &str, size: &str) -> Self {
        let yaml = format!(
            "name: {vm}\ndisks:\n  - name: disk0\n    image: file:../images/{vm}-disk0.raw\n    size: {size}\n"
        );
        self.vm(vm, &yaml)
    }

    /// Replaces the keys of the `control:` section (YAML lines indented by
    /// two spaces; default `listen: ["unix:control.sock"]`).
    pub fn control_keys(mut self, keys: &str) -> Self {
        keys.clone_into(&mut self.control);
        self
    }

    /// Extra top-level YAML appended to agent.yaml.
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }

    /// The test directory (config, images, state, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the files and starts the agent; waits until it serves.
    pub fn start(self) -> Result<Agent> {
        let d = self.dir.path();
        std::fs::create_dir_all(d.join("vms.d"))?;
        for vm in &self.vms {
            std::fs::write(d.join("vms.d").join(&vm.file), &vm.yaml)?;
        }
        let config = format!(
            "node: test\nstate_dir: state\nvms_dir: vms.d\nnbd:\n  listen: [\"127.0.0.1:0\", \"unix:nbd.sock\"]\ncontrol:\n{}{}",
            self.control, self.extra
        );
        std::fs::write(d.join("agent.yaml"), config)?;
        Agent::spawn(self.dir, self.env)
    }
}

/// A running agent process.
pub struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// The bound TCP address.
    pub tcp: SocketAddr,
}

impl Agent {
    fn spawn(dir: tempfile::TempDir, env: Vec<(String, String)>) -> Result<Agent> {
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = Command::new(agent_bin())
            .args(["agent", "--config"])
            .arg(dir.path().join("agent.yaml"))
            .env("RBDSYNC_LOG", "debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn rbdsync")?;
        let mut agent = Agent { child: Some(child), dir, env, tcp: "127.0.0.1:0".parse()? };
        agent.tcp = agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<SocketAddr> {
        let runtime = self.dir.path().join("state/agent.json");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("agent exited early ({status}):\n{}", self.log());
            }
            if let Ok(text) = std::fs::read_to_string(&runtime) {
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let tcp = v["nbd"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str())
                    .find(|a| !a.starts_with("unix:"));
                return tcp.context("no TCP listener in agent.json")?.parse().context("bad TCP address");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("agent not ready after 20 s:\n{}", self.log())
    }

    /// Restarts a stopped agent on the same directory.
    pub fn restart(mut self) -> Result<Agent> {
        self.stop()?;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        Agent::spawn(dir, std::mem::take(&mut self.env))
    }

    /// The test directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The first TCP address of the control API (from `agent.json`).
    pub fn control_tcp(&self) -> Result<SocketAddr> {
        let text = std::fs::read_to_string(self.dir().join("state/agent.json"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let tcp =
            v["control"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).find(|a| !a.starts_with("unix:"));
        tcp.context("no TCP control listener in agent.json")?.parse().context("bad TCP address")
    }

    /// The Unix socket of the NBD server.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// `nbd+unix://` URI of an export.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    /// `nbd://` URI of an export over TCP.
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("agent.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("pid");
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// SIGTERM and wait for exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(20))
    }

    /// SIGKILL and wait for exit.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10))
    }

    fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("agent not running") };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("agent did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a command and returns its output, failing with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out =
        Command::new(program).args(args).stdin(Stdio::null()).output().with_context(|| format!("spawn {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a command and returns its stdout as a string.
pub fn stdout(program: &str, args: &[&str]) -> Result<String> {
    Ok(String::from_utf8(run(program, args)?.stdout)?)
}

/// A finished command's exit status and output, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs an nbdsh script under the system Python (python3-libnbd).
pub fn nbdsh(uri: &str, script: &str) -> Result<String> {
    let out = Command::new("/usr/bin/python3")
        .args(["-m", "nbd", "-u", uri, "-c", script])
        .output()
        .context("spawn nbdsh")?;
    if !out.status.success() {
        bail!(
            "nbdsh failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Deterministic pseudo-random generator (xorshift64*), seeded by the test.
pub struct Rng(u64);

impl Rng {
    /// A generator; the seed is printed so a failure can be replayed.
    pub fn new(seed: u64) -> Self {
        eprintln!("rng seed: {seed}");
        Self(seed.max(1))
    }

    /// Seed from `TEST_SEED`, else a fixed default so CI runs are reproducible.
    pub fn from_env(default_seed: u64) -> Self {
        let seed = std::env::var("TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default_seed);
        Self::new(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills a buffer.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// qemu-io on `uri` (raw) with one `-c` per command; fails if qemu-io
/// failed or reported a failed command or pattern verification.
pub fn qemu_io(uri: &str, cmds: &[impl AsRef<str>]) -> Result<String> {
    qemu_io_on("raw", uri, cmds)
}

/// qemu-io on `target` opened with `format`, one `-c` per command; fails if any command failed.
pub fn qemu_io_on(format: &str, target: &str, cmds: &[impl AsRef<str>]) -> Result<String> {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(target);
    let out = stdout("qemu-io", &args)?;
    anyhow::ensure!(!out.contains("failed"), "qemu-io on {target}: {out}");
    Ok(out)
}

/// The extents of metadata context `context` of the export at `uri`, as
/// `nbdinfo --map=CONTEXT --json` reports them: `(offset, length, type)`,
/// with neighbours of equal type merged (servers split runs differently).
pub fn map_extents(uri: &str, context: &str) -> Result<Vec<(u64, u64, u64)>> {
    let json = stdout("nbdinfo", &[&format!("--map={context}"), "--json", uri])?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&json).with_context(|| format!("nbdinfo --map: {json}"))?;
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for e in &list {
        let field = |k: &str| e[k].as_u64().with_context(|| format!("extent without {k}: {e}"));
        let (offset, length, kind) = (field("offset")?, field("length")?, field("type")?);
        match out.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == offset => last.1 += length,
            Some(last) if last.0 + last.1 != offset => bail!("extents not contiguous at {offset}: {json}"),
            _ => out.push((offset, length, kind)),
        }
    }
    Ok(out)
}

/// The metadata contexts the export at `uri` offers (`nbdinfo --json`), sorted.
pub fn export_contexts(uri: &str) -> Result<Vec<String>> {
    let json = stdout("nbdinfo", &["--json", uri])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let export = &v["exports"][0];
    let mut out: Vec<String> = export["contexts"]
        .as_array()
        .with_context(|| format!("no contexts in {json}"))?
        .iter()
        .map(|c| c.as_str().unwrap_or_default().to_owned())
        .collect();
    out.sort();
    Ok(out)
}

impl Agent {
    /// Starts the agent again on the same directory after [`Agent::stop`] or
    /// [`Agent::kill9`] (`restart` stops a running agent itself). A runtime
    /// file left behind by a killed agent is removed first, so readiness is
    /// that of the new process; the old log is kept as `agent.prev.log`.
    pub fn respawn(mut self) -> Result<Agent> {
        if self.child.is_some() {
            bail!("respawn: the agent is still running");
        }
        let _ = std::fs::remove_file(self.dir.path().join("state/agent.json"));
        let _ = std::fs::rename(self.dir.path().join("agent.log"), self.dir.path().join("agent.prev.log"));
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        Agent::spawn(dir, std::mem::take(&mut self.env))
    }
}

impl AgentBuilder {
    /// Like [`AgentBuilder::start`], with `nbd_keys` added to the `nbd:`
    /// section (YAML lines indented by two spaces, e.g.
    /// `"  tls: {mode: required, cert: pki/server-cert.pem, key: pki/server-key.pem}\n  handshake_timeout_secs: 2\n"`);
    /// `listen` stays `["127.0.0.1:0", "unix:nbd.sock"]`. Relative paths are
    /// relative to the test directory.
    pub fn start_with_nbd(self, nbd_keys: &str) -> Result<Agent> {
        let d = self.dir.path();
        std::fs::create_dir_all(d.join("vms.d"))?;
        for vm in &self.vms {
            std::fs::write(d.join("vms.d").join(&vm.file), &vm.yaml)?;
        }
        let config = format!(
            "node: test\nstate_dir: state\nvms_dir: vms.d\nnbd:\n  listen: [\"127.0.0.1:0\", \"unix:nbd.sock\"]\n{nbd_keys}control:\n{}{}",
            self.control, self.extra
        );
        std::fs::write(d.join("agent.yaml"), config)?;
        Agent::spawn(self.dir, self.env)
    }
}

impl Agent {
    /// The control address (`unix:DIR/control.sock`).
    pub fn control(&self) -> String {
        format!("unix:{}", self.dir().join("control.sock").display())
    }

    /// `rbdsync --control ADDR` for this agent.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--control").arg(self.control()).stdin(Stdio::null());
        cmd
    }

    /// `rbdsync --json ARGS`, which must succeed; its JSON output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.cli().arg("--json").args(args).output().context("spawn rbdsync")?;
        if !out.status.success() {
            bail!(
                "rbdsync {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("rbdsync {args:?}: bad JSON"))
    }
}

impl Agent {
    /// `rbdsync --json ARGS`, which must fail: its stderr (the error).
    pub fn cli_fails(&self, args: &[&str]) -> Result<String> {
        let out = self.cli().arg("--json").args(args).output().context("spawn rbdsync")?;
        if out.status.success() {
            bail!("rbdsync {args:?} succeeded but must fail: {}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// [`cli_json`](Self::cli_json) for tests: panics with the agent's log tail if it fails.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.cli_json(args).unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", self.log_tail()))
    }

    /// `rbdsync --json ARGS`, which must fail and say why on stderr: its
    /// JSON output (a job that failed prints its record), if any, and stderr.
    pub fn refused(&self, args: &[&str]) -> (Option<serde_json::Value>, String) {
        let out = self.cli().arg("--json").args(args).output().expect("spawn rbdsync");
        assert!(!out.status.success(), "rbdsync {args:?} succeeded but must fail: {}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.trim().is_empty(), "rbdsync {args:?} failed without saying why: {}", show(&out));
        (serde_json::from_slice(&out.stdout).ok(), stderr)
    }

    /// [`wait_job`](Self::wait_job) for tests: panics with the agent's log tail.
    pub fn concluded(&self, id: &str, limit: Duration) -> serde_json::Value {
        self.wait_job(id, limit).unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", self.log_tail()))
    }

    /// The last 40 lines of the agent's log, NBD connection chatter left out.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("agent::nbd")).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Polls job `id` until it concludes (at most `limit`); its record.
    pub fn wait_job(&self, id: &str, limit: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let j = self.cli_json(&["job", "show", id])?;
            if j["state"] == "concluded" {
                return Ok(j);
            }
            if Instant::now() > deadline {
                bail!("job {id} not concluded after {limit:?}: {j}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Copies what an NBD (or any qemu-img) URI reads into a raw file.
pub fn capture(uri: &str, out: &Path) -> Result<()> {
    let _ = std::fs::remove_file(out);
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", uri, &out.to_string_lossy()]).map(drop)
}

/// `rbdsync --json events` against an agent, collecting every event it
/// prints until [`EventLog::stop`].
pub struct EventLog {
    child: Child,
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl EventLog {
    /// Starts following `agent`'s events; returns once the agent said the
    /// subscription is in place (its `subscribed` event).
    pub fn follow(agent: &Agent) -> Result<Self> {
        let mut child = agent.cli().args(["--json", "events"]).stdout(Stdio::piped()).spawn().context("spawn")?;
        let stdout = child.stdout.take().context("stdout")?;
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                }
            }
        });
        let mut me = Self { child, events };
        let subscribed = me.wait_for(Duration::from_secs(20), |e| e["type"] == "subscribed");
        if let Err(e) = subscribed {
            let status = me.child.try_wait()?;
            bail!("rbdsync events did not subscribe ({status:?}): {e}");
        }
        Ok(me)
    }

    /// Events so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (at most `limit`) until an event satisfies `pred`; every event so far.
    pub fn wait_for(
        &self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + limit;
        loop {
            let events = self.events();
            if events.iter().any(&pred) {
                return Ok(events);
            }
            if Instant::now() > deadline {
                bail!("no such event within {limit:?}; seen: {events:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops following; every event seen.
    pub fn stop(mut self) -> Vec<serde_json::Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.events()
    }
}
