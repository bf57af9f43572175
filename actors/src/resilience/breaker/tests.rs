use super::*;

const S: Duration = Duration::from_secs(1);

fn config() -> BreakerConfig {
    BreakerConfig::default()
}

/// Trips a default-config breaker by consecutive failures at `now`.
fn tripped(config: BreakerConfig, now: Instant) -> CircuitBreaker {
    let mut b = CircuitBreaker::new(config);
    for _ in 0..b.config().consecutive_failures {
        b.record_failure(now);
    }
    assert_eq!(b.state(now), BreakerState::Open);
    b
}

#[test]
fn opens_after_n_consecutive_failures() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    b.record_failure(t0);
    b.record_failure(t0);
    assert_eq!(b.state(t0), BreakerState::Closed);
    assert_eq!(b.admit(t0), Admission::Allowed);
    assert_eq!(b.trip_reason(), None);
    b.record_failure(t0);
    assert_eq!(b.state(t0), BreakerState::Open);
    assert_eq!(b.trip_reason(), Some(&TripReason::ConsecutiveFailures(3)));
    assert_eq!(b.open_until(), Some(t0 + 5 * S));
    assert_eq!(b.times_opened(), 1);
    assert_eq!(b.admit(t0), Admission::Rejected { until: t0 + 5 * S });
}

#[test]
fn success_in_between_resets_the_consecutive_count() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    b.record_failure(t0);
    b.record_failure(t0);
    b.record_success(t0);
    assert_eq!(b.consecutive_failures(), 0);
    b.record_failure(t0);
    b.record_failure(t0);
    assert_eq!(b.consecutive_failures(), 2);
    assert_eq!(b.state(t0), BreakerState::Closed);
}

/// Six failures in ten calls, never three in a row.
const RATE_PATTERN: [bool; 10] = [
    true, false, true, true, false, true, false, true, false, true,
];

#[test]
fn rate_trip_needs_minimum_volume() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    for (i, &failed) in RATE_PATTERN.iter().enumerate() {
        assert_eq!(b.state(t0), BreakerState::Closed, "before call {}", i + 1);
        let now = t0 + S * i as u32;
        if failed {
            b.record_failure(now);
        } else {
            b.record_success(now);
        }
    }
    assert_eq!(b.state(t0 + 9 * S), BreakerState::Open);
    assert_eq!(
        b.trip_reason(),
        Some(&TripReason::FailureRate {
            failures: 6,
            total: 10
        })
    );
}

#[test]
fn old_outcomes_fall_out_of_the_window() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    for &failed in &RATE_PATTERN[..9] {
        if failed {
            b.record_failure(t0);
        } else {
            b.record_success(t0);
        }
    }
    // Without pruning this would be the tenth call at 6/10 and trip.
    b.record_failure(t0 + 60 * S);
    assert_eq!(b.state(t0 + 60 * S), BreakerState::Closed);
    // Admissions prune too.
    assert_eq!(b.admit(t0 + 61 * S), Admission::Allowed);
    assert_eq!(b.outcomes.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn open_rejects_until_period_ends_then_half_open_admits_exactly_the_trials() {
    let mut b = tripped(
        BreakerConfig {
            half_open_trials: 2,
            ..config()
        },
        Instant::now(),
    );
    let until = Instant::now() + 5 * S;
    assert_eq!(b.admit(Instant::now()), Admission::Rejected { until });
    tokio::time::advance(5 * S - Duration::from_millis(1)).await;
    assert_eq!(b.state(Instant::now()), BreakerState::Open);
    assert_eq!(b.admit(Instant::now()), Admission::Rejected { until });
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
    assert_eq!(b.admit(Instant::now()), Admission::Trial);
    assert_eq!(b.admit(Instant::now()), Admission::Trial);
    assert!(matches!(
        b.admit(Instant::now()),
        Admission::Rejected { .. }
    ));
    assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
}

#[test]
fn trial_success_closes_and_clears_the_window() {
    let t0 = Instant::now();
    let rate_only = BreakerConfig {
        consecutive_failures: 100,
        minimum_volume: 4,
        ..config()
    };
    let mut b = CircuitBreaker::new(rate_only);
    for _ in 0..4 {
        b.record_failure(t0);
    }
    assert_eq!(b.state(t0), BreakerState::Open);
    assert_eq!(b.admit(t0 + 5 * S), Admission::Trial);
    b.record_success(t0 + 6 * S);
    assert_eq!(b.state(t0 + 6 * S), BreakerState::Closed);
    assert_eq!(b.trip_reason(), None);
    assert_eq!(b.open_until(), None);
    assert_eq!(b.admit(t0 + 6 * S), Admission::Allowed);
    assert!(b.outcomes.is_empty());
    // The four old failures are still young enough to count if the window had been kept.
    b.record_failure(t0 + 7 * S);
    assert_eq!(b.state(t0 + 7 * S), BreakerState::Closed);
}

#[test]
fn trial_failure_reopens_with_doubled_period_capped_at_open_max() {
    let t0 = Instant::now();
    let mut b = tripped(
        BreakerConfig {
            open_max: 30 * S,
            ..config()
        },
        t0,
    );
    let mut now = t0;
    for period in [5, 10, 20, 30, 30] {
        assert_eq!(b.open_until(), Some(now + period * S));
        now += period * S;
        assert_eq!(b.admit(now), Admission::Trial);
        b.record_failure(now);
    }
    assert_eq!(b.times_opened(), 6);
    assert_eq!(b.trip_reason(), Some(&TripReason::ConsecutiveFailures(8)));
    assert_eq!(b.open_until(), Some(now + 30 * S));
}

#[test]
fn close_resets_the_doubling() {
    let t0 = Instant::now();
    let mut b = tripped(config(), t0);
    let mut now = t0 + 5 * S;
    assert_eq!(b.admit(now), Admission::Trial);
    b.record_failure(now);
    assert_eq!(b.open_until(), Some(now + 10 * S));
    now += 10 * S;
    assert_eq!(b.admit(now), Admission::Trial);
    b.record_success(now);
    assert_eq!(b.state(now), BreakerState::Closed);
    for _ in 0..3 {
        b.record_failure(now);
    }
    assert_eq!(b.open_until(), Some(now + 5 * S));
}

#[test]
fn reset_closes_and_resets_the_doubling() {
    let t0 = Instant::now();
    let mut b = tripped(config(), t0);
    assert_eq!(b.admit(t0 + 5 * S), Admission::Trial);
    b.record_failure(t0 + 5 * S);
    b.reset();
    assert_eq!(b.state(t0 + 5 * S), BreakerState::Closed);
    assert_eq!(b.consecutive_failures(), 0);
    assert_eq!(b.trip_reason(), None);
    assert_eq!(b.open_period(), 5 * S);
    assert_eq!(b.times_opened(), 2);
}

#[test]
fn force_open_honours_the_longer_period() {
    let t0 = Instant::now();
    let mut long = CircuitBreaker::new(config());
    long.force_open(t0, 30 * S, "retry-after from upstream: 30s".into());
    assert_eq!(long.open_until(), Some(t0 + 30 * S));
    assert_eq!(long.state(t0 + 29 * S), BreakerState::Open);
    assert_eq!(
        long.trip_reason().map(ToString::to_string).as_deref(),
        Some("retry-after from upstream: 30s")
    );

    let mut short = CircuitBreaker::new(config());
    short.force_open(t0, S, "retry-after from upstream: 1s".into());
    assert_eq!(short.open_until(), Some(t0 + 5 * S));

    // Already open for longer: not shortened, and the original reason stands.
    long.force_open(t0 + S, S, "later".into());
    assert_eq!(long.open_until(), Some(t0 + 30 * S));
    assert_eq!(
        long.trip_reason().map(ToString::to_string).as_deref(),
        Some("retry-after from upstream: 30s")
    );
    // Extended when the new period ends later; still one opening.
    long.force_open(t0 + S, 60 * S, "longer".into());
    assert_eq!(long.open_until(), Some(t0 + 61 * S));
    assert_eq!(long.times_opened(), 1);
}

#[test]
fn force_open_while_half_open_counts_as_a_failed_trial() {
    let t0 = Instant::now();
    let mut b = tripped(config(), t0);
    b.force_open(t0 + 5 * S, S, "retry-after".into());
    assert_eq!(b.open_until(), Some(t0 + 15 * S));
    assert_eq!(b.times_opened(), 2);
}

#[tokio::test(start_paused = true)]
async fn take_transition_reports_each_transition_once_in_order() {
    let mut b = CircuitBreaker::new(config());
    assert_eq!(b.take_transition(), None);
    for _ in 0..3 {
        b.record_failure(Instant::now());
    }
    assert_eq!(
        b.take_transition(),
        Some((BreakerState::Closed, BreakerState::Open))
    );
    assert_eq!(b.take_transition(), None);

    tokio::time::advance(5 * S).await;
    // Reading the state does not consume or create a transition; acting on it does.
    assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
    assert_eq!(b.take_transition(), None);
    assert_eq!(b.admit(Instant::now()), Admission::Trial);
    assert_eq!(
        b.take_transition(),
        Some((BreakerState::Open, BreakerState::HalfOpen))
    );
    b.record_success(Instant::now());
    assert_eq!(
        b.take_transition(),
        Some((BreakerState::HalfOpen, BreakerState::Closed))
    );
    assert_eq!(b.take_transition(), None);

    // Two transitions from one call, neither lost.
    for _ in 0..3 {
        b.record_failure(Instant::now());
    }
    tokio::time::advance(5 * S).await;
    b.record_failure(Instant::now());
    assert_eq!(
        b.take_transition(),
        Some((BreakerState::Closed, BreakerState::Open))
    );
    assert_eq!(
        b.take_transition(),
        Some((BreakerState::Open, BreakerState::HalfOpen))
    );
    assert_eq!(
        b.take_transition(),
        Some((BreakerState::HalfOpen, BreakerState::Open))
    );
    assert_eq!(b.take_transition(), None);

    b.reset();
    assert_eq!(
        b.take_transition(),
        Some((BreakerState::Open, BreakerState::Closed))
    );
    b.reset();
    assert_eq!(b.take_transition(), None);
}

#[test]
fn pending_transitions_are_bounded() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    for _ in 0..100 {
        b.force_open(t0, S, String::new());
        b.reset();
    }
    assert_eq!(b.transitions.len(), MAX_PENDING_TRANSITIONS);
}

#[test]
fn lost_trials_are_presumed_lost_after_one_open_period() {
    let t0 = Instant::now();
    let mut b = tripped(config(), t0);
    let half_open_at = t0 + 5 * S;
    assert_eq!(b.admit(half_open_at), Admission::Trial);
    // The trial's caller never reports back.
    assert_eq!(
        b.admit(half_open_at + S),
        Admission::Rejected {
            until: half_open_at + 5 * S
        }
    );
    assert_eq!(b.admit(half_open_at + 5 * S), Admission::Trial);
    assert!(matches!(
        b.admit(half_open_at + 6 * S),
        Admission::Rejected { .. }
    ));
}

#[test]
fn straggling_success_while_open_does_not_close() {
    let t0 = Instant::now();
    let mut b = tripped(config(), t0);
    b.record_success(t0 + S);
    assert_eq!(b.state(t0 + S), BreakerState::Open);
    assert_eq!(b.consecutive_failures(), 0);
    b.record_failure(t0 + 2 * S);
    assert_eq!(b.open_until(), Some(t0 + 5 * S));
}

#[test]
fn absurd_inputs_do_not_panic() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(BreakerConfig {
        consecutive_failures: 0,
        failure_rate: f64::NAN,
        window: Duration::ZERO,
        minimum_volume: 0,
        open_base: Duration::MAX,
        open_max: Duration::ZERO,
        half_open_trials: 0,
        consecutive_request_failures: 0,
    });
    b.record_success(t0);
    b.record_failure(t0);
    b.force_open(t0, Duration::MAX, String::new());
    let _ = b.admit(t0);
    let mut b = CircuitBreaker::new(BreakerConfig {
        open_max: Duration::MAX,
        ..config()
    });
    for i in 0..300u32 {
        b.record_failure(t0 + S * i);
        let _ = b.admit(t0 + S * i);
        b.force_open(t0 + S * i, Duration::MAX, "x".into());
    }
}

#[test]
fn validate_flags_each_bad_field() {
    assert!(config().validate().is_empty());
    let fields = |c: BreakerConfig| c.validate().into_iter().map(|(f, _)| f).collect::<Vec<_>>();
    let bad = BreakerConfig {
        consecutive_failures: 0,
        failure_rate: f64::NAN,
        window: Duration::ZERO,
        minimum_volume: 0,
        open_base: 10 * S,
        open_max: S,
        half_open_trials: 0,
        consecutive_request_failures: 0,
    };
    assert_eq!(
        fields(bad),
        [
            "consecutive_failures",
            "failure_rate",
            "window",
            "open_max",
            "half_open_trials",
            "consecutive_request_failures"
        ]
    );
    for rate in [0.0, -0.1, 1.01] {
        assert_eq!(
            fields(BreakerConfig {
                failure_rate: rate,
                ..config()
            }),
            ["failure_rate"]
        );
    }
    assert!(
        BreakerConfig {
            failure_rate: 1.0,
            ..config()
        }
        .validate()
        .is_empty()
    );
}

#[test]
fn config_uses_humantime_defaults_and_rejects_unknown_fields() {
    let c: BreakerConfig =
        serde_json::from_str(r#"{"window":"1m","open_base":"100ms","half_open_trials":2}"#)
            .expect("valid config");
    assert_eq!(c.window, 60 * S);
    assert_eq!(c.open_base, Duration::from_millis(100));
    assert_eq!(c.open_max, 300 * S);
    assert_eq!(c.half_open_trials, 2);
    assert_eq!(c.consecutive_failures, 3);
    let json = serde_json::to_value(config()).expect("serializes");
    assert_eq!(json["open_max"], "5m");
    assert!(serde_json::from_str::<BreakerConfig>(r#"{"windw":"1m"}"#).is_err());
}

#[test]
fn display_strings() {
    assert_eq!(BreakerState::HalfOpen.to_string(), "half-open");
    assert_eq!(BreakerState::Closed.to_string(), "closed");
    assert_eq!(BreakerState::Open.to_string(), "open");
    assert_eq!(
        serde_json::to_value(BreakerState::HalfOpen).expect("serializes"),
        "half_open"
    );
    assert_eq!(
        TripReason::ConsecutiveFailures(5).to_string(),
        "5 consecutive failures"
    );
    assert_eq!(
        TripReason::ConsecutiveRequestFailures(5).to_string(),
        "5 consecutive request failures"
    );
    assert_eq!(
        TripReason::FailureRate {
            failures: 6,
            total: 10
        }
        .to_string(),
        "failure rate 6/10 within the window"
    );
    assert_eq!(
        TripReason::Forced {
            reason: String::new()
        }
        .to_string(),
        "forced open"
    );
}

#[test]
fn opens_after_n_consecutive_request_failures_counted_apart_from_probes() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    assert_eq!(b.config().consecutive_request_failures, 5);
    for i in 0..4 {
        b.record_request_failure(t0 + S * i);
        // Probes that pass do not end a run of failed requests.
        b.record_success(t0 + S * i);
    }
    assert_eq!(b.state(t0 + 4 * S), BreakerState::Closed);
    assert_eq!(b.consecutive_request_failures(), 4);
    assert_eq!(b.consecutive_failures(), 0, "probes count apart");
    b.record_request_failure(t0 + 4 * S);
    assert_eq!(b.state(t0 + 4 * S), BreakerState::Open);
    assert_eq!(
        b.trip_reason(),
        Some(&TripReason::ConsecutiveRequestFailures(5))
    );
    assert_eq!(
        b.trip_reason().map(ToString::to_string).as_deref(),
        Some("5 consecutive request failures")
    );
}

#[test]
fn an_answered_request_ends_the_run_of_request_failures() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    for _ in 0..4 {
        b.record_request_failure(t0);
    }
    b.record_request_success();
    for _ in 0..4 {
        b.record_request_failure(t0);
    }
    assert_eq!(b.state(t0), BreakerState::Closed);
    // Nor do request failures count towards the probes' rule.
    assert_eq!(b.consecutive_failures(), 0);
}

#[tokio::test(start_paused = true)]
async fn request_failures_while_open_or_half_open_leave_the_decision_to_the_trials() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(config());
    for _ in 0..5 {
        b.record_request_failure(t0);
    }
    let until = b.open_until().expect("open");
    // Stragglers sent before it opened do not extend or re-open it.
    b.record_request_failure(t0 + S);
    assert_eq!(b.open_until(), Some(until));
    assert_eq!(b.state(until), BreakerState::HalfOpen);
    assert_eq!(b.admit(until), Admission::Trial);
    b.record_request_failure(until);
    assert_eq!(b.state(until), BreakerState::HalfOpen);
    b.record_success(until);
    assert_eq!(b.state(until), BreakerState::Closed);
    assert_eq!(b.consecutive_request_failures(), 0, "closing starts afresh");
}
