//! What the docker tier wants, what Docker has, and what to do about the
//! difference: the desired container specs, their config hash, drift
//! detection, the start/restart plan, readiness of an inspected container and
//! the verdict on who holds a host port.
//!
//! Invariant: pure. Nothing here calls Docker, HTTP, the clock or the file
//! system; the driver observes, this module decides, the driver acts. Only
//! a container labelled with this cascade's instance ([`Owner::This`]) is
//! ever started, stopped, recreated or removed; a container of another
//! instance, or none, is refused and named. Every
//! plan line an operator reads (`cascade restart docker --dry-run`,
//! `cascade docker check`) is rendered here.
//!
//! Restart semantics (a choice, stated in the plan text): a non-forced
//! restart recreates what drifted, creates what is missing and starts what
//! is stopped, and keeps consistent running containers untouched so fixing
//! one container never bounces its healthy siblings. Only when *nothing*
//! needs fixing does a non-forced restart `docker restart` the consistent
//! containers (same container, same id), because the operator asked for a
//! restart and doing nothing would be a surprise. `force` recreates every
//! managed container.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::config::{ContainerConfig, HASH_LABEL, HealthcheckConfig, MANAGED_LABEL, PortMapping};
use crate::instance::{Instance, stable_hash};

// === desired ===

/// One service container as cascade wants it, with its ports parsed and its
/// config hash computed once.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub name: String,
    pub image: String,
    pub env: BTreeMap<String, String>,
    /// Sorted, so comparisons and the hash do not depend on config order.
    pub ports: Vec<PortMapping>,
    pub command: Vec<String>,
    /// The user's labels only; [`Desired::labels`] adds cascade's own.
    pub user_labels: BTreeMap<String, String>,
    pub healthcheck: Option<HealthcheckConfig>,
    pub pull: bool,
    pub health_path: String,
    pub stop_timeout: Duration,
    pub hash: String,
    /// The id of the cascade instance that wants it ([`Instance::LABEL`]).
    pub instance: String,
}

impl Desired {
    /// Fails only on a port the config validation should already have refused.
    pub fn from_config(c: &ContainerConfig, instance: &Instance) -> Result<Desired, String> {
        let mut ports = c
            .ports
            .iter()
            .map(|p| PortMapping::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("container {}: {e}", c.name))?;
        ports.sort();
        let mut desired = Desired {
            name: c.name.clone(),
            image: c.image.clone(),
            env: c.env.clone(),
            ports,
            command: c.command.clone(),
            user_labels: c.labels.clone(),
            healthcheck: c.healthcheck.clone(),
            pull: c.pull,
            health_path: c.health_path.clone(),
            stop_timeout: c.stop_timeout,
            hash: String::new(),
            instance: instance.id().to_owned(),
        };
        desired.hash = config_hash(&desired);
        Ok(desired)
    }

    /// All labels the container is created with: the user's, plus
    /// [`MANAGED_LABEL`], [`HASH_LABEL`] and [`Instance::LABEL`].
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.user_labels.clone();
        labels.insert(MANAGED_LABEL.into(), "true".into());
        labels.insert(HASH_LABEL.into(), self.hash.clone());
        labels.insert(Instance::LABEL.into(), self.instance.clone());
        labels
    }

    /// `http://127.0.0.1:{first host tcp port}{health_path}`, when both exist.
    pub fn health_url(&self) -> Option<String> {
        if self.health_path.is_empty() {
            return None;
        }
        let port = self.ports.iter().find(|p| !p.udp)?;
        Some(format!(
            "http://127.0.0.1:{}{}",
            port.host, self.health_path
        ))
    }
}

/// A stable hash of the settings a container is created with (image, env,
/// ports, command, labels, healthcheck): FNV-1a 64 over a length-prefixed
/// canonical text. `DefaultHasher` would change between Rust releases and
/// make every upgrade of cascade recreate every container.
pub fn config_hash(d: &Desired) -> String {
    let mut canon = String::new();
    let mut field = |tag: &str, value: &str| {
        canon.push_str(tag);
        canon.push(':');
        canon.push_str(&value.len().to_string());
        canon.push(':');
        canon.push_str(value);
        canon.push(';');
    };
    field("image", &d.image);
    for (k, v) in &d.env {
        field("env.key", k);
        field("env.value", v);
    }
    for p in &d.ports {
        field("port", &format_port(p));
    }
    for arg in &d.command {
        field("cmd", arg);
    }
    for (k, v) in &d.user_labels {
        field("label.key", k);
        field("label.value", v);
    }
    if let Some(h) = &d.healthcheck {
        for arg in &h.test {
            field("health.test", arg);
        }
        field("health.interval", &h.interval.as_nanos().to_string());
        field("health.timeout", &h.timeout.as_nanos().to_string());
        field("health.retries", &h.retries.to_string());
        field(
            "health.start_period",
            &h.start_period.as_nanos().to_string(),
        );
    }
    format!("{:016x}", stable_hash(canon.as_bytes()))
}

/// `8701:8080` or `5353:53/udp`.
pub fn format_port(p: &PortMapping) -> String {
    if p.udp {
        format!("{}:{}/udp", p.host, p.container)
    } else {
        format!("{}:{}", p.host, p.container)
    }
}

// === observed ===

/// Whether a container runs, as far as planning and probing care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Restarting,
    /// Created and never started.
    Created,
    Exited {
        code: i64,
    },
    Dead,
    /// Being removed (`docker rm -f`): as good as gone.
    Removing,
    Other(String),
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunState::Running => f.write_str("running"),
            RunState::Paused => f.write_str("paused"),
            RunState::Restarting => f.write_str("restarting"),
            RunState::Created => f.write_str("created"),
            RunState::Exited { code } => write!(f, "exited with code {code}"),
            RunState::Dead => f.write_str("dead"),
            RunState::Removing => f.write_str("being removed"),
            RunState::Other(s) => f.write_str(s),
        }
    }
}

/// Docker's health check status of a container that has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthState {
    Starting,
    Healthy,
    /// With the output of the last check, trimmed.
    Unhealthy {
        last_output: Option<String>,
    },
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthState::Starting => "starting",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy { .. } => "unhealthy",
        })
    }
}

/// Whose a container is, by its labels, seen from one cascade instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Labelled with this instance: cascade's to start, stop and replace.
    This,
    /// `cascade.managed=true` with another instance's label.
    Other(String),
    /// `cascade.managed=true` without an instance label: made by a cascade
    /// from before instance labels. Recreated (with the label) when its
    /// name is one this instance wants; otherwise left alone like a stranger's.
    Unlabelled,
    /// Not cascade's.
    Foreign,
}

impl Owner {
    /// From the `cascade.managed` and `cascade.instance` label values.
    pub fn of(managed: Option<&str>, instance: Option<&str>, ours: &str) -> Owner {
        match (managed == Some("true"), instance) {
            (false, _) => Owner::Foreign,
            (true, Some(id)) if id == ours => Owner::This,
            (true, Some(id)) => Owner::Other(id.to_owned()),
            (true, None) => Owner::Unlabelled,
        }
    }

    /// `not managed by cascade`, `managed by another cascade (instance …)`.
    pub fn describe(&self) -> String {
        match self {
            Owner::This => "managed by this cascade".into(),
            Owner::Other(id) => format!("managed by another cascade (instance {id})"),
            Owner::Unlabelled => "managed by a cascade that did not label its instance".into(),
            Owner::Foreign => "not managed by cascade".into(),
        }
    }
}

/// What Docker says about an existing container (only what planning and
/// probing need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub id: String,
    pub name: String,
    /// Carries `cascade.managed=true`.
    pub managed: bool,
    /// The `cascade.instance` label.
    pub instance: Option<String>,
    /// The `cascade.config-hash` label.
    pub hash: Option<String>,
    /// `Config.Image`: the reference it was created from.
    pub image: String,
    /// `Image`: the id of the image it runs.
    pub image_id: String,
    /// `Config.Env` (the image's environment merged with the container's).
    pub env: Vec<String>,
    /// `Config.Cmd`.
    pub cmd: Vec<String>,
    /// `HostConfig.PortBindings`, sorted.
    pub ports: Vec<PortMapping>,
    pub state: RunState,
    /// `None` when the container has no health check.
    pub health: Option<HealthState>,
    pub started_at: String,
}

impl Observed {
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }

    /// Whose it is, seen from the instance with id `ours`.
    pub fn owner(&self, ours: &str) -> Owner {
        let managed = self.managed.then_some("true");
        Owner::of(managed, self.instance.as_deref(), ours)
    }

    fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

/// What `inspect_image` says that planning needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub id: String,
    /// The image's default `Cmd`, which a container gets when `command` is empty.
    pub cmd: Vec<String>,
}

// === drift ===

/// Why an existing container no longer matches its config, one phrase per
/// difference (`env USER_ID differs (1000 → 1001)`); empty when consistent.
pub fn differences(d: &Desired, o: &Observed, image: Option<&ImageFacts>) -> Vec<String> {
    let mut diffs = Vec::new();
    if o.image != d.image {
        diffs.push(format!("image differs ({} → {})", o.image, d.image));
    } else if let Some(facts) = image
        && !o.image_id.is_empty()
        && o.image_id != facts.id
    {
        diffs.push(format!(
            "image {} was updated ({} → {})",
            d.image,
            short_digest(&o.image_id),
            short_digest(&facts.id)
        ));
    }
    for (key, want) in &d.env {
        match o.env_value(key) {
            Some(have) if have == want => {}
            Some(_) if is_secret(key) => diffs.push(format!("env {key} differs (values hidden)")),
            Some(have) => diffs.push(format!("env {key} differs ({have} → {want})")),
            None if is_secret(key) => diffs.push(format!("env {key} is not set")),
            None => diffs.push(format!("env {key} is not set (→ {want})")),
        }
    }
    if o.ports != d.ports {
        diffs.push(format!(
            "ports differ ({} → {})",
            format_ports(&o.ports),
            format_ports(&d.ports)
        ));
    }
    let want_cmd = if d.command.is_empty() {
        image.map(|facts| facts.cmd.as_slice())
    } else {
        Some(d.command.as_slice())
    };
    if let Some(want) = want_cmd
        && o.cmd != want
    {
        diffs.push(format!(
            "command differs ({} → {})",
            format_cmd(&o.cmd),
            format_cmd(want)
        ));
    }
    if o.managed && o.instance.is_none() {
        diffs.push(format!(
            "it has no {} label (made by an older cascade)",
            Instance::LABEL
        ));
    }
    if diffs.is_empty() {
        match &o.hash {
            Some(h) if *h == d.hash => {}
            Some(h) => diffs.push(format!(
                "settings differ (labels or healthcheck; config hash {h} → {})",
                d.hash
            )),
            None => diffs.push(format!("it has no {HASH_LABEL} label")),
        }
    }
    diffs
}

/// Env values whose name suggests a secret are not printed in plans or logs.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_uppercase();
    ["SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL"]
        .iter()
        .any(|word| key.contains(word))
}

fn short_digest(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

fn format_ports(ports: &[PortMapping]) -> String {
    if ports.is_empty() {
        return "none".into();
    }
    ports.iter().map(format_port).collect::<Vec<_>>().join(", ")
}

fn format_cmd(cmd: &[String]) -> String {
    if cmd.is_empty() {
        "image default".into()
    } else {
        format!("[{}]", cmd.join(" "))
    }
}

// === plan ===

/// Why the plan is being made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The start phase: adopt what is consistent, fix the rest.
    Start,
    /// `cascade restart docker`.
    Restart { force: bool },
}

/// What to do with one configured container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Consistent and running: leave it alone (adopted as is).
    Keep,
    /// Consistent and running: `docker restart` it (same container).
    Restart,
    /// Consistent but not running: `docker start` it.
    Start { was: RunState },
    /// No container of that name.
    Create,
    /// Remove it and create it again.
    Recreate { reason: Recreate },
    /// A container of that name exists and is not this cascade's: touch nothing.
    Refuse { image: String, owner: Owner },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recreate {
    Forced,
    Drift(Vec<String>),
    /// Paused or dead: recreating is simpler and surer than reviving it.
    Broken(RunState),
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub action: Action,
    /// The existing container's id, when there is one.
    pub id: Option<String>,
}

impl Step {
    /// What Docker calls act on: the inspected container's id, so a
    /// container that took the name meanwhile is never hit; the name only
    /// when nothing was there.
    pub fn target(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name;
        match &self.action {
            Action::Keep => write!(f, "keep {name} (consistent)"),
            Action::Restart => write!(
                f,
                "restart {name} (consistent; docker restart keeps the container, use force to recreate)"
            ),
            Action::Start { was } => write!(f, "start {name} (stopped; {was})"),
            Action::Create => write!(f, "create {name} (missing)"),
            Action::Recreate {
                reason: Recreate::Forced,
            } => write!(f, "recreate {name} (forced)"),
            Action::Recreate {
                reason: Recreate::Drift(diffs),
            } => write!(f, "recreate {name} because {}", diffs.join(", ")),
            Action::Recreate {
                reason: Recreate::Broken(state),
            } => write!(f, "recreate {name} because it is {state}"),
            Action::Refuse { image, owner } => write!(
                f,
                "refuse {name}: a container of that name exists (image {image}) and is {}",
                owner.describe()
            ),
        }
    }
}

/// The plan for every configured container, in config order. `observed[i]`
/// and `images[i]` belong to `desired[i]`.
pub fn plan(
    desired: &[Desired],
    observed: &[Option<Observed>],
    images: &[Option<ImageFacts>],
    mode: Mode,
) -> Vec<Step> {
    let force = matches!(mode, Mode::Restart { force: true });
    let mut steps: Vec<Step> = desired
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let o = observed.get(i).and_then(Option::as_ref);
            let image = images.get(i).and_then(Option::as_ref);
            Step {
                name: d.name.clone(),
                id: o.map(|o| o.id.clone()),
                action: action(d, o, image, force),
            }
        })
        .collect();
    if mode == (Mode::Restart { force: false }) && steps.iter().all(|s| s.action == Action::Keep) {
        for step in &mut steps {
            step.action = Action::Restart;
        }
    }
    steps
}

fn action(d: &Desired, o: Option<&Observed>, image: Option<&ImageFacts>, force: bool) -> Action {
    let Some(o) = o else {
        return Action::Create;
    };
    match o.owner(&d.instance) {
        Owner::This | Owner::Unlabelled => {}
        owner @ (Owner::Other(_) | Owner::Foreign) => {
            return Action::Refuse {
                image: o.image.clone(),
                owner,
            };
        }
    }
    if force {
        return Action::Recreate {
            reason: Recreate::Forced,
        };
    }
    let diffs = differences(d, o, image);
    if !diffs.is_empty() {
        return Action::Recreate {
            reason: Recreate::Drift(diffs),
        };
    }
    match &o.state {
        RunState::Running | RunState::Restarting => Action::Keep,
        RunState::Paused | RunState::Dead | RunState::Removing => Action::Recreate {
            reason: Recreate::Broken(o.state.clone()),
        },
        other => Action::Start { was: other.clone() },
    }
}

// === readiness ===

/// Where one inspected container stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Running, and healthy if it has a health check (the HTTP probe is separate).
    Ready,
    /// Should be serving and is not.
    Down(String),
    /// Nothing to probe yet: the start phase should act.
    Idle(String),
    /// Ran and is definitively gone (removed, exited, dead): not serving at
    /// once, no waiting for the breaker.
    Gone(String),
}

/// Readiness of container `name`; `ever_ran` says whether this driver has
/// seen it running (a container that vanished or exited after running is
/// gone, one never created is just not started yet).
pub fn readiness(d: &Desired, o: Option<&Observed>, ever_ran: bool) -> Readiness {
    let name = &d.name;
    let idle_or = |failed: fn(String) -> Readiness, text: String| {
        if ever_ran {
            failed(text)
        } else {
            Readiness::Idle(text)
        }
    };
    let Some(o) = o else {
        return idle_or(Readiness::Gone, format!("container {name} does not exist"));
    };
    match o.owner(&d.instance) {
        Owner::This | Owner::Unlabelled => {}
        owner @ (Owner::Other(_) | Owner::Foreign) => {
            return Readiness::Idle(format!(
                "container {name} exists (image {}) and is {}",
                o.image,
                owner.describe()
            ));
        }
    }
    match &o.state {
        RunState::Running => {}
        RunState::Restarting => {
            return Readiness::Down(format!("container {name} is restarting"));
        }
        state @ (RunState::Exited { .. } | RunState::Dead | RunState::Removing) => {
            return idle_or(
                Readiness::Gone,
                format!("container {name} is not running ({state})"),
            );
        }
        state => {
            return idle_or(
                Readiness::Down,
                format!("container {name} is not running ({state})"),
            );
        }
    }
    match &o.health {
        None | Some(HealthState::Healthy) => Readiness::Ready,
        Some(HealthState::Starting) => Readiness::Down(format!(
            "container {name} is starting (health check not passed yet)"
        )),
        Some(HealthState::Unhealthy { last_output }) => Readiness::Down(match last_output {
            Some(out) => format!("container unhealthy: {name}: Docker health check failing: {out}"),
            None => format!("container unhealthy: {name}: Docker health check failing"),
        }),
    }
}

// === port holders ===

/// A container that publishes a host port cascade wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortHolder {
    pub id: String,
    pub name: String,
    pub image: String,
    /// Its `cascade.managed` and `cascade.instance` labels.
    pub managed: bool,
    pub instance: Option<String>,
    pub running: bool,
}

impl PortHolder {
    pub fn owner(&self, ours: &str) -> Owner {
        let managed = self.managed.then_some("true");
        Owner::of(managed, self.instance.as_deref(), ours)
    }
}

/// What to do about one holder of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The container being replaced or started itself: not in the way.
    Own,
    /// This instance's, and not the container being kept: remove it.
    Stale,
    /// Not this instance's and running (a stranger's, or another
    /// cascade's): refuse, touch nothing.
    Foreign,
    /// Not this instance's and stopped: it holds nothing now; leave it be.
    Dormant,
}

/// The verdict on `holder` for instance `ours`, replacing `own_id`.
pub fn judge(holder: &PortHolder, own_id: Option<&str>, ours: &str) -> Verdict {
    if own_id == Some(holder.id.as_str()) {
        Verdict::Own
    } else if holder.owner(ours) == Owner::This {
        Verdict::Stale
    } else if holder.running {
        Verdict::Foreign
    } else {
        Verdict::Dormant
    }
}

/// Host ports bound by `HostConfig.PortBindings` (`{"8080/tcp": [{"HostPort": "8701"}]}`).
pub fn parse_bindings<'a>(
    bindings: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>,
) -> Vec<PortMapping> {
    let mut ports: Vec<PortMapping> = bindings
        .into_iter()
        .flat_map(|(key, hosts)| {
            let (container, proto) = key.split_once('/').unwrap_or((key, "tcp"));
            let container = container.parse::<u16>().ok();
            let udp = proto == "udp";
            hosts.into_iter().filter_map(move |host| {
                Some(PortMapping {
                    host: host.parse().ok()?,
                    container: container?,
                    udp,
                })
            })
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(env: &[(&str, &str)]) -> Desired {
        Desired::from_config(
            &ContainerConfig {
                name: "svc".into(),
                image: "demo:1".into(),
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ports: vec!["8701:8080".into()],
                ..ContainerConfig::default()
            },
            &me(),
        )
        .expect("valid")
    }

    fn me() -> Instance {
        Instance::from_state_dir(std::path::Path::new("/nonexistent/me"))
    }

    fn observed(d: &Desired) -> Observed {
        Observed {
            id: "0123456789abcdef".into(),
            name: d.name.clone(),
            managed: true,
            instance: Some(d.instance.clone()),
            hash: Some(d.hash.clone()),
            image: d.image.clone(),
            image_id: "sha256:aaaa".into(),
            env: std::iter::once("PATH=/bin".to_owned())
                .chain(d.env.iter().map(|(k, v)| format!("{k}={v}")))
                .collect(),
            cmd: Vec::new(),
            ports: d.ports.clone(),
            state: RunState::Running,
            health: Some(HealthState::Healthy),
            started_at: "t0".into(),
        }
    }

    fn facts() -> ImageFacts {
        ImageFacts {
            id: "sha256:aaaa".into(),
            cmd: Vec::new(),
        }
    }

    fn one(d: &Desired, o: Option<Observed>, mode: Mode) -> String {
        plan(std::slice::from_ref(d), &[o], &[Some(facts())], mode)[0].to_string()
    }

    #[test]
    fn the_hash_is_stable_and_order_independent() {
        let a = desired(&[("A", "1"), ("B", "2")]);
        let b = desired(&[("B", "2"), ("A", "1")]);
        assert_eq!(a.hash, b.hash);
        // Pinned: a change here recreates every container on upgrade.
        assert_eq!(a.hash, config_hash(&a));
        assert_eq!(a.hash.len(), 16);
        assert_ne!(a.hash, desired(&[("A", "1"), ("B", "3")]).hash);
    }

    #[test]
    fn the_hash_separates_fields() {
        let mut a = desired(&[]);
        a.command = vec!["ab".into()];
        let mut b = desired(&[]);
        b.command = vec!["a".into(), "b".into()];
        assert_ne!(config_hash(&a), config_hash(&b));
    }

    #[test]
    fn labels_add_cascades_own() {
        let d = desired(&[]);
        let labels = d.labels();
        assert_eq!(labels.get(MANAGED_LABEL).map(String::as_str), Some("true"));
        assert_eq!(labels.get(HASH_LABEL), Some(&d.hash));
        assert_eq!(
            labels.get(Instance::LABEL).map(String::as_str),
            Some(me().id())
        );
        assert_eq!(
            d.health_url().as_deref(),
            Some("http://127.0.0.1:8701/health")
        );
    }

    #[test]
    fn a_consistent_running_container_is_kept_on_start() {
        let d = desired(&[("USER_ID", "1000")]);
        assert_eq!(
            one(&d, Some(observed(&d)), Mode::Start),
            "keep svc (consistent)"
        );
    }

    #[test]
    fn an_env_change_names_the_variable_and_both_values() {
        let old = desired(&[("USER_ID", "1000")]);
        let new = desired(&[("USER_ID", "1001")]);
        assert_eq!(
            one(&new, Some(observed(&old)), Mode::Restart { force: false }),
            "recreate svc because env USER_ID differs (1000 → 1001)"
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let old = desired(&[("API_TOKEN", "s3cret")]);
        let new = desired(&[("API_TOKEN", "n3w")]);
        let line = one(&new, Some(observed(&old)), Mode::Start);
        assert_eq!(
            line,
            "recreate svc because env API_TOKEN differs (values hidden)"
        );
    }

    #[test]
    fn image_ports_and_command_drift_are_named() {
        let d = desired(&[]);
        let mut o = observed(&d);
        o.image = "demo:0".into();
        o.ports = vec![PortMapping {
            host: 9000,
            container: 8080,
            udp: false,
        }];
        o.cmd = vec!["--old".into()];
        let diffs = differences(&d, &o, Some(&facts()));
        assert_eq!(
            diffs,
            vec![
                "image differs (demo:0 → demo:1)".to_owned(),
                "ports differ (9000:8080 → 8701:8080)".to_owned(),
                "command differs ([--old] → image default)".to_owned(),
            ]
        );
    }

    #[test]
    fn a_rebuilt_image_is_drift() {
        let d = desired(&[]);
        let o = observed(&d);
        let newer = ImageFacts {
            id: "sha256:bbbbbbbbbbbbbbbbbb".into(),
            cmd: Vec::new(),
        };
        assert_eq!(
            differences(&d, &o, Some(&newer)),
            vec!["image demo:1 was updated (aaaa → bbbbbbbbbbbb)".to_owned()]
        );
    }

    #[test]
    fn only_the_hash_differing_is_still_drift() {
        let d = desired(&[]);
        let mut o = observed(&d);
        o.hash = Some("0000000000000000".into());
        let line = one(&d, Some(o.clone()), Mode::Start);
        assert!(
            line.starts_with("recreate svc because settings differ"),
            "{line}"
        );
        o.hash = None;
        let line = one(&d, Some(o), Mode::Start);
        assert_eq!(
            line,
            "recreate svc because it has no cascade.config-hash label"
        );
    }

    #[test]
    fn missing_stopped_foreign_and_paused_containers() {
        let d = desired(&[]);
        assert_eq!(one(&d, None, Mode::Start), "create svc (missing)");
        let mut o = observed(&d);
        o.state = RunState::Exited { code: 137 };
        assert_eq!(
            one(&d, Some(o.clone()), Mode::Start),
            "start svc (stopped; exited with code 137)"
        );
        o.state = RunState::Paused;
        assert_eq!(
            one(&d, Some(o.clone()), Mode::Start),
            "recreate svc because it is paused"
        );
        o.managed = false;
        assert!(
            one(&d, Some(o), Mode::Restart { force: true }).starts_with("refuse svc:"),
            "a foreign container is never recreated, even forced"
        );
    }

    #[test]
    fn force_recreates_consistent_containers() {
        let d = desired(&[]);
        assert_eq!(
            one(&d, Some(observed(&d)), Mode::Restart { force: true }),
            "recreate svc (forced)"
        );
    }

    #[test]
    fn a_plain_restart_restarts_only_when_nothing_drifted() {
        let a = desired(&[("USER_ID", "1000")]);
        let mut b = desired(&[]);
        b.name = "side".into();
        b.ports = vec![PortMapping {
            host: 8702,
            container: 8080,
            udp: false,
        }];
        b.hash = config_hash(&b);
        let images = [Some(facts()), Some(facts())];
        let both = [Some(observed(&a)), Some(observed(&b))];
        let lines: Vec<String> = plan(
            &[a.clone(), b.clone()],
            &both,
            &images,
            Mode::Restart { force: false },
        )
        .iter()
        .map(ToString::to_string)
        .collect();
        assert!(lines[0].starts_with("restart svc (consistent"), "{lines:?}");
        assert!(
            lines[1].starts_with("restart side (consistent"),
            "{lines:?}"
        );

        let changed = desired(&[("USER_ID", "1001")]);
        let steps = plan(
            &[changed, b],
            &both,
            &images,
            Mode::Restart { force: false },
        );
        assert!(matches!(steps[0].action, Action::Recreate { .. }));
        assert_eq!(steps[1].to_string(), "keep side (consistent)");
    }

    #[test]
    fn readiness_of_an_inspected_container() {
        let d = desired(&[]);
        let mut o = observed(&d);
        assert_eq!(readiness(&d, Some(&o), false), Readiness::Ready);
        o.health = None;
        assert_eq!(readiness(&d, Some(&o), false), Readiness::Ready);
        o.health = Some(HealthState::Unhealthy {
            last_output: Some("boom".into()),
        });
        assert_eq!(
            readiness(&d, Some(&o), true),
            Readiness::Down("container unhealthy: svc: Docker health check failing: boom".into())
        );
        o.state = RunState::Exited { code: 3 };
        assert_eq!(
            readiness(&d, Some(&o), true),
            Readiness::Gone("container svc is not running (exited with code 3)".into())
        );
        assert!(matches!(readiness(&d, Some(&o), false), Readiness::Idle(_)));
        o.state = RunState::Dead;
        assert!(matches!(readiness(&d, Some(&o), true), Readiness::Gone(_)));
        o.state = RunState::Removing;
        assert_eq!(
            readiness(&d, Some(&o), true),
            Readiness::Gone("container svc is not running (being removed)".into())
        );
        o.state = RunState::Paused;
        assert_eq!(
            readiness(&d, Some(&o), true),
            Readiness::Down("container svc is not running (paused)".into())
        );
        assert_eq!(
            readiness(&d, None, false),
            Readiness::Idle("container svc does not exist".into())
        );
        assert_eq!(
            readiness(&d, None, true),
            Readiness::Gone("container svc does not exist".into())
        );
    }

    #[test]
    fn port_holders_are_judged_by_ownership() {
        let ours = me();
        let ours = ours.id();
        let holder = |managed, instance: Option<&str>, running| PortHolder {
            id: "x".into(),
            name: "n".into(),
            image: "i".into(),
            managed,
            instance: instance.map(str::to_owned),
            running,
        };
        let mine = Some(ours);
        assert_eq!(
            judge(&holder(true, mine, true), Some("x"), ours),
            Verdict::Own
        );
        assert_eq!(
            judge(&holder(true, mine, true), Some("y"), ours),
            Verdict::Stale
        );
        assert_eq!(
            judge(&holder(true, mine, false), None, ours),
            Verdict::Stale
        );
        assert_eq!(
            judge(&holder(false, None, true), None, ours),
            Verdict::Foreign
        );
        assert_eq!(
            judge(&holder(false, None, false), None, ours),
            Verdict::Dormant
        );
        // Another cascade's container on the port is never this one's to
        // remove, running or not; nor is one that names no instance.
        let other = Some("0123456789ab");
        assert_eq!(
            judge(&holder(true, other, true), None, ours),
            Verdict::Foreign
        );
        assert_eq!(
            judge(&holder(true, other, false), None, ours),
            Verdict::Dormant
        );
        assert_eq!(
            judge(&holder(true, None, true), None, ours),
            Verdict::Foreign
        );
    }

    #[test]
    fn another_instances_container_of_the_same_name_is_refused_and_named() {
        let d = desired(&[]);
        let mut o = observed(&d);
        o.instance = Some("0123456789ab".into());
        for mode in [Mode::Start, Mode::Restart { force: true }] {
            assert_eq!(
                one(&d, Some(o.clone()), mode),
                "refuse svc: a container of that name exists (image demo:1) and is managed by another cascade (instance 0123456789ab)"
            );
        }
        assert_eq!(
            readiness(&d, Some(&o), true),
            Readiness::Idle(
                "container svc exists (image demo:1) and is managed by another cascade (instance 0123456789ab)"
                    .into()
            )
        );
    }

    #[test]
    fn an_unlabelled_managed_container_keeps_serving_and_a_restart_labels_it() {
        let d = desired(&[]);
        let mut o = observed(&d);
        o.instance = None;
        assert_eq!(readiness(&d, Some(&o), false), Readiness::Ready);
        assert_eq!(
            one(&d, Some(o), Mode::Restart { force: false }),
            "recreate svc because it has no cascade.instance label (made by an older cascade)"
        );
    }

    #[test]
    fn bindings_parse_into_sorted_mappings() {
        let ports = parse_bindings([
            ("8080/tcp", vec!["8701"]),
            ("53/udp", vec!["5353"]),
            ("9/tcp", vec![""]),
        ]);
        assert_eq!(
            ports,
            vec![
                PortMapping {
                    host: 5353,
                    container: 53,
                    udp: true
                },
                PortMapping {
                    host: 8701,
                    container: 8080,
                    udp: false
                },
            ]
        );
    }
}
