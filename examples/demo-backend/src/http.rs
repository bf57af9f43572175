//! The HTTP surface: the ECAPA service's routes (`GET /health`, `POST /embed`),
//! the injected latency and health failure, and the JSON error shape.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::time::Instant;

use crate::embed::{EMBEDDING_DIM, decode_wav, embed};

/// What `/health` and `/embed` report as the model, so nobody mistakes it.
pub const MODEL_LABEL: &str = "demo-ecapa (stand-in, not a model)";

/// Largest accepted request body; 60 s of 48 kHz stereo fits with room to spare.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Shared, read-only state of one server instance.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    name: String,
    started: Instant,
    fail_health_after: Option<(f64, Duration)>,
    latency: Duration,
}

impl AppState {
    /// State whose clock (uptime, health failure) starts now.
    ///
    /// `fail_health_after` is in seconds and must be finite and non-negative.
    pub fn new(
        name: impl Into<String>,
        fail_health_after: Option<f64>,
        latency: Duration,
    ) -> std::io::Result<Self> {
        let fail_health_after = fail_health_after
            .map(|secs| crate::seconds(secs, "fail_health_after").map(|d| (secs, d)))
            .transpose()?;
        Ok(Self(Arc::new(Inner {
            name: name.into(),
            started: Instant::now(),
            fail_health_after,
            latency,
        })))
    }

    pub(crate) fn started(&self) -> Instant {
        self.0.started
    }
}

/// The demo service's routes, with the latency knob and body limit applied.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/embed", post(embed_wav))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost, so even 404s and 413s are slow, as a slow upstream would be.
        .layer(middleware::from_fn_with_state(state.clone(), add_latency))
        .with_state(state)
}

async fn add_latency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.0.latency.is_zero() {
        tokio::time::sleep(state.0.latency).await;
    }
    next.run(req).await
}

async fn health(State(state): State<AppState>) -> Response {
    let uptime = state.0.started.elapsed();
    if let Some((secs, after)) = state.0.fail_health_after
        && uptime >= after
    {
        let body = json!({
            "status": "failing",
            "reason": format!("health failure injected after {secs} s"),
        });
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(json!({
        "status": "ok",
        "name": state.0.name,
        "model": MODEL_LABEL,
        "embedding_dim": EMBEDDING_DIM,
        "uptime_s": uptime.as_secs_f64(),
    }))
    .into_response()
}

// Decoding and hashing run inline: the 60 s cap bounds them to a few milliseconds.
async fn embed_wav(body: Result<Bytes, BytesRejection>) -> Response {
    let bytes = match body {
        Ok(bytes) => bytes,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let reason = format!("request body too large: max {} MiB", MAX_BODY_BYTES >> 20);
            return error(StatusCode::PAYLOAD_TOO_LARGE, reason);
        }
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    match decode_wav(&bytes) {
        Ok(audio) => axum::Json(json!({
            "embedding": embed(&audio.samples, audio.sample_rate, audio.channels),
            "dim": EMBEDDING_DIM,
            "sample_rate": audio.sample_rate,
            "duration_s": audio.duration_s(),
            "model": MODEL_LABEL,
        }))
        .into_response(),
        Err(reason) => error(StatusCode::BAD_REQUEST, reason),
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found".to_string())
}

fn error(status: StatusCode, reason: String) -> Response {
    (status, axum::Json(json!({ "error": reason }))).into_response()
}
