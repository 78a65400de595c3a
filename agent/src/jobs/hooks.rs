//! Freeze and thaw commands around a backup's point in time (a VM's
//! `backup: {freeze, thaw}`), for application-consistent backups.
//!
//! Order: `freeze` runs before any disk of the backup is drained (the guest
//! flushes its filesystems through the export while it freezes, so the
//! drain must not hold those writes); the point in time is fixed; `thaw`
//! runs at once, whatever happened, so the guest is frozen only for the
//! freeze itself plus opening the targets. A freeze that fails or times out
//! does not stop the backup (as in Proxmox VE): the backup is then
//! crash-consistent, which its summary says.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

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
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run the {hook} command: {e}"))?;
    let group = child.id();
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let output = async {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        // Both at once: a command that fills one pipe must not wait for the other to be read.
        let read_out = async {
            if let Some(s) = out.as_mut() {
                let _ = s.read_to_end(&mut o).await;
            }
        };
        let read_err = async {
            if let Some(s) = err.as_mut() {
                let _ = s.read_to_end(&mut e).await;
            }
        };
        tokio::join!(read_out, read_err);
        (o, e)
    };
    let waited = tokio::time::timeout(timeout, async {
        let (o, e) = output.await;
        (child.wait().await, o, e)
    })
    .await;
    let tail = |o: &[u8], e: &[u8]| {
        let text = String::from_utf8_lossy(if e.is_empty() { o } else { e }).trim().to_owned();
        let start = text.len().saturating_sub(300);
        text.get(start..).unwrap_or_default().to_owned()
    };
    match waited {
        Ok((Ok(status), _, _)) if status.success() => {
            tracing::info!(vm, hook, "backup hook ran");
            Ok(())
        }
        Ok((Ok(status), o, e)) => Err(format!("the {hook} command failed ({status}): {}", tail(&o, &e))),
        Ok((Err(e), _, _)) => Err(format!("the {hook} command could not be waited for: {e}")),
        Err(_) => {
            if let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: signals the process group the command leads (created above).
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            Err(format!("the {hook} command did not finish within {} s and was killed", timeout.as_secs()))
        }
    }
}
