//! The test Ceph cluster (`RBDSYNC_TEST_CEPH_CONF`, started by
//! `deploy/dev/ceph-cluster.sh`): the `rbd`/`ceph` CLIs on it, throw-away
//! image names removed on drop, and a stopped-OSD guard that resumes and
//! re-peers the cluster even when the test panics.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::run;

/// RBD tests share the test cluster; a test that stops its OSD holds it alone.
static CEPH: RwLock<()> = RwLock::new(());

/// Held by every test that uses the cluster.
pub fn ceph_shared() -> RwLockReadGuard<'static, ()> {
    CEPH.read().unwrap_or_else(|p| p.into_inner())
}

/// Held by a test that stops the OSD.
pub fn ceph_exclusive() -> RwLockWriteGuard<'static, ()> {
    CEPH.write().unwrap_or_else(|p| p.into_inner())
}

/// The test cluster; removes the images it named (with their snapshots) on drop.
pub struct TestCeph {
    /// Path of its ceph.conf.
    pub conf: String,
    prefix: String,
    images: Mutex<Vec<String>>,
}

impl TestCeph {
    /// The cluster of `RBDSYNC_TEST_CEPH_CONF`; images are named `backup/PREFIX-…`.
    /// Panics (never skips) without one: in CI every test runs.
    pub fn new(prefix: &str) -> TestCeph {
        let conf = std::env::var("RBDSYNC_TEST_CEPH_CONF").unwrap_or_else(|_| {
            panic!(
                "RBDSYNC_TEST_CEPH_CONF is not set: RBD tests need a test Ceph cluster. Start one with \
                 `deploy/dev/ceph-cluster.sh up DIR` and export RBDSYNC_TEST_CEPH_CONF=DIR/ceph.conf (tests/run.sh does)"
            )
        });
        assert!(Path::new(&conf).exists(), "RBDSYNC_TEST_CEPH_CONF={conf} does not exist");
        TestCeph { conf, prefix: prefix.to_owned(), images: Mutex::new(Vec::new()) }
    }

    /// `ceph:` section for agent.yaml.
    pub fn agent_yaml(&self) -> String {
        format!("ceph: {{conf: \"{}\", client: admin}}\n", self.conf)
    }

    /// A fresh image name `backup/PREFIX-TAG-…`, removed with its snapshots on drop.
    pub fn image(&self, tag: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let n = NEXT.fetch_add(1, SeqCst);
        let name = format!("backup/{}-{tag}-{}-{n}-{nanos:08x}", self.prefix, std::process::id());
        self.images.lock().unwrap().push(name.clone());
        name
    }

    /// `rbd -c CONF ARGS` (60 s limit); fails on a non-zero exit.
    pub fn rbd(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["60", "rbd", "-c", &self.conf];
        full.extend(args);
        run("timeout", &full)
    }

    /// `ceph -c CONF ARGS` with a hard timeout (without a quorum it waits forever).
    pub fn ceph(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["20", "ceph", "-c", &self.conf, "--connect-timeout", "10"];
        full.extend(args);
        run("timeout", &full)
    }

    /// Creates `image` of `size` (an `rbd create --size` value).
    pub fn create(&self, image: &str, size: &str) {
        self.rbd(&["create", "--size", size, image]).unwrap();
    }

    /// Removes `image` and its snapshots.
    pub fn remove(&self, image: &str) {
        self.rbd(&["snap", "purge", image]).unwrap();
        self.rbd(&["rm", image]).unwrap();
    }

    /// Whether `image` exists.
    pub fn exists(&self, image: &str) -> bool {
        self.rbd(&["info", image]).is_ok()
    }

    /// Snapshot names, oldest first.
    pub fn snaps(&self, image: &str) -> Vec<String> {
        let out = self.rbd(&["snap", "ls", "--format", "json", image]).unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut snaps: Vec<(u64, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["id"].as_u64().unwrap_or(0), s["name"].as_str().unwrap().to_owned()))
            .collect();
        snaps.sort();
        snaps.into_iter().map(|s| s.1).collect()
    }

    /// The image's key/value metadata.
    pub fn meta(&self, image: &str) -> BTreeMap<String, String> {
        let out = self.rbd(&["image-meta", "list", "--format", "json", image]).unwrap();
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return BTreeMap::new();
        }
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Size in bytes.
    pub fn size(&self, image: &str) -> u64 {
        let out = self.rbd(&["info", "--format", "json", image]).unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["size"].as_u64().unwrap()
    }

    /// Exports `image` or `image@snap` to a file.
    pub fn export(&self, spec: &str, out: &Path) {
        let _ = std::fs::remove_file(out);
        self.rbd(&["export", "--no-progress", spec, out.to_str().unwrap()]).unwrap();
    }

    /// The cluster's OSD (pid file `DIR/run/osd.0.pid`, DIR = the conf's directory).
    pub fn osd_pid(&self) -> libc::pid_t {
        let dir = Path::new(&self.conf).parent().unwrap();
        let file = dir.join("run/osd.0.pid");
        let pid: libc::pid_t = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .parse()
            .unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains("ceph-osd") && cmdline.contains(&self.conf),
            "pid {pid} is not the test OSD: {cmdline}"
        );
        pid
    }

    /// After a SIGSTOP longer than the read lease, the PGs of the single-OSD
    /// test cluster stay `laggy` (ops "waiting for readable") until they
    /// re-peer, which hangs every client. Marking the OSD down makes it
    /// re-assert itself and re-peer; then wait until every PG is active+clean.
    /// An OSD marked down more than `osd_max_markdown_count` (5) times in 10
    /// minutes shuts itself down, so that limit is raised first: repeated
    /// test runs must not kill the cluster.
    pub fn repeer(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        self.ceph(&["config", "set", "osd", "osd_max_markdown_count", "1000"])?;
        self.ceph(&["osd", "down", "0"])?;
        let pools: Value =
            serde_json::from_slice(&self.ceph(&["osd", "pool", "ls", "detail", "--format", "json"])?.stdout)?;
        let pgs: Vec<String> = pools
            .as_array()
            .context("pool list")?
            .iter()
            .flat_map(|p| (0..p["pg_num"].as_u64().unwrap_or(0)).map(move |i| format!("{}.{i:x}", p["pool_id"])))
            .collect();
        loop {
            let up = self
                .ceph(&["osd", "dump", "--format", "json"])
                .ok()
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .is_some_and(|v| v["osds"][0]["up"] == 1);
            let clean = up
                && pgs.iter().all(|pg| {
                    self.ceph(&["pg", pg, "query"])
                        .ok()
                        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                        .is_some_and(|v| v["state"] == "active+clean")
                });
            if clean {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "PGs not active+clean 60 s after the OSD was resumed");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for TestCeph {
    fn drop(&mut self) {
        for image in self.images.lock().map(|v| v.clone()).unwrap_or_default() {
            if self.exists(&image) {
                let _ = self.rbd(&["snap", "purge", &image]);
                if let Err(e) = self.rbd(&["rm", &image]) {
                    eprintln!("cleanup: cannot remove {image}: {e:#}");
                }
            }
        }
    }
}

/// The test cluster's OSD, SIGSTOPped; on drop (also when the test panics)
/// SIGCONTed and re-peered, so later tests can use the cluster.
pub struct StoppedOsd<'a> {
    ceph: &'a TestCeph,
    pid: libc::pid_t,
}

impl<'a> StoppedOsd<'a> {
    /// Stops the OSD (hold [`ceph_exclusive`]).
    pub fn stop(ceph: &'a TestCeph) -> StoppedOsd<'a> {
        let pid = ceph.osd_pid();
        // SAFETY: kill(2) with a pid read from the test cluster's pid file and checked by osd_pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP {pid}");
        StoppedOsd { ceph, pid }
    }
}

impl Drop for StoppedOsd<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `stop`.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
        if let Err(e) = self.ceph.repeer() {
            eprintln!("the test cluster did not recover after the OSD was resumed: {e:#}");
        }
    }
}
