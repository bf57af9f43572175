//! The waterfall's decisions as tables: each row is a situation and the
//! decision it must produce.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::resilience::{Backoff, BackoffConfig, Jitter};

use TierId::{CloudRun, Docker, GcpVm, Local};
use TierState::{Degraded, Healthy, Probing, Starting, Unavailable, Unhealthy, Unknown};

const FAILBACK: Duration = Duration::from_secs(30);

fn config() -> WaterfallConfig {
    WaterfallConfig {
        order: vec![Docker, CloudRun, Local, GcpVm],
        failback_after: FAILBACK,
        start_retry: BackoffConfig {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(8),
            reset_after: Duration::from_secs(60),
            jitter: Jitter::None,
        },
    }
}

fn waterfall() -> Waterfall {
    let c = config();
    Waterfall::with_backoff(&c, Backoff::new(c.start_retry.clone()))
}

/// (tier, state, healthy for how long before `now`, startable)
type Row = (TierId, TierState, Option<u64>, bool);

fn views(now: Instant, rows: &[Row]) -> Vec<TierView<'static>> {
    rows.iter()
        .map(|&(tier, state, healthy_for, startable)| TierView {
            tier,
            state,
            reason: match state {
                Healthy => "ready",
                Degraded => "1 consecutive failure: timeout",
                Unhealthy => "breaker open after 5 consecutive 503s",
                Unavailable => "not installed",
                Starting => "starting",
                Unknown | Probing => "not probed yet",
            },
            healthy_since: healthy_for.map(|s| now - Duration::from_secs(s)),
            startable,
        })
        .collect()
}

fn base() -> Instant {
    // Far enough from the epoch of the test's Instant that subtracting a few
    // minutes of "healthy for" stays valid.
    Instant::now() + Duration::from_secs(3600)
}

#[test]
fn initial_choice_is_the_first_healthy_tier_in_order() {
    let table: &[(&[Row], Option<TierId>)] = &[
        (
            &[
                (Docker, Healthy, Some(0), true),
                (Local, Healthy, Some(0), true),
            ],
            Some(Docker),
        ),
        (
            &[
                (Docker, Unhealthy, None, true),
                (Local, Healthy, Some(0), true),
            ],
            Some(Local),
        ),
        (
            &[
                (Docker, Unavailable, None, true),
                (CloudRun, Healthy, Some(1), false),
                (Local, Healthy, Some(9), true),
            ],
            Some(CloudRun),
        ),
        // A healthy tier beats a better degraded one; degraded is the last resort.
        (
            &[
                (Docker, Degraded, None, true),
                (Local, Healthy, Some(0), true),
            ],
            Some(Local),
        ),
        (
            &[
                (Docker, Degraded, None, true),
                (Local, Unhealthy, None, true),
            ],
            Some(Docker),
        ),
        (
            &[
                (Docker, Unhealthy, None, true),
                (Local, Unhealthy, None, true),
            ],
            None,
        ),
        (
            &[
                (Docker, Probing, None, true),
                (Local, Healthy, Some(0), true),
            ],
            Some(Local),
        ),
    ];
    for (i, (rows, want)) in table.iter().enumerate() {
        let now = base();
        let d = waterfall().decide(now, &views(now, rows));
        assert_eq!(d.active, *want, "row {i}: {rows:?}");
    }
}

#[test]
fn failover_is_immediate_when_the_active_tier_stops_serving() {
    for broken in [Unhealthy, Unavailable, Unknown] {
        let mut w = waterfall();
        let now = base();
        let d = w.decide(
            now,
            &views(
                now,
                &[
                    (Docker, Healthy, Some(100), true),
                    (Local, Healthy, Some(100), true),
                ],
            ),
        );
        assert_eq!(d.active, Some(Docker));
        let d = w.decide(
            now,
            &views(
                now,
                &[
                    (Docker, broken, None, true),
                    (Local, Healthy, Some(100), true),
                ],
            ),
        );
        assert_eq!(d.active, Some(Local), "{broken:?}");
        let line = d.line.expect("a failover is logged");
        assert!(line.starts_with("active tier: local (docker: "), "{line}");
    }
}

#[test]
fn failover_goes_to_the_best_healthy_tier_without_hysteresis() {
    let mut w = waterfall();
    let now = base();
    w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Unhealthy, None, true),
                (CloudRun, Unhealthy, None, false),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    assert_eq!(w.active(), Some(Local));
    // Local breaks while cloud_run has been healthy for only one second:
    // failover does not wait for cloud_run's hysteresis.
    let d = w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Unhealthy, None, true),
                (CloudRun, Healthy, Some(1), false),
                (Local, Unhealthy, None, true),
            ],
        ),
    );
    assert_eq!(d.active, Some(CloudRun));
}

#[test]
fn degraded_active_tier_is_kept() {
    let mut w = waterfall();
    let now = base();
    w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Healthy, Some(100), true),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    let d = w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Degraded, None, true),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    assert_eq!(d.active, Some(Docker));
    assert_eq!(d.line, None, "nothing changed, nothing logged");
}

#[test]
fn failback_waits_for_hysteresis_and_asks_to_be_rechecked() {
    let mut w = waterfall();
    let t0 = base();
    w.decide(
        t0,
        &views(
            t0,
            &[
                (Docker, Unhealthy, None, true),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    assert_eq!(w.active(), Some(Local));

    // Docker has been healthy for 10 s: stay on local, recheck when 30 s are up.
    let d = w.decide(
        t0,
        &views(
            t0,
            &[
                (Docker, Healthy, Some(10), true),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    assert_eq!(d.active, Some(Local));
    assert_eq!(d.recheck_at, Some(t0 + Duration::from_secs(20)));
    assert_eq!(d.line, None);

    // At the recheck time docker has been healthy for 30 s: fail back.
    let t1 = t0 + Duration::from_secs(20);
    let d = w.decide(
        t1,
        &views(
            t1,
            &[
                (Docker, Healthy, Some(30), true),
                (Local, Healthy, Some(120), true),
            ],
        ),
    );
    assert_eq!(d.active, Some(Docker));
    let line = d.line.expect("failback is logged");
    assert!(line.contains("failback from local"), "{line}");
}

#[test]
fn a_flapping_better_tier_never_takes_over() {
    let mut w = waterfall();
    let mut now = base();
    w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Unhealthy, None, true),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    // Docker is healthy for 20 s, unhealthy, healthy for 20 s again, ...
    for _ in 0..10 {
        let d = w.decide(
            now,
            &views(
                now,
                &[
                    (Docker, Healthy, Some(20), true),
                    (Local, Healthy, Some(100), true),
                ],
            ),
        );
        assert_eq!(d.active, Some(Local));
        now += Duration::from_secs(5);
        let d = w.decide(
            now,
            &views(
                now,
                &[
                    (Docker, Unhealthy, None, true),
                    (Local, Healthy, Some(100), true),
                ],
            ),
        );
        assert_eq!(d.active, Some(Local));
    }
}

#[test]
fn failback_picks_the_best_tier_that_is_ready() {
    let mut w = waterfall();
    let now = base();
    w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Unhealthy, None, true),
                (CloudRun, Unhealthy, None, false),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    let d = w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Healthy, Some(5), true),
                (CloudRun, Healthy, Some(40), false),
                (Local, Healthy, Some(100), true),
            ],
        ),
    );
    assert_eq!(d.active, Some(CloudRun));
    assert_eq!(d.recheck_at, None);
    // Later docker qualifies too and wins.
    let later = now + Duration::from_secs(25);
    let d = w.decide(
        later,
        &views(
            later,
            &[
                (Docker, Healthy, Some(30), true),
                (CloudRun, Healthy, Some(65), false),
                (Local, Healthy, Some(125), true),
            ],
        ),
    );
    assert_eq!(d.active, Some(Docker));
}

#[test]
fn no_start_while_any_tier_is_still_probing() {
    for pending in [Unknown, Probing] {
        let mut w = waterfall();
        let now = base();
        let d = w.decide(
            now,
            &views(
                now,
                &[
                    (Docker, pending, None, true),
                    (Local, Unhealthy, None, true),
                ],
            ),
        );
        assert_eq!(d.start, None, "{pending:?}");
        assert_eq!(d.active, None);
    }
}

#[test]
fn start_phase_asks_startable_tiers_in_order_one_at_a_time() {
    let mut w = waterfall();
    let now = base();
    let rows: &[Row] = &[
        (Docker, Unavailable, None, true),
        (CloudRun, Unhealthy, None, false),
        (Local, Unhealthy, None, true),
        (GcpVm, Unhealthy, None, true),
    ];
    let d = w.decide(now, &views(now, rows));
    assert_eq!(
        d.start,
        Some(Local),
        "unavailable and unstartable tiers are skipped"
    );
    assert!(
        d.line
            .expect("outage logged")
            .starts_with("no tier is healthy: docker: not installed; cloud_run: ")
    );

    // While local starts, nothing else is asked.
    let starting: &[Row] = &[
        (Docker, Unavailable, None, true),
        (CloudRun, Unhealthy, None, false),
        (Local, Starting, None, true),
        (GcpVm, Unhealthy, None, true),
    ];
    assert_eq!(w.decide(now, &views(now, starting)).start, None);

    // Local fails to start: the next startable tier is asked.
    w.start_finished(Local, false);
    assert_eq!(w.decide(now, &views(now, rows)).start, Some(GcpVm));
}

#[test]
fn a_failed_round_waits_a_backoff_before_the_next() {
    let mut w = waterfall();
    let now = base();
    let rows: &[Row] = &[
        (Docker, Unhealthy, None, false),
        (Local, Unhealthy, None, true),
    ];
    assert_eq!(w.decide(now, &views(now, rows)).start, Some(Local));
    w.start_finished(Local, false);
    let d = w.decide(now, &views(now, rows));
    assert_eq!(d.start, None);
    assert_eq!(d.recheck_at, Some(now + Duration::from_secs(1)));
    // Too early: still waiting.
    assert_eq!(
        w.decide(now + Duration::from_millis(500), &views(now, rows))
            .start,
        None
    );
    let later = now + Duration::from_secs(1);
    assert_eq!(w.decide(later, &views(later, rows)).start, Some(Local));
    // A second failed round waits twice as long.
    w.start_finished(Local, false);
    let d = w.decide(later, &views(later, rows));
    assert_eq!(d.recheck_at, Some(later + Duration::from_secs(2)));
}

#[test]
fn a_successful_start_makes_the_tier_active_and_resets_the_round() {
    let mut w = waterfall();
    let now = base();
    assert_eq!(
        w.decide(now, &views(now, &[(Local, Unhealthy, None, true)]))
            .start,
        Some(Local)
    );
    w.start_finished(Local, true);
    let d = w.decide(now, &views(now, &[(Local, Healthy, Some(0), true)]));
    assert_eq!(d.active, Some(Local));
    assert_eq!(d.start, None);
    assert_eq!(d.line.as_deref(), Some("active tier: local"));
}

#[test]
fn nothing_is_started_while_a_tier_serves() {
    let mut w = waterfall();
    let now = base();
    let d = w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Unhealthy, None, true),
                (Local, Degraded, None, true),
            ],
        ),
    );
    assert_eq!(d.active, Some(Local));
    assert_eq!(d.start, None);
}

#[test]
fn the_outage_line_is_logged_once_per_change() {
    let mut w = waterfall();
    let now = base();
    let rows: &[Row] = &[
        (Docker, Unhealthy, None, false),
        (Local, Unhealthy, None, false),
    ];
    assert!(w.decide(now, &views(now, rows)).line.is_some());
    assert_eq!(w.decide(now, &views(now, rows)).line, None);
    let changed: &[Row] = &[
        (Docker, Unavailable, None, false),
        (Local, Unhealthy, None, false),
    ];
    assert!(w.decide(now, &views(now, changed)).line.is_some());
}

#[test]
fn the_active_line_names_why_better_tiers_were_passed_over() {
    let mut w = waterfall();
    let now = base();
    let d = w.decide(
        now,
        &views(
            now,
            &[
                (Docker, Unavailable, None, true),
                (CloudRun, Unhealthy, None, false),
                (Local, Healthy, Some(0), true),
            ],
        ),
    );
    assert_eq!(
        d.line.as_deref(),
        Some(
            "active tier: local (docker: not installed; cloud_run: breaker open after 5 consecutive 503s)"
        )
    );
}
