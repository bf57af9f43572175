//! Every decision without an engine: events are built by hand, time is an
//! argument, and the steps that come out are the assertions.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bollard::models::{EventActor, EventMessage};
use tokio::time::Instant;

use super::*;
use crate::autoheal::event::{Listed, ListedState};
use crate::resilience::{BackoffConfig, Jitter};

const ID: &str = "c0ffee";
const NAME: &str = "svc";

/// A policy, a book, a clock, and the daemon's event time.
struct World {
    policy: Policy,
    book: Book,
    t0: Instant,
    wall0: SystemTime,
    /// Time since `t0`.
    clock: Duration,
    /// Daemon time of the last event sent (ns), strictly increasing.
    nanos: i64,
}

fn backoff(base_ms: u64, cap_ms: u64, reset_ms: u64) -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_millis(base_ms),
        cap: Duration::from_millis(cap_ms),
        reset_after: Duration::from_millis(reset_ms),
        jitter: Jitter::None,
    }
}

impl World {
    /// The defaults: label `autoheal`, backoff 1 s doubling to 5 min counted
    /// from the previous restart, reset after 10 s up, never give up.
    fn new() -> World {
        World {
            policy: Policy {
                selection: Selection::Label("autoheal".into()),
                backoff: backoff(1_000, 300_000, 10_000),
                max_restarts: None,
                window: Duration::from_secs(600),
                stop_timeout: Duration::from_secs(10),
                instance: None,
                scope: None,
            },
            book: Book::default(),
            t0: Instant::now(),
            wall0: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            clock: Duration::ZERO,
            nanos: 1_800_000_000_000_000_000,
        }
    }

    fn with(mut self, tune: impl FnOnce(&mut Policy)) -> World {
        tune(&mut self.policy);
        self
    }

    fn now(&self) -> Now {
        Now {
            at: self.t0 + self.clock,
            wall: self.wall0 + self.clock,
        }
    }

    /// Moves the clock (and the daemon's clock) forward.
    fn pass(&mut self, d: Duration) {
        self.clock += d;
        self.nanos += i64::try_from(d.as_nanos()).expect("small");
    }

    fn healer(&mut self) -> Healer<'_> {
        Healer {
            policy: &self.policy,
            book: &mut self.book,
        }
    }

    fn message(&mut self, id: &str, action: &str, labels: &[(&str, &str)]) -> EventMessage {
        self.nanos += 1;
        let mut attributes: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        attributes.insert("name".into(), format!("{NAME}-{id}"));
        attributes.insert("image".into(), "img:1".into());
        EventMessage {
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some(id.to_owned()),
                attributes: Some(attributes),
            }),
            time_nano: Some(self.nanos),
            ..EventMessage::default()
        }
    }

    /// One event for a container with `labels`.
    fn event_of(&mut self, id: &str, action: &str, labels: &[(&str, &str)]) -> Vec<Step> {
        let message = self.message(id, action, labels);
        let now = self.now();
        self.healer().message(message, now)
    }

    /// One event for the labelled container `ID`.
    fn event(&mut self, action: &str) -> Vec<Step> {
        self.event_of(ID, action, &[("autoheal", "true")])
    }

    fn done(&mut self, order: &Order) -> Vec<Step> {
        let now = self.now();
        self.healer().restarted(
            order,
            Outcome::Done {
                latency: Some(Duration::from_millis(3)),
            },
            now,
        )
    }

    fn due(&mut self, id: &str, seq: u64) -> Vec<Step> {
        let now = self.now();
        self.healer().due(id, seq, now)
    }

    /// Runs one whole heal of `ID` for the failure `action` (which must be
    /// healed at once): restart request, its events, its `start`.
    fn heal_now(&mut self, action: &str) -> Order {
        let steps = self.event(action);
        let order = restart(&steps).unwrap_or_else(|| panic!("healed at once: {steps:?}"));
        self.complete(&order);
        order
    }

    /// The restart's own events and the container's new start.
    fn complete(&mut self, order: &Order) {
        for action in ["kill", "die", "stop"] {
            assert_eq!(self.event(action), [], "autoheal's own {action}");
        }
        let after = self.done(order);
        assert!(
            matches!(after[..], [Step::Notify(_), Step::Note(_)]),
            "{after:?}"
        );
        assert_eq!(self.event("start"), []);
    }

    fn report(&self) -> Option<HealReport> {
        self.book
            .reports()
            .into_iter()
            .find(|r| r.container == format!("{NAME}-{ID}"))
    }
}

fn restart(steps: &[Step]) -> Option<Order> {
    steps.iter().find_map(|s| match s {
        Step::Restart(order) => Some(order.clone()),
        _ => None,
    })
}

fn wake(steps: &[Step]) -> Option<(u64, Instant)> {
    steps.iter().find_map(|s| match s {
        Step::Wake { seq, at, .. } => Some((*seq, *at)),
        _ => None,
    })
}

fn notices(steps: &[Step]) -> Vec<NoticeKind> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Notify(n) => Some(n.event),
            _ => None,
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

// === which containers ===

#[test]
fn kinds_come_from_labels_instance_scope_and_the_opt_out() {
    let w = World::new();
    let p = &w.policy;
    assert_eq!(
        p.kind_of(&labels(&[(MANAGED_LABEL, "true")])),
        Some(Kind::Managed)
    );
    assert_eq!(
        p.kind_of(&labels(&[("autoheal", "true")])),
        Some(Kind::Labelled)
    );
    assert_eq!(p.kind_of(&labels(&[("autoheal", "false")])), None);
    assert_eq!(p.kind_of(&labels(&[("autoheal", "yes")])), None);
    assert_eq!(p.kind_of(&labels(&[("other", "true")])), None);
    // docker-autoheal's opt-out wins over everything, in any case.
    assert_eq!(
        p.kind_of(&labels(&[(MANAGED_LABEL, "true"), ("autoheal", "False")])),
        None
    );

    let scoped = p.clone().scoped("scope=a");
    assert_eq!(scoped.kind_of(&labels(&[("autoheal", "true")])), None);
    assert_eq!(
        scoped.kind_of(&labels(&[("autoheal", "true"), ("scope", "a")])),
        Some(Kind::Labelled)
    );

    // With an instance, only this cascade's managed containers are its own;
    // another cascade's are treated like anyone's (by their labels).
    let mine = Policy {
        instance: Some(("cascade.instance".into(), "me".into())),
        ..p.clone()
    };
    assert_eq!(
        mine.kind_of(&labels(&[
            (MANAGED_LABEL, "true"),
            ("cascade.instance", "me")
        ])),
        Some(Kind::Managed)
    );
    assert_eq!(
        mine.kind_of(&labels(&[
            (MANAGED_LABEL, "true"),
            ("cascade.instance", "other")
        ])),
        None
    );
    assert_eq!(
        mine.kind_of(&labels(&[
            (MANAGED_LABEL, "true"),
            ("cascade.instance", "other"),
            ("autoheal", "true")
        ])),
        Some(Kind::Labelled)
    );

    let all = Policy {
        selection: Selection::All,
        ..p.clone()
    };
    assert_eq!(all.kind_of(&labels(&[])), Some(Kind::Any));
    assert_eq!(all.kind_of(&labels(&[("autoheal", "FALSE")])), None);
    assert_eq!(
        all.kind_of(&labels(&[(MANAGED_LABEL, "true")])),
        Some(Kind::Managed)
    );
}

#[test]
fn stop_timeouts_come_from_the_label_else_the_setting() {
    let w = World::new();
    let p = &w.policy;
    assert_eq!(
        p.stop_timeout("c", &labels(&[(STOP_TIMEOUT_LABEL, "7")])),
        7 * S
    );
    assert_eq!(
        p.stop_timeout("c", &labels(&[(STOP_TIMEOUT_LABEL, "soon")])),
        p.stop_timeout
    );
    assert_eq!(p.stop_timeout("c", &labels(&[])), p.stop_timeout);

    let mut w = World::new();
    let steps = w.event_of(
        ID,
        "die",
        &[("autoheal", "true"), (STOP_TIMEOUT_LABEL, "3")],
    );
    assert_eq!(restart(&steps).expect("healed").stop_timeout, 3 * S);
}

#[test]
fn lists_cover_what_is_watched() {
    let w = World::new();
    assert_eq!(
        w.policy.lists(),
        [
            Some("cascade.managed=true".to_owned()),
            Some("autoheal=true".to_owned())
        ]
    );
    let all = World::new().with(|p| p.selection = Selection::All);
    assert_eq!(all.policy.lists(), [None]);
}

#[test]
fn events_parse_from_docker_json() {
    let json = r#"{"status":"health_status: unhealthy","id":"8a50","from":"img","Type":"container",
        "Action":"health_status: unhealthy","Actor":{"ID":"8a50","Attributes":{"autoheal":"true",
        "image":"img","name":"svc"}},"scope":"local","time":1795356612,"timeNano":1795356612372261958}"#;
    let message: EventMessage = serde_json::from_str(json).expect("event json");
    let event = Event::parse(message).expect("parses");
    assert_eq!(event.action, Action::Unhealthy);
    assert_eq!(event.name, "svc");
    assert_eq!(event.image, "img");
    assert_eq!(event.time_nanos, 1_795_356_612_372_261_958);

    let die = r#"{"Type":"container","Action":"die","Actor":{"ID":"x","Attributes":{"exitCode":"137"}},"time":5}"#;
    let event = Event::parse(serde_json::from_str(die).expect("json")).expect("parses");
    assert_eq!(
        event.action,
        Action::Die {
            exit_code: Some("137".into())
        }
    );
    assert_eq!(event.time_nanos, 5_000_000_000);
    assert_eq!(event.name, "x");

    let healthy = r#"{"Action":"health_status: healthy","Actor":{"ID":"x"},"time":5}"#;
    let event = Event::parse(serde_json::from_str(healthy).expect("json")).expect("parses");
    assert_eq!(event.action, Action::Healthy);
    let timeless = r#"{"Action":"die","Actor":{"ID":"x"}}"#;
    assert!(Event::parse(serde_json::from_str(timeless).expect("json")).is_none());
}

#[test]
fn unwatched_containers_are_ignored() {
    let mut w = World::new();
    assert_eq!(w.event_of("other", "die", &[]), []);
    assert_eq!(w.event_of("other", "die", &[("autoheal", "false")]), []);
    assert_eq!(w.book.watched(), 0);
}

// === what is a failure ===

#[test]
fn a_crash_unhealthy_or_oom_is_healed_at_once() {
    let mut w = World::new();
    let steps = w.event_of(ID, "die", &[("autoheal", "true"), ("exitCode", "3")]);
    let order = restart(&steps).expect("healed");
    assert_eq!(order.reason, "died (exit code 3)");
    assert_eq!(order.name, format!("{NAME}-{ID}"));
    assert_eq!(order.event_nanos, Some(w.nanos));
    w.complete(&order);

    w.pass(30 * S);
    let order = restart(&w.event("health_status: unhealthy")).expect("healed");
    assert_eq!(order.reason, "unhealthy");
    w.complete(&order);

    w.pass(30 * S);
    let order = restart(&w.event("oom")).expect("healed");
    assert_eq!(order.reason, "out of memory");
    // The die that follows the oom is the same failure.
    assert_eq!(w.event("die"), []);
    w.complete(&order);
    assert_eq!(w.report().expect("report").restarts, 3);
    assert_eq!(w.book.heals(), 3);
}

#[test]
fn a_person_stopping_or_killing_a_labelled_container_is_respected() {
    for intent in [&["kill", "die", "stop"][..], &["stop", "die"][..]] {
        let mut w = World::new();
        w.event("start");
        for action in intent {
            assert_eq!(w.event(action), [], "{intent:?}: {action}");
        }
        // Until it starts again.
        w.pass(30 * S);
        w.event("start");
        w.pass(30 * S);
        assert!(restart(&w.event("die")).is_some(), "{intent:?}");
    }
}

#[test]
fn managed_containers_are_kept_running_whoever_stopped_them() {
    let mut w = World::new();
    let managed = [(MANAGED_LABEL, "true")];
    w.event_of(ID, "start", &managed);
    assert_eq!(w.event_of(ID, "kill", &managed), []);
    let steps = w.event_of(ID, "die", &managed);
    assert!(restart(&steps).is_some(), "{steps:?}");
}

#[test]
fn what_cascade_stops_itself_is_not_healed_until_it_starts_again() {
    let mut w = World::new();
    let managed = [(MANAGED_LABEL, "true")];
    w.event_of(ID, "start", &managed);
    w.healer().expect_stop(&format!("{NAME}-{ID}"));
    for action in ["kill", "die", "stop"] {
        assert_eq!(w.event_of(ID, action, &managed), [], "{action}");
    }
    w.pass(30 * S);
    w.event_of(ID, "start", &managed);
    w.pass(30 * S);
    assert!(restart(&w.event_of(ID, "die", &managed)).is_some());
}

#[test]
fn expect_stop_cancels_a_scheduled_heal() {
    let mut w = World::new();
    w.heal_now("die");
    let (seq, _) = wake(&w.event("die")).expect("crash loop waits");
    w.healer().expect_stop(&format!("{NAME}-{ID}"));
    w.pass(10 * S);
    assert_eq!(w.due(ID, seq), []);
}

#[test]
fn in_all_mode_only_health_is_healed() {
    let mut w = World::new().with(|p| p.selection = Selection::All);
    assert_eq!(
        w.event_of(ID, "die", &[]),
        [],
        "an exit may be a finished job"
    );
    assert_eq!(w.event_of(ID, "oom", &[]), []);
    assert!(restart(&w.event_of(ID, "health_status: unhealthy", &[])).is_some());
    assert_eq!(
        w.event_of(
            "optout",
            "health_status: unhealthy",
            &[("autoheal", "False")]
        ),
        []
    );
}

#[test]
fn a_recovered_container_is_not_restarted() {
    let mut w = World::new();
    w.heal_now("health_status: unhealthy");
    let steps = w.event("health_status: unhealthy");
    let (seq, _) = wake(&steps).expect("second failure soon after: backoff");
    let notes = w.event("health_status: healthy");
    assert!(matches!(notes[..], [Step::Note(_)]), "{notes:?}");
    w.pass(10 * S);
    assert_eq!(w.due(ID, seq), []);
    assert!(w.report().expect("report").next_heal.is_none());
}

// === when: backoff counted from the previous restart ===

#[test]
fn a_container_turning_unhealthy_12s_after_each_start_is_healed_at_once_every_time() {
    let mut w = World::new();
    w.event("start");
    for heal in 0..12 {
        w.pass(12 * S);
        let steps = w.event("health_status: unhealthy");
        assert!(restart(&steps).is_some(), "heal {heal} waited: {steps:?}");
        let order = restart(&steps).expect("restart");
        w.pass(300 * MS);
        w.complete(&order);
    }
    assert_eq!(w.report().expect("report").restarts, 12);
    assert!(w.book.give_ups() == 0);
}

#[test]
fn a_container_dying_100ms_after_each_start_waits_out_a_doubling_backoff_to_the_cap() {
    let mut w = World::new();
    w.event("start");
    let mut waits = Vec::new();
    for _ in 0..14 {
        w.pass(100 * MS);
        let steps = w.event("die");
        let order = match restart(&steps) {
            Some(order) => {
                waits.push(Duration::ZERO);
                order
            }
            None => {
                let (seq, at) = wake(&steps).expect("a wake");
                let wait = at - w.now().at;
                waits.push(wait);
                w.pass(wait);
                restart(&w.due(ID, seq)).expect("restarted when due")
            }
        };
        w.complete(&order);
    }
    // From the previous restart: 0, 1, 2, 4, ... s; the container ran
    // 100 ms of each, so it waits 100 ms less; the cap is 5 min.
    let expected: Vec<Duration> = [0u32, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300]
        .iter()
        .map(|s| (S * *s).saturating_sub(100 * MS))
        .collect();
    assert_eq!(waits, expected);
    assert_eq!(w.book.give_ups(), 0, "never gives up by default");
}

#[test]
fn a_container_that_ran_longer_than_its_current_backoff_is_healed_at_once() {
    // Up 5 s each time (< reset_after 10 s): a series, but each heal is
    // due 1, 2, 4 s after the previous restart — already past — until the
    // backoff (8 s) outgrows the run.
    let mut w = World::new();
    w.event("start");
    let mut at_once = 0;
    loop {
        w.pass(5 * S);
        let steps = w.event("die");
        match restart(&steps) {
            Some(order) => {
                at_once += 1;
                w.complete(&order);
            }
            None => {
                let (_, at) = wake(&steps).expect("a wake");
                assert_eq!(at - w.now().at, 3 * S, "8 s from the previous restart");
                break;
            }
        }
    }
    assert_eq!(at_once, 4);
}

#[test]
fn a_stable_run_starts_a_new_series() {
    let mut w = World::new();
    w.event("start");
    for _ in 0..5 {
        w.pass(100 * MS);
        let steps = w.event("die");
        let order = match restart(&steps) {
            Some(order) => order,
            None => {
                let (seq, at) = wake(&steps).expect("a wake");
                w.pass(at - w.now().at);
                restart(&w.due(ID, seq)).expect("due")
            }
        };
        w.complete(&order);
    }
    w.pass(11 * S);
    assert!(
        restart(&w.event("die")).is_some(),
        "ran 11 s: healed at once"
    );
}

#[test]
fn a_stale_or_unknown_wake_does_nothing() {
    let mut w = World::new();
    w.heal_now("die");
    let (seq, _) = wake(&w.event("die")).expect("backoff");
    assert_eq!(w.due(ID, seq + 100), []);
    assert_eq!(w.due("nobody", seq), []);
    w.pass(S);
    assert!(restart(&w.due(ID, seq)).is_some());
    assert_eq!(w.due(ID, seq), [], "only once");
}

// === never override a person ===

#[test]
fn a_person_stopping_a_container_cancels_its_scheduled_heal() {
    for stop in [&["kill", "die", "stop"][..], &["stop"][..], &["kill"][..]] {
        let mut w = World::new();
        w.heal_now("health_status: unhealthy");
        w.pass(500 * MS);
        let steps = w.event("health_status: unhealthy");
        let (seq, _) = wake(&steps).expect("waits out its backoff");
        assert!(w.report().expect("report").next_heal.is_some());
        let mut notes = Vec::new();
        for action in stop {
            notes.extend(w.event(action));
        }
        assert!(
            matches!(&notes[..], [Step::Note(n)] if n.contains("a person stopped it")),
            "{stop:?}: {notes:?}"
        );
        w.pass(10 * S);
        assert_eq!(w.due(ID, seq), [], "{stop:?}: the heal was due");
        assert!(w.report().expect("report").next_heal.is_none());
        assert_eq!(w.report().expect("report").restarts, 1);
    }
}

#[test]
fn a_person_starting_a_container_cancels_its_scheduled_heal() {
    let mut w = World::new();
    w.heal_now("die");
    let (seq, _) = wake(&w.event("die")).expect("backoff");
    w.event("start");
    w.pass(10 * S);
    assert_eq!(w.due(ID, seq), []);
}

#[test]
fn a_managed_container_keeps_its_scheduled_heal_through_a_stop() {
    let mut w = World::new();
    let managed = [(MANAGED_LABEL, "true")];
    w.event_of(ID, "start", &managed);
    let order = restart(&w.event_of(ID, "die", &managed)).expect("healed");
    for action in ["kill", "die", "stop"] {
        w.event_of(ID, action, &managed);
    }
    w.done(&order);
    w.event_of(ID, "start", &managed);
    let (seq, _) = wake(&w.event_of(ID, "die", &managed)).expect("backoff");
    w.event_of(ID, "stop", &managed);
    w.pass(10 * S);
    assert!(restart(&w.due(ID, seq)).is_some());
}

#[test]
fn in_all_mode_a_person_cancels_a_scheduled_heal_too() {
    let mut w = World::new().with(|p| p.selection = Selection::All);
    w.event_of(ID, "start", &[]);
    let order = restart(&w.event_of(ID, "health_status: unhealthy", &[])).expect("healed");
    w.done(&order);
    w.event_of(ID, "start", &[]);
    w.pass(500 * MS);
    let (seq, _) = wake(&w.event_of(ID, "health_status: unhealthy", &[])).expect("backoff");
    w.event_of(ID, "kill", &[]);
    w.pass(10 * S);
    assert_eq!(w.due(ID, seq), []);
}

// === giving up, opt-in ===

#[test]
fn max_restarts_gives_up_stating_the_true_count_and_resumes_after_a_start() {
    let mut w = World::new().with(|p| {
        p.max_restarts = Some(2);
        p.window = Duration::from_secs(60);
        p.backoff = backoff(100, 1_000, 10_000);
    });
    w.event("start");
    for _ in 0..2 {
        w.pass(S);
        let steps = w.event("die");
        let order = restart(&steps).expect("ran 1 s > backoff: at once");
        w.complete(&order);
    }
    w.pass(S);
    let steps = w.event("die");
    assert_eq!(notices(&steps), [NoticeKind::GiveUp]);
    let report = w.report().expect("report");
    assert_eq!(report.restarts, 2);
    let why = report.gave_up.expect("gave up");
    assert!(
        why.starts_with("gave up after 2 restarts within 1m (max_restarts = 2)"),
        "{why}"
    );
    assert!(why.ends_with("last failure: died"), "{why}");
    assert_eq!(w.book.give_ups(), 1);
    // Given up: nothing more, until someone else starts it.
    assert_eq!(w.event("die"), []);
    let resumed = w.event("start");
    assert!(matches!(resumed[..], [Step::Note(_)]), "{resumed:?}");
    assert!(w.report().expect("report").gave_up.is_none());
    w.pass(S);
    assert!(restart(&w.event("die")).is_some(), "a fresh budget");
}

#[test]
fn restarts_older_than_the_window_do_not_count() {
    let mut w = World::new().with(|p| {
        p.max_restarts = Some(2);
        p.window = Duration::from_secs(60);
    });
    w.event("start");
    for _ in 0..6 {
        w.pass(40 * S);
        let order = restart(&w.event("die")).expect("at most 2 within any minute");
        w.complete(&order);
    }
    assert_eq!(w.book.give_ups(), 0);
}

// === restart outcomes ===

#[test]
fn a_failed_restart_is_notified_and_retried_after_the_backoff() {
    let mut w = World::new();
    let order = restart(&w.event("die")).expect("healed");
    let now = w.now();
    let steps = w
        .healer()
        .restarted(&order, Outcome::Failed("HTTP 500".into()), now);
    assert_eq!(notices(&steps), [NoticeKind::RestartFailed]);
    let (seq, at) = wake(&steps).expect("retried after a backoff, not at once");
    assert_eq!(at - w.now().at, S);
    w.pass(S);
    let retry = restart(&w.due(ID, seq)).expect("retried");
    assert_eq!(retry.reason, "restart failed: HTTP 500");
}

#[test]
fn a_container_gone_before_its_restart_is_forgotten() {
    let mut w = World::new();
    let order = restart(&w.event("die")).expect("healed");
    assert_eq!(w.book.watched(), 1);
    let now = w.now();
    assert_eq!(w.healer().restarted(&order, Outcome::Gone, now), []);
    assert_eq!(w.book.watched(), 0);
}

#[test]
fn a_destroyed_container_is_forgotten() {
    let mut w = World::new();
    w.event("start");
    w.event_of("other", "start", &[("autoheal", "true")]);
    assert_eq!(w.book.watched(), 2);
    w.event("destroy");
    assert_eq!(w.book.watched(), 1);
}

// === the stream ===

#[test]
fn replayed_and_older_events_are_dropped_and_the_position_advances() {
    let mut w = World::new();
    let message = w.message(ID, "die", &[("autoheal", "true")]);
    let now = w.now();
    assert!(restart(&w.healer().message(message.clone(), now)).is_some());
    assert_eq!(w.healer().message(message.clone(), now), [], "a replay");
    assert_eq!(w.book.resume_from(), message.time_nano);
    assert_eq!(
        w.book.last_event(),
        Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(w.nanos as u64))
    );
    let mut older = message;
    older.time_nano = older.time_nano.map(|t| t - 10);
    assert_eq!(w.healer().message(older, now), []);
}

fn listed(id: &str, state: ListedState, finished_at: Option<i64>) -> Listed {
    Listed {
        id: id.to_owned(),
        name: format!("{NAME}-{id}"),
        image: "img:1".into(),
        labels: labels(&[("autoheal", "true")]),
        state,
        finished_at,
    }
}

#[test]
fn the_first_connection_heals_only_what_is_unhealthy_now() {
    let mut w = World::new();
    let now = w.now();
    let listing = vec![
        listed("sick", ListedState::Running { unhealthy: true }, None),
        listed("fine", ListedState::Running { unhealthy: false }, None),
        listed("exited", ListedState::Exited, Some(w.nanos - 1)),
    ];
    let live = w.nanos;
    let steps = w.healer().connected(Vec::new(), listing, live, now);
    let orders: Vec<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Restart(o) => Some(o.id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(orders, ["sick"]);
    assert_eq!(w.book.watched(), 3);
    assert_eq!(w.book.resume_from(), Some(w.nanos));
}

#[test]
fn a_reconnect_heals_what_exited_meanwhile_unless_a_person_stopped_it() {
    let mut w = World::new();
    w.event_of("crashed", "start", &[("autoheal", "true")]);
    w.event_of("stopped", "start", &[("autoheal", "true")]);
    w.event_of("stopped", "kill", &[("autoheal", "true")]);
    w.event_of("before", "start", &[("autoheal", "true")]);
    w.event_of("removed", "start", &[("autoheal", "true")]);
    let cut = w.nanos;
    w.pass(30 * S);
    let now = w.now();
    let listing = vec![
        listed("crashed", ListedState::Exited, Some(cut + 5)),
        listed("stopped", ListedState::Exited, Some(cut + 5)),
        listed("before", ListedState::Exited, Some(cut - 5)),
    ];
    let live = w.nanos;
    let steps = w.healer().connected(Vec::new(), listing, live, now);
    let orders: Vec<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Restart(o) => Some(o.id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(orders, ["crashed"]);
    assert_eq!(w.book.watched(), 3, "`removed` is gone from the list");
}

#[test]
fn a_reconnect_replays_missed_events_and_ends_restarts_whose_start_was_lost() {
    let mut w = World::new();
    let order = restart(&w.event("die")).expect("healed");
    w.done(&order);
    // The stream broke before the `start`; the container's next crash is
    // in the replay.
    w.pass(30 * S);
    let replayed = w.message(ID, "die", &[("autoheal", "true")]);
    let now = w.now();
    let live = w.nanos;
    let steps = w.healer().connected(
        vec![replayed],
        vec![listed(ID, ListedState::Exited, Some(live))],
        live,
        now,
    );
    // The replayed die reads as the restart's own (its `start` never came),
    // but the list shows the container exited after the cut: healed.
    assert!(restart(&steps).is_some(), "{steps:?}");
}

// === history outlives the runner and the policy ===

#[test]
fn the_book_carries_the_series_into_a_new_runner_and_policy() {
    let mut w = World::new();
    w.event("start");
    w.pass(100 * MS);
    let order = restart(&w.event("die")).expect("healed");
    w.complete(&order);
    // A new runner (a restart or a reload) takes the same book.
    let book = w.book.clone();
    let mut again = World::new();
    again.book = book;
    again.t0 = w.t0;
    again.clock = w.clock;
    again.nanos = w.nanos;
    again.policy.backoff = backoff(4_000, 300_000, 10_000);
    assert!(again.healer().resume().is_empty());
    again.pass(100 * MS);
    let (_, at) = wake(&again.event("die")).expect("still a series: backoff");
    assert_eq!(
        at - again.now().at,
        4 * S - 100 * MS,
        "the new base applies"
    );
}

#[test]
fn a_new_runner_wakes_scheduled_heals_and_ends_restarts_it_never_heard_of() {
    let mut w = World::new();
    w.event("start");
    w.pass(100 * MS);
    let order = restart(&w.event("die")).expect("first heal at once");
    w.complete(&order);
    w.pass(100 * MS);
    let (seq, at) = wake(&w.event("die")).expect("second waits");
    // A crash loop of a second container, mid-restart when the runner dies.
    let other = "0ther";
    w.event_of(other, "start", &[("autoheal", "true")]);
    w.pass(100 * MS);
    let lost = restart(&w.event_of(other, "die", &[("autoheal", "true")])).expect("healed");

    let steps = w.healer().resume();
    assert_eq!(
        steps,
        vec![Step::Wake {
            id: ID.to_owned(),
            seq,
            at
        }],
        "the waiting heal is woken again at its time; nothing else"
    );
    let healed = restart(&w.due(ID, seq)).expect("the heal still happens");
    assert_eq!(healed.id, ID);
    // The restart's outcome died with the old runner; it no longer blocks
    // the other container's heals.
    assert_eq!(lost.id, other);
    w.pass(10 * S);
    let steps = w.event_of(other, "health_status: unhealthy", &[("autoheal", "true")]);
    assert!(
        restart(&steps).is_some() || wake(&steps).is_some(),
        "the other container is healed again: {steps:?}"
    );
}
