//! The Compute Engine fake: `instances` (insert, get, list, delete) and `zoneOperations` (get,
//! wait, list) with the real API's JSON shapes and lifecycles. An instance goes PROVISIONING →
//! STAGING → RUNNING over `boot_delay`, owns a loopback IP (127.0.0.N) from insert on, and while
//! RUNNING serves a health endpoint on (IP, vm_service_port); deleting it stops that server at
//! once. Preempting it is what Compute Engine does: STOPPING and a `compute.instances.preempted`
//! operation at once, while the guest (and its health server) keeps running through the
//! preemption grace, then TERMINATED. Every mutating call returns a zone operation that is DONE
//! after `operation_delay` (or never, see [`crate::FakeGcp::set_operations_complete`]). Methods
//! the discovery document has but the fake does not implement answer 501 and are recorded as
//! rejections.
//!
//! Invariant: lifecycle tasks only advance an instance still in the state they expect and with
//! the id they started from, so a delete or a re-insert under the same name is never undone by a
//! stale task.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::task::AbortHandle;
use tracing::warn;

use crate::api_error::ApiError;
use crate::discovery::Api;
use crate::gateway::{self, Call};
use crate::metadata::PROJECT_NUMBER;
use crate::server::compute_timestamp;
use crate::{ApiRequest, FakeInstance, Shared};

const API_ROOT: &str = "https://www.googleapis.com/compute/v1";
/// The longest `zoneOperations.wait` blocks (the real API's cap is 2 minutes).
const WAIT_CAP: Duration = Duration::from_secs(1);
const MAX_RESULTS: usize = 500;
/// The methods [`dispatch`] serves; any other method of the document answers 501.
pub(crate) const IMPLEMENTED: &[&str] = &[
    "compute.instances.insert",
    "compute.instances.get",
    "compute.instances.list",
    "compute.instances.delete",
    "compute.zoneOperations.get",
    "compute.zoneOperations.wait",
    "compute.zoneOperations.list",
];

/// Everything Compute Engine knows.
pub(crate) struct ComputeState {
    instances: BTreeMap<String, Instance>,
    operations: Vec<Operation>,
    next_id: u64,
    /// Operations created while this is set never reach DONE.
    pub(crate) operations_stall: bool,
    /// How long a preempted instance keeps running before it is TERMINATED.
    pub(crate) preemption_grace: Duration,
    faults: HashMap<String, Fault>,
    /// `requestId` of each insert/delete → its operation, so a retried call with the same id
    /// gets the original operation back instead of a conflict (as Compute Engine does).
    request_ids: HashMap<String, usize>,
    pub(crate) requests: Vec<ApiRequest>,
}

struct Instance {
    id: u64,
    name: String,
    status: &'static str,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
    /// The body the client inserted (output-only fields are overwritten when rendered).
    resource: Value,
    created: SystemTime,
    started: Option<SystemTime>,
    /// The VM's address, bound but not listening while the VM is not RUNNING, so connections
    /// are refused rather than left hanging.
    reserved: Option<TcpSocket>,
    /// The health server while RUNNING (and while STOPPING after a preemption).
    server: Option<AbortHandle>,
    /// Set by `delete`, so a pending preemption does not mark the dying instance TERMINATED.
    deleting: bool,
}

struct Operation {
    id: u64,
    name: String,
    operation_type: String,
    status: &'static str,
    target: String,
    target_id: u64,
    user: String,
    inserted: SystemTime,
    started: Option<SystemTime>,
    ended: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    pub times: u32,
    pub status: u16,
    pub retry_after: Option<u64>,
}

// === impl ComputeState ===

impl Default for ComputeState {
    fn default() -> Self {
        Self {
            instances: BTreeMap::new(),
            operations: Vec::new(),
            next_id: 0,
            operations_stall: false,
            preemption_grace: Duration::from_secs(30),
            faults: HashMap::new(),
            request_ids: HashMap::new(),
            requests: Vec::new(),
        }
    }
}

impl ComputeState {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        // Google ids are large unsigned numbers; keep them recognisable but realistic.
        4_000_000_000_000_000_000 + self.next_id
    }

    pub(crate) fn set_fault(&mut self, method_id: &str, fault: Fault) {
        if fault.times == 0 {
            self.faults.remove(method_id);
        } else {
            self.faults.insert(method_id.to_string(), fault);
        }
    }

    fn take_fault(&mut self, method_id: &str) -> Option<Fault> {
        let fault = self.faults.get_mut(method_id)?;
        let taken = *fault;
        fault.times -= 1;
        if fault.times == 0 {
            self.faults.remove(method_id);
        }
        Some(taken)
    }

    pub(crate) fn snapshot(&self) -> Vec<FakeInstance> {
        self.instances
            .values()
            .map(|i| FakeInstance {
                name: i.name.clone(),
                status: i.status.to_string(),
                labels: i.labels.clone(),
                ip: Some(i.ip.to_string()),
            })
            .collect()
    }

    fn new_operation(&mut self, operation_type: &str, target: (&str, u64), user: &str) -> usize {
        let id = self.next_id();
        let now = SystemTime::now();
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        self.operations.push(Operation {
            id,
            name: format!(
                "operation-{millis}-{:013x}-{:08x}",
                id % (1 << 52),
                rand::random::<u32>()
            ),
            operation_type: operation_type.to_string(),
            status: "RUNNING",
            target: target.0.to_string(),
            target_id: target.1,
            user: user.to_string(),
            inserted: now,
            started: Some(now),
            ended: None,
        });
        self.operations.len() - 1
    }

    /// Stops the instance's health server and keeps its address reserved.
    fn stop_server(instance: &mut Instance) {
        if let Some(server) = instance.server.take() {
            server.abort();
        }
    }
}

impl Drop for ComputeState {
    fn drop(&mut self) {
        for instance in self.instances.values_mut() {
            ComputeState::stop_server(instance);
        }
    }
}

// === HTTP ===

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
    let (method_id, result) =
        match gateway::admit(&shared, Api::Compute, &method, &uri, &headers, &body) {
            Err(refusal) => (refusal.method_id, Err(refusal.error)),
            Ok(call) => {
                let result = dispatch(&shared, &call).await;
                (call.method_id, result)
            }
        };
    let response = match result {
        Ok(value) => Json(value).into_response(),
        Err(error) => error.into_response(),
    };
    shared.lock().compute.requests.push(ApiRequest {
        at: Instant::now(),
        method_id,
        status: response.status().as_u16(),
    });
    response
}

async fn dispatch(shared: &Arc<Shared>, call: &Call) -> Result<Value, ApiError> {
    if !IMPLEMENTED.contains(&call.method_id.as_str()) {
        shared.reject(format!(
            "{}: a valid Compute Engine method the fake does not implement",
            call.method_id
        ));
        return Err(ApiError::compute(
            501,
            format!(
                "Method {} is valid but not implemented by the fake.",
                call.method_id
            ),
        ));
    }
    let fault = shared.lock().compute.take_fault(&call.method_id);
    if let Some(fault) = fault {
        return Err(injected(fault));
    }
    check_scope(shared, call)?;
    if let Some(operation) = replayed(shared, call) {
        return Ok(operation);
    }
    match call.method_id.as_str() {
        "compute.instances.insert" => insert(shared, call),
        "compute.instances.get" => get_instance(shared, call),
        "compute.instances.list" => list_instances(shared, call),
        "compute.instances.delete" => delete(shared, call),
        "compute.zoneOperations.get" => get_operation(shared, call),
        "compute.zoneOperations.wait" => wait_operation(shared, call).await,
        "compute.zoneOperations.list" => list_operations(shared, call),
        other => unreachable!("{other} is in IMPLEMENTED but not dispatched"),
    }
}

/// The operation an earlier insert/delete with the same `requestId` created, if any.
fn replayed(shared: &Shared, call: &Call) -> Option<Value> {
    let request_id = call.query("requestId")?;
    let state = shared.lock();
    let index = *state.compute.request_ids.get(request_id)?;
    let operation = state.compute.operations.get(index)?;
    let kind = call.method_id.rsplit('.').next()?;
    (operation.operation_type == kind).then(|| operation_json(shared, operation))
}

fn remember_request(compute: &mut ComputeState, call: &Call, index: usize) {
    if let Some(request_id) = call.query("requestId") {
        compute.request_ids.insert(request_id.to_string(), index);
    }
}

fn injected(fault: Fault) -> ApiError {
    let message = match fault.status {
        429 => format!(
            "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'compute.googleapis.com' for consumer 'project_number:{PROJECT_NUMBER}'."
        ),
        503 => "The service is currently unavailable.".to_string(),
        _ => "Internal error. Please try again or contact Google Support.".to_string(),
    };
    ApiError::compute(fault.status, message).with_retry_after(fault.retry_after)
}

/// The fake knows one project and one zone.
fn check_scope(shared: &Shared, call: &Call) -> Result<(), ApiError> {
    let project = call.param("project");
    if project != shared.options.project {
        return Err(ApiError::compute(
            404,
            format!("The resource 'projects/{project}' was not found"),
        ));
    }
    let zone = call.param("zone");
    if zone != shared.options.zone {
        return Err(ApiError::compute(
            400,
            format!("Invalid value for field 'zone': '{zone}'. Unknown zone."),
        ));
    }
    Ok(())
}

fn zone_path(shared: &Shared) -> String {
    format!(
        "projects/{}/zones/{}",
        shared.options.project, shared.options.zone
    )
}

fn instance_name_ok(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[bytes.len() - 1] != b'-'
}

fn insert(shared: &Arc<Shared>, call: &Call) -> Result<Value, ApiError> {
    let resource = call.body.clone().unwrap_or_else(|| json!({}));
    let name = resource["name"].as_str().unwrap_or_default().to_string();
    if !instance_name_ok(&name) {
        let message = format!(
            "Invalid value for field 'resource.name': '{name}'. Must be a match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'"
        );
        shared.reject(format!("{}: {message}", call.method_id));
        return Err(ApiError::compute(400, message));
    }
    let labels: BTreeMap<String, String> = resource["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let mut state = shared.lock();
    if state.compute.instances.contains_key(&name) {
        return Err(ApiError::compute(
            409,
            format!(
                "The resource '{}/instances/{name}' already exists",
                zone_path(shared)
            ),
        ));
    }
    let (ip, socket) = reserve_address(shared.vm_port).map_err(|error| {
        warn!(%error, vm = %name, "No loopback address for the fake VM.");
        ApiError::compute(503, format!("No address for the fake VM: {error}"))
    })?;
    let id = state.compute.next_id();
    let instance = Instance {
        id,
        name: name.clone(),
        status: "PROVISIONING",
        labels,
        ip,
        resource,
        created: SystemTime::now(),
        started: None,
        reserved: Some(socket),
        server: None,
        deleting: false,
    };
    let index = state
        .compute
        .new_operation("insert", (&name, id), &user(shared));
    remember_request(&mut state.compute, call, index);
    state.compute.instances.insert(name.clone(), instance);
    let operation = operation_json(shared, &state.compute.operations[index]);
    let stall = state.compute.operations_stall;
    drop(state);

    let boot = shared.options.boot_delay;
    let task_shared = shared.clone();
    let task_name = name.clone();
    shared.spawn(async move {
        tokio::time::sleep(boot / 2).await;
        advance(&task_shared, &task_name, id, "PROVISIONING", "STAGING");
        tokio::time::sleep(boot - boot / 2).await;
        if advance(&task_shared, &task_name, id, "STAGING", "RUNNING") {
            start_server(&task_shared, &task_name, id);
        }
    });
    finish_operation_later(shared, index, stall, None);
    Ok(operation)
}

/// Moves instance `name` (if it is still `id` in state `from`) to `to`.
fn advance(shared: &Shared, name: &str, id: u64, from: &str, to: &'static str) -> bool {
    let mut state = shared.lock();
    match state.compute.instances.get_mut(name) {
        Some(instance) if instance.id == id && instance.status == from => {
            instance.status = to;
            if to == "RUNNING" {
                instance.started = Some(SystemTime::now());
            }
            true
        }
        _ => false,
    }
}

/// What happens to the target when its operation's delay has passed.
type AfterOperation = Box<dyn FnOnce(&Shared) + Send>;

/// Marks operation `index` DONE after `operation_delay` (unless it was created while operations
/// stall) and then runs `then` (e.g. removing a deleted instance).
fn finish_operation_later(
    shared: &Arc<Shared>,
    index: usize,
    stall: bool,
    then: Option<AfterOperation>,
) {
    let delay = shared.options.operation_delay;
    let task_shared = shared.clone();
    shared.spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(then) = then {
            then(&task_shared);
        }
        if stall {
            return;
        }
        let mut state = task_shared.lock();
        if let Some(operation) = state.compute.operations.get_mut(index) {
            operation.status = "DONE";
            operation.ended = Some(SystemTime::now());
        }
    });
}

fn get_instance(shared: &Shared, call: &Call) -> Result<Value, ApiError> {
    let name = call.param("instance");
    let state = shared.lock();
    let instance = find_instance(shared, &state.compute, name)?;
    Ok(instance_json(shared, instance))
}

fn find_instance<'s>(
    shared: &Shared,
    compute: &'s ComputeState,
    name: &str,
) -> Result<&'s Instance, ApiError> {
    compute
        .instances
        .get(name)
        .or_else(|| {
            // Instances may also be addressed by numeric id.
            name.parse::<u64>()
                .ok()
                .and_then(|id| compute.instances.values().find(|i| i.id == id))
        })
        .ok_or_else(|| not_found(shared, "instances", name))
}

fn not_found(shared: &Shared, collection: &str, name: &str) -> ApiError {
    ApiError::compute(
        404,
        format!(
            "The resource '{}/{collection}/{name}' was not found",
            zone_path(shared)
        ),
    )
}

fn list_instances(shared: &Shared, call: &Call) -> Result<Value, ApiError> {
    let filter = parse_filter(call.query("filter"))?;
    let state = shared.lock();
    let items: Vec<Value> = state
        .compute
        .instances
        .values()
        .map(|i| instance_json(shared, i))
        .filter(|v| filter.iter().all(|term| term.matches(v)))
        .collect();
    page(
        call,
        items,
        "compute#instanceList",
        &format!("{}/instances", zone_path(shared)),
    )
}

fn delete(shared: &Arc<Shared>, call: &Call) -> Result<Value, ApiError> {
    let name = call.param("instance").to_string();
    let mut state = shared.lock();
    let name = find_instance(shared, &state.compute, &name)?.name.clone();
    let stall = state.compute.operations_stall;
    let user = user(shared);
    let compute = &mut state.compute;
    let Some(instance) = compute.instances.get_mut(&name) else {
        return Err(not_found(shared, "instances", &name));
    };
    instance.status = "STOPPING";
    instance.deleting = true;
    ComputeState::stop_server(instance);
    let id = instance.id;
    let index = compute.new_operation("delete", (&name, id), &user);
    remember_request(compute, call, index);
    let operation = operation_json(shared, &compute.operations[index]);
    drop(state);
    finish_operation_later(
        shared,
        index,
        stall,
        Some(Box::new(move |shared: &Shared| {
            let mut state = shared.lock();
            if state
                .compute
                .instances
                .get(&name)
                .is_some_and(|i| i.id == id)
                && let Some(mut gone) = state.compute.instances.remove(&name)
            {
                ComputeState::stop_server(&mut gone);
            }
        })),
    );
    Ok(operation)
}

fn find_operation<'s>(
    shared: &Shared,
    compute: &'s ComputeState,
    name: &str,
) -> Result<&'s Operation, ApiError> {
    compute
        .operations
        .iter()
        .find(|o| o.name == name || o.id.to_string() == name)
        .ok_or_else(|| not_found(shared, "operations", name))
}

fn get_operation(shared: &Shared, call: &Call) -> Result<Value, ApiError> {
    let state = shared.lock();
    let operation = find_operation(shared, &state.compute, call.param("operation"))?;
    Ok(operation_json(shared, operation))
}

/// Like the real `wait`: returns as soon as the operation is DONE, or its current state once the
/// cap has passed.
async fn wait_operation(shared: &Shared, call: &Call) -> Result<Value, ApiError> {
    let deadline = tokio::time::Instant::now() + WAIT_CAP;
    loop {
        let current = {
            let state = shared.lock();
            let operation = find_operation(shared, &state.compute, call.param("operation"))?;
            (operation.status == "DONE").then(|| operation_json(shared, operation))
        };
        if let Some(done) = current {
            return Ok(done);
        }
        if tokio::time::Instant::now() >= deadline {
            let state = shared.lock();
            let operation = find_operation(shared, &state.compute, call.param("operation"))?;
            return Ok(operation_json(shared, operation));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn list_operations(shared: &Shared, call: &Call) -> Result<Value, ApiError> {
    let filter = parse_filter(call.query("filter"))?;
    let state = shared.lock();
    let items: Vec<Value> = state
        .compute
        .operations
        .iter()
        .map(|o| operation_json(shared, o))
        .filter(|v| filter.iter().all(|term| term.matches(v)))
        .collect();
    page(
        call,
        items,
        "compute#operationList",
        &format!("{}/operations", zone_path(shared)),
    )
}

/// One page of a list answer, with `nextPageToken` when more remain.
fn page(call: &Call, items: Vec<Value>, kind: &str, path: &str) -> Result<Value, ApiError> {
    let max = call
        .query("maxResults")
        .and_then(|m| m.parse::<usize>().ok())
        .filter(|m| *m > 0)
        .unwrap_or(MAX_RESULTS)
        .min(MAX_RESULTS);
    let start = match call.query("pageToken").filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => token
            .strip_prefix("fake-page-")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                ApiError::compute(
                    400,
                    format!("Invalid value for field 'pageToken': '{token}'. Invalid page token."),
                )
            })?,
    };
    let mut list = json!({
        "kind": kind,
        "id": path,
        "selfLink": format!("{API_ROOT}/{path}"),
    });
    let page: Vec<Value> = items.iter().skip(start).take(max).cloned().collect();
    if !page.is_empty() {
        list["items"] = Value::Array(page);
    }
    if start + max < items.len() {
        list["nextPageToken"] = json!(format!("fake-page-{}", start + max));
    }
    Ok(list)
}

fn user(shared: &Shared) -> String {
    crate::token::client_email(&shared.options.project)
}

// === rendering ===

fn instance_json(shared: &Shared, instance: &Instance) -> Value {
    let zone = zone_path(shared);
    let mut v = if instance.resource.is_object() {
        instance.resource.clone()
    } else {
        json!({})
    };
    v["kind"] = json!("compute#instance");
    v["id"] = json!(instance.id.to_string());
    v["name"] = json!(instance.name);
    v["status"] = json!(instance.status);
    v["zone"] = json!(format!("{API_ROOT}/{zone}"));
    v["selfLink"] = json!(format!("{API_ROOT}/{zone}/instances/{}", instance.name));
    v["creationTimestamp"] = json!(compute_timestamp(instance.created));
    v["fingerprint"] = json!("aGVsbG8gZmFrZQ==");
    v["labelFingerprint"] = json!("42WmSpB8rSM=");
    v["startRestricted"] = json!(false);
    if v.get("deletionProtection").is_none() {
        v["deletionProtection"] = json!(false);
    }
    if instance.labels.is_empty() {
        if let Some(fields) = v.as_object_mut() {
            fields.remove("labels");
        }
    } else {
        v["labels"] = json!(instance.labels);
    }
    if let Some(machine) = v["machineType"].as_str().map(str::to_string)
        && !machine.starts_with("https://")
    {
        let machine = machine.trim_start_matches('/');
        let full = if machine.starts_with("projects/") {
            format!("{API_ROOT}/{machine}")
        } else {
            format!("{API_ROOT}/projects/{}/{machine}", shared.options.project)
        };
        v["machineType"] = json!(full);
    }
    if v["networkInterfaces"]
        .as_array()
        .is_none_or(|n| n.is_empty())
    {
        v["networkInterfaces"] = json!([{ "network": "global/networks/default" }]);
    }
    if let Some(nics) = v["networkInterfaces"].as_array_mut() {
        for (i, nic) in nics.iter_mut().enumerate() {
            nic["kind"] = json!("compute#networkInterface");
            nic["name"] = json!(format!("nic{i}"));
            nic["fingerprint"] = json!("bmljLWZha2U=");
            nic["stackType"] = json!("IPV4_ONLY");
            let network = nic["network"].as_str().unwrap_or("global/networks/default");
            if !network.starts_with("https://") {
                let network = network.trim_start_matches('/');
                let network = network
                    .strip_prefix(&format!("projects/{}/", shared.options.project))
                    .unwrap_or(network);
                nic["network"] = json!(format!(
                    "{API_ROOT}/projects/{}/{network}",
                    shared.options.project
                ));
            }
            if i == 0 {
                nic["networkIP"] = json!(instance.ip.to_string());
            } else {
                nic["networkIP"] = json!(format!("10.128.{}.{}", i, instance.id % 250 + 2));
            }
        }
    }
    if v.get("scheduling").is_none() {
        v["scheduling"] = json!({
            "onHostMaintenance": "MIGRATE",
            "automaticRestart": true,
            "preemptible": false,
            "provisioningModel": "STANDARD",
        });
    }
    if instance.status == "RUNNING" {
        v["cpuPlatform"] = json!("Intel Broadwell");
    }
    if let Some(started) = instance.started {
        v["lastStartTimestamp"] = json!(compute_timestamp(started));
    }
    v
}

fn operation_json(shared: &Shared, operation: &Operation) -> Value {
    let zone = zone_path(shared);
    let mut v = json!({
        "kind": "compute#operation",
        "id": operation.id.to_string(),
        "name": operation.name,
        "zone": format!("{API_ROOT}/{zone}"),
        "operationType": operation.operation_type,
        "targetLink": format!("{API_ROOT}/{zone}/instances/{}", operation.target),
        "targetId": operation.target_id.to_string(),
        "status": operation.status,
        "user": operation.user,
        "progress": if operation.status == "DONE" { 100 } else { 0 },
        "insertTime": compute_timestamp(operation.inserted),
        "selfLink": format!("{API_ROOT}/{zone}/operations/{}", operation.name),
    });
    if let Some(started) = operation.started {
        v["startTime"] = json!(compute_timestamp(started));
    }
    if let Some(ended) = operation.ended {
        v["endTime"] = json!(compute_timestamp(ended));
    }
    v
}

// === out-of-band events (FakeGcp API) ===

/// Creates a RUNNING instance with its health server up.
pub(crate) fn add_instance(shared: &Arc<Shared>, name: &str, labels: &[(&str, &str)]) {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut state = shared.lock();
    if state.compute.instances.contains_key(name) {
        warn!(vm = %name, "add_instance: an instance with this name exists; ignored.");
        return;
    }
    let (ip, socket) = match reserve_address(shared.vm_port) {
        Ok(reserved) => reserved,
        Err(error) => {
            warn!(%error, vm = %name, "add_instance: no loopback address.");
            return;
        }
    };
    let id = state.compute.next_id();
    let now = SystemTime::now();
    state.compute.instances.insert(
        name.to_string(),
        Instance {
            id,
            name: name.to_string(),
            status: "RUNNING",
            labels: labels.clone(),
            ip,
            resource: json!({
                "name": name,
                "machineType": format!("zones/{}/machineTypes/e2-small", shared.options.zone),
                "labels": labels,
            }),
            created: now,
            started: Some(now),
            reserved: Some(socket),
            server: None,
            deleting: false,
        },
    );
    drop(state);
    start_server(shared, name, id);
}

/// Preempts an instance the way Compute Engine does: STOPPING and a DONE
/// `compute.instances.preempted` operation at once; the guest (health server) keeps running for
/// the preemption grace, then the instance is TERMINATED and its health server stops.
pub(crate) fn preempt(shared: &Arc<Shared>, name: &str) {
    let mut state = shared.lock();
    let compute = &mut state.compute;
    let grace = compute.preemption_grace;
    let Some(instance) = compute.instances.get_mut(name) else {
        warn!(vm = %name, "preempt: no such instance; ignored.");
        return;
    };
    if instance.status == "TERMINATED" || instance.status == "STOPPING" {
        return;
    }
    instance.status = "STOPPING";
    let id = instance.id;
    let index = compute.new_operation("compute.instances.preempted", (name, id), "system");
    let now = SystemTime::now();
    let operation = &mut compute.operations[index];
    operation.status = "DONE";
    operation.ended = Some(now);
    drop(state);
    let task_shared = shared.clone();
    let name = name.to_string();
    shared.spawn(async move {
        tokio::time::sleep(grace).await;
        let mut state = task_shared.lock();
        if let Some(instance) = state.compute.instances.get_mut(&name)
            && instance.id == id
            && instance.status == "STOPPING"
            && !instance.deleting
        {
            instance.status = "TERMINATED";
            ComputeState::stop_server(instance);
        }
    });
}

// === VM health servers ===

/// Starts serving the health endpoint on a RUNNING instance's reserved address.
fn start_server(shared: &Arc<Shared>, name: &str, id: u64) {
    let _runtime = shared.runtime.enter();
    let mut state = shared.lock();
    let Some(instance) = state.compute.instances.get_mut(name) else {
        return;
    };
    if instance.id != id || instance.status != "RUNNING" || instance.server.is_some() {
        return;
    }
    let Some(socket) = instance.reserved.take() else {
        return;
    };
    let listener = match socket.listen(128) {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%error, vm = %name, "The fake VM's health server could not listen.");
            return;
        }
    };
    instance.server = Some(shared.spawn(crate::server::serve(
        listener,
        vm_router(name, &shared.options.vm_health_path),
    )));
}

/// What a fake VM serves: the demo backend (`GET /health`, `POST /embed`, as the ECAPA stand-in
/// answers them), and its health answer at `health_path` too when that is another path.
fn vm_router(name: &str, health_path: &str) -> Router {
    // The demo backend's state cannot fail to build without its failure knob.
    let state = cascade_demo::AppState::new(name, None, Duration::ZERO)
        .expect("the demo backend's state builds");
    let demo = cascade_demo::router(state);
    if health_path == crate::service::HEALTH_PATH {
        return demo;
    }
    demo.route(
        health_path,
        axum::routing::get(|| async { Json(json!({ "status": "ok" })) }),
    )
}

/// The next free loopback address (127.0.0.2, 127.0.0.3, ...) with `port` bound but not yet
/// listening. The counter is process-wide so several fakes in one test binary never share an
/// address; addresses taken by someone else are skipped.
fn reserve_address(port: u16) -> std::io::Result<(Ipv4Addr, TcpSocket)> {
    static NEXT: AtomicU32 = AtomicU32::new(2);
    let mut last_error = None;
    for _ in 0..4096 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % (1 << 16);
        let (hi, lo) = ((n >> 8) as u8, (n & 0xff) as u8);
        if lo == 0 || lo == 255 || (hi == 0 && lo < 2) {
            continue;
        }
        let ip = Ipv4Addr::new(127, 0, hi, lo);
        // No SO_REUSEADDR: with it, two unlistening sockets (say, of two test processes) could
        // bind the same address and the second would fail only later, at listen.
        let socket = TcpSocket::new_v4()?;
        match socket.bind(SocketAddr::from((ip, port))) {
            Ok(()) => return Ok((ip, socket)),
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => last_error = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("no free loopback address")))
}

// === list filters ===

/// One comparison of a list filter; a filter is a conjunction of them.
#[derive(Debug, PartialEq)]
struct Term {
    field: String,
    op: FilterOp,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FilterOp {
    Eq,
    Ne,
    /// `field:value` (`:*` = present).
    Has,
    /// `eq` / `ne`: RE2 full match.
    Matches,
    NotMatches,
}

impl Term {
    fn matches(&self, resource: &Value) -> bool {
        let mut current = resource;
        for part in self.field.split('.') {
            current = &current[part];
        }
        let actual = match current {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match self.op {
            FilterOp::Eq => actual.as_deref() == Some(self.value.as_str()),
            FilterOp::Ne => actual.as_deref() != Some(self.value.as_str()),
            FilterOp::Has => {
                actual.is_some() && (self.value == "*" || actual.as_deref() == Some(&self.value))
            }
            FilterOp::Matches | FilterOp::NotMatches => {
                let matched = regex::Regex::new(&format!("^(?:{})$", self.value))
                    .is_ok_and(|r| actual.as_deref().is_some_and(|a| r.is_match(a)));
                matched == (self.op == FilterOp::Matches)
            }
        }
    }
}

/// Parses the subset of Compute list filters cascade uses: `field = "v"`, `field != v`,
/// `field:*`, `field eq regex`, terms joined by `AND` or written as `(a) (b)`.
fn parse_filter(filter: Option<&str>) -> Result<Vec<Term>, ApiError> {
    let Some(filter) = filter.map(str::trim).filter(|f| !f.is_empty()) else {
        return Ok(Vec::new());
    };
    let invalid = || {
        ApiError::compute(
            400,
            format!(
                "Invalid value for field 'filter': '{filter}'. Invalid list filter expression."
            ),
        )
    };
    split_terms(filter)
        .ok_or_else(invalid)?
        .iter()
        .map(|term| parse_term(term).ok_or_else(invalid))
        .collect()
}

/// Splits on top-level parentheses and the `AND` keyword (quotes protect parentheses, not
/// `AND`); `OR` is not supported.
fn split_terms(filter: &str) -> Option<Vec<String>> {
    fn flush(text: &mut String, terms: &mut Vec<String>) -> Option<()> {
        let padded = format!(" {} ", text.trim());
        text.clear();
        if padded.contains(" OR ") {
            return None;
        }
        terms.extend(
            padded
                .split(" AND ")
                .map(str::trim)
                .filter(|piece| !piece.is_empty())
                .map(str::to_string),
        );
        Some(())
    }
    let mut terms = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for c in filter.chars() {
        if let Some(q) = quote {
            current.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => {
                quote = Some(c);
                current.push(c);
            }
            '(' => {
                if depth == 0 {
                    flush(&mut current, &mut terms)?;
                } else {
                    current.push(c);
                }
                depth += 1;
            }
            ')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    flush(&mut current, &mut terms)?;
                } else {
                    current.push(c);
                }
            }
            _ => current.push(c),
        }
    }
    if depth != 0 || quote.is_some() {
        return None;
    }
    flush(&mut current, &mut terms)?;
    (!terms.is_empty()).then_some(terms)
}

fn parse_term(term: &str) -> Option<Term> {
    let term = term.trim();
    for (keyword, op) in [(" eq ", FilterOp::Matches), (" ne ", FilterOp::NotMatches)] {
        if let Some((field, value)) = term.split_once(keyword) {
            return Some(Term {
                field: field_name(field)?,
                op,
                value: unquote(value),
            });
        }
    }
    let (at, op, len) = ["!=", "=", ":"]
        .iter()
        .filter_map(|op| term.find(op).map(|at| (at, *op, op.len())))
        .min_by_key(|(at, _, _)| *at)?;
    let op = match op {
        "!=" => FilterOp::Ne,
        "=" => FilterOp::Eq,
        _ => FilterOp::Has,
    };
    Some(Term {
        field: field_name(&term[..at])?,
        op,
        value: unquote(&term[at + len..]),
    })
}

fn field_name(field: &str) -> Option<String> {
    let field = field.trim();
    let ok = !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
    ok.then(|| field.to_string())
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner.to_string();
        }
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(filter: &str) -> Vec<Term> {
        parse_filter(Some(filter)).unwrap_or_else(|e| panic!("{filter}: {}", e.message))
    }

    #[test]
    fn filters_parse_in_the_forms_google_documents() {
        let expected = vec![Term {
            field: "labels.cascade".into(),
            op: FilterOp::Eq,
            value: "gcp_vm".into(),
        }];
        assert_eq!(terms("labels.cascade = \"gcp_vm\""), expected);
        assert_eq!(terms("labels.cascade=gcp_vm"), expected);
        assert_eq!(terms("(labels.cascade = \"gcp_vm\")"), expected);
        let both = terms("labels.cascade = \"gcp_vm\" AND name != \"x y\"");
        assert_eq!(both.len(), 2);
        assert_eq!(both[1].value, "x y");
        assert_eq!(both[1].op, FilterOp::Ne);
        assert_eq!(terms("(labels.a = \"1\") (labels.b = \"2\")").len(), 2);
        assert_eq!(terms("labels.owner:*")[0].op, FilterOp::Has);
        assert_eq!(terms("name eq cascade-.*")[0].op, FilterOp::Matches);
        assert!(parse_filter(Some("(a = 1) OR (b = 2)")).is_err());
        assert!(parse_filter(Some("labels.a = \"unterminated")).is_err());
        assert!(parse_filter(Some("nonsense")).is_err());
    }

    #[test]
    fn filter_terms_match_resource_fields() {
        let vm = json!({"name": "vm-1", "status": "RUNNING", "labels": {"cascade": "gcp_vm"}});
        assert!(
            terms("labels.cascade = gcp_vm AND status = RUNNING")
                .iter()
                .all(|t| t.matches(&vm))
        );
        assert!(!terms("labels.cascade = other")[0].matches(&vm));
        assert!(!terms("labels.missing:*")[0].matches(&vm));
        assert!(terms("name eq vm-.*")[0].matches(&vm));
        assert!(terms("name != vm-2")[0].matches(&vm));
    }

    #[test]
    fn instance_names_follow_rfc1035() {
        assert!(instance_name_ok("cascade-vm-1"));
        assert!(!instance_name_ok("Cascade"));
        assert!(!instance_name_ok("1vm"));
        assert!(!instance_name_ok("vm-"));
        assert!(!instance_name_ok(&"a".repeat(64)));
        assert!(instance_name_ok(&"a".repeat(63)));
    }
}
