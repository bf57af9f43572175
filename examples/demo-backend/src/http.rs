//! The HTTP surface: the ECAPA service's routes (`GET /health`, `POST /embed`),
//! the diagnostic routes a proxy in front is tested with (`/echo`, `/stream`),
//! the injected latency and health failure, and the JSON error shape.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
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
    /// Bumped by `POST /stream/release`: held streams wait for it to change.
    release: watch::Sender<u64>,
    /// Streams waiting for a release now.
    held: AtomicUsize,
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
            release: watch::Sender::new(0),
            held: AtomicUsize::new(0),
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
        .route("/echo", get(echo).post(echo))
        .route("/stream", get(stream))
        .route("/stream/release", post(release))
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

/// Hop-by-hop headers `/echo` answers with, for a proxy to remove: a
/// `Connection` header naming one of its own, that one, and `Keep-Alive`.
pub const ECHO_HOP_BY_HOP: [(&str, &str); 3] = [
    ("connection", "x-echo-hop"),
    ("x-echo-hop", "1"),
    ("keep-alive", "timeout=60"),
];

/// A diagnostic route: answers the request's method, path, query, headers
/// (every value of each, in order) and body length as JSON, with the
/// hop-by-hop headers of [`ECHO_HOP_BY_HOP`] and an end-to-end `x-echo: 1`.
async fn echo(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        seen.entry(name.as_str()).or_default().push(value);
    }
    let mut response = axum::Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": seen,
        "body_bytes": body.len(),
    }))
    .into_response();
    let answer = response.headers_mut();
    for (name, value) in ECHO_HOP_BY_HOP {
        answer.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    answer.insert("x-echo", HeaderValue::from_static("1"));
    response
}

/// Most chunks `/stream` sends, and the longest gap between two.
const MAX_CHUNKS: u32 = 1000;
const MAX_GAP_MS: u64 = 60_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    #[serde(default = "three")]
    chunks: u32,
    #[serde(default)]
    gap_ms: u64,
    #[serde(default)]
    hold: bool,
}

fn three() -> u32 {
    3
}

/// A diagnostic route: a chunked `text/plain` answer of `chunks` lines
/// (`chunk I of N`), `gap_ms` apart. With `hold=true` the first chunk is
/// sent at once and the rest only after `POST /stream/release`, so a test
/// knows the backend has not finished when the first chunk reaches it.
async fn stream(
    State(state): State<AppState>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if !(1..=MAX_CHUNKS).contains(&query.chunks) {
        let reason = format!(
            "chunks must be between 1 and {MAX_CHUNKS}, got {}",
            query.chunks
        );
        return error(StatusCode::BAD_REQUEST, reason);
    }
    if query.gap_ms > MAX_GAP_MS {
        let reason = format!("gap_ms must be at most {MAX_GAP_MS}, got {}", query.gap_ms);
        return error(StatusCode::BAD_REQUEST, reason);
    }
    // Subscribed before the first chunk leaves, so no release can slip by.
    let held = query.hold.then(|| Held::new(&state));
    let (chunks, gap) = (query.chunks, Duration::from_millis(query.gap_ms));
    let lines = futures_util::stream::unfold((1, held), move |(i, mut held)| async move {
        if i > chunks {
            return None;
        }
        if i > 1 {
            if let Some(mut waiting) = held.take() {
                // The sender lives as long as the state this stream holds.
                let _ = waiting.release.changed().await;
            }
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        let line = Bytes::from(format!("chunk {i} of {chunks}\n"));
        Some((Ok::<_, Infallible>(line), (i + 1, held)))
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// A `/stream` waiting for `POST /stream/release`; counted while it waits.
struct Held {
    state: AppState,
    release: watch::Receiver<u64>,
}

impl Held {
    fn new(state: &AppState) -> Held {
        state.0.held.fetch_add(1, Ordering::SeqCst);
        Held {
            state: state.clone(),
            release: state.0.release.subscribe(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.state.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Lets every held `/stream` go on; answers how many were waiting.
async fn release(State(state): State<AppState>) -> Response {
    let waiting = state.0.held.load(Ordering::SeqCst);
    state.0.release.send_modify(|generation| *generation += 1);
    axum::Json(json!({ "released": waiting })).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found".to_string())
}

fn error(status: StatusCode, reason: String) -> Response {
    (status, axum::Json(json!({ "error": reason }))).into_response()
}
