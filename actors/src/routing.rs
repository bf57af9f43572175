//! The routing table: what the control path publishes for the data path.
//!
//! The root supervisor builds a [`RoutingTable`] from its tiers after every
//! decision and publishes it on a `watch` channel, like the snapshot. The
//! router (the `cascade-router` crate) reads the newest table per request
//! and never calls an actor to route; it reports what happened to a request
//! back to the tier by message ([`RequestReporter`]), where the tier's one
//! circuit breaker counts it.
//!
//! Invariant: this module holds types and the reporting handle only; the
//! actors crate knows nothing of HTTP proxying.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};

use crate::contract::{TierError, TierId, TierMsg, TierState};

/// One address that serves a tier's traffic: a container, a process, a VM,
/// a Cloud Run service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Stable within the tier while the endpoint lives (a container id, a
    /// VM name, `pid 4242`, the service URL): the router never tries the same
    /// id twice for one request, and reports failures by it.
    pub id: String,
    /// Base URL, `http://127.0.0.1:8701` or `https://svc-abc.a.run.app`,
    /// without a trailing slash.
    pub url: String,
}

impl Endpoint {
    pub fn new(id: impl Into<String>, url: impl Into<String>) -> Self {
        Endpoint {
            id: id.into(),
            url: url.into(),
        }
    }
}

/// A source of credentials the router attaches to requests for a tier. The
/// tier owns it (and its cache), so its probes and the routed requests share
/// one token.
#[async_trait]
pub trait RequestCredentials: Send + Sync + 'static {
    /// The `Authorization` value (`Bearer …`) for the next request, marked
    /// sensitive. Cached by the implementation; a fetch is bounded by its
    /// own deadline.
    async fn authorization(&self) -> Result<http::HeaderValue, TierError>;
    /// The upstream refused `value` (HTTP 401): drop it if it is still the
    /// cached one, so the next request fetches afresh.
    async fn rejected(&self, value: &http::HeaderValue);
}

/// How requests to a tier are authenticated.
#[derive(Clone, Default)]
pub enum RequestAuth {
    /// Sent as the client sent them.
    #[default]
    None,
    /// Google's ID token for the service (Cloud Run): in `Authorization`, or
    /// in `X-Serverless-Authorization` when the client sent its own
    /// `Authorization`.
    IdToken(Arc<dyn RequestCredentials>),
}

impl fmt::Debug for RequestAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestAuth::None => f.write_str("None"),
            RequestAuth::IdToken(_) => f.write_str("IdToken"),
        }
    }
}

impl PartialEq for RequestAuth {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (RequestAuth::None, RequestAuth::None) => true,
            (RequestAuth::IdToken(a), RequestAuth::IdToken(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// What the data path needs to know of a tier, fixed for the life of its
/// driver: the tier actor hands it to the root along with its status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteInfo {
    pub auth: RequestAuth,
    /// How long a first request after the tier sat idle may take (Cloud
    /// Run's cold start); `None`: the router's per-try timeout applies.
    pub cold_start_timeout: Option<Duration>,
}

/// One tier in the routing table.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteTier {
    pub tier: TierId,
    pub state: TierState,
    /// Why it is in that state, for the router's 503 body.
    pub reason: String,
    /// Where its traffic goes; empty while nothing serves.
    pub endpoints: Vec<Endpoint>,
    pub info: RouteInfo,
    /// Where the router reports request outcomes; `None` while the tier's
    /// actor is down (being restarted).
    pub reporter: Option<RequestReporter>,
}

impl RouteTier {
    /// Whether requests may go to this tier.
    pub fn is_serving(&self) -> bool {
        self.state.is_serving() && !self.endpoints.is_empty()
    }
}

/// What the router reads: published by the root after every decision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutingTable {
    /// The tier the waterfall chose.
    pub active: Option<TierId>,
    /// Every configured tier, in waterfall order.
    pub tiers: Vec<RouteTier>,
    /// A start is in progress, so a request may wait for a tier to serve.
    pub starting: Option<TierId>,
    /// The last decision line: why no tier serves, when none does.
    pub decision: String,
    /// The root is shutting down: nothing new will start.
    pub stopping: bool,
}

impl RoutingTable {
    pub fn tier(&self, tier: TierId) -> Option<&RouteTier> {
        self.tiers.iter().find(|t| t.tier == tier)
    }
}

/// What happened to one proxied request, as the tier's breaker counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOutcome {
    /// The endpoint's id.
    pub endpoint: String,
    /// `None`: answered (any status but 502/503/504). `Some`: the failure,
    /// e.g. `HTTP 503` or `connection refused`.
    pub error: Option<String>,
}

/// Sends request outcomes to a tier's actor. A send is a message, never a
/// call: the data path does not wait on the control path.
#[derive(Clone)]
pub struct RequestReporter {
    tier: TierId,
    actor: ActorRef<TierMsg>,
}

impl RequestReporter {
    pub fn new(tier: TierId, actor: ActorRef<TierMsg>) -> Self {
        RequestReporter { tier, actor }
    }

    pub fn tier(&self) -> TierId {
        self.tier
    }

    pub fn report(&self, outcome: RequestOutcome) {
        // Fails only when the actor has stopped; its successor starts with
        // a fresh breaker, so nothing is lost that matters.
        if self
            .actor
            .send_message(TierMsg::RequestOutcome(outcome))
            .is_err()
        {
            tracing::debug!(backend.tier = %self.tier, "Request outcome dropped: tier actor has stopped.");
        }
    }
}

impl fmt::Debug for RequestReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestReporter({}, {})", self.tier, self.actor.get_id())
    }
}

impl PartialEq for RequestReporter {
    fn eq(&self, other: &Self) -> bool {
        self.tier == other.tier && self.actor.get_id() == other.actor.get_id()
    }
}
