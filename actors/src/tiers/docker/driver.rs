//! The docker tier's [`Driver`]: the service as local containers that
//! cascade creates, adopts, recreates when their config drifts, and leaves
//! to Docker (or stops) when cascade exits.
//!
//! The driver observes through `client`, decides through `plan` and acts
//! through `client` again. Autoheal (healing containers that die or turn
//! unhealthy between probes) is a child of the root of its own; the driver
//! holds its handle only to announce its own stops.
//!
//! Invariants:
//! - `probe` never starts the daemon or any container. It asks Docker (one
//!   inspect per container, all within `ping_timeout`) and the service (one
//!   HTTP GET per container with a health endpoint, within `probe.timeout`)
//!   side by side. The service's own answer decides health; Docker decides
//!   existence: a container that ran and is removed, exited or dead is
//!   `Gone` at once. A Docker API that is slow or down while the service
//!   answers is `Degraded`, never a failure; with nothing answering, a
//!   daemon cascade cannot start (not responding, or not running with
//!   `daemon.start` off) is `PlatformDown`, so the start phase skips the tier.
//! - Nothing this cascade instance does not own is ever stopped, removed or
//!   recreated: a container without its `cascade.instance` label that is in
//!   the way (same name, same host port) — a stranger's or another
//!   cascade's — is an error naming it. Containers are inspected first and
//!   acted on by id, so a container that replaced an inspected one under the
//!   same name is never hit.
//! - Autoheal is told (`expect_stop`) before cascade itself stops, restarts,
//!   removes or recreates a managed container, so those are not healed.
//! - Start, restart and stop are serialized; `stop` first cancels a start or
//!   restart in flight, so shutdown never waits behind a health wait.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::client::Client;
use super::config::{DockerConfig, PortMapping};
use super::connect::{Connector, DockerEnv, DockerError};
use super::daemon::{self, DaemonError};
use super::plan::{
    self, Action, Desired, ImageFacts, Mode, Observed, Owner, Readiness, Recreate, RunState, Step,
    Verdict,
};
use crate::autoheal::AutohealHandle;
use crate::contract::{
    Driver, DriverEvent, EventSink, ProbeOutcome, RestartReport, RestartRequest, StopReason,
    TierError, TierId,
};
use crate::instance::Instance;
use crate::resilience::{Deadline, with_deadline};
use crate::tiers::ports::{self, Protocol};

/// Time between readiness checks while waiting for containers.
const READY_POLL: Duration = Duration::from_millis(250);
/// How long a just-freed host port may stay busy (docker-proxy exiting).
const PORT_RELEASE: Duration = Duration::from_secs(3);

/// Why a start or restart failed, with the container, image or port at fault.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("docker {error}{hint}")]
    DaemonDown {
        error: DockerError,
        /// Why cascade did not start it, when it could have.
        hint: &'static str,
    },
    #[error(
        "image {image} for container {container} is not present and pull is off; build or pull it first"
    )]
    ImageMissing { container: String, image: String },
    #[error(
        "container {container} exists (image {image}) and is {}; remove or rename it", owner.describe()
    )]
    NameTaken {
        container: String,
        image: String,
        owner: Owner,
    },
    #[error(
        "host port {port} for container {container} is published by container {holder} (image {image}), which is {}; leaving it alone", owner.describe()
    )]
    ForeignContainer {
        port: String,
        container: String,
        holder: String,
        image: String,
        owner: Owner,
    },
    #[error("host port {port} for container {container} is in use outside Docker{}: {cause}", owner.as_ref().map(|o| format!(" by {o}")).unwrap_or_default())]
    PortInUse {
        port: String,
        container: String,
        owner: Option<String>,
        cause: String,
    },
    #[error("container {container} stopped while starting ({state})")]
    Died { container: String, state: RunState },
    #[error("containers not ready after {}: {last}", crate::text::duration(*after))]
    NotReady { after: Duration, last: String },
    #[error("{0} was cancelled (the tier is stopping)")]
    Cancelled(&'static str),
}

impl From<LifecycleError> for TierError {
    fn from(e: LifecycleError) -> Self {
        TierError::new(e.to_string())
    }
}

/// What the last look at each container showed, for [`Driver::details`].
#[derive(Debug, Default)]
struct View {
    containers: BTreeMap<String, Seen>,
    /// Containers this driver has seen running or has started: if one of them
    /// stops or vanishes, it is gone, whereas one never seen is simply not
    /// started yet (Idle).
    ran: BTreeSet<String>,
    /// Containers the last probe that reached Docker found ready (and
    /// answering their health endpoint): what a probe assumes of a container
    /// without a health endpoint while Docker does not answer.
    ready: BTreeSet<String>,
}

#[derive(Debug, Clone)]
enum Seen {
    Missing,
    Present {
        id: String,
        state: String,
        health: String,
    },
}

pub struct DockerDriver {
    config: DockerConfig,
    /// Whose containers this driver may touch: only those labelled with it.
    instance: Instance,
    desired: Vec<Desired>,
    client: Client,
    /// The process's autoheal, when it runs; told before cascade stops a
    /// container itself.
    autoheal: Option<AutohealHandle>,
    /// Serializes start, restart and stop.
    lifecycle: tokio::sync::Mutex<()>,
    /// Parent of the tokens of every start and restart in flight; `stop`
    /// cancels it (all of them, including one still waiting for the lock)
    /// and puts a fresh one in its place.
    in_flight: Mutex<CancellationToken>,
    view: Mutex<View>,
    /// Autoheal's tasks; cancelled when the driver is dropped.
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl DockerDriver {
    /// Builds the driver. Must run inside a tokio runtime.
    pub fn new(
        config: DockerConfig,
        env: &DockerEnv,
        instance: Instance,
        events: EventSink,
        autoheal: Option<AutohealHandle>,
    ) -> Result<DockerDriver, TierError> {
        let desired = config
            .containers
            .iter()
            .map(|c| Desired::from_config(c, &instance))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TierError::new)?;
        let connector = Connector::new(&config, env);
        let client = Client::new(connector.clone()).map_err(TierError::new)?;
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        if let Some(mut heals) = autoheal.clone() {
            // A heal of one of the service's containers is worth probing now.
            let stop = cancel.clone();
            tasks.spawn(async move {
                let mut seen = heals.summary().heals;
                while stop.run_until_cancelled(heals.changed()).await == Some(true) {
                    let now = heals.summary().heals;
                    if now != seen {
                        seen = now;
                        let note = "autoheal restarted a container".to_owned();
                        events.emit(DriverEvent::Changed { note });
                    }
                }
            });
        }
        Ok(DockerDriver {
            in_flight: Mutex::new(cancel.child_token()),
            config,
            instance,
            desired,
            client,
            autoheal,
            lifecycle: tokio::sync::Mutex::new(()),
            view: Mutex::new(View::default()),
            tasks,
            cancel,
        })
    }

    fn expect_stop(&self, container: &str) {
        if let Some(autoheal) = &self.autoheal {
            autoheal.expect_stop(container);
        }
    }

    /// The token of a new start or restart; `stop` cancels it.
    fn begin(&self) -> CancellationToken {
        match self.in_flight.lock() {
            Ok(generation) => generation.child_token(),
            Err(_) => self.cancel.child_token(),
        }
    }

    /// Cancels every start and restart in flight; later ones run normally.
    fn cancel_in_flight(&self) {
        if let Ok(mut generation) = self.in_flight.lock() {
            let old = std::mem::replace(&mut *generation, self.cancel.child_token());
            old.cancel();
        }
    }

    // === observing ===

    async fn observe(&self, within: Duration) -> Result<Vec<Option<Observed>>, DockerError> {
        let mut observed = Vec::with_capacity(self.desired.len());
        for d in &self.desired {
            observed.push(self.client.inspect_container(&d.name, within).await?);
        }
        self.record(&observed);
        Ok(observed)
    }

    /// Remembers what was seen, for `details` and for Idle-versus-Down.
    fn record(&self, observed: &[Option<Observed>]) {
        let Ok(mut view) = self.view.lock() else {
            return;
        };
        for (d, o) in self.desired.iter().zip(observed) {
            let seen = match o {
                None => Seen::Missing,
                Some(o) => {
                    let ours = matches!(o.owner(&d.instance), Owner::This | Owner::Unlabelled);
                    if o.state == RunState::Running && ours {
                        view.ran.insert(d.name.clone());
                    }
                    Seen::Present {
                        id: o.short_id().to_owned(),
                        state: o.state.to_string(),
                        health: o
                            .health
                            .as_ref()
                            .map_or_else(|| "none".to_owned(), ToString::to_string),
                    }
                }
            };
            view.containers.insert(d.name.clone(), seen);
        }
    }

    fn ever_ran(&self, name: &str) -> bool {
        self.view
            .lock()
            .map(|v| v.ran.contains(name))
            .unwrap_or(false)
    }

    fn mark_ran(&self, name: &str) {
        if let Ok(mut view) = self.view.lock() {
            view.ran.insert(name.to_owned());
        }
    }

    // === the daemon and images ===

    /// The daemon answers, starting it first when it is not running and
    /// `daemon.start` allows.
    async fn ensure_daemon(&self) -> Result<(), LifecycleError> {
        match self.client.ping(self.config.ping_timeout).await {
            Ok(()) => Ok(()),
            Err(e @ DockerError::NotRunning { .. }) if self.config.daemon.start => {
                info!(error = %e, "Docker daemon not running; starting it.");
                daemon::start(&self.config.daemon, self.client.connector()).await?;
                Ok(())
            }
            Err(e) if e.is_daemon_down() => {
                let hint = match &e {
                    DockerError::NotRunning { .. } => {
                        " (daemon.start is off, so cascade does not start it)"
                    }
                    _ => "",
                };
                Err(LifecycleError::DaemonDown { error: e, hint })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Each container's image facts, pulling a missing image when its `pull`
    /// is on (bounded by `start_timeout`) and failing, with the image's name,
    /// when it is off. Pulls are recorded in `plan`.
    async fn ensure_images(
        &self,
        plan: &mut Vec<String>,
    ) -> Result<Vec<ImageFacts>, LifecycleError> {
        let mut images = Vec::with_capacity(self.desired.len());
        for d in &self.desired {
            if let Some(facts) = self.client.inspect_image(&d.image).await? {
                images.push(facts);
                continue;
            }
            if !d.pull {
                return Err(LifecycleError::ImageMissing {
                    container: d.name.clone(),
                    image: d.image.clone(),
                });
            }
            info!(container = %d.name, image = %d.image, "Pulling missing image.");
            plan.push(format!("pull {} (missing)", d.image));
            self.client
                .pull_image(&d.image, self.config.start_timeout)
                .await?;
            let facts = self.client.inspect_image(&d.image).await?.ok_or_else(|| {
                LifecycleError::ImageMissing {
                    container: d.name.clone(),
                    image: d.image.clone(),
                }
            })?;
            images.push(facts);
        }
        Ok(images)
    }

    /// Image facts without pulling, and the plan lines a dry run shows for
    /// missing images.
    async fn peek_images(
        &self,
        plan: &mut Vec<String>,
    ) -> Result<Vec<Option<ImageFacts>>, DockerError> {
        let mut images = Vec::with_capacity(self.desired.len());
        for d in &self.desired {
            let facts = self.client.inspect_image(&d.image).await?;
            if facts.is_none() {
                plan.push(if d.pull {
                    format!("pull {} (missing)", d.image)
                } else {
                    format!(
                        "cannot create {}: image {} is missing and pull is off",
                        d.name, d.image
                    )
                });
            }
            images.push(facts);
        }
        Ok(images)
    }

    // === acting ===

    /// Carries out the plan in config order, appending what it did beyond
    /// the plan (stale containers removed) to `lines`.
    async fn execute(&self, steps: &[Step], lines: &mut Vec<String>) -> Result<(), LifecycleError> {
        for (d, step) in self.desired.iter().zip(steps) {
            info!(container = %d.name, step = %step, "Applying plan step.");
            match &step.action {
                Action::Keep => {}
                Action::Refuse { image, owner } => {
                    return Err(LifecycleError::NameTaken {
                        container: d.name.clone(),
                        image: image.clone(),
                        owner: owner.clone(),
                    });
                }
                Action::Restart => {
                    self.expect_stop(&d.name);
                    self.client
                        .restart_container(step.target(), d.stop_timeout)
                        .await?;
                }
                Action::Start { .. } => {
                    self.clear_holders(d, step.id.as_deref(), lines).await?;
                    self.wait_ports_free(d).await?;
                    self.client.start_container(step.target()).await?;
                }
                Action::Create => {
                    self.clear_holders(d, None, lines).await?;
                    self.wait_ports_free(d).await?;
                    self.create_and_start(d).await?;
                }
                Action::Recreate { reason } => {
                    self.clear_holders(d, step.id.as_deref(), lines).await?;
                    self.expect_stop(&d.name);
                    // A forced restart does not wait politely: removal kills;
                    // a container being removed has nothing left to stop.
                    if !matches!(
                        reason,
                        Recreate::Forced | Recreate::Broken(RunState::Removing)
                    ) {
                        self.client
                            .stop_container(step.target(), d.stop_timeout)
                            .await?;
                    }
                    self.client.remove_container(step.target()).await?;
                    self.wait_ports_free(d).await?;
                    self.create_and_start(d).await?;
                }
            }
            if step.action != Action::Keep {
                self.mark_ran(&d.name);
            }
        }
        Ok(())
    }

    async fn create_and_start(&self, d: &Desired) -> Result<(), LifecycleError> {
        let id = self.client.create_container(d).await?;
        info!(container = %d.name, id = %id.get(..12).unwrap_or(&id), image = %d.image, hash = %d.hash, instance = %d.instance, "Container created.");
        self.client.start_container(&id).await?;
        Ok(())
    }

    /// For each host port of `d`: removes stale containers of this instance
    /// that publish it and refuses if a running container it does not own
    /// (a stranger's, another cascade's) does. `own` (the container being
    /// started or replaced) is not in the way.
    async fn clear_holders(
        &self,
        d: &Desired,
        own: Option<&str>,
        lines: &mut Vec<String>,
    ) -> Result<(), LifecycleError> {
        let mut stale = Vec::new();
        for port in &d.ports {
            for h in self.client.port_holders(*port, &d.instance).await? {
                match plan::judge(&h, own, &d.instance) {
                    // Refuse before removing anything, so a refusal changes nothing.
                    Verdict::Foreign => {
                        let owner = h.owner(&d.instance);
                        warn!(container = %d.name, port = %plan::format_port(port), holder = %h.name, image = %h.image, owner = %owner.describe(), "Host port held by a container this cascade does not own.");
                        return Err(LifecycleError::ForeignContainer {
                            port: plan::format_port(port),
                            container: d.name.clone(),
                            holder: h.name,
                            image: h.image,
                            owner,
                        });
                    }
                    Verdict::Stale => stale.push((*port, h)),
                    Verdict::Own | Verdict::Dormant => {}
                }
            }
        }
        for (port, h) in stale {
            info!(container = %d.name, port = %plan::format_port(&port), stale = %h.name, id = %h.id, "Removing a stale container of this cascade that holds the port.");
            self.expect_stop(&h.name);
            self.client.remove_container(&h.id).await?;
            lines.push(format!(
                "remove {} (stale, made by this cascade, publishes host port {})",
                h.name, port.host
            ));
        }
        Ok(())
    }

    /// Every host port of `d` can be bound on loopback, waiting briefly for a
    /// port a just-removed container still holds.
    async fn wait_ports_free(&self, d: &Desired) -> Result<(), LifecycleError> {
        for port in &d.ports {
            let deadline = Deadline::after(Instant::now(), PORT_RELEASE);
            while let Some(e) = ports::bind_error(port.host, Protocol::udp(port.udp)) {
                if deadline.is_expired(Instant::now()) {
                    return Err(port_in_use(d, *port, &e).await);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Read-only port findings for a dry run.
    async fn peek_ports(&self, steps: &[Step], lines: &mut Vec<String>) -> Result<(), DockerError> {
        for (d, step) in self.desired.iter().zip(steps) {
            let binds = matches!(
                step.action,
                Action::Create | Action::Recreate { .. } | Action::Start { .. }
            );
            if !binds {
                continue;
            }
            for port in &d.ports {
                let holders = self.client.port_holders(*port, &d.instance).await?;
                let mut held_by_docker = false;
                for h in &holders {
                    match plan::judge(h, step.id.as_deref(), &d.instance) {
                        Verdict::Stale => lines.push(format!(
                            "remove {} (stale, made by this cascade, publishes host port {})",
                            h.name, port.host
                        )),
                        Verdict::Foreign => lines.push(format!(
                            "cannot create {}: host port {} is published by container {} (image {}), which is {}",
                            d.name,
                            port.host,
                            h.name,
                            h.image,
                            h.owner(&d.instance).describe()
                        )),
                        Verdict::Own | Verdict::Dormant => {}
                    }
                    held_by_docker |= h.running;
                }
                if !held_by_docker
                    && let Some(e) = ports::bind_error(port.host, Protocol::udp(port.udp))
                {
                    lines.push(format!(
                        "cannot create {}: {}",
                        d.name,
                        port_in_use(d, *port, &e).await
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until every container is running, healthy by Docker's check (if
    /// it has one) and answering its HTTP health endpoint (if it has one).
    async fn wait_ready(&self, deadline: Deadline) -> Result<(), LifecycleError> {
        let timeout = self.config.probe.timeout;
        loop {
            let observed = self.observe(self.config.call_timeout).await?;
            let mut pending = None;
            for (d, o) in self.desired.iter().zip(&observed) {
                if let Some(o) = o
                    && matches!(
                        o.state,
                        RunState::Exited { .. } | RunState::Dead | RunState::Removing
                    )
                {
                    return Err(LifecycleError::Died {
                        container: d.name.clone(),
                        state: o.state.clone(),
                    });
                }
                match plan::readiness(d, o.as_ref(), true) {
                    Readiness::Ready => {
                        if let Some(url) = d.health_url()
                            && let Err(e) = self.client.health(&url, timeout).await
                        {
                            pending = Some(format!("container {}: {e}", d.name));
                        }
                    }
                    Readiness::Down(why) | Readiness::Idle(why) | Readiness::Gone(why) => {
                        pending = Some(why)
                    }
                }
                if pending.is_some() {
                    break;
                }
            }
            let Some(last) = pending else {
                info!(containers = self.desired.len(), "Containers ready.");
                return Ok(());
            };
            if deadline.is_expired(Instant::now()) {
                return Err(LifecycleError::NotReady {
                    after: deadline.budget(),
                    last,
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The start's own deadline, a little inside the tier's `start_timeout`
    /// so the error says what was still not ready.
    fn ready_deadline(&self, started: Instant) -> Deadline {
        let budget = self.config.start_timeout;
        let margin = (budget / 10).min(Duration::from_secs(1));
        Deadline::after(started, budget.saturating_sub(margin))
    }

    async fn start_inner(&self) -> Result<(), LifecycleError> {
        let _serial = self.lifecycle.lock().await;
        let started = Instant::now();
        self.ensure_daemon().await?;
        let mut lines = Vec::new();
        let images = self.ensure_images(&mut lines).await?;
        let observed = self.observe(self.config.call_timeout).await?;
        let images: Vec<Option<ImageFacts>> = images.into_iter().map(Some).collect();
        let steps = plan::plan(&self.desired, &observed, &images, Mode::Start);
        self.execute(&steps, &mut lines).await?;
        self.wait_ready(self.ready_deadline(started)).await
    }

    async fn restart_inner(
        &self,
        request: RestartRequest,
    ) -> Result<RestartReport, LifecycleError> {
        // A dry run changes nothing, so it never waits behind a start or
        // restart in flight (which may wait minutes for health).
        let _serial = if request.dry_run {
            None
        } else {
            Some(self.lifecycle.lock().await)
        };
        let started = Instant::now();
        if let Err(e) = self.client.ping(self.config.ping_timeout).await {
            return Err(e.into());
        }
        let mut lines = Vec::new();
        let images = if request.dry_run {
            self.peek_images(&mut lines).await?
        } else {
            self.ensure_images(&mut lines)
                .await?
                .into_iter()
                .map(Some)
                .collect()
        };
        let observed = self.observe(self.config.call_timeout).await?;
        let mode = Mode::Restart {
            force: request.force,
        };
        let steps = plan::plan(&self.desired, &observed, &images, mode);
        lines.extend(steps.iter().map(ToString::to_string));
        if request.dry_run {
            self.peek_ports(&steps, &mut lines).await?;
        } else {
            self.execute(&steps, &mut lines).await?;
            self.wait_ready(self.ready_deadline(started)).await?;
        }
        Ok(RestartReport {
            tier: TierId::Docker,
            dry_run: request.dry_run,
            plan: lines,
        })
    }

    async fn stop_inner(&self) -> Result<(), TierError> {
        let names: Vec<&str> = self.desired.iter().map(|d| d.name.as_str()).collect();
        if !self.config.stop_on_exit {
            info!(containers = %names.join(", "), "Leaving the service containers to Docker (stop_on_exit is off); the next start adopts them.");
            return Ok(());
        }
        // All at once: each may take its stop_timeout, and together they
        // must fit the tier's stop grace.
        let stops = self.desired.iter().map(|d| self.stop_own(d));
        let failed: Vec<String> = futures_util::future::join_all(stops)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if let Ok(mut view) = self.view.lock() {
            view.ran.clear();
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(TierError::new(format!(
                "stopping containers failed: {}",
                failed.join("; ")
            )))
        }
    }

    /// Stops `d`'s container if it is this instance's: inspected first (a
    /// stranger's container of the same name is left alone) and stopped by
    /// id (so a container that took the name meanwhile is not hit).
    async fn stop_own(&self, d: &Desired) -> Result<(), String> {
        let failed = |e: DockerError| {
            warn!(container = %d.name, error = %e, "Stopping container failed.");
            format!("{}: {e}", d.name)
        };
        let found = self
            .client
            .inspect_container(&d.name, self.config.call_timeout)
            .await
            .map_err(failed)?;
        let Some(o) = found else {
            return Ok(());
        };
        let owner = o.owner(self.instance.id());
        if owner != Owner::This {
            info!(container = %d.name, id = %o.short_id(), owner = %owner.describe(), "Not stopping a container this cascade does not own.");
            return Ok(());
        }
        self.expect_stop(&d.name);
        self.client
            .stop_container(&o.id, d.stop_timeout)
            .await
            .map_err(failed)?;
        info!(container = %d.name, id = %o.short_id(), "Container stopped.");
        Ok(())
    }

    /// The probe proper, inside `budget`: Docker's view of the containers
    /// and the service's health endpoints, asked at once.
    async fn probe_within(&self, budget: Deadline) -> ProbeOutcome {
        if !self.client.installed() {
            let socket = self.client.connector().host().to_string();
            return ProbeOutcome::Unavailable {
                reason: DockerError::NotInstalled { socket }.to_string(),
            };
        }
        let now = Instant::now();
        let docker_within = budget.attempt_timeout(now, self.config.ping_timeout);
        let health_within = budget.attempt_timeout(now, self.config.probe.timeout);
        let (docker, service) =
            tokio::join!(self.look(docker_within), self.service_health(health_within));
        match docker {
            Ok(observed) => self.judge(&observed, &service),
            Err(e) => self.judge_without_docker(e, &service),
        }
    }

    /// Every container inspected at once, all within `within`.
    async fn look(&self, within: Duration) -> Result<Vec<Option<Observed>>, DockerError> {
        let inspects = self
            .desired
            .iter()
            .map(|d| self.client.inspect_container(&d.name, within));
        let Ok(results) = with_deadline(within, "inspecting containers", join_all(inspects)).await
        else {
            let error = DockerError::NotResponding {
                what: "inspecting containers".into(),
                after: within,
            };
            self.client.connector().went_down(&error);
            return Err(error);
        };
        let observed = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.record(&observed);
        Ok(observed)
    }

    /// Each container's health endpoint, all at once; `None` for a container
    /// without one.
    async fn service_health(&self, within: Duration) -> Vec<Option<Result<(), String>>> {
        let checks = self.desired.iter().map(|d| async move {
            let url = d.health_url()?;
            Some(self.client.health(&url, within).await)
        });
        join_all(checks).await
    }

    /// Docker answered: it decides whether the containers exist and run,
    /// the service's health endpoints whether they serve.
    fn judge(
        &self,
        observed: &[Option<Observed>],
        service: &[Option<Result<(), String>>],
    ) -> ProbeOutcome {
        let verdicts: Vec<Readiness> = self
            .desired
            .iter()
            .zip(observed)
            .map(|(d, o)| plan::readiness(d, o.as_ref(), self.ever_ran(&d.name)))
            .collect();
        let ready = self
            .desired
            .iter()
            .zip(&verdicts)
            .zip(service)
            .filter(|((_, v), h)| **v == Readiness::Ready && !matches!(h, Some(Err(_))))
            .map(|((d, _), _)| d.name.clone());
        if let Ok(mut view) = self.view.lock() {
            view.ready = ready.collect();
        }
        let mut down = None;
        let mut idle = None;
        for verdict in verdicts {
            match verdict {
                Readiness::Ready => {}
                Readiness::Gone(reason) => return ProbeOutcome::Gone { reason },
                Readiness::Down(error) => {
                    down.get_or_insert(error);
                }
                Readiness::Idle(reason) => {
                    idle.get_or_insert(reason);
                }
            }
        }
        if let Some(error) = down {
            return ProbeOutcome::Down { error };
        }
        if let Some(reason) = idle {
            return ProbeOutcome::Idle { reason };
        }
        for (d, health) in self.desired.iter().zip(service) {
            if let Some(Err(e)) = health {
                return ProbeOutcome::Down {
                    error: format!("container unhealthy: {}: {e}", d.name),
                };
            }
        }
        let mut note = match self.desired.len() {
            1 => "ready (daemon running, container healthy)".to_owned(),
            n => format!("ready (daemon running, {n} containers healthy)"),
        };
        let drifted: Vec<&str> = self
            .desired
            .iter()
            .zip(observed)
            .filter(|(d, o)| {
                o.as_ref()
                    .is_some_and(|o| o.hash.as_deref() != Some(&d.hash))
            })
            .map(|(d, _)| d.name.as_str())
            .collect();
        if !drifted.is_empty() {
            note.push_str(&format!(
                "; config changed for {} (a restart applies it)",
                drifted.join(", ")
            ));
        }
        ProbeOutcome::Up { note }
    }

    /// Docker did not answer (`error`): the service's own health endpoints
    /// decide. Serving, the tier is degraded; not serving, the daemon's state
    /// says whether the start phase can do anything about it.
    fn judge_without_docker(
        &self,
        error: DockerError,
        service: &[Option<Result<(), String>>],
    ) -> ProbeOutcome {
        let was_ready = |name: &str| {
            self.view
                .lock()
                .map(|v| v.ready.contains(name))
                .unwrap_or(false)
        };
        let failing = self
            .desired
            .iter()
            .zip(service)
            .find_map(|(d, health)| match health {
                Some(Ok(())) => None,
                Some(Err(e)) => Some(format!("container {} does not answer: {e}", d.name)),
                None if was_ready(&d.name) => None,
                None => Some(format!(
                    "container {} has no health endpoint and Docker cannot say",
                    d.name
                )),
            });
        let Some(failing) = failing else {
            return ProbeOutcome::Degraded {
                note: format!("serving (the service answers), but Docker does not: {error}"),
            };
        };
        daemon_outcome(error, self.config.daemon.start, &failing)
    }
}

/// A Docker failure while the service does not answer (`failing` says how),
/// as a probe outcome. Not installed needs an operator (Unavailable). A
/// daemon that does not respond, or is not running while `daemon.start` is
/// off, is the platform down: a failure like Down, and the start phase skips
/// the tier, since a start could only wait out its deadline. A daemon
/// cascade may start, or a request the daemon refused, is Down.
pub(super) fn daemon_outcome(e: DockerError, may_start: bool, failing: &str) -> ProbeOutcome {
    match e {
        DockerError::NotInstalled { .. } => ProbeOutcome::Unavailable {
            reason: e.to_string(),
        },
        DockerError::NotRunning { .. } if may_start => ProbeOutcome::Down {
            error: format!("{e}; the start phase may start it"),
        },
        DockerError::NotRunning { .. } => ProbeOutcome::PlatformDown {
            error: format!("{e}; daemon.start is off, so cascade does not start it ({failing})"),
        },
        DockerError::NotResponding { .. } => ProbeOutcome::PlatformDown {
            error: format!("{e} ({failing})"),
        },
        e => ProbeOutcome::Down {
            error: format!("{failing}; docker: {e}"),
        },
    }
}

/// How long naming the process that holds a port may take.
const OWNER_LOOKUP: Duration = Duration::from_secs(2);

async fn port_in_use(d: &Desired, port: PortMapping, cause: &std::io::Error) -> LifecycleError {
    let owner = ports::owner(port.host, Protocol::udp(port.udp), OWNER_LOOKUP).await;
    LifecycleError::PortInUse {
        port: plan::format_port(&port),
        container: d.name.clone(),
        owner: owner.map(|o| o.to_string()),
        cause: cause.to_string(),
    }
}

#[async_trait]
impl Driver for DockerDriver {
    fn endpoint(&self) -> Option<String> {
        self.config.endpoint()
    }

    /// Starting means creating containers; the daemon start is a further
    /// opt-in inside `start`.
    fn startable(&self) -> bool {
        !self.desired.is_empty()
    }

    async fn probe(&self) -> ProbeOutcome {
        // Inside the tier's probe deadline (`DockerConfig::probe_deadline`),
        // so a slow daemon is reported as such rather than as a generic
        // probe timeout.
        let budget = self.config.probe_budget();
        self.probe_within(Deadline::after(Instant::now(), budget))
            .await
    }

    async fn start(&self) -> Result<(), TierError> {
        let token = self.begin();
        match token.run_until_cancelled(self.start_inner()).await {
            Some(result) => result.map_err(|e| {
                warn!(error = %e, "Docker tier start failed.");
                e.into()
            }),
            None => Err(LifecycleError::Cancelled("start").into()),
        }
    }

    async fn stop(&self, reason: StopReason) -> Result<(), TierError> {
        self.cancel_in_flight();
        let _serial = self.lifecycle.lock().await;
        if reason == StopReason::Replaced {
            // The tier's new actor adopts the containers (and recreates any
            // whose configuration drifted): `stop_on_exit` is for cascade
            // exiting, not for a reload.
            let names: Vec<&str> = self.desired.iter().map(|d| d.name.as_str()).collect();
            info!(containers = %names.join(", "), "Leaving the service containers to the tier's new actor.");
            return Ok(());
        }
        self.stop_inner().await
    }

    async fn restart(&self, request: RestartRequest) -> Result<RestartReport, TierError> {
        let token = self.begin();
        match token.run_until_cancelled(self.restart_inner(request)).await {
            Some(result) => result.map_err(Into::into),
            None => Err(LifecycleError::Cancelled("restart").into()),
        }
    }

    fn details(&self) -> BTreeMap<String, String> {
        let mut details = BTreeMap::new();
        details.insert("host".into(), self.client.connector().host().to_string());
        if let Ok(view) = self.view.lock() {
            for (name, seen) in &view.containers {
                match seen {
                    Seen::Missing => {
                        details.insert(format!("container.{name}.state"), "missing".into());
                    }
                    Seen::Present { id, state, health } => {
                        details.insert(format!("container.{name}.id"), id.clone());
                        details.insert(format!("container.{name}.state"), state.clone());
                        details.insert(format!("container.{name}.health"), health.clone());
                    }
                }
            }
        }
        details
    }
}

impl Drop for DockerDriver {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tasks.close();
    }
}
