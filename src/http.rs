//! The status API (axum): liveness, readiness, status, and operator actions.
//!
//! Invariant: read handlers only read the published snapshot; they never wait
//! on an actor. Mutations are POSTs that need the bearer token from the state
//! directory; without it they do nothing and answer 401.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cascade_actors::TierId;
use cascade_actors::contract::{RestartRequest, TierError};
use cascade_actors::supervisor::{RootMsg, Snapshot};
use ractor::ActorRef;
use ractor::rpc::CallResult;
use serde_json::json;
use tokio::sync::watch;

#[derive(Clone)]
pub struct ApiState {
    pub snapshots: watch::Receiver<Snapshot>,
    pub root: ActorRef<RootMsg>,
    pub token: String,
    /// How long a restart may take before the API gives up waiting.
    pub restart_timeout: Duration,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/tiers/{tier}/restart", post(restart))
        .with_state(state)
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

async fn status(State(api): State<ApiState>) -> Json<Snapshot> {
    Json(api.snapshots.borrow().clone())
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
