//! Event-driven autoheal: restarts containers that die or turn unhealthy,
//! decided per Docker event, with backoff and a restart cap.
//!
//! Two kinds of container are healed, both recognised from the labels in each
//! event's `Actor.Attributes` (nothing is registered up front, so containers
//! created later are covered from their first event):
//!
//! - **managed** (`cascade.managed=true`): cascade's own. Restarted on `die`,
//!   `oom` or `health_status: unhealthy`, whoever stopped it — unless cascade
//!   itself announced the stop with [`AutohealHandle::expect_stop`] (so a
//!   person's `docker restart` of one is followed by autoheal's own).
//! - **labelled** (`<autoheal.label>=true`): restarted on `unhealthy`, `oom`,
//!   or a `die` that no `kill`/`stop` preceded since its last `start`
//!   (`docker stop` and `docker kill` emit `kill` → `die` → `stop`: a person
//!   stopped it on purpose and it is left stopped). The restart's stop timeout
//!   is docker-autoheal's `autoheal.stop.timeout` label, else
//!   `autoheal.stop_timeout`.
//!
//! The first heal of a container goes out at once (the latency target is tens
//! of milliseconds, where docker-autoheal polls every 5 s); repeated ones wait
//! a full-jitter backoff, reset after a stable run. More than `max_restarts`
//! failures within `window` and autoheal gives up on the container, logs it,
//! reports it and calls the webhook; a start autoheal did not make (a person,
//! the tier) gives it a fresh budget.
//!
//! When the event stream breaks, the loop reconnects with backoff, replays
//! the events since the last one it saw (`since`, bounded by `until` so the
//! replay ends), then reconciles with a list of the labelled containers so a
//! container that died or turned unhealthy while the daemon's buffer was lost
//! is still healed. The first connection reconciles only unhealthy
//! containers: one found exited may have been stopped on purpose before
//! cascade started, and nothing recorded why.
//!
//! Invariants: one task owns all the state and is the only one to decide; it
//! never awaits Docker (restarts, delays, connecting and webhooks are tracked
//! tasks or futures polled in its `select!`, and end with `cancel`). The
//! handle talks to it by message and reads what it publishes. Idle, it makes
//! no Docker calls at all: the open event stream is the only request. There is
//! deliberately no liveness ping: on the unix socket a daemon restart or a
//! socket error closes the stream, which the loop sees at once; a hung daemon
//! would hang a ping too; and on a half-open TCP connection a ping on a fresh
//! connection would succeed while the old stream stays silent, so it would
//! prove nothing.

mod client;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::EventMessage;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::config::{DockerConfig, MANAGED_LABEL};
use super::connect::{Connector, DockerError};
use super::webhook::{Notice, NoticeKind, Notifier};
use crate::resilience::{Backoff, BackoffConfig, RestartIntensity};
use client::{Connected, EventStream, Listed, ListedState, Query};

/// docker-autoheal's per-container stop timeout label (whole seconds).
pub const STOP_TIMEOUT_LABEL: &str = "autoheal.stop.timeout";

/// Heal counts of one container, for `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealReport {
    /// The container's name.
    pub container: String,
    /// Restarts autoheal made.
    pub restarts: u64,
    /// Why autoheal stopped restarting it, if it did.
    pub gave_up: Option<String>,
    /// When and why it was last restarted.
    pub last_heal: Option<String>,
}

/// Starts the autoheal loop as one task in `tasks`; it ends when `cancel`
/// fires. With `autoheal.enabled = false` nothing runs and the handle's
/// reports stay empty.
pub fn spawn(
    config: &DockerConfig,
    connector: Connector,
    tasks: &TaskTracker,
    cancel: CancellationToken,
    on_change: Arc<dyn Fn(String) + Send + Sync>,
) -> AutohealHandle {
    start(config, connector, tasks, cancel, on_change, None)
}

/// [`spawn`], considering only containers that also carry the label `scope`
/// (`key=value`), so concurrent tests do not heal each other's containers.
#[cfg(test)]
pub(crate) fn spawn_scoped(
    config: &DockerConfig,
    connector: Connector,
    tasks: &TaskTracker,
    cancel: CancellationToken,
    on_change: Arc<dyn Fn(String) + Send + Sync>,
    scope: &str,
) -> AutohealHandle {
    start(
        config,
        connector,
        tasks,
        cancel,
        on_change,
        Some(scope.to_owned()),
    )
}

fn start(
    config: &DockerConfig,
    connector: Connector,
    tasks: &TaskTracker,
    cancel: CancellationToken,
    on_change: Arc<dyn Fn(String) + Send + Sync>,
    scope: Option<String>,
) -> AutohealHandle {
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let (published_tx, published_rx) = watch::channel(Published::default());
    let handle = AutohealHandle {
        commands: commands_tx,
        published: published_rx,
    };
    if !config.autoheal.enabled {
        info!("Autoheal is disabled.");
        return handle;
    }
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let healer = Healer {
        settings: Settings::new(config, scope),
        connector,
        tasks: tasks.clone(),
        cancel: cancel.clone(),
        internal: internal_tx,
        on_change,
        notifier: Notifier::new(&config.webhook),
        published: published_tx,
        containers: HashMap::new(),
        expected: HashSet::new(),
        next_seq: 0,
        position: Position::default(),
    };
    tasks.spawn(
        run(healer, commands_rx, internal_rx)
            .instrument(info_span!("autoheal", backend.tier = "docker")),
    );
    handle
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
            debug!(container = %container_name, "Autoheal is not running; nothing to tell.");
        }
    }

    /// Per-container heal counts for /status: every container autoheal has
    /// restarted or given up on, by name.
    pub fn report(&self) -> Vec<HealReport> {
        self.published.borrow().reports.clone()
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
    Restarted {
        id: String,
        seq: u64,
        result: Result<(), DockerError>,
        /// The failure it healed.
        reason: String,
        /// Event time to request, when the heal came from an event.
        latency: Option<Duration>,
    },
}

#[derive(Debug, Clone, Default)]
struct Published {
    connected: bool,
    reports: Vec<HealReport>,
    latencies: BTreeMap<String, Duration>,
}

struct Settings {
    label: String,
    backoff: BackoffConfig,
    max_restarts: u32,
    window: Duration,
    stop_timeout: Duration,
    reconnect: BackoffConfig,
    scope: Option<(String, String)>,
}

impl Settings {
    fn new(config: &DockerConfig, scope: Option<String>) -> Settings {
        let a = &config.autoheal;
        Settings {
            label: a.label.clone(),
            backoff: a.backoff.clone(),
            max_restarts: a.max_restarts,
            window: a.window,
            stop_timeout: a.stop_timeout,
            reconnect: a.reconnect.clone(),
            scope: scope.map(|s| match s.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (s, String::new()),
            }),
        }
    }

    /// Which kind of healed container these labels make, if any.
    fn kind_of(&self, labels: &HashMap<String, String>) -> Option<Kind> {
        if let Some((key, value)) = &self.scope
            && labels.get(key) != Some(value)
        {
            return None;
        }
        if labels.get(MANAGED_LABEL).is_some_and(|v| v == "true") {
            Some(Kind::Managed)
        } else if labels.get(&self.label).is_some_and(|v| v == "true") {
            Some(Kind::Labelled)
        } else {
            None
        }
    }

    fn stop_timeout(&self, name: &str, labels: &HashMap<String, String>) -> Duration {
        match labels.get(STOP_TIMEOUT_LABEL) {
            None => self.stop_timeout,
            Some(text) => match text.trim().parse::<u64>() {
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => {
                    warn!(container = %name, label = STOP_TIMEOUT_LABEL, value = %text,
                        "Not a whole number of seconds; using the configured stop timeout.");
                    self.stop_timeout
                }
            },
        }
    }

    /// The label filters of the reconnect's container lists.
    fn list_labels(&self) -> Vec<String> {
        vec![
            format!("{MANAGED_LABEL}=true"),
            format!("{}=true", self.label),
        ]
    }

    fn scope_filter(&self) -> Option<String> {
        self.scope.as_ref().map(|(k, v)| format!("{k}={v}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Managed,
    Labelled,
}

/// What an event leads to, once the container's record is updated.
enum Then {
    Nothing,
    Started { publish: bool },
    Heal(String),
}

/// Where autoheal is in healing one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// A restart waits for its backoff delay (`Internal::Due` with `seq`).
    Scheduled {
        seq: u64,
        event_nanos: Option<i64>,
    },
    /// A restart was requested; its own kill/die/stop events are expected
    /// until the container's next `start` (`done`: the request returned).
    Restarting {
        seq: u64,
        done: bool,
    },
}

/// Everything autoheal knows about one container, by id.
struct Tracked {
    name: String,
    image: String,
    kind: Kind,
    stop_timeout: Duration,
    /// `kill` or `stop` seen since the last start that autoheal did not cause:
    /// a labelled container that then dies was stopped on purpose.
    stop_intent: Option<&'static str>,
    /// The failure being healed, from the decision until the next start.
    wants_heal: Option<String>,
    phase: Phase,
    backoff: Backoff,
    intensity: RestartIntensity,
    restarts: u64,
    gave_up: Option<String>,
    last_heal: Option<String>,
    last_latency: Option<Duration>,
}

/// The event stream's position, to resume after a break without repeats.
#[derive(Debug, Default)]
struct Position {
    /// Time of the last event seen (or of the first connection).
    cut: Option<i64>,
    /// `(timeNano, id, action)` of the last event, to drop its replay.
    last: Option<(i64, String, String)>,
}

struct Healer {
    settings: Settings,
    connector: Connector,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Handed to restart and delay tasks so they report back to the loop.
    internal: mpsc::UnboundedSender<Internal>,
    on_change: Arc<dyn Fn(String) + Send + Sync>,
    notifier: Notifier,
    published: watch::Sender<Published>,
    containers: HashMap<String, Tracked>,
    /// Names of containers cascade said it is stopping, until they start.
    expected: HashSet<String>,
    next_seq: u64,
    position: Position,
}

/// The loop's link to the daemon.
enum Link {
    Connecting(Pin<Box<dyn Future<Output = Result<Connected, DockerError>> + Send>>),
    Waiting(Pin<Box<Sleep>>),
    Live(EventStream),
}

enum Step {
    Connected(Result<Connected, DockerError>),
    Retry,
    Event(Option<Result<EventMessage, bollard::errors::Error>>),
}

impl Link {
    /// Cancel-safe: every future lives in `self`, so losing a `select!` race
    /// loses nothing.
    async fn step(&mut self) -> Step {
        match self {
            Link::Connecting(connecting) => Step::Connected(connecting.await),
            Link::Waiting(sleep) => {
                sleep.await;
                Step::Retry
            }
            Link::Live(stream) => Step::Event(stream.next().await),
        }
    }
}

async fn run(
    mut healer: Healer,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut internal: mpsc::UnboundedReceiver<Internal>,
) {
    let mut reconnect = Backoff::new(healer.settings.reconnect.clone());
    let mut link = Link::Connecting(healer.connect());
    // Only the first failure of a series is a warning; retries are debug.
    let mut failing = false;
    info!(label = %healer.settings.label, webhook = healer.notifier.enabled(), "Autoheal started.");
    loop {
        tokio::select! {
            // Commands first: an expect_stop sent before cascade stops a
            // container must be in place before that container's events.
            biased;
            () = healer.cancel.cancelled() => break,
            Some(command) = commands.recv() => healer.on_command(command),
            Some(msg) = internal.recv() => healer.on_internal(msg),
            step = link.step() => match step {
                Step::Connected(Ok(connected)) => {
                    failing = false;
                    reconnect.started(Instant::now());
                    link = Link::Live(healer.on_connected(connected));
                }
                Step::Connected(Err(error)) => {
                    let delay = reconnect.ended(Instant::now());
                    if failing {
                        debug!(%error, retry_in = ?delay, "Cannot reach the Docker event stream.");
                    } else {
                        warn!(%error, retry_in = ?delay, "Cannot reach the Docker event stream.");
                    }
                    failing = true;
                    link = Link::Waiting(Box::pin(tokio::time::sleep(delay)));
                }
                Step::Retry => link = Link::Connecting(healer.connect()),
                Step::Event(Some(Ok(event))) => healer.on_message(event),
                Step::Event(broken) => {
                    let delay = reconnect.ended(Instant::now());
                    match broken {
                        Some(Err(e)) => {
                            let error = crate::text::root_cause(&e);
                            warn!(%error, retry_in = ?delay, "Docker event stream broke; reconnecting.");
                        }
                        _ => warn!(retry_in = ?delay, "Docker event stream ended; reconnecting."),
                    }
                    failing = true;
                    healer.set_connected(false);
                    link = Link::Waiting(Box::pin(tokio::time::sleep(delay)));
                }
            },
        }
    }
    healer.set_connected(false);
    info!("Autoheal stopped.");
}

// === impl Healer ===

impl Healer {
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Connected, DockerError>> + Send>> {
        let query = Query {
            resume_from: self.position.cut,
            labels: self.settings.list_labels(),
            scope: self.settings.scope_filter(),
        };
        Box::pin(client::connect(self.connector.clone(), query))
    }

    fn on_connected(&mut self, connected: Connected) -> EventStream {
        let Connected {
            replay,
            listing,
            live_from,
            stream,
        } = connected;
        let resumed_from = self.position.cut;
        info!(
            resumed_from = ?resumed_from,
            replayed = replay.len(),
            listed = listing.len(),
            "Following the Docker event stream."
        );
        for event in replay {
            self.on_message(event);
        }
        // A restart whose `start` event was lost with the stream is over.
        for t in self.containers.values_mut() {
            if let Phase::Restarting { done: true, .. } = t.phase {
                t.phase = Phase::Idle;
            }
        }
        self.reconcile(listing, resumed_from);
        if self.position.cut.is_none_or(|cut| cut < live_from) {
            self.position.cut = Some(live_from);
        }
        self.set_connected(true);
        stream
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ExpectStop(name) => {
                debug!(container = %name, "cascade will stop this container itself.");
                for t in self.containers.values_mut().filter(|t| t.name == name) {
                    // A pending delayed heal is moot now.
                    if let Phase::Scheduled { .. } = t.phase {
                        t.phase = Phase::Idle;
                    }
                    t.wants_heal = None;
                }
                self.expected.insert(name);
            }
        }
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Due { id, seq } => {
                let Some(t) = self.containers.get(&id) else {
                    return;
                };
                if let Phase::Scheduled {
                    seq: pending,
                    event_nanos,
                } = t.phase
                    && pending == seq
                {
                    self.issue_restart(&id, event_nanos);
                }
            }
            Internal::Restarted {
                id,
                seq,
                result,
                reason,
                latency,
            } => self.restarted(&id, seq, result, reason, latency),
        }
    }

    /// One message from the stream: drops the replayed duplicate, advances
    /// the position, and hands container events of healed kinds on.
    fn on_message(&mut self, message: EventMessage) {
        let Some(event) = Event::parse(message) else {
            return;
        };
        let key = (
            event.time_nanos,
            event.id.clone(),
            event.action_text.clone(),
        );
        if let Some(last) = &self.position.last
            && (key.0 < last.0 || key == *last)
        {
            return;
        }
        self.position.cut = Some(event.time_nanos);
        self.position.last = Some(key);
        self.on_event(event);
    }

    fn on_event(&mut self, event: Event) {
        let Some(kind) = self.settings.kind_of(&event.attributes) else {
            return;
        };
        if event.action == Action::Destroy {
            self.expected.remove(&event.name);
            if self.containers.remove(&event.id).is_some() {
                debug!(container = %event.name, "Container removed; forgotten.");
                self.publish();
            }
            return;
        }
        let now = Instant::now();
        let expected = self.expected.contains(&event.name);
        let (max_restarts, window) = (self.settings.max_restarts, self.settings.window);
        let t = self.track(
            &event.id,
            &event.name,
            &event.image,
            kind,
            &event.attributes,
        );
        let then = match &event.action {
            Action::Start => {
                t.stop_intent = None;
                t.wants_heal = None;
                t.backoff.started(now);
                let ours = t.phase != Phase::Idle;
                t.phase = Phase::Idle;
                if !ours && t.gave_up.take().is_some() {
                    // Someone else started it: a fresh budget.
                    t.intensity = RestartIntensity::new(max_restarts, window);
                    info!(container = %event.name, "Container started again; autoheal resumes healing it.");
                    Then::Started { publish: true }
                } else {
                    Then::Started { publish: false }
                }
            }
            Action::Kill | Action::Stop => {
                // During autoheal's own restart these are its own doing.
                if !matches!(t.phase, Phase::Restarting { .. }) {
                    t.stop_intent = Some(if event.action == Action::Kill {
                        "kill"
                    } else {
                        "stop"
                    });
                }
                Then::Nothing
            }
            // Already being healed (the die of an `oom`, or of our own restart).
            Action::Die { .. } if t.phase != Phase::Idle => Then::Nothing,
            Action::Die { exit_code } => {
                let reason = match exit_code {
                    Some(code) => format!("died (exit code {code})"),
                    None => "died".to_owned(),
                };
                if expected {
                    info!(container = %event.name, "Container stopped by cascade; not healing.");
                    Then::Nothing
                } else if t.kind == Kind::Labelled
                    && let Some(intent) = t.stop_intent
                {
                    info!(container = %event.name, %intent, "Container stopped on purpose; leaving it stopped.");
                    Then::Nothing
                } else {
                    Then::Heal(reason)
                }
            }
            Action::Oom => Then::Heal("out of memory".into()),
            Action::Unhealthy => Then::Heal("unhealthy".into()),
            Action::Destroy | Action::Other => Then::Nothing,
        };
        match then {
            Then::Nothing => {}
            Then::Started { publish } => {
                self.expected.remove(&event.name);
                if publish {
                    self.publish();
                }
            }
            Then::Heal(reason) => self.on_failure(&event.id, reason, Some(event.time_nanos)),
        }
    }

    /// The container with this id, tracked from now on.
    fn track(
        &mut self,
        id: &str,
        name: &str,
        image: &str,
        kind: Kind,
        labels: &HashMap<String, String>,
    ) -> &mut Tracked {
        let settings = &self.settings;
        self.containers
            .entry(id.to_owned())
            .or_insert_with(|| Tracked {
                name: name.to_owned(),
                image: image.to_owned(),
                kind,
                stop_timeout: settings.stop_timeout(name, labels),
                stop_intent: None,
                wants_heal: None,
                phase: Phase::Idle,
                backoff: Backoff::new(settings.backoff.clone()),
                intensity: RestartIntensity::new(settings.max_restarts, settings.window),
                restarts: 0,
                gave_up: None,
                last_heal: None,
                last_latency: None,
            })
    }

    /// The container needs a restart: now, after its backoff, or never again
    /// if it is past the cap.
    fn on_failure(&mut self, id: &str, reason: String, event_nanos: Option<i64>) {
        let now = Instant::now();
        let Some(t) = self.containers.get_mut(id) else {
            return;
        };
        if self.expected.contains(&t.name) || t.gave_up.is_some() || t.phase != Phase::Idle {
            debug!(container = %t.name, %reason, phase = ?t.phase, "Not healing: stopped by cascade, given up, or already healing.");
            return;
        }
        t.wants_heal = Some(reason.clone());
        if t.intensity.record(now) {
            let why = format!(
                "more than {} restarts within {}; last failure: {reason}",
                self.settings.max_restarts,
                crate::text::duration(self.settings.window)
            );
            warn!(container = %t.name, id = %id, restarts = t.restarts, %reason, "Autoheal gives up on this container.");
            crate::metrics::metrics().autoheal_give_up(&t.name);
            t.gave_up = Some(why.clone());
            t.wants_heal = None;
            let notice = notice(NoticeKind::GiveUp, id, t, why);
            let note = format!("autoheal gave up on {}", t.name);
            self.notifier.send(&self.tasks, &self.cancel, notice);
            self.publish();
            (self.on_change)(note);
            return;
        }
        // The first heal after a stable run goes out at once; only repeats wait.
        let delay = t.backoff.ended(now);
        let delay = if t.backoff.attempt() <= 1 {
            Duration::ZERO
        } else {
            delay
        };
        info!(container = %t.name, id = %id, %reason, delay = ?delay, "Healing container.");
        if delay.is_zero() {
            self.issue_restart(id, event_nanos);
            return;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        t.phase = Phase::Scheduled { seq, event_nanos };
        let internal = self.internal.clone();
        let cancel = self.cancel.clone();
        let id = id.to_owned();
        self.tasks.spawn(async move {
            if cancel
                .run_until_cancelled(tokio::time::sleep(delay))
                .await
                .is_some()
            {
                // Fails only once the loop has ended.
                let _ = internal.send(Internal::Due { id, seq });
            }
        });
    }

    /// Sends the restart request from a tracked task, so a slow restart does
    /// not hold up the events of other containers.
    fn issue_restart(&mut self, id: &str, event_nanos: Option<i64>) {
        let Some(t) = self.containers.get_mut(id) else {
            return;
        };
        self.next_seq += 1;
        let seq = self.next_seq;
        t.phase = Phase::Restarting { seq, done: false };
        let reason = t.wants_heal.clone().unwrap_or_else(|| "failed".into());
        let stop_timeout = t.stop_timeout;
        let connector = self.connector.clone();
        let internal = self.internal.clone();
        let cancel = self.cancel.clone();
        let id = id.to_owned();
        let span = tracing::info_span!(
            "heal",
            backend.tier = "docker",
            backend.name = %t.name,
            container.id = %id,
            %reason,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        self.tasks.spawn(async move {
            let latency = event_nanos.map(|nanos| {
                let at = UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
                SystemTime::now().duration_since(at).unwrap_or_default()
            });
            let restart = client::restart(&connector, &id, stop_timeout).instrument(span.clone());
            let result = cancel.run_until_cancelled(restart).await;
            match &result {
                Some(Ok(())) => span.record("outcome", "restarted"),
                Some(Err(error)) => span
                    .record("outcome", "failed")
                    .record("error", error.to_string()),
                None => span.record("outcome", "cancelled"),
            };
            drop(span);
            if let Some(result) = result {
                // Fails only once the loop has ended.
                let _ = internal.send(Internal::Restarted {
                    id,
                    seq,
                    result,
                    reason,
                    latency,
                });
            }
        });
    }

    fn restarted(
        &mut self,
        id: &str,
        seq: u64,
        result: Result<(), DockerError>,
        reason: String,
        latency: Option<Duration>,
    ) {
        let Some(t) = self.containers.get_mut(id) else {
            return;
        };
        let current = matches!(t.phase, Phase::Restarting { seq: s, .. } if s == seq);
        match result {
            Ok(()) => {
                t.restarts += 1;
                crate::metrics::metrics().autoheal_restart(&t.name);
                t.last_heal = Some(format!(
                    "{} ({reason})",
                    humantime::format_rfc3339_millis(SystemTime::now())
                ));
                t.last_latency = latency;
                // Its own kill/die/stop events may still be on their way: they
                // stay ours until the container's `start`.
                if current {
                    t.phase = Phase::Restarting { seq, done: true };
                }
                info!(
                    container = %t.name, id = %id, restarts = t.restarts, %reason,
                    latency_ms = latency.map(|l| l.as_secs_f64() * 1e3),
                    "Container restarted."
                );
                let notice = notice(NoticeKind::Restart, id, t, reason.clone());
                let note = format!("autoheal restarted {}: {reason}", t.name);
                self.notifier.send(&self.tasks, &self.cancel, notice);
                self.publish();
                (self.on_change)(note);
            }
            Err(error) if error.status() == Some(404) => {
                info!(container = %t.name, id = %id, "Container is gone; nothing to heal.");
                self.containers.remove(id);
                self.publish();
            }
            Err(error) => {
                warn!(container = %t.name, id = %id, %error, "Restart failed.");
                if current {
                    t.phase = Phase::Idle;
                }
                self.on_failure(id, format!("restart failed: {error}"), None);
            }
        }
    }

    /// After a reconnect: heals what the replay could not show — containers
    /// unhealthy now, and containers that exited while the stream was down
    /// (or whose heal failed) without an intent to stop.
    fn reconcile(&mut self, listing: Vec<Listed>, resumed_from: Option<i64>) {
        for listed in listing {
            let Some(kind) = self.settings.kind_of(&listed.labels) else {
                continue;
            };
            match listed.state {
                ListedState::Running { unhealthy } => {
                    if let Some(t) = self.containers.get_mut(&listed.id) {
                        t.wants_heal = None;
                    }
                    if unhealthy {
                        self.track(
                            &listed.id,
                            &listed.name,
                            &listed.image,
                            kind,
                            &listed.labels,
                        );
                        self.on_failure(&listed.id, "unhealthy (found on reconnect)".into(), None);
                    }
                }
                ListedState::Exited => {
                    let Some(cut) = resumed_from else {
                        // First connection: nobody knows why it exited.
                        continue;
                    };
                    let died_meanwhile = listed.finished_at.is_some_and(|at| at >= cut);
                    let t = self.track(
                        &listed.id,
                        &listed.name,
                        &listed.image,
                        kind,
                        &listed.labels,
                    );
                    let unhealed = t.wants_heal.is_some() && t.phase == Phase::Idle;
                    let on_purpose = kind == Kind::Labelled && t.stop_intent.is_some();
                    if unhealed || (died_meanwhile && !on_purpose) {
                        self.on_failure(
                            &listed.id,
                            "exited while the event stream was down".into(),
                            None,
                        );
                    }
                }
                ListedState::Other => {}
            }
        }
    }

    fn set_connected(&mut self, connected: bool) {
        self.published.send_if_modified(|p| {
            let changed = p.connected != connected;
            p.connected = connected;
            changed
        });
    }

    fn publish(&mut self) {
        let mut reports: Vec<HealReport> = self
            .containers
            .values()
            .filter(|t| t.restarts > 0 || t.gave_up.is_some())
            .map(|t| HealReport {
                container: t.name.clone(),
                restarts: t.restarts,
                gave_up: t.gave_up.clone(),
                last_heal: t.last_heal.clone(),
            })
            .collect();
        reports.sort_by(|a, b| a.container.cmp(&b.container));
        let latencies = self
            .containers
            .values()
            .filter_map(|t| Some((t.name.clone(), t.last_latency?)))
            .collect();
        self.published.send_modify(|p| {
            p.reports = reports;
            p.latencies = latencies;
        });
    }
}

fn notice(event: NoticeKind, id: &str, t: &Tracked, reason: String) -> Notice {
    Notice {
        event,
        container: t.name.clone(),
        id: id.to_owned(),
        image: t.image.clone(),
        reason,
        restarts: t.restarts,
        time: SystemTime::now(),
    }
}

// === events ===

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Start,
    Die {
        exit_code: Option<String>,
    },
    Oom,
    Kill,
    Stop,
    Unhealthy,
    Destroy,
    /// `health_status: healthy` and the like.
    Other,
}

/// A container event, as autoheal reads it.
#[derive(Debug, Clone)]
struct Event {
    id: String,
    name: String,
    image: String,
    action: Action,
    action_text: String,
    /// The container's labels, plus `name`, `image`, `exitCode`, `signal`.
    attributes: HashMap<String, String>,
    time_nanos: i64,
}

impl Event {
    fn parse(message: EventMessage) -> Option<Event> {
        let action_text = message.action?;
        let actor = message.actor?;
        let id = actor.id?;
        let attributes = actor.attributes.unwrap_or_default();
        let time_nanos = message
            .time_nano
            .or_else(|| message.time.map(|s| s.saturating_mul(1_000_000_000)))?;
        let action = match action_text.as_str() {
            "start" => Action::Start,
            "die" => Action::Die {
                exit_code: attributes.get("exitCode").cloned(),
            },
            "oom" => Action::Oom,
            "kill" => Action::Kill,
            "stop" => Action::Stop,
            "destroy" => Action::Destroy,
            "health_status: unhealthy" => Action::Unhealthy,
            _ => Action::Other,
        };
        Some(Event {
            name: attributes
                .get("name")
                .cloned()
                .unwrap_or_else(|| id.clone()),
            image: attributes.get("image").cloned().unwrap_or_default(),
            id,
            action,
            action_text,
            attributes,
            time_nanos,
        })
    }
}
