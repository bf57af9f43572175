//! The Cloud Run service itself (its own listener, [`crate::FakeGcp::service_url`]): answers any
//! path with 200 `{"status":"ok"}` when the caller presents a valid Google-signed ID token for
//! its URL — 401 for a missing, malformed, badly signed or expired token, 403 for another
//! audience, as Cloud Run's IAM front end does — or with the injected fault. Every request is
//! recorded.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;

use crate::{ServiceRequest, Shared};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let response = answer(&shared, bearer.as_deref());
    shared.lock().service_requests.push(ServiceRequest {
        at: Instant::now(),
        path,
        bearer,
        status: response.status().as_u16(),
    });
    response
}

fn answer(shared: &Shared, bearer: Option<&str>) -> Response {
    if let Some(fault) = shared.lock().service_fault {
        let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut response = (
            status,
            format!("{}\n", status.canonical_reason().unwrap_or("Error")),
        )
            .into_response();
        if let Some(seconds) = fault.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        return response;
    }
    if shared.options.service_requires_auth
        && let Err(status) = authorize(shared, bearer)
    {
        return denied(status);
    }
    Json(json!({ "status": "ok" })).into_response()
}

/// Checks the ID token the way Cloud Run does for a private service.
fn authorize(shared: &Shared, bearer: Option<&str>) -> Result<(), StatusCode> {
    let token = bearer
        .filter(|t| !t.is_empty())
        .ok_or(StatusCode::UNAUTHORIZED)?;
    let claims = shared
        .keys
        .verify(token)
        .map_err(|_| StatusCode::UNAUTHORIZED)?;
    if claims["iss"].as_str() != Some("https://accounts.google.com") {
        return Err(StatusCode::UNAUTHORIZED);
    }
    if claims["aud"].as_str() != Some(shared.endpoints.service_url.as_str()) {
        return Err(StatusCode::FORBIDDEN);
    }
    Ok(())
}

fn denied(status: StatusCode) -> Response {
    let (text, challenge) = if status == StatusCode::FORBIDDEN {
        (
            "Your client does not have permission to get URL from this server.",
            "Bearer error=\"insufficient_scope\"",
        )
    } else {
        (
            "Your client does not have permission to the requested URL.",
            "Bearer error=\"invalid_token\" error_description=\"The access token could not be verified\"",
        )
    };
    let mut response = (status, format!("{status} {text}\n")).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}
