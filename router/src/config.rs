//! `[router]`: the schema of the router's configuration and its validation.
//!
//! Everything here but `enabled`, `listen` and `workers` is applied on
//! SIGHUP: the running router reads its settings from a `watch` per request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use cascade_actors::TierId;
use cascade_actors::resilience::RetryBudgetConfig;
use http::Method;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Whether cascade listens for applications' requests at all.
    pub enabled: bool,
    /// Where applications send their requests. Loopback by default, like the
    /// status API: exposing it is a deliberate choice.
    pub listen: SocketAddr,
    /// Threads that serve requests, each with its own event loop and
    /// upstream connection pool (nginx's `worker_processes`); 0 is one per
    /// CPU.
    pub workers: usize,
    /// Tries per request in all, the first included.
    pub max_attempts: u32,
    /// `METHOD /path` of requests that may be sent again after a failure,
    /// besides GET, HEAD and OPTIONS (an embedding is a pure function of the
    /// audio, so `POST /embed` is safe to repeat).
    pub replay_safe: Vec<String>,
    /// Request bodies up to this size are kept so that a retry can send them
    /// again; larger ones stream through and are not retried.
    pub max_replay_body: ByteSize,
    /// Larger request bodies are refused with 413.
    pub max_body: ByteSize,
    /// How long a request waits for a tier to serve while one is starting.
    #[serde(with = "humantime_serde")]
    pub start_wait: Duration,
    /// Requests that may wait for a tier at once; more get 503 at once.
    pub max_pending: usize,
    /// Client connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A client must send a request's headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long one try may wait for the response head, unless the tier's
    /// own `[router.tiers.NAME] request_timeout` says otherwise.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// All tries of one request (and any wait for a tier) end by then.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// On shutdown, how long requests in flight may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Bounds what retries add to first attempts (20 % plus a floor of 10
    /// a second over 10 s: Linkerd's default).
    pub retry_budget: RetryBudgetConfig,
    /// Per-tier settings.
    pub tiers: BTreeMap<TierId, TierRoute>,
}

/// The most worker threads `workers` may ask for.
pub const MAX_WORKERS: usize = cascade_actors::metrics::ROUTER_SHARDS;

/// `[router.tiers.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierRoute {
    /// Per-try timeout for this tier (default: `router.request_timeout`).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8700)),
            workers: 0,
            max_attempts: 3,
            replay_safe: vec!["POST /embed".into()],
            max_replay_body: ByteSize::mib(10),
            max_body: ByteSize::mib(64),
            start_wait: Duration::from_secs(10),
            max_pending: 1024,
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            retry_budget: RetryBudgetConfig {
                ratio: 0.2,
                min_per_sec: 10.0,
                window: Duration::from_secs(10),
            },
            tiers: BTreeMap::new(),
        }
    }
}

/// One `replay_safe` entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    pub path: String,
}

impl Route {
    pub fn parse(text: &str) -> Result<Route, String> {
        let mut parts = text.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "`{text}` is not `METHOD /path` (e.g. \"POST /embed\")"
            ));
        };
        let method = Method::from_bytes(method.as_bytes())
            .ok()
            .filter(|m| m.as_str().chars().all(|c| c.is_ascii_uppercase()))
            .ok_or_else(|| format!("`{method}` in `{text}` is not an HTTP method in capitals"))?;
        if !path.starts_with('/') || path.contains('?') {
            return Err(format!(
                "`{path}` in `{text}` must be a path starting with `/`, without a query"
            ));
        }
        Ok(Route {
            method,
            path: path.to_owned(),
        })
    }
}

impl RouterConfig {
    /// Problems as `(key under [router], message)`; empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut push = |key: &str, message: String| problems.push((key.to_owned(), message));
        if self.workers > MAX_WORKERS {
            push(
                "workers",
                format!(
                    "must be at most {MAX_WORKERS} (got {}); 0 is one per CPU",
                    self.workers
                ),
            );
        }
        if self.max_attempts == 0 {
            push("max_attempts", "must be at least 1".into());
        }
        if self.max_attempts > 10 {
            push(
                "max_attempts",
                format!(
                    "must be at most 10 (got {}): more tries only multiply load on a failing backend",
                    self.max_attempts
                ),
            );
        }
        for (i, route) in self.replay_safe.iter().enumerate() {
            if let Err(message) = Route::parse(route) {
                push(&format!("replay_safe[{i}]"), message);
            }
        }
        if self.max_body.as_u64() == 0 {
            push("max_body", "must be above zero".into());
        }
        if self.max_replay_body > self.max_body {
            push(
                "max_replay_body",
                format!(
                    "must not exceed max_body ({} > {})",
                    self.max_replay_body, self.max_body
                ),
            );
        }
        if self.max_connections == 0 {
            push("max_connections", "must be at least 1".into());
        }
        for (key, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("request_timeout", self.request_timeout),
            ("deadline", self.deadline),
        ] {
            if value.is_zero() {
                push(key, "must be above zero".into());
            }
        }
        for (tier, route) in &self.tiers {
            if route.request_timeout.is_some_and(|t| t.is_zero()) {
                push(
                    &format!("tiers.{tier}.request_timeout"),
                    "must be above zero".into(),
                );
            }
        }
        for (key, message) in self.retry_budget.validate() {
            push(&format!("retry_budget.{key}"), message);
        }
        problems
    }

    /// The parsed `replay_safe` routes (entries that do not parse are left
    /// out; `validate` reports them).
    pub fn replay_routes(&self) -> Vec<Route> {
        self.replay_safe
            .iter()
            .filter_map(|r| Route::parse(r).ok())
            .collect()
    }

    /// The worker threads to run: `workers`, or one per CPU when it is 0.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS)),
            n => n,
        }
    }

    /// The per-try timeout for `tier`.
    pub fn request_timeout(&self, tier: TierId) -> Duration {
        self.tiers
            .get(&tier)
            .and_then(|t| t.request_timeout)
            .unwrap_or(self.request_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert!(RouterConfig::default().validate().is_empty());
        assert_eq!(
            RouterConfig::default().replay_routes(),
            vec![Route {
                method: Method::POST,
                path: "/embed".into()
            }]
        );
    }

    #[test]
    fn bad_values_name_their_keys() {
        let mut config = RouterConfig {
            workers: MAX_WORKERS + 1,
            max_attempts: 0,
            replay_safe: vec!["POST".into(), "post /x".into(), "GET embed".into()],
            max_replay_body: ByteSize::mib(100),
            max_connections: 0,
            deadline: Duration::ZERO,
            ..RouterConfig::default()
        };
        config.tiers.insert(
            TierId::CloudRun,
            TierRoute {
                request_timeout: Some(Duration::ZERO),
            },
        );
        let keys: Vec<String> = config.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "workers",
                "max_attempts",
                "replay_safe[0]",
                "replay_safe[1]",
                "replay_safe[2]",
                "max_replay_body",
                "max_connections",
                "deadline",
                "tiers.cloud_run.request_timeout",
            ]
        );
    }

    #[test]
    fn per_tier_timeouts_fall_back_to_the_default() {
        let mut config = RouterConfig::default();
        config.tiers.insert(
            TierId::CloudRun,
            TierRoute {
                request_timeout: Some(Duration::from_secs(90)),
            },
        );
        assert_eq!(
            config.request_timeout(TierId::CloudRun),
            Duration::from_secs(90)
        );
        assert_eq!(
            config.request_timeout(TierId::Local),
            config.request_timeout
        );
    }
}
