//! Telling the service manager what the root is doing (systemd's notify
//! protocol): `READY=1` after the first settled waterfall decision,
//! `STATUS=` with the active tier on every change, `STOPPING=1` on shutdown,
//! and `WATCHDOG=1` from the root's own mailbox, so a wedged actor system
//! stops the pings and systemd restarts cascade.
//!
//! Invariant: notifications never block or fail the root; a missing
//! `NOTIFY_SOCKET` makes them no-ops.

use std::time::Duration;

use tracing::debug;

/// What the root reports to its service manager.
pub trait ServiceNotify: Send + Sync + 'static {
    fn ready(&self);
    fn status(&self, text: &str);
    fn stopping(&self);
    fn watchdog(&self);
    /// How often to ping: half the manager's watchdog timeout, as systemd
    /// recommends; `None` when no watchdog is armed.
    fn watchdog_period(&self) -> Option<Duration>;
}

/// systemd, through `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`.
#[derive(Debug, Clone, Copy)]
pub struct Systemd {
    watchdog: Option<Duration>,
}

impl Systemd {
    /// Reads the watchdog settings from the environment systemd gave us.
    pub fn from_env() -> Systemd {
        Systemd {
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    fn send(&self, state: &[sd_notify::NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(state) {
            debug!(error = %e, "Service manager notification failed.");
        }
    }
}

impl ServiceNotify for Systemd {
    fn ready(&self) {
        self.send(&[sd_notify::NotifyState::Ready]);
    }

    fn status(&self, text: &str) {
        // One line per STATUS=: a newline would end the field early.
        let line = text.replace('\n', " ");
        self.send(&[sd_notify::NotifyState::Status(&line)]);
    }

    fn stopping(&self) {
        self.send(&[sd_notify::NotifyState::Stopping]);
    }

    fn watchdog(&self) {
        self.send(&[sd_notify::NotifyState::Watchdog]);
    }

    fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }
}

/// No service manager (tests, a terminal).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNotify;

impl ServiceNotify for NoNotify {
    fn ready(&self) {}
    fn status(&self, _text: &str) {}
    fn stopping(&self) {}
    fn watchdog(&self) {}
    fn watchdog_period(&self) -> Option<Duration> {
        None
    }
}
