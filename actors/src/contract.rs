//! The backend contract: what every tier is, says and answers.
//!
//! A tier is a [`Driver`] (the tier-specific part: how to probe, start, stop
//! and restart a backend) wrapped by the one generic tier actor in
//! `tier.rs`, which owns the breaker, the probe schedule and the state
//! machine. Every tier therefore answers the same closed set of messages
//! ([`TierMsg`]) and pushes the same [`TierStatus`] to the root.
//!
//! Invariant: nothing here does I/O; these are the types both sides agree on.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use ractor::{ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize, Serializer};

use crate::resilience::BreakerState;
use crate::routing::{Endpoint, RequestOutcome, RouteInfo};

/// The four kinds of backend, named as in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierId {
    Docker,
    CloudRun,
    Local,
    GcpVm,
}

impl TierId {
    pub const ALL: [TierId; 4] = [
        TierId::Docker,
        TierId::CloudRun,
        TierId::Local,
        TierId::GcpVm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TierId::Docker => "docker",
            TierId::CloudRun => "cloud_run",
            TierId::Local => "local",
            TierId::GcpVm => "gcp_vm",
        }
    }

    pub fn parse(name: &str) -> Option<TierId> {
        TierId::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for TierId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a tier stands, as the waterfall sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierState {
    /// Not probed yet.
    Unknown,
    /// First probe in flight.
    Probing,
    /// The start phase asked it to start and it has not finished.
    Starting,
    /// Serving, and its last probes passed.
    Healthy,
    /// Serving, but its last probe failed (below the breaker's threshold).
    Degraded,
    /// Not serving: probes fail, its breaker is open, or nothing runs.
    Unhealthy,
    /// Cannot serve until an operator acts (crash loop, not installed, ...).
    Unavailable,
}

impl TierState {
    /// Whether traffic may be sent to a tier in this state.
    pub fn is_serving(self) -> bool {
        matches!(self, TierState::Healthy | TierState::Degraded)
    }

    /// Whether the tier has not reported a first probe result yet.
    pub fn is_pending(self) -> bool {
        matches!(self, TierState::Unknown | TierState::Probing)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TierState::Unknown => "unknown",
            TierState::Probing => "probing",
            TierState::Starting => "starting",
            TierState::Healthy => "healthy",
            TierState::Degraded => "degraded",
            TierState::Unhealthy => "unhealthy",
            TierState::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for TierState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status reply every tier gives, and pushes to the root on change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierStatus {
    pub tier: TierId,
    pub state: TierState,
    /// One line for humans: `ready (pid 4242)`, `breaker open after 5 consecutive failures: ...`.
    pub reason: String,
    /// Base URL applications use when this tier is active.
    pub endpoint: Option<String>,
    /// Every address that serves this tier's traffic (the router spreads
    /// requests over them); empty while nothing serves.
    pub endpoints: Vec<Endpoint>,
    pub breaker: BreakerState,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// When `state` last changed.
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
    /// Whether the start phase may ask this tier to start: its driver can
    /// start it, and its last probe did not find its platform down.
    pub startable: bool,
    /// Restarts of the backend itself (a process, a container, a VM).
    pub backend_restarts: u64,
    /// Tier-specific facts for operators (pid, exit codes, container ids).
    pub details: BTreeMap<String, String>,
}

impl TierStatus {
    pub fn new(tier: TierId, startable: bool) -> Self {
        TierStatus {
            tier,
            state: TierState::Unknown,
            reason: "not probed yet".to_owned(),
            endpoint: None,
            endpoints: Vec::new(),
            breaker: BreakerState::Closed,
            consecutive_failures: 0,
            last_error: None,
            since: SystemTime::now(),
            startable,
            backend_restarts: 0,
            details: BTreeMap::new(),
        }
    }
}

pub fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// What `cascade restart TIER` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRequest {
    /// Restart even what looks consistent, and do not wait politely.
    #[serde(default)]
    pub force: bool,
    /// Report the plan, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a restart did (or, for a dry run, would do): one line per step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartReport {
    pub tier: TierId,
    pub dry_run: bool,
    pub plan: Vec<String>,
}

/// A tier failure as text: tiers keep their own typed errors and hand the
/// contract what an operator should read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TierError(pub String);

impl TierError {
    pub fn new(message: impl Into<String>) -> Self {
        TierError(message.into())
    }
}

/// The result of one health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The backend answered as healthy.
    Up { note: String },
    /// The backend should answer and did not; counts against the breaker.
    Down { error: String },
    /// The backend asked to be left alone (HTTP 429/503 with `Retry-After`):
    /// counts as a failure and holds the breaker open for at least `retry_after`.
    Throttled {
        error: String,
        retry_after: std::time::Duration,
    },
    /// Serving, but something around it is slow or off (a slow Docker API):
    /// the tier is degraded, and the breaker counts no failure.
    Degraded { note: String },
    /// The backend is definitively gone (its container was removed, its
    /// process exited): not serving at once, without waiting for the
    /// breaker's threshold.
    Gone { reason: String },
    /// Nothing runs to be probed (not started, stopped); the breaker is untouched.
    Idle { reason: String },
    /// The backend does not serve and the platform it runs on does not
    /// answer either (a Docker daemon that accepts and never replies), and
    /// cascade will not start that platform: counts as a failure like
    /// `Down`, and the tier is not startable until a probe says otherwise,
    /// since a start could only wait out its deadline.
    PlatformDown { error: String },
    /// The tier cannot serve until an operator acts.
    Unavailable { reason: String },
}

/// The tier-specific half of a tier. The generic tier actor calls these from
/// tracked tasks, each under a deadline, so an implementation may take its
/// time but must be cancel-safe (a dropped future leaves things consistent).
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Base URL applications use, when known.
    fn endpoint(&self) -> Option<String>;
    /// Every address serving traffic now. By default the one `endpoint`,
    /// named by its URL; a tier with several (containers, VMs) lists each.
    fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoint()
            .map(|url| vec![Endpoint::new(url.clone(), url)])
            .unwrap_or_default()
    }
    /// How routed requests reach this tier (credentials, cold starts).
    /// Called once per driver.
    fn route_info(&self) -> RouteInfo {
        RouteInfo::default()
    }
    /// Whether `start` can do anything.
    fn startable(&self) -> bool;
    /// Checks health. Never starts, creates or restarts anything.
    async fn probe(&self) -> ProbeOutcome;
    /// Brings the backend up and returns once it is ready.
    async fn start(&self) -> Result<(), TierError>;
    /// Stops the backend gracefully, or leaves it for a successor: see
    /// [`StopReason`].
    async fn stop(&self, reason: StopReason) -> Result<(), TierError>;
    /// Restarts the backend, or with `dry_run` only says how it would.
    async fn restart(&self, request: RestartRequest) -> Result<RestartReport, TierError>;
    /// Tier-specific facts for the status reply.
    fn details(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// The tier is (or stops being) the active one; a tier holding costly
    /// resources may release them after a while when it is not.
    fn set_active(&self, _active: bool) {}
}

/// Why a tier actor is told to stop, so a driver can tell "cascade is
/// going away" from "a new instance of this tier takes over".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// cascade is exiting: the tier's exit policy applies (e.g. the docker
    /// tier's `stop_on_exit`).
    Exiting,
    /// The tier left the configuration (a reload): nobody takes over, so
    /// the tier's exit policy applies as for [`StopReason::Exiting`].
    Removed,
    /// A new actor for the same tier takes over (a reload changed its
    /// section): leave running what the successor can adopt, so a
    /// replacement causes no outage.
    Replaced,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Exiting => "exiting",
            StopReason::Removed => "removed",
            StopReason::Replaced => "replaced",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something a driver noticed on its own (a process exited, a container died).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverEvent {
    /// State may have changed: probe now instead of at the next interval.
    Changed { note: String },
    /// The driver restarted its backend by itself.
    BackendRestarted { note: String },
}

impl std::fmt::Display for DriverEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriverEvent::Changed { note } => write!(f, "changed: {note}"),
            DriverEvent::BackendRestarted { note } => write!(f, "backend restarted: {note}"),
        }
    }
}

/// How a driver reports [`DriverEvent`]s to its tier actor.
#[derive(Clone)]
pub struct EventSink {
    tier: ActorRef<TierMsg>,
}

impl EventSink {
    pub(crate) fn new(tier: ActorRef<TierMsg>) -> Self {
        EventSink { tier }
    }

    pub fn emit(&self, event: DriverEvent) {
        // A send fails only when the tier actor has stopped, and then nobody
        // is left to care about the event.
        if self
            .tier
            .send_message(TierMsg::Internal(Internal::Driver(event)))
            .is_err()
        {
            tracing::debug!("Driver event dropped: tier actor has stopped.");
        }
    }
}

#[cfg(test)]
impl EventSink {
    /// A sink whose events are logged at debug and otherwise dropped, for
    /// driver tests that do not look at events.
    pub(crate) async fn discarding() -> EventSink {
        struct Discard;

        impl ractor::Actor for Discard {
            type Msg = TierMsg;
            type State = ();
            type Arguments = ();

            async fn pre_start(
                &self,
                _myself: ActorRef<TierMsg>,
                _args: (),
            ) -> Result<(), ractor::ActorProcessingErr> {
                Ok(())
            }

            async fn handle(
                &self,
                _myself: ActorRef<TierMsg>,
                msg: TierMsg,
                _state: &mut (),
            ) -> Result<(), ractor::ActorProcessingErr> {
                if let TierMsg::Internal(Internal::Driver(event)) = msg {
                    tracing::debug!(%event, "Driver event.");
                }
                Ok(())
            }
        }

        let (actor, _) = ractor::Actor::spawn(None, Discard, ())
            .await
            .expect("the discarding sink starts");
        EventSink::new(actor)
    }
}

/// Builds a tier's driver when its actor (re)starts.
pub type DriverFactory = Arc<dyn Fn(EventSink) -> Result<Arc<dyn Driver>, TierError> + Send + Sync>;

/// The closed set of messages every tier actor answers.
pub enum TierMsg {
    /// Reply with the current status.
    Status(RpcReplyPort<TierStatus>),
    /// Probe now rather than at the next interval.
    ProbeNow,
    /// Start the backend; used only by the waterfall's start phase. The
    /// outcome is pushed to the root as [`crate::supervisor::RootMsg::StartFinished`].
    EnsureStarted,
    /// Stop probing and stop (or, when replaced, hand over) the backend;
    /// replies when done.
    Stop(StopReason, RpcReplyPort<()>),
    Restart(
        RestartRequest,
        RpcReplyPort<Result<RestartReport, TierError>>,
    ),
    /// The root tells the tier whether it is the active one.
    SetActive(bool),
    /// The router's report of one proxied request (passive health): a
    /// failure counts in the tier's breaker and triggers a probe.
    RequestOutcome(RequestOutcome),
    /// Sent by the tier's own tasks and driver; not part of the public contract.
    Internal(Internal),
}

#[doc(hidden)]
pub enum Internal {
    ProbeTick,
    ProbeDone(ProbeOutcome),
    StartDone(Result<(), TierError>),
    RestartDone(Result<(), TierError>),
    Driver(DriverEvent),
}
