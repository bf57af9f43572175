//! The supervision loop: one process at a time, restarted when it exits or
//! cannot start, with the tier's backoff; past `crash_loop_cap` failed starts
//! without a stable run it keeps retrying at a ceiling (Kubernetes'
//! CrashLoopBackOff) and says when the next attempt is.
//!
//! Every failure to run counts alike (an exit, a spawn error such as
//! `EMFILE` or a binary missing mid-upgrade, a port someone else holds): a
//! failed start is retried, never given up on for good.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::client::{self, StderrTail};
use super::{Events, Phase, ProcView};
use crate::contract::DriverEvent;
use crate::resilience::Backoff;
use crate::tiers::ports::{self, Protocol};

/// Exits kept for `recent_exits`.
pub const EXITS_KEPT: usize = 10;
/// Exits quoted in a crash report.
const EXITS_QUOTED: usize = 5;
/// Characters of stderr quoted in a crash report, most recent lines first
/// in priority, so a status line stays small.
const STDERR_QUOTED: usize = 600;
/// How long naming the holder of a port may take.
const OWNER_LOOKUP: Duration = Duration::from_secs(2);
/// How long a child's process group may take to disappear after SIGKILL.
const GROUP_EXIT: Duration = Duration::from_secs(2);

pub struct Supervision {
    pub spec: client::ProcessSpec,
    pub port: u16,
    /// Delays within the crash-loop cap are clamped to `restart_cap`; past
    /// it they grow up to the backoff's own cap, the ceiling.
    pub backoff: Backoff,
    pub restart_cap: Duration,
    pub crash_loop_cap: u32,
    pub grace: Duration,
    pub stderr_lines: usize,
    /// Where the child's process group is recorded.
    pub record: std::path::PathBuf,
    pub view: Arc<watch::Sender<ProcView>>,
    pub events: Events,
    /// A stop request and its grace; closed means "stop with the default grace".
    pub stop: oneshot::Receiver<Duration>,
    /// Cuts a wait within the cap short (the start phase wants the backend now).
    pub wake: Arc<Notify>,
    pub tasks: TaskTracker,
}

/// Why one attempt did not end in a process that kept running.
enum Failure {
    Exited { pid: u32, exit: String },
    NotStarted { reason: String },
}

impl Failure {
    fn text(&self) -> String {
        match self {
            Failure::Exited { exit, .. } => exit.clone(),
            Failure::NotStarted { reason } => reason.clone(),
        }
    }
}

impl Supervision {
    pub async fn run(mut self) {
        let tail = StderrTail::new(self.stderr_lines);
        let mut spawned_before = false;
        loop {
            let failure = match self.attempt(&tail, &mut spawned_before).await {
                Some(failure) => failure,
                None => return,
            };
            let text = failure.text();
            self.view.send_modify(|v| {
                v.exits.push_back(text.clone());
                while v.exits.len() > EXITS_KEPT {
                    v.exits.pop_front();
                }
            });
            let delay = self.backoff.ended(Instant::now());
            let failures = self.backoff.attempt();
            let note = match &failure {
                Failure::Exited { pid, exit } => format!("process {pid} exited ({exit})"),
                Failure::NotStarted { reason } => reason.clone(),
            };
            let within_cap = failures <= self.crash_loop_cap;
            if within_cap {
                let delay = delay.min(self.restart_cap);
                warn!(backend.tier = "local", failure = %text, delay = %crate::text::duration(delay), "Process not running; restarting.");
                self.view.send_modify(|v| {
                    v.phase = Phase::BackingOff {
                        last_exit: text.clone(),
                        delay,
                    }
                });
                self.events.emit(DriverEvent::Changed { note });
                if !self.wait(delay, true).await {
                    return;
                }
            } else {
                let at = SystemTime::now() + delay;
                let report = self.crash_report(&tail, failures, at);
                warn!(backend.tier = "local", failures, next_attempt_in = %crate::text::duration(delay), reason = %report, "Process is crash-looping; retrying at the ceiling.");
                self.view.send_modify(|v| {
                    v.phase = Phase::CrashLooping {
                        report: report.clone(),
                        next_attempt: at,
                    }
                });
                self.events.emit(DriverEvent::Changed { note });
                if !self.wait(delay, false).await {
                    return;
                }
            }
        }
    }

    /// One attempt: clears what an earlier run left, spawns, and waits for
    /// the process to exit. `None` when stopped on purpose.
    async fn attempt(&mut self, tail: &StderrTail, spawned_before: &mut bool) -> Option<Failure> {
        // What an earlier run of this tier left behind (a forked child's
        // children; a predecessor still stopping) is ended first.
        let stale = client::end_recorded_group(self.record.clone(), self.grace);
        tokio::select! {
            ended = stale => {
                if let Some(what) = ended {
                    info!(backend.tier = "local", ended = %what, "Ended what an earlier run left.");
                }
            }
            _ = &mut self.stop => {
                self.view.send_modify(|v| v.phase = Phase::Stopped);
                return None;
            }
        }
        if let Some(refusal) = self.port_refusal().await {
            return Some(Failure::NotStarted { reason: refusal });
        }
        self.backoff.started(Instant::now());
        let process = match client::spawn(&self.spec, tail, &self.tasks) {
            Ok(process) => process,
            Err(e) => {
                return Some(Failure::NotStarted {
                    reason: format!("cannot run {}: {e}", self.spec.program.display()),
                });
            }
        };
        let pid = process.pid;
        info!(backend.tier = "local", pid, program = %self.spec.program.display(), "Process started.");
        if let Err(error) = client::write_record(self.record.clone(), pid).await {
            warn!(backend.tier = "local", pid, %error, "Process group not recorded.");
        }
        self.view.send_modify(|v| {
            v.phase = Phase::Running {
                pid,
                since: Instant::now(),
            }
        });
        if std::mem::replace(spawned_before, true) {
            self.events.emit(DriverEvent::BackendRestarted {
                note: format!("process {pid} started"),
            });
        } else {
            self.events.emit(DriverEvent::Changed {
                note: format!("process {pid} started"),
            });
        }
        self.wait_exit(process).await
    }

    /// Why the service's port cannot be ours, when another process holds it.
    async fn port_refusal(&self) -> Option<String> {
        // Only a port in use is a refusal; any other bind error (EMFILE)
        // is for the spawn to meet and count.
        let error = ports::bind_error(self.port, Protocol::Tcp)
            .filter(|e| e.kind() == std::io::ErrorKind::AddrInUse)?;
        let holder = match ports::owner(self.port, Protocol::Tcp, OWNER_LOOKUP).await {
            Some(owner) => owner.to_string(),
            None => "a process cascade cannot see".to_owned(),
        };
        Some(format!(
            "port {} is held by {holder}, not by a process cascade started ({error})",
            self.port
        ))
    }

    /// Waits for the process to exit; `None` when stopped on purpose.
    async fn wait_exit(&mut self, mut process: client::Process) -> Option<Failure> {
        let pid = process.pid;
        let exit = tokio::select! {
            status = process.child.wait() => client::describe_exit(status),
            grace = &mut self.stop => {
                let grace = grace.unwrap_or(self.grace);
                let status = client::terminate(process, grace).await;
                let status = match status {
                    Some(status) => client::describe_exit(Ok(status)),
                    None => "not known".to_owned(),
                };
                info!(backend.tier = "local", pid, %status, "Process stopped.");
                self.forget_group(pid).await;
                self.view.send_modify(|v| v.phase = Phase::Stopped);
                return None;
            }
        };
        // The rest of the group goes with its leader (the guard's SIGKILL).
        drop(process);
        self.forget_group(pid).await;
        Some(Failure::Exited { pid, exit })
    }

    async fn forget_group(&self, pgid: u32) {
        if !client::wait_group_gone(pgid, GROUP_EXIT).await {
            warn!(
                backend.tier = "local",
                pgid, "Process group outlived its stop."
            );
            return;
        }
        client::remove_record(self.record.clone(), pgid).await;
    }

    /// Sleeps `delay`, cut short by a wake-up when `wakeable`; false when
    /// stopped meanwhile.
    async fn wait(&mut self, delay: Duration, wakeable: bool) -> bool {
        let wake = self.wake.clone();
        let woken = async {
            if wakeable {
                wake.notified().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = woken => true,
            _ = &mut self.stop => {
                self.view.send_modify(|v| v.phase = Phase::Stopped);
                false
            }
        }
    }

    fn crash_report(&self, tail: &StderrTail, failures: u32, next: SystemTime) -> String {
        let exits: Vec<String> = self.view.borrow().exits.iter().cloned().collect();
        let quoted = &exits[exits.len().saturating_sub(EXITS_QUOTED)..];
        let mut reason = format!(
            "crash loop: {failures} failed start{} without running {} (last: {}); next attempt at {}",
            if failures == 1 { "" } else { "s" },
            crate::text::duration(self.backoff.config().reset_after),
            quoted.join(", "),
            humantime::format_rfc3339_seconds(next),
        );
        let stderr = quote_tail(&tail.lines(), STDERR_QUOTED);
        if !stderr.is_empty() {
            reason.push_str("; stderr tail: ");
            reason.push_str(&stderr);
        }
        reason
    }
}

/// The most recent lines that fit in `budget` characters, oldest first,
/// joined with ` | `.
pub fn quote_tail(lines: &[String], budget: usize) -> String {
    let mut kept: Vec<String> = Vec::new();
    let mut used = 0;
    for line in lines.iter().rev() {
        let len = line.chars().count() + 3;
        if used + len > budget {
            if kept.is_empty() {
                kept.push(client::cut(line, budget));
            }
            break;
        }
        used += len;
        kept.push(line.clone());
    }
    kept.reverse();
    kept.join(" | ")
}
