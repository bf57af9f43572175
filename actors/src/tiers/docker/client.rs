//! The docker tier's outside world: Docker Engine calls (through
//! [`Connector`]) and the HTTP health probe. Who holds a host port is
//! `tiers::ports`, shared with the local tier.
//!
//! Invariants: this is the only file of the tier's driver that talks to
//! Docker or HTTP; every call has a deadline (the connector's per-call one,
//! or an explicit one for calls that legitimately take longer, such as
//! stopping a container with a grace); nothing here decides anything — it
//! translates bollard's models into `plan`'s types and back.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, HealthConfig, HealthStatusEnum, HostConfig, PortBinding,
    PortSummaryTypeEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tracing::debug;

use super::config::{HASH_LABEL, HealthcheckConfig, MANAGED_LABEL, PortMapping};
use super::connect::{Connector, DockerError, classify};
use super::plan::{
    Desired, HealthState, ImageFacts, Observed, PortHolder, RunState, parse_bindings,
};
use crate::instance::Instance;
use crate::resilience::with_deadline;

/// Longest health check output quoted in a status line.
const OUTPUT_QUOTED: usize = 200;

/// Docker and HTTP, as the driver uses them.
#[derive(Clone)]
pub struct Client {
    connector: Connector,
    http: reqwest::Client,
}

impl Client {
    pub fn new(connector: Connector) -> Result<Client, String> {
        // Health endpoints are on loopback; a proxy from the environment
        // would only get in the way.
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Client { connector, http })
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// "Installed?": the socket exists or the docker CLI is on PATH.
    pub fn installed(&self) -> bool {
        self.connector.installed()
    }

    /// "Daemon running?" within `timeout`. Starts nothing.
    pub async fn ping(&self, timeout: Duration) -> Result<(), DockerError> {
        self.connector.ping_within(timeout).await
    }

    // === containers ===

    /// The container named `name`, or `None` when there is none.
    pub async fn inspect_container(
        &self,
        name: &str,
        within: Duration,
    ) -> Result<Option<Observed>, DockerError> {
        let what = format!("inspecting container {name}");
        let owned = name.to_owned();
        let found = self
            .connector
            .call_within(&what, within, |docker| async move {
                docker.inspect_container(&owned, None).await
            })
            .await;
        match found {
            Ok(response) => Ok(Some(observed(response))),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn create_container(&self, d: &Desired) -> Result<String, DockerError> {
        let what = format!("creating container {} from {}", d.name, d.image);
        let options = CreateContainerOptionsBuilder::new().name(&d.name).build();
        let body = create_body(d);
        let created = self
            .connector
            .call(&what, |docker| async move {
                docker.create_container(Some(options), body).await
            })
            .await?;
        for warning in &created.warnings {
            tracing::warn!(container = %d.name, %warning, "Docker warned on create.");
        }
        Ok(created.id)
    }

    pub async fn start_container(&self, name: &str) -> Result<(), DockerError> {
        let what = format!("starting container {name}");
        let owned = name.to_owned();
        let started = self
            .connector
            .call(&what, |docker| async move {
                docker.start_container(&owned, None).await
            })
            .await;
        match started {
            // 304: already running.
            Err(e) if e.status() == Some(304) => Ok(()),
            other => other,
        }
    }

    /// Stops a container, SIGKILL after `grace`. Already stopped or gone is fine.
    pub async fn stop_container(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        let what = format!("stopping container {name}");
        let options = StopContainerOptionsBuilder::new()
            .t(whole_seconds(grace))
            .build();
        let owned = name.to_owned();
        let within = grace + self.connector.call_timeout();
        let stopped = self
            .connector
            .call_within(&what, within, |docker| async move {
                docker.stop_container(&owned, Some(options)).await
            })
            .await;
        match stopped {
            Err(e) if matches!(e.status(), Some(304 | 404)) => Ok(()),
            other => other,
        }
    }

    /// `docker restart`: the same container, stopped (SIGKILL after `grace`) and started.
    pub async fn restart_container(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        let what = format!("restarting container {name}");
        let options = RestartContainerOptionsBuilder::new()
            .t(whole_seconds(grace))
            .build();
        let owned = name.to_owned();
        let within = grace + self.connector.call_timeout();
        self.connector
            .call_within(&what, within, |docker| async move {
                docker.restart_container(&owned, Some(options)).await
            })
            .await
    }

    /// Removes a container, killing it if it runs. Already gone is fine.
    pub async fn remove_container(&self, name_or_id: &str) -> Result<(), DockerError> {
        let what = format!("removing container {name_or_id}");
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        let owned = name_or_id.to_owned();
        let removed = self
            .connector
            .call(&what, |docker| async move {
                docker.remove_container(&owned, Some(options)).await
            })
            .await;
        match removed {
            Err(e) if e.status() == Some(404) => Ok(()),
            // Someone else is removing it (`docker rm -f`): wait until the
            // name is free, as the create that follows needs it.
            Err(e) if e.status() == Some(409) && e.to_string().contains("in progress") => {
                let gone = crate::resilience::poll_until(
                    self.connector.call_timeout(),
                    std::time::Duration::from_millis(100),
                    "a removal in progress",
                    || async {
                        let within = self.connector.call_timeout();
                        matches!(self.inspect_container(name_or_id, within).await, Ok(None))
                            .then_some(())
                    },
                )
                .await;
                gone.map_err(|_| e)
            }
            other => other,
        }
    }

    /// Containers that publish host port `port.host`: running ones from the
    /// list (one call), stopped ones of instance `ours` from their
    /// HostConfig (they hold nothing now but would collide when started).
    /// Other stopped containers are not inspected: they hold nothing and are
    /// not ours.
    pub async fn port_holders(
        &self,
        port: PortMapping,
        ours: &str,
    ) -> Result<Vec<PortHolder>, DockerError> {
        let options = ListContainersOptionsBuilder::new().all(true).build();
        let summaries = self
            .connector
            .call("listing containers", |docker| async move {
                docker.list_containers(Some(options)).await
            })
            .await?;
        let mut holders = Vec::new();
        for s in summaries {
            let labels = s.labels.unwrap_or_default();
            let managed = labels.get(MANAGED_LABEL).is_some_and(|v| v == "true");
            let instance = labels.get(Instance::LABEL).cloned();
            let running = s.state == Some(ContainerSummaryStateEnum::RUNNING);
            let id = s.id.unwrap_or_default();
            let name = s
                .names
                .unwrap_or_default()
                .first()
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| id.clone());
            let holds = if running {
                s.ports.unwrap_or_default().iter().any(|p| {
                    p.public_port == Some(port.host)
                        && (p.typ == Some(PortSummaryTypeEnum::UDP)) == port.udp
                })
            } else if managed && instance.as_deref() == Some(ours) {
                let within = self.connector.call_timeout();
                match self.inspect_container(&id, within).await? {
                    Some(o) => o
                        .ports
                        .iter()
                        .any(|p| p.host == port.host && p.udp == port.udp),
                    None => false,
                }
            } else {
                false
            };
            if holds {
                holders.push(PortHolder {
                    id,
                    name,
                    image: s.image.unwrap_or_default(),
                    managed,
                    instance,
                    running,
                });
            }
        }
        Ok(holders)
    }

    // === images ===

    /// The image's id and default command, or `None` when it is not present.
    pub async fn inspect_image(&self, image: &str) -> Result<Option<ImageFacts>, DockerError> {
        let what = format!("inspecting image {image}");
        let owned = image.to_owned();
        let found = self
            .connector
            .call(
                &what,
                |docker| async move { docker.inspect_image(&owned).await },
            )
            .await;
        match found {
            Ok(inspect) => Ok(Some(ImageFacts {
                id: inspect.id.unwrap_or_default(),
                cmd: inspect.config.and_then(|c| c.cmd).unwrap_or_default(),
            })),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Pulls `image`, all of it within `within`.
    pub async fn pull_image(&self, image: &str, within: Duration) -> Result<(), DockerError> {
        let what = format!("pulling image {image}");
        let docker = self.connector.client(self.connector.call_timeout()).await?;
        let docker = docker.with_timeout(within + Duration::from_secs(1));
        let options = CreateImageOptionsBuilder::new().from_image(image).build();
        let pull = async {
            let mut progress = docker.create_image(Some(options), None, None);
            while let Some(item) = progress.next().await {
                let info = item.map_err(|e| classify(&what, e))?;
                if let Some(status) = info.status {
                    debug!(%image, %status, "Pull progress.");
                }
            }
            Ok(())
        };
        match with_deadline(within, &what, pull).await {
            Ok(result) => result,
            Err(_) => Err(DockerError::NotResponding {
                what: what.clone(),
                after: within,
            }),
        }
    }

    // === HTTP ===

    /// One GET of a health endpoint: Ok on 2xx within `timeout`.
    pub async fn health(&self, url: &str, timeout: Duration) -> Result<(), String> {
        crate::tiers::health::check(&self.http, url, timeout).await
    }
}

// === bollard ↔ plan ===

fn observed(r: ContainerInspectResponse) -> Observed {
    let config = r.config.unwrap_or_default();
    let labels = config.labels.unwrap_or_default();
    let state = r.state.unwrap_or_default();
    let run_state = match state.status {
        Some(ContainerStateStatusEnum::RUNNING) => RunState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => RunState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => RunState::Restarting,
        Some(ContainerStateStatusEnum::CREATED) => RunState::Created,
        Some(ContainerStateStatusEnum::EXITED) => RunState::Exited {
            code: state.exit_code.unwrap_or_default(),
        },
        Some(ContainerStateStatusEnum::DEAD) => RunState::Dead,
        Some(ContainerStateStatusEnum::REMOVING) => RunState::Removing,
        Some(other) => RunState::Other(other.to_string()),
        None => RunState::Other("unknown".into()),
    };
    let health = state.health.and_then(|h| {
        let last_output = h
            .log
            .as_ref()
            .and_then(|log| log.last())
            .and_then(|result| result.output.as_deref())
            .map(one_line)
            .filter(|out| !out.is_empty());
        match h.status? {
            HealthStatusEnum::STARTING => Some(HealthState::Starting),
            HealthStatusEnum::HEALTHY => Some(HealthState::Healthy),
            HealthStatusEnum::UNHEALTHY => Some(HealthState::Unhealthy { last_output }),
            HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
        }
    });
    let bindings: HashMap<String, Option<Vec<PortBinding>>> = r
        .host_config
        .and_then(|h| h.port_bindings)
        .unwrap_or_default();
    let ports = parse_bindings(bindings.iter().map(|(key, hosts)| {
        let hosts = hosts
            .iter()
            .flatten()
            .filter_map(|b| b.host_port.as_deref())
            .collect();
        (key.as_str(), hosts)
    }));
    Observed {
        id: r.id.unwrap_or_default(),
        name: r
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        managed: labels.get(MANAGED_LABEL).is_some_and(|v| v == "true"),
        instance: labels.get(Instance::LABEL).cloned(),
        hash: labels.get(HASH_LABEL).cloned(),
        image: config.image.unwrap_or_default(),
        image_id: r.image.unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        cmd: config.cmd.unwrap_or_default(),
        ports,
        state: run_state,
        health,
        started_at: state.started_at.unwrap_or_default(),
    }
}

fn create_body(d: &Desired) -> ContainerCreateBody {
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &d.ports {
        bindings
            .entry(p.container_key())
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                // Loopback only: the service is for this host's applications.
                host_ip: Some(Ipv4Addr::LOCALHOST.to_string()),
                host_port: Some(p.host.to_string()),
            });
    }
    let exposed: BTreeSet<String> = d.ports.iter().map(PortMapping::container_key).collect();
    ContainerCreateBody {
        image: Some(d.image.clone()),
        env: Some(d.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        cmd: (!d.command.is_empty()).then(|| d.command.clone()),
        labels: Some(d.labels().into_iter().collect()),
        exposed_ports: Some(exposed.into_iter().collect()),
        healthcheck: d.healthcheck.as_ref().map(health_config),
        host_config: Some(HostConfig {
            port_bindings: Some(bindings),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

fn health_config(h: &HealthcheckConfig) -> HealthConfig {
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    HealthConfig {
        test: Some(h.test.clone()),
        interval: Some(nanos(h.interval)),
        timeout: Some(nanos(h.timeout)),
        retries: Some(i64::from(h.retries)),
        start_period: Some(nanos(h.start_period)),
        start_interval: None,
    }
}

/// Docker's stop grace is whole seconds; round up so a grace is never cut short.
fn whole_seconds(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(OUTPUT_QUOTED) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_publishes_on_loopback_with_cascades_labels() {
        let instance = Instance::from_state_dir(std::path::Path::new("/nonexistent/me"));
        let d = Desired::from_config(
            &super::super::config::ContainerConfig {
                name: "svc".into(),
                image: "demo:1".into(),
                ports: vec!["8701:8080".into(), "5353:53/udp".into()],
                ..Default::default()
            },
            &instance,
        )
        .expect("valid");
        let body = create_body(&d);
        let bindings = body
            .host_config
            .and_then(|h| h.port_bindings)
            .expect("bindings");
        let tcp = bindings["8080/tcp"].as_ref().expect("tcp binding");
        assert_eq!(tcp[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(tcp[0].host_port.as_deref(), Some("8701"));
        assert!(bindings.contains_key("53/udp"));
        let labels = body.labels.expect("labels");
        assert_eq!(labels[MANAGED_LABEL], "true");
        assert_eq!(labels[HASH_LABEL], d.hash);
        assert_eq!(labels[Instance::LABEL], instance.id());
        assert_eq!(body.cmd, None, "an empty command keeps the image's");
    }

    #[test]
    fn grace_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(10)), 10);
        assert_eq!(whole_seconds(Duration::ZERO), 0);
    }
}
