//! The waterfall: which tier is active, and when to start one.
//!
//! Pure, clock-driven decision logic. The root supervisor feeds it the
//! tiers' states and the current time; it answers with the active tier, a log
//! line when that changed, at most one tier to start, and when to ask again.
//!
//! Invariant: no I/O and no clock reads; `now` is always an argument.
//!
//! Rules, in order:
//! 0. The first decision waits for better tiers' first probes, each until
//!    its answer is due (the tier's spawn plus its probe timeout), so a
//!    slower probe of a better tier does not hand the first traffic to a
//!    worse one.
//! 1. While the active tier serves, it stays active, unless a better tier
//!    (earlier in the configured order) has been healthy for
//!    `failback_after`; then cascade fails back to the best such tier. The
//!    hysteresis keeps a flapping better tier from stealing traffic, so it
//!    applies only to a tier that failed: a better tier that has not failed
//!    since its first probe or since a restart on request (it went
//!    straight from pending or restarting to healthy) is failed back to at
//!    once.
//! 2. When the active tier stops serving (unhealthy, breaker open,
//!    unavailable), cascade fails over at once to the first healthy tier,
//!    else to the first degraded one. Failover never waits for hysteresis.
//! 3. Probing never starts anything. Only when no tier serves and every tier
//!    has reported a first probe, the start phase asks the first startable
//!    tier that has not failed this round to start (a tier whose probe
//!    found its platform not answering is not startable). When that tier
//!    has not come up within `start_patience`, the next one is asked too,
//!    and so on: the first to be healthy takes traffic, and a better one
//!    coming up later is failed back to with hysteresis. When every
//!    startable tier has failed, the next round waits a backoff.
//! 4. While a tier is active, each standby tier (`standby = true`) that is
//!    not serving, starting or waiting for its first probe is asked to
//!    start, so a failover to it finds it warm. Starts of one standby tier
//!    are spaced by the `start_retry` backoff, which resets once the tier
//!    has served for its `reset_after`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::contract::{TierId, TierState};
use crate::resilience::{Backoff, BackoffConfig, Jitter};

#[cfg(test)]
mod tests;

/// `[waterfall]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WaterfallConfig {
    /// Tiers by preference, best first. Only tiers listed here run.
    pub order: Vec<TierId>,
    /// How long a better tier must stay healthy before cascade fails back.
    #[serde(with = "humantime_serde")]
    pub failback_after: Duration,
    /// Wait between start rounds after every startable tier failed to start.
    pub start_retry: BackoffConfig,
    /// How long the start phase waits for a tier it asked to start before
    /// asking the next startable tier too.
    #[serde(with = "humantime_serde")]
    pub start_patience: Duration,
    /// Tiers kept started while another tier is active: each tier's own
    /// `standby` key, gathered by the loader (not a `[waterfall]` key).
    #[serde(skip)]
    pub standby: BTreeSet<TierId>,
}

impl WaterfallConfig {
    /// The shortest and longest `start_patience`: long enough for a local
    /// process to bind its port, short enough that a tier stuck in its start
    /// deadline never holds the service back for long.
    pub const START_PATIENCE: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(600));

    /// Problems with the settings, as (key, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let (min, max) = Self::START_PATIENCE;
        if self.start_patience < min || self.start_patience > max {
            problems.push((
                "start_patience".into(),
                format!(
                    "must be between {} and {}",
                    crate::text::duration(min),
                    crate::text::duration(max)
                ),
            ));
        }
        problems
    }
}

impl Default for WaterfallConfig {
    fn default() -> Self {
        WaterfallConfig {
            order: vec![
                TierId::Docker,
                TierId::CloudRun,
                TierId::Local,
                TierId::GcpVm,
            ],
            failback_after: Duration::from_secs(30),
            start_retry: BackoffConfig {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(60),
                reset_after: Duration::from_secs(60),
                jitter: Jitter::Full,
            },
            start_patience: Duration::from_secs(3),
            standby: BTreeSet::new(),
        }
    }
}

/// One tier as the waterfall sees it.
#[derive(Debug, Clone)]
pub struct TierView<'a> {
    pub tier: TierId,
    pub state: TierState,
    /// Why it is in that state, for decision lines.
    pub reason: &'a str,
    /// When it last became healthy; `None` while it is not.
    pub healthy_since: Option<Instant>,
    pub startable: bool,
    /// While its first probe is out: when that probe's answer is due at
    /// the latest.
    pub first_probe_due: Option<Instant>,
}

/// What to do after looking at the tiers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub active: Option<TierId>,
    /// A line to log because the active tier changed (or none is left).
    pub line: Option<String>,
    /// Ask this tier to start.
    pub start: Option<TierId>,
    /// Decide again at this time even if nothing else happens (hysteresis
    /// expiring, the next start round).
    pub recheck_at: Option<Instant>,
}

/// The waterfall's memory between decisions.
#[derive(Debug)]
pub struct Waterfall {
    failback_after: Duration,
    start_patience: Duration,
    active: Option<TierId>,
    /// The tiers asked to start and not finished yet, with when they were asked.
    starting: BTreeMap<TierId, Instant>,
    /// Tiers that failed to start in the current round.
    failed_this_round: BTreeSet<TierId>,
    next_round_at: Option<Instant>,
    round_backoff: Backoff,
    /// The last "no tier is healthy" line, so it is logged once per change.
    last_outage_line: Option<String>,
    /// Some tier has been active: the first decision is behind us.
    decided: bool,
    /// Tiers that have not failed since their first probe or since a
    /// restart on request: they take traffic back without hysteresis.
    fresh: BTreeSet<TierId>,
    /// Tiers kept started while another tier is active.
    standby: BTreeSet<TierId>,
    /// Per standby tier: the spacing of its starts, and the earliest time
    /// of its next one.
    standby_retry: BTreeMap<TierId, (Backoff, Option<Instant>)>,
    start_retry: BackoffConfig,
}

impl Waterfall {
    pub fn new(config: &WaterfallConfig) -> Self {
        Self::with_backoff(config, Backoff::new(config.start_retry.clone()))
    }

    pub fn with_backoff(config: &WaterfallConfig, round_backoff: Backoff) -> Self {
        Waterfall {
            failback_after: config.failback_after,
            start_patience: config.start_patience,
            active: None,
            starting: BTreeMap::new(),
            failed_this_round: BTreeSet::new(),
            next_round_at: None,
            round_backoff,
            last_outage_line: None,
            decided: false,
            fresh: BTreeSet::new(),
            standby: config.standby.clone(),
            standby_retry: BTreeMap::new(),
            start_retry: config.start_retry.clone(),
        }
    }

    /// The waterfall for a reloaded configuration. The active tier, a start
    /// in progress and a standby tier's start spacing carry over when
    /// `kept(tier)` (the tier still runs, untouched), and so does having
    /// decided once; the rest (hysteresis deadlines, start rounds) starts
    /// over. No kept tier counts as never failed: a reload that puts a
    /// healthy tier first moves traffic to it only after the hysteresis,
    /// like any failback of a tier with a history.
    pub fn reconfigured(&self, config: &WaterfallConfig, kept: impl Fn(TierId) -> bool) -> Self {
        let mut next = Waterfall::new(config);
        next.active = self.active.filter(|&t| kept(t));
        next.starting = self.starting.clone();
        next.starting.retain(|&t, _| kept(t));
        next.decided = self.decided;
        next.standby_retry = self
            .standby_retry
            .iter()
            .filter(|&(&t, _)| kept(t) && next.standby.contains(&t))
            .map(|(&t, (backoff, at))| {
                let mut backoff = backoff.clone();
                backoff.set_config(config.start_retry.clone());
                (t, (backoff, *at))
            })
            .collect();
        next
    }

    pub fn active(&self) -> Option<TierId> {
        self.active
    }

    /// The tiers asked to start that have not finished, best first.
    pub fn starting(&self) -> impl Iterator<Item = TierId> + '_ {
        self.starting.keys().copied()
    }

    /// Whether `tier` was asked to start and has not finished.
    pub fn is_starting(&self, tier: TierId) -> bool {
        self.starting.contains_key(&tier)
    }

    /// A tier asked to start has finished, well or not.
    pub fn start_finished(&mut self, tier: TierId, ok: bool) {
        self.starting.remove(&tier);
        if ok {
            self.failed_this_round.clear();
            self.round_backoff.reset();
        } else {
            self.failed_this_round.insert(tier);
        }
    }

    /// `views` must be in configured order, best first.
    pub fn decide(&mut self, now: Instant, views: &[TierView<'_>]) -> Decision {
        self.note_failures(views);
        let previous = self.active;
        let (active, recheck_at) = self.choose(now, views);
        self.active = active;
        self.decided |= active.is_some();

        let mut decision = Decision {
            active,
            recheck_at,
            ..Decision::default()
        };
        match active {
            Some(tier) => {
                self.last_outage_line = None;
                self.failed_this_round.clear();
                self.next_round_at = None;
                let (start, at) = self.standby_start(now, views, tier);
                decision.start = start;
                decision.recheck_at = earliest(decision.recheck_at, at);
                if previous != Some(tier) {
                    let fresh = self.fresh.contains(&tier);
                    decision.line = Some(active_line(
                        tier,
                        previous,
                        views,
                        now,
                        self.failback_after,
                        fresh,
                    ));
                }
            }
            None => {
                let line = outage_line(views);
                // While first probes are out, "no tier is healthy" is not news.
                let settled = !views.iter().any(|v| v.state.is_pending());
                if settled && self.last_outage_line.as_ref() != Some(&line) {
                    decision.line = Some(line.clone());
                    self.last_outage_line = Some(line);
                }
                let (start, at) = self.start_phase(now, views);
                decision.start = start;
                decision.recheck_at = earliest(decision.recheck_at, at);
            }
        }
        decision
    }

    /// The state of things now, in one line: the active tier and why each
    /// better tier is passed over (with a pending failback's time left), or
    /// why none serves. Unlike [`Decision::line`], which is written when the
    /// active tier changes, this follows every change of a tier's reason.
    /// `wall` is the wall-clock time at `now`: a pending failback is named
    /// by when it is due, which stays true until the next decision.
    pub fn explain(
        &self,
        now: Instant,
        wall: std::time::SystemTime,
        views: &[TierView<'_>],
    ) -> String {
        let Some(active) = self.active else {
            return outage_line(views);
        };
        let position = views.iter().position(|v| v.tier == active).unwrap_or(0);
        let mut line = format!("active tier: {active}");
        if views
            .get(position)
            .is_some_and(|v| v.state == TierState::Degraded)
        {
            line.push_str(" [degraded]");
        }
        let better: Vec<String> = views[..position]
            .iter()
            .map(|v| match v.healthy_since {
                Some(since) if v.state == TierState::Healthy => {
                    let due = since.checked_add(self.failback_after);
                    let left = due.map(|d| d.saturating_duration_since(now));
                    let at = left
                        .filter(|left| !left.is_zero())
                        .and_then(|left| wall.checked_add(left));
                    match at {
                        Some(at) => format!(
                            "{}: {}, failback at {} (once healthy for {})",
                            v.tier,
                            v.reason,
                            humantime::format_rfc3339_seconds(at),
                            crate::text::duration(self.failback_after)
                        ),
                        None => format!("{}: {}, failback due", v.tier, v.reason),
                    }
                }
                _ => format!("{}: {}", v.tier, v.reason),
            })
            .collect();
        if !better.is_empty() {
            line.push_str(&format!(" ({})", better.join("; ")));
        }
        line
    }

    /// Keeps `fresh` current: a pending tier, or one restarting without the
    /// start phase having asked (an operator's restart), starts with a clean
    /// record; a tier seen anything but healthy otherwise has failed.
    fn note_failures(&mut self, views: &[TierView<'_>]) {
        for v in views {
            let clean = v.state.is_pending()
                || (v.state == TierState::Starting && !self.is_starting(v.tier));
            if clean {
                self.fresh.insert(v.tier);
            } else if v.state != TierState::Healthy {
                self.fresh.remove(&v.tier);
            }
        }
    }

    fn choose(&self, now: Instant, views: &[TierView<'_>]) -> (Option<TierId>, Option<Instant>) {
        let current = self.active.and_then(|a| {
            views
                .iter()
                .position(|v| v.tier == a && v.state.is_serving())
        });
        let Some(current) = current else {
            let healthy = views.iter().position(|v| v.state == TierState::Healthy);
            let fallback = healthy.or_else(|| views.iter().position(|v| v.state.is_serving()));
            let Some(pick) = fallback else {
                return (None, None);
            };
            if !self.decided {
                let due = views[..pick]
                    .iter()
                    .filter(|v| v.state.is_pending())
                    .filter_map(|v| v.first_probe_due)
                    .filter(|&due| due > now)
                    .min();
                if let Some(due) = due {
                    return (None, Some(due));
                }
            }
            return (Some(views[pick].tier), None);
        };

        let mut recheck_at = None;
        for better in &views[..current] {
            if better.state == TierState::Healthy && self.fresh.contains(&better.tier) {
                return (Some(better.tier), None);
            }
            let Some(since) = better
                .healthy_since
                .filter(|_| better.state == TierState::Healthy)
            else {
                continue;
            };
            let ready_at = since + self.failback_after;
            if ready_at <= now {
                return (Some(better.tier), None);
            }
            recheck_at = earliest(recheck_at, Some(ready_at));
        }
        (Some(views[current].tier), recheck_at)
    }

    /// The next standby tier to start while `active` serves, if any, and
    /// when to look again for one whose next start must wait.
    fn standby_start(
        &mut self,
        now: Instant,
        views: &[TierView<'_>],
        active: TierId,
    ) -> (Option<TierId>, Option<Instant>) {
        let mut recheck_at = None;
        for v in views {
            if !self.standby.contains(&v.tier) || v.tier == active {
                continue;
            }
            let (backoff, not_before) = self
                .standby_retry
                .entry(v.tier)
                .or_insert_with(|| (Backoff::new(self.start_retry.clone()), None));
            let served_long = v.healthy_since.is_some_and(|since| {
                now.saturating_duration_since(since) >= backoff.config().reset_after
            });
            if served_long {
                backoff.reset();
                *not_before = None;
            }
            let idle = !v.state.is_serving()
                && !v.state.is_pending()
                && v.state != TierState::Starting
                && v.state != TierState::Unavailable
                && v.startable
                && !self.starting.contains_key(&v.tier);
            if !idle {
                continue;
            }
            if let Some(at) = *not_before
                && now < at
            {
                recheck_at = earliest(recheck_at, Some(at));
                continue;
            }
            *not_before = Some(crate::resilience::saturating_add(now, backoff.next_delay()));
            self.starting.insert(v.tier, now);
            return (Some(v.tier), None);
        }
        (None, recheck_at)
    }

    fn start_phase(
        &mut self,
        now: Instant,
        views: &[TierView<'_>],
    ) -> (Option<TierId>, Option<Instant>) {
        if views.iter().any(|v| v.state.is_pending()) {
            return (None, None);
        }
        // While a start is in progress, the next tier is asked only once
        // the latest start has had `start_patience` to come up.
        let patience_ends = self
            .starting
            .values()
            .max()
            .map(|&asked| crate::resilience::saturating_add(asked, self.start_patience));
        if let Some(at) = patience_ends
            && now < at
        {
            return (None, Some(at));
        }
        if let Some(at) = self.next_round_at {
            if now < at {
                return (None, Some(at));
            }
            self.next_round_at = None;
        }
        let candidate = views.iter().find(|v| {
            v.startable
                && v.state != TierState::Unavailable
                && v.state != TierState::Starting
                && !self.starting.contains_key(&v.tier)
                && !self.failed_this_round.contains(&v.tier)
        });
        if let Some(v) = candidate {
            self.starting.insert(v.tier, now);
            let at = crate::resilience::saturating_add(now, self.start_patience);
            return (Some(v.tier), Some(at));
        }
        if !self.starting.is_empty() {
            // Every other tier is tried or cannot start: wait for the starts.
            return (None, None);
        }
        if self.failed_this_round.is_empty() {
            // Nothing can be started; a tier recovering or an operator's
            // restart will change the views and bring us back here.
            return (None, None);
        }
        self.failed_this_round.clear();
        let at = now + self.round_backoff.next_delay();
        self.next_round_at = Some(at);
        (None, Some(at))
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn active_line(
    tier: TierId,
    previous: Option<TierId>,
    views: &[TierView<'_>],
    now: Instant,
    failback_after: Duration,
    fresh: bool,
) -> String {
    let position = views.iter().position(|v| v.tier == tier).unwrap_or(0);
    let chosen = &views[position];
    let failback = previous
        .and_then(|p| views.iter().position(|v| v.tier == p))
        .is_some_and(|p| p > position);
    let mut line = format!("active tier: {tier}");
    if failback && fresh {
        line.push_str(&format!(
            " (failback from {}: healthy and not failed since its first probe or restart)",
            previous.map(|p| p.as_str()).unwrap_or("none"),
        ));
        return line;
    }
    if failback {
        let healthy_for = chosen
            .healthy_since
            .map(|s| now.saturating_duration_since(s));
        let healthy_for = healthy_for.unwrap_or(failback_after);
        line.push_str(&format!(
            " (failback from {}: healthy for {})",
            previous.map(|p| p.as_str()).unwrap_or("none"),
            crate::text::duration(healthy_for)
        ));
        return line;
    }
    let better: Vec<String> = views[..position]
        .iter()
        .map(|v| format!("{}: {}", v.tier, v.reason))
        .collect();
    if chosen.state == TierState::Degraded {
        line.push_str(" [degraded]");
    }
    if !better.is_empty() {
        line.push_str(&format!(" ({})", better.join("; ")));
    }
    line
}

fn outage_line(views: &[TierView<'_>]) -> String {
    let reasons: Vec<String> = views
        .iter()
        .map(|v| format!("{}: {}", v.tier, v.reason))
        .collect();
    format!("no tier is healthy: {}", reasons.join("; "))
}
