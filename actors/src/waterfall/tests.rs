//! The waterfall's decisions as tables: each row is a situation and the
//! decision it must produce.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::resilience::{Backoff, BackoffConfig, Jitter};

use TierId::{CloudRun, Docker, GcpVm, Local};
use TierState::{Degraded, Healthy, Probing, Starting, Unavailable, Unhealthy, Unknown};

const FAILBACK: Duration = Duration::from_secs(30);
const PATIENCE: Duration = Duration::from_secs(3);

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
        start_patience: PATIENCE,
        standby: Default::default(),
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
            first_probe_due: None,
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

/// `views` with the first probes of pending tiers due at `due`.
fn pending_due(now: Instant, rows: &[Row], due: Instant) -> Vec<TierView<'static>> {
    let mut views = views(now, rows);
    for v in &mut views {
        if v.state.is_pending() {
            v.first_probe_due = Some(due);
        }
    }
    views
}

#[test]
fn the_first_decision_waits_for_a_better_tiers_first_probe_until_it_is_due() {
    let table: &[(TierState, u64, Option<TierId>)] = &[
        // Docker's first probe is still out and due in 1 s: wait for it.
        (Probing, 0, None),
        (Unknown, 0, None),
        // It answered healthy in time: docker wins the first decision.
        (Healthy, 0, Some(Docker)),
        // It answered unhealthy: local.
        (Unhealthy, 0, Some(Local)),
        // Its answer is overdue: local, without waiting further.
        (Probing, 1, Some(Local)),
    ];
    for &(docker, elapsed, want) in table {
        let mut w = waterfall();
        let t0 = base();
        let due = t0 + Duration::from_secs(1);
        let now = t0 + Duration::from_secs(elapsed);
        let healthy_for = (docker == Healthy).then_some(0);
        let rows: &[Row] = &[
            (Docker, docker, healthy_for, true),
            (Local, Healthy, Some(5), true),
            (GcpVm, Healthy, Some(5), true),
        ];
        let d = w.decide(now, &pending_due(now, rows, due));
        assert_eq!(d.active, want, "docker {docker:?} after {elapsed}s");
        assert_eq!(d.start, None, "docker {docker:?} after {elapsed}s");
        if want.is_none() {
            assert_eq!(d.recheck_at, Some(due), "asks again when the probe is due");
            assert_eq!(d.line, None, "waiting is not news");
        }
    }
}

#[test]
fn only_the_first_decision_waits_for_first_probes() {
    let mut w = waterfall();
    let now = base();
    let rows: &[Row] = &[
        (Docker, Healthy, Some(100), true),
        (Local, Healthy, Some(100), true),
    ];
    assert_eq!(w.decide(now, &views(now, rows)).active, Some(Docker));
    // Docker's actor is replaced: its first probe is out again, due in 1 s.
    // Traffic must go somewhere now; local takes it at once.
    let rows: &[Row] = &[
        (Docker, Unknown, None, true),
        (Local, Healthy, Some(100), true),
    ];
    let d = w.decide(now, &pending_due(now, rows, now + Duration::from_secs(1)));
    assert_eq!(d.active, Some(Local));
}

#[test]
fn a_better_tier_that_never_failed_takes_traffic_at_once() {
    // The first probe of cloud_run is overdue, so local took the first decision
    // (as after a cascade restart with a slow first probe). cloud_run then
    // answers healthy: no hysteresis, it never failed.
    let mut w = waterfall();
    let t0 = base();
    let rows: &[Row] = &[
        (CloudRun, Probing, None, false),
        (Local, Healthy, Some(5), true),
    ];
    let d = w.decide(t0, &pending_due(t0, rows, t0));
    assert_eq!(d.active, Some(Local));
    let t1 = t0 + Duration::from_millis(50);
    let d = w.decide(
        t1,
        &views(
            t1,
            &[
                (CloudRun, Healthy, Some(0), false),
                (Local, Healthy, Some(5), true),
            ],
        ),
    );
    assert_eq!(d.active, Some(CloudRun));
    assert_eq!(
        d.line.as_deref(),
        Some(
            "active tier: cloud_run (failback from local: healthy and not failed since its first probe or restart)"
        )
    );
}

#[test]
fn a_better_tier_restarted_on_request_takes_traffic_back_at_once() {
    let mut w = waterfall();
    let now = base();
    let healthy: &[Row] = &[
        (CloudRun, Healthy, Some(100), false),
        (GcpVm, Healthy, Some(100), true),
    ];
    assert_eq!(w.decide(now, &views(now, healthy)).active, Some(CloudRun));
    // `cascade restart cloud_run`: the tier restarts (the start phase did not
    // ask), traffic moves to gcp_vm meanwhile.
    let restarting: &[Row] = &[
        (CloudRun, Starting, None, false),
        (GcpVm, Healthy, Some(100), true),
    ];
    assert_eq!(w.decide(now, &views(now, restarting)).active, Some(GcpVm));
    let later = now + Duration::from_secs(2);
    let back: &[Row] = &[
        (CloudRun, Healthy, Some(0), false),
        (GcpVm, Healthy, Some(102), true),
    ];
    let d = w.decide(later, &views(later, back));
    assert_eq!(
        d.active,
        Some(CloudRun),
        "no 30 s on the most expensive tier"
    );
    assert_eq!(d.recheck_at, None);
}

#[test]
fn a_better_tier_that_failed_waits_for_hysteresis() {
    // Each row: what the better tier went through before it was healthy
    // again; any failure on the way brings the hysteresis back.
    let histories: &[&[TierState]] = &[
        // Its first probe failed.
        &[Probing, Unhealthy],
        // Restarted on request, and the restart did not come up.
        &[Healthy, Starting, Unhealthy],
        // A failing probe (degraded), or a verdict that it cannot serve.
        &[Probing, Degraded],
        &[Probing, Unavailable],
    ];
    for history in histories {
        let mut w = waterfall();
        let now = base();
        for &state in *history {
            let healthy_for = (state == Healthy).then_some(100);
            let rows: &[Row] = &[
                (Docker, state, healthy_for, true),
                (Local, Healthy, Some(100), true),
            ];
            w.decide(now, &views(now, rows));
        }
        let rows: &[Row] = &[
            (Docker, Healthy, Some(1), true),
            (Local, Healthy, Some(100), true),
        ];
        let d = w.decide(now, &views(now, rows));
        assert_eq!(d.active, Some(Local), "after {history:?}");
        assert_eq!(
            d.recheck_at,
            Some(now + FAILBACK - Duration::from_secs(1)),
            "after {history:?}"
        );
    }
}

#[test]
fn a_tier_the_start_phase_started_waits_for_hysteresis() {
    let mut w = waterfall();
    let now = base();
    let down: &[Row] = &[
        (Docker, Unhealthy, None, true),
        (Local, Unhealthy, None, true),
    ];
    assert_eq!(w.decide(now, &views(now, down)).start, Some(Docker));
    let starting: &[Row] = &[
        (Docker, Starting, None, true),
        (Local, Healthy, Some(0), true),
    ];
    assert_eq!(w.decide(now, &views(now, starting)).active, Some(Local));
    w.start_finished(Docker, true);
    let up: &[Row] = &[
        (Docker, Healthy, Some(0), true),
        (Local, Healthy, Some(1), true),
    ];
    let d = w.decide(now, &views(now, up));
    assert_eq!(d.active, Some(Local));
    assert_eq!(d.recheck_at, Some(now + FAILBACK));
}

#[test]
fn a_start_that_takes_longer_than_start_patience_gets_the_next_tier_started_too() {
    let mut w = waterfall();
    let t0 = base();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let down: &[Row] = &[
        (Docker, Unhealthy, None, true),
        (Local, Unhealthy, None, true),
        (GcpVm, Unhealthy, None, true),
    ];
    let d = w.decide(t0, &views(t0, down));
    assert_eq!(d.start, Some(Docker));
    assert_eq!(
        d.recheck_at,
        Some(at(3)),
        "asks again when patience runs out"
    );

    let docker_starting: &[Row] = &[
        (Docker, Starting, None, true),
        (Local, Unhealthy, None, true),
        (GcpVm, Unhealthy, None, true),
    ];
    let d = w.decide(at(1), &views(at(1), docker_starting));
    assert_eq!(d.start, None, "within patience");
    assert_eq!(d.recheck_at, Some(at(3)));

    // Docker has not come up within start_patience: local is asked too,
    // and gcp_vm only after local's own patience.
    let d = w.decide(at(3), &views(at(3), docker_starting));
    assert_eq!(d.start, Some(Local));
    assert_eq!(d.recheck_at, Some(at(6)));
    assert_eq!(w.starting().collect::<Vec<_>>(), vec![Docker, Local]);
    assert!(w.is_starting(Local) && !w.is_starting(GcpVm));
    let both_starting: &[Row] = &[
        (Docker, Starting, None, true),
        (Local, Starting, None, true),
        (GcpVm, Unhealthy, None, true),
    ];
    assert_eq!(w.decide(at(4), &views(at(4), both_starting)).start, None);

    // Local is healthy first and takes traffic; docker coming up later
    // waits for the hysteresis, as a tier that failed.
    let local_up: &[Row] = &[
        (Docker, Starting, None, true),
        (Local, Healthy, Some(0), true),
        (GcpVm, Unhealthy, None, true),
    ];
    w.start_finished(Local, true);
    let d = w.decide(at(5), &views(at(5), local_up));
    assert_eq!(d.active, Some(Local));
    assert_eq!(d.start, None);
    w.start_finished(Docker, true);
    let docker_up: &[Row] = &[
        (Docker, Healthy, Some(0), true),
        (Local, Healthy, Some(2), true),
        (GcpVm, Unhealthy, None, true),
    ];
    let d = w.decide(at(7), &views(at(7), docker_up));
    assert_eq!(d.active, Some(Local));
    assert_eq!(d.recheck_at, Some(at(7) + FAILBACK));
}

#[test]
fn start_patience_starts_nothing_when_no_other_tier_can_start() {
    let mut w = waterfall();
    let t0 = base();
    let rows: &[Row] = &[
        (Docker, Unhealthy, None, true),
        (CloudRun, Unhealthy, None, false),
        (Local, Unavailable, None, true),
    ];
    assert_eq!(w.decide(t0, &views(t0, rows)).start, Some(Docker));
    let starting: &[Row] = &[
        (Docker, Starting, None, true),
        (CloudRun, Unhealthy, None, false),
        (Local, Unavailable, None, true),
    ];
    let later = t0 + PATIENCE * 2;
    let d = w.decide(later, &views(later, starting));
    assert_eq!(d.start, None);
    assert_eq!(d.recheck_at, None, "nothing to wait for but docker's start");
}

#[test]
fn a_round_ends_only_when_every_start_has_finished() {
    let mut w = waterfall();
    let t0 = base();
    let down: &[Row] = &[
        (Docker, Unhealthy, None, true),
        (Local, Unhealthy, None, true),
    ];
    assert_eq!(w.decide(t0, &views(t0, down)).start, Some(Docker));
    let later = t0 + PATIENCE;
    assert_eq!(w.decide(later, &views(later, down)).start, Some(Local));
    // Local fails fast while docker is still starting: no new round yet.
    w.start_finished(Local, false);
    let d = w.decide(later, &views(later, down));
    assert_eq!((d.start, d.recheck_at), (None, None));
    // Docker fails too: the round is over and the next waits its backoff.
    w.start_finished(Docker, false);
    let d = w.decide(later, &views(later, down));
    assert_eq!(d.start, None);
    assert_eq!(d.recheck_at, Some(later + Duration::from_secs(1)));
}

#[test]
fn a_tier_whose_platform_is_down_is_skipped_by_the_start_phase() {
    // The tier actor reports such a tier as not startable (its probe said
    // `PlatformDown`): the start phase goes straight to the next tier.
    let mut w = waterfall();
    let now = base();
    let mut rows = views(
        now,
        &[
            (Docker, Unhealthy, None, true),
            (Local, Unhealthy, None, true),
        ],
    );
    rows[0].startable = false;
    rows[0].reason = "daemon not responding (ping took longer than 1s)";
    let d = w.decide(now, &rows);
    assert_eq!(d.start, Some(Local));
    assert_eq!(
        d.line.as_deref(),
        Some(
            "no tier is healthy: docker: daemon not responding (ping took longer than 1s); local: breaker open after 5 consecutive 503s"
        )
    );
}

fn with_standby(tiers: &[TierId]) -> Waterfall {
    let mut c = config();
    c.standby = tiers.iter().copied().collect();
    Waterfall::with_backoff(&c, Backoff::new(c.start_retry.clone()))
}

#[test]
fn a_standby_tier_is_started_and_kept_started_while_another_tier_is_active() {
    let mut w = with_standby(&[Local]);
    let now = base();
    let rows: &[Row] = &[
        (Docker, Healthy, Some(100), true),
        (Local, Unhealthy, None, true),
    ];
    let d = w.decide(now, &views(now, rows));
    assert_eq!(d.active, Some(Docker));
    assert_eq!(
        d.start,
        Some(Local),
        "standby is started although docker serves"
    );

    let starting: &[Row] = &[
        (Docker, Healthy, Some(100), true),
        (Local, Starting, None, true),
    ];
    assert_eq!(w.decide(now, &views(now, starting)).start, None);
    w.start_finished(Local, true);
    let warm: &[Row] = &[
        (Docker, Healthy, Some(100), true),
        (Local, Healthy, Some(0), true),
    ];
    let d = w.decide(now, &views(now, warm));
    assert_eq!((d.active, d.start), (Some(Docker), None));

    // Docker breaks: traffic moves to the warm standby at once, no start.
    let broken: &[Row] = &[
        (Docker, Unhealthy, None, true),
        (Local, Healthy, Some(5), true),
    ];
    let d = w.decide(now, &views(now, broken));
    assert_eq!((d.active, d.start), (Some(Local), None));
}

#[test]
fn a_standby_tier_is_left_alone_when_a_start_cannot_help() {
    for (state, startable) in [
        (Unknown, true),
        (Probing, true),
        (Starting, true),
        (Unavailable, true),
        (Unhealthy, false),
        (Degraded, true),
        (Healthy, true),
    ] {
        let mut w = with_standby(&[Local]);
        let now = base();
        let rows: &[Row] = &[
            (Docker, Healthy, Some(100), true),
            (Local, state, None, startable),
        ];
        let d = w.decide(now, &views(now, rows));
        assert_eq!(d.start, None, "{state:?}, startable {startable}");
    }
    // Only standby tiers are started while a tier serves.
    let mut w = with_standby(&[GcpVm]);
    let now = base();
    let rows: &[Row] = &[
        (Docker, Healthy, Some(100), true),
        (Local, Unhealthy, None, true),
    ];
    assert_eq!(w.decide(now, &views(now, rows)).start, None);
}

#[test]
fn starts_of_a_failing_standby_tier_are_spaced_by_the_backoff() {
    let mut w = with_standby(&[Local]);
    let t0 = base();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let down: &[Row] = &[
        (Docker, Healthy, Some(100), true),
        (Local, Unhealthy, None, true),
    ];
    assert_eq!(w.decide(t0, &views(t0, down)).start, Some(Local));
    w.start_finished(Local, false);
    let d = w.decide(at(100), &views(at(100), down));
    assert_eq!(d.start, None);
    assert_eq!(d.recheck_at, Some(at(1000)));
    assert_eq!(
        w.decide(at(1000), &views(at(1000), down)).start,
        Some(Local)
    );
    w.start_finished(Local, false);
    let d = w.decide(at(1100), &views(at(1100), down));
    assert_eq!(d.recheck_at, Some(at(3000)), "the second wait doubles");

    // A standby tier that served for `reset_after` starts over at once.
    assert_eq!(
        w.decide(at(3000), &views(at(3000), down)).start,
        Some(Local)
    );
    w.start_finished(Local, true);
    let served = at(3000) + Duration::from_secs(60);
    let up: &[Row] = &[
        (Docker, Healthy, Some(200), true),
        (Local, Healthy, Some(60), true),
    ];
    assert_eq!(w.decide(served, &views(served, up)).start, None);
    let later = served + Duration::from_millis(1);
    assert_eq!(w.decide(later, &views(later, down)).start, Some(Local));
}

#[test]
fn a_reload_that_puts_a_healthy_tier_first_waits_for_hysteresis() {
    let mut w = waterfall();
    let t0 = base();
    let first: &[Row] = &[(Docker, Probing, None, true), (Local, Probing, None, true)];
    w.decide(t0, &views(t0, first));
    let up: &[Row] = &[
        (Docker, Healthy, Some(0), true),
        (Local, Healthy, Some(0), true),
    ];
    assert_eq!(w.decide(t0, &views(t0, up)).active, Some(Docker));
    // Local, never failed, is put first by a reload: it is not a tier
    // coming up, so the carried-over active tier keeps traffic for now.
    let mut reordered = config();
    reordered.order = vec![Local, Docker];
    let mut w = w.reconfigured(&reordered, |_| true);
    let rows: &[Row] = &[
        (Local, Healthy, Some(1), true),
        (Docker, Healthy, Some(1), true),
    ];
    let d = w.decide(t0, &views(t0, rows));
    assert_eq!(d.active, Some(Docker));
    assert_eq!(d.recheck_at, Some(t0 + FAILBACK - Duration::from_secs(1)));
}

#[test]
fn explain_follows_the_tiers_now_and_names_when_a_failback_is_due() {
    let mut w = waterfall();
    let t0 = base();
    let wall = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let down = [
        (Docker, Unhealthy, None, true),
        (Local, Healthy, Some(100), true),
    ];
    let d = w.decide(t0, &views(t0, &down));
    assert_eq!(d.active, Some(Local));
    assert_eq!(
        w.explain(t0, wall, &views(t0, &down)),
        "active tier: local (docker: breaker open after 5 consecutive 503s)"
    );

    // Docker is back for 10 s of its 30: the log line is not rewritten,
    // the account of the present is.
    let back = [
        (Docker, Healthy, Some(10), true),
        (Local, Healthy, Some(100), true),
    ];
    let d = w.decide(t0, &views(t0, &back));
    assert_eq!(d.line, None);
    assert_eq!(
        w.explain(t0, wall, &views(t0, &back)),
        "active tier: local (docker: ready, failback at 2027-01-15T08:00:20Z (once healthy for 30s))"
    );

    let none = [
        (Docker, Unavailable, None, false),
        (Local, Unhealthy, None, true),
    ];
    w.decide(t0, &views(t0, &none));
    assert_eq!(
        w.explain(t0, wall, &views(t0, &none)),
        "no tier is healthy: docker: not installed; local: breaker open after 5 consecutive 503s"
    );
}
