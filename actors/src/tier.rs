//! The one tier actor: breaker, probe schedule and state machine around a
//! [`Driver`].
//!
//! Every tier (docker, cloud_run, local, gcp_vm) runs as this actor with its
//! own driver, so the contract in `contract.rs` is implemented once. The
//! actor never awaits a driver call in its handler: probes, starts and
//! restarts run as tasks in its `TaskTracker`, each under a deadline, and
//! report back by message. Only `Stop` awaits (bounded by the stop grace),
//! because the root is waiting for it anyway.
//!
//! A driver call that panics is caught in its task and reported like any
//! failure (a failed probe, start or restart carrying the panic's text), so
//! the actor always hears back. The tasks are cancelled by a guard dropped
//! with the actor's state, so a panicking or killed actor (ractor skips
//! `post_stop` then) leaves nothing driving the backend; its successor's
//! driver adopts the running backend.
//!
//! Invariants: a probe never starts anything; at most one probe is in
//! flight; at most one of start, restart and stop is in progress
//! ([`Lifecycle`]), and after a stop nothing starts again.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::field::Empty;
use tracing::{Instrument, Span, error, info, info_span, warn};

use crate::contract::{
    Driver, DriverEvent, DriverFactory, EventSink, Internal, ProbeOutcome, RestartReport,
    RestartRequest, StopReason, TierError, TierId, TierMsg, TierState, TierStatus,
};
use crate::metrics::metrics;
use crate::resilience::{
    Admission, BreakerConfig, BreakerState, CircuitBreaker, TripReason, with_deadline,
};
use crate::routing::RequestOutcome;
use crate::supervisor::RootMsg;

/// Probe settings shared by every tier (`[tiers.NAME.probe]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Time between probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Deadline of one probe.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
        }
    }
}

/// How the root describes a tier to run.
#[derive(Clone)]
pub struct TierSpec {
    pub id: TierId,
    pub factory: DriverFactory,
    pub probe: ProbeConfig,
    pub breaker: BreakerConfig,
    /// Deadline for `Driver::start`, readiness included.
    pub start_timeout: Duration,
    /// Deadline for `Driver::stop`.
    pub stop_grace: Duration,
    /// Identifies the configuration this spec was built from, so a reload
    /// can tell a changed tier from an unchanged one: the factory is a
    /// closure and cannot be compared. Equal fingerprints mean "leave the
    /// running tier alone".
    pub fingerprint: String,
}

/// A tier section's identity for reloads: its serialized form. Every field
/// of a `TierSpec` comes from its own section, so equal text means an equal
/// spec. Maps in tier sections are `BTreeMap`s, so the text is stable.
pub fn fingerprint(section: &impl Serialize) -> String {
    // Serializing plain config structs (strings, numbers, durations,
    // `BTreeMap`s) does not fail.
    serde_json::to_string(section).unwrap_or_else(|e| format!("unserializable: {e}"))
}

/// The tier actor. Read-only: everything mutable is in [`TierState`].
pub struct TierActor;

pub struct TierArgs {
    pub spec: TierSpec,
    pub root: ActorRef<RootMsg>,
}

pub struct State {
    /// This actor's id, which the root uses to tell current reports from stale ones.
    id: ractor::ActorId,
    spec: TierSpec,
    root: ActorRef<RootMsg>,
    driver: Arc<dyn Driver>,
    breaker: CircuitBreaker,
    status: TierStatus,
    /// The last proxied request's failure (`HTTP 503`), for the reason
    /// when failed requests opened the breaker.
    last_request_error: Option<String>,
    probe_in_flight: bool,
    lifecycle: Lifecycle,
    /// The root asked for a start while a restart was in flight; it gets
    /// the restart's outcome.
    start_requested: bool,
    tasks: Tasks,
}

/// What the tier is doing to its backend. One at a time: a request that
/// conflicts with the one in progress is refused with an error naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// Nothing in progress; probes run.
    Idle,
    /// The start phase's start is in flight; probes hold off.
    Starting,
    /// An operator's restart is in flight; probes hold off.
    Restarting,
    /// Stopped (or being stopped): the actor is about to go, and nothing
    /// starts the backend again.
    Stopping,
}

/// Every task the actor spawns and its probe timer. Dropping it (with the
/// actor's state, whether the actor stopped, panicked or was killed)
/// cancels them, so none outlives the actor.
struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
    ticker: Option<JoinHandle<()>>,
}

impl Tasks {
    fn stop_ticker(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
    }

    fn cancel(&mut self) {
        self.stop_ticker();
        self.cancel.cancel();
        self.tracker.close();
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Actor for TierActor {
    type Msg = TierMsg;
    type State = State;
    type Arguments = TierArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TierMsg>,
        TierArgs { spec, root }: TierArgs,
    ) -> Result<State, ActorProcessingErr> {
        let driver = (spec.factory)(EventSink::new(myself.clone()))
            .map_err(|e| format!("cannot build the {} tier: {e}", spec.id))?;
        let mut status = TierStatus::new(spec.id, driver.startable());
        status.endpoint = driver.endpoint();
        let ticker = myself.send_interval(spec.probe.interval, || {
            TierMsg::Internal(Internal::ProbeTick)
        });
        Ok(State {
            id: myself.get_id(),
            breaker: CircuitBreaker::new(spec.breaker.clone()),
            spec,
            root,
            driver,
            status,
            last_request_error: None,
            probe_in_flight: false,
            lifecycle: Lifecycle::Idle,
            start_requested: false,
            tasks: Tasks {
                tracker: TaskTracker::new(),
                cancel: CancellationToken::new(),
                ticker: Some(ticker),
            },
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<TierMsg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        state.announce_route();
        state.publish();
        probe(&myself, state, Admit::ThroughBreaker);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<TierMsg>,
        msg: TierMsg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TierMsg::Status(reply) => {
                state.refresh_status();
                reply_or_log(reply, state.status.clone());
            }
            TierMsg::ProbeNow | TierMsg::Internal(Internal::ProbeTick) => {
                if matches!(state.lifecycle, Lifecycle::Starting | Lifecycle::Restarting) {
                    // No probing while starting, but readers still see the
                    // backend come up (its pid, its exits).
                    refresh_while_starting(state);
                } else {
                    probe(&myself, state, Admit::ThroughBreaker);
                }
            }
            TierMsg::EnsureStarted => ensure_started(&myself, state),
            TierMsg::Stop(reason, reply) => {
                stop(state, reason).await;
                reply_or_log(reply, ());
            }
            TierMsg::Restart(request, reply) => restart(&myself, state, request, reply),
            TierMsg::SetActive(active) => state.driver.set_active(active),
            TierMsg::RequestOutcome(outcome) => request_outcome(&myself, state, outcome),
            TierMsg::Internal(Internal::ProbeDone(outcome)) => probe_done(state, outcome),
            TierMsg::Internal(Internal::StartDone(result)) => start_done(&myself, state, result),
            TierMsg::Internal(Internal::RestartDone(result)) => {
                restart_done(&myself, state, result)
            }
            TierMsg::Internal(Internal::Driver(event)) => driver_event(&myself, state, event),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<TierMsg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        state.shutdown_tasks().await;
        Ok(())
    }
}

// === impl State ===

impl State {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn set(&mut self, to: TierState, reason: String) {
        if self.status.state != to {
            self.status.since = SystemTime::now();
            info!(backend.tier = %self.spec.id, from = %self.status.state, to = %to, %reason, "Tier state changed.");
        }
        self.status.state = to;
        self.status.reason = reason;
        metrics().tier_state(self.spec.id, to);
    }

    fn refresh_status(&mut self) {
        let now = self.now();
        self.status.breaker = self.breaker.state(now);
        self.status.consecutive_failures = self.breaker.consecutive_failures();
        self.status.endpoint = self.driver.endpoint();
        self.status.endpoints = self.driver.endpoints();
        self.status.details = self.driver.details();
        // When the breaker lets the next probe through, as of this report.
        if self.status.breaker == BreakerState::Open
            && let Some(until) = self.breaker.open_until()
        {
            let left = until.saturating_duration_since(now);
            self.status
                .details
                .insert("breaker_retry_in".into(), crate::text::duration(left));
        }
    }

    /// Pushes the status to the root. The root decides; the tier only reports.
    fn publish(&mut self) {
        self.refresh_status();
        while let Some((from, to)) = self.breaker.take_transition() {
            info!(backend.tier = %self.spec.id, %from, %to, "Breaker changed.");
            metrics().breaker_transition(self.spec.id, from, to);
        }
        metrics().breaker_state(self.spec.id, self.status.breaker);
        metrics().tier_state(self.spec.id, self.status.state);
        if self
            .root
            .send_message(RootMsg::TierChanged {
                from: self.id,
                status: self.status.clone(),
            })
            .is_err()
        {
            warn!(backend.tier = %self.spec.id, "Root is gone; status not delivered.");
        }
    }

    /// Hands the root what the router needs of this tier for the life of
    /// its driver (credentials, cold starts).
    fn announce_route(&self) {
        let msg = RootMsg::TierRoute {
            from: self.id,
            info: self.driver.route_info(),
        };
        if self.root.send_message(msg).is_err() {
            warn!(backend.tier = %self.spec.id, "Root is gone; routing information not delivered.");
        }
    }

    async fn shutdown_tasks(&mut self) {
        self.tasks.cancel();
        // Tasks wrap their work in `run_until_cancelled`, so this returns
        // promptly; the bound is for a task stuck in non-async code.
        if with_deadline(
            Duration::from_secs(5),
            "tier tasks to finish",
            self.tasks.tracker.wait(),
        )
        .await
        .is_err()
        {
            warn!(backend.tier = %self.spec.id, "Tier tasks did not finish in time.");
        }
    }

    /// Spawns `work` as a tracked, cancellable task that reports `done` to the actor.
    fn spawn<F>(&self, myself: &ActorRef<TierMsg>, work: F)
    where
        F: Future<Output = Option<TierMsg>> + Send + 'static,
    {
        let cancel = self.tasks.cancel.clone();
        let myself = myself.clone();
        let span = info_span!("tier_task", backend.tier = %self.spec.id);
        self.tasks.tracker.spawn(
            async move {
                if let Some(Some(msg)) = cancel.run_until_cancelled(work).await {
                    // Fails only when the actor has stopped meanwhile.
                    let _ = myself.send_message(msg);
                }
            }
            .instrument(span),
        );
    }
}

/// Runs one driver call under its deadline. A panic in the call becomes an
/// error carrying the panic's text (logged and counted), so the task still
/// reports back and the actor never waits for an answer that cannot come.
async fn call_driver<T>(
    tier: TierId,
    operation: &'static str,
    timeout: Duration,
    call: impl Future<Output = T>,
) -> Result<T, TierError> {
    match with_deadline(timeout, operation, AssertUnwindSafe(call).catch_unwind()).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(payload)) => {
            let panic = panic_text(payload.as_ref());
            error!(backend.tier = %tier, operation, %panic, "Driver panicked; treated as a failed {operation}.");
            metrics().panic(tier, operation);
            Err(TierError::new(format!("{operation} panicked: {panic}")))
        }
        Err(e) => Err(TierError::new(e.to_string())),
    }
}

/// The text of a panic's payload: what `panic!` was given, when it was text.
pub fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

fn reply_or_log<T: Send + 'static>(reply: RpcReplyPort<T>, value: T) {
    if reply.send(value).is_err() {
        tracing::debug!("Caller stopped waiting for the reply.");
    }
}

// === probing ===

/// Whether a probe asks the breaker first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admit {
    ThroughBreaker,
    /// Right after a start or restart: the backend's real state must be
    /// known (a start that ended in a crash loop is Unavailable, not just
    /// "breaker open"), whatever the breaker thinks.
    Always,
}

fn refresh_while_starting(state: &mut State) {
    let before = state.status.details.clone();
    state.refresh_status();
    if state.status.details != before {
        state.publish();
    }
}

fn probe(myself: &ActorRef<TierMsg>, state: &mut State, admit: Admit) {
    if state.probe_in_flight || state.lifecycle != Lifecycle::Idle {
        return;
    }
    let now = state.now();
    let admission = match admit {
        Admit::ThroughBreaker => state.breaker.admit(now),
        Admit::Always => Admission::Allowed,
    };
    match admission {
        Admission::Rejected { .. } => {
            let reason = breaker_reason(state);
            if state.status.state != TierState::Unavailable
                && (state.status.state != TierState::Unhealthy || state.status.reason != reason)
            {
                state.set(TierState::Unhealthy, reason);
                state.publish();
            }
            return;
        }
        Admission::Allowed | Admission::Trial => {}
    }
    state.probe_in_flight = true;
    if state.status.state == TierState::Unknown {
        state.set(TierState::Probing, "first probe in flight".into());
        state.publish();
    }
    let driver = state.driver.clone();
    let timeout = state.spec.probe.timeout;
    let tier = state.spec.id;
    state.spawn(myself, async move {
        let span = operation_span("probe", tier);
        let started = Instant::now();
        let outcome = async {
            match call_driver(tier, "probe", timeout, driver.probe()).await {
                Ok(outcome) => outcome,
                Err(e) => ProbeOutcome::Down { error: e.0 },
            }
        }
        .instrument(span.clone())
        .await;
        let (label, error) = match &outcome {
            ProbeOutcome::Up { .. } => ("up", None),
            ProbeOutcome::Down { error } => ("down", Some(error.as_str())),
            ProbeOutcome::Throttled { error, .. } => ("throttled", Some(error.as_str())),
            ProbeOutcome::Degraded { note } => ("degraded", Some(note.as_str())),
            ProbeOutcome::Gone { reason } => ("gone", Some(reason.as_str())),
            ProbeOutcome::Idle { reason } => ("idle", Some(reason.as_str())),
            ProbeOutcome::PlatformDown { error } => ("platform_down", Some(error.as_str())),
            ProbeOutcome::Unavailable { reason } => ("unavailable", Some(reason.as_str())),
        };
        record_outcome(&span, label, error);
        metrics().probe(tier, label, started.elapsed());
        Some(TierMsg::Internal(Internal::ProbeDone(outcome)))
    });
}

fn probe_done(state: &mut State, outcome: ProbeOutcome) {
    state.probe_in_flight = false;
    if state.lifecycle != Lifecycle::Idle {
        return;
    }
    let now = state.now();
    let before = state.status.clone();
    // A platform that does not answer makes a start pointless until a probe
    // finds it answering again; otherwise the outcome counts like `Down`.
    let platform_down = matches!(outcome, ProbeOutcome::PlatformDown { .. });
    state.status.startable = state.driver.startable() && !platform_down;
    match outcome {
        // A probe sent before the breaker opened (on failed requests) that
        // passed: the breaker stays open, and so does the tier's answer.
        ProbeOutcome::Up { .. } | ProbeOutcome::Degraded { .. }
            if state.breaker.state(now) == BreakerState::Open =>
        {
            state.breaker.record_success(now);
            state.set(TierState::Unhealthy, breaker_reason(state));
        }
        ProbeOutcome::Up { note } => {
            state.breaker.record_success(now);
            state.status.last_error = None;
            state.set(TierState::Healthy, note);
        }
        ProbeOutcome::Down { error } | ProbeOutcome::PlatformDown { error } => {
            state.breaker.record_failure(now);
            state.status.last_error = Some(error.clone());
            let serving = state.status.state.is_serving();
            if state.breaker.state(now) != BreakerState::Closed {
                state.set(TierState::Unhealthy, breaker_reason(state));
            } else if serving {
                let n = state.breaker.consecutive_failures();
                state.set(
                    TierState::Degraded,
                    format!("{n} consecutive failed probes: {error}"),
                );
            } else {
                state.set(TierState::Unhealthy, error);
            }
        }
        ProbeOutcome::Throttled { error, retry_after } => {
            state.breaker.record_failure(now);
            let asked = format!("Retry-After {}", crate::text::duration(retry_after));
            state.breaker.force_open(now, retry_after, asked);
            state.status.last_error = Some(error);
            state.set(TierState::Unhealthy, breaker_reason(state));
        }
        ProbeOutcome::Degraded { note } => {
            state.breaker.record_success(now);
            state.status.last_error = None;
            state.set(TierState::Degraded, note);
        }
        ProbeOutcome::Gone { reason } => {
            state.breaker.record_failure(now);
            state.status.last_error = Some(reason.clone());
            state.set(TierState::Unhealthy, reason);
        }
        ProbeOutcome::Idle { reason } => state.set(TierState::Unhealthy, reason),
        ProbeOutcome::Unavailable { reason } => {
            state.status.last_error = Some(reason.clone());
            state.set(TierState::Unavailable, reason);
        }
    }
    state.refresh_status();
    if state.status.state != before.state
        || state.status.startable != before.startable
        || state.status.reason != before.reason
        || state.status.breaker != before.breaker
        || state.status.details != before.details
    {
        state.publish();
    }
}

/// The router's report of a proxied request: the one breaker counts a run
/// of failed requests (an answer ends it), and a failure brings the next
/// probe forward.
fn request_outcome(myself: &ActorRef<TierMsg>, state: &mut State, outcome: RequestOutcome) {
    let Some(error) = outcome.error else {
        state.breaker.record_request_success();
        return;
    };
    let now = state.now();
    state.breaker.record_request_failure(now);
    state.status.last_error = Some(format!("request to {} failed: {error}", outcome.endpoint));
    state.last_request_error = Some(error);
    if state.status.state.is_serving() && state.breaker.state(now) != BreakerState::Closed {
        state.set(TierState::Unhealthy, breaker_reason(state));
        state.publish();
    }
    probe(myself, state, Admit::ThroughBreaker);
}

fn breaker_reason(state: &State) -> String {
    let trip = state.breaker.trip_reason();
    let why = trip.map_or_else(|| "failures".into(), ToString::to_string);
    let error = match trip {
        Some(TripReason::ConsecutiveRequestFailures(_)) => &state.last_request_error,
        _ => &state.status.last_error,
    };
    match error {
        Some(error) => format!("breaker open after {why}: {error}"),
        None => format!("breaker open after {why}"),
    }
}

// === starting, stopping, restarting ===

fn ensure_started(myself: &ActorRef<TierMsg>, state: &mut State) {
    let tier = state.spec.id;
    match state.lifecycle {
        Lifecycle::Starting | Lifecycle::Restarting => {
            state.start_requested = true;
            return;
        }
        Lifecycle::Stopping => {
            let error = TierError::new(format!("the {tier} tier is stopping; not starting it"));
            finish_start(state, Err(error));
            return;
        }
        Lifecycle::Idle => {}
    }
    if state.status.state == TierState::Healthy {
        finish_start(state, Ok(()));
        return;
    }
    if !state.driver.startable() {
        finish_start(
            state,
            Err(TierError::new(format!("the {tier} tier cannot be started"))),
        );
        return;
    }
    state.lifecycle = Lifecycle::Starting;
    state.set(TierState::Starting, "starting".into());
    state.publish();
    info!(backend.tier = %tier, "Starting tier.");
    let driver = state.driver.clone();
    let timeout = state.spec.start_timeout;
    state.spawn(myself, async move {
        let span = operation_span("start", tier);
        let result = async {
            call_driver(tier, "start", timeout, driver.start())
                .await
                .and_then(|r| r)
        }
        .instrument(span.clone())
        .await;
        record_result(&span, &result);
        Some(TierMsg::Internal(Internal::StartDone(result)))
    });
}

fn start_done(myself: &ActorRef<TierMsg>, state: &mut State, result: Result<(), TierError>) {
    if state.lifecycle != Lifecycle::Starting {
        return;
    }
    state.lifecycle = Lifecycle::Idle;
    state.start_requested = false;
    match &result {
        Ok(()) => {
            state.breaker.reset();
            state.status.last_error = None;
            state.set(TierState::Healthy, "started".into());
            info!(backend.tier = %state.spec.id, "Tier started.");
        }
        Err(e) => {
            warn!(backend.tier = %state.spec.id, error = %e, "Tier failed to start.");
            state.status.last_error = Some(e.to_string());
            state.set(TierState::Unhealthy, format!("start failed: {e}"));
        }
    }
    state.publish();
    finish_start(state, result);
    probe(myself, state, Admit::Always);
}

fn finish_start(state: &State, result: Result<(), TierError>) {
    let msg = RootMsg::StartFinished {
        from: state.id,
        tier: state.spec.id,
        result,
    };
    if state.root.send_message(msg).is_err() {
        warn!(backend.tier = %state.spec.id, "Root is gone; start result not delivered.");
    }
}

async fn stop(state: &mut State, reason: StopReason) {
    if state.lifecycle == Lifecycle::Stopping {
        return;
    }
    // A start or restart in flight is abandoned (its task cancelled, its
    // future dropped, which drivers must tolerate) so it cannot bring the
    // backend up behind the stop.
    state.lifecycle = Lifecycle::Stopping;
    state.tasks.cancel();
    state.probe_in_flight = false;
    if std::mem::take(&mut state.start_requested) {
        let error = TierError::new(format!("the {} tier is stopping", state.spec.id));
        finish_start(state, Err(error));
    }
    let grace = state.spec.stop_grace;
    let tier = state.spec.id;
    match with_deadline(grace, "stop", state.driver.stop(reason)).await {
        Ok(Ok(())) => info!(backend.tier = %tier, reason = reason.as_str(), "Tier stopped."),
        Ok(Err(e)) => {
            warn!(backend.tier = %tier, reason = reason.as_str(), error = %e, "Tier stop failed.")
        }
        Err(e) => {
            warn!(backend.tier = %tier, reason = reason.as_str(), error = %e, "Tier stop ran out of time.")
        }
    }
    state.set(TierState::Unavailable, "stopped".into());
    state.publish();
}

fn restart(
    myself: &ActorRef<TierMsg>,
    state: &mut State,
    request: RestartRequest,
    reply: RpcReplyPort<Result<RestartReport, TierError>>,
) {
    let tier = state.spec.id;
    info!(backend.tier = %tier, force = request.force, dry_run = request.dry_run, "Restart requested.");
    if !request.dry_run {
        let busy = match state.lifecycle {
            Lifecycle::Idle => None,
            Lifecycle::Starting => Some("a start of the tier is in progress"),
            Lifecycle::Restarting => Some("a restart of the tier is already in progress"),
            Lifecycle::Stopping => Some("the tier is stopping"),
        };
        if let Some(busy) = busy {
            warn!(backend.tier = %tier, in_progress = busy, "Restart refused.");
            let error = TierError::new(format!(
                "cannot restart {tier}: {busy}; try again when it is done"
            ));
            reply_or_log(reply, Err(error));
            return;
        }
        // Like a start: probes hold off until it is done, so a backend
        // that is down mid-restart does not send the waterfall into a
        // start phase that races the restart.
        state.lifecycle = Lifecycle::Restarting;
        state.set(TierState::Starting, "restarting".into());
        state.publish();
    }
    let driver = state.driver.clone();
    let timeout = state
        .spec
        .stop_grace
        .saturating_add(state.spec.start_timeout);
    state.spawn(myself, async move {
        let span = operation_span("restart", tier);
        span.record("dry_run", request.dry_run);
        let result = async {
            call_driver(tier, "restart", timeout, driver.restart(request))
                .await
                .and_then(|r| r)
        }
        .instrument(span.clone())
        .await;
        record_result(&span, &result);
        if let Ok(report) = &result {
            for step in &report.plan {
                info!(backend.tier = %tier, dry_run = request.dry_run, step = %step, "Restart plan.");
            }
        }
        let outcome = result.as_ref().map(drop).map_err(Clone::clone);
        reply_or_log(reply, result);
        (!request.dry_run).then_some(TierMsg::Internal(Internal::RestartDone(outcome)))
    });
}

fn restart_done(myself: &ActorRef<TierMsg>, state: &mut State, result: Result<(), TierError>) {
    if state.lifecycle != Lifecycle::Restarting {
        return;
    }
    state.lifecycle = Lifecycle::Idle;
    state.breaker.reset();
    match &result {
        Ok(()) => {
            state.status.backend_restarts += 1;
            metrics().backend_restart(state.spec.id);
            info!(backend.tier = %state.spec.id, restarts = state.status.backend_restarts, "Backend restarted on request.");
        }
        Err(e) => {
            warn!(backend.tier = %state.spec.id, error = %e, "Restart failed.");
            state.status.last_error = Some(e.to_string());
        }
    }
    if std::mem::take(&mut state.start_requested) {
        finish_start(state, result);
    }
    probe(myself, state, Admit::Always);
}

fn driver_event(myself: &ActorRef<TierMsg>, state: &mut State, event: DriverEvent) {
    match event {
        DriverEvent::Changed { note } => {
            info!(backend.tier = %state.spec.id, %note, "Backend changed.");
        }
        DriverEvent::BackendRestarted { note } => {
            state.status.backend_restarts += 1;
            metrics().backend_restart(state.spec.id);
            info!(backend.tier = %state.spec.id, %note, restarts = state.status.backend_restarts, "Backend restarted.");
            state.publish();
        }
    }
    probe(myself, state, Admit::ThroughBreaker);
}

// === spans ===

/// The span of one probe, start or restart: an OpenTelemetry span when
/// export is on. `backend.name` is the tier's name (a tier runs one backend).
fn operation_span(name: &'static str, tier: TierId) -> Span {
    match name {
        "probe" => {
            info_span!("probe", backend.tier = %tier, backend.name = %tier, outcome = Empty, error = Empty)
        }
        "start" => {
            info_span!("start", backend.tier = %tier, backend.name = %tier, outcome = Empty, error = Empty)
        }
        _ => {
            info_span!("restart", backend.tier = %tier, backend.name = %tier, outcome = Empty, error = Empty, dry_run = Empty)
        }
    }
}

fn record_outcome(span: &Span, outcome: &str, error: Option<&str>) {
    span.record("outcome", outcome);
    if let Some(error) = error {
        span.record("error", error);
    }
}

fn record_result<T>(span: &Span, result: &Result<T, TierError>) {
    match result {
        Ok(_) => record_outcome(span, "ok", None),
        Err(e) => record_outcome(span, "error", Some(&e.0)),
    }
}
