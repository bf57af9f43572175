//! cascade's configuration: the sections, their validation, and how they
//! become tier specs for the root supervisor.
//!
//! Layers (lowest first): built-in defaults (`config/default.toml`, embedded)
//! → `--config FILE` → `CASCADE_SECTION__KEY` environment variables → flags.
//! Loading and provenance live in `settings`; this module owns the schema.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cascade_actors::autoheal::{Autoheal, AutohealHandle, AutohealSpec};
use cascade_actors::supervisor::SupervisorConfig;
use cascade_actors::tier::TierSpec;
use cascade_actors::tiers::cloud_run::{self, CloudRunConfig};
use cascade_actors::tiers::docker::{self, DockerConfig, DockerEnv};
use cascade_actors::tiers::gcp::GcpEnv;
use cascade_actors::tiers::gcp_vm::{self, GcpVmConfig};
use cascade_actors::tiers::local::{self, LocalConfig};
use cascade_actors::waterfall::WaterfallConfig;
use cascade_actors::{Instance, TierId};
use cascade_router::RouterConfig;
use serde::{Deserialize, Serialize};

use crate::settings::{self, Layers, LoadError, Loaded, Problem};

/// The shipped default configuration, the lowest layer.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub general: General,
    pub api: Api,
    pub log: Log,
    pub waterfall: WaterfallConfig,
    pub supervisor: SupervisorConfig,
    pub telemetry: Telemetry,
    pub router: RouterConfig,
    pub tiers: Tiers,
    /// Set by `cascade autoheal`: what it runs with, not a configuration
    /// key.
    #[serde(skip)]
    pub standalone: Option<Standalone>,
}

/// `cascade autoheal`: the host's autoheal, with no tier and no router.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Standalone {
    /// `[tiers.docker]` (or its defaults) with docker-autoheal's variables
    /// applied over it.
    pub docker: DockerConfig,
    /// What the variables did, for the log.
    pub notices: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    /// Where cascade keeps its token and what it manages. Unset: systemd's
    /// `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/cascade`, else
    /// `~/.local/state/cascade`.
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Address of the status API. Loopback by default: anywhere else, every
    /// endpoint but `/healthz` and `/readyz` needs the token.
    pub listen: SocketAddr,
    /// Host names a request's `Host` header may carry besides IP addresses
    /// and `localhost` (anything else is refused, so a web page cannot
    /// reach the API through DNS rebinding). Needed only to reach the API
    /// by name.
    pub allowed_hosts: Vec<String>,
    /// Open connections at most (and never more than the open-file limit
    /// allows after what supervision needs); at the cap the longest idle
    /// one is closed, and with none idle a new one gets 503.
    pub max_connections: usize,
    /// `GET /events` streams at most; more get 503.
    pub max_event_streams: usize,
    /// How long a client may take to send a request's head, counted from
    /// when the connection is ready for one (also how long a kept-alive
    /// connection may wait for its next request).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection on which no byte moved for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: SocketAddr::from(([127, 0, 0, 1], 7373)),
            allowed_hosts: Vec::new(),
            max_connections: 512,
            max_event_streams: 64,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Api {
    /// Whether reads (`/status`, `/events`, `/metrics`, the page) are open
    /// to anyone who can connect: only on a loopback address.
    pub fn is_loopback(&self) -> bool {
        self.listen.ip().is_loopback()
    }

    /// The warning for an API reachable from other hosts, if it is.
    pub fn exposure_warning(&self) -> Option<String> {
        (!self.is_loopback()).then(|| {
            format!(
                "api.listen {} is not a loopback address: the API is reachable from other hosts over plain HTTP; every endpoint but /healthz and /readyz requires the token",
                self.listen
            )
        })
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.max_connections < 2 {
            problems.push(("max_connections".into(), "must be at least 2".into()));
        }
        if self.max_event_streams == 0 || self.max_event_streams >= self.max_connections {
            problems.push((
                "max_event_streams".into(),
                "must be at least 1 and below max_connections (event streams hold their connection)".into(),
            ));
        }
        for (key, value) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                problems.push((key.into(), "must be above zero".into()));
            }
        }
        for (i, host) in self.allowed_hosts.iter().enumerate() {
            let valid = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !valid {
                problems.push((
                    format!("allowed_hosts[{i}]"),
                    "must be a host name (letters, digits, `.`, `-`), without a port".into(),
                ));
            }
        }
        problems
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    Human,
    Json,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
}

/// `[telemetry]`: OpenTelemetry export. The standard `OTEL_*` variables
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `_PROTOCOL`, `_HEADERS`,
/// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`)
/// take precedence over these keys, as the OpenTelemetry specification says.
/// `GET /metrics` (Prometheus) works whether export is on or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Where the OTLP collector listens, e.g. `http://127.0.0.1:4318`
    /// (HTTP: `/v1/traces` and `/v1/metrics` are appended) or
    /// `http://127.0.0.1:4317` (gRPC). Unset (and no
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`): no export.
    pub otlp_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Headers sent with every export (e.g. `authorization`). Named so that
    /// `check-config` redacts them, as they usually hold credentials.
    pub secret_headers: BTreeMap<String, String>,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Deadline of one export.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// How long shutdown waits to flush what is left.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            otlp_endpoint: None,
            protocol: OtlpProtocol::default(),
            secret_headers: BTreeMap::new(),
            service_name: "cascade".into(),
            export_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(3),
        }
    }
}

/// OTLP's transports, spelled as `OTEL_EXPORTER_OTLP_PROTOCOL` spells them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    /// The specification's default.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tiers {
    pub docker: Option<DockerConfig>,
    pub cloud_run: Option<CloudRunConfig>,
    pub local: Option<LocalConfig>,
    pub gcp_vm: Option<GcpVmConfig>,
}

/// Flags that override configuration keys.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    /// `cascade autoheal`: no tier, no router; docker-autoheal's variables
    /// read.
    pub autoheal: bool,
}

/// Loads and validates; every problem is reported at once.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, LoadError> {
    let mut flags = Vec::new();
    if let Some(listen) = &overrides.listen {
        flags.push(("api.listen".into(), listen.clone(), "--listen".into()));
    }
    if let Some(dir) = &overrides.state_dir {
        flags.push((
            "general.state_dir".into(),
            dir.display().to_string(),
            "--state-dir".into(),
        ));
    }
    if let Some(format) = overrides.log_format {
        let value = serde_json::to_value(format)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        flags.push((
            "log.format".into(),
            value.unwrap_or_default(),
            "--log-format".into(),
        ));
    }
    let layers = Layers {
        defaults: DEFAULT_TOML,
        file,
        env: std::env::vars().collect(),
        prefix: "CASCADE_",
        overrides: flags,
        base: serde_json::to_value(Config::layering_base()).ok(),
    };
    let (
        Loaded {
            mut value,
            provenance,
        },
        mut problems,
    ) = settings::load_collecting::<Config>(layers)?;
    if overrides.autoheal {
        problems.extend(standalone(&mut value, &std::env::vars().collect()));
    }
    // A key refused while parsing fell back to its default; what the checks
    // below find wrong with that default is not the user's problem.
    let refused: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
    let semantic = validate(&value, |key, message| provenance.problem(key, message))
        .into_iter()
        .filter(|p| !refused.iter().any(|r| settings::covers(r, &p.key)));
    problems.extend(semantic);
    if problems.is_empty() {
        let mut value = value;
        value.waterfall.standby = standby_tiers(&value);
        Ok(value)
    } else {
        Err(LoadError::Invalid(problems))
    }
}

impl Config {
    /// The defaults with every optional section present: the loader fills a
    /// partly written table's missing keys from here, so
    /// `[tiers.local.restart] base = "1s"` keeps the local tier's other
    /// restart defaults.
    fn layering_base() -> Config {
        let mut base = Config::default();
        base.tiers.docker = Some(DockerConfig::default());
        base.tiers.local = Some(LocalConfig::default());
        base.tiers.cloud_run = Some(CloudRunConfig::default());
        base.tiers.gcp_vm = Some(GcpVmConfig::default());
        base
    }
}

/// Makes `config` `cascade autoheal`'s: no tier in the order, no router,
/// and autoheal's settings with docker-autoheal's variables in `vars`
/// applied. Returns the variables' problems.
fn standalone(config: &mut Config, vars: &HashMap<String, String>) -> Vec<Problem> {
    config.waterfall.order.clear();
    config.router.enabled = false;
    let mut docker = config.tiers.docker.clone().unwrap_or_default();
    let applied = cascade_actors::autoheal::compat::apply(vars, &mut docker);
    let problems = applied
        .problems
        .into_iter()
        .map(|(var, message)| Problem {
            key: var.clone(),
            message,
            source: settings::Source::Env { var },
        })
        .collect();
    let mut notices = applied.used;
    notices.extend(applied.ignored);
    config.standalone = Some(Standalone { docker, notices });
    problems
}

fn validate(config: &Config, problem: impl Fn(String, String) -> Problem) -> Vec<Problem> {
    let mut problems = Vec::new();
    let order = &config.waterfall.order;
    for (i, tier) in order.iter().enumerate() {
        let key = format!("waterfall.order[{i}]");
        if order[..i].contains(tier) {
            problems.push(problem(key, format!("`{tier}` is listed twice")));
            continue;
        }
        let configured = match tier {
            TierId::Local => config.tiers.local.is_some(),
            TierId::Docker => config.tiers.docker.is_some(),
            TierId::CloudRun => config.tiers.cloud_run.is_some(),
            TierId::GcpVm => config.tiers.gcp_vm.is_some(),
        };
        if !configured {
            problems.push(problem(
                key,
                format!("`{tier}` is in the order but [tiers.{tier}] is not configured"),
            ));
        }
    }
    // Every configured tier, in the order or not: a tier left out of the
    // order today is put back by a reload tomorrow.
    if let Some(local) = &config.tiers.local {
        for (key, message) in local.validate() {
            problems.push(problem(format!("tiers.local.{key}"), message));
        }
    }
    if let Some(docker) = &config.tiers.docker {
        let ordered = order.contains(&TierId::Docker);
        for (key, message) in docker.validate() {
            // Out of the order, [tiers.docker] may configure autoheal alone.
            if key == "containers" && !ordered {
                continue;
            }
            problems.push(problem(format!("tiers.docker.{key}"), message));
        }
    }
    if let Some(cloud_run) = &config.tiers.cloud_run {
        for (key, message) in cloud_run.validate() {
            problems.push(problem(format!("tiers.cloud_run.{key}"), message));
        }
    }
    if let Some(gcp_vm) = &config.tiers.gcp_vm {
        for (key, message) in gcp_vm.validate() {
            problems.push(problem(format!("tiers.gcp_vm.{key}"), message));
        }
    }
    if config.waterfall.failback_after.is_zero() {
        // Zero would let a flapping tier take traffic back on every probe.
        problems.push(problem(
            "waterfall.failback_after".into(),
            "must be above zero".into(),
        ));
    }
    for (key, message) in config.api.validate() {
        problems.push(problem(format!("api.{key}"), message));
    }
    for (key, message) in duration_bounds(config) {
        problems.push(problem(key, message));
    }
    for (key, message) in config.waterfall.start_retry.validate() {
        problems.push(problem(format!("waterfall.start_retry.{key}"), message));
    }
    for (key, message) in config.waterfall.validate() {
        problems.push(problem(format!("waterfall.{key}"), message));
    }
    if config.supervisor.restart_window.is_zero() {
        problems.push(problem(
            "supervisor.restart_window".into(),
            "must be above zero".into(),
        ));
    }
    for (key, message) in config.supervisor.restart_backoff.validate() {
        problems.push(problem(
            format!("supervisor.restart_backoff.{key}"),
            message,
        ));
    }
    for (key, message) in config.router.validate() {
        problems.push(problem(format!("router.{key}"), message));
    }
    if config.router.enabled
        && config.router.listen == config.api.listen
        && config.api.listen.port() != 0
    {
        problems.push(problem(
            "router.listen".into(),
            format!(
                "{} is also api.listen; the router needs an address of its own",
                config.router.listen
            ),
        ));
    }
    problems
}

/// The longest a timeout or grace period may be: stop and start budgets are
/// sums of these, and a service manager's own stop timeout must cover them.
const MAX_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// The longest any other duration (interval, window, backoff, idle time,
/// failback) may be.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Every duration of the configuration within a sane ceiling, so no sum or
/// `Instant + duration` downstream can overflow. Durations are found in the
/// serialized configuration (humantime strings), so a key any section adds
/// is bounded too; tables of free-form values (`env`, `labels`, `args`, …)
/// are not durations and are skipped.
fn duration_bounds(config: &Config) -> Vec<(String, String)> {
    fn walk(value: &serde_json::Value, key: &str, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (name, child) in map {
                    if matches!(
                        name.as_str(),
                        "env" | "labels" | "args" | "command" | "secret_headers"
                    ) {
                        continue;
                    }
                    let key = if key.is_empty() {
                        name.clone()
                    } else {
                        format!("{key}.{name}")
                    };
                    walk(child, &key, out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{key}[{i}]"), out);
                }
            }
            serde_json::Value::String(text) => {
                let Ok(duration) = humantime::parse_duration(text) else {
                    return;
                };
                let name = key.rsplit('.').next().unwrap_or(key);
                let max = if name.ends_with("timeout") || name.ends_with("grace") {
                    MAX_TIMEOUT
                } else {
                    MAX_DURATION
                };
                if duration > max {
                    out.push((
                        key.to_owned(),
                        format!("must be at most {}", humantime::format_duration(max)),
                    ));
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_json::to_value(config) {
        walk(&value, "", &mut out);
    }
    out
}

/// The configured tiers marked `standby = true`.
fn standby_tiers(config: &Config) -> BTreeSet<TierId> {
    let tiers = &config.tiers;
    [
        (
            TierId::Docker,
            tiers.docker.as_ref().is_some_and(|t| t.standby),
        ),
        (
            TierId::CloudRun,
            tiers.cloud_run.as_ref().is_some_and(|t| t.standby),
        ),
        (
            TierId::Local,
            tiers.local.as_ref().is_some_and(|t| t.standby),
        ),
        (
            TierId::GcpVm,
            tiers.gcp_vm.as_ref().is_some_and(|t| t.standby),
        ),
    ]
    .into_iter()
    .filter_map(|(tier, standby)| standby.then_some(tier))
    .collect()
}

/// The tiers to run, in waterfall order, as cascade `instance` runs them.
/// A tier's `standby` is the waterfall's business, so it is left out of the
/// tier's own spec: changing it by reload does not restart the tier.
pub fn tier_specs(config: &Config, instance: &Instance) -> Vec<TierSpec> {
    tier_specs_with(config, instance, None)
}

/// [`tier_specs`], with the docker tier telling `autoheal` of the
/// containers it stops itself.
pub fn tier_specs_with(
    config: &Config,
    instance: &Instance,
    autoheal: Option<&AutohealHandle>,
) -> Vec<TierSpec> {
    let state_dir = state_dir(config);
    config
        .waterfall
        .order
        .iter()
        .filter_map(|tier| match tier {
            TierId::Local => config.tiers.local.clone().map(|local| {
                local::tier_spec(
                    LocalConfig {
                        standby: false,
                        ..local
                    },
                    &state_dir,
                )
            }),
            TierId::Docker => config.tiers.docker.clone().map(|docker| {
                let docker = DockerConfig {
                    standby: false,
                    ..docker
                };
                let autoheal = autoheal.cloned();
                docker::tier_spec(docker, DockerEnv::from_env(), instance.clone(), autoheal)
            }),
            TierId::CloudRun => config.tiers.cloud_run.clone().map(|cloud_run| {
                let cloud_run = CloudRunConfig {
                    standby: false,
                    ..cloud_run
                };
                cloud_run::tier_spec(cloud_run, GcpEnv::from_env())
            }),
            TierId::GcpVm => config.tiers.gcp_vm.clone().map(|gcp_vm| {
                let gcp_vm = GcpVmConfig {
                    standby: false,
                    ..gcp_vm
                };
                let checkpoint = gcp_vm_checkpoint(&state_dir, &gcp_vm.pool);
                gcp_vm::tier_spec(gcp_vm, checkpoint, GcpEnv::from_env())
            }),
        })
        .collect()
}

/// Docker autoheal as this configuration runs it for cascade `instance`,
/// over `autoheal`'s memory: for `cascade autoheal`, from its settings;
/// with `[tiers.docker]` configured (in the waterfall order or not), from
/// its daemon, `autoheal` and `webhook` settings; with no tier at all, from
/// their defaults, as the host's autoheal. `None` when it is disabled, or
/// when only other tiers are configured.
pub fn autoheal_spec(
    config: &Config,
    instance: &Instance,
    autoheal: &Autoheal,
) -> Option<AutohealSpec> {
    let docker = match (&config.standalone, &config.tiers.docker) {
        (Some(standalone), _) => standalone.docker.clone(),
        (None, Some(docker)) => docker.clone(),
        (None, None) if config.waterfall.order.is_empty() => DockerConfig::default(),
        (None, None) => return None,
    };
    if !docker.autoheal.enabled {
        return None;
    }
    let spec = AutohealSpec::new(&docker, DockerEnv::from_env(), autoheal).for_instance(instance);
    // Tests on a shared engine keep each cascade to their own containers.
    #[cfg(debug_assertions)]
    let spec = match std::env::var("TEST_AUTOHEAL_SCOPE") {
        Ok(scope) if !scope.is_empty() => spec.scoped(&scope),
        _ => spec,
    };
    Some(spec)
}

/// Where the `gcp_vm` pool named `pool` keeps what it manages.
pub fn gcp_vm_checkpoint(state_dir: &Path, pool: &str) -> PathBuf {
    state_dir.join("gcp_vm").join(format!("{pool}.json"))
}

/// The state directory: configured, else the service manager's, else the user's.
pub fn state_dir(config: &Config) -> PathBuf {
    if let Some(dir) = &config.general.state_dir {
        return dir.clone();
    }
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("STATE_DIRECTORY") {
        return dir;
    }
    if let Some(dir) = env("XDG_STATE_HOME") {
        return dir.join("cascade");
    }
    match env("HOME") {
        Some(home) => home.join(".local/state/cascade"),
        None => PathBuf::from("/var/lib/cascade"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_configuration_is_valid() {
        let config = load(None, &Overrides::default()).expect("default config loads");
        assert_eq!(config.waterfall.order, vec![TierId::Local]);
        assert!(config.tiers.local.is_some());
        let instance = Instance::from_state_dir(&state_dir(&config));
        assert_eq!(tier_specs(&config, &instance).len(), 1);
    }

    #[test]
    fn every_shipped_example_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config/examples exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(e) = load(Some(&path), &Overrides::default()) {
                    panic!("{} is not valid: {e}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen > 0, "no examples found in {}", dir.display());
    }

    #[test]
    fn google_cloud_tier_problems_name_their_keys_and_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cascade.toml");
        std::fs::write(
            &path,
            "[waterfall]\n\
             order = [\"cloud_run\", \"gcp_vm\"]\n\
             [tiers.cloud_run]\n\
             url = \"ftp://nope\"\n\
             [tiers.gcp_vm]\n\
             project = \"p\"\n\
             zone = \"europe-west1-b\"\n\
             pool = \"Bad_Pool\"\n",
        )
        .expect("write the config");
        let error = load(Some(&path), &Overrides::default())
            .expect_err("invalid tiers are refused")
            .to_string();
        assert!(error.contains("tiers.cloud_run.url"), "{error}");
        assert!(error.contains("cascade.toml:4"), "{error}");
        assert!(error.contains("tiers.gcp_vm.pool"), "{error}");
        assert!(error.contains("cascade.toml:8"), "{error}");
    }

    #[test]
    fn standby_reaches_the_waterfall_and_not_the_tiers_fingerprint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cascade.toml");
        let load_with = |standby: bool| {
            std::fs::write(
                &path,
                format!(
                    "[waterfall]\norder = [\"cloud_run\", \"local\"]\n\
                     [tiers.cloud_run]\nurl = \"http://127.0.0.1:9\"\nauth = \"none\"\n\
                     [tiers.local]\nstandby = {standby}\n"
                ),
            )
            .expect("write the config");
            load(Some(&path), &Overrides::default()).expect("valid config")
        };
        let (on, off) = (load_with(true), load_with(false));
        assert_eq!(on.waterfall.standby, BTreeSet::from([TierId::Local]));
        assert!(off.waterfall.standby.is_empty());
        let instance = Instance::from_state_dir(dir.path());
        let fingerprints = |config: &Config| -> Vec<String> {
            tier_specs(config, &instance)
                .into_iter()
                .map(|spec| spec.fingerprint)
                .collect()
        };
        // A reload that only flips `standby` leaves the running tier alone.
        assert_eq!(fingerprints(&on), fingerprints(&off));
    }

    #[test]
    fn start_patience_is_bounded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cascade.toml");
        for (value, ok) in [
            ("0s", false),
            ("50ms", false),
            ("100ms", true),
            ("3s", true),
            ("10m", true),
            ("11m", false),
        ] {
            std::fs::write(
                &path,
                format!("[waterfall]\nstart_patience = \"{value}\"\n[tiers.local]\n"),
            )
            .expect("write the config");
            match load(Some(&path), &Overrides::default()) {
                Ok(config) => {
                    assert!(ok, "{value} was accepted");
                    assert_eq!(
                        config.waterfall.start_patience,
                        humantime::parse_duration(value).expect("a duration")
                    );
                }
                Err(e) => {
                    let error = e.to_string();
                    assert!(!ok, "{value} was refused: {error}");
                    assert!(error.contains("waterfall.start_patience"), "{error}");
                    assert!(error.contains("cascade.toml:2"), "{error}");
                    assert!(error.contains("between 100ms and 10m"), "{error}");
                }
            }
        }
    }

    #[test]
    fn the_gcp_vm_checkpoint_lives_in_the_state_directory_by_pool() {
        assert_eq!(
            gcp_vm_checkpoint(Path::new("/var/lib/cascade"), "ecapa"),
            Path::new("/var/lib/cascade/gcp_vm/ecapa.json")
        );
    }
}
