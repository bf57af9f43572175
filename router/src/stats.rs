//! What the router tells operators: requests in flight, the request rate,
//! the last request that a retry carried to another endpoint, and, per
//! tier, 15 minutes of request rate and p99 latency beside a strip of the
//! tier's state (active / healthy / down).
//!
//! All of it is in memory and bounded: fixed 5-second slots (180 of them)
//! with a log-scale latency histogram each, and at most [`MAX_CHANGES`]
//! state changes per tier. A request records into its worker's own
//! [`WorkerStats`] (its own cache lines and an uncontended lock, never held
//! across an await); the status API merges the workers' copies.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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

impl Slot {
    fn add(&mut self, other: &Slot) {
        self.count += other.count;
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine += *theirs;
        }
    }
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

/// What the control path changes (seldom).
#[derive(Debug, Default)]
struct Inner {
    /// Per tier: (milliseconds since the origin, phase), oldest first.
    changes: BTreeMap<TierId, VecDeque<(u64, Phase)>>,
    last_failover: Option<RetriedFailover>,
}

/// The router's counters and history; one per router. Requests record
/// into their worker's [`WorkerStats`].
#[derive(Debug)]
pub struct Stats {
    origin: Instant,
    origin_wall: SystemTime,
    workers: Box<[Arc<WorkerStats>]>,
    inner: Mutex<Inner>,
}

/// What one worker's requests record. Aligned so that two workers'
/// counters never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Which worker's.
    index: usize,
    origin: Instant,
    in_flight: AtomicU64,
    requests: AtomicU64,
    retried: AtomicU64,
    recent: Mutex<Recent>,
}

#[derive(Debug, Default)]
struct Recent {
    /// Requests per second for the rate: (second index, count).
    seconds: [(u64, u64); RATE_WINDOW],
    /// Per tier, the slots that saw requests, oldest first.
    slots: BTreeMap<TierId, VecDeque<Slot>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks can panic halfway through an update that matters.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ms_since(origin: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
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

impl Stats {
    /// Counters for a router of `workers` workers.
    pub fn new(workers: usize) -> Stats {
        let origin = Instant::now();
        Stats {
            origin,
            origin_wall: SystemTime::now(),
            workers: (0..workers.max(1))
                .map(|index| {
                    Arc::new(WorkerStats {
                        index,
                        origin,
                        in_flight: AtomicU64::new(0),
                        requests: AtomicU64::new(0),
                        retried: AtomicU64::new(0),
                        recent: Mutex::new(Recent::default()),
                    })
                })
                .collect(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Worker `index`'s counters.
    pub fn worker(&self, index: usize) -> Arc<WorkerStats> {
        Arc::clone(&self.workers[index % self.workers.len()])
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    fn ms(&self, now: Instant) -> u64 {
        ms_since(self.origin, now)
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
            let changes = inner.changes.entry(tier.tier).or_default();
            if changes.back().map(|(_, p)| *p) != Some(phase) {
                changes.push_back((ms, phase));
            }
            // Keep one change from before the span: it says what the strip starts with.
            let cutoff = ms.saturating_sub(SPAN.as_millis() as u64);
            while changes.len() > MAX_CHANGES || (changes.len() > 1 && changes[1].0 <= cutoff) {
                changes.pop_front();
            }
        }
    }

    pub fn status(&self, address: String, now: Instant) -> RouterStatus {
        let second = self.ms(now) / 1000;
        let mut counted = 0u64;
        let (mut in_flight, mut requests, mut retried) = (0u64, 0u64, 0u64);
        for worker in &self.workers {
            in_flight += worker.in_flight.load(Ordering::Relaxed);
            requests += worker.requests.load(Ordering::Relaxed);
            retried += worker.retried.load(Ordering::Relaxed);
            // The current second is still filling: the rate is over the ones before it.
            counted += lock(&worker.recent)
                .seconds
                .iter()
                .filter(|(s, _)| *s < second && s + RATE_WINDOW as u64 >= second)
                .map(|(_, n)| n)
                .sum::<u64>();
        }
        RouterStatus {
            address,
            in_flight,
            requests,
            request_rate: counted as f64 / RATE_WINDOW as f64,
            retried,
            last_retried_failover: self.lock().last_failover.clone(),
        }
    }

    pub fn history(&self, now: Instant) -> History {
        let ms = self.ms(now);
        let slot_ms = SLOT.as_millis() as u64;
        let current = ms / slot_ms;
        // Every worker's slots, added up per tier and slot.
        let mut merged: BTreeMap<TierId, BTreeMap<u64, Slot>> = BTreeMap::new();
        for worker in &self.workers {
            let recent = lock(&worker.recent);
            for (tier, slots) in &recent.slots {
                let into = merged.entry(*tier).or_default();
                for slot in slots.iter().filter(|s| s.index + (SLOTS as u64) > current) {
                    into.entry(slot.index)
                        .or_insert_with(|| Slot::new(slot.index))
                        .add(slot);
                }
            }
        }
        let inner = self.lock();
        let no_changes = VecDeque::new();
        let tier_ids: std::collections::BTreeSet<TierId> =
            merged.keys().chain(inner.changes.keys()).copied().collect();
        let tiers = tier_ids
            .into_iter()
            .map(|tier| TierSeries {
                tier,
                points: merged
                    .get(&tier)
                    .into_iter()
                    .flat_map(BTreeMap::values)
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
                phases: inner
                    .changes
                    .get(&tier)
                    .unwrap_or(&no_changes)
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

impl WorkerStats {
    /// A request came in; the guard counts it in flight until dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        cascade_actors::metrics::metrics().router_in_flight(self.index, 1);
        InFlight(Arc::clone(self))
    }

    /// A request got its answer (its head): `tier` is who answered, if any.
    pub fn answered(&self, now: Instant, tier: Option<TierId>, latency: Duration, attempts: u32) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if attempts > 1 {
            self.retried.fetch_add(1, Ordering::Relaxed);
        }
        let ms = ms_since(self.origin, now);
        let second = ms / 1000;
        let slot = ms / SLOT.as_millis() as u64;
        let mut recent = lock(&self.recent);
        let cell = &mut recent.seconds[(second % RATE_WINDOW as u64) as usize];
        if cell.0 != second {
            *cell = (second, 0);
        }
        cell.1 += 1;
        if let Some(tier) = tier {
            let slots = recent.slots.entry(tier).or_default();
            if slots.back().is_none_or(|s| s.index != slot) {
                slots.push_back(Slot::new(slot));
                while slots
                    .front()
                    .is_some_and(|s| s.index + (SLOTS as u64) <= slot)
                {
                    slots.pop_front();
                }
            }
            if let Some(current) = slots.back_mut() {
                current.count += 1;
                current.buckets[bucket_of(latency)] += 1;
            }
        }
    }
}

/// Counts one request in flight while it lives.
#[derive(Debug)]
pub struct InFlight(Arc<WorkerStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        cascade_actors::metrics::metrics().router_in_flight(self.0.index, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_actors::TierState;
    use cascade_actors::routing::{Endpoint, RouteInfo, RouteTier};

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
        // Two workers record; the history adds them up.
        let stats = Stats::new(2);
        let t0 = stats.origin;
        for i in 0..100 {
            let latency = if i == 99 {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(2)
            };
            stats.worker(i as usize % 2).answered(
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
        let stats = Stats::new(1);
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
        let stats = Stats::new(2);
        let a = stats.worker(0).begin();
        let b = stats.worker(1).begin();
        assert_eq!(stats.status(String::new(), Instant::now()).in_flight, 2);
        drop(a);
        drop(b);
        assert_eq!(stats.status(String::new(), Instant::now()).in_flight, 0);
    }
}
