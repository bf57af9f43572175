//! The `local` tier: the service as a process cascade spawns and keeps alive.
//!
//! The heaviest tier (the real service needs about 2 GB of RAM), so it is
//! started only by the waterfall's start phase, and only when the host has
//! `min_free_memory` available. Once started, a supervision loop
//! (`supervise.rs`) restarts the process when it exits or cannot start, with
//! Docker's backoff (100 ms doubling to 1 min, reset after 10 s of stable
//! running); past `crash_loop_cap` failed starts without a stable run the
//! tier reports itself crash-looping (Unavailable, with the exit codes, the
//! tail of stderr and the next attempt's time) and keeps retrying with
//! delays that grow up to `crash_loop_ceiling`, like Kubernetes'
//! CrashLoopBackOff. `cascade restart local` retries at once.
//!
//! The loop and its process belong to a [`Keeper`] that the tier's driver
//! factory holds, not to one driver: a tier actor that panics or is killed
//! drops its driver, and the driver its successor gets adopts the running
//! process (same pid, no restart). A reload builds a new factory, hence a
//! new keeper, and the old actor's `stop` ends the old process.
//!
//! The tier serves only its own process: a port someone else holds is
//! refused before spawning (naming the holder), and a health check counts
//! only when every socket accepting on `127.0.0.1:port` belongs to the
//! child's process group (Linux; elsewhere the health check alone decides).
//! The group is recorded in the state directory, so what a forking child
//! left behind when cascade was SIGKILLed is ended at the next start.
//!
//! Invariant: probing never spawns; only `start` and `restart` do. Dropping
//! a driver stops nothing.

mod client;
mod supervise;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::contract::{
    Driver, DriverEvent, DriverFactory, EventSink, ProbeOutcome, RestartReport, RestartRequest,
    StopReason, TierError, TierId,
};
use crate::resilience::{Backoff, BackoffConfig, BreakerConfig, Jitter};
use crate::routing::Endpoint;
use crate::tier::{ProbeConfig, TierSpec};
use crate::tiers::ports::{self, Serving};

pub use client::available_memory;

/// Stands for the cascade executable in `command`, so the shipped default
/// configuration can run the built-in demo backend on any machine.
pub const SELF_EXE: &str = "{cascade}";
/// Stands for `port` in `args` and `env` values.
pub const PORT: &str = "{port}";

/// Most stderr lines kept for crash reports.
const MAX_TAIL_LINES: usize = 200;

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
    /// Failed starts without a stable run before the tier reports itself
    /// crash-looping.
    pub crash_loop_cap: u32,
    /// Past `crash_loop_cap`, delays keep doubling up to this.
    #[serde(with = "humantime_serde")]
    pub crash_loop_ceiling: Duration,
    /// Refuse to start when the host has less memory available than this.
    pub min_free_memory: ByteSize,
    /// Lines of stderr quoted when the process crash-loops.
    pub stderr_tail_lines: usize,
    /// Keep this tier started while another tier is active, so a failover
    /// to it needs no cold start (the waterfall's standby).
    pub standby: bool,
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
            crash_loop_ceiling: Duration::from_secs(300),
            min_free_memory: ByteSize::gib(2),
            stderr_tail_lines: 20,
            standby: false,
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
        if self.crash_loop_ceiling < self.restart.cap {
            problems.push((
                "crash_loop_ceiling".into(),
                format!(
                    "must be at least restart.cap ({})",
                    crate::text::duration(self.restart.cap)
                ),
            ));
        }
        if self.stderr_tail_lines > MAX_TAIL_LINES {
            problems.push((
                "stderr_tail_lines".into(),
                format!("must be at most {MAX_TAIL_LINES}"),
            ));
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
    /// Not running, within the crash-loop cap: the next attempt follows
    /// after `delay`.
    BackingOff {
        last_exit: String,
        delay: Duration,
    },
    /// Past the crash-loop cap: retried at `next_attempt`.
    CrashLooping {
        report: String,
        next_attempt: SystemTime,
    },
    Stopped,
}

#[derive(Debug, Clone, Default)]
struct ProcView {
    phase: Phase,
    /// Why the last start was refused (memory), shown while nothing runs.
    refused: Option<String>,
    /// Why each of the last attempts ended, most recent last.
    exits: VecDeque<String>,
}

/// Where the supervision loop's events go: the sink of the driver built
/// last, so a successor actor hears about the process it adopted.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Option<EventSink>>>);

impl Events {
    fn set(&self, sink: EventSink) {
        if let Ok(mut current) = self.0.lock() {
            *current = Some(sink);
        }
    }

    fn emit(&self, event: DriverEvent) {
        let sink = self.0.lock().ok().and_then(|s| s.clone());
        if let Some(sink) = sink {
            sink.emit(event);
        }
    }
}

/// The current supervision loop.
struct Run {
    /// Asks the loop to stop its process with this grace (zero: SIGKILL at
    /// once). Dropping it stops the process with the configured grace.
    stop: tokio::sync::oneshot::Sender<Duration>,
    /// Cuts a backoff wait short.
    wake: Arc<Notify>,
    done: JoinHandle<()>,
}

/// What outlives one driver: the supervision loop, its process and what is
/// known of them. Held by the tier's factory, so every driver it builds for
/// one configuration shares it; dropped with the last of them (the tier
/// spec replaced by a reload, or cascade exiting), which stops the process
/// with the configured grace.
struct Keeper {
    config: LocalConfig,
    health_url: String,
    /// The process-group record in the state directory.
    record: PathBuf,
    http: reqwest::Client,
    events: Events,
    view: Arc<watch::Sender<ProcView>>,
    /// Held across start and stop, so two loops never overlap.
    run: tokio::sync::Mutex<Option<Run>>,
    tasks: TaskTracker,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // Dropping the stop sender makes the loop stop its process with the
        // configured grace; if the runtime is going away too, the process
        // group guard kills the group.
        self.run.get_mut().take();
    }
}

pub struct LocalDriver {
    keeper: Arc<Keeper>,
}

/// Where the local tier records its child's process group.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("local").join("process-group.json")
}

/// The tier as the root runs it: a process cascade spawns, recorded in
/// `state_dir`. Drivers built by one spec share its process, so a tier actor
/// restarted by the root adopts it.
pub fn tier_spec(config: LocalConfig, state_dir: &Path) -> TierSpec {
    let fingerprint = crate::tier::fingerprint(&config);
    let driver_config = config.clone();
    let record = record_path(state_dir);
    let keeper: Mutex<Option<Arc<Keeper>>> = Mutex::new(None);
    let factory: DriverFactory = Arc::new(move |events| {
        let mut slot = keeper
            .lock()
            .map_err(|_| TierError::new("the local tier's keeper is poisoned"))?;
        let keeper = match slot.as_ref() {
            Some(keeper) => keeper.clone(),
            None => {
                let keeper = Arc::new(Keeper::new(driver_config.clone(), record.clone())?);
                *slot = Some(keeper.clone());
                keeper
            }
        };
        Ok(Arc::new(LocalDriver::new(keeper, events)) as Arc<dyn Driver>)
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

impl Keeper {
    fn new(config: LocalConfig, record: PathBuf) -> Result<Self, TierError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| TierError::new(format!("cannot build an HTTP client: {e}")))?;
        Ok(Keeper {
            health_url: format!("{}{}", config.endpoint(), config.health_path),
            config,
            record,
            http,
            events: Events::default(),
            view: Arc::new(watch::Sender::new(ProcView::default())),
            run: tokio::sync::Mutex::new(None),
            tasks: TaskTracker::new(),
        })
    }
}

/// Whether process `pid`'s group serves the tier: its health check passes
/// and every socket accepting on the port is the group's. `Ok` carries the
/// status note.
enum Check {
    Serving(String),
    /// Serving as far as can be told; the ownership check had no answer.
    Unsure(String),
    Not(String),
    /// Not serving, and stopped by a signal (SIGSTOP): it cannot come up
    /// by itself, nor answer a SIGTERM.
    Frozen(String),
}

/// How a wait for a started process ended.
enum Ready {
    Serving,
    /// The process was stopped by a signal while it was waited for.
    Frozen,
}

impl LocalDriver {
    fn new(keeper: Arc<Keeper>, events: EventSink) -> Self {
        keeper.events.set(events);
        LocalDriver { keeper }
    }

    fn phase(&self) -> Phase {
        self.keeper.view.borrow().phase.clone()
    }

    /// Starts a supervision loop unless one is running.
    #[cfg(test)]
    async fn ensure_running(&self) -> Result<(), TierError> {
        let mut run = self.keeper.run.lock().await;
        self.ensure_running_locked(&mut run)
    }

    fn ensure_running_locked(&self, run: &mut Option<Run>) -> Result<(), TierError> {
        if run.as_ref().is_some_and(|r| !r.done.is_finished()) {
            return Ok(());
        }
        let k = &self.keeper;
        let available = available_memory();
        let needed = k.config.min_free_memory.as_u64();
        if available < needed {
            let reason = format!(
                "refusing to start: {} of memory available, below min_free_memory {}",
                ByteSize::b(available).display().iec(),
                k.config.min_free_memory.display().iec()
            );
            k.view.send_modify(|v| v.refused = Some(reason.clone()));
            return Err(TierError::new(reason));
        }
        let spec = k.config.process_spec()?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let wake = Arc::new(Notify::new());
        let restart = &k.config.restart;
        let supervisor = supervise::Supervision {
            spec,
            port: k.config.port,
            backoff: Backoff::new(BackoffConfig {
                cap: restart.cap.max(k.config.crash_loop_ceiling),
                ..restart.clone()
            }),
            restart_cap: restart.cap,
            crash_loop_cap: k.config.crash_loop_cap,
            grace: k.config.stop_grace,
            stderr_lines: k.config.stderr_tail_lines,
            record: k.record.clone(),
            view: k.view.clone(),
            events: k.events.clone(),
            stop: stop_rx,
            wake: wake.clone(),
            tasks: k.tasks.clone(),
        };
        k.view.send_modify(|v| {
            v.phase = Phase::NotStarted;
            v.refused = None;
            v.exits.clear();
        });
        let done = k.tasks.spawn(supervisor.run());
        *run = Some(Run { stop, wake, done });
        Ok(())
    }

    /// Stops the supervision loop and its process; `grace` zero means SIGKILL.
    async fn stop_with(&self, grace: Duration) {
        let mut run = self.keeper.run.lock().await;
        Self::stop_locked(&mut run, grace).await;
    }

    async fn stop_locked(run: &mut Option<Run>, grace: Duration) {
        let Some(current) = run.take() else { return };
        // The loop may have ended by itself; then nobody listens.
        let _ = current.stop.send(grace);
        if let Err(e) = current.done.await {
            warn!(backend.tier = "local", error = %e, "Supervision loop ended badly.");
        }
    }

    /// The health check and, at the same time, who holds the port.
    async fn check(&self, pid: u32) -> Check {
        let k = &self.keeper;
        // Both within the probe's own deadline, which the tier actor sets
        // to the same timeout.
        let budget = k.config.probe.timeout.mul_f32(0.9);
        let (health, owner) = tokio::join!(
            crate::tiers::health::check(&k.http, &k.health_url, budget),
            ports::served_by_group(k.config.port, pid, budget),
        );
        if let Err(error) = health {
            if client::is_stopped(pid).await {
                return Check::Frozen(format!(
                    "process {pid} is stopped by a signal (state T): {error}"
                ));
            }
            return Check::Not(error);
        }
        let port = k.config.port;
        match owner {
            Ok(Serving::ByGroup | Serving::Unknown) => Check::Serving(format!("ready (pid {pid})")),
            Ok(Serving::Nobody) => Check::Not(format!(
                "port {port} answered, but no listening socket of process group {pid} was found"
            )),
            Ok(Serving::Others(holders)) => {
                let who = if holders.is_empty() {
                    "a process cascade cannot look into".to_owned()
                } else {
                    holders
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                Check::Not(format!(
                    "port {port} is answered by {who}, not by the backend's process group {pid}"
                ))
            }
            Err(e) => Check::Unsure(format!("ready (pid {pid}); {e}")),
        }
    }

    /// The start phase's look at what runs: a process that does not serve
    /// although it has had its whole `start_timeout`, or is stopped by a
    /// signal, is replaced; a loop in its backoff tries at once.
    async fn start_once(&self) -> Result<(), TierError> {
        let mut run = self.keeper.run.lock().await;
        let alive = run.as_ref().is_some_and(|r| !r.done.is_finished());
        match self.phase() {
            Phase::Running { pid, since } if alive => {
                let frozen = client::is_stopped(pid).await;
                if (frozen || since.elapsed() >= self.keeper.config.start_timeout)
                    && let Check::Not(error) | Check::Frozen(error) = self.check(pid).await
                {
                    warn!(backend.tier = "local", pid, %error, "Process runs but does not serve; restarting it.");
                    let grace = if frozen {
                        Duration::ZERO
                    } else {
                        self.keeper.config.stop_grace
                    };
                    Self::stop_locked(&mut run, grace).await;
                    self.ensure_running_locked(&mut run)?;
                    self.keeper.events.emit(DriverEvent::BackendRestarted {
                        note: format!("process {pid} restarted by the start phase: {error}"),
                    });
                }
            }
            Phase::BackingOff { .. } if alive => {
                if let Some(current) = run.as_ref() {
                    current.wake.notify_one();
                }
            }
            Phase::CrashLooping { report, .. } if alive => {
                return Err(TierError::new(report));
            }
            _ => {}
        }
        self.ensure_running_locked(&mut run)
    }

    /// Waits until the process serves (its own health check, on its own
    /// socket); fails when the loop is crash-looping or stopped, and hands
    /// a process stopped by a signal back to the caller.
    async fn wait_ready(&self) -> Result<Ready, TierError> {
        let mut view = self.keeper.view.subscribe();
        loop {
            let phase = view.borrow_and_update().phase.clone();
            match phase {
                Phase::CrashLooping { report, .. } => return Err(TierError::new(report)),
                Phase::Stopped => return Err(TierError::new("stopped while starting")),
                Phase::Running { pid, .. } => match self.check(pid).await {
                    Check::Serving(_) | Check::Unsure(_) => return Ok(Ready::Serving),
                    Check::Frozen(_) => return Ok(Ready::Frozen),
                    Check::Not(_) => {}
                },
                Phase::NotStarted | Phase::BackingOff { .. } => {}
            }
            // Poll health often, but wake at once when the loop moves on.
            let _ = tokio::time::timeout(Duration::from_millis(50), view.changed()).await;
        }
    }
}

#[async_trait]
impl Driver for LocalDriver {
    fn endpoint(&self) -> Option<String> {
        Some(self.keeper.config.endpoint())
    }

    /// The process, named by its pid, while one runs: a new process is a
    /// new endpoint for the router.
    fn endpoints(&self) -> Vec<Endpoint> {
        match self.phase() {
            Phase::Running { pid, .. } => vec![Endpoint::new(
                format!("pid {pid}"),
                self.keeper.config.endpoint(),
            )],
            _ => Vec::new(),
        }
    }

    fn startable(&self) -> bool {
        true
    }

    async fn probe(&self) -> ProbeOutcome {
        match self.phase() {
            Phase::NotStarted => {
                let refused = self.keeper.view.borrow().refused.clone();
                ProbeOutcome::Idle {
                    reason: refused.unwrap_or_else(|| "not started".into()),
                }
            }
            Phase::Stopped => ProbeOutcome::Idle {
                reason: "stopped".into(),
            },
            Phase::CrashLooping { report, .. } => ProbeOutcome::Unavailable { reason: report },
            Phase::BackingOff { last_exit, delay } => ProbeOutcome::Gone {
                reason: format!(
                    "not running ({last_exit}); next attempt in {}",
                    crate::text::duration(delay)
                ),
            },
            Phase::Running { pid, .. } => match self.check(pid).await {
                Check::Serving(note) => ProbeOutcome::Up { note },
                Check::Unsure(note) => ProbeOutcome::Degraded { note },
                Check::Not(error) | Check::Frozen(error) => ProbeOutcome::Down { error },
            },
        }
    }

    /// Only the start phase calls this, when no tier is healthy. A process
    /// that does not serve although it has had its whole `start_timeout`,
    /// or is stopped by a signal, is restarted (like a liveness probe),
    /// since waiting on it would leave the host without a service; one
    /// still coming up (a model loading) is waited for. A loop waiting out
    /// its backoff tries at once; a crash-looping one keeps its ceiling.
    async fn start(&self) -> Result<(), TierError> {
        // A process stopped by a signal while it is waited for (SIGSTOP can
        // land after the first look) goes round again and is replaced; the
        // tier actor's start deadline bounds the loop.
        loop {
            self.start_once().await?;
            if let Ready::Serving = self.wait_ready().await? {
                return Ok(());
            }
        }
    }

    async fn stop(&self, _reason: StopReason) -> Result<(), TierError> {
        // Whatever the reason: a successor (a reload) runs a configuration
        // of its own, so it cannot adopt this process.
        self.stop_with(self.keeper.config.stop_grace).await;
        Ok(())
    }

    async fn restart(&self, request: RestartRequest) -> Result<RestartReport, TierError> {
        let k = &self.keeper;
        let mut plan = Vec::new();
        let mut grace = if request.force {
            Duration::ZERO
        } else {
            k.config.stop_grace
        };
        if let Phase::Running { pid, .. } = self.phase() {
            let frozen = client::is_stopped(pid).await;
            if frozen {
                grace = Duration::ZERO;
            }
            plan.push(if request.force {
                format!("kill process group {pid} (SIGKILL)")
            } else if frozen {
                format!("kill process group {pid} (SIGKILL: it is stopped by a signal)")
            } else {
                format!(
                    "stop process group {pid} (SIGTERM, SIGKILL after {})",
                    crate::text::duration(k.config.stop_grace)
                )
            });
        }
        plan.push(format!(
            "start `{}`",
            crate::secrets::command_line(&k.config.command, &k.config.args)
        ));
        plan.push(format!(
            "wait for {} to answer 2xx from the process group it starts",
            k.health_url
        ));
        let report = RestartReport {
            tier: TierId::Local,
            dry_run: request.dry_run,
            plan,
        };
        if request.dry_run {
            return Ok(report);
        }
        {
            let mut run = k.run.lock().await;
            Self::stop_locked(&mut run, grace).await;
            self.ensure_running_locked(&mut run)?;
        }
        self.wait_ready().await?;
        Ok(report)
    }

    fn details(&self) -> BTreeMap<String, String> {
        let view = self.keeper.view.borrow();
        let mut details = BTreeMap::new();
        match &view.phase {
            Phase::Running { pid, .. } => {
                details.insert("pid".into(), pid.to_string());
                // The child leads its own process group.
                details.insert("pgid".into(), pid.to_string());
            }
            Phase::CrashLooping { next_attempt, .. } => {
                details.insert("crash_looping".into(), "true".into());
                details.insert(
                    "next_attempt".into(),
                    humantime::format_rfc3339_seconds(*next_attempt).to_string(),
                );
            }
            _ => {}
        }
        if !view.exits.is_empty() {
            let exits: Vec<String> = view
                .exits
                .iter()
                .map(|e| client::cut(e, client::TAIL_LINE_MAX))
                .collect();
            details.insert("recent_exits".into(), exits.join(", "));
        }
        details
    }
}
