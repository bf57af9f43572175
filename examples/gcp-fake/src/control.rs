//! The control endpoint ([`crate::FakeGcp::control_url`], its own listener): every fault knob of
//! the fake over plain HTTP, so a person (or a test driving the binary) can make the Cloud Run
//! service, its Admin API, Compute Engine and the metadata server fail on purpose with `curl`.
//! `GET /` lists the knobs ([`KNOBS`], also in the binary's `--help`); `GET /state` shows the
//! instances. Every answer is one line of text saying what is now in force; a bad parameter is a
//! 400 naming it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::{ServiceFault, Shared};

/// The knobs, as `GET /` and `cascade-gcp-fake --help` list them.
pub const KNOBS: &str = "\
Control endpoint (POST with query parameters; each answers one line saying what is in force):
  /service/fault?status=503&retry_after=5    every request to the Cloud Run service, probes
                                             included, answers STATUS (a 503/429 storm;
                                             retry_after optional); DELETE /service/fault ends it
  /service/request-fault?status=503          every request but the health check answers STATUS
                                             (routed traffic fails, probes pass); DELETE ends it
  /service/ready?ready=false&message=TEXT    the Cloud Run Admin API's Ready condition fails
                                             with TEXT; ready=true restores it
  /service/admin-latency?ms=N                the Cloud Run Admin API answers N ms late (0: at once)
  /compute/fault?method=compute.instances.insert&status=429&retry_after=5&times=N
                                             the next N calls (default: until DELETE
                                             /compute/fault?method=...) of a Compute Engine
                                             method answer STATUS (429 or 5xx)
  /compute/operations?complete=false         zone operations created from now on never finish;
                                             complete=true lets new ones finish again
  /compute/preempt?instance=NAME             preempt a VM: STOPPING at once, TERMINATED after
                                             the preemption grace
  /compute/preemption-grace?ms=N             grace of later preemptions
  /metadata/fault?status=500                 the metadata server's token endpoints and the
                                             OAuth token endpoint answer STATUS; DELETE ends it
  GET /state                                 every instance: name, status, IP
";

/// Without `times`, a Compute Engine fault lasts until cleared.
const UNTIL_CLEARED: u32 = u32::MAX;

type Params = Query<BTreeMap<String, String>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { KNOBS }))
        .route("/state", get(state))
        .route(
            "/service/fault",
            post(service_fault).delete(clear_service_fault),
        )
        .route(
            "/service/request-fault",
            post(request_fault).delete(clear_request_fault),
        )
        .route("/service/ready", post(service_ready))
        .route("/service/admin-latency", post(admin_latency))
        .route(
            "/compute/fault",
            post(compute_fault).delete(clear_compute_fault),
        )
        .route("/compute/operations", post(operations))
        .route("/compute/preempt", post(preempt))
        .route("/compute/preemption-grace", post(preemption_grace))
        .route(
            "/metadata/fault",
            post(metadata_fault).delete(clear_metadata_fault),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                format!("no such knob; GET / lists them\n\n{KNOBS}"),
            )
        })
        .with_state(shared)
}

/// A 400 naming the parameter and what it must be.
struct Bad(String);

impl IntoResponse for Bad {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, format!("{}\n", self.0)).into_response()
    }
}

fn ok(text: String) -> Response {
    (StatusCode::OK, format!("{text}\n")).into_response()
}

fn number<T: std::str::FromStr>(
    params: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<T>, Bad> {
    params
        .get(key)
        .map(|value| {
            value
                .parse()
                .map_err(|_| Bad(format!("`{key}={value}`: must be a whole number")))
        })
        .transpose()
}

fn required<T: std::str::FromStr>(params: &BTreeMap<String, String>, key: &str) -> Result<T, Bad> {
    number(params, key)?.ok_or_else(|| Bad(format!("`{key}` is required")))
}

fn flag(params: &BTreeMap<String, String>, key: &str) -> Result<bool, Bad> {
    match params.get(key).map(String::as_str) {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(Bad(format!("`{key}={other}`: must be true or false"))),
        None => Err(Bad(format!("`{key}` is required (true or false)"))),
    }
}

/// An HTTP error status (400..=599).
fn error_status(params: &BTreeMap<String, String>) -> Result<u16, Bad> {
    let status: u16 = required(params, "status")?;
    if !(400..=599).contains(&status) {
        return Err(Bad(format!("`status={status}`: must be 400..=599")));
    }
    Ok(status)
}

fn fault(params: &BTreeMap<String, String>) -> Result<ServiceFault, Bad> {
    Ok(ServiceFault {
        status: error_status(params)?,
        retry_after: number(params, "retry_after")?,
    })
}

fn describe(fault: ServiceFault) -> String {
    match fault.retry_after {
        Some(secs) => format!("{} with Retry-After: {secs}", fault.status),
        None => format!("{} without Retry-After", fault.status),
    }
}

async fn state(State(shared): State<Arc<Shared>>) -> Response {
    let instances = shared.lock().compute.snapshot();
    let mut text = String::new();
    for vm in &instances {
        text.push_str(&format!(
            "{} {} {}\n",
            vm.name,
            vm.status,
            vm.ip.as_deref().unwrap_or("-")
        ));
    }
    if instances.is_empty() {
        text.push_str("no instances\n");
    }
    (StatusCode::OK, text).into_response()
}

async fn service_fault(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    match fault(&params) {
        Ok(fault) => {
            shared.lock().service_fault = Some(fault);
            ok(format!(
                "Cloud Run service: every request answers {}",
                describe(fault)
            ))
        }
        Err(bad) => bad.into_response(),
    }
}

async fn clear_service_fault(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().service_fault = None;
    ok("Cloud Run service: serving again".into())
}

async fn request_fault(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    match fault(&params) {
        Ok(fault) => {
            shared.lock().request_fault = Some(fault);
            ok(format!(
                "Cloud Run service: every request but the health check answers {}",
                describe(fault)
            ))
        }
        Err(bad) => bad.into_response(),
    }
}

async fn clear_request_fault(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().request_fault = None;
    ok("Cloud Run service: routed requests served again".into())
}

async fn service_ready(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    let ready = match flag(&params, "ready") {
        Ok(ready) => ready,
        Err(bad) => return bad.into_response(),
    };
    let message = params.get("message").cloned().unwrap_or_else(|| {
        if ready {
            String::new()
        } else {
            "Revision failed (set by the control endpoint).".into()
        }
    });
    shared.set_service_ready(ready, &message);
    ok(if ready {
        "Cloud Run Admin API: Ready".into()
    } else {
        format!("Cloud Run Admin API: not Ready: {message}")
    })
}

async fn admin_latency(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    let ms: u64 = match required(&params, "ms") {
        Ok(ms) => ms,
        Err(bad) => return bad.into_response(),
    };
    shared.lock().run.latency = Duration::from_millis(ms);
    ok(format!("Cloud Run Admin API: answers {ms} ms late"))
}

async fn compute_fault(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    let parsed = (|| {
        let method = params
            .get("method")
            .filter(|m| crate::compute::IMPLEMENTED.contains(&m.as_str()))
            .ok_or_else(|| {
                Bad(format!(
                    "`method` must be one of {}",
                    crate::compute::IMPLEMENTED.join(", ")
                ))
            })?;
        let status = error_status(&params)?;
        let retry_after: Option<u64> = number(&params, "retry_after")?;
        let times: u32 = number(&params, "times")?.unwrap_or(UNTIL_CLEARED);
        if times == 0 {
            return Err(Bad("`times=0`: at least 1 (DELETE clears a fault)".into()));
        }
        Ok((method.clone(), status, retry_after, times))
    })();
    let (method, status, retry_after, times) = match parsed {
        Ok(parsed) => parsed,
        Err(bad) => return bad.into_response(),
    };
    shared.lock().compute.set_fault(
        &method,
        crate::compute::Fault {
            times,
            status,
            retry_after,
        },
    );
    let how_long = if times == UNTIL_CLEARED {
        "until cleared".to_owned()
    } else {
        format!("the next {times} calls")
    };
    ok(format!(
        "{method}: {how_long} answer {}",
        describe(ServiceFault {
            status,
            retry_after
        })
    ))
}

async fn clear_compute_fault(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    let Some(method) = params.get("method") else {
        return Bad("`method` is required".into()).into_response();
    };
    shared.lock().compute.set_fault(
        method,
        crate::compute::Fault {
            times: 0,
            status: 0,
            retry_after: None,
        },
    );
    ok(format!("{method}: answered normally again"))
}

async fn operations(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    match flag(&params, "complete") {
        Ok(complete) => {
            shared.lock().compute.operations_stall = !complete;
            ok(if complete {
                "zone operations created from now on finish".into()
            } else {
                "zone operations created from now on never finish".into()
            })
        }
        Err(bad) => bad.into_response(),
    }
}

async fn preempt(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    let Some(name) = params.get("instance") else {
        return Bad("`instance` is required (GET /state lists them)".into()).into_response();
    };
    let found = shared
        .lock()
        .compute
        .snapshot()
        .into_iter()
        .find(|vm| &vm.name == name);
    {
        let Some(vm) = found else {
            return (
                StatusCode::NOT_FOUND,
                format!("no instance named `{name}` (GET /state lists them)\n"),
            )
                .into_response();
        };
        if vm.status == "STOPPING" || vm.status == "TERMINATED" {
            return (
                StatusCode::CONFLICT,
                format!("{name} is {} already\n", vm.status),
            )
                .into_response();
        }
        crate::compute::preempt(&shared, name);
        ok(format!("{name} preempted: STOPPING"))
    }
}

async fn preemption_grace(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    match required::<u64>(&params, "ms") {
        Ok(ms) => {
            shared.lock().compute.preemption_grace = Duration::from_millis(ms);
            ok(format!("preemptions from now on: TERMINATED after {ms} ms"))
        }
        Err(bad) => bad.into_response(),
    }
}

async fn metadata_fault(State(shared): State<Arc<Shared>>, Query(params): Params) -> Response {
    match error_status(&params) {
        Ok(status) => {
            shared.lock().fail_token_requests = Some(status);
            ok(format!(
                "metadata server and token endpoint: token requests answer {status}"
            ))
        }
        Err(bad) => bad.into_response(),
    }
}

async fn clear_metadata_fault(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().fail_token_requests = None;
    ok("metadata server and token endpoint: issuing tokens again".into())
}
