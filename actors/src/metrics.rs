//! cascade's metrics, declared once: one struct of OpenTelemetry instruments
//! that tiers, the root and autoheal record into.
//!
//! The instruments come from `opentelemetry::global::meter("cascade")` the
//! first time [`metrics`] is called. The process installs its meter provider
//! (`src/telemetry.rs`) before it starts the supervisor, so they bind to it;
//! with no provider installed (unit tests, benches) they bind to the global
//! no-op meter and recording does nothing.
//!
//! Invariant: recording never blocks and never does I/O — instruments only
//! update in-memory aggregates; readers (OTLP's periodic reader, the
//! Prometheus scrape) collect them on their own threads or requests. This is
//! a write-only sink, so the static is not a way for one part to tell
//! another what to do.
//!
//! Names use OpenTelemetry's dotted form; the Prometheus exposition turns
//! dots into underscores, adds the unit (`_seconds`) and `_total` for
//! counters, e.g. `cascade.failovers` → `cascade_failovers_total`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundHistogram, Counter, Gauge, Histogram, Meter, ObservableCounter, ObservableUpDownCounter,
};

use crate::contract::{TierId, TierState};
use crate::resilience::BreakerState;

/// The instrumentation scope every instrument belongs to.
pub const METER_NAME: &str = "cascade";

/// Every instrument name, as OpenTelemetry sees it.
pub const NAMES: &[&str] = &[
    "cascade.tier.state",
    "cascade.tier.active",
    "cascade.failovers",
    "cascade.restarts",
    "cascade.panics",
    "cascade.probe.duration",
    "cascade.breaker.state",
    "cascade.breaker.transitions",
    "cascade.autoheal.restarts",
    "cascade.autoheal.give_ups",
    "cascade.autoheal.connected",
    "cascade.autoheal.watched",
    "cascade.autoheal.last_event",
    "cascade.autoheal.actor_restarts",
    "cascade.telemetry.export.failures",
    "cascade.log.lines.dropped",
    "cascade.router.requests",
    "cascade.router.attempts",
    "cascade.router.retries",
    "cascade.router.budget_exhausted",
    "cascade.router.no_tier",
    "cascade.router.in_flight",
    "cascade.router.duration",
];

/// Probe latencies in seconds: probes have deadlines of about a second.
const PROBE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Routed request latencies in seconds, to the response head: from well
/// under a millisecond (the proxy itself) to a Cloud Run cold start.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The instruments. Cloning is cheap (each instrument is an `Arc`).
#[derive(Clone)]
pub struct Metrics {
    tier_state: Gauge<i64>,
    tier_active: Gauge<i64>,
    failovers: Counter<u64>,
    restarts: Counter<u64>,
    panics: Counter<u64>,
    probe_duration: Histogram<f64>,
    breaker_state: Gauge<i64>,
    breaker_transitions: Counter<u64>,
    autoheal_restarts: Counter<u64>,
    autoheal_give_ups: Counter<u64>,
    autoheal_connected: Gauge<i64>,
    autoheal_watched: Gauge<u64>,
    autoheal_last_event: Gauge<f64>,
    autoheal_actor_restarts: Counter<u64>,
    export_failures: Counter<u64>,
    log_lines_dropped: Counter<u64>,
    /// The router's per-request counts, read by the two observable
    /// instruments below when metrics are collected.
    router_counts: Arc<RouterCounts>,
    _router_requests: ObservableCounter<u64>,
    router_histograms: RouterHistograms,
    router_retries: Counter<u64>,
    router_budget_exhausted: Counter<u64>,
    router_no_tier: Counter<u64>,
    _router_in_flight: ObservableUpDownCounter<i64>,
}

/// The router's histograms: `cascade.router.attempts` and
/// `cascade.router.duration`, the latter bound to each tier once: a record
/// with attributes has the SDK hash them (SipHash) and look them up under a
/// lock, which was about 700 of the 1,100 instructions the two histograms
/// cost per request.
#[derive(Clone)]
struct RouterHistograms {
    /// Bound to its one (empty) attribute set, as `duration` is to each
    /// tier's: a record then looks nothing up.
    attempts: BoundHistogram<u64>,
    /// In [`TierId::ALL`]'s order.
    duration: Vec<BoundHistogram<f64>>,
}

impl std::fmt::Debug for RouterHistograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterHistograms").finish_non_exhaustive()
    }
}

/// Status classes of `cascade.router.requests`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// What the router counts on every request, in plain atomics: a request
/// pays an add, not a lookup of its attribute set in an aggregator (the
/// OpenTelemetry SDK's `add` hashes the attributes and takes locks that
/// every worker shares). Each router worker adds to a shard of its own, so
/// that two workers never write one cache line; the observable instruments
/// add the shards up when metrics are collected. The histograms have no
/// observable kind: a worker keeps its requests' tries and latencies and
/// records them [`HISTOGRAM_BATCH`] at a time, and a collection records
/// what every worker holds before it reads the histograms (the SDK runs
/// the observable callbacks first), so a scrape misses nothing.
#[derive(Debug)]
struct RouterCounts {
    shards: Box<[RouterShard]>,
}

/// Shards of [`RouterCounts`]: as many as the router may have workers.
pub const ROUTER_SHARDS: usize = 64;

/// One worker's counts, on cache lines of their own.
#[repr(align(128))]
#[derive(Debug, Default)]
struct RouterShard {
    in_flight: AtomicI64,
    /// By the tier that answered (`None`, cascade itself, first; then
    /// [`TierId::ALL`]'s order) and status class.
    requests: [[AtomicU64; CLASSES.len()]; TierId::ALL.len() + 1],
    /// Requests not yet recorded in the histograms.
    pending: Mutex<Pending>,
}

/// Requests a worker records in the histograms together.
const HISTOGRAM_BATCH: usize = 32;

#[derive(Debug, Default)]
struct Pending {
    /// Tries per request.
    attempts: Vec<u32>,
    /// Seconds to the response head, by the tier that answered.
    latencies: Vec<(TierId, f64)>,
}

impl Pending {
    fn record(&mut self, histograms: &RouterHistograms) {
        for attempts in self.attempts.drain(..) {
            histograms.attempts.record(u64::from(attempts));
        }
        for (id, seconds) in self.latencies.drain(..) {
            // The index of `id` in TierId::ALL, past `none`'s.
            histograms.duration[RouterCounts::tier_index(Some(id)) - 1].record(seconds);
        }
    }
}

impl Default for RouterCounts {
    fn default() -> Self {
        RouterCounts {
            shards: (0..ROUTER_SHARDS).map(|_| RouterShard::default()).collect(),
        }
    }
}

impl RouterShard {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Pushes and drains leave the lists whole.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RouterCounts {
    fn shard(&self, worker: usize) -> &RouterShard {
        &self.shards[worker % self.shards.len()]
    }

    /// Records what every worker holds in the histograms.
    fn record_pending(&self, histograms: &RouterHistograms) {
        for shard in &self.shards {
            shard.pending().record(histograms);
        }
    }

    fn requests(&self, tier: usize, class: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.requests[tier][class].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    fn in_flight(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .fold(0, i64::wrapping_add)
    }

    fn tier_name(index: usize) -> &'static str {
        index
            .checked_sub(1)
            .map_or("none", |i| TierId::ALL[i].as_str())
    }

    fn tier_index(id: Option<TierId>) -> usize {
        id.map_or(0, |id| {
            1 + TierId::ALL
                .iter()
                .position(|t| *t == id)
                .expect("every tier is in TierId::ALL")
        })
    }
}

static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| Metrics::new(&opentelemetry::global::meter(METER_NAME)));

/// The process's instruments, bound to the global meter provider on first use.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// A tier state as a number, for the `cascade.tier.state` gauge: higher is
/// closer to serving.
pub fn state_value(state: TierState) -> i64 {
    match state {
        TierState::Unavailable => 0,
        TierState::Unhealthy => 1,
        TierState::Unknown => 2,
        TierState::Probing => 3,
        TierState::Starting => 4,
        TierState::Degraded => 5,
        TierState::Healthy => 6,
    }
}

/// A breaker state as a number, for the `cascade.breaker.state` gauge.
pub fn breaker_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

fn tier(tier: TierId) -> KeyValue {
    KeyValue::new("backend.tier", tier.as_str())
}

impl Metrics {
    /// Creates the instruments on `meter`. Tests pass their own provider's meter.
    pub fn new(meter: &Meter) -> Metrics {
        let router_counts = Arc::new(RouterCounts::default());
        let router_histograms = RouterHistograms {
            attempts: meter
                .u64_histogram("cascade.router.attempts")
                .with_description("Tries per routed request.")
                .with_boundaries(vec![1.0, 2.0, 3.0, 4.0, 5.0, 10.0])
                .build()
                .bind(&[]),
            duration: {
                let duration = meter
                    .f64_histogram("cascade.router.duration")
                    .with_unit("s")
                    .with_description("Routed request latency to the response head, by tier.")
                    .with_boundaries(REQUEST_BUCKETS.to_vec())
                    .build();
                TierId::ALL
                    .iter()
                    .map(|id| duration.bind(&[tier(*id)]))
                    .collect()
            },
        };
        Metrics {
            tier_state: meter
                .i64_gauge("cascade.tier.state")
                .with_description(
                    "Tier state: 0 unavailable, 1 unhealthy, 2 unknown, 3 probing, \
                     4 starting, 5 degraded, 6 healthy.",
                )
                .build(),
            tier_active: meter
                .i64_gauge("cascade.tier.active")
                .with_description("1 for the tier the waterfall chose, 0 for the others.")
                .build(),
            failovers: meter
                .u64_counter("cascade.failovers")
                .with_description("Changes of the active tier (failover and failback).")
                .build(),
            restarts: meter
                .u64_counter("cascade.restarts")
                .with_description(
                    "Restarts: kind=actor (the root restarted a tier actor), \
                     kind=backend (a tier's backend was restarted).",
                )
                .build(),
            panics: meter
                .u64_counter("cascade.panics")
                .with_description(
                    "Panics caught by supervision, by tier and where: probe, start, \
                     restart (a driver call), actor (a tier actor's handler).",
                )
                .build(),
            probe_duration: meter
                .f64_histogram("cascade.probe.duration")
                .with_unit("s")
                .with_description("Probe latency by tier and outcome.")
                .with_boundaries(PROBE_BUCKETS.to_vec())
                .build(),
            breaker_state: meter
                .i64_gauge("cascade.breaker.state")
                .with_description("Circuit breaker: 0 closed, 1 half-open, 2 open.")
                .build(),
            breaker_transitions: meter
                .u64_counter("cascade.breaker.transitions")
                .with_description("Circuit breaker state changes, by from and to.")
                .build(),
            autoheal_restarts: meter
                .u64_counter("cascade.autoheal.restarts")
                .with_description("Containers restarted by Docker autoheal.")
                .build(),
            autoheal_give_ups: meter
                .u64_counter("cascade.autoheal.give_ups")
                .with_description("Containers Docker autoheal stopped restarting.")
                .build(),
            autoheal_connected: meter
                .i64_gauge("cascade.autoheal.connected")
                .with_description("1 while autoheal follows the Docker event stream.")
                .build(),
            autoheal_watched: meter
                .u64_gauge("cascade.autoheal.watched")
                .with_description("Containers autoheal watches.")
                .build(),
            autoheal_last_event: meter
                .f64_gauge("cascade.autoheal.last_event")
                .with_unit("s")
                .with_description(
                    "Daemon time (Unix seconds) of the last Docker event autoheal saw.",
                )
                .build(),
            autoheal_actor_restarts: meter
                .u64_counter("cascade.autoheal.actor_restarts")
                .with_description("Restarts of the autoheal actor by the root.")
                .build(),
            export_failures: meter
                .u64_counter("cascade.telemetry.export.failures")
                .with_description("OTLP exports that failed (the batch is dropped), by signal.")
                .build(),
            log_lines_dropped: meter
                .u64_counter("cascade.log.lines.dropped")
                .with_description(
                    "Log lines dropped because the log sink (stderr) did not take them in time.",
                )
                .build(),
            _router_requests: {
                let counts = Arc::clone(&router_counts);
                let histograms = router_histograms.clone();
                meter
                    .u64_observable_counter("cascade.router.requests")
                    .with_description(
                        "Routed requests by the tier that answered (`none`: cascade did) \
                         and status class (2xx ... 5xx).",
                    )
                    .with_callback(move |observer| {
                        // Before the SDK reads the histograms.
                        counts.record_pending(&histograms);
                        for t in 0..=TierId::ALL.len() {
                            for (c, class) in CLASSES.iter().enumerate() {
                                let count = counts.requests(t, c);
                                if count > 0 {
                                    observer.observe(
                                        count,
                                        &[
                                            KeyValue::new(
                                                "backend.tier",
                                                RouterCounts::tier_name(t),
                                            ),
                                            KeyValue::new("class", *class),
                                        ],
                                    );
                                }
                            }
                        }
                    })
                    .build()
            },
            router_histograms,
            router_retries: meter
                .u64_counter("cascade.router.retries")
                .with_description("Retries of routed requests, by the tier the failed try went to.")
                .build(),
            router_budget_exhausted: meter
                .u64_counter("cascade.router.budget_exhausted")
                .with_description("Retries refused because the retry budget was spent.")
                .build(),
            router_no_tier: meter
                .u64_counter("cascade.router.no_tier")
                .with_description("Requests answered 503 because no tier was serving.")
                .build(),
            _router_in_flight: {
                let counts = Arc::clone(&router_counts);
                meter
                    .i64_observable_up_down_counter("cascade.router.in_flight")
                    .with_description("Routed requests whose response has not finished.")
                    .with_callback(move |observer| {
                        observer.observe(counts.in_flight(), &[]);
                    })
                    .build()
            },
            router_counts,
        }
    }

    pub fn tier_state(&self, id: TierId, state: TierState) {
        self.tier_state.record(state_value(state), &[tier(id)]);
    }

    pub fn tier_active(&self, id: TierId, active: bool) {
        self.tier_active.record(i64::from(active), &[tier(id)]);
    }

    /// The active tier changed; `None` is "no tier".
    pub fn failover(&self, from: Option<TierId>, to: Option<TierId>) {
        let name = |t: Option<TierId>| t.map_or("none", TierId::as_str);
        self.failovers.add(
            1,
            &[
                KeyValue::new("from", name(from)),
                KeyValue::new("to", name(to)),
            ],
        );
    }

    /// The root restarted a tier actor.
    pub fn actor_restart(&self, id: TierId) {
        self.restarts
            .add(1, &[tier(id), KeyValue::new("kind", "actor")]);
    }

    /// A tier's backend was restarted (by request or by its driver).
    pub fn backend_restart(&self, id: TierId) {
        self.restarts
            .add(1, &[tier(id), KeyValue::new("kind", "backend")]);
    }

    /// A panic was caught: in a driver call (`probe`, `start`, `restart`)
    /// or in a tier actor (`actor`).
    pub fn panic(&self, id: TierId, place: &'static str) {
        self.panics
            .add(1, &[tier(id), KeyValue::new("where", place)]);
    }

    pub fn probe(&self, id: TierId, outcome: &'static str, took: Duration) {
        self.probe_duration.record(
            took.as_secs_f64(),
            &[tier(id), KeyValue::new("outcome", outcome)],
        );
    }

    pub fn breaker_state(&self, id: TierId, state: BreakerState) {
        self.breaker_state.record(breaker_value(state), &[tier(id)]);
    }

    pub fn breaker_transition(&self, id: TierId, from: BreakerState, to: BreakerState) {
        self.breaker_transitions.add(
            1,
            &[
                tier(id),
                KeyValue::new("from", from.to_string()),
                KeyValue::new("to", to.to_string()),
            ],
        );
    }

    pub fn autoheal_restart(&self, container: &str) {
        self.autoheal_restarts
            .add(1, &[KeyValue::new("container", container.to_owned())]);
    }

    pub fn autoheal_give_up(&self, container: &str) {
        self.autoheal_give_ups
            .add(1, &[KeyValue::new("container", container.to_owned())]);
    }

    /// What autoheal last published.
    pub fn autoheal_state(
        &self,
        connected: bool,
        watched: usize,
        last_event: Option<std::time::SystemTime>,
    ) {
        self.autoheal_connected.record(i64::from(connected), &[]);
        self.autoheal_watched
            .record(u64::try_from(watched).unwrap_or(u64::MAX), &[]);
        if let Some(at) = last_event.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
            self.autoheal_last_event.record(at.as_secs_f64(), &[]);
        }
    }

    /// The root restarted the autoheal actor.
    pub fn autoheal_actor_restart(&self) {
        self.autoheal_actor_restarts.add(1, &[]);
    }

    /// A routed request was answered (its head sent) by `tier` (`None`:
    /// by cascade itself) after `attempts` tries, on router worker `worker`.
    pub fn router_request(
        &self,
        worker: usize,
        id: Option<TierId>,
        status: u16,
        attempts: u32,
        latency: Duration,
    ) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        let shard = self.router_counts.shard(worker);
        shard.requests[RouterCounts::tier_index(id)][class].fetch_add(1, Ordering::Relaxed);
        let mut pending = shard.pending();
        pending.attempts.push(attempts);
        if let Some(id) = id {
            pending.latencies.push((id, latency.as_secs_f64()));
        }
        if pending.attempts.len() >= HISTOGRAM_BATCH {
            pending.record(&self.router_histograms);
        }
    }

    /// A routed request is tried again after a failure on `id`.
    pub fn router_retry(&self, id: TierId) {
        self.router_retries.add(1, &[tier(id)]);
    }

    pub fn router_budget_exhausted(&self) {
        self.router_budget_exhausted.add(1, &[]);
    }

    pub fn router_no_tier(&self) {
        self.router_no_tier.add(1, &[]);
    }

    /// Requests in flight on router worker `worker` changed by `delta`.
    pub fn router_in_flight(&self, worker: usize, delta: i64) {
        self.router_counts
            .shard(worker)
            .in_flight
            .fetch_add(delta, Ordering::Relaxed);
    }

    /// An OTLP export failed; `signal` is `traces` or `metrics`.
    pub fn export_failure(&self, signal: &'static str) {
        self.export_failures
            .add(1, &[KeyValue::new("signal", signal)]);
    }

    /// `lines` log lines were dropped (0 makes the counter visible).
    pub fn log_lines_dropped(&self, lines: u64) {
        self.log_lines_dropped.add(lines, &[]);
    }
}
