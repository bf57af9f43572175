//! autoheal's decisions, apart from all I/O: an event, the container's
//! history and the time go in; what to do comes out as [`Step`]s for the
//! runner to carry out (restart now, wake me at, notify, note).
//!
//! The rules, per kind of watched container:
//!
//! - **managed** (`cascade.managed=true`, of this cascade's instance when it
//!   has one): cascade's own, kept running like a restart policy would —
//!   healed on `die`, `oom` or `health_status: unhealthy` whoever stopped
//!   it, unless cascade announced the stop itself ([`Healer::expect_stop`]).
//! - **labelled** (`<label>=true`): healed on `unhealthy`, `oom`, or a `die`
//!   that no `kill`/`stop` preceded since its last `start`. A person's
//!   `docker stop`/`docker kill` is respected — also while a heal waits out
//!   its backoff, which it cancels.
//! - **any** (label `all`, docker-autoheal's mode): every container, healed
//!   on `unhealthy` only, as docker-autoheal does (an exit may be a finished
//!   job); a person's stop cancels a scheduled heal too.
//!
//! A container labelled `autoheal=false` (any case) is never healed.
//!
//! Crash loops (Docker's restart manager, Kubernetes' CrashLoopBackOff):
//! the first failure after a stable run (the container ran `reset_after`)
//! is healed at once; each further one waits `min(cap, base·2ⁿ)` counted
//! from the *previous restart*, so a container that ran longer than its
//! current backoff is still healed at once and only one dying faster waits
//! out the rest. With `max_restarts` set, more failures than that within
//! `window` and autoheal gives up on the container until something else
//! starts it; by default it never gives up (the cap bounds the rate).
//!
//! Invariant: nothing here does I/O or reads a clock; `now` is an argument,
//! and every outcome of the runner's work comes back in as a call.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::event::{Action, Event, Listed, ListedState};
use super::webhook::{Notice, NoticeKind};
use crate::resilience::{Backoff, BackoffConfig, RestartIntensity};

#[cfg(test)]
mod tests;

/// The label that marks a container as cascade's own.
pub const MANAGED_LABEL: &str = "cascade.managed";
/// docker-autoheal's per-container stop timeout label (whole seconds).
pub const STOP_TIMEOUT_LABEL: &str = "autoheal.stop.timeout";
/// docker-autoheal's opt-out: `autoheal=false` is never healed.
pub const OPT_OUT_LABEL: &str = "autoheal";

/// The moment a decision is made: the monotonic instant for backoffs, the
/// wall clock for what reports show.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub at: Instant,
    pub wall: SystemTime,
}

/// Which containers are watched besides cascade's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selection {
    /// Those carrying this label with the value `true`.
    Label(String),
    /// Every container (docker-autoheal's `all`).
    All,
}

/// The settings decisions follow. Replaceable at any time (a reload): the
/// history in the [`Book`] stays.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub selection: Selection,
    pub backoff: BackoffConfig,
    /// `None`: never give up.
    pub max_restarts: Option<u32>,
    pub window: Duration,
    /// When the container has no `autoheal.stop.timeout` label.
    pub stop_timeout: Duration,
    /// `key=value` this cascade's managed containers carry; `None`: any
    /// managed container counts as ours.
    pub instance: Option<(String, String)>,
    /// `key=value` every considered container must also carry (tests).
    pub scope: Option<(String, String)>,
}

/// How a watched container is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Managed,
    Labelled,
    Any,
}

impl Kind {
    /// Whether a person's `docker stop`/`kill` leaves it stopped.
    fn respects_stops(self) -> bool {
        self != Kind::Managed
    }

    /// Whether an exit is a failure to heal (not in `all` mode: an exit
    /// there may be a finished job).
    fn heals_exits(self) -> bool {
        self != Kind::Any
    }
}

fn is_false(value: &str) -> bool {
    value.trim().eq_ignore_ascii_case("false")
}

fn pair(text: &str) -> (String, String) {
    match text.split_once('=') {
        Some((k, v)) => (k.to_owned(), v.to_owned()),
        None => (text.to_owned(), String::new()),
    }
}

impl Policy {
    /// `scope` as `key=value`.
    pub fn scoped(mut self, scope: &str) -> Policy {
        self.scope = Some(pair(scope));
        self
    }

    /// Which kind of watched container these labels make, if any.
    pub fn kind_of(&self, labels: &HashMap<String, String>) -> Option<Kind> {
        if let Some((key, value)) = &self.scope
            && labels.get(key) != Some(value)
        {
            return None;
        }
        if labels.get(OPT_OUT_LABEL).is_some_and(|v| is_false(v)) {
            return None;
        }
        let managed = labels.get(MANAGED_LABEL).is_some_and(|v| v == "true")
            && self
                .instance
                .as_ref()
                .is_none_or(|(key, value)| labels.get(key) == Some(value));
        if managed {
            return Some(Kind::Managed);
        }
        match &self.selection {
            Selection::Label(label) => match labels.get(label) {
                Some(v) if v == "true" => Some(Kind::Labelled),
                _ => None,
            },
            Selection::All => Some(Kind::Any),
        }
    }

    /// The container's `autoheal.stop.timeout`, else the configured one.
    pub fn stop_timeout(&self, name: &str, labels: &HashMap<String, String>) -> Duration {
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

    /// The label filters of a reconnect's container lists (one list each;
    /// `None` lists every container).
    pub fn lists(&self) -> Vec<Option<String>> {
        match &self.selection {
            Selection::All => vec![None],
            Selection::Label(label) => vec![
                Some(format!("{MANAGED_LABEL}=true")),
                Some(format!("{label}=true")),
            ],
        }
    }

    pub fn scope_filter(&self) -> Option<String> {
        self.scope.as_ref().map(|(k, v)| format!("{k}={v}"))
    }
}

/// What the runner is to do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Send this restart request now and report with [`Healer::restarted`].
    Restart(Order),
    /// Call [`Healer::due`] with `id` and `seq` at `at`.
    Wake { id: String, seq: u64, at: Instant },
    /// Post this webhook notification.
    Notify(Notice),
    /// A line for the status feed.
    Note(String),
}

/// One restart request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Order {
    pub id: String,
    pub seq: u64,
    pub name: String,
    pub stop_timeout: Duration,
    /// The failure it heals.
    pub reason: String,
    /// The failure event's daemon time, for the heal latency.
    pub event_nanos: Option<i64>,
}

/// How a restart request ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Restarted; `latency` from the failure event to the request.
    Done {
        latency: Option<Duration>,
    },
    /// The container no longer exists.
    Gone,
    Failed(String),
}

/// Where autoheal is in healing one container.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    /// A restart waits for its backoff (`due` with `seq`).
    Scheduled {
        seq: u64,
        at: Instant,
        wall: SystemTime,
        event_nanos: Option<i64>,
    },
    /// A restart was requested; its own kill/die/stop events are expected
    /// until the container's next `start` (`done`: the request returned).
    Restarting {
        seq: u64,
        done: bool,
    },
}

/// Everything autoheal knows about one container.
#[derive(Debug, Clone)]
struct Record {
    name: String,
    image: String,
    kind: Kind,
    stop_timeout: Duration,
    /// `kill` or `stop` seen since the last start that neither autoheal nor
    /// cascade caused: a person's.
    stop_intent: Option<&'static str>,
    /// The failure being healed, from the decision until the next start.
    wants_heal: Option<String>,
    phase: Phase,
    /// When its current run began (its last `start`).
    started_at: Option<Instant>,
    /// When autoheal last asked for a restart: backoffs count from here.
    last_restart: Option<Instant>,
    /// Heals since the last stable run; the first of a series waits nothing.
    streak: u32,
    backoff: Backoff,
    /// Restart requests within `window`, for `max_restarts`.
    intensity: RestartIntensity,
    restarts: u64,
    gave_up: Option<String>,
    last_heal: Option<String>,
    last_latency: Option<Duration>,
}

/// The event stream's position, to resume after a break without repeats.
#[derive(Debug, Clone, Default)]
pub(crate) struct Position {
    /// Time of the last event seen (or where the live stream began).
    pub cut: Option<i64>,
    /// Identity of the last event, to drop its replay.
    last: Option<(i64, String, String)>,
}

/// autoheal's history: per-container backoff and restart counts, what
/// cascade said it stops itself, and the stream position. Outlives the
/// runner that fills it, so a replaced or restarted runner picks up where
/// the last one was.
#[derive(Debug, Clone, Default)]
pub struct Book {
    containers: HashMap<String, Record>,
    /// Names of containers cascade said it is stopping, until they start.
    expected: HashSet<String>,
    position: Position,
    next_seq: u64,
    heals: u64,
    give_ups: u64,
    /// Daemon time of the last event the stream delivered.
    last_event: Option<SystemTime>,
}

/// Heal counts of one container, for `/status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HealReport {
    /// The container's name.
    pub container: String,
    /// Restarts autoheal made.
    pub restarts: u64,
    /// Why autoheal stopped restarting it, if it did.
    pub gave_up: Option<String>,
    /// When and why it was last restarted.
    pub last_heal: Option<String>,
    /// When a heal waiting out its backoff is due (RFC 3339).
    pub next_heal: Option<String>,
}

/// Decisions over a [`Book`] under a [`Policy`].
pub(crate) struct Healer<'a> {
    pub policy: &'a Policy,
    pub book: &'a mut Book,
}

impl Book {
    /// Where to resume the event stream from.
    pub fn resume_from(&self) -> Option<i64> {
        self.position.cut
    }

    /// Daemon time of the last event seen.
    pub fn last_event(&self) -> Option<SystemTime> {
        self.last_event
    }

    /// Containers watched (known to exist and selected).
    pub fn watched(&self) -> usize {
        self.containers.len()
    }

    /// Restarts made, over all containers.
    pub fn heals(&self) -> u64 {
        self.heals
    }

    /// Containers given up on, ever.
    pub fn give_ups(&self) -> u64 {
        self.give_ups
    }

    /// Every container autoheal has restarted, given up on, or is about to
    /// heal, by name.
    pub fn reports(&self) -> Vec<HealReport> {
        let mut reports: Vec<HealReport> = self
            .containers
            .values()
            .filter(|r| {
                r.restarts > 0 || r.gave_up.is_some() || matches!(r.phase, Phase::Scheduled { .. })
            })
            .map(|r| HealReport {
                container: r.name.clone(),
                restarts: r.restarts,
                gave_up: r.gave_up.clone(),
                last_heal: r.last_heal.clone(),
                next_heal: match r.phase {
                    Phase::Scheduled { wall, .. } => {
                        Some(humantime::format_rfc3339_millis(wall).to_string())
                    }
                    _ => None,
                },
            })
            .collect();
        reports.sort_by(|a, b| a.container.cmp(&b.container));
        reports
    }

    /// For each container's last heal: failure event to restart request.
    pub fn latencies(&self) -> Vec<(String, Duration)> {
        self.containers
            .values()
            .filter_map(|r| Some((r.name.clone(), r.last_latency?)))
            .collect()
    }
}

// === impl Healer ===

impl Healer<'_> {
    /// cascade itself is about to stop, remove or recreate this container:
    /// its die/kill/stop/destroy are not failures until it starts again.
    pub fn expect_stop(&mut self, name: &str) {
        debug!(container = %name, "cascade will stop this container itself.");
        for r in self.book.containers.values_mut().filter(|r| r.name == name) {
            if let Phase::Scheduled { .. } = r.phase {
                r.phase = Phase::Idle;
            }
            r.wants_heal = None;
        }
        self.book.expected.insert(name.to_owned());
    }

    /// A new runner takes over the book (after a restart of the autoheal
    /// actor or a change of its settings): records follow the policy's
    /// backoff and limits, heals that waited out a backoff are woken again
    /// at their time, and restarts whose outcome died with the old runner
    /// are over (the reconnect's list heals what they left unhealed).
    pub fn resume(&mut self) -> Vec<Step> {
        let policy = self.policy;
        let mut steps = Vec::new();
        for (id, r) in &mut self.book.containers {
            r.backoff.set_config(policy.backoff.clone());
            r.intensity.set_limits(limit(policy), policy.window);
            match r.phase {
                Phase::Scheduled { seq, at, .. } => steps.push(Step::Wake {
                    id: id.clone(),
                    seq,
                    at,
                }),
                Phase::Restarting { done: false, .. } => {
                    r.phase = Phase::Idle;
                    r.wants_heal = None;
                }
                Phase::Restarting { done: true, .. } | Phase::Idle => {}
            }
        }
        steps
    }

    /// A connection to the stream: the events missed since the last one
    /// seen, then a list of the watched containers as they are now.
    pub fn connected(
        &mut self,
        replay: Vec<bollard::models::EventMessage>,
        listing: Vec<Listed>,
        live_from: i64,
        now: Now,
    ) -> Vec<Step> {
        let resumed_from = self.book.position.cut;
        let mut steps = Vec::new();
        for message in replay {
            steps.extend(self.message(message, now));
        }
        // A restart whose `start` event was lost with the stream is over.
        for r in self.book.containers.values_mut() {
            if let Phase::Restarting { done: true, .. } = r.phase {
                r.phase = Phase::Idle;
            }
        }
        steps.extend(self.reconcile(listing, resumed_from, now));
        if self.book.position.cut.is_none_or(|cut| cut < live_from) {
            self.book.position.cut = Some(live_from);
        }
        steps
    }

    /// One message from the stream: drops a replayed duplicate, advances
    /// the position, and decides on container events of watched kinds.
    pub fn message(&mut self, message: bollard::models::EventMessage, now: Now) -> Vec<Step> {
        let Some(event) = Event::parse(message) else {
            return Vec::new();
        };
        let key = event.key();
        if let Some(last) = &self.book.position.last
            && (key.0 < last.0 || key == *last)
        {
            return Vec::new();
        }
        self.book.position.cut = Some(event.time_nanos);
        self.book.position.last = Some(key);
        self.book.last_event = Some(system_time(event.time_nanos));
        self.event(event, now)
    }

    /// Decides on one container event.
    pub fn event(&mut self, event: Event, now: Now) -> Vec<Step> {
        let Some(kind) = self.policy.kind_of(&event.attributes) else {
            // Unwatched; or it gained the opt-out label through a re-creation.
            self.book.containers.remove(&event.id);
            return Vec::new();
        };
        if event.action == Action::Destroy {
            self.book.expected.remove(&event.name);
            if self.book.containers.remove(&event.id).is_some() {
                debug!(container = %event.name, "Container removed; forgotten.");
            }
            return Vec::new();
        }
        let expected = self.book.expected.contains(&event.name);
        let policy = self.policy;
        let r = track(
            self.book,
            policy,
            &event.id,
            &event.name,
            &event.image,
            kind,
            &event.attributes,
        );
        let mut steps = Vec::new();
        match &event.action {
            Action::Start => {
                r.stop_intent = None;
                r.wants_heal = None;
                r.started_at = Some(now.at);
                let ours = matches!(r.phase, Phase::Restarting { .. });
                r.phase = Phase::Idle;
                if !ours && r.gave_up.take().is_some() {
                    // Someone else started it: a fresh budget and series.
                    r.intensity = RestartIntensity::new(limit(policy), policy.window);
                    r.streak = 0;
                    r.backoff.reset();
                    info!(container = %event.name, "Container started again; autoheal resumes healing it.");
                    steps.push(Step::Note(format!(
                        "autoheal resumes healing {}: started again",
                        event.name
                    )));
                }
                self.book.expected.remove(&event.name);
                return steps;
            }
            Action::Kill | Action::Stop => {
                // During autoheal's own restart, or cascade's own stop, these
                // are not a person's.
                if matches!(r.phase, Phase::Restarting { .. }) || expected {
                    return steps;
                }
                r.stop_intent = Some(if event.action == Action::Kill {
                    "kill"
                } else {
                    "stop"
                });
                if kind.respects_stops() && matches!(r.phase, Phase::Scheduled { .. }) {
                    r.phase = Phase::Idle;
                    r.wants_heal = None;
                    info!(container = %event.name, "Stopped by a person while its heal waited out the backoff; the heal is cancelled.");
                    steps.push(Step::Note(format!(
                        "autoheal leaves {} stopped: a person stopped it before its heal was due",
                        event.name
                    )));
                }
                return steps;
            }
            Action::Healthy => {
                let waiting_for_health = matches!(r.phase, Phase::Scheduled { .. })
                    && r.wants_heal
                        .as_deref()
                        .is_some_and(|w| w.starts_with("unhealthy"));
                if waiting_for_health {
                    r.phase = Phase::Idle;
                    r.wants_heal = None;
                    info!(container = %event.name, "Healthy again before its heal was due; the heal is cancelled.");
                    steps.push(Step::Note(format!(
                        "autoheal leaves {} running: healthy again before its heal was due",
                        event.name
                    )));
                }
                return steps;
            }
            // Already being healed (the die of an `oom`, of our own restart,
            // or of an unhealthy container waiting out its backoff).
            Action::Die { .. } if r.phase != Phase::Idle => return steps,
            Action::Die { exit_code } => {
                if expected {
                    info!(container = %event.name, "Container stopped by cascade; not healing.");
                    return steps;
                }
                if kind.respects_stops()
                    && let Some(intent) = r.stop_intent
                {
                    info!(container = %event.name, %intent, "Container stopped on purpose; leaving it stopped.");
                    return steps;
                }
                if !kind.heals_exits() {
                    debug!(container = %event.name, "Exited; `all` mode heals health only.");
                    return steps;
                }
                let reason = match exit_code {
                    Some(code) => format!("died (exit code {code})"),
                    None => "died".to_owned(),
                };
                steps.extend(self.failure(&event.id, reason, Some(event.time_nanos), now));
            }
            Action::Oom if kind.heals_exits() => {
                steps.extend(self.failure(
                    &event.id,
                    "out of memory".into(),
                    Some(event.time_nanos),
                    now,
                ));
            }
            Action::Unhealthy => {
                steps.extend(self.failure(
                    &event.id,
                    "unhealthy".into(),
                    Some(event.time_nanos),
                    now,
                ));
            }
            Action::Oom | Action::Destroy | Action::Other => {}
        }
        steps
    }

    /// The container needs a restart: now, when its backoff from the
    /// previous restart runs out, or never again if it is past
    /// `max_restarts`.
    fn failure(
        &mut self,
        id: &str,
        reason: String,
        event_nanos: Option<i64>,
        now: Now,
    ) -> Vec<Step> {
        let policy = self.policy;
        let expected = &self.book.expected;
        let Some(r) = self.book.containers.get_mut(id) else {
            return Vec::new();
        };
        if expected.contains(&r.name) || r.gave_up.is_some() || r.phase != Phase::Idle {
            debug!(container = %r.name, %reason, "Not healing: stopped by cascade, given up, or already healing.");
            return Vec::new();
        }
        r.wants_heal = Some(reason.clone());
        let stable = r
            .started_at
            .is_some_and(|s| now.at.saturating_duration_since(s) >= policy.backoff.reset_after);
        if stable {
            r.streak = 0;
            r.backoff.reset();
        }
        if let Some(max) = policy.max_restarts
            && r.intensity.count(now.at) >= max
        {
            let count = r.intensity.count(now.at);
            let why = format!(
                "gave up after {count} restart{} within {} (max_restarts = {max}); last failure: {reason}",
                if count == 1 { "" } else { "s" },
                crate::text::duration(policy.window)
            );
            warn!(container = %r.name, id = %id, restarts = r.restarts, %reason, "Autoheal gives up on this container.");
            r.gave_up = Some(why.clone());
            r.wants_heal = None;
            self.book.give_ups += 1;
            let notice = notice(NoticeKind::GiveUp, id, r, why.clone(), now);
            let note = format!("autoheal gave up on {}: {why}", r.name);
            return vec![Step::Notify(notice), Step::Note(note)];
        }
        let delay = if r.streak == 0 {
            Duration::ZERO
        } else {
            r.backoff.next_delay()
        };
        let due = r.last_restart.map_or(now.at, |last| {
            crate::resilience::saturating_add(last, delay)
        });
        if due <= now.at {
            info!(container = %r.name, id = %id, %reason, "Healing container.");
            return vec![Step::Restart(self.issue(id, event_nanos, now))];
        }
        let wait = due.saturating_duration_since(now.at);
        self.book.next_seq += 1;
        let seq = self.book.next_seq;
        let Some(r) = self.book.containers.get_mut(id) else {
            return Vec::new();
        };
        info!(container = %r.name, id = %id, %reason, wait = %crate::text::duration(wait),
            streak = r.streak, "Healing container after its backoff (it keeps failing soon after each restart).");
        r.phase = Phase::Scheduled {
            seq,
            at: due,
            wall: now.wall.checked_add(wait).unwrap_or(now.wall),
            event_nanos,
        };
        let note = format!(
            "autoheal restarts {} in {}: {reason} again soon after its last restart",
            r.name,
            crate::text::duration(wait)
        );
        vec![
            Step::Wake {
                id: id.to_owned(),
                seq,
                at: due,
            },
            Step::Note(note),
        ]
    }

    /// A backoff ran out.
    pub fn due(&mut self, id: &str, seq: u64, now: Now) -> Vec<Step> {
        let expected = &self.book.expected;
        let Some(r) = self.book.containers.get_mut(id) else {
            return Vec::new();
        };
        let Phase::Scheduled {
            seq: pending,
            event_nanos,
            ..
        } = r.phase
        else {
            return Vec::new();
        };
        if pending != seq {
            return Vec::new();
        }
        // Cancelled on the event already; checked again so no path through
        // here can override a person or cascade.
        if (r.kind.respects_stops() && r.stop_intent.is_some()) || expected.contains(&r.name) {
            r.phase = Phase::Idle;
            r.wants_heal = None;
            return Vec::new();
        }
        vec![Step::Restart(self.issue(id, event_nanos, now))]
    }

    fn issue(&mut self, id: &str, event_nanos: Option<i64>, now: Now) -> Order {
        self.book.next_seq += 1;
        let seq = self.book.next_seq;
        let r = self
            .book
            .containers
            .get_mut(id)
            .expect("issue is called for a tracked container");
        r.phase = Phase::Restarting { seq, done: false };
        r.streak = r.streak.saturating_add(1);
        r.last_restart = Some(now.at);
        r.intensity.record(now.at);
        Order {
            id: id.to_owned(),
            seq,
            name: r.name.clone(),
            stop_timeout: r.stop_timeout,
            reason: r.wants_heal.clone().unwrap_or_else(|| "failed".into()),
            event_nanos,
        }
    }

    /// A restart request finished.
    pub fn restarted(&mut self, order: &Order, outcome: Outcome, now: Now) -> Vec<Step> {
        let id = order.id.as_str();
        let Some(r) = self.book.containers.get_mut(id) else {
            return Vec::new();
        };
        let current = matches!(r.phase, Phase::Restarting { seq, .. } if seq == order.seq);
        let reason = &order.reason;
        match outcome {
            Outcome::Done { latency } => {
                r.restarts += 1;
                self.book.heals += 1;
                r.last_heal = Some(format!(
                    "{} ({reason})",
                    humantime::format_rfc3339_millis(now.wall)
                ));
                r.last_latency = latency;
                // Its own kill/die/stop events may still be on their way: they
                // stay ours until the container's `start`.
                if current {
                    r.phase = Phase::Restarting {
                        seq: order.seq,
                        done: true,
                    };
                }
                info!(
                    container = %r.name, id = %id, restarts = r.restarts, %reason,
                    latency_ms = latency.map(|l| l.as_secs_f64() * 1e3),
                    "Container restarted."
                );
                let notice = notice(NoticeKind::Restart, id, r, reason.clone(), now);
                let note = format!("autoheal restarted {}: {reason}", r.name);
                vec![Step::Notify(notice), Step::Note(note)]
            }
            Outcome::Gone => {
                info!(container = %r.name, id = %id, "Container is gone; nothing to heal.");
                self.book.containers.remove(id);
                Vec::new()
            }
            Outcome::Failed(error) => {
                warn!(container = %r.name, id = %id, %error, "Restart failed.");
                if current {
                    r.phase = Phase::Idle;
                }
                let notice = notice(
                    NoticeKind::RestartFailed,
                    id,
                    r,
                    format!("{reason}; restart failed: {error}"),
                    now,
                );
                let mut steps = vec![Step::Notify(notice)];
                steps.extend(self.failure(id, format!("restart failed: {error}"), None, now));
                steps
            }
        }
    }

    /// After a (re)connection: heals what the replay could not show —
    /// containers unhealthy now, and containers that exited while the
    /// stream was down (or whose heal failed) without a person's stop — and
    /// forgets containers that no longer exist.
    fn reconcile(
        &mut self,
        listing: Vec<Listed>,
        resumed_from: Option<i64>,
        now: Now,
    ) -> Vec<Step> {
        let policy = self.policy;
        let present: HashSet<&str> = listing.iter().map(|l| l.id.as_str()).collect();
        self.book
            .containers
            .retain(|id, _| present.contains(id.as_str()));
        let mut steps = Vec::new();
        for listed in &listing {
            let Some(kind) = policy.kind_of(&listed.labels) else {
                continue;
            };
            let r = track(
                self.book,
                policy,
                &listed.id,
                &listed.name,
                &listed.image,
                kind,
                &listed.labels,
            );
            match listed.state {
                ListedState::Running { unhealthy } => {
                    if unhealthy {
                        steps.extend(self.failure(
                            &listed.id,
                            "unhealthy (found on reconnect)".into(),
                            None,
                            now,
                        ));
                    } else {
                        r.wants_heal = None;
                    }
                }
                ListedState::Exited => {
                    let Some(cut) = resumed_from else {
                        // First connection: nobody knows why it exited.
                        continue;
                    };
                    let died_meanwhile = listed.finished_at.is_some_and(|at| at >= cut);
                    let unhealed = r.wants_heal.is_some() && r.phase == Phase::Idle;
                    let on_purpose = kind.respects_stops() && r.stop_intent.is_some();
                    if kind.heals_exits() && (unhealed || (died_meanwhile && !on_purpose)) {
                        steps.extend(self.failure(
                            &listed.id,
                            "exited while the event stream was down".into(),
                            None,
                            now,
                        ));
                    }
                }
                ListedState::Other => {}
            }
        }
        steps
    }
}

/// The container with this id, tracked from now on.
fn track<'b>(
    book: &'b mut Book,
    policy: &Policy,
    id: &str,
    name: &str,
    image: &str,
    kind: Kind,
    labels: &HashMap<String, String>,
) -> &'b mut Record {
    book.containers
        .entry(id.to_owned())
        .or_insert_with(|| Record {
            name: name.to_owned(),
            image: image.to_owned(),
            kind,
            stop_timeout: policy.stop_timeout(name, labels),
            stop_intent: None,
            wants_heal: None,
            phase: Phase::Idle,
            started_at: None,
            last_restart: None,
            streak: 0,
            backoff: Backoff::new(policy.backoff.clone()),
            intensity: RestartIntensity::new(limit(policy), policy.window),
            restarts: 0,
            gave_up: None,
            last_heal: None,
            last_latency: None,
        })
}

/// `max_restarts` for the intensity counter, which only counts when unset.
fn limit(policy: &Policy) -> u32 {
    policy.max_restarts.unwrap_or(u32::MAX)
}

fn notice(event: NoticeKind, id: &str, r: &Record, reason: String, now: Now) -> Notice {
    Notice {
        event,
        container: r.name.clone(),
        id: id.to_owned(),
        image: r.image.clone(),
        reason,
        restarts: r.restarts,
        time: now.wall,
    }
}

fn system_time(nanos: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}
