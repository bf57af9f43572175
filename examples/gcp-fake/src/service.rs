//! The Cloud Run service itself ([`crate::FakeGcp::service_url`], its own listener): the demo
//! backend's routes (`GET /health`, `POST /embed`, as the ECAPA stand-in answers them) behind
//! Cloud Run's IAM front end. Every request must carry a valid Google-signed ID token for the
//! service URL — in `X-Serverless-Authorization` when the caller sent one (so the application
//! keeps `Authorization` for itself), else in `Authorization` — or it is answered 401 (missing,
//! malformed, badly signed or expired) or 403 (another audience), as Cloud Run does for a private
//! service. Faults: [`crate::FakeGcp::set_service_fault`] answers every request,
//! [`crate::FakeGcp::set_request_fault`] every request but the health check (routed traffic).
//! Every request is recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::{ServiceFault, ServiceRequest, Shared};

/// The path Cloud Run probes reach (the demo backend's health route).
pub(crate) const HEALTH_PATH: &str = "/health";
const SERVERLESS_AUTHORIZATION: &str = "x-serverless-authorization";

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    // The demo backend's state cannot fail to build without its failure knob.
    let demo = cascade_demo::AppState::new("cloud-run-fake", None, Duration::ZERO)
        .expect("the demo backend's state builds");
    cascade_demo::router(demo).layer(middleware::from_fn_with_state(shared, front_end))
}

/// What the caller presented: the ID token checked, and where it came from.
struct Presented {
    bearer: Option<String>,
    serverless: bool,
    authorization: Option<String>,
}

fn presented(headers: &HeaderMap) -> Presented {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let bearer = |value: &str| value.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    let authorization = text(header::AUTHORIZATION.as_str());
    match text(SERVERLESS_AUTHORIZATION) {
        Some(serverless) => Presented {
            bearer: bearer(&serverless),
            serverless: true,
            authorization,
        },
        None => Presented {
            bearer: authorization.as_deref().and_then(bearer),
            serverless: false,
            authorization,
        },
    }
}

async fn front_end(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let method = request.method().to_string();
    let who = presented(request.headers());
    let (fault, request_fault) = {
        let state = shared.lock();
        (state.service_fault, state.request_fault)
    };
    let fault = fault.or(request_fault.filter(|_| path != HEALTH_PATH));
    let response = if let Some(fault) = fault {
        // Read first, as Cloud Run's front end takes the whole request
        // before it answers: a client is never cut off mid-body.
        let _ = axum::body::to_bytes(request.into_body(), 64 << 20).await;
        faulted(fault)
    } else if shared.options.service_requires_auth
        && let Err(status) = authorize(&shared, who.bearer.as_deref())
    {
        denied(status)
    } else {
        next.run(request).await
    };
    shared.lock().service_requests.push(ServiceRequest {
        at: Instant::now(),
        method,
        path,
        bearer: who.bearer,
        serverless_authorization: who.serverless,
        authorization: who.authorization,
        status: response.status().as_u16(),
    });
    response
}

fn faulted(fault: ServiceFault) -> Response {
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
    response
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
