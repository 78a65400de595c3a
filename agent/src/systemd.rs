//! systemd's notification protocol (`Type=notify`, `sd_notify(3)`): the
//! agent says `READY=1` once every disk is open and every listener bound,
//! `RELOADING=1`/`READY=1` around a SIGHUP reload, `STOPPING=1` when it
//! stops, `STATUS=` lines for `systemctl status`, extends the start timeout
//! while it opens disks, and pings the watchdog (`WatchdogSec=`) from a
//! task that proves both the runtime and the blocking pool still run work.
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Serving: every disk open, every listener bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload (SIGHUP) begins; [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading VM files")]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading VM files")]),
    }
}

/// The agent is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: cancelling jobs, draining connections")]);
}

/// Asks for `by` more time to start (opening many RBD disks), with a status line.
pub fn extend_start(by: Duration, status: &str) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec), NotifyState::Status(status)]);
}

/// Pings the watchdog at half its interval, each time after a task on the
/// runtime and one on the blocking pool ran: a wedged runtime or a pool
/// whose every thread is stuck misses the ping and systemd restarts the
/// agent. Nothing happens without `WATCHDOG_USEC`.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(interval = ?interval, "systemd watchdog enabled");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            if tokio::task::spawn_blocking(|| ()).await.is_ok() {
                send(&[NotifyState::Watchdog]);
            }
        }
    });
}
