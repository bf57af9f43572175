//! Event-driven autoheal: restarts containers that die or turn unhealthy,
//! decided per Docker event.
//!
//! - `event.rs` — Docker's events and container lists, as plain values.
//! - `decide/` — every decision (which containers are watched, heal now,
//!   after a backoff, or give up), pure: event + history + now → steps.
//! - this file — [`Autoheal`], the memory made once per process, and the
//!   runner: follows the event stream, feeds the decisions and carries out
//!   their steps (restart requests, timers, webhooks).
//! - `actor.rs` — the actor under the root that runs one runner, and the
//!   root's [`Slot`] for it.
//! - `client.rs` — the Docker calls, behind the small [`client::Engine`]
//!   trait; `webhook.rs` — notifications.
//!
//! When the event stream breaks, the runner reconnects with backoff, replays
//! the events since the last one it saw (`since`, bounded by `until` so the
//! replay ends), then reconciles with a list of the watched containers so a
//! container that died or turned unhealthy while the daemon's buffer was
//! lost is still healed. The first connection reconciles only unhealthy
//! containers: one found exited may have been stopped on purpose before
//! cascade started, and nothing recorded why.
//!
//! Invariants: one runner at a time owns the mailbox and is the only one to
//! decide; the history ([`decide::Book`]) is locked per decision and never
//! across an await. The runner never awaits Docker (restarts, delays,
//! connecting and webhooks are tracked tasks or futures polled in its
//! `select!`, and end with `cancel`). The handle talks to it by message and
//! reads what it publishes. Idle, it makes no Docker calls at all: the open
//! event stream is the only request.

mod actor;
mod client;
pub mod compat;
pub(crate) mod decide;
pub(crate) mod event;
mod webhook;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::EventMessage;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::resilience::{Backoff, BackoffConfig};
use crate::tiers::docker::config::DockerConfig;
use crate::tiers::docker::connect::{Connector, DockerError};
use client::{Connected, Daemon, Engine, EventStream, Query};
use decide::{Book, Healer, Now, Order, Outcome, Policy, Selection, Step};
use webhook::{NoticeKind, Notifier};

pub use actor::{AutohealActor, AutohealMsg, AutohealSpec, AutohealStatus, Slot};
pub use decide::{HealReport, MANAGED_LABEL, OPT_OUT_LABEL, STOP_TIMEOUT_LABEL};

/// What outlives any one runner of autoheal: the history ([`Book`]), the
/// mailbox cascade's tiers write to, and what was last published. Made once
/// per process; the autoheal actor the root restarts, and every runner a
/// change of settings brings, take over the same one, so neither a restart
/// nor a reload loses a container's backoff or the stream position.
#[derive(Clone)]
pub struct Autoheal {
    memory: Arc<Memory>,
}

struct Memory {
    /// Locked only for a decision or a publish, never across an await.
    book: Mutex<Book>,
    commands: mpsc::UnboundedSender<Command>,
    /// Held by the running runner for its whole life: what the tiers send
    /// while no runner is up waits here for the next one.
    inbox: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Command>>>,
    published: watch::Sender<Published>,
}

impl Default for Autoheal {
    fn default() -> Self {
        Autoheal::new()
    }
}

impl Autoheal {
    pub fn new() -> Autoheal {
        let (commands, inbox) = mpsc::unbounded_channel();
        Autoheal {
            memory: Arc::new(Memory {
                book: Mutex::new(Book::default()),
                commands,
                inbox: Arc::new(tokio::sync::Mutex::new(inbox)),
                published: watch::channel(Published::default()).0,
            }),
        }
    }

    /// For the docker tier (it announces its own stops) and for readers.
    pub fn handle(&self) -> AutohealHandle {
        AutohealHandle {
            commands: self.memory.commands.clone(),
            published: self.memory.published.subscribe(),
        }
    }
}

impl Memory {
    fn book(&self) -> MutexGuard<'_, Book> {
        // A decision that panicked leaves a book still worth more than none.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How one runner is set up.
pub(crate) struct Setup {
    pub config: DockerConfig,
    pub connector: Connector,
    /// `key=value` every considered container must also carry (tests).
    pub scope: Option<String>,
    /// This cascade's: its managed containers are the only managed ones
    /// healed. `None`: every managed container.
    pub instance: Option<crate::Instance>,
}

/// Which containers autoheal considers, for its log line: `all`, or
/// `label NAME`.
fn selection_text(selection: &Selection) -> String {
    match selection {
        Selection::All => "all".to_owned(),
        Selection::Label(label) => format!("label {label}"),
    }
}

/// The decision settings of `[tiers.docker.autoheal]`.
pub(crate) fn policy(config: &DockerConfig) -> Policy {
    let a = &config.autoheal;
    Policy {
        selection: if a.label == "all" {
            Selection::All
        } else {
            Selection::Label(a.label.clone())
        },
        backoff: a.backoff.clone(),
        max_restarts: a.max_restarts,
        window: a.window,
        stop_timeout: a.stop_timeout,
        instance: None,
        scope: None,
    }
}

/// Starts a runner over `autoheal`'s memory as one task in `tasks`, and
/// returns that task; it ends when `cancel` fires.
pub(crate) fn start(
    autoheal: &Autoheal,
    setup: Setup,
    tasks: &TaskTracker,
    cancel: CancellationToken,
    on_change: Arc<dyn Fn(String) + Send + Sync>,
) -> tokio::task::JoinHandle<()> {
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let mut policy = policy(&setup.config);
    if let Some(scope) = &setup.scope {
        policy = policy.scoped(scope);
    }
    policy.instance = setup
        .instance
        .as_ref()
        .map(|i| (crate::Instance::LABEL.to_owned(), i.id().to_owned()));
    let runner = Runner {
        policy,
        start_period: setup.config.autoheal.start_period,
        memory: autoheal.memory.clone(),
        reconnect: setup.config.autoheal.reconnect.clone(),
        engine: Arc::new(Daemon(setup.connector)),
        tasks: tasks.clone(),
        cancel: cancel.clone(),
        internal: internal_tx,
        on_change,
        notifier: Notifier::new(&setup.config.webhook),
    };
    tasks.spawn(run(runner, internal_rx).instrument(info_span!("autoheal")))
}

// === impl AutohealHandle ===

/// Talks to the running loop; cheap to clone.
#[derive(Clone)]
pub struct AutohealHandle {
    /// `expect_stop` goes through the loop's mailbox (not a shared set), so
    /// it is ordered with, and decided by, the one task that reads events.
    commands: mpsc::UnboundedSender<Command>,
    /// What the loop last published; read without waiting on the loop.
    published: watch::Receiver<Published>,
}

impl AutohealHandle {
    /// cascade itself is about to stop/remove/recreate this container (by
    /// name): its die/kill/stop/destroy events are not failures to heal,
    /// until it starts again.
    pub fn expect_stop(&self, container_name: &str) {
        if self
            .commands
            .send(Command::ExpectStop(container_name.to_owned()))
            .is_err()
        {
            debug!(container = %container_name, "Autoheal is gone; nothing to tell.");
        }
    }

    /// Per-container heal counts for /status: every container autoheal has
    /// restarted, given up on, or is about to heal, by name.
    pub fn report(&self) -> Vec<HealReport> {
        self.published.borrow().reports.clone()
    }

    /// Counts over every watched container.
    pub fn summary(&self) -> Summary {
        self.published.borrow().summary.clone()
    }

    /// Whether the loop currently follows the daemon's event stream.
    pub fn connected(&self) -> bool {
        self.published.borrow().connected
    }

    /// For the container's last heal: from the failure event's time (the
    /// daemon's `timeNano`) to the moment the restart request was sent.
    pub fn last_heal_latency(&self, container_name: &str) -> Option<Duration> {
        self.published
            .borrow()
            .latencies
            .get(container_name)
            .copied()
    }

    /// Waits for the next publication; `false` once nothing publishes any
    /// more.
    pub(crate) async fn changed(&mut self) -> bool {
        self.published.changed().await.is_ok()
    }
}

// === the loop ===

/// Messages from the handle.
enum Command {
    ExpectStop(String),
}

/// Messages from the loop's own tasks.
enum Internal {
    /// A backoff delay ran out.
    Due { id: String, seq: u64 },
    /// A restart request finished.
    Restarted { order: Order, outcome: Outcome },
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Published {
    connected: bool,
    reports: Vec<HealReport>,
    latencies: BTreeMap<String, Duration>,
    summary: Summary,
}

/// autoheal as a whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Containers watched: cascade's own and the selected ones.
    pub watched: usize,
    /// Restarts made.
    pub heals: u64,
    /// Containers given up on.
    pub give_ups: u64,
    /// Daemon time of the last event the stream delivered.
    pub last_event: Option<SystemTime>,
}

struct Runner {
    policy: Policy,
    /// Waited before the process's first connection.
    start_period: Duration,
    memory: Arc<Memory>,
    reconnect: BackoffConfig,
    engine: Arc<dyn Engine>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Handed to restart and delay tasks so they report back to the loop.
    internal: mpsc::UnboundedSender<Internal>,
    on_change: Arc<dyn Fn(String) + Send + Sync>,
    notifier: Notifier,
}

/// The loop's link to the daemon.
enum Link {
    Connecting(Pin<Box<dyn Future<Output = Result<Connected, DockerError>> + Send>>),
    Waiting(Pin<Box<Sleep>>),
    Live(EventStream),
}

enum LinkStep {
    Connected(Result<Connected, DockerError>),
    Retry,
    Event(Option<Result<EventMessage, bollard::errors::Error>>),
}

impl Link {
    /// Cancel-safe: every future lives in `self`, so losing a `select!` race
    /// loses nothing.
    async fn step(&mut self) -> LinkStep {
        match self {
            Link::Connecting(connecting) => LinkStep::Connected(connecting.await),
            Link::Waiting(sleep) => {
                sleep.await;
                LinkStep::Retry
            }
            Link::Live(stream) => LinkStep::Event(stream.next().await),
        }
    }
}

fn now() -> Now {
    Now {
        at: Instant::now(),
        wall: SystemTime::now(),
    }
}

async fn run(mut runner: Runner, mut internal: mpsc::UnboundedReceiver<Internal>) {
    // The previous runner, if it is still winding down, gives the mailbox
    // up when it ends.
    let inbox = runner.memory.inbox.clone();
    let Some(mut commands) = runner.cancel.run_until_cancelled(inbox.lock_owned()).await else {
        return;
    };
    let steps = runner.decide(|healer, _| healer.resume());
    runner.carry_out(steps);
    // Only before the first connection: a respawned runner resumes at once.
    let first = runner.memory.book().resume_from().is_none();
    if first && !runner.start_period.is_zero() {
        info!(start_period = %crate::text::duration(runner.start_period), "Autoheal waits out its start period.");
        let wait = tokio::time::sleep(runner.start_period);
        if runner.cancel.run_until_cancelled(wait).await.is_none() {
            return;
        }
    }
    let mut reconnect = Backoff::new(runner.reconnect.clone());
    let mut link = Link::Connecting(runner.connect());
    // Only the first failure of a series is a warning; retries are debug.
    let mut failing = false;
    info!(selection = %selection_text(&runner.policy.selection), webhook = runner.notifier.enabled(), "Autoheal started.");
    loop {
        tokio::select! {
            // Commands first: an expect_stop sent before cascade stops a
            // container must be in place before that container's events.
            biased;
            () = runner.cancel.cancelled() => break,
            Some(command) = commands.recv() => runner.on_command(command),
            Some(msg) = internal.recv() => runner.on_internal(msg),
            step = link.step() => match step {
                LinkStep::Connected(Ok(connected)) => {
                    failing = false;
                    reconnect.started(Instant::now());
                    link = Link::Live(runner.on_connected(connected));
                }
                LinkStep::Connected(Err(error)) => {
                    let delay = reconnect.ended(Instant::now());
                    if failing {
                        debug!(%error, retry_in = %crate::text::duration(delay), "Cannot reach the Docker event stream.");
                    } else {
                        warn!(%error, retry_in = %crate::text::duration(delay), "Cannot reach the Docker event stream.");
                    }
                    failing = true;
                    link = Link::Waiting(Box::pin(tokio::time::sleep(delay)));
                }
                LinkStep::Retry => link = Link::Connecting(runner.connect()),
                LinkStep::Event(Some(Ok(event))) => {
                    let steps = runner.decide(|healer, now| healer.message(event, now));
                    runner.carry_out(steps);
                }
                LinkStep::Event(broken) => {
                    let delay = reconnect.ended(Instant::now());
                    match broken {
                        Some(Err(e)) => {
                            let error = crate::text::root_cause(&e);
                            warn!(%error, retry_in = %crate::text::duration(delay), "Docker event stream broke; reconnecting.");
                        }
                        _ => warn!(retry_in = %crate::text::duration(delay), "Docker event stream ended; reconnecting."),
                    }
                    failing = true;
                    runner.set_connected(false);
                    link = Link::Waiting(Box::pin(tokio::time::sleep(delay)));
                }
            },
        }
    }
    runner.set_connected(false);
    info!("Autoheal stopped.");
}

// === impl Runner ===

impl Runner {
    /// One decision over the book, made now.
    fn decide<R>(&self, decision: impl FnOnce(&mut Healer<'_>, Now) -> R) -> R {
        let mut book = self.memory.book();
        let mut healer = Healer {
            policy: &self.policy,
            book: &mut book,
        };
        decision(&mut healer, now())
    }

    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Connected, DockerError>> + Send>> {
        let query = Query {
            resume_from: self.memory.book().resume_from(),
            lists: self.policy.lists(),
            scope: self.policy.scope_filter(),
        };
        self.engine.connect(query)
    }

    fn on_connected(&mut self, connected: Connected) -> EventStream {
        let Connected {
            replay,
            listing,
            live_from,
            stream,
        } = connected;
        info!(
            resumed_from = self.memory.book().resume_from(),
            replayed = replay.len(),
            listed = listing.len(),
            "Following the Docker event stream."
        );
        let steps = self.decide(|healer, now| healer.connected(replay, listing, live_from, now));
        self.carry_out(steps);
        self.set_connected(true);
        stream
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ExpectStop(name) => self.decide(|healer, _| healer.expect_stop(&name)),
        }
        self.publish();
    }

    fn on_internal(&mut self, msg: Internal) {
        let steps = match msg {
            Internal::Due { id, seq } => self.decide(|healer, now| healer.due(&id, seq, now)),
            Internal::Restarted { order, outcome } => {
                self.decide(|healer, now| healer.restarted(&order, outcome, now))
            }
        };
        self.carry_out(steps);
    }

    /// Does what the decisions asked for, then publishes.
    fn carry_out(&mut self, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Restart(order) => self.restart(order),
                Step::Wake { id, seq, at } => {
                    let internal = self.internal.clone();
                    let cancel = self.cancel.clone();
                    self.tasks.spawn(async move {
                        if cancel
                            .run_until_cancelled(tokio::time::sleep_until(at))
                            .await
                            .is_some()
                        {
                            // Fails only once the loop has ended.
                            let _ = internal.send(Internal::Due { id, seq });
                        }
                    });
                }
                Step::Notify(notice) => {
                    let metrics = crate::metrics::metrics();
                    match notice.event {
                        NoticeKind::Restart => metrics.autoheal_restart(&notice.container),
                        NoticeKind::GiveUp => metrics.autoheal_give_up(&notice.container),
                        NoticeKind::RestartFailed => {}
                    }
                    self.notifier.send(&self.tasks, &self.cancel, notice);
                }
                Step::Note(note) => (self.on_change)(note),
            }
        }
        self.publish();
    }

    /// Sends the restart request from a tracked task, so a slow restart does
    /// not hold up the events of other containers.
    fn restart(&self, order: Order) {
        let engine = self.engine.clone();
        let internal = self.internal.clone();
        let cancel = self.cancel.clone();
        let span = tracing::info_span!(
            "heal",
            backend.tier = "docker",
            backend.name = %order.name,
            container.id = %order.id,
            reason = %order.reason,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        self.tasks.spawn(async move {
            let latency = order.event_nanos.map(|nanos| {
                let at = UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
                SystemTime::now().duration_since(at).unwrap_or_default()
            });
            let restart = engine
                .restart(order.id.clone(), order.stop_timeout)
                .instrument(span.clone());
            let result = cancel.run_until_cancelled(restart).await;
            let outcome = match result {
                Some(Ok(())) => {
                    span.record("outcome", "restarted");
                    Outcome::Done { latency }
                }
                Some(Err(error)) if error.status() == Some(404) => {
                    span.record("outcome", "gone");
                    Outcome::Gone
                }
                Some(Err(error)) => {
                    span.record("outcome", "failed")
                        .record("error", error.to_string());
                    Outcome::Failed(error.to_string())
                }
                None => {
                    span.record("outcome", "cancelled");
                    return;
                }
            };
            drop(span);
            // Fails only once the loop has ended.
            let _ = internal.send(Internal::Restarted { order, outcome });
        });
    }

    fn set_connected(&mut self, connected: bool) {
        self.memory.published.send_if_modified(|p| {
            let changed = p.connected != connected;
            p.connected = connected;
            changed
        });
    }

    fn publish(&mut self) {
        let (reports, latencies, summary) = {
            let book = self.memory.book();
            let summary = Summary {
                watched: book.watched(),
                heals: book.heals(),
                give_ups: book.give_ups(),
                last_event: book.last_event(),
            };
            (
                book.reports(),
                book.latencies().into_iter().collect(),
                summary,
            )
        };
        self.memory.published.send_if_modified(|p| {
            if p.reports == reports && p.latencies == latencies && p.summary == summary {
                return false;
            }
            p.reports = reports;
            p.latencies = latencies;
            p.summary = summary;
            true
        });
    }
}
