//! `tests/tools/power-cut-fs.py` mounted at a directory: file data written
//! there is kept only in that process's memory until it is synced (a power
//! cut in a box), or (stalling) every file creation hangs (a process caught
//! between two steps, for as long as a test needs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::run;

/// A mounted `power-cut-fs.py`; unmounted on drop.
pub struct PowerCutFs {
    child: Option<Child>,
    mount: PathBuf,
    backing: PathBuf,
}

impl PowerCutFs {
    /// Mounts the file system at `mount` (its durable data goes to `MOUNT.durable`).
    pub fn mount(mount: &Path) -> Result<Self> {
        Self::start(mount, false)
    }

    /// Mounts a file system at `mount` on which creating a file never
    /// returns (until [`kill`](Self::kill)); everything else works.
    pub fn mount_stalling(mount: &Path) -> Result<Self> {
        Self::start(mount, true)
    }

    fn start(mount: &Path, stall: bool) -> Result<Self> {
        let backing = mount.with_extension("durable");
        std::fs::create_dir_all(mount)?;
        std::fs::create_dir_all(&backing)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/power-cut-fs.py");
        let child = Command::new("/usr/bin/python3")
            .arg(&script)
            .args(stall.then_some("--stall-create"))
            .arg(&backing)
            .arg(mount)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn power-cut-fs (python3-fusepy)")?;
        let fs = Self { child: Some(child), mount: mount.to_owned(), backing };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs.mounted() {
            ensure!(Instant::now() < deadline, "power-cut-fs did not mount {} (needs /dev/fuse)", mount.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(fs)
    }

    fn mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mount = self.mount.display().to_string();
        mounts.lines().any(|l| l.split(' ').nth(1) == Some(mount.as_str()))
    }

    /// Kills the file system's process (a process waiting on it gets an
    /// error) and unmounts it; the mount point is an empty directory again.
    pub fn kill(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        run("umount", &["-l", self.mount.to_str().unwrap()])?;
        Ok(())
    }

    /// The power cut: the file system dies with every unsynced byte; the
    /// directory then holds exactly what was synced.
    pub fn cut(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        run("umount", &["-l", self.mount.to_str().unwrap()])?;
        std::fs::remove_dir(&self.mount)?;
        std::fs::rename(&self.backing, &self.mount)?;
        Ok(())
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("umount").args(["-l"]).arg(&self.mount).status();
        }
    }
}
