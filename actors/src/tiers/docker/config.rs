//! `[tiers.docker]`: the daemon, the service containers, autoheal and the
//! webhook.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resilience::{BackoffConfig, BreakerConfig, Jitter};
use crate::tier::ProbeConfig;

/// The label that marks a container as cascade's own.
pub const MANAGED_LABEL: &str = "cascade.managed";
/// The label holding a hash of the settings a managed container was created with.
pub const HASH_LABEL: &str = "cascade.config-hash";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// `unix:///path/to/docker.sock` or `tcp://host:port`. Unset: `$DOCKER_HOST`,
    /// else `unix:///var/run/docker.sock`.
    pub host: Option<String>,
    /// TLS to a `tcp://` daemon (the docker CLI's `--tlsverify`). Unset: TLS
    /// when `$DOCKER_TLS_VERIFY` is set, with `ca.pem`, `cert.pem` and
    /// `key.pem` from `$DOCKER_CERT_PATH` (else `~/.docker`), as the CLI does.
    pub tls: Option<TlsConfig>,
    /// How long Docker may take to answer a "daemon running?" ping, and a
    /// probe's inspects. Beyond it Docker is "not responding": the tier is
    /// degraded while the service's own health check passes, down and not
    /// startable (skipped by the start phase) while it does not.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// Deadline of every other Docker call (bollard's own timeout is whole
    /// seconds and covers only response headers).
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    pub probe: ProbeConfig,
    pub breaker: BreakerConfig,
    /// Deadline for the start phase: daemon start, containers up and healthy.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Deadline for stopping the managed containers.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Stop the managed containers when cascade shuts down. Off by default:
    /// Docker keeps them running, and the next cascade adopts them by label
    /// and config hash, so restarting cascade costs the service nothing.
    pub stop_on_exit: bool,
    pub daemon: DaemonConfig,
    /// The service container(s). The first container's first port is the
    /// tier's endpoint.
    pub containers: Vec<ContainerConfig>,
    pub autoheal: AutohealConfig,
    pub webhook: WebhookConfig,
    /// Keep this tier started while another tier is active, so a failover
    /// to it needs no cold start (the waterfall's standby).
    pub standby: bool,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: None,
            tls: None,
            ping_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(10),
            probe: ProbeConfig::default(),
            breaker: BreakerConfig::default(),
            start_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(15),
            stop_on_exit: false,
            daemon: DaemonConfig::default(),
            containers: Vec::new(),
            autoheal: AutohealConfig::default(),
            webhook: WebhookConfig::default(),
            standby: false,
        }
    }
}

/// TLS to the daemon: its certificate checked against `ca`, and this
/// client's certificate presented when `cert` and `key` are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The CA certificate(s) the daemon's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// This client's certificate (PEM), set together with `key`.
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    pub key: Option<PathBuf>,
    /// Verify the daemon's certificate. Only `true` is accepted: the Docker
    /// API is root on its host, so cascade never talks to a daemon it has not
    /// verified (unlike the docker CLI's `--tls` without `--tlsverify`).
    pub verify: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca: PathBuf::new(),
            cert: None,
            key: None,
            verify: true,
        }
    }
}

impl TlsConfig {
    /// Problems as (key relative to `[tiers.docker.tls]`, message). Each
    /// file must be readable now; its contents are checked on connecting.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if !self.verify {
            problems.push((
                "verify".into(),
                "must be true: cascade does not talk to a Docker daemon whose certificate it cannot verify (the API is root on its host)".into(),
            ));
        }
        if self.ca.as_os_str().is_empty() {
            problems.push((
                "ca".into(),
                "must name the CA certificate that signed the daemon's".into(),
            ));
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => problems.push((
                "key".into(),
                "must be set with cert (the client certificate's private key)".into(),
            )),
            (None, Some(_)) => problems.push((
                "cert".into(),
                "must be set with key (the client certificate)".into(),
            )),
            _ => {}
        }
        let files = [
            ("ca", Some(&self.ca)),
            ("cert", self.cert.as_ref()),
            ("key", self.key.as_ref()),
        ];
        for (key, path) in files {
            let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) else {
                continue;
            };
            if let Err(e) = std::fs::File::open(path) {
                problems.push((key.into(), format!("cannot read {}: {e}", path.display())));
            }
        }
        problems
    }
}

/// Starting the Docker daemon, in the start phase only, when opted in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Whether cascade may start the daemon when no tier is healthy.
    pub start: bool,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Overall deadline for the daemon to answer a ping after the command.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Deadline of each ping while waiting.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Time between pings while waiting.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let command = if cfg!(target_os = "macos") {
            vec!["open".into(), "-a".into(), "Docker".into()]
        } else {
            vec!["systemctl".into(), "start".into(), "docker".into()]
        };
        DaemonConfig {
            start: false,
            command,
            timeout: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(3),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// One service container, as cascade wants it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerConfig {
    pub name: String,
    pub image: String,
    pub env: BTreeMap<String, String>,
    /// `HOST:CONTAINER` or `HOST:CONTAINER/udp`; published on 127.0.0.1.
    pub ports: Vec<String>,
    /// Overrides the image's command when not empty.
    pub command: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Overrides the image's HEALTHCHECK.
    pub healthcheck: Option<HealthcheckConfig>,
    /// Pull the image when it is missing (off: a missing image is an error).
    pub pull: bool,
    /// HTTP health path probed on the first published port; empty disables.
    pub health_path: String,
    /// Grace between SIGTERM and SIGKILL when cascade stops the container.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        ContainerConfig {
            name: String::new(),
            image: String::new(),
            env: BTreeMap::new(),
            ports: Vec::new(),
            command: Vec::new(),
            labels: BTreeMap::new(),
            healthcheck: None,
            pull: false,
            health_path: "/health".into(),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthcheckConfig {
    /// As in Docker: `["CMD", "/bin/check"]` or `["CMD-SHELL", "curl -f ..."]`.
    pub test: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub retries: u32,
    #[serde(with = "humantime_serde")]
    pub start_period: Duration,
}

impl Default for HealthcheckConfig {
    fn default() -> Self {
        HealthcheckConfig {
            test: Vec::new(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            retries: 3,
            start_period: Duration::ZERO,
        }
    }
}

/// A published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMapping {
    pub host: u16,
    pub container: u16,
    pub udp: bool,
}

impl PortMapping {
    /// `HOST:CONTAINER[/tcp|/udp]`.
    pub fn parse(text: &str) -> Result<PortMapping, String> {
        let (ports, proto) = match text.split_once('/') {
            Some((ports, proto)) => (ports, proto),
            None => (text, "tcp"),
        };
        let udp = match proto {
            "tcp" => false,
            "udp" => true,
            other => return Err(format!("`{text}`: protocol `{other}` is not tcp or udp")),
        };
        let Some((host, container)) = ports.split_once(':') else {
            return Err(format!("`{text}` is not HOST:CONTAINER"));
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{text}`: `{p}` is not a port from 1 to 65535")),
            Ok(n) => Ok(n),
        };
        Ok(PortMapping {
            host: port(host)?,
            container: port(container)?,
            udp,
        })
    }

    /// Docker's key for the container side: `8080/tcp`.
    pub fn container_key(&self) -> String {
        format!(
            "{}/{}",
            self.container,
            if self.udp { "udp" } else { "tcp" }
        )
    }
}

/// Event-driven healing of containers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutohealConfig {
    pub enabled: bool,
    /// Containers carrying this label with value `true` are healed (cascade's
    /// own managed containers always are); `all`: every container, on
    /// `unhealthy` only (docker-autoheal's mode). `autoheal=false` opts out.
    pub label: String,
    /// Wait between restarts of a container that keeps failing, counted
    /// from the previous restart: the first failure after a run of
    /// `reset_after` is healed at once.
    pub backoff: BackoffConfig,
    /// Give up on a container after this many restarts within `window`
    /// (unset: never give up; `backoff.cap` bounds the rate).
    pub max_restarts: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Stop timeout when the container has no `autoheal.stop.timeout` label.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Reconnecting to the event stream after it breaks.
    pub reconnect: BackoffConfig,
    /// Wait this long after cascade starts before following the stream
    /// (docker-autoheal's `AUTOHEAL_START_PERIOD`): containers still coming
    /// up are left alone meanwhile.
    #[serde(with = "humantime_serde")]
    pub start_period: Duration,
}

impl Default for AutohealConfig {
    fn default() -> Self {
        AutohealConfig {
            enabled: true,
            label: "autoheal".into(),
            // Docker's restart manager resets after 10 s up; Kubernetes caps
            // CrashLoopBackOff at 5 min.
            backoff: BackoffConfig {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(300),
                reset_after: Duration::from_secs(10),
                jitter: Jitter::None,
            },
            max_restarts: None,
            window: Duration::from_secs(600),
            stop_timeout: Duration::from_secs(10),
            reconnect: BackoffConfig {
                base: Duration::from_millis(200),
                cap: Duration::from_secs(30),
                reset_after: Duration::from_secs(60),
                jitter: Jitter::Full,
            },
            start_period: Duration::ZERO,
        }
    }
}

/// Optional notifications of restarts and give-ups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// JSON is POSTed here; unset disables.
    pub url: Option<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Unset: cascade's JSON notice. Set: `{"<json_key>": "<one line of
    /// text>"}`, docker-autoheal's shape (`text` for Slack, `content` for
    /// Discord).
    pub json_key: Option<String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: None,
            timeout: Duration::from_secs(5),
            json_key: None,
        }
    }
}

impl DockerConfig {
    /// Problems as (key relative to `[tiers.docker]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Some(host) = &self.host
            && !(host.starts_with("unix://") || host.starts_with("tcp://"))
        {
            problems.push((
                "host".into(),
                format!("`{host}` must start with unix:// or tcp://"),
            ));
        }
        if let Some(tls) = &self.tls {
            if self
                .host
                .as_deref()
                .is_some_and(|h| !h.starts_with("tcp://"))
            {
                problems.push((
                    "tls".into(),
                    "applies to a tcp:// host only (a unix socket is not encrypted)".into(),
                ));
            }
            for (k, p) in tls.validate() {
                problems.push((format!("tls.{k}"), p));
            }
        }
        if self.ping_timeout.is_zero() || self.call_timeout.is_zero() {
            problems.push((
                "ping_timeout".into(),
                "ping_timeout and call_timeout must be above zero".into(),
            ));
        }
        if self.daemon.start && self.daemon.command.is_empty() {
            problems.push((
                "daemon.command".into(),
                "must name a program when daemon.start is true".into(),
            ));
        }
        let mut names = Vec::new();
        let mut host_ports = Vec::new();
        for (i, c) in self.containers.iter().enumerate() {
            let key = |k: &str| format!("containers[{i}].{k}");
            if c.name.is_empty()
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch))
            {
                problems.push((
                    key("name"),
                    format!("`{}` is not a valid container name", c.name),
                ));
            }
            if names.contains(&&c.name) {
                problems.push((key("name"), format!("`{}` is used twice", c.name)));
            }
            names.push(&c.name);
            if c.image.is_empty() {
                problems.push((key("image"), "must name an image".into()));
            }
            for (j, p) in c.ports.iter().enumerate() {
                match PortMapping::parse(p) {
                    Ok(m) if host_ports.contains(&(m.host, m.udp)) => {
                        problems.push((
                            format!("containers[{i}].ports[{j}]"),
                            format!("host port {} is published twice", m.host),
                        ));
                    }
                    Ok(m) => host_ports.push((m.host, m.udp)),
                    Err(e) => problems.push((format!("containers[{i}].ports[{j}]"), e)),
                }
            }
            if !c.health_path.is_empty() && !c.health_path.starts_with('/') {
                problems.push((
                    key("health_path"),
                    "must start with `/` (or be empty to disable)".into(),
                ));
            }
            if c.labels.contains_key(MANAGED_LABEL) || c.labels.contains_key(HASH_LABEL) {
                problems.push((
                    key("labels"),
                    format!("`{MANAGED_LABEL}` and `{HASH_LABEL}` are set by cascade"),
                ));
            }
        }
        if self.containers.is_empty() {
            problems.push((
                "containers".into(),
                "list at least one service container".into(),
            ));
        }
        for (k, p) in self.breaker.validate() {
            problems.push((format!("breaker.{k}"), p));
        }
        for (k, p) in self.autoheal.backoff.validate() {
            problems.push((format!("autoheal.backoff.{k}"), p));
        }
        for (k, p) in self.autoheal.reconnect.validate() {
            problems.push((format!("autoheal.reconnect.{k}"), p));
        }
        if self.autoheal.max_restarts == Some(0) {
            problems.push((
                "autoheal.max_restarts".into(),
                "must be at least 1 (leave it unset never to give up)".into(),
            ));
        }
        if self.autoheal.label.trim().is_empty() {
            problems.push(("autoheal.label".into(), "must name a label".into()));
        }
        if self
            .webhook
            .json_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            problems.push(("webhook.json_key".into(), "must not be empty".into()));
        }
        if let Some(url) = &self.webhook.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problems.push((
                "webhook.url".into(),
                format!("`{url}` is not an http(s) URL"),
            ));
        }
        problems
    }

    /// What one probe may take: the service's health GETs (`probe.timeout`)
    /// and Docker's answers (`ping_timeout`) run side by side, each within
    /// its own bound.
    pub fn probe_budget(&self) -> Duration {
        self.probe.timeout.max(self.ping_timeout)
    }

    /// The tier actor's deadline around one probe: the budget and a margin,
    /// so the probe itself says what was slow.
    pub fn probe_deadline(&self) -> Duration {
        let budget = self.probe_budget();
        budget.saturating_add((budget / 4).max(Duration::from_millis(100)))
    }

    /// The tier's endpoint: the first container's first published port.
    pub fn endpoint(&self) -> Option<String> {
        let first = self.containers.first()?;
        let port = first
            .ports
            .iter()
            .find_map(|p| PortMapping::parse(p).ok())?;
        Some(format!("http://127.0.0.1:{}", port.host))
    }
}
