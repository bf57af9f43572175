//! The status API (axum): liveness, readiness, status, the live status page
//! (`GET /`, fed by server-sent events on `GET /events`), Prometheus metrics
//! (`GET /metrics`), and operator actions.
//!
//! Every request passes one guard first (`guard`): its `Host` must be an IP
//! address, `localhost` or a configured name (DNS rebinding); it carries no
//! body and no query parameter its endpoint does not take (400: a misspelt
//! `dry_run` must not become a real restart); and it has the token unless it
//! is `/healthz` or `/readyz`, or a read on a loopback-only API.
//!
//! Invariant: read handlers only read the published snapshot; they never wait
//! on an actor. Mutations are POSTs that need the bearer token from the state
//! directory; without it they do nothing and answer 401.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use cascade_actors::TierId;
use cascade_actors::contract::{RestartRequest, TierError};
use cascade_actors::supervisor::{RootMsg, Snapshot};
use cascade_router::{RouterHandle, RouterStatus};
use ractor::ActorRef;
use ractor::rpc::CallResult;
use serde_json::json;
use tokio::sync::{Semaphore, watch};

use crate::telemetry::Scrape;

#[derive(Clone)]
pub struct ApiState {
    pub snapshots: watch::Receiver<Snapshot>,
    /// The router's counters; `None` when `router.enabled = false`.
    pub router: Option<RouterHandle>,
    pub root: ActorRef<RootMsg>,
    pub token: String,
    /// Whether reads need the token too (the API listens off loopback).
    pub reads_need_token: bool,
    /// `api.allowed_hosts`, lowercased.
    pub allowed_hosts: Arc<Vec<String>>,
    /// One permit per open `/events` stream (`api.max_event_streams`).
    pub event_streams: Arc<Semaphore>,
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
        .route_layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// The query parameters each endpoint takes; every other endpoint takes none.
fn parameters(route: &str) -> &'static [&'static str] {
    match route {
        "/tiers/{tier}/restart" => &["force", "dry_run"],
        _ => &[],
    }
}

/// Endpoints anyone who can connect may call: a load balancer's or a
/// service manager's checks.
const ALWAYS_OPEN: [&str; 2] = ["/healthz", "/readyz"];

/// Host, body, query and token checks, before any handler runs.
async fn guard(State(api): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let headers = request.headers();
    if let Some(host) = headers.get(header::HOST)
        && !host_allowed(host, &api.allowed_hosts)
    {
        return error(
            StatusCode::FORBIDDEN,
            &format!(
                "Host `{}` is not allowed; use an IP address, localhost, or a name in api.allowed_hosts",
                String::from_utf8_lossy(host.as_bytes())
            ),
        );
    }
    if has_body(headers) {
        return error(
            StatusCode::BAD_REQUEST,
            "this API takes no request body; options are query parameters",
        );
    }
    if let Err(message) = check_query(request.uri().query(), parameters(&route)) {
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    let open = ALWAYS_OPEN.contains(&route.as_str()) || (read && !api.reads_need_token);
    if !open && !authorized(headers, &api.token) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see the token file in cascade's state directory)",
        );
        // A browser asks for Basic credentials (the token as password) and
        // then sends them with every request, the event stream's included.
        for challenge in [
            "Bearer realm=\"cascade\"",
            "Basic realm=\"cascade\", charset=\"UTF-8\"",
        ] {
            response.headers_mut().append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        return response;
    }
    next.run(request).await
}

/// IP literals and `localhost` cannot be rebound by DNS; other names must be
/// listed.
fn host_allowed(host: &HeaderValue, allowed: &[String]) -> bool {
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // `[::1]:7373`
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<IpAddr>().is_ok());
        }
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<IpAddr>().is_ok() || name == "localhost" || allowed.contains(&name)
}

fn has_body(headers: &HeaderMap) -> bool {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    headers.contains_key(header::TRANSFER_ENCODING) || length.is_some_and(|n| n > 0)
}

/// Every parameter known, none twice.
fn check_query(query: Option<&str>, known: &[&str]) -> Result<(), String> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(());
    };
    let mut seen: Vec<String> = Vec::new();
    for (name, _) in url::form_urlencoded::parse(query.as_bytes()) {
        let shown = crate::settings::printable(&name).into_owned();
        if !known.contains(&name.as_ref()) {
            return Err(match known {
                [] => format!("unknown query parameter `{shown}`: this endpoint takes none"),
                _ => format!(
                    "unknown query parameter `{shown}`; this endpoint takes {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        if seen.iter().any(|s| *s == name) {
            return Err(format!("query parameter `{shown}` is given twice"));
        }
        seen.push(name.into_owned());
    }
    Ok(())
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// The published snapshot as a stream: the current one at once, then one per
/// change. Each connection has its own receiver, so a slow client only falls
/// behind itself (the watch channel keeps just the newest value) and a gone
/// client drops its stream without touching anything else.
///
/// At most `api.max_event_streams` at once; beyond that a client gets 503
/// with `Retry-After` (browsers' EventSource retries by itself).
async fn events(State(api): State<ApiState>) -> Response {
    let Ok(permit) = api.event_streams.clone().try_acquire_owned() else {
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many event streams open (api.max_event_streams); try again later",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return response;
    };
    let mut snapshots = api.snapshots.clone();
    // So the first `changed()` yields the current snapshot at once.
    snapshots.mark_changed();
    // The permit lives as long as the stream.
    let stream =
        futures_util::stream::unfold((snapshots, permit), |(mut snapshots, permit)| async move {
            // Err: the sender is gone (cascade is stopping); end the stream.
            snapshots.changed().await.ok()?;
            let event = snapshot_event(&snapshots.borrow_and_update());
            Some((Ok::<_, Infallible>(event), (snapshots, permit)))
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
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

/// The guard has checked the token and the parameters.
async fn restart(
    State(api): State<ApiState>,
    Path(tier): Path<String>,
    query: Result<Query<RestartRequest>, axum::extract::rejection::QueryRejection>,
) -> Response {
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

/// `Bearer TOKEN`, or `Basic` with the token as the password (any user).
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(given) = value.strip_prefix("Bearer ") {
        return constant_time_eq(given.trim().as_bytes(), token.as_bytes());
    }
    if let Some(encoded) = value.strip_prefix("Basic ")
        && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim())
        && let Some(colon) = decoded.iter().position(|&b| b == b':')
    {
        return constant_time_eq(&decoded[colon + 1..], token.as_bytes());
    }
    false
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
        // user:abc and :abc
        headers.insert(header::AUTHORIZATION, "Basic dXNlcjphYmM=".parse().unwrap());
        assert!(authorized(&headers, "abc"));
        headers.insert(header::AUTHORIZATION, "Basic OmFiYw==".parse().unwrap());
        assert!(authorized(&headers, "abc"));
        assert!(!authorized(&headers, "abcd"));
    }

    #[test]
    fn only_names_dns_cannot_rebind_are_allowed_hosts() {
        let allowed = vec!["cascade.internal".to_owned()];
        for host in [
            "127.0.0.1:7373",
            "127.0.0.1",
            "[::1]:7373",
            "localhost:7373",
            "LOCALHOST",
            "10.1.2.3:80",
            "cascade.internal:7373",
            "Cascade.Internal.",
        ] {
            assert!(
                host_allowed(&HeaderValue::from_static(host), &allowed),
                "{host}"
            );
        }
        for host in [
            "evil.example:7373",
            "localhost.evil.example",
            "[evil]:1",
            "127.0.0.1.nip.io",
        ] {
            assert!(
                !host_allowed(&HeaderValue::from_static(host), &allowed),
                "{host}"
            );
        }
    }

    #[test]
    fn queries_name_only_known_parameters_once() {
        let known = ["force", "dry_run"];
        assert!(check_query(None, &known).is_ok());
        assert!(check_query(Some("dry_run=true&force=false"), &known).is_ok());
        for bad in [
            "dryrun=true",
            "dry-run=true",
            "dry_run=true&dry_run=false",
            "x",
        ] {
            assert!(check_query(Some(bad), &known).is_err(), "{bad}");
        }
        assert!(
            check_query(Some("a=1"), &[])
                .unwrap_err()
                .contains("takes none")
        );
    }
}
