//! Talking to systemd: readiness, status lines, the watchdog and stopping,
//! through the pure-Rust `sd-notify` crate (the `systemd` crate links
//! libsystemd, is LGPL and breaks the arm64 cross build).
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is not set, so the daemon
//! runs the same way by hand, under tests and under systemd.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::warn;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line: only once every listener is bound and the
/// store is open.
pub fn ready(status: &str) {
    notify(&[NotifyState::Status(status), NotifyState::Ready]);
}

/// A `STATUS=` line for `systemctl status`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for (`WATCHDOG_USEC`),
/// until `shutdown`. Returns at once when no watchdog is configured.
pub async fn watchdog(shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => notify(&[NotifyState::Watchdog]),
        }
    }
}
