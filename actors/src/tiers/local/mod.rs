//! The `local` tier: the service as a process cascade spawns and keeps alive.
//!
//! The heaviest tier (the real service needs about 2 GB of RAM), so it is
//! started only by the waterfall's start phase, and only when the host has
//! `min_free_memory` available. Once started, a supervision loop restarts the
//! process when it exits, with Docker's backoff (100 ms doubling to 1 min,
//! reset after 10 s of stable running); past `crash_loop_cap` restarts
//! without a stable run the tier gives up and reports itself Unavailable
//! with the exit codes and the tail of stderr.
//!
//! Invariant: probing never spawns; only `start` and `restart` do.

mod client;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::contract::{
    Driver, DriverEvent, DriverFactory, EventSink, ProbeOutcome, RestartReport, RestartRequest,
    StopReason, TierError, TierId,
};
use crate::resilience::{Backoff, BackoffConfig, BreakerConfig, Jitter};
use crate::tier::{ProbeConfig, TierSpec};

pub use client::available_memory;

/// Stands for the cascade executable in `command`, so the shipped default
/// configuration can run the built-in demo backend on any machine.
pub const SELF_EXE: &str = "{cascade}";
/// Stands for `port` in `args` and `env` values.
pub const PORT: &str = "{port}";

/// `[tiers.local]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Program to run; `{cascade}` is this executable.
    pub command: String,
    /// Arguments; `{port}` is replaced by `port`.
    pub args: Vec<String>,
    /// Extra environment; `PORT` is always set to `port`.
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    /// Port the service listens on, on 127.0.0.1.
    pub port: u16,
    pub health_path: String,
    pub probe: ProbeConfig,
    pub breaker: BreakerConfig,
    /// Deadline for the process to answer its health check after a start.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Backoff between restarts of the process.
    pub restart: BackoffConfig,
    /// Restarts allowed without a stable run before the tier gives up.
    pub crash_loop_cap: u32,
    /// Refuse to start when the host has less memory available than this.
    pub min_free_memory: ByteSize,
    /// Lines of stderr quoted when the process crash-loops.
    pub stderr_tail_lines: usize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            command: SELF_EXE.into(),
            args: vec!["demo-backend".into(), "--port".into(), PORT.into()],
            env: BTreeMap::new(),
            working_dir: None,
            port: 8701,
            health_path: "/health".into(),
            probe: ProbeConfig::default(),
            breaker: BreakerConfig::default(),
            start_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(10),
            restart: BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(60),
                reset_after: Duration::from_secs(10),
                jitter: Jitter::None,
            },
            crash_loop_cap: 5,
            min_free_memory: ByteSize::gib(2),
            stderr_tail_lines: 20,
        }
    }
}

impl LocalConfig {
    /// Problems as (key relative to `[tiers.local]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.command.trim().is_empty() {
            problems.push(("command".into(), "must name a program to run".into()));
        }
        if self.port == 0 {
            problems.push((
                "port".into(),
                "must be a port number from 1 to 65535".into(),
            ));
        }
        if !self.health_path.starts_with('/') {
            problems.push(("health_path".into(), "must start with `/`".into()));
        }
        if self.probe.timeout.is_zero() || self.probe.interval.is_zero() {
            problems.push((
                "probe".into(),
                "interval and timeout must be above zero".into(),
            ));
        }
        if self.start_timeout.is_zero() {
            problems.push(("start_timeout".into(), "must be above zero".into()));
        }
        for (key, problem) in self.breaker.validate() {
            problems.push((format!("breaker.{key}"), problem));
        }
        for (key, problem) in self.restart.validate() {
            problems.push((format!("restart.{key}"), problem));
        }
        problems
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn process_spec(&self) -> Result<client::ProcessSpec, TierError> {
        let program = if self.command == SELF_EXE {
            std::env::current_exe()
                .map_err(|e| TierError::new(format!("cannot find the cascade executable: {e}")))?
        } else {
            PathBuf::from(&self.command)
        };
        let port = self.port.to_string();
        let mut env: BTreeMap<String, String> = BTreeMap::from([("PORT".into(), port.clone())]);
        env.extend(
            self.env
                .iter()
                .map(|(k, v)| (k.clone(), v.replace(PORT, &port))),
        );
        Ok(client::ProcessSpec {
            program,
            args: self.args.iter().map(|a| a.replace(PORT, &port)).collect(),
            env,
            working_dir: self.working_dir.clone(),
            tier: TierId::Local.as_str(),
            stderr_lines: self.stderr_tail_lines,
        })
    }
}

/// Where the process stands, published by the supervision loop.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    NotStarted,
    Running {
        pid: u32,
        since: Instant,
    },
    BackingOff {
        last_exit: String,
        delay: Duration,
    },
    GaveUp {
        reason: String,
    },
    Stopped,
}

#[derive(Debug, Clone, Default)]
struct ProcView {
    phase: Phase,
    /// Why the last start was refused (memory), shown while nothing runs.
    refused: Option<String>,
    /// Most recent last.
    exits: VecDeque<String>,
    restarts: u64,
}

const EXITS_KEPT: usize = 10;

/// The current supervision loop.
struct Run {
    /// Asks the loop to stop its process with this grace (zero: SIGKILL at
    /// once). Dropping it stops the process with the configured grace.
    stop: tokio::sync::oneshot::Sender<Duration>,
    done: JoinHandle<()>,
}

pub struct LocalDriver {
    config: LocalConfig,
    health_url: String,
    http: reqwest::Client,
    events: EventSink,
    view: Arc<watch::Sender<ProcView>>,
    run: tokio::sync::Mutex<Option<Run>>,
    tasks: TaskTracker,
}

/// The tier as the root runs it: a process cascade spawns.
pub fn tier_spec(config: LocalConfig) -> TierSpec {
    let fingerprint = crate::tier::fingerprint(&config);
    let driver_config = config.clone();
    let factory: DriverFactory = Arc::new(move |events| {
        let driver = LocalDriver::new(driver_config.clone(), events)?;
        Ok(Arc::new(driver) as Arc<dyn Driver>)
    });
    TierSpec {
        id: TierId::Local,
        factory,
        probe: config.probe.clone(),
        breaker: config.breaker.clone(),
        start_timeout: config.start_timeout,
        stop_grace: config.stop_grace,
        fingerprint,
    }
}

impl LocalDriver {
    pub fn new(config: LocalConfig, events: EventSink) -> Result<Self, TierError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| TierError::new(format!("cannot build an HTTP client: {e}")))?;
        Ok(LocalDriver {
            health_url: format!("{}{}", config.endpoint(), config.health_path),
            config,
            http,
            events,
            view: Arc::new(watch::Sender::new(ProcView::default())),
            run: tokio::sync::Mutex::new(None),
            tasks: TaskTracker::new(),
        })
    }

    /// Starts a supervision loop unless one is running. Holding the `run`
    /// lock across start and stop keeps two loops from ever overlapping.
    #[cfg(test)]
    async fn ensure_running(&self) -> Result<(), TierError> {
        let mut run = self.run.lock().await;
        self.ensure_running_locked(&mut run)
    }

    fn ensure_running_locked(&self, run: &mut Option<Run>) -> Result<(), TierError> {
        if run.as_ref().is_some_and(|r| !r.done.is_finished()) {
            return Ok(());
        }
        let available = available_memory();
        let needed = self.config.min_free_memory.as_u64();
        if available < needed {
            let reason = format!(
                "refusing to start: {} of memory available, below min_free_memory {}",
                ByteSize::b(available).display().iec(),
                self.config.min_free_memory.display().iec()
            );
            self.view.send_modify(|v| v.refused = Some(reason.clone()));
            return Err(TierError::new(reason));
        }
        let spec = self.config.process_spec()?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let supervisor = Supervision {
            spec,
            backoff: Backoff::new(self.config.restart.clone()),
            crash_loop_cap: self.config.crash_loop_cap,
            grace: self.config.stop_grace,
            view: self.view.clone(),
            events: self.events.clone(),
            stop: stop_rx,
            tasks: self.tasks.clone(),
        };
        self.view.send_modify(|v| {
            v.phase = Phase::NotStarted;
            v.refused = None;
            v.exits.clear();
        });
        let done = self.tasks.spawn(supervisor.run());
        *run = Some(Run { stop, done });
        Ok(())
    }

    /// Stops the supervision loop and its process; `grace` zero means SIGKILL.
    async fn stop_with(&self, grace: Duration) {
        let mut run = self.run.lock().await;
        Self::stop_locked(&mut run, grace).await;
    }

    async fn stop_locked(run: &mut Option<Run>, grace: Duration) {
        let Some(current) = run.take() else { return };
        // The loop may have ended by itself (gave up); then nobody listens.
        let _ = current.stop.send(grace);
        if let Err(e) = current.done.await {
            warn!(backend.tier = "local", error = %e, "Supervision loop ended badly.");
        }
    }

    async fn wait_ready(&self) -> Result<(), TierError> {
        let mut view = self.view.subscribe();
        loop {
            if let Phase::GaveUp { reason } = &view.borrow().phase {
                return Err(TierError::new(reason.clone()));
            }
            if crate::tiers::health::check(&self.http, &self.health_url, self.config.probe.timeout)
                .await
                .is_ok()
            {
                return Ok(());
            }
            // Poll health often, but wake at once if the process gives up.
            let _ = tokio::time::timeout(Duration::from_millis(50), view.changed()).await;
        }
    }
}

#[async_trait]
impl Driver for LocalDriver {
    fn endpoint(&self) -> Option<String> {
        Some(self.config.endpoint())
    }

    fn startable(&self) -> bool {
        true
    }

    async fn probe(&self) -> ProbeOutcome {
        let phase = self.view.borrow().phase.clone();
        match phase {
            Phase::NotStarted => {
                let refused = self.view.borrow().refused.clone();
                ProbeOutcome::Idle {
                    reason: refused.unwrap_or_else(|| "not started".into()),
                }
            }
            Phase::Stopped => ProbeOutcome::Idle {
                reason: "stopped".into(),
            },
            Phase::GaveUp { reason } => ProbeOutcome::Unavailable { reason },
            Phase::BackingOff { last_exit, delay } => ProbeOutcome::Down {
                error: format!(
                    "process exited ({last_exit}); restarting in {}",
                    crate::text::duration(delay)
                ),
            },
            Phase::Running { pid, .. } => {
                match crate::tiers::health::check(
                    &self.http,
                    &self.health_url,
                    self.config.probe.timeout,
                )
                .await
                {
                    Ok(()) => ProbeOutcome::Up {
                        note: format!("ready (pid {pid})"),
                    },
                    Err(error) => ProbeOutcome::Down { error },
                }
            }
        }
    }

    /// Only the start phase calls this, when no tier is healthy: a process
    /// that has run for its whole `start_timeout` and still fails its health
    /// check is restarted (like a liveness probe), since waiting on it would
    /// leave the host without a service. One still coming up (a model
    /// loading) is waited for.
    async fn start(&self) -> Result<(), TierError> {
        {
            let mut run = self.run.lock().await;
            let running = run.as_ref().is_some_and(|r| !r.done.is_finished());
            let phase = self.view.borrow().phase.clone();
            if running
                && let Phase::Running { pid, since } = phase
                && since.elapsed() >= self.config.start_timeout
                && let Err(error) = crate::tiers::health::check(
                    &self.http,
                    &self.health_url,
                    self.config.probe.timeout,
                )
                .await
            {
                warn!(backend.tier = "local", pid, %error, "Process runs but is unhealthy; restarting it.");
                Self::stop_locked(&mut run, self.config.stop_grace).await;
            }
            self.ensure_running_locked(&mut run)?;
        }
        self.wait_ready().await
    }

    async fn stop(&self, _reason: StopReason) -> Result<(), TierError> {
        self.stop_with(self.config.stop_grace).await;
        Ok(())
    }

    async fn restart(&self, request: RestartRequest) -> Result<RestartReport, TierError> {
        let phase = self.view.borrow().phase.clone();
        let mut plan = Vec::new();
        if let Phase::Running { pid, .. } = phase {
            plan.push(if request.force {
                format!("kill process group {pid} (SIGKILL)")
            } else {
                format!(
                    "stop process group {pid} (SIGTERM, SIGKILL after {})",
                    crate::text::duration(self.config.stop_grace)
                )
            });
        }
        plan.push(format!(
            "start `{}`",
            crate::secrets::command_line(&self.config.command, &self.config.args)
        ));
        plan.push(format!("wait for {} to answer 2xx", self.health_url));
        let report = RestartReport {
            tier: TierId::Local,
            dry_run: request.dry_run,
            plan,
        };
        if request.dry_run {
            return Ok(report);
        }
        let grace = if request.force {
            Duration::ZERO
        } else {
            self.config.stop_grace
        };
        {
            let mut run = self.run.lock().await;
            Self::stop_locked(&mut run, grace).await;
            self.ensure_running_locked(&mut run)?;
        }
        self.wait_ready().await?;
        Ok(report)
    }

    fn details(&self) -> BTreeMap<String, String> {
        let view = self.view.borrow();
        let mut details = BTreeMap::new();
        if let Phase::Running { pid, .. } = view.phase {
            details.insert("pid".into(), pid.to_string());
            // The child leads its own process group.
            details.insert("pgid".into(), pid.to_string());
        }
        if !view.exits.is_empty() {
            let exits: Vec<&str> = view.exits.iter().map(String::as_str).collect();
            details.insert("recent_exits".into(), exits.join(", "));
        }
        details
    }
}

impl Drop for LocalDriver {
    fn drop(&mut self) {
        // Dropping the stop sender makes the loop stop its process with the
        // configured grace; if the runtime is going away too, the process
        // group guard kills the group.
        if let Ok(mut run) = self.run.try_lock() {
            run.take();
        }
    }
}

// === the supervision loop ===

struct Supervision {
    spec: client::ProcessSpec,
    backoff: Backoff,
    crash_loop_cap: u32,
    grace: Duration,
    view: Arc<watch::Sender<ProcView>>,
    events: EventSink,
    /// A stop request and its grace; closed means "stop with the default grace".
    stop: tokio::sync::oneshot::Receiver<Duration>,
    tasks: TaskTracker,
}

impl Supervision {
    async fn run(mut self) {
        let tail: client::StderrTail = Arc::new(Mutex::new(VecDeque::new()));
        loop {
            let process = match client::spawn(&self.spec, &tail, &self.tasks) {
                Ok(process) => process,
                Err(e) => {
                    let reason = format!("cannot run {}: {e}", self.spec.program.display());
                    return self.give_up(reason);
                }
            };
            let pid = process.pid;
            info!(backend.tier = "local", pid, program = %self.spec.program.display(), "Process started.");
            self.backoff.started(Instant::now());
            self.view.send_modify(|v| {
                v.phase = Phase::Running {
                    pid,
                    since: Instant::now(),
                }
            });

            let Some(exit) = self.wait_exit(process).await else {
                return;
            };
            let delay = self.backoff.ended(Instant::now());
            self.view.send_modify(|v| {
                v.exits.push_back(exit.clone());
                while v.exits.len() > EXITS_KEPT {
                    v.exits.pop_front();
                }
            });
            if self.backoff.attempt() > self.crash_loop_cap {
                let reason = self.crash_report(&tail);
                return self.give_up(reason);
            }
            warn!(backend.tier = "local", pid, %exit, delay_ms = delay.as_millis() as u64, "Process exited; restarting.");
            self.view.send_modify(|v| {
                v.phase = Phase::BackingOff {
                    last_exit: exit.clone(),
                    delay,
                }
            });
            self.events.emit(DriverEvent::Changed {
                note: format!("process {pid} exited ({exit})"),
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = &mut self.stop => {
                    self.view.send_modify(|v| v.phase = Phase::Stopped);
                    return;
                }
            }
            self.view.send_modify(|v| v.restarts += 1);
            self.events.emit(DriverEvent::BackendRestarted {
                note: format!("restarting after {exit}"),
            });
        }
    }

    /// Waits for the process to exit; `None` when stopped on purpose.
    async fn wait_exit(&mut self, mut process: client::Process) -> Option<String> {
        tokio::select! {
            status = process.child.wait() => Some(client::describe_exit(status)),
            grace = &mut self.stop => {
                let grace = grace.unwrap_or(self.grace);
                let pid = process.pid;
                let status = client::terminate(process, grace).await;
                info!(backend.tier = "local", pid, status = ?status, "Process stopped.");
                self.view.send_modify(|v| v.phase = Phase::Stopped);
                None
            }
        }
    }

    fn crash_report(&self, tail: &client::StderrTail) -> String {
        let exits: Vec<String> = self.view.borrow().exits.iter().cloned().collect();
        let stderr: Vec<String> = tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        let mut reason = format!(
            "crash loop: exited {} times without running {} (exits: {})",
            self.backoff.attempt(),
            crate::text::duration(self.backoff_reset_after()),
            exits.join(", ")
        );
        if !stderr.is_empty() {
            reason.push_str(&format!("; stderr tail: {}", stderr.join(" | ")));
        }
        reason
    }

    fn backoff_reset_after(&self) -> Duration {
        self.backoff.config().reset_after
    }

    fn give_up(&self, reason: String) {
        warn!(backend.tier = "local", %reason, "Giving up on the process.");
        self.view.send_modify(|v| {
            v.phase = Phase::GaveUp {
                reason: reason.clone(),
            }
        });
        self.events.emit(DriverEvent::Changed { note: reason });
    }
}
