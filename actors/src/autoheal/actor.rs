//! autoheal as a child of the root: the actor that runs one runner, and the
//! [`Slot`] the root keeps it in (spawn, restart with backoff, reload).
//!
//! The actor owns nothing worth keeping: the history, the tiers' mailbox
//! and what is published live in the [`Autoheal`] its spec carries, made
//! once per process. So a panicking runner, a killed actor or a change of
//! settings costs a reconnect (with a replay from the last event seen),
//! never a container's backoff or heal count.
//!
//! Invariant: the runner and everything it started are tracked and end with
//! the actor — in `post_stop`, and by a drop guard when ractor skips
//! `post_stop` (a kill).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{Autoheal, AutohealHandle, HealReport, Setup};
use crate::resilience::{Backoff, BackoffConfig};
use crate::tiers::docker::config::DockerConfig;
use crate::tiers::docker::connect::{Connector, DockerEnv};

/// What the root needs to run autoheal: its settings and the memory every
/// instance of it shares.
#[derive(Clone)]
pub struct AutohealSpec {
    /// The daemon (`host`, timeouts), `[autoheal]` and `[webhook]`.
    pub config: DockerConfig,
    pub env: DockerEnv,
    pub autoheal: Autoheal,
    /// The settings autoheal reads, serialized: a reload that changes them
    /// replaces the actor (with the same memory); one that does not leaves
    /// it alone.
    pub fingerprint: String,
    /// `key=value` every considered container must also carry (tests).
    pub scope: Option<String>,
    /// This cascade: of managed containers, only its own are healed.
    pub instance: Option<crate::Instance>,
}

impl AutohealSpec {
    pub fn new(config: &DockerConfig, env: DockerEnv, autoheal: &Autoheal) -> AutohealSpec {
        let fingerprint = crate::tier::fingerprint(&(
            &config.host,
            humantime::format_duration(config.ping_timeout).to_string(),
            humantime::format_duration(config.call_timeout).to_string(),
            &config.autoheal,
            &config.webhook,
            &env.host,
        ));
        AutohealSpec {
            config: config.clone(),
            env,
            autoheal: autoheal.clone(),
            fingerprint,
            scope: None,
            instance: None,
        }
    }

    /// Of managed containers, only `instance`'s are healed.
    pub fn for_instance(mut self, instance: &crate::Instance) -> AutohealSpec {
        self.instance = Some(instance.clone());
        self
    }

    /// Only containers that also carry `scope` (`key=value`) are considered.
    pub fn scoped(mut self, scope: &str) -> AutohealSpec {
        self.scope = Some(scope.to_owned());
        self.fingerprint.push_str(scope);
        self
    }
}

/// autoheal as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutohealStatus {
    /// Whether it follows the daemon's event stream now.
    pub connected: bool,
    /// Daemon time of the last event the stream delivered (RFC 3339).
    pub last_event: Option<String>,
    /// Containers watched: cascade's own and the selected ones.
    pub watched: usize,
    /// Restarts made.
    pub heals: u64,
    /// Containers given up on (only with `max_restarts`).
    pub give_ups: u64,
    /// Restarts of the autoheal actor by the root.
    pub actor_restarts: u64,
    /// Why the actor last exited, while it waits to be restarted.
    pub restarting: Option<String>,
    /// Every container restarted, given up on, or about to be healed.
    pub containers: Vec<HealReport>,
}

impl AutohealStatus {
    fn read(handle: &AutohealHandle) -> AutohealStatus {
        let summary = handle.summary();
        crate::metrics::metrics().autoheal_state(
            handle.connected(),
            summary.watched,
            summary.last_event,
        );
        AutohealStatus {
            connected: handle.connected(),
            last_event: summary
                .last_event
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            watched: summary.watched,
            heals: summary.heals,
            give_ups: summary.give_ups,
            actor_restarts: 0,
            restarting: None,
            containers: handle.report(),
        }
    }
}

/// Where a status change goes (the root, by message).
pub type Report = Arc<dyn Fn(AutohealStatus) + Send + Sync>;

pub struct AutohealActor;

pub struct AutohealArgs {
    spec: AutohealSpec,
    report: Report,
}

pub enum AutohealMsg {
    /// The runner ended without being asked to: the actor fails, so the
    /// root restarts it.
    Ended(String),
}

pub struct AutohealState {
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Cancels the runner when ractor drops the state without `post_stop`.
    _guard: DropGuard,
}

impl Actor for AutohealActor {
    type Msg = AutohealMsg;
    type State = AutohealState;
    type Arguments = AutohealArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AutohealMsg>,
        args: AutohealArgs,
    ) -> Result<AutohealState, ActorProcessingErr> {
        let AutohealArgs { spec, report } = args;
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        if !spec.config.autoheal.enabled {
            info!("Autoheal is disabled.");
        } else {
            let connector = Connector::new(&spec.config, &spec.env);
            let setup = Setup {
                config: spec.config.clone(),
                connector,
                scope: spec.scope.clone(),
                instance: spec.instance.clone(),
            };
            let on_change: Arc<dyn Fn(String) + Send + Sync> = Arc::new(|_| {});
            let runner = super::start(&spec.autoheal, setup, &tasks, cancel.clone(), on_change);
            let watch = cancel.clone();
            tasks.spawn(async move {
                let why = match runner.await {
                    Ok(()) if watch.is_cancelled() => return,
                    Ok(()) => "the autoheal loop ended".to_owned(),
                    Err(e) if e.is_panic() => {
                        format!("the autoheal loop panicked: {}", panic_text(e.into_panic()))
                    }
                    Err(e) => format!("the autoheal loop ended: {e}"),
                };
                // Fails only once the actor is stopping anyway.
                let _ = myself.send_message(AutohealMsg::Ended(why));
            });
        }
        let mut handle = spec.autoheal.handle();
        report(AutohealStatus::read(&handle));
        let stop = cancel.clone();
        tasks.spawn(async move {
            while stop.run_until_cancelled(handle.changed()).await == Some(true) {
                report(AutohealStatus::read(&handle));
            }
        });
        Ok(AutohealState {
            tasks,
            _guard: cancel.clone().drop_guard(),
            cancel,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<AutohealMsg>,
        msg: AutohealMsg,
        _state: &mut AutohealState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AutohealMsg::Ended(why) => Err(why.into()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<AutohealMsg>,
        state: &mut AutohealState,
    ) -> Result<(), ActorProcessingErr> {
        state.cancel.cancel();
        state.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), state.tasks.wait())
            .await
            .is_err()
        {
            warn!("Autoheal's tasks did not end within 5s of its stop.");
        }
        Ok(())
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}

// === impl Slot ===

/// The root's place for autoheal: its spec, the running actor, and the
/// supervision bookkeeping (restarts with backoff, never escalated:
/// healing containers is not what serves requests, and the backoff's cap
/// bounds a crash loop's cost).
pub struct Slot {
    spec: AutohealSpec,
    actor: Option<ActorRef<AutohealMsg>>,
    backoff: Backoff,
    restarts: u64,
    status: AutohealStatus,
}

impl Slot {
    pub fn new(spec: AutohealSpec, restart_backoff: BackoffConfig) -> Slot {
        let status = AutohealStatus::read(&spec.autoheal.handle());
        Slot {
            spec,
            actor: None,
            backoff: Backoff::new(restart_backoff),
            restarts: 0,
            status,
        }
    }

    /// Spawns the actor linked to `supervisor`; on failure returns the
    /// delay after which to try again.
    pub async fn spawn(&mut self, supervisor: ActorCell, report: Report) -> Option<Duration> {
        if self.actor.is_some() {
            return None;
        }
        self.backoff.started(Instant::now());
        let args = AutohealArgs {
            spec: self.spec.clone(),
            report,
        };
        match Actor::spawn_linked(None, AutohealActor, args, supervisor).await {
            Ok((actor, _join)) => {
                // The link reports the exit; the join handle is not needed.
                self.actor = Some(actor);
                self.status.restarting = None;
                None
            }
            Err(e) => Some(self.exited(format!("autoheal could not start: {e}"))),
        }
    }

    /// Whether `cell` is this slot's actor.
    pub fn is(&self, cell: &ActorCell) -> bool {
        self.actor
            .as_ref()
            .is_some_and(|a| a.get_id() == cell.get_id())
    }

    /// The actor exited without being asked to: returns when to spawn it
    /// again.
    pub fn exited(&mut self, why: String) -> Duration {
        self.actor = None;
        self.restarts += 1;
        let delay = self.backoff.ended(Instant::now());
        error!(error = %why, restarts = self.restarts, retry_in = %crate::text::duration(delay), "Autoheal exited; restarting it.");
        let metrics = crate::metrics::metrics();
        metrics.autoheal_actor_restart();
        metrics.autoheal_state(false, self.status.watched, None);
        self.status.connected = false;
        self.status.restarting = Some(why);
        delay
    }

    /// The running actor published.
    pub fn changed(&mut self, status: AutohealStatus) {
        let restarting = self.status.restarting.take();
        self.status = AutohealStatus {
            restarting: if self.actor.is_some() {
                None
            } else {
                restarting
            },
            ..status
        };
    }

    pub fn status(&self) -> AutohealStatus {
        AutohealStatus {
            actor_restarts: self.restarts,
            ..self.status.clone()
        }
    }

    pub fn fingerprint(&self) -> &str {
        &self.spec.fingerprint
    }

    /// New settings: the actor is replaced (the memory stays); a spawn is
    /// for the caller, once this returns.
    pub async fn replace(&mut self, spec: AutohealSpec) {
        self.stop().await;
        self.spec = spec;
    }

    /// Stops the actor and waits for it. Whoever calls this takes the actor
    /// out first, so its exit is not mistaken for a failure.
    pub async fn stop(&mut self) {
        let Some(actor) = self.actor.take() else {
            return;
        };
        if actor
            .stop_and_wait(None, Some(Duration::from_secs(6)))
            .await
            .is_err()
        {
            warn!("Autoheal did not stop in time; killing it.");
            actor.kill();
        }
        self.status.connected = false;
    }
}
