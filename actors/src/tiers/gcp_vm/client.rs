//! The only file of the `gcp_vm` tier that talks to the outside world: Compute Engine (instances
//! and zone operations, through `google-cloud-compute-v1`) and each VM's health endpoint (plain
//! HTTP). [`ComputeApi`] holds just the calls the pool makes; [`GceCompute`] is the real one.
//!
//! Every call is bounded by `api_timeout`. The client library's own retries are off
//! (`NeverRetry`): the pool retries through its shared budget instead. Errors become a small
//! [`ApiError`] that keeps what retry decisions need (status, Compute's `reason`, `Retry-After`)
//! and never a credential.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use google_cloud_compute_v1::client::{Instances, ZoneOperations};
use google_cloud_compute_v1::model;
use google_cloud_gax::error::rpc::StatusDetails;
use google_cloud_gax::retry_policy::NeverRetry;

use super::{GcpEnv, GcpVmConfig, POOL_LABEL, TerminationAction};
use crate::resilience::with_deadline;
use crate::tiers::gcp::parse_retry_after;

/// The scope VMs' service accounts and cascade's own credentials ask for.
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Operation type of the zone operation Compute Engine records when it preempts a VM.
pub const PREEMPTED: &str = "compute.instances.preempted";
/// Pages of a list read at most; a pool has a handful of VMs.
const MAX_PAGES: usize = 50;

/// An instance as the pool sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub id: Option<u64>,
    /// Compute Engine's status: PROVISIONING, STAGING, RUNNING, STOPPING, TERMINATED, ...
    pub status: String,
    pub ip: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// A zone operation as the pool sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub name: String,
    pub operation_type: String,
    pub done: bool,
    /// Set when the operation finished with errors.
    pub error: Option<String>,
    pub target_link: Option<String>,
    pub target_id: Option<u64>,
}

impl Op {
    /// The instance name the operation targets (last segment of `targetLink`).
    pub fn target_name(&self) -> Option<&str> {
        self.target_link.as_deref()?.rsplit('/').next()
    }
}

/// A failed call, reduced to what retry and adoption decisions need.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ApiError {
    /// HTTP status, when the API answered.
    pub status: Option<u16>,
    /// Compute Engine's `error.errors[].reason` (`alreadyExists`, `rateLimitExceeded`, ...).
    pub reason: Option<String>,
    pub message: String,
    /// The server's `Retry-After` (delay-seconds or an HTTP-date).
    pub retry_after: Option<Duration>,
    /// The call did not answer within its deadline.
    pub timed_out: bool,
    /// No call went out: the credentials failed for good (a revoked key, a deleted service
    /// account, a refused token request). Not retried; the client is built again for the next.
    pub credentials: bool,
}

/// Characters of an error message kept: a body that is not Google's error shape is quoted only so
/// far (the library reads it whole, bounded by the call's deadline).
const MESSAGE_CHARS: usize = 300;

fn shorten(message: String) -> String {
    if message.chars().count() <= MESSAGE_CHARS {
        return message;
    }
    let mut short: String = message.chars().take(MESSAGE_CHARS).collect();
    short.push('…');
    short
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.status, &self.reason) {
            (Some(status), Some(reason)) => write!(f, "HTTP {status} {reason}: {}", self.message)?,
            (Some(status), None) => write!(f, "HTTP {status}: {}", self.message)?,
            (None, _) => f.write_str(&self.message)?,
        }
        match self.hint() {
            Some(hint) => write!(f, " ({hint})"),
            None => Ok(()),
        }
    }
}

impl ApiError {
    pub fn timeout(after: Duration) -> Self {
        ApiError {
            status: None,
            reason: None,
            message: format!("no answer within {}", crate::text::duration(after)),
            retry_after: None,
            timed_out: true,
            credentials: false,
        }
    }

    fn other(message: impl Into<String>) -> Self {
        ApiError {
            status: None,
            reason: None,
            message: shorten(message.into()),
            retry_after: None,
            timed_out: false,
            credentials: false,
        }
    }

    /// 429, 500, 502, 503, 504, Compute's rate-limit and backend reasons, timeouts and transport
    /// failures are worth another attempt; other 4xx are not.
    pub fn is_retryable(&self) -> bool {
        if self.credentials {
            return false;
        }
        if matches!(
            self.reason.as_deref(),
            Some("rateLimitExceeded" | "userRateLimitExceeded" | "backendError")
        ) {
            return true;
        }
        match self.status {
            Some(status) => matches!(status, 429 | 500 | 502 | 503 | 504),
            None => true,
        }
    }

    pub fn is_already_exists(&self) -> bool {
        self.status == Some(409) || self.reason.as_deref() == Some("alreadyExists")
    }

    pub fn is_not_found(&self) -> bool {
        self.status == Some(404) || self.reason.as_deref() == Some("notFound")
    }

    pub(super) fn from_gax(error: &google_cloud_gax::error::Error) -> Self {
        if error.is_timeout() {
            return ApiError {
                timed_out: true,
                ..ApiError::other(error.to_string())
            };
        }
        if let Some(credentials) = credentials_error(error) {
            return ApiError {
                credentials: !credentials.is_transient(),
                ..ApiError::other(format!("credentials: {credentials}"))
            };
        }
        let status = error.http_status_code();
        let retry_after = error
            .http_headers()
            .and_then(|h| h.get("retry-after"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // A Compute error body parses as a Status whose details carry each `errors[].reason`;
        // a body that does not parse is kept as the raw payload.
        let (reason, message) = match (error.status(), error.http_payload()) {
            (Some(s), _) => {
                let reason = s.details.iter().find_map(|d| match d {
                    StatusDetails::ErrorInfo(info) if !info.reason.is_empty() => {
                        Some(info.reason.clone())
                    }
                    _ => None,
                });
                (reason, s.message.clone())
            }
            (None, Some(payload)) => parse_error_body(payload),
            (None, None) => (None, error.to_string()),
        };
        ApiError {
            status,
            reason,
            message: shorten(message),
            retry_after,
            timed_out: false,
            credentials: false,
        }
    }

    /// What to check when the API refuses the configured project or zone.
    pub fn hint(&self) -> Option<&'static str> {
        match self.status {
            Some(404)
                if self.message.contains("'projects/")
                    && !self.message.contains("/instances/")
                    && !self.message.contains("/operations/") =>
            {
                Some("check tiers.gcp_vm.project")
            }
            Some(400) if self.message.contains("Unknown zone") => Some("check tiers.gcp_vm.zone"),
            Some(403) => {
                Some("check that the credentials may use Compute Engine in tiers.gcp_vm.project")
            }
            _ => None,
        }
    }
}

/// The credentials failure behind a failed call, if that is why it failed.
fn credentials_error(
    error: &google_cloud_gax::error::Error,
) -> Option<&google_cloud_gax::error::CredentialsError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(current) = source {
        if let Some(found) = current.downcast_ref::<google_cloud_gax::error::CredentialsError>() {
            return Some(found);
        }
        source = current.source();
    }
    None
}

/// `(reason, message)` from a Compute error body `{"error": {"message", "errors": [{"reason"}]}}`.
fn parse_error_body(payload: &[u8]) -> (Option<String>, String) {
    let json: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(json) => json,
        Err(_) => {
            let text = String::from_utf8_lossy(payload);
            let text: String = text.chars().take(200).collect();
            return (None, text);
        }
    };
    let error = &json["error"];
    let reason = error["errors"][0]["reason"].as_str().map(str::to_owned);
    let message = error["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| json.to_string());
    (reason, message)
}

/// The Compute Engine calls the pool makes.
#[async_trait]
pub trait ComputeApi: Send + Sync + 'static {
    /// `instances.insert`; the name is the body's.
    async fn insert(&self, body: &model::Instance) -> Result<Op, ApiError>;
    /// `instances.get`; `None` when the instance does not exist.
    async fn get(&self, name: &str) -> Result<Option<Vm>, ApiError>;
    /// `instances.list` of instances carrying `key=value`, every page.
    async fn list_by_label(&self, key: &str, value: &str) -> Result<Vec<Vm>, ApiError>;
    /// `instances.delete`.
    async fn delete(&self, name: &str) -> Result<Op, ApiError>;
    /// `zoneOperations.get`.
    async fn get_operation(&self, name: &str) -> Result<Op, ApiError>;
    /// `zoneOperations.list` of `compute.instances.preempted` operations, every page.
    async fn list_preempted_operations(&self) -> Result<Vec<Op>, ApiError>;
    /// The client's credentials failed for good: build a new client for the next call.
    fn credentials_failed(&self) -> bool {
        false
    }
}

/// [`ComputeApi`] over the real client library.
pub struct GceCompute {
    instances: Instances,
    operations: ZoneOperations,
    project: String,
    zone: String,
    api_timeout: Duration,
    external_ip: bool,
    /// A call failed on a permanent credentials error: google-cloud-auth's token cache stops
    /// refreshing after one, so this client is done.
    credentials_failed: AtomicBool,
}

impl GceCompute {
    /// Builds the clients: credentials from `env` (a key file, a given metadata server, or
    /// Application Default Credentials), the configured endpoint, no client-side retries.
    pub async fn connect(config: &GcpVmConfig, env: &GcpEnv) -> Result<Self, ApiError> {
        let credentials = credentials(env)?;
        let instances = Instances::builder()
            .with_endpoint(config.endpoint.clone())
            .with_credentials(credentials.clone())
            .with_retry_policy(NeverRetry)
            .build()
            .await
            .map_err(|e| ApiError::other(format!("cannot build the Compute client: {e}")))?;
        let operations = ZoneOperations::builder()
            .with_endpoint(config.endpoint.clone())
            .with_credentials(credentials)
            .with_retry_policy(NeverRetry)
            .build()
            .await
            .map_err(|e| ApiError::other(format!("cannot build the Compute client: {e}")))?;
        Ok(GceCompute {
            instances,
            operations,
            project: config.project.clone(),
            zone: config.zone.clone(),
            api_timeout: config.api_timeout,
            external_ip: config.external_ip,
            credentials_failed: AtomicBool::new(false),
        })
    }

    async fn bounded<T>(
        &self,
        call: &'static str,
        fut: impl Future<Output = google_cloud_compute_v1::Result<T>>,
    ) -> Result<T, ApiError> {
        match with_deadline(self.api_timeout, call, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                let error = ApiError::from_gax(&error);
                if error.credentials {
                    self.credentials_failed.store(true, Ordering::Relaxed);
                }
                Err(error)
            }
            Err(timeout) => Err(ApiError::timeout(timeout.after)),
        }
    }

    fn vm(&self, instance: model::Instance) -> Vm {
        let nic = instance.network_interfaces.first();
        let ip = if self.external_ip {
            nic.and_then(|n| n.access_configs.first())
                .and_then(|a| a.nat_ip.clone())
        } else {
            nic.and_then(|n| n.network_ip.clone())
        };
        Vm {
            name: instance.name.unwrap_or_default(),
            id: instance.id,
            status: instance
                .status
                .as_ref()
                .and_then(|s| s.name())
                .unwrap_or("UNKNOWN")
                .to_owned(),
            ip: ip.filter(|ip| !ip.is_empty()),
            labels: instance.labels.into_iter().collect(),
        }
    }
}

fn op(operation: model::Operation) -> Op {
    let error = operation.error.as_ref().and_then(|e| {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|item| {
                let code = item.code.as_deref().unwrap_or("ERROR");
                match item.message.as_deref() {
                    Some(message) => format!("{code}: {message}"),
                    None => code.to_owned(),
                }
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    });
    Op {
        name: operation.name.unwrap_or_default(),
        operation_type: operation.operation_type.unwrap_or_default(),
        done: operation.status.as_ref().and_then(|s| s.name()) == Some("DONE"),
        error,
        target_link: operation.target_link,
        target_id: operation.target_id,
    }
}

#[async_trait]
impl ComputeApi for GceCompute {
    fn credentials_failed(&self) -> bool {
        self.credentials_failed.load(Ordering::Relaxed)
    }

    async fn insert(&self, body: &model::Instance) -> Result<Op, ApiError> {
        let call = self
            .instances
            .insert()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_body(body.clone())
            .send();
        self.bounded("compute.instances.insert", call).await.map(op)
    }

    async fn get(&self, name: &str) -> Result<Option<Vm>, ApiError> {
        let call = self
            .instances
            .get()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_instance(name)
            .send();
        match self.bounded("compute.instances.get", call).await {
            Ok(instance) => Ok(Some(self.vm(instance))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_by_label(&self, key: &str, value: &str) -> Result<Vec<Vm>, ApiError> {
        let mut vms = Vec::new();
        let mut token = String::new();
        for _ in 0..MAX_PAGES {
            let mut call = self
                .instances
                .list()
                .set_project(&self.project)
                .set_zone(&self.zone)
                .set_filter(format!("labels.{key} = \"{value}\""));
            if !token.is_empty() {
                call = call.set_page_token(token.clone());
            }
            let page = self.bounded("compute.instances.list", call.send()).await?;
            // The filter is applied here too, so an API that ignores it cannot hand the pool a
            // VM that is not its own.
            vms.extend(
                page.items
                    .into_iter()
                    .map(|i| self.vm(i))
                    .filter(|vm| vm.labels.get(key).map(String::as_str) == Some(value)),
            );
            match page.next_page_token {
                Some(next) if !next.is_empty() => token = next,
                _ => return Ok(vms),
            }
        }
        Err(ApiError::other(format!(
            "instances.list returned more than {MAX_PAGES} pages"
        )))
    }

    async fn delete(&self, name: &str) -> Result<Op, ApiError> {
        let call = self
            .instances
            .delete()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_instance(name)
            .send();
        self.bounded("compute.instances.delete", call).await.map(op)
    }

    async fn get_operation(&self, name: &str) -> Result<Op, ApiError> {
        let call = self
            .operations
            .get()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_operation(name)
            .send();
        self.bounded("compute.zoneOperations.get", call)
            .await
            .map(op)
    }

    async fn list_preempted_operations(&self) -> Result<Vec<Op>, ApiError> {
        let mut ops = Vec::new();
        let mut token = String::new();
        for _ in 0..MAX_PAGES {
            let mut call = self
                .operations
                .list()
                .set_project(&self.project)
                .set_zone(&self.zone)
                .set_filter(format!("operationType = \"{PREEMPTED}\""));
            if !token.is_empty() {
                call = call.set_page_token(token.clone());
            }
            let page = self
                .bounded("compute.zoneOperations.list", call.send())
                .await?;
            ops.extend(
                page.items
                    .into_iter()
                    .map(op)
                    .filter(|o| o.operation_type == PREEMPTED),
            );
            match page.next_page_token {
                Some(next) if !next.is_empty() => token = next,
                _ => return Ok(ops),
            }
        }
        Err(ApiError::other(format!(
            "zoneOperations.list returned more than {MAX_PAGES} pages"
        )))
    }
}

/// An HTTP client for health checks: no proxy (VM addresses are internal).
pub fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// Credentials for the Compute clients: a key file (service account or authorized user), a given
/// metadata server, else Application Default Credentials.
fn credentials(env: &GcpEnv) -> Result<google_cloud_auth::credentials::Credentials, ApiError> {
    use google_cloud_auth::credentials;
    let built = if let Some(path) = &env.credentials_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ApiError::other(format!("cannot read credentials {}: {e}", path.display()))
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            ApiError::other(format!("credentials {} are not JSON: {e}", path.display()))
        })?;
        crate::tiers::gcp::check_token_uri(&json)
            .map_err(|e| ApiError::other(format!("credentials {}: {e}", path.display())))?;
        match json["type"].as_str() {
            Some("service_account") => credentials::service_account::Builder::new(json)
                .with_access_specifier(credentials::service_account::AccessSpecifier::from_scopes(
                    [CLOUD_PLATFORM],
                ))
                .build(),
            Some("authorized_user") => credentials::user_account::Builder::new(json).build(),
            other => {
                return Err(ApiError::other(format!(
                    "credentials {}: type {} is not supported (service_account or authorized_user)",
                    path.display(),
                    other.unwrap_or("(missing)")
                )));
            }
        }
    } else if let Some(host) = &env.metadata_host {
        credentials::mds::Builder::default()
            .with_endpoint(format!("http://{host}"))
            .with_scopes([CLOUD_PLATFORM])
            .build()
    } else {
        credentials::Builder::default().build()
    };
    built.map_err(|e| ApiError::other(format!("cannot build Google credentials: {e}")))
}

// === the instance the pool inserts ===

/// The body of `instances.insert` for VM `name`: a spot VM that runs the service, labelled as the
/// pool's.
pub fn instance_body(config: &GcpVmConfig, name: &str) -> model::Instance {
    use model::scheduling::{InstanceTerminationAction, OnHostMaintenance, ProvisioningModel};

    let mut labels = config.labels.clone();
    labels.insert(POOL_LABEL.into(), config.pool.clone());

    let disk = model::AttachedDisk::new()
        .set_boot(true)
        .set_auto_delete(true)
        .set_initialize_params(
            model::AttachedDiskInitializeParams::new()
                .set_source_image(config.image.clone())
                .set_disk_size_gb(i64::from(config.disk_size_gb)),
        );

    let mut nic = model::NetworkInterface::new().set_network(config.network.clone());
    if let Some(subnetwork) = &config.subnetwork {
        nic = nic.set_subnetwork(subnetwork.clone());
    }
    if config.external_ip {
        nic = nic.set_access_configs([model::AccessConfig::new()
            .set_name("External NAT")
            .set_type(model::access_config::Type::OneToOneNat)]);
    }

    let mut items = Vec::new();
    if let Some(image) = &config.container_image {
        items.push(
            model::metadata::Items::new()
                .set_key("gce-container-declaration")
                .set_value(container_declaration(config, image)),
        );
    }
    if let Some(script) = &config.startup_script {
        items.push(
            model::metadata::Items::new()
                .set_key("startup-script")
                .set_value(script.clone()),
        );
    }

    let termination = match config.termination_action {
        TerminationAction::Stop => "STOP",
        TerminationAction::Delete => "DELETE",
    };
    let scheduling = model::Scheduling::new()
        .set_provisioning_model(ProvisioningModel::from("SPOT"))
        .set_instance_termination_action(InstanceTerminationAction::from(termination))
        .set_automatic_restart(false)
        .set_on_host_maintenance(OnHostMaintenance::from("TERMINATE"));

    let mut body = model::Instance::new()
        .set_name(name)
        .set_machine_type(format!(
            "zones/{}/machineTypes/{}",
            config.zone, config.machine_type
        ))
        .set_labels(labels)
        .set_disks([disk])
        .set_network_interfaces([nic])
        .set_scheduling(scheduling);
    if !items.is_empty() {
        body = body.set_metadata(model::Metadata::new().set_items(items));
    }
    if let Some(email) = &config.service_account {
        body = body.set_service_accounts([model::ServiceAccount::new()
            .set_email(email.clone())
            .set_scopes([CLOUD_PLATFORM])]);
    }
    body
}

/// The `gce-container-declaration` metadata value Container-Optimized OS runs (the format
/// `gcloud compute instances create-with-container` writes). The container shares the VM's
/// network, so it listens on `service_port` directly; `PORT` tells it which.
pub fn container_declaration(config: &GcpVmConfig, image: &str) -> String {
    format!(
        "spec:\n  \
           containers:\n  \
           - name: {name}\n    \
             image: '{image}'\n    \
             env:\n    \
             - name: PORT\n      \
               value: '{port}'\n    \
             stdin: false\n    \
             tty: false\n  \
           restartPolicy: Always\n\
         # This container declaration format is not public API and may change without notice. Please\n\
         # use gcloud command-line tool or Google Cloud Console to run Containers on Google Compute Engine.\n",
        name = config.pool,
        image = image.replace('\'', "''"),
        port = config.service_port,
    )
}
