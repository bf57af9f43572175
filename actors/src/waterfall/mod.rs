//! The waterfall: which tier is active, and when to start one.
//!
//! Pure, clock-driven decision logic. The root supervisor feeds it the
//! tiers' states and the current time; it answers with the active tier, a log
//! line when that changed, at most one tier to start, and when to ask again.
//!
//! Invariant: no I/O and no clock reads; `now` is always an argument.
//!
//! Rules, in order:
//! 1. While the active tier serves, it stays active, unless a better tier
//!    (earlier in the configured order) has been healthy for
//!    `failback_after`; then cascade fails back to the best such tier. The
//!    hysteresis keeps a flapping better tier from stealing traffic.
//! 2. When the active tier stops serving (unhealthy, breaker open,
//!    unavailable), cascade fails over at once to the first healthy tier,
//!    else to the first degraded one. Failover never waits for hysteresis.
//! 3. Probing never starts anything. Only when no tier serves, every tier has
//!    reported a first probe, and no start is in progress, the start phase
//!    asks the first startable tier that has not failed this round to start.
//!    When every startable tier has failed, the next round waits a backoff.

use std::collections::BTreeSet;
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
    active: Option<TierId>,
    /// The tier asked to start and not finished yet.
    starting: Option<TierId>,
    /// Tiers that failed to start in the current round.
    failed_this_round: BTreeSet<TierId>,
    next_round_at: Option<Instant>,
    round_backoff: Backoff,
    /// The last "no tier is healthy" line, so it is logged once per change.
    last_outage_line: Option<String>,
}

impl Waterfall {
    pub fn new(config: &WaterfallConfig) -> Self {
        Self::with_backoff(config, Backoff::new(config.start_retry.clone()))
    }

    pub fn with_backoff(config: &WaterfallConfig, round_backoff: Backoff) -> Self {
        Waterfall {
            failback_after: config.failback_after,
            active: None,
            starting: None,
            failed_this_round: BTreeSet::new(),
            next_round_at: None,
            round_backoff,
            last_outage_line: None,
        }
    }

    /// The waterfall for a reloaded configuration. The active tier and a
    /// start in progress carry over when `kept(tier)` (the tier still runs,
    /// untouched); everything else (hysteresis, start rounds) starts fresh.
    pub fn reconfigured(&self, config: &WaterfallConfig, kept: impl Fn(TierId) -> bool) -> Self {
        let mut next = Waterfall::new(config);
        next.active = self.active.filter(|&t| kept(t));
        next.starting = self.starting.filter(|&t| kept(t));
        next
    }

    pub fn active(&self) -> Option<TierId> {
        self.active
    }

    pub fn starting(&self) -> Option<TierId> {
        self.starting
    }

    /// The tier asked to start has finished, well or not.
    pub fn start_finished(&mut self, tier: TierId, ok: bool) {
        if self.starting == Some(tier) {
            self.starting = None;
        }
        if ok {
            self.failed_this_round.clear();
            self.round_backoff.reset();
        } else {
            self.failed_this_round.insert(tier);
        }
    }

    /// `views` must be in configured order, best first.
    pub fn decide(&mut self, now: Instant, views: &[TierView<'_>]) -> Decision {
        let previous = self.active;
        let (active, recheck_at) = self.choose(now, views);
        self.active = active;

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
                if previous != Some(tier) {
                    decision.line =
                        Some(active_line(tier, previous, views, now, self.failback_after));
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

    fn choose(&self, now: Instant, views: &[TierView<'_>]) -> (Option<TierId>, Option<Instant>) {
        let current = self.active.and_then(|a| {
            views
                .iter()
                .position(|v| v.tier == a && v.state.is_serving())
        });
        let Some(current) = current else {
            let healthy = views.iter().find(|v| v.state == TierState::Healthy);
            let fallback = healthy.or_else(|| views.iter().find(|v| v.state.is_serving()));
            return (fallback.map(|v| v.tier), None);
        };

        let mut recheck_at = None;
        for better in &views[..current] {
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

    fn start_phase(
        &mut self,
        now: Instant,
        views: &[TierView<'_>],
    ) -> (Option<TierId>, Option<Instant>) {
        if self.starting.is_some() || views.iter().any(|v| v.state.is_pending()) {
            return (None, None);
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
                && !self.failed_this_round.contains(&v.tier)
        });
        if let Some(v) = candidate {
            self.starting = Some(v.tier);
            return (Some(v.tier), None);
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
) -> String {
    let position = views.iter().position(|v| v.tier == tier).unwrap_or(0);
    let chosen = &views[position];
    let failback = previous
        .and_then(|p| views.iter().position(|v| v.tier == p))
        .is_some_and(|p| p > position);
    let mut line = format!("active tier: {tier}");
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
