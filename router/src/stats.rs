//! What the router tells operators: requests in flight, the request rate,
//! the last request that a retry carried to another endpoint, and, per
//! tier, 15 minutes of request rate and p99 latency beside a strip of the
//! tier's state (active / healthy / down).
//!
//! All of it is in memory and bounded: fixed 5-second slots (180 of them)
//! with a log-scale latency histogram each, and at most [`MAX_CHANGES`]
//! state changes per tier. Recording takes one short lock, never across an
//! await; the status API reads copies.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use cascade_actors::TierId;
use cascade_actors::routing::RoutingTable;
use serde::Serialize;
use tokio::time::Instant;

/// Width of one history slot.
pub const SLOT: Duration = Duration::from_secs(5);
/// How far back the history goes.
pub const SPAN: Duration = Duration::from_secs(15 * 60);
const SLOTS: usize = (SPAN.as_secs() / SLOT.as_secs()) as usize;
/// State changes kept per tier, however much a tier flaps.
pub const MAX_CHANGES: usize = 512;
/// The request rate in the status is over this many seconds.
const RATE_WINDOW: usize = 10;

/// Latency buckets: bucket `i` holds latencies up to `100 µs × 1.25^i`
/// (the last one is open), so a p99 read from it is within 25 %.
const BUCKETS: usize = 64;
const FIRST_BOUND_MS: f64 = 0.1;
const GROWTH: f64 = 1.25;

fn bucket_of(latency: Duration) -> usize {
    let ms = latency.as_secs_f64() * 1000.0;
    if ms <= FIRST_BOUND_MS {
        return 0;
    }
    let i = (ms / FIRST_BOUND_MS).ln() / GROWTH.ln();
    (i.ceil() as usize).min(BUCKETS - 1)
}

fn bucket_bound_ms(i: usize) -> f64 {
    FIRST_BOUND_MS * GROWTH.powi(i as i32)
}

#[derive(Debug, Clone)]
struct Slot {
    index: u64,
    count: u64,
    buckets: [u32; BUCKETS],
}

impl Slot {
    fn new(index: u64) -> Slot {
        Slot {
            index,
            count: 0,
            buckets: [0; BUCKETS],
        }
    }

    fn p99_ms(&self) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (self.count as f64 * 0.99).ceil() as u64;
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                return Some(bucket_bound_ms(i));
            }
        }
        Some(bucket_bound_ms(BUCKETS - 1))
    }
}

/// A tier's state as the strip draws it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Active,
    Healthy,
    Down,
}

#[derive(Debug, Default)]
struct TierHistory {
    slots: VecDeque<Slot>,
    /// (milliseconds since the origin, phase), oldest first.
    changes: VecDeque<(u64, Phase)>,
}

/// The last request that a retry carried to another endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetriedFailover {
    #[serde(serialize_with = "cascade_actors::contract::rfc3339")]
    pub at: SystemTime,
    pub from: TierId,
    pub to: TierId,
    /// What the first try met.
    pub error: String,
    pub attempts: u32,
}

#[derive(Debug, Default)]
struct Inner {
    /// Requests per second for the rate: (second index, count).
    seconds: [(u64, u64); RATE_WINDOW],
    tiers: BTreeMap<TierId, TierHistory>,
    last_failover: Option<RetriedFailover>,
}

/// The router's counters; one per router, shared by its requests.
#[derive(Debug)]
pub struct Stats {
    origin: Instant,
    origin_wall: SystemTime,
    in_flight: AtomicU64,
    requests: AtomicU64,
    retried: AtomicU64,
    inner: Mutex<Inner>,
}

/// `router` in `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterStatus {
    /// Where applications send requests.
    pub address: String,
    pub in_flight: u64,
    /// Requests answered since start.
    pub requests: u64,
    /// Requests per second over the last 10 s.
    pub request_rate: f64,
    /// Requests that took more than one try.
    pub retried: u64,
    pub last_retried_failover: Option<RetriedFailover>,
}

/// What the status page draws.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct History {
    /// Unix milliseconds the series end at.
    pub now_ms: u64,
    pub span_ms: u64,
    pub slot_ms: u64,
    pub tiers: Vec<TierSeries>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierSeries {
    pub tier: TierId,
    /// One point per slot that saw requests, oldest first.
    pub points: Vec<Point>,
    /// The tier's phases, oldest first; each lasts until the next one (the
    /// last until `now_ms`).
    pub phases: Vec<PhaseSince>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Unix milliseconds at the slot's start.
    pub t_ms: u64,
    /// Requests per second over the slot.
    pub rate: f64,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseSince {
    pub since_ms: u64,
    pub phase: Phase,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            origin: Instant::now(),
            origin_wall: SystemTime::now(),
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under this lock can panic halfway through an update that matters.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    fn wall_ms(&self, ms: u64) -> u64 {
        let origin = self
            .origin_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(origin.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(ms)
    }

    /// A request came in; the guard counts it in flight until dropped.
    pub fn begin(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        cascade_actors::metrics::metrics().router_in_flight(1);
        InFlight(std::sync::Arc::clone(self))
    }

    /// A request got its answer (its head): `tier` is who answered, if any.
    pub fn answered(&self, now: Instant, tier: Option<TierId>, latency: Duration, attempts: u32) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if attempts > 1 {
            self.retried.fetch_add(1, Ordering::Relaxed);
        }
        let ms = self.ms(now);
        let second = ms / 1000;
        let slot = ms / SLOT.as_millis() as u64;
        let mut inner = self.lock();
        let cell = &mut inner.seconds[(second % RATE_WINDOW as u64) as usize];
        if cell.0 != second {
            *cell = (second, 0);
        }
        cell.1 += 1;
        if let Some(tier) = tier {
            let history = inner.tiers.entry(tier).or_default();
            if history.slots.back().is_none_or(|s| s.index != slot) {
                history.slots.push_back(Slot::new(slot));
                while history
                    .slots
                    .front()
                    .is_some_and(|s| s.index + (SLOTS as u64) <= slot)
                {
                    history.slots.pop_front();
                }
            }
            if let Some(current) = history.slots.back_mut() {
                current.count += 1;
                current.buckets[bucket_of(latency)] += 1;
            }
        }
    }

    /// A retry carried a request from `from` to `to`, where it succeeded.
    pub fn retried_failover(&self, from: TierId, to: TierId, error: String, attempts: u32) {
        self.lock().last_failover = Some(RetriedFailover {
            at: SystemTime::now(),
            from,
            to,
            error,
            attempts,
        });
    }

    /// Records each tier's phase from a newly published table.
    pub fn observe(&self, table: &RoutingTable, now: Instant) {
        let ms = self.ms(now);
        let mut inner = self.lock();
        for tier in &table.tiers {
            let phase = if !tier.is_serving() {
                Phase::Down
            } else if table.active == Some(tier.tier) {
                Phase::Active
            } else {
                Phase::Healthy
            };
            let history = inner.tiers.entry(tier.tier).or_default();
            if history.changes.back().map(|(_, p)| *p) != Some(phase) {
                history.changes.push_back((ms, phase));
            }
            // Keep one change from before the span: it says what the strip starts with.
            let cutoff = ms.saturating_sub(SPAN.as_millis() as u64);
            while history.changes.len() > MAX_CHANGES
                || (history.changes.len() > 1 && history.changes[1].0 <= cutoff)
            {
                history.changes.pop_front();
            }
        }
    }

    pub fn status(&self, address: String, now: Instant) -> RouterStatus {
        let second = self.ms(now) / 1000;
        let inner = self.lock();
        // The current second is still filling: the rate is over the ones before it.
        let counted: u64 = inner
            .seconds
            .iter()
            .filter(|(s, _)| *s < second && s + RATE_WINDOW as u64 >= second)
            .map(|(_, n)| n)
            .sum();
        RouterStatus {
            address,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            request_rate: counted as f64 / RATE_WINDOW as f64,
            retried: self.retried.load(Ordering::Relaxed),
            last_retried_failover: inner.last_failover.clone(),
        }
    }

    pub fn history(&self, now: Instant) -> History {
        let ms = self.ms(now);
        let slot_ms = SLOT.as_millis() as u64;
        let current = ms / slot_ms;
        let inner = self.lock();
        let tiers = inner
            .tiers
            .iter()
            .map(|(tier, h)| TierSeries {
                tier: *tier,
                points: h
                    .slots
                    .iter()
                    .filter(|s| s.index + (SLOTS as u64) > current)
                    .map(|s| {
                        // The slot in progress is divided by the time it has run.
                        let width = if s.index == current {
                            (ms - s.index * slot_ms).max(1)
                        } else {
                            slot_ms
                        };
                        Point {
                            t_ms: self.wall_ms(s.index * slot_ms),
                            rate: s.count as f64 * 1000.0 / width as f64,
                            p99_ms: s.p99_ms(),
                        }
                    })
                    .collect(),
                phases: h
                    .changes
                    .iter()
                    .map(|(at, phase)| PhaseSince {
                        since_ms: self.wall_ms(*at),
                        phase: *phase,
                    })
                    .collect(),
            })
            .collect();
        History {
            now_ms: self.wall_ms(ms),
            span_ms: SPAN.as_millis() as u64,
            slot_ms,
            tiers,
        }
    }
}

/// Counts one request in flight while it lives.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        cascade_actors::metrics::metrics().router_in_flight(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_actors::TierState;
    use cascade_actors::routing::{Endpoint, RouteInfo, RouteTier};
    use std::sync::Arc;

    #[test]
    fn buckets_bound_latency_within_a_quarter() {
        for ms in [0.05, 0.1, 1.0, 3.3, 250.0, 9_000.0] {
            let latency = Duration::from_secs_f64(ms / 1000.0);
            let bound = bucket_bound_ms(bucket_of(latency));
            assert!(
                bound >= ms * 0.999 && bound <= (ms * 1.25).max(0.1) * 1.001,
                "{ms} → {bound}"
            );
        }
        assert_eq!(bucket_of(Duration::from_secs(100_000)), BUCKETS - 1);
    }

    #[test]
    fn rate_and_p99_come_from_the_slots_and_old_slots_expire() {
        let stats = Stats::new();
        let t0 = stats.origin;
        for i in 0..100 {
            let latency = if i == 99 {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(2)
            };
            stats.answered(
                t0 + Duration::from_millis(10 * i),
                Some(TierId::Local),
                latency,
                1,
            );
        }
        let history = stats.history(t0 + Duration::from_secs(6));
        let local = &history.tiers[0];
        assert_eq!(local.points.len(), 1);
        assert_eq!(local.points[0].rate, 20.0);
        let p99 = local.points[0].p99_ms.unwrap();
        assert!((2.0..2.6).contains(&p99), "p99 {p99}");
        let later = stats.history(t0 + SPAN + Duration::from_secs(10));
        assert!(
            later.tiers[0].points.is_empty(),
            "15 minutes on, the slot is gone"
        );
        let status = stats.status("127.0.0.1:8700".into(), t0 + Duration::from_secs(2));
        assert_eq!(status.requests, 100);
        assert_eq!(status.request_rate, 10.0);
    }

    #[test]
    fn phases_change_only_on_change_and_stay_bounded() {
        let stats = Stats::new();
        let t0 = stats.origin;
        let tier = |state| RouteTier {
            tier: TierId::Docker,
            state,
            reason: String::new(),
            endpoints: vec![Endpoint::new("c", "http://127.0.0.1:1")],
            info: RouteInfo::default(),
            reporter: None,
        };
        let table = |state, active| RoutingTable {
            active,
            tiers: vec![tier(state)],
            ..RoutingTable::default()
        };
        stats.observe(&table(TierState::Healthy, None), t0);
        stats.observe(
            &table(TierState::Healthy, None),
            t0 + Duration::from_secs(1),
        );
        stats.observe(
            &table(TierState::Healthy, Some(TierId::Docker)),
            t0 + Duration::from_secs(2),
        );
        let phases: Vec<Phase> = stats.history(t0).tiers[0]
            .phases
            .iter()
            .map(|p| p.phase)
            .collect();
        assert_eq!(phases, [Phase::Healthy, Phase::Active]);
        for i in 0..2000u64 {
            let state = if i % 2 == 0 {
                TierState::Unhealthy
            } else {
                TierState::Healthy
            };
            stats.observe(&table(state, None), t0 + Duration::from_millis(3000 + i));
        }
        assert!(stats.history(t0).tiers[0].phases.len() <= MAX_CHANGES);
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let stats = Arc::new(Stats::new());
        let a = stats.begin();
        let b = stats.begin();
        assert_eq!(stats.status(String::new(), Instant::now()).in_flight, 2);
        drop(a);
        drop(b);
        assert_eq!(stats.status(String::new(), Instant::now()).in_flight, 0);
    }
}
