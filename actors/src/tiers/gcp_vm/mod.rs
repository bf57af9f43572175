//! The `gcp_vm` tier: the service on a small pool of Compute Engine spot VMs.
//!
//! The costliest tier to hold, so VMs are created only by the waterfall's start phase (up to
//! `max_vms`), and deleted again once the tier has been idle (another tier active) for
//! `idle_ttl`. Each VM is `{pool}-{slot}`, labelled `cascade-pool={pool}`, so inserts are
//! idempotent and `instances.list` finds the whole pool. A watch health-checks every VM each
//! `watch_interval` and, while the pool holds VMs, lists them by label (one `instances.list` per
//! tick: 2 reads/s per pool with the default 500 ms), because a preempted VM keeps answering its
//! health check through its ~30 s shutdown; a VM seen STOPPING/TERMINATED is marked lost at once
//! (the tier actor is told, so the waterfall moves on) and, with `on_preemption = "replace"`,
//! re-created. A failed check, a VM missing from the list, or every `reconcile_interval` runs the
//! full reconcile (which also reads the zone's preemption operations). What the pool manages is
//! checkpointed to disk after every change and restored, then reconciled, when cascade starts;
//! `details["checkpoint"]` says which (`restored N VMs from PATH`, `none yet (PATH)`,
//! `set aside as ...`).
//!
//! Layout: `pool/` — `mod.rs` (the pool's state, checkpoint writes, lifecycle), `driver.rs` (what
//! the driver calls), `watch.rs` (the watch loop, health rounds), `reconcile.rs` (reconcile,
//! merge), `slot.rs` (bringing a slot up, deleting its VM), `jobs.rs` (background replacements and
//! deletions), `idle.rs` (idle clock, idle deletion); `client.rs` (the only file doing I/O besides
//! the checkpoint), `checkpoint.rs` (atomic file), `retry.rs` (retries with the shared budget).
//!
//! A reload that takes the tier out of the configuration (`StopReason::Removed`) drains its pools
//! within `stop_grace`: every VM deleted (label and instance id checked, as for idle deletion) and
//! the checkpoint removed; what cannot be deleted in time is named in a warning, with its
//! checkpoint kept for `cascade gcp_vm delete-pool` or for the tier's return.
//!
//! Invariant: probing never creates or deletes a VM; only `start`, `restart`, replacement of a
//! lost VM in a pool the start phase asked for, idle deletion and a removed tier's drain do.

mod checkpoint;
mod client;
mod delete_pool;
mod pool;
mod retired;
mod retry;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::contract::{
    Driver, DriverFactory, EventSink, ProbeOutcome, RestartReport, RestartRequest, StopReason,
    TierError, TierId,
};
use crate::resilience::{BreakerConfig, Deadline};
use crate::routing::Endpoint;
use crate::tier::{ProbeConfig, TierSpec};

pub use crate::tiers::gcp::GcpEnv;
use crate::tiers::gcp::credential_url_problem;
pub use checkpoint::{Checkpoint, OpKind, OpRef, Phase, VmEntry};
pub use delete_pool::{Report as DeletePoolReport, delete_pool};
pub use retry::RetryConfig;

use pool::{Notify, Pool};
use retry::{Retrier, RetryObserver};

/// The label every VM of a pool carries, with the pool's name as value.
pub const POOL_LABEL: &str = "cascade-pool";

/// What happens when a VM is preempted (or otherwise lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnPreemption {
    /// Delete it and create it again (same name), while the pool is wanted.
    #[default]
    Replace,
    /// Delete it; the next start phase creates a new one.
    Drop,
}

/// `scheduling.instanceTerminationAction` of the spot VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TerminationAction {
    /// A preempted VM stays, TERMINATED, until the pool deletes it: the reconcile sees it.
    #[default]
    Stop,
    /// Compute Engine deletes a preempted VM itself.
    Delete,
}

/// `[tiers.gcp_vm]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcpVmConfig {
    pub project: String,
    pub zone: String,
    /// Names the pool: VMs are `{pool}-{slot}` and carry the label `cascade-pool={pool}`.
    pub pool: String,
    pub machine_type: String,
    /// Source image of the boot disk.
    pub image: String,
    pub disk_size_gb: u32,
    /// Run this container image (Container-Optimized OS's `gce-container-declaration`).
    pub container_image: Option<String>,
    /// Or (also) run this `startup-script`.
    pub startup_script: Option<String>,
    pub network: String,
    pub subnetwork: Option<String>,
    /// Give VMs an external IP and use it; otherwise cascade reaches their internal IP.
    pub external_ip: bool,
    /// Service account the VMs run as (with the cloud-platform scope).
    pub service_account: Option<String>,
    /// Port the service listens on, on each VM.
    pub service_port: u16,
    pub health_path: String,
    /// Ready VMs the start phase asks for.
    pub vms: u32,
    /// Instances the pool holds at most, replacements included.
    pub max_vms: u32,
    pub on_preemption: OnPreemption,
    pub termination_action: TerminationAction,
    /// VMs are deleted after the tier has not been the active one for this long.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// A VM not answering its health check this long after it was created has failed: it is
    /// reported so and replaced (or deleted), not left booting.
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
    /// A zone operation (insert, delete) not done by then is abandoned and reconciled later.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Deadline of one API call.
    #[serde(with = "humantime_serde")]
    pub api_timeout: Duration,
    /// Time between health checks of every VM.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Time between reconciles with `instances.list` when every check passes.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    pub retry: RetryConfig,
    /// Compute Engine's endpoint.
    pub endpoint: String,
    /// Extra labels on every VM.
    pub labels: BTreeMap<String, String>,
    pub probe: ProbeConfig,
    pub breaker: BreakerConfig,
    /// Deadline for the start phase: VMs created, RUNNING and answering their health check.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Keep this tier started while another tier is active, so a failover
    /// to it needs no cold start (the waterfall's standby).
    pub standby: bool,
}

impl Default for GcpVmConfig {
    fn default() -> Self {
        GcpVmConfig {
            project: String::new(),
            zone: String::new(),
            pool: "ecapa".into(),
            machine_type: "e2-standard-2".into(),
            image: "projects/cos-cloud/global/images/family/cos-stable".into(),
            disk_size_gb: 20,
            container_image: None,
            startup_script: None,
            network: "global/networks/default".into(),
            subnetwork: None,
            external_ip: false,
            service_account: None,
            service_port: 8080,
            health_path: "/health".into(),
            vms: 1,
            max_vms: 2,
            on_preemption: OnPreemption::Replace,
            termination_action: TerminationAction::Stop,
            idle_ttl: Duration::from_secs(600),
            boot_timeout: Duration::from_secs(300),
            operation_timeout: Duration::from_secs(300),
            api_timeout: Duration::from_secs(30),
            watch_interval: Duration::from_millis(500),
            reconcile_interval: Duration::from_secs(30),
            retry: RetryConfig::default(),
            endpoint: "https://compute.googleapis.com".into(),
            labels: BTreeMap::new(),
            probe: ProbeConfig::default(),
            breaker: BreakerConfig::default(),
            start_timeout: Duration::from_secs(360),
            stop_grace: Duration::from_secs(120),
            standby: false,
        }
    }
}

/// RFC 1035 label: a lowercase letter, then lowercase letters, digits and dashes, not ending in a
/// dash.
fn is_rfc1035(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

fn is_label_key(key: &str) -> bool {
    key.len() <= 63
        && key.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl GcpVmConfig {
    /// Problems as (key relative to `[tiers.gcp_vm]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut problem = |key: &str, message: String| problems.push((key.into(), message));
        if self.project.trim().is_empty() {
            problem("project", "must name the Google Cloud project".into());
        }
        if self.zone.trim().is_empty() {
            problem("zone", "must name a zone, e.g. europe-west1-b".into());
        }
        let longest = format!("{}-{}", self.pool, self.max_vms.saturating_sub(1));
        if !is_rfc1035(&self.pool) {
            problem(
                "pool",
                format!(
                    "`{}` must start with a lowercase letter and hold only lowercase letters, digits and dashes, not ending in a dash",
                    self.pool
                ),
            );
        } else if longest.len() > 63 {
            problem(
                "pool",
                format!("too long: VM names like `{longest}` must fit in 63 characters"),
            );
        }
        if self.machine_type.trim().is_empty() {
            problem("machine_type", "must name a machine type".into());
        }
        if self.image.trim().is_empty() {
            problem("image", "must name the boot disk's source image".into());
        }
        if self.disk_size_gb < 10 {
            problem("disk_size_gb", "must be at least 10".into());
        }
        if self
            .container_image
            .as_deref()
            .is_some_and(|i| i.trim().is_empty())
        {
            problem("container_image", "must not be empty when set".into());
        }
        if self.network.trim().is_empty() {
            problem("network", "must name a network".into());
        }
        if self
            .service_account
            .as_deref()
            .is_some_and(|a| !a.contains('@'))
        {
            problem("service_account", "must be a service account email".into());
        }
        if self.service_port == 0 {
            problem(
                "service_port",
                "must be a port number from 1 to 65535".into(),
            );
        }
        if !self.health_path.starts_with('/') {
            problem("health_path", "must start with `/`".into());
        }
        if self.vms == 0 {
            problem("vms", "must be at least 1".into());
        }
        if self.max_vms < self.vms {
            problem("max_vms", format!("must be at least vms ({})", self.vms));
        }
        if self.max_vms > 100 {
            problem("max_vms", "must be at most 100".into());
        }
        for (key, value) in [
            ("idle_ttl", self.idle_ttl),
            ("boot_timeout", self.boot_timeout),
            ("operation_timeout", self.operation_timeout),
            ("api_timeout", self.api_timeout),
            ("watch_interval", self.watch_interval),
            ("reconcile_interval", self.reconcile_interval),
            ("start_timeout", self.start_timeout),
        ] {
            if value.is_zero() {
                problem(key, "must be above zero".into());
            }
        }
        if let Some(problem_text) = credential_url_problem(&self.endpoint, "an access token") {
            problem(
                "endpoint",
                format!("{problem_text}, e.g. https://compute.googleapis.com"),
            );
        }
        for (key, value) in &self.labels {
            if key == POOL_LABEL {
                problem(
                    "labels",
                    format!("`{POOL_LABEL}` is set by cascade to the pool's name"),
                );
            } else if !is_label_key(key) || !is_label_value(value) {
                problem(
                    "labels",
                    format!(
                        "`{key} = {value}`: keys start with a lowercase letter; keys and values hold up to 63 lowercase letters, digits, `-` and `_`"
                    ),
                );
            }
        }
        if self.probe.timeout.is_zero() || self.probe.interval.is_zero() {
            problem("probe", "interval and timeout must be above zero".into());
        }
        for (key, message) in self.breaker.validate() {
            problems.push((format!("breaker.{key}"), message));
        }
        for (key, message) in self.retry.validate() {
            problems.push((format!("retry.{key}"), message));
        }
        problems
    }
}

/// The tier as the root runs it: a VM pool whose state lives in `checkpoint`.
pub fn tier_spec(config: GcpVmConfig, checkpoint: PathBuf, env: GcpEnv) -> TierSpec {
    let fingerprint = crate::tier::fingerprint(&config);
    let driver_config = config.clone();
    let factory: DriverFactory = Arc::new(move |events| {
        let driver = GcpVmDriver::new(
            driver_config.clone(),
            checkpoint.clone(),
            env.clone(),
            events,
        )?;
        Ok(Arc::new(driver) as Arc<dyn Driver>)
    });
    TierSpec {
        id: TierId::GcpVm,
        factory,
        probe: config.probe.clone(),
        breaker: config.breaker.clone(),
        start_timeout: config.start_timeout,
        stop_grace: config.stop_grace,
        fingerprint,
    }
}

/// The tier's [`Driver`]: a thin layer over the [`Pool`], plus the retired pools it drains (see
/// `retired.rs`).
pub struct GcpVmDriver {
    pool: Arc<Pool>,
    retired: Vec<Arc<Pool>>,
    /// The tier actor's deadline for `stop`: a removed tier drains its pools within it.
    stop_grace: Duration,
}

impl GcpVmDriver {
    /// Builds the driver: restores the checkpoint at `checkpoint` (its directory is created on
    /// the first save) and starts the watch, whose first round reconciles with the API. Must run
    /// inside a tokio runtime for the watch to start at once.
    pub fn new(
        config: GcpVmConfig,
        checkpoint: PathBuf,
        env: GcpEnv,
        events: EventSink,
    ) -> Result<Self, TierError> {
        Self::build(
            config,
            checkpoint,
            env,
            Arc::new(move |event| events.emit(event)),
            None,
        )
    }

    fn build(
        config: GcpVmConfig,
        checkpoint: PathBuf,
        env: GcpEnv,
        notify: Notify,
        observer: Option<RetryObserver>,
    ) -> Result<Self, TierError> {
        let problems = config.validate();
        if !problems.is_empty() {
            let text: Vec<String> = problems
                .into_iter()
                .map(|(key, message)| format!("tiers.gcp_vm.{key}: {message}"))
                .collect();
            return Err(TierError::new(text.join("; ")));
        }
        let mut retrier = Retrier::new(config.retry.clone(), Instant::now());
        if let Some(observer) = observer {
            retrier = retrier.with_observer(observer);
        }
        retired::retire_moved(&checkpoint, &config);
        let mut retired = Vec::new();
        for (path, found) in retired::find(&checkpoint, &config) {
            let retired_config = retired::config_for(&config, &found);
            let retrier = Retrier::new(retired_config.retry.clone(), Instant::now());
            match Pool::new(
                retired_config,
                path.clone(),
                env.clone(),
                retrier,
                notify.clone(),
            ) {
                Ok(pool) => {
                    tracing::info!(backend.tier = "gcp_vm", pool = %found.pool, project = %found.project, zone = %found.zone, vms = found.vms.len(), path = %path.display(), "A pool the configuration no longer names is drained: its VMs are deleted once idle.");
                    let pool = Arc::new(pool);
                    pool.retire();
                    retired.push(pool);
                }
                Err(error) => {
                    tracing::warn!(backend.tier = "gcp_vm", path = %path.display(), %error, "Cannot drain a retired pool.");
                }
            }
        }
        let stop_grace = config.stop_grace;
        let pool = Pool::new(config, checkpoint, env, retrier, notify).map_err(TierError::new)?;
        let pool = Arc::new(pool);
        pool.ensure_watching();
        for old in &retired {
            old.ensure_watching();
        }
        Ok(GcpVmDriver {
            pool,
            retired,
            stop_grace,
        })
    }
}

#[async_trait]
impl Driver for GcpVmDriver {
    fn endpoint(&self) -> Option<String> {
        self.pool.endpoint()
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        self.pool.endpoints()
    }

    fn startable(&self) -> bool {
        true
    }

    async fn probe(&self) -> ProbeOutcome {
        self.pool.probe().await
    }

    async fn start(&self) -> Result<(), TierError> {
        for old in &self.retired {
            if !old.read(|s| s.drained) {
                old.ensure_watching();
            }
        }
        self.pool
            .start()
            .await
            .map_err(|e| TierError::new(e.to_string()))
    }

    /// Stops watching and waits (briefly) for the pool's background tasks to end. Exiting or
    /// replaced, the VMs stay (the next driver adopts them; idle deletion or `cascade restart`
    /// removes them). Removed from the configuration, the tier drains every pool it runs within
    /// `stop_grace`: no later cascade would look for those VMs again.
    async fn stop(&self, reason: StopReason) -> Result<(), TierError> {
        let started = Instant::now();
        let retired = self.retired.iter().map(|old| old.stop());
        tokio::join!(self.pool.stop(), futures_util::future::join_all(retired));
        if reason != StopReason::Removed {
            return Ok(());
        }
        // The tier actor gives up on `stop` after `stop_grace`; finish a little before.
        let margin = (self.stop_grace / 10).min(Duration::from_secs(1));
        let deadline = Deadline::after(started, self.stop_grace.saturating_sub(margin));
        let pools = std::iter::once(&self.pool)
            .chain(self.retired.iter().filter(|old| !old.read(|s| s.drained)));
        let drains = pools.map(|pool| async move { (pool, pool.drain_now(deadline).await) });
        let mut left = Vec::new();
        for (pool, result) in futures_util::future::join_all(drains).await {
            let name = pool.name().to_owned();
            match result {
                Ok(()) => {
                    tracing::info!(backend.tier = "gcp_vm", pool = %name, "The removed tier's pool is drained: its VMs are deleted and its checkpoint removed.");
                }
                Err(error) => {
                    tracing::warn!(backend.tier = "gcp_vm", pool = %name, %error, "The removed tier's pool is not drained; its checkpoint is kept.");
                    left.push(format!(
                        "pool {name} not drained ({error}); its checkpoint is kept: put gcp_vm back in the order to adopt its VMs, or delete them with `cascade gcp_vm delete-pool {name} --yes`"
                    ));
                }
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(TierError::new(left.join("; ")))
        }
    }

    /// Deletes every VM and creates it again; `force` changes nothing (VMs are always replaced).
    async fn restart(&self, request: RestartRequest) -> Result<RestartReport, TierError> {
        self.pool
            .restart(request)
            .await
            .map_err(|e| TierError::new(e.to_string()))
    }

    fn details(&self) -> BTreeMap<String, String> {
        let mut details = self.pool.details();
        for old in &self.retired {
            details.insert(
                format!("retired.{}", old.checkpoint_name()),
                old.retired_summary(),
            );
        }
        details
    }

    fn set_active(&self, active: bool) {
        self.pool.set_active(active);
    }
}

impl Drop for GcpVmDriver {
    fn drop(&mut self) {
        for old in &self.retired {
            old.shutdown();
        }
        self.pool.shutdown();
    }
}
