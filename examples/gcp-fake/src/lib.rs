//! Local stand-ins for the Google Cloud APIs cascade calls: Compute Engine (instances and zone
//! operations), the Cloud Run admin API and one Cloud Run service, the GCE metadata server and the
//! OAuth token endpoint. Everything listens on loopback; every Compute / Cloud Run admin request is
//! validated against Google's own discovery documents so a client that sends something Google would
//! reject fails here too.
//!
//! This file owns the public API ([`FakeGcp`] and its option / record types). The state behind it
//! lives in one `Mutex` shared with the HTTP handlers; background transitions (operations finishing,
//! VMs booting) run as tokio tasks owned by the `FakeGcp` and aborted when it drops.

#![forbid(unsafe_code)]

mod api_error;
mod compute;
mod control;
mod discovery;
mod gateway;
mod metadata;
mod run;
mod server;
mod service;
#[cfg(test)]
mod tests;
mod token;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};

pub use control::KNOBS;

/// What the fake pretends to be; every field has a test-friendly default.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// The only project the fake knows ("demo-project").
    pub project: String,
    /// The only zone the fake knows ("europe-west1-b").
    pub zone: String,
    /// The Cloud Run region ("europe-west1").
    pub region: String,
    /// The name of the one Cloud Run service ("ecapa").
    pub run_service: String,
    /// Port each fake VM's health server binds on its own 127.0.0.x IP; 0 = pick one free port,
    /// used by all VMs.
    pub vm_service_port: u16,
    /// Path each fake VM's health server answers ("/health").
    pub vm_health_path: String,
    /// Lifetime of issued ID and access tokens (1 h).
    pub token_lifetime: Duration,
    /// How long a zone operation takes from PENDING to DONE (100 ms).
    pub operation_delay: Duration,
    /// How long an instance takes from PROVISIONING to RUNNING (200 ms).
    pub boot_delay: Duration,
    /// Whether the Cloud Run service demands a valid ID token (true, like a private service).
    pub service_requires_auth: bool,
    /// How long a preempted VM stays STOPPING, its guest still running and its health server
    /// still answering, before it is TERMINATED (30 s, Compute Engine's ACPI shutdown window).
    pub preemption_grace: Duration,
    /// Fixed ports from here on ([`PORTS`] of them, in the order [`PORT_NAMES`] lists), the VMs'
    /// service port last unless `vm_service_port` is set; `None` picks free ports.
    pub port_base: Option<u16>,
}

/// Ports the fake takes from [`FakeOptions::port_base`].
pub const PORTS: u16 = 7;

/// What listens at `port_base + i`.
pub const PORT_NAMES: [&str; PORTS as usize] = [
    "Compute Engine API",
    "Cloud Run Admin API",
    "metadata server",
    "OAuth token endpoint",
    "Cloud Run service",
    "control endpoint",
    "each VM's service (on its own 127.0.0.N)",
];

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            project: "demo-project".into(),
            zone: "europe-west1-b".into(),
            region: "europe-west1".into(),
            run_service: "ecapa".into(),
            vm_service_port: 0,
            vm_health_path: "/health".into(),
            token_lifetime: Duration::from_secs(3600),
            operation_delay: Duration::from_millis(100),
            boot_delay: Duration::from_millis(200),
            service_requires_auth: true,
            preemption_grace: Duration::from_secs(30),
            port_base: None,
        }
    }
}

/// ID tokens issued so far, by issuer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Issued by the metadata server's `identity` endpoint.
    pub metadata: u32,
    /// Issued by the token endpoint for a `target_audience` assertion.
    pub token_endpoint: u32,
}

/// A fault the Cloud Run service answers every request with until cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceFault {
    /// HTTP status to answer (e.g. 429, 503).
    pub status: u16,
    /// `Retry-After` header value in seconds, if any.
    pub retry_after: Option<u64>,
}

/// One request the Cloud Run service received.
#[derive(Debug, Clone)]
pub struct ServiceRequest {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// The ID token checked, if any: from `X-Serverless-Authorization` when sent, else from
    /// `Authorization`.
    pub bearer: Option<String>,
    /// The ID token came in `X-Serverless-Authorization`.
    pub serverless_authorization: bool,
    /// The `Authorization` header as sent (the application's own, when the ID token came in
    /// `X-Serverless-Authorization`).
    pub authorization: Option<String>,
    /// The status the service answered.
    pub status: u16,
}

/// A Compute Engine instance as the fake sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeInstance {
    pub name: String,
    /// PROVISIONING, STAGING, RUNNING, STOPPING, TERMINATED.
    pub status: String,
    pub labels: BTreeMap<String, String>,
    /// The instance's own loopback IP (127.0.0.N).
    pub ip: Option<String>,
}

/// One request to the Compute API.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub at: Instant,
    /// Discovery method id, e.g. "compute.instances.insert" (or "unknown" when no method of the
    /// discovery document matches the request).
    pub method_id: String,
    /// The status the fake answered.
    pub status: u16,
}

/// The running fake. Dropping it (or [`FakeGcp::shutdown`]) stops every listener, connection,
/// VM health server and background task it started.
pub struct FakeGcp {
    shared: Arc<Shared>,
}

/// What the handlers share with the API.
pub(crate) struct Shared {
    options: FakeOptions,
    endpoints: Endpoints,
    /// The port every VM health server binds on its own IP.
    vm_port: u16,
    keys: token::Keys,
    /// When the fake started (the Cloud Run service's createTime).
    started: SystemTime,
    /// The runtime the fake was started on, so synchronous API calls (`add_instance`) can start
    /// servers.
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    /// Every listener and background task; aborted when the fake drops.
    tasks: Mutex<JoinSet<()>>,
}

/// The addresses the fake serves on.
struct Endpoints {
    compute: String,
    run_admin: String,
    metadata_host: String,
    token_uri: String,
    service_url: String,
    control: String,
}

/// Everything mutable, behind one lock.
struct State {
    token_lifetime: Duration,
    id_tokens: TokenCounts,
    access_tokens: u32,
    fail_token_requests: Option<u16>,
    service_fault: Option<ServiceFault>,
    request_fault: Option<ServiceFault>,
    service_requests: Vec<ServiceRequest>,
    run: run::RunState,
    compute: compute::ComputeState,
    rejections: Vec<String>,
}

// === impl Shared ===

impl Shared {
    /// The state; a handler that panicked mid-update leaves it usable (tests should still see
    /// what happened).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reject(&self, why: String) {
        tracing::warn!(%why, "Request rejected.");
        self.lock().rejections.push(why);
    }

    fn set_service_ready(&self, ready: bool, message: &str) {
        let mut state = self.lock();
        if state.run.ready != ready || state.run.message != message {
            state.run.transitioned = SystemTime::now();
        }
        state.run.ready = ready;
        state.run.message = message.to_string();
    }

    /// Runs `task` until it ends or the fake drops.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> AbortHandle {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(task, &self.runtime)
    }
}

// === impl FakeGcp ===

impl FakeGcp {
    /// Binds every listener on 127.0.0.1 (free ports, or from `port_base`) and starts serving.
    /// Must be called within a tokio runtime.
    pub async fn start(options: FakeOptions) -> std::io::Result<FakeGcp> {
        if let Some(base) = options.port_base
            && base.checked_add(PORTS - 1).is_none_or(|_| base == 0)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "port base {base}: the fake needs ports {base}..{base}+{} (1..=65535)",
                    PORTS - 1
                ),
            ));
        }
        let port = |i: u16| options.port_base.map_or(0, |base| base + i);
        let bind = async |i: u16| {
            let address = SocketAddr::from(([127, 0, 0, 1], port(i)));
            TcpListener::bind(address).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot listen on {address} for the {}: {e}",
                        PORT_NAMES[i as usize]
                    ),
                )
            })
        };
        let compute = bind(0).await?;
        let run_admin = bind(1).await?;
        let metadata = bind(2).await?;
        let oauth = bind(3).await?;
        let service = bind(4).await?;
        let control = bind(5).await?;
        let vm_port = match (options.vm_service_port, options.port_base) {
            (0, Some(base)) => base + 6,
            (0, None) => std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?
                .local_addr()?
                .port(),
            (port, _) => port,
        };
        let url = |l: &TcpListener| -> std::io::Result<String> {
            Ok(format!("http://{}", l.local_addr()?))
        };
        let endpoints = Endpoints {
            compute: url(&compute)?,
            run_admin: url(&run_admin)?,
            metadata_host: metadata.local_addr()?.to_string(),
            token_uri: format!("{}/token", url(&oauth)?),
            service_url: url(&service)?,
            control: url(&control)?,
        };
        let mut compute_state = compute::ComputeState::default();
        compute_state.preemption_grace = options.preemption_grace;
        let shared = Arc::new(Shared {
            endpoints,
            vm_port,
            keys: token::Keys::load(),
            started: SystemTime::now(),
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(State {
                token_lifetime: options.token_lifetime,
                id_tokens: TokenCounts::default(),
                access_tokens: 0,
                fail_token_requests: None,
                service_fault: None,
                request_fault: None,
                service_requests: Vec::new(),
                run: run::RunState::default(),
                compute: compute_state,
                rejections: Vec::new(),
            }),
            tasks: Mutex::new(JoinSet::new()),
            options,
        });
        let servers: [(TcpListener, Router); 6] = [
            (compute, compute::router(shared.clone())),
            (run_admin, run::router(shared.clone())),
            (metadata, metadata::router(shared.clone())),
            (oauth, token::router(shared.clone())),
            (service, service::router(shared.clone())),
            (control, control::router(shared.clone())),
        ];
        for (listener, router) in servers {
            shared.spawn(server::serve(listener, router));
        }
        Ok(FakeGcp { shared })
    }

    /// Stops every listener, connection, VM health server and background task, and waits until
    /// they are gone.
    pub async fn shutdown(self) {
        let mut tasks = std::mem::take(
            &mut *self
                .shared
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    pub fn options(&self) -> &FakeOptions {
        &self.shared.options
    }

    /// "http://127.0.0.1:P"; the client appends /compute/v1/projects/...
    pub fn compute_endpoint(&self) -> String {
        self.shared.endpoints.compute.clone()
    }

    /// "http://127.0.0.1:P"; the client appends /v2/projects/.../services/...
    pub fn run_admin_endpoint(&self) -> String {
        self.shared.endpoints.run_admin.clone()
    }

    /// "127.0.0.1:P", the value for GCE_METADATA_HOST.
    pub fn metadata_host(&self) -> String {
        self.shared.endpoints.metadata_host.clone()
    }

    /// "http://127.0.0.1:P".
    pub fn metadata_url(&self) -> String {
        format!("http://{}", self.shared.endpoints.metadata_host)
    }

    /// "http://127.0.0.1:P/token".
    pub fn token_uri(&self) -> String {
        self.shared.endpoints.token_uri.clone()
    }

    /// The Cloud Run service itself, "http://127.0.0.1:Q" (its own listener); also the audience
    /// its ID tokens must carry.
    pub fn service_url(&self) -> String {
        self.shared.endpoints.service_url.clone()
    }

    /// The port every VM health server binds on its own IP.
    pub fn vm_service_port(&self) -> u16 {
        self.shared.vm_port
    }

    /// "http://127.0.0.1:P": the control endpoint, every fault knob over HTTP ([`KNOBS`]).
    pub fn control_url(&self) -> String {
        self.shared.endpoints.control.clone()
    }

    /// A cascade configuration that points every Google Cloud setting at this fake: the
    /// waterfall `cloud_run` → `local` → `gcp_vm` (`local` is the built-in demo backend), the
    /// fake's project, region, zone and service, every `endpoint`, and `service_port` = the fake
    /// VMs' port. cascade also needs `GCE_METADATA_HOST` = [`FakeGcp::metadata_host`] in its
    /// environment (it is in the snippet's first line).
    pub fn cascade_config(&self) -> String {
        cascade_config(
            &self.shared.options,
            &Addresses {
                compute: self.compute_endpoint(),
                run_admin: self.run_admin_endpoint(),
                metadata_host: self.metadata_host(),
                service_url: self.service_url(),
                vm_port: self.vm_service_port(),
            },
        )
    }

    /// A service-account key file (JSON) whose private key the token endpoint accepts and whose
    /// `token_uri` is [`FakeGcp::token_uri`]. The key is a test-only key.
    pub fn service_account_key_json(&self) -> serde_json::Value {
        let project = &self.shared.options.project;
        let email = token::client_email(project);
        json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": token::PRIVATE_KEY_ID,
            "private_key": token::PRIVATE_KEY_PEM,
            "client_email": email,
            "client_id": token::SERVICE_ACCOUNT_ID,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!("https://www.googleapis.com/robot/v1/metadata/x509/{email}"),
            "universe_domain": "googleapis.com",
        })
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().token_lifetime = lifetime;
    }

    pub fn id_tokens_issued(&self) -> TokenCounts {
        self.shared.lock().id_tokens
    }

    /// Access tokens issued by the metadata server and the token endpoint together.
    pub fn access_tokens_issued(&self) -> u32 {
        self.shared.lock().access_tokens
    }

    /// `Some(status)`: the metadata identity/token endpoints and `/token` answer `status`.
    pub fn fail_token_requests(&self, status: Option<u16>) {
        self.shared.lock().fail_token_requests = status;
    }

    /// `Some(fault)`: the Cloud Run service answers every request with it until cleared.
    pub fn set_service_fault(&self, fault: Option<ServiceFault>) {
        self.shared.lock().service_fault = fault;
    }

    /// `Some(fault)`: the Cloud Run service answers every request except its health check
    /// (`GET /health`) with it until cleared: routed traffic fails while probes pass.
    pub fn set_request_fault(&self, fault: Option<ServiceFault>) {
        self.shared.lock().request_fault = fault;
    }

    pub fn service_requests(&self) -> Vec<ServiceRequest> {
        self.shared.lock().service_requests.clone()
    }

    /// Sets the admin API's Ready condition (CONDITION_SUCCEEDED, or CONDITION_FAILED with
    /// `message`).
    pub fn set_service_ready(&self, ready: bool, message: &str) {
        self.shared.set_service_ready(ready, message);
    }

    /// Every later answer of the Cloud Run admin API waits `latency` first (zero: none).
    pub fn set_admin_latency(&self, latency: Duration) {
        self.shared.lock().run.latency = latency;
    }

    /// How many requests the Cloud Run admin API received.
    pub fn admin_requests(&self) -> u32 {
        self.shared.lock().run.requests
    }

    /// The next `times` calls of `method_id` (e.g. "compute.instances.insert") fail with `status`
    /// (429 → rateLimitExceeded / RESOURCE_EXHAUSTED, 503 → backendError / UNAVAILABLE), with a
    /// `Retry-After` header when given. `times == 0` clears the fault.
    pub fn fail_compute(&self, method_id: &str, times: u32, status: u16, retry_after: Option<u64>) {
        self.shared.lock().compute.set_fault(
            method_id,
            compute::Fault {
                times,
                status,
                retry_after,
            },
        );
    }

    /// `false`: operations created from now on stay RUNNING forever (instances still change).
    pub fn set_operations_complete(&self, complete: bool) {
        self.shared.lock().compute.operations_stall = !complete;
    }

    /// Preempts `instance` the way Compute Engine does: at once it is STOPPING and a DONE zone
    /// operation of type "compute.instances.preempted" targets it, but the guest keeps running
    /// (its health server keeps answering) for the preemption grace
    /// ([`FakeOptions::preemption_grace`], or [`FakeGcp::set_preemption_grace`]); then it is
    /// TERMINATED and its health server stops.
    pub fn preempt(&self, instance: &str) {
        compute::preempt(&self.shared, instance);
    }

    /// The preemption grace of preemptions started from now on.
    pub fn set_preemption_grace(&self, grace: Duration) {
        self.shared.lock().compute.preemption_grace = grace;
    }

    /// Creates an instance out of band: RUNNING, own IP, health server up.
    pub fn add_instance(&self, name: &str, labels: &[(&str, &str)]) {
        compute::add_instance(&self.shared, name, labels);
    }

    pub fn instances(&self) -> Vec<FakeInstance> {
        self.shared.lock().compute.snapshot()
    }

    pub fn compute_requests(&self) -> Vec<ApiRequest> {
        self.shared.lock().compute.requests.clone()
    }

    /// Every request refused by discovery validation, for lacking a bearer token, or for calling
    /// a method the fake does not implement, each as "method id: why" (or "VERB path: why" when no
    /// discovery method matches). Tests assert it is empty.
    pub fn rejections(&self) -> Vec<String> {
        self.shared.lock().rejections.clone()
    }
}

/// Where a fake listens, for [`cascade_config`].
struct Addresses {
    compute: String,
    run_admin: String,
    metadata_host: String,
    service_url: String,
    vm_port: u16,
}

/// The cascade configuration [`FakeGcp::cascade_config`] prints, for a fake started with
/// `port_base = base` (and no `vm_service_port`): `config/examples/gcp-fake.toml` is this for
/// 18600.
pub fn cascade_config_for_port_base(options: &FakeOptions, base: u16) -> String {
    let at = |i: u16| format!("http://127.0.0.1:{}", base + i);
    cascade_config(
        options,
        &Addresses {
            compute: at(0),
            run_admin: at(1),
            metadata_host: format!("127.0.0.1:{}", base + 2),
            service_url: at(4),
            vm_port: base + 6,
        },
    )
}

fn cascade_config(o: &FakeOptions, at: &Addresses) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "# cascade against cascade-gcp-fake. Run cascade with GCE_METADATA_HOST={metadata}\n\
         # in its environment: credentials come from the fake's metadata server.\n\
         [waterfall]\n\
         order = [\"cloud_run\", \"local\", \"gcp_vm\"]\n\
         failback_after = \"10s\"\n\
         \n\
         [tiers.cloud_run]\n\
         url = {url}\n\
         cold_start_timeout = \"5s\"\n\
         probe = {{ interval = \"1s\", timeout = \"1s\" }}\n\
         breaker = {{ consecutive_failures = 3, open_base = \"2s\", open_max = \"10s\" }}\n\
         \n\
         [tiers.cloud_run.admin]\n\
         project = {project}\n\
         region = {region}\n\
         service = {service}\n\
         endpoint = {admin}\n\
         interval = \"5s\"\n\
         \n\
         # The built-in demo backend (cascade demo-backend) is the local tier.\n\
         \n\
         [tiers.gcp_vm]\n\
         project = {project}\n\
         zone = {zone}\n\
         pool = \"ecapa\"\n\
         endpoint = {compute}\n\
         # The fake VMs serve on their own 127.0.0.N at this port.\n\
         service_port = {port}\n\
         health_path = {health}\n\
         vms = 1\n\
         max_vms = 2\n\
         idle_ttl = \"10m\"\n\
         boot_timeout = \"1m\"\n\
         operation_timeout = \"1m\"\n\
         start_timeout = \"2m\"\n\
         probe = {{ interval = \"1s\", timeout = \"1s\" }}\n",
        metadata = at.metadata_host,
        url = q(&at.service_url),
        project = q(&o.project),
        region = q(&o.region),
        service = q(&o.run_service),
        admin = q(&at.run_admin),
        zone = q(&o.zone),
        compute = q(&at.compute),
        port = at.vm_port,
        health = q(&o.vm_health_path),
    )
}

impl Drop for FakeGcp {
    fn drop(&mut self) {
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .abort_all();
    }
}
