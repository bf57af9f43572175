//! The Cloud Run admin API (v2) fake: `services.get` for the one configured service, whose
//! Ready condition tests flip with [`crate::FakeGcp::set_service_ready`]. Answers enums as
//! numbers when the client asks for `$alt=json;enum-encoding=int`, as google-cloud-rust does.
//! Any other method answers 501 and is recorded as a rejection.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::Shared;
use crate::api_error::ApiError;
use crate::discovery::Api;
use crate::gateway::{self, Call};
use crate::server::run_timestamp;

/// The admin API's view of the service.
pub(crate) struct RunState {
    pub ready: bool,
    pub message: String,
    /// When the Ready condition last changed.
    pub transitioned: SystemTime,
    pub requests: u32,
    /// How long each answer waits before it is sent (a slow Admin API).
    pub latency: Duration,
}

impl Default for RunState {
    fn default() -> Self {
        Self {
            ready: true,
            message: String::new(),
            transitioned: SystemTime::now(),
            requests: 0,
            latency: Duration::ZERO,
        }
    }
}

/// The methods [`handle`] serves; any other method of the document answers 501.
pub(crate) const IMPLEMENTED: &[&str] = &["run.projects.locations.services.get"];

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = {
        let mut state = shared.lock();
        state.run.requests += 1;
        state.run.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let call = match gateway::admit(&shared, Api::Run, &method, &uri, &headers, &body) {
        Ok(call) => call,
        Err(refusal) => return refusal.error.into_response(),
    };
    if !IMPLEMENTED.contains(&call.method_id.as_str()) {
        shared.reject(format!(
            "{}: a valid Cloud Run admin method the fake does not implement",
            call.method_id
        ));
        return ApiError::run(
            501,
            format!(
                "Method {} is valid but not implemented by the fake.",
                call.method_id
            ),
        )
        .into_response();
    }
    get_service(&shared, &call)
}

fn get_service(shared: &Shared, call: &Call) -> Response {
    let name = call.param("name");
    let options = &shared.options;
    let expected = format!(
        "projects/{}/locations/{}/services/{}",
        options.project, options.region, options.run_service
    );
    if name != expected {
        let service = name.rsplit('/').next().unwrap_or_default();
        let region = name.split('/').nth(3).unwrap_or_default();
        let project = name.split('/').nth(1).unwrap_or_default();
        return ApiError::run(
            404,
            format!(
                "Resource '{service}' of kind 'SERVICE' in region '{region}' in project '{project}' does not exist."
            ),
        )
        .into_response();
    }
    let mut service = service_json(shared, &expected);
    if call
        .query("$alt")
        .is_some_and(|alt| alt.contains("enum-encoding=int"))
    {
        encode_enums_as_ints(&mut service);
    }
    Json(service).into_response()
}

fn condition(kind: &str, ready: bool, message: &str, at: SystemTime) -> Value {
    let mut c = json!({
        "type": kind,
        "state": if ready { "CONDITION_SUCCEEDED" } else { "CONDITION_FAILED" },
        "lastTransitionTime": run_timestamp(at),
    });
    if !ready {
        c["message"] = json!(message);
        c["severity"] = json!("ERROR");
        c["reason"] = json!("REVISION_FAILED");
    }
    c
}

/// A v2 Service the way `services.get` returns it (string enums).
pub(crate) fn service_json(shared: &Shared, name: &str) -> Value {
    let (ready, message, at) = {
        let state = shared.lock();
        (
            state.run.ready,
            state.run.message.clone(),
            state.run.transitioned,
        )
    };
    let options = &shared.options;
    let url = &shared.endpoints.service_url;
    let creator = crate::token::client_email(&options.project);
    let revision = format!("{name}/revisions/{}-00001-fak", options.run_service);
    json!({
        "name": name,
        "uid": "6f1d5e2a-3b4c-4d5e-8f90-a1b2c3d4e5f6",
        "generation": "1",
        "observedGeneration": "1",
        "createTime": run_timestamp(shared.started),
        "updateTime": run_timestamp(at),
        "creator": creator,
        "lastModifier": creator,
        "ingress": "INGRESS_TRAFFIC_ALL",
        "launchStage": "GA",
        "template": {
            "containers": [{
                "image": format!("{}-docker.pkg.dev/{}/cascade/{}:latest", options.region, options.project, options.run_service),
                "ports": [{"name": "http1", "containerPort": 8080}],
            }],
            "maxInstanceRequestConcurrency": 80,
            "timeout": "300s",
        },
        "traffic": [{"type": "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST", "percent": 100}],
        "terminalCondition": condition("Ready", ready, &message, at),
        "conditions": [
            condition("RoutesReady", ready, &message, at),
            condition("ConfigurationsReady", ready, &message, at),
        ],
        "latestReadyRevision": revision,
        "latestCreatedRevision": revision,
        "trafficStatuses": [{"type": "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST", "percent": 100}],
        "uri": url,
        "urls": [url],
        "reconciling": false,
        "etag": "\"CKj9vqsGEJjX0v4C/cHJvamVjdHMvZmFrZQ\"",
    })
}

/// Rewrites the enum fields [`service_json`] emits to their proto numbers.
fn encode_enums_as_ints(service: &mut Value) {
    fn number(field: &str, name: &str) -> Option<u32> {
        let table: &[&str] = match field {
            "state" => &[
                "STATE_UNSPECIFIED",
                "CONDITION_PENDING",
                "CONDITION_RECONCILING",
                "CONDITION_FAILED",
                "CONDITION_SUCCEEDED",
            ],
            "severity" => &["SEVERITY_UNSPECIFIED", "ERROR", "WARNING", "INFO"],
            "reason" => &["COMMON_REASON_UNDEFINED", "UNKNOWN", "REVISION_FAILED"],
            "ingress" => &[
                "INGRESS_TRAFFIC_UNSPECIFIED",
                "INGRESS_TRAFFIC_ALL",
                "INGRESS_TRAFFIC_INTERNAL_ONLY",
                "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER",
                "INGRESS_TRAFFIC_NONE",
            ],
            "type" => &[
                "TRAFFIC_TARGET_ALLOCATION_TYPE_UNSPECIFIED",
                "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST",
                "TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION",
            ],
            // google.api.LaunchStage numbers are not contiguous.
            "launchStage" => {
                return match name {
                    "LAUNCH_STAGE_UNSPECIFIED" => Some(0),
                    "EARLY_ACCESS" => Some(1),
                    "ALPHA" => Some(2),
                    "BETA" => Some(3),
                    "GA" => Some(4),
                    "DEPRECATED" => Some(5),
                    "PRELAUNCH" => Some(7),
                    "UNIMPLEMENTED" => Some(6),
                    _ => None,
                };
            }
            _ => return None,
        };
        table.iter().position(|n| *n == name).map(|i| i as u32)
    }
    fn rewrite(object: &mut Value, fields: &[&str]) {
        for field in fields {
            if let Some(n) = object[*field].as_str().and_then(|name| number(field, name)) {
                object[*field] = json!(n);
            }
        }
    }
    rewrite(service, &["ingress", "launchStage"]);
    rewrite(
        &mut service["terminalCondition"],
        &["state", "severity", "reason"],
    );
    for key in ["conditions", "traffic", "trafficStatuses"] {
        if let Some(items) = service[key].as_array_mut() {
            for item in items {
                rewrite(item, &["state", "severity", "reason", "type"]);
            }
        }
    }
}
