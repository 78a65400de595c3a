//! Freeze and thaw commands around a backup's point in time (a VM's
//! `backup: {freeze, thaw}`), for application-consistent backups.
//!
//! Order: `freeze` runs before any disk of the backup is drained (the guest
//! flushes its filesystems through the export while it freezes, so the
//! drain must not hold those writes); the point in time is fixed; `thaw`
//! runs at once, whatever happened, so the guest is frozen only for the
//! freeze itself plus opening the targets (bounded: past the hook timeout
//! the guest is thawed first). One freeze-to-thaw sequence per VM at a
//! time. A freeze that fails or times out does not stop the backup (as in
//! Proxmox VE), nor does a failed thaw: the backup is then crash-consistent,
//! which its summary says.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Output kept from a hook (its end), for the error message.
const KEEP: usize = 4096;
/// How long the output may stay open after the command exited (a child it
/// left in the background may hold the pipe).
const GRACE: Duration = Duration::from_secs(1);

/// Kills the command's process group when dropped before it was reaped
/// (a timeout, or the agent's task going away).
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: signals the process group the command leads (created with it).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

/// Reads `r` to its end, keeping the last [`KEEP`] bytes.
async fn tail_of(r: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut r) = r else { return Vec::new() };
    let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
    while let Ok(n @ 1..) = r.read(&mut buf).await {
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * KEEP {
            kept.drain(..kept.len() - KEEP);
        }
    }
    kept
}

/// Runs `cmd` with `sh -c` in its own process group, `RBDSYNC_VM` and
/// `RBDSYNC_HOOK` (`freeze`/`thaw`) set; kills the group after `timeout`.
/// `Err`: why it failed, with the end of its output.
pub async fn run(hook: &str, cmd: &str, vm: &str, timeout: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("RBDSYNC_VM", vm)
        .env("RBDSYNC_HOOK", hook)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run the {hook} command: {e}"))?;
    let mut group = Group(child.id().and_then(|p| i32::try_from(p).ok()));
    let out = tokio::spawn(tail_of(child.stdout.take()));
    let err = tokio::spawn(tail_of(child.stderr.take()));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("the {hook} command could not be waited for: {e}")),
        Err(_) => {
            return Err(format!("the {hook} command did not finish within {} s and was killed", timeout.as_secs()))
        }
    };
    // Reaped: its group may be gone (or its id reused) from now on; leftovers keep running.
    group.0 = None;
    if status.success() {
        out.abort();
        err.abort();
        tracing::info!(vm, hook, "backup hook ran");
        return Ok(());
    }
    let output = |task: tokio::task::JoinHandle<Vec<u8>>| async move {
        tokio::time::timeout(GRACE, task).await.ok().and_then(Result::ok).unwrap_or_default()
    };
    let (o, e) = (output(out).await, output(err).await);
    let text = String::from_utf8_lossy(if e.is_empty() { &o } else { &e }).trim().to_owned();
    let start = (text.len().saturating_sub(300)..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let how = status.code().map_or_else(|| format!("signal {}", status.signal().unwrap_or(0)), |c| format!("exit {c}"));
    Err(format!("the {hook} command failed ({how}): {}", &text[start..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hook_reports_its_failure_briefly_and_a_timeout_kills_its_whole_group() {
        let t = Duration::from_secs(20);
        assert_eq!(run("freeze", "exit 0", "vm", t).await, Ok(()));
        // Megabytes of output: the message keeps the end, on a character boundary.
        let e = run("freeze", "yes é | head -c 3000001 >&2; echo the-end >&2; exit 3", "vm", t).await.unwrap_err();
        assert!(e.contains("exit 3") && e.ends_with("the-end") && e.len() < 500, "{e}");
        // A background child left holding the output does not hold a successful hook.
        let started = std::time::Instant::now();
        assert_eq!(run("thaw", "sleep 30 & exit 0", "vm", t).await, Ok(()));
        assert!(started.elapsed() < Duration::from_secs(5));
        // At the timeout the group goes, grandchildren included.
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("late");
        let cmd = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let e = run("freeze", &cmd, "vm", Duration::from_secs(1)).await.unwrap_err();
        assert!(e.contains("killed"), "{e}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "a grandchild of the timed-out hook survived");
    }
}
