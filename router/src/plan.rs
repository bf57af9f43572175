//! The routing plan: the published [`RoutingTable`] with what the data path
//! keeps between requests attached (parsed upstream URLs, load per endpoint,
//! when each tier last answered).
//!
//! One task rebuilds the plan whenever the root publishes a table and
//! republishes it on a `watch`; a request reads the newest plan (an `Arc`
//! clone) and never waits for the control path.
//!
//! An endpoint keeps its [`EndpointState`] while its tier serves it. One that
//! leaves the table (its tier stopped serving, the container went away) and
//! comes back later is a new endpoint: a request waiting for the table may
//! try it again, since what failed before has since been replaced.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cascade_actors::TierId;
use cascade_actors::routing::{Endpoint, RequestOutcome, RouteInfo, RouteTier, RoutingTable};
use http::HeaderValue;
use http::uri::{Authority, Scheme};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::pool::Pool;
use crate::stats::Stats;

/// One serving endpoint, shared by every plan that lists it.
#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    pub scheme: Scheme,
    pub authority: Authority,
    /// The URL's path, without a trailing slash (usually empty).
    pub base_path: String,
    /// `Host` for an HTTP/1.1 request to it, as the pooled client would
    /// write it (host, and the port unless it is the scheme's default),
    /// made once rather than per request; `None` for https, where the
    /// client decides by the protocol ALPN picks.
    pub host: Option<HeaderValue>,
    /// Requests sent to it whose response has not finished.
    pub in_flight: AtomicUsize,
    /// Its idle keep-alive connections, per worker (`http` endpoints).
    pub pool: Pool,
}

impl EndpointState {
    fn new(endpoint: &Endpoint) -> Result<EndpointState, String> {
        let uri: http::Uri = endpoint
            .url
            .parse()
            .map_err(|e| format!("`{}` is not a URL: {e}", endpoint.url))?;
        let scheme = uri
            .scheme()
            .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
            .cloned()
            .ok_or_else(|| format!("`{}` is not an http or https URL", endpoint.url))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{}` has no host", endpoint.url))?;
        let host = if scheme == Scheme::HTTP {
            let name = uri.host().unwrap_or_default();
            let value = match uri.port_u16() {
                Some(port) if port != 80 => HeaderValue::try_from(format!("{name}:{port}")),
                _ => HeaderValue::try_from(name),
            };
            Some(value.map_err(|e| format!("`{}` has no usable host: {e}", endpoint.url))?)
        } else {
            None
        };
        Ok(EndpointState {
            host,
            endpoint: endpoint.clone(),
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            in_flight: AtomicUsize::new(0),
            pool: Pool::default(),
        })
    }

    pub fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// What persists about a tier across plans.
#[derive(Debug)]
pub struct TierRuntime {
    /// Milliseconds since the plan's origin when the tier last answered;
    /// `u64::MAX` when it never has.
    last_answer: AtomicU64,
    origin: Instant,
    /// The tier's last reported request failed: the next answer is
    /// reported too, ending the run its breaker counts.
    failing: AtomicBool,
}

/// Cloud Run keeps an idle instance for up to 15 minutes; a tier silent for
/// longer may have scaled to zero, so its next request may be a cold start.
const COLD_AFTER: Duration = Duration::from_secs(15 * 60);

impl TierRuntime {
    fn new(origin: Instant) -> TierRuntime {
        TierRuntime {
            last_answer: AtomicU64::new(u64::MAX),
            origin,
            failing: AtomicBool::new(false),
        }
    }

    pub fn answered(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis();
        let ms = u64::try_from(ms).unwrap_or(u64::MAX - 1);
        // Written at most once a millisecond: every worker answering into
        // one cache line would make the cores take turns at it.
        if self.last_answer.load(Ordering::Relaxed) != ms {
            self.last_answer.store(ms, Ordering::Relaxed);
        }
    }

    /// Whether the next request may meet a cold start.
    pub fn cold(&self, now: Instant) -> bool {
        let last = self.last_answer.load(Ordering::Relaxed);
        if last == u64::MAX {
            return true;
        }
        let since = now.saturating_duration_since(self.origin + Duration::from_millis(last));
        since >= COLD_AFTER
    }
}

/// One tier of the plan.
#[derive(Debug, Clone)]
pub struct PlanTier {
    pub route: RouteTier,
    /// Its endpoints while it serves; empty otherwise.
    pub endpoints: Vec<Arc<EndpointState>>,
    pub runtime: Arc<TierRuntime>,
}

impl PlanTier {
    pub fn tier(&self) -> TierId {
        self.route.tier
    }

    pub fn info(&self) -> &RouteInfo {
        &self.route.info
    }

    pub fn serving(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Reports what happened to a request on `endpoint` to the tier's
    /// breaker, which counts consecutive failed requests per tier: every
    /// failure, and an answer only right after a failure (on any of the
    /// tier's endpoints), so answers cost no message while all is well.
    pub fn report(&self, endpoint: &EndpointState, error: Option<String>) {
        // Read first: an answer while all is well writes nothing shared.
        if error.is_none() && !self.runtime.failing.load(Ordering::Relaxed) {
            return;
        }
        let was_failing = self
            .runtime
            .failing
            .swap(error.is_some(), Ordering::Relaxed);
        if error.is_none() && !was_failing {
            return;
        }
        if let Some(reporter) = &self.route.reporter {
            reporter.report(RequestOutcome {
                endpoint: endpoint.endpoint.id.clone(),
                error,
            });
        }
    }
}

/// What a request reads.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub table: RoutingTable,
    /// In waterfall order.
    pub tiers: Vec<PlanTier>,
}

impl Plan {
    /// The plan for `table`, keeping `previous`'s endpoint states where the
    /// same endpoint still serves.
    pub fn build(table: RoutingTable, previous: &Plan, origin: Instant) -> Plan {
        let mut old: HashMap<(TierId, &str), &Arc<EndpointState>> = HashMap::new();
        for tier in &previous.tiers {
            for e in &tier.endpoints {
                old.insert((tier.tier(), e.endpoint.id.as_str()), e);
            }
        }
        let tiers = table
            .tiers
            .iter()
            .map(|route| {
                let runtime = previous
                    .tiers
                    .iter()
                    .find(|t| t.tier() == route.tier)
                    .map(|t| t.runtime.clone())
                    .unwrap_or_else(|| Arc::new(TierRuntime::new(origin)));
                let endpoints = if route.is_serving() {
                    route
                        .endpoints
                        .iter()
                        .filter_map(|e| {
                            if let Some(state) = old.get(&(route.tier, e.id.as_str()))
                                && state.endpoint == *e
                            {
                                return Some(Arc::clone(state));
                            }
                            match EndpointState::new(e) {
                                Ok(state) => Some(Arc::new(state)),
                                Err(error) => {
                                    warn!(backend.tier = %route.tier, %error, "Endpoint left out of routing.");
                                    None
                                }
                            }
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                PlanTier {
                    route: route.clone(),
                    endpoints,
                    runtime,
                }
            })
            .collect();
        Plan { table, tiers }
    }

    pub fn tier(&self, tier: TierId) -> Option<&PlanTier> {
        self.tiers.iter().find(|t| t.tier() == tier)
    }

    #[cfg(test)]
    pub fn any_serving(&self) -> bool {
        self.tiers.iter().any(PlanTier::serving)
    }

    /// Whether a tier may yet come to serve without an operator: a start is
    /// in progress, or first probes are still out.
    pub fn coming_up(&self) -> bool {
        if self.table.stopping {
            return false;
        }
        self.table.starting.is_some()
            || self.tiers.iter().any(|t| {
                t.route.state.is_pending() || t.route.state == cascade_actors::TierState::Starting
            })
    }

    /// The endpoint for the next try: an untried one of `current` (the tier
    /// of the last try, else the active tier) first, then of the other
    /// serving tiers in waterfall order. Within a tier the least loaded,
    /// ties broken by `turn` so equal endpoints take turns.
    pub fn choose(
        &self,
        current: Option<TierId>,
        tried: &[Arc<EndpointState>],
        turn: usize,
    ) -> Option<(&PlanTier, &Arc<EndpointState>)> {
        let first = current
            .or(self.table.active)
            .and_then(|t| self.tier(t))
            .filter(|t| t.serving());
        let rest = self
            .tiers
            .iter()
            .filter(|t| t.serving() && Some(t.tier()) != first.map(PlanTier::tier));
        first.into_iter().chain(rest).find_map(|tier| {
            if tried.is_empty() {
                // Every request's first try: no list to build.
                let all = &tier.endpoints;
                let n = all.len();
                return (0..n)
                    .map(|i| &all[(turn + i) % n])
                    .min_by_key(|e| e.load())
                    .map(|e| (tier, e));
            }
            let untried: Vec<&Arc<EndpointState>> = tier
                .endpoints
                .iter()
                .filter(|e| !tried.iter().any(|t| Arc::ptr_eq(t, e)))
                .collect();
            let n = untried.len();
            (0..n)
                .map(|i| untried[(turn + i) % n])
                .min_by_key(|e| e.load())
                .map(|e| (tier, e))
        })
    }
}

/// Keeps `plans` up to date with `routes` until the table's sender is gone
/// or `stop` is cancelled.
pub async fn follow(
    mut routes: watch::Receiver<RoutingTable>,
    plans: watch::Sender<Arc<Plan>>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let origin = Instant::now();
    loop {
        let table = routes.borrow_and_update().clone();
        stats.observe(&table, Instant::now());
        let next = Plan::build(table, &plans.borrow(), origin);
        plans.send_replace(Arc::new(next));
        tokio::select! {
            changed = routes.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_actors::TierState;

    fn tier(id: TierId, state: TierState, endpoints: &[(&str, &str)]) -> RouteTier {
        RouteTier {
            tier: id,
            state,
            reason: state.to_string(),
            endpoints: endpoints
                .iter()
                .map(|(i, u)| Endpoint::new(*i, *u))
                .collect(),
            info: RouteInfo::default(),
            reporter: None,
        }
    }

    fn table(active: Option<TierId>, tiers: Vec<RouteTier>) -> RoutingTable {
        RoutingTable {
            active,
            tiers,
            ..RoutingTable::default()
        }
    }

    #[test]
    fn the_active_tier_comes_first_then_the_others_in_order() {
        let t = table(
            Some(TierId::Local),
            vec![
                tier(
                    TierId::Docker,
                    TierState::Healthy,
                    &[("c1", "http://127.0.0.1:1")],
                ),
                tier(
                    TierId::Local,
                    TierState::Healthy,
                    &[("p", "http://127.0.0.1:2")],
                ),
                tier(
                    TierId::GcpVm,
                    TierState::Unhealthy,
                    &[("vm", "http://10.0.0.1")],
                ),
            ],
        );
        let plan = Plan::build(t, &Plan::default(), Instant::now());
        let (first, e1) = plan.choose(None, &[], 0).expect("an endpoint");
        let e1 = Arc::clone(e1);
        assert_eq!(first.tier(), TierId::Local);
        let (second, e2) = plan
            .choose(Some(TierId::Local), std::slice::from_ref(&e1), 0)
            .expect("another");
        let e2 = Arc::clone(e2);
        assert_eq!(second.tier(), TierId::Docker);
        assert!(
            plan.choose(Some(TierId::Docker), &[e1, e2], 0).is_none(),
            "unhealthy tiers are never chosen"
        );
    }

    #[test]
    fn within_a_tier_the_least_loaded_untried_endpoint_wins_and_ties_take_turns() {
        let t = table(
            Some(TierId::Docker),
            vec![tier(
                TierId::Docker,
                TierState::Healthy,
                &[
                    ("a", "http://127.0.0.1:1"),
                    ("b", "http://127.0.0.1:2"),
                    ("c", "http://127.0.0.1:3"),
                ],
            )],
        );
        let plan = Plan::build(t, &Plan::default(), Instant::now());
        let ids: Vec<String> = (0..3)
            .map(|turn| plan.choose(None, &[], turn).unwrap().1.endpoint.id.clone())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        plan.tiers[0].endpoints[0]
            .in_flight
            .store(5, Ordering::Relaxed);
        plan.tiers[0].endpoints[2]
            .in_flight
            .store(1, Ordering::Relaxed);
        assert_eq!(plan.choose(None, &[], 0).unwrap().1.endpoint.id, "b");
        let b = plan.tiers[0].endpoints[1].clone();
        assert_eq!(plan.choose(None, &[b], 0).unwrap().1.endpoint.id, "c");
    }

    #[test]
    fn an_endpoint_that_left_the_table_and_came_back_is_new() {
        let origin = Instant::now();
        let up = table(
            Some(TierId::Docker),
            vec![tier(
                TierId::Docker,
                TierState::Healthy,
                &[("c1", "http://127.0.0.1:1")],
            )],
        );
        let down = table(
            None,
            vec![tier(
                TierId::Docker,
                TierState::Unhealthy,
                &[("c1", "http://127.0.0.1:1")],
            )],
        );
        let p1 = Plan::build(up.clone(), &Plan::default(), origin);
        let p2 = Plan::build(up.clone(), &p1, origin);
        assert!(Arc::ptr_eq(
            &p1.tiers[0].endpoints[0],
            &p2.tiers[0].endpoints[0]
        ));
        let p3 = Plan::build(down, &p2, origin);
        assert!(!p3.any_serving());
        let p4 = Plan::build(up, &p3, origin);
        assert!(!Arc::ptr_eq(
            &p1.tiers[0].endpoints[0],
            &p4.tiers[0].endpoints[0]
        ));
        assert!(
            Arc::ptr_eq(&p1.tiers[0].runtime, &p4.tiers[0].runtime),
            "the tier's runtime persists"
        );
    }

    #[test]
    fn endpoints_with_bad_urls_are_left_out() {
        let t = table(
            Some(TierId::Local),
            vec![tier(
                TierId::Local,
                TierState::Healthy,
                &[
                    ("a", "not a url"),
                    ("b", "ftp://x"),
                    ("c", "http://127.0.0.1:9/base/"),
                ],
            )],
        );
        let plan = Plan::build(t, &Plan::default(), Instant::now());
        assert_eq!(plan.tiers[0].endpoints.len(), 1);
        assert_eq!(plan.tiers[0].endpoints[0].base_path, "/base");
    }

    #[test]
    fn a_tier_is_cold_until_it_answers_and_again_after_long_silence() {
        let origin = Instant::now();
        let runtime = TierRuntime::new(origin);
        assert!(runtime.cold(origin));
        runtime.answered(origin + Duration::from_secs(1));
        assert!(!runtime.cold(origin + Duration::from_secs(60)));
        assert!(runtime.cold(origin + Duration::from_secs(1) + COLD_AFTER));
    }
}
