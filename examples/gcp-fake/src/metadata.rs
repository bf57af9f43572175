//! The GCE metadata server (`GCE_METADATA_HOST`): the default service account's ID tokens and
//! access tokens, plus the other keys google-cloud-auth and friends read (email, scopes,
//! universe domain, project id, zone). Like the real one it refuses any request without
//! `Metadata-Flavor: Google` and stamps that header on every answer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::Shared;
use crate::token::id_token_claims;

const SA_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default";
const SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
];
/// The numeric project id the fake reports.
pub(crate) const PROJECT_NUMBER: &str = "123456789012";

type Query = axum::extract::Query<BTreeMap<String, String>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { "computeMetadata/\n" }))
        .route("/computeMetadata/", get(|| async { "v1/\n" }))
        .route(
            "/computeMetadata/v1/",
            get(|| async { "instance/\nproject/\nuniverse/\n" }),
        )
        .route(&format!("{SA_PATH}/identity"), get(identity))
        .route(&format!("{SA_PATH}/token"), get(access_token))
        .route(&format!("{SA_PATH}/email"), get(email))
        .route(
            &format!("{SA_PATH}/scopes"),
            get(|| async { SCOPES.join("\n") + "\n" }),
        )
        .route(&format!("{SA_PATH}/aliases"), get(|| async { "default\n" }))
        .route(&format!("{SA_PATH}/"), get(service_account))
        .route(
            "/computeMetadata/v1/instance/service-accounts/",
            get(accounts),
        )
        .route(
            "/computeMetadata/v1/universe/universe-domain",
            get(|| async { "googleapis.com" }),
        )
        .route("/computeMetadata/v1/project/project-id", get(project_id))
        .route(
            "/computeMetadata/v1/project/numeric-project-id",
            get(|| async { PROJECT_NUMBER }),
        )
        .route("/computeMetadata/v1/instance/zone", get(zone))
        .route(
            "/computeMetadata/v1/instance/id",
            get(|| async { "4096409640964096409" }),
        )
        .route(
            "/computeMetadata/v1/instance/name",
            get(|| async { "cascade-host" }),
        )
        .route("/computeMetadata/v1/instance/hostname", get(hostname))
        .fallback(not_found)
        .layer(middleware::from_fn(flavor))
        .with_state(shared)
}

/// Refuses requests without `Metadata-Flavor: Google` (except the root ping) and stamps the
/// header on every answer, as the real server does.
async fn flavor(request: Request, next: Next) -> Response {
    let has_header = request
        .headers()
        .get("metadata-flavor")
        .is_some_and(|v| v.as_bytes() == b"Google");
    let mut response = if has_header || request.uri().path() == "/" {
        next.run(request).await
    } else {
        (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.\n",
        )
            .into_response()
    };
    response
        .headers_mut()
        .insert("metadata-flavor", HeaderValue::from_static("Google"));
    response
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "Not Found\n").into_response()
}

/// The default service account of the fake VM (distinct from the key-file account).
pub(crate) fn default_email() -> String {
    format!("{PROJECT_NUMBER}-compute@developer.gserviceaccount.com")
}

fn injected_failure(shared: &Shared) -> Option<Response> {
    let status = shared.lock().fail_token_requests?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Some((status, "Injected failure.\n").into_response())
}

async fn identity(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(query): Query,
) -> Response {
    if let Some(failure) = injected_failure(&shared) {
        return failure;
    }
    let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "non-empty audience parameter required\n",
        )
            .into_response();
    };
    let full = match query.get("format").map(String::as_str) {
        None | Some("standard") => false,
        Some("full") => true,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("invalid format parameter: {other}\n"),
            )
                .into_response();
        }
    };
    let lifetime = shared.lock().token_lifetime;
    let mut claims = id_token_claims(audience, &default_email(), lifetime);
    if full {
        let mut google = json!({
            "compute_engine": {
                "project_id": shared.options.project,
                "project_number": PROJECT_NUMBER.parse::<u64>().unwrap_or_default(),
                "zone": shared.options.zone,
                "instance_id": "4096409640964096409",
                "instance_name": "cascade-host",
                "instance_creation_timestamp": 1_700_000_000u64,
            }
        });
        if query.get("licenses").is_some_and(|l| l == "TRUE") {
            google["compute_engine"]["license_id"] = json!([]);
        }
        claims["google"] = google;
    }
    let token = shared.keys.sign(&claims);
    shared.lock().id_tokens.metadata += 1;
    let mut response = token.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

async fn access_token(State(shared): State<Arc<Shared>>) -> Response {
    if let Some(failure) = injected_failure(&shared) {
        return failure;
    }
    let (token, lifetime) = {
        let mut state = shared.lock();
        state.access_tokens += 1;
        (
            format!("ya29.fake-metadata-token-{}", state.access_tokens),
            state.token_lifetime,
        )
    };
    Json(json!({
        "access_token": token,
        "expires_in": lifetime.as_secs(),
        "token_type": "Bearer",
    }))
    .into_response()
}

async fn email() -> String {
    default_email()
}

async fn service_account(axum::extract::Query(query): Query) -> Response {
    if query.get("recursive").is_some_and(|r| r == "true") {
        return Json(json!({
            "aliases": ["default"],
            "email": default_email(),
            "scopes": SCOPES,
        }))
        .into_response();
    }
    "aliases\nemail\nidentity\nscopes\ntoken\n".into_response()
}

async fn accounts() -> String {
    format!("default/\n{}/\n", default_email())
}

async fn project_id(State(shared): State<Arc<Shared>>) -> String {
    shared.options.project.clone()
}

async fn zone(State(shared): State<Arc<Shared>>) -> String {
    format!("projects/{PROJECT_NUMBER}/zones/{}", shared.options.zone)
}

async fn hostname(State(shared): State<Arc<Shared>>) -> String {
    format!(
        "cascade-host.{}.c.{}.internal",
        shared.options.zone, shared.options.project
    )
}
