//! The status API (axum): liveness, readiness, status, the live status page
//! (`GET /`, fed by server-sent events on `GET /events`), Prometheus metrics
//! (`GET /metrics`), and operator actions.
//!
//! Invariant: read handlers only read the published snapshot; they never wait
//! on an actor. Mutations are POSTs that need the bearer token from the state
//! directory; without it they do nothing and answer 401.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cascade_actors::TierId;
use cascade_actors::contract::{RestartRequest, TierError};
use cascade_actors::supervisor::{RootMsg, Snapshot};
use cascade_router::{RouterHandle, RouterStatus};
use futures_util::Stream;
use ractor::ActorRef;
use ractor::rpc::CallResult;
use serde_json::json;
use tokio::sync::watch;

use crate::telemetry::Scrape;

#[derive(Clone)]
pub struct ApiState {
    pub snapshots: watch::Receiver<Snapshot>,
    /// The router's counters; `None` when `router.enabled = false`.
    pub router: Option<RouterHandle>,
    pub root: ActorRef<RootMsg>,
    pub token: String,
    /// How long a restart may take before the API gives up waiting.
    pub restart_timeout: Duration,
    /// Renders `GET /metrics` from the meter provider's Prometheus reader.
    pub scrape: Scrape,
}

/// The status page: one self-contained file (inline CSS and JS, no external
/// assets), so it works offline and behind any proxy.
const PAGE: &str = include_str!("page.html");

/// How often an idle event stream sends a comment, so proxies and browsers
/// do not take a quiet connection for a dead one.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/router/history", get(router_history))
        .route("/metrics", get(prometheus_metrics))
        .route("/tiers/{tier}/restart", post(restart))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// The published snapshot as a stream: the current one at once, then one per
/// change. Each connection has its own receiver, so a slow client only falls
/// behind itself (the watch channel keeps just the newest value) and a gone
/// client drops its stream without touching anything else.
async fn events(State(api): State<ApiState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut snapshots = api.snapshots.clone();
    // So the first `changed()` yields the current snapshot at once.
    snapshots.mark_changed();
    let stream = futures_util::stream::unfold(snapshots, |mut snapshots| async move {
        // Err: the sender is gone (cascade is stopping); end the stream.
        snapshots.changed().await.ok()?;
        let event = snapshot_event(&snapshots.borrow_and_update());
        Some((Ok(event), snapshots))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn snapshot_event(snapshot: &Snapshot) -> Event {
    match Event::default().event("snapshot").json_data(snapshot) {
        Ok(event) => event,
        // Snapshot serializes to JSON by construction; say so rather than panic.
        Err(error) => Event::default()
            .event("serialize-error")
            .data(format!("cannot serialize the snapshot: {error}")),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(api): State<ApiState>) -> Response {
    let snapshot = api.snapshots.borrow().clone();
    match snapshot.active {
        Some(tier) => {
            let endpoint = snapshot
                .tiers
                .iter()
                .find(|t| t.active)
                .and_then(|t| t.status.endpoint.clone());
            (
                StatusCode::OK,
                Json(json!({ "ready": true, "active": tier, "endpoint": endpoint })),
            )
                .into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "active": null, "reason": snapshot.decision })),
        )
            .into_response(),
    }
}

/// `GET /status`: the snapshot, and the router's counters under `router`
/// (`null` when it is disabled).
#[derive(serde::Serialize)]
struct Status {
    #[serde(flatten)]
    snapshot: Snapshot,
    router: Option<RouterStatus>,
}

async fn status(State(api): State<ApiState>) -> Json<Status> {
    let snapshot = api.snapshots.borrow().clone();
    Json(Status {
        snapshot,
        router: api.router.as_ref().map(RouterHandle::status),
    })
}

/// `GET /router/history`: per tier, 15 minutes of request rate and p99
/// latency and the tier's phases, for the status page's charts.
async fn router_history(State(api): State<ApiState>) -> Response {
    match &api.router {
        Some(router) => Json(router.history()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "the router is disabled (router.enabled = false)",
        ),
    }
}

/// The Prometheus text exposition (format 0.0.4). Collecting reads the
/// instruments' in-memory aggregates; it waits on no actor.
async fn prometheus_metrics(State(api): State<ApiState>) -> Response {
    match api.scrape.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot render the metrics: {e}"),
        ),
    }
}

async fn restart(
    State(api): State<ApiState>,
    Path(tier): Path<String>,
    headers: HeaderMap,
    query: Result<Query<RestartRequest>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !authorized(&headers, &api.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see the token file in cascade's state directory)",
        );
    }
    let Some(tier) = TierId::parse(&tier) else {
        let known: Vec<&str> = TierId::ALL.iter().map(|t| t.as_str()).collect();
        return error(
            StatusCode::NOT_FOUND,
            &format!("unknown tier `{tier}`; tiers are {}", known.join(", ")),
        );
    };
    let Query(request) = match query {
        Ok(q) => q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("bad query: {}", e.body_text()),
            );
        }
    };
    let call = api
        .root
        .call(
            |reply| RootMsg::Restart {
                tier,
                request,
                reply,
            },
            Some(api.restart_timeout),
        )
        .await;
    match call {
        Ok(CallResult::Success(Ok(report))) => (StatusCode::OK, Json(report)).into_response(),
        Ok(CallResult::Success(Err(TierError(message)))) => error(StatusCode::CONFLICT, &message),
        Ok(CallResult::Timeout) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "restart did not finish in time; see `cascade status`",
        ),
        Ok(CallResult::SenderError) | Err(_) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "cascade is shutting down")
        }
    }
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

/// Comparison whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_must_match_exactly() {
        let mut headers = HeaderMap::new();
        assert!(!authorized(&headers, "abc"));
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert!(authorized(&headers, "abc"));
        assert!(!authorized(&headers, "abcd"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(!authorized(&headers, "abc"));
    }
}
