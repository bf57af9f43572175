//! The circuit breaker: stops sending calls to a backend that keeps failing, then lets a few
//! trial calls through to find out whether it has recovered.
//!
//! Pure state machine: it does no I/O and never reads the clock; every method that needs time
//! takes `now`. Closed → Open when either rule fires on a failure (N consecutive failures, or a
//! failure rate over the sliding `window` once `minimum_volume` calls were seen), or when M
//! consecutive *requests* (the router's, counted apart from probes, which may pass while the
//! requests fail) failed: passive outlier detection through the same breaker. Open becomes
//! HalfOpen lazily, once `now` passes the end of the open period. In HalfOpen, a trial success
//! closes the breaker and a trial failure re-opens it for twice the previous period, capped at
//! `open_max`; closing resets the doubling. Time arithmetic saturates, so no configuration or
//! instant makes it panic.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::backoff::doubled_capped;
use super::deadline::saturating_add;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Opens after this many consecutive failures.
    pub consecutive_failures: u32,
    /// Or when failures/total over `window` reaches this ...
    pub failure_rate: f64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// ... and at least this many calls were recorded in the window.
    pub minimum_volume: u32,
    /// The first open period.
    #[serde(with = "humantime_serde")]
    pub open_base: Duration,
    /// Each re-open (a failed half-open trial) doubles the open period up to this cap.
    #[serde(with = "humantime_serde")]
    pub open_max: Duration,
    /// Concurrent trial calls admitted while half-open.
    pub half_open_trials: u32,
    /// Opens after this many consecutive failed requests the router proxied
    /// to the tier (a connection error, a reset, HTTP 502/503/504, a
    /// timeout), counted apart from probes.
    pub consecutive_request_failures: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: Duration::from_secs(60),
            minimum_volume: 10,
            open_base: Duration::from_secs(5),
            open_max: Duration::from_secs(300),
            half_open_trials: 1,
            consecutive_request_failures: 5,
        }
    }
}

impl BreakerConfig {
    /// Problems with this configuration as `(field, problem)`; empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, text: String| problems.push((field.to_owned(), text));
        if self.consecutive_failures == 0 {
            problem("consecutive_failures", "must be at least 1".into());
        }
        // Written so that NaN fails too.
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            problem(
                "failure_rate",
                format!("must be in (0, 1], got {}", self.failure_rate),
            );
        }
        if self.window.is_zero() {
            problem("window", "must be greater than zero".into());
        }
        if self.open_base.is_zero() {
            // A zero open period never stops calls: the breaker would be decorative.
            problem("open_base", "must be greater than zero".into());
        }
        if self.open_base > self.open_max {
            problem(
                "open_max",
                format!(
                    "must be at least open_base ({})",
                    crate::text::duration(self.open_base)
                ),
            );
        }
        if self.half_open_trials == 0 {
            problem("half_open_trials", "must be at least 1".into());
        }
        if self.consecutive_request_failures == 0 {
            problem("consecutive_request_failures", "must be at least 1".into());
        }
        problems
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TripReason {
    /// Failures since the last success, including failed half-open trials.
    ConsecutiveFailures(u32),
    /// Proxied requests that failed in a row.
    ConsecutiveRequestFailures(u32),
    /// Failures and total calls inside the rate window when it tripped.
    FailureRate { failures: u32, total: u32 },
    /// [`CircuitBreaker::force_open`]; `reason` is displayed verbatim.
    Forced { reason: String },
}

impl fmt::Display for TripReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConsecutiveFailures(1) => f.write_str("1 consecutive failure"),
            Self::ConsecutiveFailures(n) => write!(f, "{n} consecutive failures"),
            Self::ConsecutiveRequestFailures(1) => f.write_str("1 consecutive request failure"),
            Self::ConsecutiveRequestFailures(n) => write!(f, "{n} consecutive request failures"),
            Self::FailureRate { failures, total } => {
                write!(f, "failure rate {failures}/{total} within the window")
            }
            Self::Forced { reason } if reason.is_empty() => f.write_str("forced open"),
            Self::Forced { reason } => f.write_str(reason),
        }
    }
}

/// The answer to "may I make a call now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// Half-open: go ahead, and report the outcome — it decides whether the breaker closes.
    Trial,
    /// Do not call before `until`. While open, `until` is the end of the open period. While
    /// half-open with every trial slot taken, it is when the in-flight trials are presumed lost
    /// (see [`CircuitBreaker::admit`]); normally a trial outcome changes the state sooner.
    Rejected { until: Instant },
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        in_flight: u32,
        /// When the in-flight trials are presumed lost.
        lease_until: Instant,
    },
}

impl Phase {
    fn state(self) -> BreakerState {
        match self {
            Self::Closed => BreakerState::Closed,
            Self::Open { .. } => BreakerState::Open,
            Self::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// Un-taken transitions are kept in order up to this many; beyond it the oldest are dropped, so
/// a caller that never takes them cannot grow memory without bound.
const MAX_PENDING_TRANSITIONS: usize = 16;

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    phase: Phase,
    consecutive: u32,
    /// Failed requests since the last successful one (or the last close).
    consecutive_requests: u32,
    /// `(when, failed)` for calls recorded while closed, oldest first, all inside `window`.
    outcomes: VecDeque<(Instant, bool)>,
    window_failures: u32,
    /// Re-opens since the breaker last closed: the doubling exponent of the open period.
    reopens: u32,
    trip_reason: Option<TripReason>,
    open_until: Option<Instant>,
    times_opened: u64,
    transitions: VecDeque<(BreakerState, BreakerState)>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            phase: Phase::Closed,
            consecutive: 0,
            consecutive_requests: 0,
            outcomes: VecDeque::new(),
            window_failures: 0,
            reopens: 0,
            trip_reason: None,
            open_until: None,
            times_opened: 0,
            transitions: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The state at `now`. An elapsed open period reads as HalfOpen here; the breaker records
    /// that transition at its next `admit`/`record_*`/`force_open`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.phase {
            Phase::Open { until } if now >= until => BreakerState::HalfOpen,
            phase => phase.state(),
        }
    }

    /// May a call be made now? Closed → `Allowed`. Open → `Rejected { until: end of period }`.
    /// HalfOpen → `Trial` while fewer than `half_open_trials` trials are in flight, else
    /// `Rejected`. A trial is in flight from its `Trial` admission until any outcome is
    /// recorded; trials whose outcome never arrives (the caller was cancelled) are presumed lost
    /// one open period after the last trial was admitted, so the breaker cannot stay half-open
    /// forever.
    pub fn admit(&mut self, now: Instant) -> Admission {
        self.advance(now);
        match self.phase {
            Phase::Closed => {
                self.prune(now);
                Admission::Allowed
            }
            Phase::Open { until } => Admission::Rejected { until },
            Phase::HalfOpen {
                in_flight,
                lease_until,
            } => {
                let in_flight = if now >= lease_until { 0 } else { in_flight };
                if in_flight < self.config.half_open_trials.max(1) {
                    self.phase = Phase::HalfOpen {
                        in_flight: in_flight.saturating_add(1),
                        lease_until: saturating_add(now, self.open_period()),
                    };
                    Admission::Trial
                } else {
                    Admission::Rejected { until: lease_until }
                }
            }
        }
    }

    /// Closed: resets the consecutive count and enters the rate window. HalfOpen: the trial
    /// worked, so close (window cleared, doubling reset). Open: a call admitted before the trip
    /// finished late; one straggler does not cut the open period short.
    pub fn record_success(&mut self, now: Instant) {
        self.advance(now);
        self.consecutive = 0;
        match self.phase {
            Phase::Closed => self.push_outcome(now, false),
            Phase::HalfOpen { .. } => self.close(),
            Phase::Open { .. } => {}
        }
    }

    /// Closed: enters the rate window and may trip (consecutive rule first, then rate). HalfOpen:
    /// the trial failed, so re-open for twice the previous period (capped). Open: a straggler;
    /// counted as a consecutive failure, the period is unchanged.
    pub fn record_failure(&mut self, now: Instant) {
        self.advance(now);
        self.consecutive = self.consecutive.saturating_add(1);
        match self.phase {
            Phase::Closed => {
                self.push_outcome(now, true);
                if let Some(reason) = self.trip_rule() {
                    self.open(now, Duration::ZERO, reason);
                }
            }
            Phase::HalfOpen { .. } => {
                self.reopens = self.reopens.saturating_add(1);
                self.open(
                    now,
                    Duration::ZERO,
                    TripReason::ConsecutiveFailures(self.consecutive),
                );
            }
            Phase::Open { .. } => {}
        }
    }

    /// A proxied request failed. Closed: trips once `consecutive_request_failures` requests
    /// failed in a row. Open or HalfOpen: counted only; the probes' trials decide when it closes
    /// (a request that failed was sent before the breaker opened).
    pub fn record_request_failure(&mut self, now: Instant) {
        self.advance(now);
        self.consecutive_requests = self.consecutive_requests.saturating_add(1);
        if let Phase::Closed = self.phase
            && self.consecutive_requests >= self.config.consecutive_request_failures
        {
            self.open(
                now,
                Duration::ZERO,
                TripReason::ConsecutiveRequestFailures(self.consecutive_requests),
            );
        }
    }

    /// A proxied request got an answer: the run of request failures ends. Probes' counts are
    /// untouched.
    pub fn record_request_success(&mut self) {
        self.consecutive_requests = 0;
    }

    /// Failed requests since the last successful one or the last close.
    pub fn consecutive_request_failures(&self) -> u32 {
        self.consecutive_requests
    }

    /// Opens for `max(for_at_least, current open period)`, e.g. when upstream sent Retry-After.
    /// From HalfOpen this counts as a failed trial (the period doubles first). Already open: the
    /// period is extended if this ends later, never shortened.
    pub fn force_open(&mut self, now: Instant, for_at_least: Duration, reason: String) {
        self.advance(now);
        if let Phase::HalfOpen { .. } = self.phase {
            self.reopens = self.reopens.saturating_add(1);
        }
        self.open(now, for_at_least, TripReason::Forced { reason });
    }

    /// Back to Closed with counts and doubling cleared, e.g. after a successful (re)start.
    /// `times_opened` is a lifetime metric and is kept.
    pub fn reset(&mut self) {
        self.consecutive = 0;
        self.close();
    }

    /// Failures since the last recorded success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Why it is (or, while half-open, last was) open; `None` while closed.
    pub fn trip_reason(&self) -> Option<&TripReason> {
        self.trip_reason.as_ref()
    }

    /// The end of the current or latest open period; `None` while closed. May be in the past,
    /// in which case [`state`](Self::state) reads HalfOpen.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    /// Total transitions into Open, for metrics.
    pub fn times_opened(&self) -> u64 {
        self.times_opened
    }

    /// The oldest transition `(from, to)` not yet taken. Each transition is returned once, in
    /// order; call in a loop after an operation to see all of them (one call can cause two,
    /// e.g. Open → HalfOpen → Closed). At most 16 are kept.
    pub fn take_transition(&mut self) -> Option<(BreakerState, BreakerState)> {
        self.transitions.pop_front()
    }

    /// How long the breaker would open for if it opened now.
    pub fn open_period(&self) -> Duration {
        doubled_capped(self.config.open_base, self.reopens, self.config.open_max)
    }

    /// Applies the lazy Open → HalfOpen transition.
    fn advance(&mut self, now: Instant) {
        let elapsed = matches!(self.phase, Phase::Open { until } if now >= until);
        if elapsed {
            self.transition(Phase::HalfOpen {
                in_flight: 0,
                lease_until: now,
            });
        }
    }

    fn transition(&mut self, to: Phase) {
        let from = self.phase.state();
        self.phase = to;
        if from != to.state() {
            if self.transitions.len() >= MAX_PENDING_TRANSITIONS {
                self.transitions.pop_front();
            }
            self.transitions.push_back((from, to.state()));
        }
    }

    fn open(&mut self, now: Instant, at_least: Duration, reason: TripReason) {
        let until = saturating_add(now, self.open_period().max(at_least));
        match self.phase {
            Phase::Open { until: current } if current >= until => return,
            Phase::Open { .. } => {}
            Phase::Closed | Phase::HalfOpen { .. } => {
                self.times_opened = self.times_opened.saturating_add(1);
            }
        }
        self.transition(Phase::Open { until });
        self.open_until = Some(until);
        self.trip_reason = Some(reason);
    }

    fn close(&mut self) {
        self.consecutive_requests = 0;
        self.outcomes.clear();
        self.window_failures = 0;
        self.reopens = 0;
        self.trip_reason = None;
        self.open_until = None;
        self.transition(Phase::Closed);
    }

    fn trip_rule(&self) -> Option<TripReason> {
        if self.consecutive >= self.config.consecutive_failures {
            return Some(TripReason::ConsecutiveFailures(self.consecutive));
        }
        let total = u32::try_from(self.outcomes.len()).unwrap_or(u32::MAX);
        let rate = f64::from(self.window_failures) / f64::from(total);
        (total > 0 && total >= self.config.minimum_volume && rate >= self.config.failure_rate)
            .then_some(TripReason::FailureRate {
                failures: self.window_failures,
                total,
            })
    }

    fn push_outcome(&mut self, now: Instant, failed: bool) {
        self.prune(now);
        self.outcomes.push_back((now, failed));
        if failed {
            self.window_failures = self.window_failures.saturating_add(1);
        }
    }

    /// Drops outcomes that are at least `window` old.
    fn prune(&mut self, now: Instant) {
        while let Some(&(at, failed)) = self.outcomes.front() {
            if now.saturating_duration_since(at) < self.config.window {
                break;
            }
            self.outcomes.pop_front();
            if failed {
                self.window_failures = self.window_failures.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests;
