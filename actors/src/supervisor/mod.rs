//! The root supervisor: owns the tier actors and the waterfall.
//!
//! It spawns the configured tiers as linked actors in waterfall order and
//! replaces ractor's default supervision (which stops the parent when any
//! child exits) with OTP's: a tier actor that fails or stops unexpectedly is
//! restarted after a backoff; more than `max_restarts` restarts within
//! `restart_window` escalate — the root stops every tier in reverse start
//! order and reports [`Exit::Escalated`], and the process exits non-zero so
//! its own supervisor (systemd, launchd) takes over.
//!
//! Tiers push their status here; every push re-runs the waterfall and
//! publishes a [`Snapshot`] that readers (HTTP, CLI) use without ever
//! calling an actor, and a [`RoutingTable`] that the router reads per
//! request.
//!
//! A reload ([`RootMsg::Reload`]) replaces the tier set and the waterfall
//! settings in place: tiers whose fingerprint changed are stopped and
//! spawned again, removed tiers are stopped, new ones spawned, and the
//! others keep running untouched (same actor, same backend). The stops run
//! as a tracked task that reports [`RootMsg::ReloadStopped`]; the
//! replacements are spawned, and the caller answered, only then. A reload
//! arriving meanwhile waits its turn; a shutdown (or an escalation) stops
//! what is left and waits for those stops before it reports its exit.
//!
//! Invariants: the active tier changes only inside this actor, by message;
//! the root's handler awaits nothing slower than spawning an actor, so
//! failover and the watchdog are never held up by a stop (shutdown aside,
//! which waits for nothing else).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::autoheal::{AutohealSpec, AutohealStatus, Slot};
use crate::contract::{
    RestartReport, RestartRequest, StopReason, TierError, TierId, TierMsg, TierState, TierStatus,
};
use crate::instance::Instance;
use crate::notify::ServiceNotify;
use crate::resilience::{Backoff, BackoffConfig, Jitter, RestartIntensity};
use crate::routing::{RequestReporter, RouteInfo, RouteTier, RoutingTable};
use crate::tier::{TierActor, TierArgs, TierSpec};
use crate::waterfall::{TierView, Waterfall, WaterfallConfig};

#[cfg(test)]
mod tests;

/// `[supervisor]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// More restarts of one tier actor than this within `restart_window` escalate.
    pub max_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// Wait before restarting a failed tier actor.
    pub restart_backoff: BackoffConfig,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            max_restarts: 3,
            restart_window: Duration::from_secs(60),
            restart_backoff: BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(10),
                reset_after: Duration::from_secs(60),
                jitter: Jitter::Full,
            },
        }
    }
}

/// What readers see. Published after every change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Which cascade this is: the identity its resources are labelled with.
    pub instance: Instance,
    pub active: Option<TierId>,
    /// Where traffic goes now and why better tiers are passed over, as
    /// true as the tiers' latest reasons.
    pub decision: String,
    /// The line logged at the last change of active tier (or outage).
    pub last_change: String,
    /// In waterfall order.
    pub tiers: Vec<TierSnapshot>,
    /// Docker autoheal, when it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoheal: Option<AutohealStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierSnapshot {
    #[serde(flatten)]
    pub status: TierStatus,
    pub active: bool,
    /// Kept started while another tier is active (`standby = true`).
    pub standby: bool,
    /// Restarts of the tier's actor by the root (panics, failures).
    pub actor_restarts: u64,
}

/// Why the root stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to shut down; every tier stopped.
    Shutdown,
    /// A tier failed too often; every tier stopped.
    Escalated { tier: TierId, errors: Vec<String> },
    /// The root itself failed (a bug); every tier it could reach stopped.
    Failed { error: String },
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Shutdown => f.write_str("shut down"),
            Exit::Escalated { tier, errors } => write!(
                f,
                "the {tier} tier failed too often; giving up so the service manager can restart cascade. Last errors: {}",
                errors.join(" | ")
            ),
            Exit::Failed { error } => write!(
                f,
                "{error}; giving up so the service manager can restart cascade"
            ),
        }
    }
}

pub enum RootMsg {
    /// A tier's status changed.
    TierChanged {
        /// The reporting actor: a report from an actor that has since been
        /// replaced (restart, reload) is stale and dropped.
        from: ractor::ActorId,
        status: TierStatus,
    },
    /// What the router needs of a tier for the life of its driver, sent
    /// once by each new tier actor.
    TierRoute {
        /// The reporting actor, checked like `TierChanged`'s.
        from: ractor::ActorId,
        info: RouteInfo,
    },
    /// A tier asked by the start phase finished starting.
    StartFinished {
        /// The reporting actor: a result from a replaced actor is stale.
        from: ractor::ActorId,
        tier: TierId,
        result: Result<(), TierError>,
    },
    /// The start phase's deadline for the start numbered `attempt`: if that
    /// start has not finished, it is taken as failed.
    StartOverdue { tier: TierId, attempt: u64 },
    /// Decide again (hysteresis expired, next start round).
    Reevaluate,
    /// Spawn a failed tier actor again, after its backoff.
    Respawn(TierId),
    /// Operator restart of a tier; forwarded to the tier.
    Restart {
        tier: TierId,
        request: RestartRequest,
        reply: RpcReplyPort<Result<RestartReport, TierError>>,
    },
    /// Stop every tier in reverse order, then stop.
    Shutdown(RpcReplyPort<()>),
    /// Time to tell the service manager the root is alive. Handled in the
    /// root's own mailbox, so a wedged root stops the pings.
    WatchdogTick,
    /// Apply a reloaded configuration: `tiers` in the new waterfall order.
    /// Replies with what changed once changed tiers are stopped and their
    /// replacements spawned.
    Reload {
        tiers: Vec<TierSpec>,
        waterfall: WaterfallConfig,
        reply: RpcReplyPort<ReloadSummary>,
    },
    /// The tiers the reload in progress replaced or removed have stopped:
    /// their successors can be spawned.
    ReloadStopped,
    /// The autoheal actor published.
    AutohealChanged(AutohealStatus),
    /// Spawn the autoheal actor again, after its backoff.
    RespawnAutoheal,
    /// Autoheal's settings after a reload (`None`: it no longer runs); an
    /// actor whose settings changed is replaced, its history kept.
    ReloadAutoheal(Option<Box<AutohealSpec>>),
    /// Test-only: fail the root as a bug would. Compiled out of release builds.
    #[cfg(debug_assertions)]
    Fault(Fault),
}

/// A failure of the root that tests inject (debug builds only).
#[cfg(debug_assertions)]
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The root's handler panics: contained, tiers stopped, exit reported.
    Panic,
    /// The root is killed: no exit is reported.
    Kill,
}

#[cfg(debug_assertions)]
impl std::fmt::Display for Fault {
    /// As `CASCADE_TEST_FAULT` names it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fault::Panic => "root-panic",
            Fault::Kill => "root-kill",
        })
    }
}

/// What a reload changed, for the one log line that reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Tiers whose configuration changed: stopped and spawned again.
    pub restarted: Vec<TierId>,
    pub added: Vec<TierId>,
    pub removed: Vec<TierId>,
    /// The waterfall order after the reload.
    pub order: Vec<TierId>,
    pub order_changed: bool,
    /// Other `[waterfall]` settings (failback, start retry) changed.
    pub waterfall_changed: bool,
}

impl ReloadSummary {
    pub fn is_unchanged(&self) -> bool {
        self.restarted.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && !self.order_changed
            && !self.waterfall_changed
    }
}

impl std::fmt::Display for ReloadSummary {
    /// `configuration reloaded: local restarted (changed), docker added;
    /// waterfall order now docker, local`, or `configuration unchanged`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_unchanged() {
            return f.write_str("configuration unchanged");
        }
        let mut tiers: Vec<String> = Vec::new();
        tiers.extend(
            self.restarted
                .iter()
                .map(|t| format!("{t} restarted (changed)")),
        );
        tiers.extend(self.added.iter().map(|t| format!("{t} added")));
        tiers.extend(self.removed.iter().map(|t| format!("{t} removed")));
        let mut parts = Vec::new();
        if tiers.is_empty() {
            parts.push("tiers unchanged".to_owned());
        } else {
            parts.push(tiers.join(", "));
        }
        if self.order_changed {
            let order: Vec<&str> = self.order.iter().map(|t| t.as_str()).collect();
            parts.push(format!("waterfall order now {}", order.join(", ")));
        }
        if self.waterfall_changed {
            parts.push("waterfall settings changed".to_owned());
        }
        write!(f, "configuration reloaded: {}", parts.join("; "))
    }
}

pub struct RootArgs {
    pub tiers: Vec<TierSpec>,
    pub waterfall: WaterfallConfig,
    pub supervisor: SupervisorConfig,
    pub snapshots: watch::Sender<Snapshot>,
    pub routes: watch::Sender<RoutingTable>,
    pub instance: Instance,
    /// Receives why the root stopped.
    pub exit: oneshot::Sender<Exit>,
    pub notify: Arc<dyn ServiceNotify>,
    pub autoheal: Option<AutohealSpec>,
}

pub struct RootSupervisor;

struct Child {
    spec: TierSpec,
    actor: Option<ActorRef<TierMsg>>,
    status: TierStatus,
    /// What the current actor's driver said about routing to it.
    route: RouteInfo,
    healthy_since: Option<Instant>,
    /// When the current actor was spawned: its first probe's answer is due
    /// within its probe timeout of this.
    spawned_at: Option<Instant>,
    backoff: Backoff,
    intensity: RestartIntensity,
    restarts: u64,
    last_errors: VecDeque<String>,
}

pub struct RootState {
    /// In waterfall order; tiers start in this order and stop in reverse.
    /// A tier actor not in here is not supervised: its exit is ignored.
    children: Vec<Child>,
    waterfall: Waterfall,
    /// What `waterfall` was built from, so a reload can tell what changed.
    waterfall_config: WaterfallConfig,
    /// Restart policy for children spawned later (by a reload).
    supervisor: SupervisorConfig,
    snapshots: watch::Sender<Snapshot>,
    routes: watch::Sender<RoutingTable>,
    instance: Instance,
    exit: Option<oneshot::Sender<Exit>>,
    /// Why the root is stopping, reported once every tier has stopped.
    exit_reason: Option<Exit>,
    /// The line logged at the last change of active tier.
    last_decision: String,
    /// The waterfall's account of the present, refreshed by every decision.
    decision_now: String,
    shutting_down: bool,
    /// The pending `Reevaluate` timer, replaced when a sooner one is needed.
    recheck: Option<(Instant, Timer)>,
    notify: Arc<dyn ServiceNotify>,
    /// READY=1 goes out once, after the first settled decision.
    ready_sent: bool,
    /// The last tier that served, so a move through an outage (docker
    /// breaks, nothing serves while local starts, local serves) is still
    /// reported as a failover from docker.
    last_served: Option<TierId>,
    /// The watchdog ping timer, when the service manager armed one.
    watchdog: Option<JoinHandle<()>>,
    /// Docker autoheal, a child restarted like a tier but never escalated.
    autoheal: Option<Slot>,
    /// Numbers the start phase's starts, so a deadline meant for an
    /// earlier start does not end a later one: the last number, and each
    /// tier's current start.
    start_attempt: u64,
    start_attempts: std::collections::BTreeMap<TierId, u64>,
    /// The stops of tiers a reload replaced or removed, so a shutdown can
    /// wait for them before it reports its exit.
    reload_stops: TaskTracker,
    /// The reload whose stops are in flight: its replacements wait to be
    /// spawned until `ReloadStopped`, and its caller for the summary.
    reloading: Option<PendingReload>,
    /// Reloads that arrived while one was in progress, applied in order.
    queued_reloads: VecDeque<QueuedReload>,
}

struct PendingReload {
    summary: ReloadSummary,
    /// Tiers whose new actors wait for their predecessors to stop, so a
    /// changed tier's new backend never races its old one for a port.
    to_spawn: Vec<TierId>,
    reply: RpcReplyPort<ReloadSummary>,
}

struct QueuedReload {
    tiers: Vec<TierSpec>,
    waterfall: WaterfallConfig,
    reply: RpcReplyPort<ReloadSummary>,
}

const LAST_ERRORS: usize = 5;

/// How long past a tier's own deadlines the start phase waits for its report.
const START_REPORT_MARGIN: Duration = Duration::from_secs(5);

/// A `send_after` timer.
type Timer = JoinHandle<Result<(), ractor::MessagingErr<RootMsg>>>;

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RootMsg>,
        args: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let children = args
            .tiers
            .into_iter()
            .map(|spec| Child::new(spec, &args.supervisor))
            .collect();
        let autoheal = args
            .autoheal
            .map(|spec| Slot::new(spec, args.supervisor.restart_backoff.clone()));
        Ok(RootState {
            autoheal,
            children,
            waterfall: Waterfall::new(&args.waterfall),
            waterfall_config: args.waterfall,
            supervisor: args.supervisor,
            snapshots: args.snapshots,
            routes: args.routes,
            instance: args.instance,
            exit: Some(args.exit),
            exit_reason: None,
            last_decision: String::new(),
            decision_now: "starting".into(),
            shutting_down: false,
            recheck: None,
            notify: args.notify,
            ready_sent: false,
            last_served: None,
            watchdog: None,
            start_attempt: 0,
            start_attempts: Default::default(),
            reload_stops: TaskTracker::new(),
            reloading: None,
            queued_reloads: VecDeque::new(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<RootMsg>,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(period) = state.notify.watchdog_period() {
            info!(
                period_ms = period.as_millis() as u64,
                "Service manager watchdog armed."
            );
            state.watchdog = Some(myself.send_interval(period, || RootMsg::WatchdogTick));
        }
        spawn_autoheal(&myself, state).await;
        for i in 0..state.children.len() {
            spawn_tier(&myself, state, i).await?;
        }
        if state.children.is_empty() {
            // No tier will ever report: settle now.
            decide(&myself, state);
        }
        publish(state);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let handled = AssertUnwindSafe(handle_msg(&myself, msg, state))
            .catch_unwind()
            .await;
        contain(&myself, state, handled).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(why) = autoheal_exited(&event)
            && let Some(slot) = &mut state.autoheal
            && let Some(cell) = supervised_cell(&event)
            && slot.is(cell)
        {
            if !state.shutting_down {
                let delay = slot.exited(why);
                myself.send_after(delay, || RootMsg::RespawnAutoheal);
                publish(state);
            }
            return Ok(());
        }
        let handled = AssertUnwindSafe(async {
            match event {
                SupervisionEvent::ActorFailed(cell, err) => {
                    let error = format!("tier actor failed: {err}");
                    child_exited(&myself, state, &cell, error).await;
                }
                SupervisionEvent::ActorTerminated(cell, _, reason) => {
                    let why = reason.unwrap_or_else(|| "no reason given".into());
                    let error = format!("tier actor stopped: {why}");
                    child_exited(&myself, state, &cell, error).await;
                }
                _ => {}
            }
            Ok(())
        })
        .catch_unwind()
        .await;
        contain(&myself, state, handled).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RootMsg>,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((_, timer)) = state.recheck.take() {
            timer.abort();
        }
        if let Some(timer) = state.watchdog.take() {
            timer.abort();
        }
        // Reached without Shutdown on escalation or a failure of the root:
        // the exit is reported once the tiers have stopped.
        stop_all(state).await;
        let exit = state.exit_reason.take().unwrap_or(Exit::Shutdown);
        finish(state, exit);
        Ok(())
    }
}

async fn handle_msg(
    myself: &ActorRef<RootMsg>,
    msg: RootMsg,
    state: &mut RootState,
) -> Result<(), ActorProcessingErr> {
    let myself = myself.clone();
    match msg {
        RootMsg::TierChanged { from, status } => {
            tier_changed(state, from, status);
            decide(&myself, state);
        }
        RootMsg::TierRoute { from, info } => tier_route(state, from, info),
        RootMsg::StartFinished { from, tier, result } => {
            if !is_current(state, tier, from) {
                info!(backend.tier = %tier, "Start result from a replaced tier actor ignored.");
                return Ok(());
            }
            state.waterfall.start_finished(tier, result.is_ok());
            decide(&myself, state);
        }
        RootMsg::StartOverdue { tier, attempt } => {
            let current = state.start_attempts.get(&tier) == Some(&attempt);
            if current && state.waterfall.starting().any(|t| t == tier) {
                warn!(backend.tier = %tier, "Start phase: {tier} did not report its start in time; trying the next tier.");
                state.waterfall.start_finished(tier, false);
                decide(&myself, state);
            }
        }
        RootMsg::Reevaluate => {
            state.recheck = None;
            decide(&myself, state);
        }
        RootMsg::Respawn(tier) => respawn(&myself, state, tier).await?,
        RootMsg::Restart {
            tier,
            request,
            reply,
        } => forward_restart(state, tier, request, reply),
        RootMsg::WatchdogTick => state.notify.watchdog(),
        RootMsg::AutohealChanged(status) => {
            if let Some(slot) = &mut state.autoheal {
                slot.changed(status);
                publish(state);
            }
        }
        RootMsg::RespawnAutoheal => {
            if !state.shutting_down {
                spawn_autoheal(&myself, state).await;
                publish(state);
            }
        }
        RootMsg::ReloadAutoheal(spec) => {
            if !state.shutting_down {
                reload_autoheal(&myself, state, spec.map(|s| *s)).await;
            }
        }
        RootMsg::Reload {
            tiers,
            waterfall,
            reply,
        } => {
            if state.shutting_down {
                // Dropping the reply tells the caller it was not applied.
                warn!("Reload ignored: shutting down.");
                return Ok(());
            }
            if state.reloading.is_some() {
                info!("Reload queued: the previous reload's tiers are still stopping.");
            }
            state.queued_reloads.push_back(QueuedReload {
                tiers,
                waterfall,
                reply,
            });
            apply_reloads(&myself, state).await?;
        }
        RootMsg::ReloadStopped => {
            if !state.shutting_down {
                finish_reload(&myself, state).await?;
                apply_reloads(&myself, state).await?;
            }
        }
        #[cfg(debug_assertions)]
        RootMsg::Fault(Fault::Panic) => panic!("injected root failure"),
        #[cfg(debug_assertions)]
        RootMsg::Fault(Fault::Kill) => myself.kill(),
        RootMsg::Shutdown(reply) => {
            state.notify.stopping();
            stop_all(state).await;
            finish(state, Exit::Shutdown);
            if reply.send(()).is_err() {
                warn!("Shutdown requester stopped waiting.");
            }
            myself.stop(None);
        }
    }
    Ok(())
}

/// The root's own failure (an error or a panic in its handling) ends
/// cascade in order: every tier is stopped within its grace, then the exit
/// is reported as a failure, so the process exits non-zero and its service
/// manager restarts it. Left to ractor, the tiers would be killed and the
/// exit never reported.
async fn contain(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
    handled: std::thread::Result<Result<(), ActorProcessingErr>>,
) {
    let error = match handled {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("the root supervisor failed: {e}"),
        Err(panic) => format!(
            "the root supervisor panicked: {}",
            crate::tier::panic_text(panic.as_ref())
        ),
    };
    error!(%error, "Stopping every tier and exiting.");
    if state.shutting_down {
        // Already on the way out; post_stop stops the tiers.
        return;
    }
    state.notify.status(&error);
    state.notify.stopping();
    state.exit_reason(Exit::Failed { error });
    // post_stop stops every tier, then reports the exit.
    myself.stop(None);
}

// === children ===

impl Child {
    /// A child not spawned yet, with fresh supervision bookkeeping.
    fn new(spec: TierSpec, supervisor: &SupervisorConfig) -> Child {
        Child {
            status: TierStatus::new(spec.id, false),
            route: RouteInfo::default(),
            backoff: Backoff::new(supervisor.restart_backoff.clone()),
            intensity: RestartIntensity::new(supervisor.max_restarts, supervisor.restart_window),
            spec,
            actor: None,
            healthy_since: None,
            spawned_at: None,
            restarts: 0,
            last_errors: VecDeque::new(),
        }
    }
}

async fn spawn_tier(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
    index: usize,
) -> Result<(), ActorProcessingErr> {
    let child = &mut state.children[index];
    let args = TierArgs {
        spec: child.spec.clone(),
        root: myself.clone(),
    };
    child.backoff.started(Instant::now());
    // Unnamed: ractor's registry is process-wide, and names would keep two
    // roots (in tests) from coexisting.
    match Actor::spawn_linked(None, TierActor, args, myself.get_cell()).await {
        Ok((actor, _join)) => {
            // The join handle is not needed: the link reports the exit.
            child.actor = Some(actor);
            child.spawned_at = Some(Instant::now());
            Ok(())
        }
        Err(e) => {
            // A tier that cannot even be built counts as a failure of that tier.
            schedule_restart(
                myself,
                state,
                index,
                format!("tier actor could not start: {e}"),
            );
            Ok(())
        }
    }
}

async fn child_exited(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
    cell: &ActorCell,
    error: String,
) {
    let Some(index) = state.children.iter().position(|c| {
        c.actor
            .as_ref()
            .is_some_and(|a| a.get_id() == cell.get_id())
    }) else {
        return;
    };
    state.children[index].actor = None;
    state.children[index].route = RouteInfo::default();
    if state.shutting_down {
        return;
    }
    // A start that actor was asked for will never be reported.
    let tier = state.children[index].spec.id;
    if state.waterfall.starting().any(|t| t == tier) {
        state.waterfall.start_finished(tier, false);
    }
    schedule_restart(myself, state, index, error);
    decide(myself, state);
}

fn schedule_restart(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
    index: usize,
    error: String,
) {
    let now = Instant::now();
    let child = &mut state.children[index];
    let tier = child.spec.id;
    error!(backend.tier = %tier, %error, "Tier actor exited.");
    child.last_errors.push_back(error.clone());
    while child.last_errors.len() > LAST_ERRORS {
        child.last_errors.pop_front();
    }
    child.status.state = TierState::Unknown;
    child.status.reason = format!("restarting: {error}");
    child.status.since = SystemTime::now();
    child.healthy_since = None;
    if child.intensity.record(now) {
        let errors = child.last_errors.iter().cloned().collect();
        escalate(myself, state, tier, errors);
        return;
    }
    child.restarts += 1;
    crate::metrics::metrics().actor_restart(tier);
    let delay = child.backoff.ended(now);
    info!(backend.tier = %tier, delay_ms = delay.as_millis() as u64, restarts = child.restarts, "Restarting tier actor.");
    myself.send_after(delay, move || RootMsg::Respawn(tier));
    publish(state);
}

async fn respawn(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
    tier: TierId,
) -> Result<(), ActorProcessingErr> {
    if state.shutting_down {
        return Ok(());
    }
    // A tier a reload replaced is spawned once its predecessor stopped.
    let waiting = state
        .reloading
        .as_ref()
        .is_some_and(|r| r.to_spawn.contains(&tier));
    if waiting {
        return Ok(());
    }
    let Some(index) = state
        .children
        .iter()
        .position(|c| c.spec.id == tier && c.actor.is_none())
    else {
        return Ok(());
    };
    spawn_tier(myself, state, index).await
}

fn escalate(myself: &ActorRef<RootMsg>, state: &mut RootState, tier: TierId, errors: Vec<String>) {
    let exit = Exit::Escalated { tier, errors };
    error!(backend.tier = %tier, "{exit}");
    state.notify.status(&exit.to_string());
    state.notify.stopping();
    state.exit_reason(exit);
    // post_stop stops the remaining tiers in reverse order.
    myself.stop(Some(format!("escalated: the {tier} tier failed too often")));
}

async fn stop_all(state: &mut RootState) {
    state.shutting_down = true;
    publish_routes(state);
    // A reload cut short is not applied: dropping the replies says so.
    if state.reloading.take().is_some() || !state.queued_reloads.is_empty() {
        warn!("Reload not applied: shutting down.");
        state.queued_reloads.clear();
    }
    // Nothing is healed while the tiers stop their containers.
    if let Some(slot) = &mut state.autoheal {
        slot.stop().await;
    }
    for child in state.children.iter_mut().rev() {
        if let Some(actor) = child.actor.take() {
            stop_tier(actor, &child.spec, StopReason::Exiting).await;
        }
    }
    // Tiers a reload replaced or removed are still stopping meanwhile
    // (each bounded like the ones above); the exit waits for them too.
    state.reload_stops.close();
    state.reload_stops.wait().await;
}

/// Stops a tier's backend within its grace, then its actor. Whoever calls
/// this has already taken the actor out of its child, so the exit this
/// causes is not mistaken for a failure.
async fn stop_tier(actor: ActorRef<TierMsg>, spec: &TierSpec, reason: StopReason) {
    let tier = spec.id;
    let grace = spec.stop_grace + Duration::from_secs(1);
    match actor
        .call(|reply| TierMsg::Stop(reason, reply), Some(grace))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(())) => {}
        Ok(_) => warn!(backend.tier = %tier, "Tier did not confirm its stop in time."),
        Err(e) => warn!(backend.tier = %tier, error = %e, "Tier could not be asked to stop."),
    }
    if actor
        .stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .is_err()
    {
        warn!(backend.tier = %tier, "Tier actor did not stop in time; killing it.");
        actor.kill();
    }
}

// === reload ===

/// Applies queued reloads in order until one has stops in flight.
async fn apply_reloads(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
) -> Result<(), ActorProcessingErr> {
    while state.reloading.is_none()
        && let Some(next) = state.queued_reloads.pop_front()
    {
        if !begin_reload(myself, state, next) {
            finish_reload(myself, state).await?;
        }
    }
    Ok(())
}

/// Applies a reloaded configuration, except spawning what is new. Changed
/// and removed tiers are stopped (in reverse of the old order) by a tracked
/// task, and the new tiers are spawned by [`finish_reload`] once they have,
/// so a changed tier's new backend never races its old one for a port.
/// Everything else (order, waterfall settings, kept tiers) applies at once.
/// Returns whether stops are in flight.
fn begin_reload(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
    QueuedReload {
        tiers,
        waterfall,
        reply,
    }: QueuedReload,
) -> bool {
    let old_order: Vec<TierId> = state.children.iter().map(|c| c.spec.id).collect();
    let mut old: Vec<Option<Child>> = std::mem::take(&mut state.children)
        .into_iter()
        .map(Some)
        .collect();
    let mut summary = ReloadSummary::default();
    let mut to_spawn = Vec::new();
    for spec in tiers {
        let previous = old
            .iter_mut()
            .find(|c| c.as_ref().is_some_and(|c| c.spec.id == spec.id));
        match previous {
            Some(slot)
                if slot
                    .as_ref()
                    .is_some_and(|c| c.spec.fingerprint == spec.fingerprint) =>
            {
                if let Some(kept) = slot.take() {
                    state.children.push(kept);
                }
            }
            Some(_) => {
                summary.restarted.push(spec.id);
                to_spawn.push(spec.id);
                state.children.push(Child::new(spec, &state.supervisor));
            }
            None => {
                summary.added.push(spec.id);
                to_spawn.push(spec.id);
                state.children.push(Child::new(spec, &state.supervisor));
            }
        }
    }
    // Whatever is left in `old` is replaced or removed. Those children are
    // out of `state.children` now, so their actors' exits find no child.
    let mut stopping = Vec::new();
    for child in old.into_iter().rev().flatten() {
        let reason = if state.children.iter().any(|c| c.spec.id == child.spec.id) {
            StopReason::Replaced
        } else {
            summary.removed.push(child.spec.id);
            StopReason::Removed
        };
        if let Some(actor) = child.actor {
            info!(backend.tier = %child.spec.id, reason = reason.as_str(), "Reload: stopping the tier.");
            stopping.push((actor, child.spec, reason));
        }
    }
    summary.removed.reverse();

    summary.order = state.children.iter().map(|c| c.spec.id).collect();
    summary.order_changed = summary.order != old_order;
    summary.waterfall_changed = WaterfallConfig {
        order: state.waterfall_config.order.clone(),
        ..waterfall.clone()
    } != state.waterfall_config;

    let untouched =
        |tier: TierId| !summary.restarted.contains(&tier) && summary.order.contains(&tier);
    state.waterfall = state.waterfall.reconfigured(&waterfall, untouched);
    state.waterfall_config = waterfall;
    // A hysteresis deadline computed under the old settings is stale.
    if let Some((_, timer)) = state.recheck.take() {
        timer.abort();
    }
    if !stopping.is_empty() {
        for child in &mut state.children {
            if to_spawn.contains(&child.spec.id) {
                child.status.reason = "waiting for the tiers the reload stops".into();
            }
        }
    }
    state.reloading = Some(PendingReload {
        summary,
        to_spawn,
        reply,
    });
    if stopping.is_empty() {
        return false;
    }
    // The report goes out however the task ends, a panic included, so a
    // reload can never hold its replacements (and the next reload) back.
    struct Reported(ActorRef<RootMsg>);
    impl Drop for Reported {
        fn drop(&mut self) {
            // Fails only once the root is gone, and then nobody waits.
            let _ = self.0.send_message(RootMsg::ReloadStopped);
        }
    }
    let reported = Reported(myself.clone());
    state.reload_stops.spawn(async move {
        let _reported = reported;
        for (actor, spec, reason) in stopping {
            stop_tier(actor, &spec, reason).await;
        }
    });
    decide(myself, state);
    publish(state);
    true
}

/// The reload in progress has stopped what it replaced or removed: spawns
/// the new tiers and answers its caller.
async fn finish_reload(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
) -> Result<(), ActorProcessingErr> {
    let Some(PendingReload {
        summary,
        to_spawn,
        reply,
    }) = state.reloading.take()
    else {
        return Ok(());
    };
    for tier in to_spawn {
        let index = state
            .children
            .iter()
            .position(|c| c.spec.id == tier && c.actor.is_none());
        if let Some(index) = index {
            spawn_tier(myself, state, index).await?;
        }
    }
    decide(myself, state);
    publish(state);
    if reply.send(summary).is_err() {
        warn!("Reload requester stopped waiting.");
    }
    Ok(())
}

fn finish(state: &mut RootState, exit: Exit) {
    if let Some(tx) = state.exit.take() {
        // The receiver is gone only when nobody waits for the exit.
        let _ = tx.send(exit);
    }
}

impl RootState {
    /// Records why the root is stopping; the first reason wins.
    fn exit_reason(&mut self, exit: Exit) {
        self.shutting_down = true;
        self.exit_reason.get_or_insert(exit);
    }
}

fn forward_restart(
    state: &mut RootState,
    tier: TierId,
    request: RestartRequest,
    reply: RpcReplyPort<Result<RestartReport, TierError>>,
) {
    let actor = state
        .children
        .iter()
        .find(|c| c.spec.id == tier)
        .and_then(|c| c.actor.clone());
    let Some(actor) = actor else {
        let error = TierError::new(format!("tier {tier} is not running in this cascade"));
        let _ = reply.send(Err(error));
        return;
    };
    if let Err(e) = actor.send_message(TierMsg::Restart(request, reply)) {
        warn!(backend.tier = %tier, error = %e, "Restart could not be delivered.");
    }
}

// === the waterfall ===

/// Whether `from` is the actor that runs `tier` now: reports from an actor
/// that has since been replaced (a respawn, a reload) are stale.
fn is_current(state: &RootState, tier: TierId, from: ractor::ActorId) -> bool {
    state
        .children
        .iter()
        .any(|c| c.spec.id == tier && c.actor.as_ref().is_some_and(|a| a.get_id() == from))
}

fn tier_changed(state: &mut RootState, from: ractor::ActorId, status: TierStatus) {
    let current = |c: &Child| c.actor.as_ref().is_some_and(|a| a.get_id() == from);
    let Some(child) = state
        .children
        .iter_mut()
        .find(|c| c.spec.id == status.tier && current(c))
    else {
        return;
    };
    if status.state == TierState::Healthy {
        child.healthy_since.get_or_insert_with(Instant::now);
    } else {
        child.healthy_since = None;
    }
    child.status = status;
}

fn tier_route(state: &mut RootState, from: ractor::ActorId, info: RouteInfo) {
    let current = |c: &&mut Child| c.actor.as_ref().is_some_and(|a| a.get_id() == from);
    if let Some(child) = state.children.iter_mut().find(current) {
        child.route = info;
        publish_routes(state);
    }
}

fn decide(myself: &ActorRef<RootMsg>, state: &mut RootState) {
    if state.shutting_down {
        return;
    }
    let now = Instant::now();
    let views: Vec<TierView<'_>> = state
        .children
        .iter()
        .map(|c| TierView {
            tier: c.spec.id,
            state: c.status.state,
            reason: &c.status.reason,
            healthy_since: c.healthy_since,
            startable: c.status.startable && c.actor.is_some(),
            first_probe_due: first_probe_due(c),
        })
        .collect();
    let settled = views.iter().all(|v| !v.state.is_pending());
    let previous = state.waterfall.active();
    let mut decision = state.waterfall.decide(now, &views);
    state.decision_now = state
        .waterfall
        .explain(now, std::time::SystemTime::now(), &views);
    drop(views);
    if state.children.is_empty() {
        const NOTHING: &str = "no tiers configured: nothing to route";
        state.decision_now = NOTHING.to_owned();
        if decision.line.is_some() {
            decision.line = Some(NOTHING.to_owned());
        }
    }

    let first_ready = !state.ready_sent && (settled || decision.active.is_some());
    if first_ready {
        state.ready_sent = true;
        state.notify.ready();
    }
    if let Some(line) = &decision.line {
        let active = decision.active.map_or("none", TierId::as_str);
        info!(active, "{line}");
        state.last_decision = line.clone();
        state.notify.status(line);
    } else if first_ready && !state.last_decision.is_empty() {
        state.notify.status(&state.last_decision);
    }
    if previous != decision.active {
        active_changed(state, previous, decision.active, decision.line.as_deref());
        if decision.active.is_some() {
            state.last_served = decision.active;
        }
        for child in &state.children {
            let is_active = Some(child.spec.id) == decision.active;
            let was_active = Some(child.spec.id) == previous;
            if is_active != was_active
                && let Some(actor) = &child.actor
            {
                let _ = actor.send_message(TierMsg::SetActive(is_active));
            }
        }
    }
    if let Some(tier) = decision.start {
        match decision.active {
            Some(active) => {
                info!(backend.tier = %tier, "Standby: asking {tier} to start while {active} is active.")
            }
            None => info!(backend.tier = %tier, "Start phase: asking {tier} to start."),
        }
        let child = state.children.iter().find(|c| c.spec.id == tier);
        let actor = child.and_then(|c| c.actor.clone());
        // The tier reports within its start deadline (or, when a restart is
        // in flight, the restart's); past that and a margin, the start is
        // taken as failed, so the start phase never waits on it for good.
        let deadline = child.map(|c| {
            c.spec
                .start_timeout
                .saturating_add(c.spec.stop_grace)
                .saturating_add(START_REPORT_MARGIN)
        });
        match (actor, deadline) {
            (Some(actor), Some(deadline)) if actor.send_message(TierMsg::EnsureStarted).is_ok() => {
                state.start_attempt += 1;
                let attempt = state.start_attempt;
                state.start_attempts.insert(tier, attempt);
                myself.send_after(deadline, move || RootMsg::StartOverdue { tier, attempt });
            }
            _ => state.waterfall.start_finished(tier, false),
        }
    }
    if let Some(at) = decision.recheck_at {
        schedule_recheck(myself, state, at);
    }
    publish(state);
}

/// How long after its probe's deadline a first probe's answer may take to
/// reach the root (the tier actor's and the root's mailboxes).
const FIRST_PROBE_SLACK: Duration = Duration::from_millis(200);

/// While a tier's first probe is out, when its answer is due at the latest.
fn first_probe_due(child: &Child) -> Option<Instant> {
    let spawned_at = child
        .spawned_at
        .filter(|_| child.status.state.is_pending())?;
    let bound = child.spec.probe.timeout + FIRST_PROBE_SLACK;
    Some(crate::resilience::saturating_add(spawned_at, bound))
}

/// The active tier changed: one span (failover, failback, or gaining or
/// losing an active tier) and the metrics that count it.
fn active_changed(
    state: &RootState,
    previous: Option<TierId>,
    active: Option<TierId>,
    line: Option<&str>,
) {
    let rank = |tier: TierId| state.children.iter().position(|c| c.spec.id == tier);
    // Through an outage, the move is from the tier that served last.
    let previous = previous.or(state.last_served.filter(|_| active.is_some()));
    let outcome = match (previous, active) {
        (None, Some(_)) => "activated",
        (Some(_), None) => "lost",
        (Some(from), Some(to)) if from == to => "recovered",
        (Some(from), Some(to)) if rank(to) < rank(from) => "failback",
        _ => "failover",
    };
    let name = |t: Option<TierId>| t.map_or("none", TierId::as_str);
    let span = tracing::info_span!(
        "failover",
        backend.tier = name(active),
        backend.name = name(active),
        from = name(previous),
        outcome,
        error = tracing::field::Empty,
    );
    if active.is_none() {
        span.record("error", line.unwrap_or("no tier can serve"));
    }
    drop(span);
    let metrics = crate::metrics::metrics();
    metrics.failover(previous, active);
    for child in &state.children {
        metrics.tier_active(child.spec.id, Some(child.spec.id) == active);
    }
}

fn schedule_recheck(myself: &ActorRef<RootMsg>, state: &mut RootState, at: Instant) {
    if let Some((pending, _)) = &state.recheck
        && *pending <= at
    {
        return;
    }
    if let Some((_, timer)) = state.recheck.take() {
        timer.abort();
    }
    let delay = at.saturating_duration_since(Instant::now());
    let timer = myself.send_after(delay, || RootMsg::Reevaluate);
    state.recheck = Some((at, timer));
}

fn publish(state: &RootState) {
    let active = state.waterfall.active();
    let snapshot = Snapshot {
        instance: state.instance.clone(),
        active,
        decision: state.decision_now.clone(),
        last_change: state.last_decision.clone(),
        tiers: state
            .children
            .iter()
            .map(|c| TierSnapshot {
                status: c.status.clone(),
                active: Some(c.spec.id) == active,
                standby: state.waterfall_config.standby.contains(&c.spec.id),
                actor_restarts: c.restarts,
            })
            .collect(),
        autoheal: state.autoheal.as_ref().map(Slot::status),
    };
    state.snapshots.send_if_modified(|current| {
        if *current == snapshot {
            return false;
        }
        *current = snapshot;
        true
    });
    publish_routes(state);
}

/// Publishes what the router reads: every tier in waterfall order with its
/// state, serving endpoints, how requests to it are authenticated and where
/// their outcomes go (its current actor), the best tier the start phase is
/// bringing up, and whether cascade is stopping.
fn publish_routes(state: &RootState) {
    let table = RoutingTable {
        active: state.waterfall.active(),
        tiers: state
            .children
            .iter()
            .map(|c| RouteTier {
                tier: c.spec.id,
                state: c.status.state,
                reason: c.status.reason.clone(),
                endpoints: c.status.endpoints.clone(),
                info: c.route.clone(),
                reporter: c
                    .actor
                    .as_ref()
                    .map(|actor| RequestReporter::new(c.spec.id, actor.clone())),
            })
            .collect(),
        starting: state
            .children
            .iter()
            .map(|c| c.spec.id)
            .find(|&tier| state.waterfall.is_starting(tier)),
        decision: state.decision_now.clone(),
        stopping: state.shutting_down,
    };
    state.routes.send_if_modified(|current| {
        if *current == table {
            return false;
        }
        *current = table;
        true
    });
}

/// Everything a caller needs to run the root.
pub struct Running {
    pub root: ActorRef<RootMsg>,
    pub snapshots: watch::Receiver<Snapshot>,
    /// The routing table, published with every snapshot.
    pub routes: watch::Receiver<RoutingTable>,
    pub exit: oneshot::Receiver<Exit>,
    pub join: JoinHandle<()>,
}

/// Spawns the root with its tiers.
pub async fn start(
    tiers: Vec<TierSpec>,
    waterfall: WaterfallConfig,
    supervisor: SupervisorConfig,
    notify: Arc<dyn ServiceNotify>,
    instance: Instance,
) -> Result<Running, ractor::SpawnErr> {
    start_with_autoheal(tiers, waterfall, supervisor, notify, instance, None).await
}

/// Spawns the root with its tiers and, when given, Docker autoheal.
pub async fn start_with_autoheal(
    tiers: Vec<TierSpec>,
    waterfall: WaterfallConfig,
    supervisor: SupervisorConfig,
    notify: Arc<dyn ServiceNotify>,
    instance: Instance,
    autoheal: Option<AutohealSpec>,
) -> Result<Running, ractor::SpawnErr> {
    let initial = Snapshot {
        instance: instance.clone(),
        active: None,
        decision: "starting".into(),
        last_change: String::new(),
        tiers: tiers
            .iter()
            .map(|t| TierSnapshot {
                status: TierStatus::new(t.id, false),
                active: false,
                standby: waterfall.standby.contains(&t.id),
                actor_restarts: 0,
            })
            .collect(),
        autoheal: None,
    };
    let (snap_tx, snapshots) = watch::channel(initial);
    let (routes_tx, routes) = watch::channel(RoutingTable::default());
    let (exit_tx, exit) = oneshot::channel();
    let args = RootArgs {
        tiers,
        waterfall,
        supervisor,
        snapshots: snap_tx,
        routes: routes_tx,
        instance,
        exit: exit_tx,
        notify,
        autoheal,
    };
    let (root, join) = Actor::spawn(None, RootSupervisor, args).await?;
    Ok(Running {
        root,
        snapshots,
        routes,
        exit,
        join,
    })
}

// === autoheal ===

async fn spawn_autoheal(myself: &ActorRef<RootMsg>, state: &mut RootState) {
    let Some(slot) = &mut state.autoheal else {
        return;
    };
    let root = myself.clone();
    let report = Arc::new(move |status| {
        // Fails only once the root is gone.
        let _ = root.send_message(RootMsg::AutohealChanged(status));
    });
    if let Some(delay) = slot.spawn(myself.get_cell(), report).await {
        myself.send_after(delay, || RootMsg::RespawnAutoheal);
    }
}

async fn reload_autoheal(
    myself: &ActorRef<RootMsg>,
    state: &mut RootState,
    spec: Option<AutohealSpec>,
) {
    match (spec, &mut state.autoheal) {
        (None, None) => return,
        (None, Some(slot)) => {
            info!("Reload: stopping autoheal.");
            slot.stop().await;
            state.autoheal = None;
        }
        (Some(spec), Some(slot)) if slot.fingerprint() == spec.fingerprint => return,
        (Some(spec), Some(slot)) => {
            info!("Reload: autoheal's settings changed; replacing it (its history stays).");
            slot.replace(spec).await;
            spawn_autoheal(myself, state).await;
        }
        (Some(spec), None) => {
            info!("Reload: starting autoheal.");
            state.autoheal = Some(Slot::new(spec, state.supervisor.restart_backoff.clone()));
            spawn_autoheal(myself, state).await;
        }
    }
    publish(state);
}

/// Why a supervised actor exited, if it did.
fn autoheal_exited(event: &SupervisionEvent) -> Option<String> {
    match event {
        SupervisionEvent::ActorFailed(_, err) => Some(format!("autoheal failed: {err}")),
        SupervisionEvent::ActorTerminated(_, _, reason) => Some(format!(
            "autoheal stopped: {}",
            reason.as_deref().unwrap_or("no reason given")
        )),
        _ => None,
    }
}

fn supervised_cell(event: &SupervisionEvent) -> Option<&ActorCell> {
    match event {
        SupervisionEvent::ActorFailed(cell, _) | SupervisionEvent::ActorTerminated(cell, _, _) => {
            Some(cell)
        }
        _ => None,
    }
}
