//! The `cloud_run` tier: a Cloud Run service cascade probes but never runs.
//!
//! Cloud Run starts, scales and restarts the service by itself, so this tier
//! is not startable: its driver only answers "is the service serving?". A
//! probe is one GET of the health path carrying an ID token for the service
//! (private services reject anything else), with a longer timeout until the
//! first success, because a service scaled to zero answers its first request
//! only after a cold start. Optionally the Admin API's `services.get` is
//! consulted too: a service whose Ready condition failed is Unavailable with
//! Cloud Run's own message, which says more than a failing health check.
//!
//! Files: `mod.rs` (configuration, the driver, mapping answers to probe
//! outcomes), `auth.rs` (where ID tokens come from, how long they are kept),
//! `admin.rs` (the Admin API check, one request in flight that outlives a
//! probe), `client.rs` (the only file doing I/O: HTTP, the key file, the
//! Admin API).
//!
//! Invariants: a credential (ID token, access token, private key) never
//! appears in a log line, an error, a probe outcome or the status details; a
//! token failure is reported as `ID token: ...`, never as the service being
//! down. The probe path reuses one pooled HTTP client and a cached token, so a
//! probe costs one request and no token work between refreshes. A hanging
//! Admin API or token source cannot starve the health GET: a probe waits for
//! the Admin API's answer at most a third of its time (the check itself goes
//! on, up to `admin.timeout`, for the next probes) and for refreshing a
//! still-valid token a quarter (only a probe with no valid token waits longer
//! for one). A 401 from the service drops the cached token.

mod admin;
mod auth;
mod client;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::contract::{
    Driver, DriverFactory, EventSink, ProbeOutcome, RestartReport, RestartRequest, StopReason,
    TierError, TierId,
};
use crate::resilience::{BreakerConfig, Deadline};
use crate::tier::{ProbeConfig, TierSpec};

pub use crate::tiers::gcp::GcpEnv;
use crate::tiers::gcp::{credential_url_problem, parse_retry_after};

use crate::routing::{RequestAuth, RouteInfo};

use admin::AdminCheck;
use auth::{IdTokens, RequestTokens};
use client::{AdminApi, Answer, Readiness};

/// A probe waits for the Admin API's answer at most this share (1/N) of its budget ...
const ADMIN_SHARE: u32 = 3;
/// ... and refreshing a still-valid token this share, so a hanging Admin API
/// or token source leaves the health GET at least 5/12 of it.
const REFRESH_SHARE: u32 = 4;

/// `[tiers.cloud_run]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudRunConfig {
    /// The service's URL, e.g. `https://ecapa-abc123-ew.a.run.app`.
    pub url: String,
    pub health_path: String,
    /// The ID token's audience; the service URL when unset.
    pub audience: Option<String>,
    pub auth: AuthMode,
    /// A service-account key; else `GOOGLE_APPLICATION_CREDENTIALS`, else the
    /// metadata server.
    pub credentials_file: Option<PathBuf>,
    /// Probe timeout until the first successful probe (a service scaled to
    /// zero answers after a cold start).
    #[serde(with = "humantime_serde")]
    pub cold_start_timeout: Duration,
    pub probe: ProbeConfig,
    pub breaker: BreakerConfig,
    /// Cloud Run's own view of the service (`services.get`), when set.
    pub admin: Option<AdminConfig>,
    /// Deadline for a start; Cloud Run starts the service itself, so only
    /// the generic tier actor reads it.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Deadline for a stop, which does nothing for this tier.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Keep this tier started while another tier is active, so a failover
    /// to it needs no cold start (the waterfall's standby).
    pub standby: bool,
}

/// How requests to the service authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// An ID token whose audience is the service (a private service).
    #[default]
    IdToken,
    /// No credentials (a service that allows unauthenticated calls).
    None,
}

/// `[tiers.cloud_run.admin]`: the Cloud Run Admin API check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub project: String,
    pub region: String,
    pub service: String,
    pub endpoint: String,
    /// How long a Ready answer is trusted; a failed health probe re-checks at once.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Deadline of one check (building the client and fetching its token included). A check
    /// outlives the probe that started it: a slow answer still arrives, for the next probes.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            project: String::new(),
            region: String::new(),
            service: String::new(),
            endpoint: "https://run.googleapis.com".into(),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

impl AdminConfig {
    /// The resource name `services.get` takes.
    pub fn resource_name(&self) -> String {
        format!(
            "projects/{}/locations/{}/services/{}",
            self.project, self.region, self.service
        )
    }
}

impl Default for CloudRunConfig {
    fn default() -> Self {
        CloudRunConfig {
            url: String::new(),
            health_path: "/health".into(),
            audience: None,
            auth: AuthMode::IdToken,
            credentials_file: None,
            cold_start_timeout: Duration::from_secs(20),
            probe: ProbeConfig {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
            },
            breaker: BreakerConfig::default(),
            admin: None,
            start_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
            standby: false,
        }
    }
}

impl CloudRunConfig {
    /// Problems as (key relative to `[tiers.cloud_run]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.url.is_empty() {
            problems.push((
                "url".into(),
                "is required: the Cloud Run service's URL, e.g. https://NAME-HASH-REGION.a.run.app"
                    .into(),
            ));
        } else {
            let problem = match self.auth {
                AuthMode::IdToken => credential_url_problem(&self.url, "an ID token"),
                AuthMode::None => match Url::parse(&self.url) {
                    Err(e) => Some(format!("is not a URL: {e}")),
                    Ok(url)
                        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() =>
                    {
                        Some("must be an http(s) URL with a host".into())
                    }
                    Ok(_) => None,
                },
            };
            if let Some(problem) = problem {
                problems.push(("url".into(), problem));
            }
        }
        if !self.health_path.starts_with('/') {
            problems.push(("health_path".into(), "must start with `/`".into()));
        }
        if self
            .audience
            .as_deref()
            .is_some_and(|a| a.trim().is_empty())
        {
            problems.push(("audience".into(), "must not be empty when set".into()));
        }
        if self.auth == AuthMode::None && self.credentials_file.is_some() {
            problems.push((
                "credentials_file".into(),
                "is set but auth is \"none\", so it would never be used".into(),
            ));
        }
        if self.probe.timeout.is_zero() || self.probe.interval.is_zero() {
            problems.push((
                "probe".into(),
                "interval and timeout must be above zero".into(),
            ));
        }
        if self.cold_start_timeout.is_zero() {
            problems.push(("cold_start_timeout".into(), "must be above zero".into()));
        }
        for (key, problem) in self.breaker.validate() {
            problems.push((format!("breaker.{key}"), problem));
        }
        if let Some(admin) = &self.admin {
            for (key, value) in [
                ("project", &admin.project),
                ("region", &admin.region),
                ("service", &admin.service),
            ] {
                if value.trim().is_empty() || value.contains('/') {
                    problems.push((
                        format!("admin.{key}"),
                        "is required (a name without `/`) when [tiers.cloud_run.admin] is set"
                            .into(),
                    ));
                }
            }
            if let Some(problem) = credential_url_problem(&admin.endpoint, "an access token") {
                problems.push((
                    "admin.endpoint".into(),
                    format!("{problem}, e.g. https://run.googleapis.com"),
                ));
            }
            if admin.interval.is_zero() {
                problems.push(("admin.interval".into(), "must be above zero".into()));
            }
            if admin.timeout.is_zero() {
                problems.push(("admin.timeout".into(), "must be above zero".into()));
            }
        }
        problems
    }

    /// The deadline the tier actor puts around one probe (`TierSpec.probe.timeout`):
    /// the driver bounds each request itself, with the cold-start timeout
    /// until the first success, so the actor's deadline only catches a bug.
    pub fn probe_deadline(&self) -> Duration {
        self.probe
            .timeout
            .max(self.cold_start_timeout)
            .saturating_add(Duration::from_secs(1))
    }

    /// The service URL without a trailing `/`.
    fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// The ID token's audience.
    pub fn audience(&self) -> String {
        match &self.audience {
            Some(audience) => audience.clone(),
            None => self.base_url().to_owned(),
        }
    }
}

/// The tier as the root runs it: probed, never started.
pub fn tier_spec(config: CloudRunConfig, env: GcpEnv) -> TierSpec {
    let fingerprint = crate::tier::fingerprint(&config);
    let driver_config = config.clone();
    let factory: DriverFactory = Arc::new(move |events| {
        let driver = CloudRunDriver::new(driver_config.clone(), env.clone(), events)?;
        Ok(Arc::new(driver) as Arc<dyn Driver>)
    });
    // The driver bounds each request itself (longer while the service may be
    // cold); the tier actor's deadline is the outer bound.
    let mut probe = config.probe.clone();
    probe.timeout = config.probe_deadline();
    TierSpec {
        id: TierId::CloudRun,
        factory,
        probe,
        breaker: config.breaker.clone(),
        start_timeout: config.start_timeout,
        stop_grace: config.stop_grace,
        fingerprint,
    }
}

/// Where this driver's credentials come from, for ID tokens and the Admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credentials {
    Metadata { host: String },
    KeyFile(PathBuf),
}

impl Credentials {
    fn pick(config: &CloudRunConfig, env: &GcpEnv) -> Self {
        match config
            .credentials_file
            .clone()
            .or(env.credentials_file.clone())
        {
            Some(path) => Credentials::KeyFile(path),
            None => Credentials::Metadata {
                host: env.metadata_host().to_owned(),
            },
        }
    }

    /// For operators: where tokens come from. A path, never a key.
    fn describe(&self) -> String {
        match self {
            Credentials::Metadata { host } => format!("metadata server {host}"),
            Credentials::KeyFile(path) => format!("service-account key {}", path.display()),
        }
    }
}

pub struct CloudRunDriver {
    config: CloudRunConfig,
    /// Parsed once: a probe clones it instead of parsing a string.
    health_url: Url,
    /// One pooled client for every probe, so a probe reuses a warm connection.
    http: reqwest::Client,
    /// `None` with `auth = "none"`. Shared with routed requests
    /// ([`Driver::route_info`]): one cache for the tier.
    tokens: Option<Arc<IdTokens>>,
    credentials: Credentials,
    /// `None` without `[tiers.cloud_run.admin]`.
    admin: Option<Arc<AdminCheck>>,
    /// A probe has succeeded since the driver was built or restarted; until
    /// then probes allow for a cold start.
    warm: AtomicBool,
}

impl CloudRunDriver {
    /// Builds the driver; does no I/O. Credential problems (a missing or bad
    /// key file) surface at the first probe as Unavailable rather than here,
    /// where an error would fail the tier actor again and again. `_events`
    /// is unused (Cloud Run tells cascade nothing by itself); it keeps the
    /// constructors of all tiers alike.
    pub fn new(config: CloudRunConfig, env: GcpEnv, _events: EventSink) -> Result<Self, TierError> {
        let health_url = Url::parse(&format!("{}{}", config.base_url(), config.health_path))
            .map_err(|e| {
                TierError::new(format!(
                    "tiers.cloud_run.url {:?} with health_path {:?} is not a URL: {e}",
                    config.url, config.health_path
                ))
            })?;
        let http = client::http_client()?;
        let credentials = Credentials::pick(&config, &env);
        let tokens = match config.auth {
            AuthMode::IdToken => Some(Arc::new(IdTokens::new(&credentials, config.audience())?)),
            AuthMode::None => None,
        };
        let admin = config.admin.as_ref().map(|admin| {
            Arc::new(AdminCheck::new(
                AdminApi::new(admin, credentials.clone()),
                admin.interval,
                admin.timeout,
            ))
        });
        Ok(CloudRunDriver {
            config,
            health_url,
            http,
            tokens,
            credentials,
            admin,
            warm: AtomicBool::new(false),
        })
    }

    /// The readiness to act on, and whether the Admin API was asked for it: the last answer
    /// while it stands (see [`AdminCheck::standing`]; `force` asks anyway), else a new one,
    /// waited for at most a third of the probe. A check that cannot answer in time changes
    /// nothing now: the last answer stands and the health check decides.
    async fn check_admin(&self, deadline: Deadline, force: bool) -> (Option<Readiness>, bool) {
        let Some(admin) = &self.admin else {
            return (None, false);
        };
        let now = Instant::now();
        if !force && let Some(readiness) = admin.standing(now) {
            return (Some(readiness), false);
        }
        let share = deadline.budget() / ADMIN_SHARE;
        let wait = deadline.attempt_timeout(now, self.config.probe.timeout.min(share));
        (admin.ask(wait).await, true)
    }

    fn outcome_of(&self, answer: Result<Answer, String>, sent_token: bool) -> ProbeOutcome {
        classify(
            &self.health_url,
            answer,
            sent_token,
            self.config.breaker.open_max,
        )
    }
}

/// Maps the health answer to a probe outcome. `cap` bounds a `Retry-After`.
fn classify(
    url: &Url,
    answer: Result<Answer, String>,
    sent_token: bool,
    cap: Duration,
) -> ProbeOutcome {
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => return ProbeOutcome::Down { error },
    };
    let status = answer.status;
    if (200..300).contains(&status) {
        // Stable text: a note that changed every probe (say, with the
        // latency) would republish the status every probe. Latency is in the
        // probe duration metric.
        return ProbeOutcome::Up {
            note: format!("ready (HTTP {status})"),
        };
    }
    let excerpt = if answer.excerpt.is_empty() {
        String::new()
    } else {
        format!(": {}", answer.excerpt)
    };
    match status {
        401 if sent_token => ProbeOutcome::Down {
            error: format!(
                "{url} rejected the ID token (HTTP 401: not valid for it, or expired){excerpt}"
            ),
        },
        403 if sent_token => ProbeOutcome::Down {
            error: format!(
                "{url} rejected the ID token (HTTP 403: check the audience and that the account has roles/run.invoker){excerpt}"
            ),
        },
        401 | 403 => ProbeOutcome::Down {
            error: format!(
                "{url} answered HTTP {status} to a request without credentials (auth = \"none\"){excerpt}"
            ),
        },
        429 | 503 => match answer
            .retry_after
            .as_deref()
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
        {
            // The tier actor names the Retry-After in the reason.
            Some(asked) => ProbeOutcome::Throttled {
                error: format!("health check {url} answered HTTP {status}{excerpt}"),
                retry_after: asked.min(cap),
            },
            // The request reached Cloud Run and it said "unavailable" (no instance can serve, a
            // revision that failed to start, or the service's own verdict): a definitive answer,
            // not a flaky network, so the tier stops serving at once instead of after the
            // breaker's threshold of probes.
            None if status == 503 => ProbeOutcome::Gone {
                reason: format!("health check {url} answered HTTP 503{excerpt}"),
            },
            None => ProbeOutcome::Down {
                error: format!("health check {url} answered HTTP {status}{excerpt}"),
            },
        },
        _ => ProbeOutcome::Down {
            error: format!("health check {url} answered HTTP {status}{excerpt}"),
        },
    }
}

#[async_trait]
impl Driver for CloudRunDriver {
    fn endpoint(&self) -> Option<String> {
        Some(self.config.base_url().to_owned())
    }

    /// Routed requests carry an ID token from the probes' own cache, and the
    /// first request after the service sat idle may take a cold start.
    fn route_info(&self) -> RouteInfo {
        let auth = match &self.tokens {
            Some(tokens) => RequestAuth::IdToken(Arc::new(RequestTokens {
                tokens: tokens.clone(),
                http: self.http.clone(),
                timeout: self.config.probe.timeout,
            })),
            None => RequestAuth::None,
        };
        RouteInfo {
            auth,
            cold_start_timeout: Some(self.config.cold_start_timeout),
        }
    }

    /// Cloud Run starts and scales the service on demand; there is nothing
    /// for cascade to start, so the waterfall's start phase skips this tier.
    fn startable(&self) -> bool {
        false
    }

    async fn probe(&self) -> ProbeOutcome {
        let now = Instant::now();
        let budget = if self.warm.load(Ordering::Relaxed) {
            self.config.probe.timeout
        } else {
            self.config
                .cold_start_timeout
                .max(self.config.probe.timeout)
        };
        let deadline = Deadline::after(now, budget);

        let (readiness, admin_asked) = self.check_admin(deadline, false).await;
        match readiness {
            Some(Readiness::Failed(message)) => return not_ready(&message),
            Some(Readiness::Misconfigured(message)) => return admin_refused(&message),
            _ => {}
        }

        let bearer = match &self.tokens {
            Some(tokens) => {
                let now = Instant::now();
                // Without a valid token there is nothing to probe with: wait
                // for one. With one, a refresh that does not finish quickly
                // is left for the next probe.
                let timeout = deadline.attempt_timeout(now, self.config.probe.timeout);
                let share = deadline.budget() / REFRESH_SHARE;
                let refresh_timeout =
                    deadline.attempt_timeout(now, self.config.probe.timeout.min(share));
                match tokens.bearer(&self.http, timeout, refresh_timeout).await {
                    Ok(bearer) => Some(bearer),
                    Err(error) => return error.into_outcome(),
                }
            }
            None => None,
        };
        let answer = client::health(
            &self.http,
            &self.health_url,
            bearer.clone(),
            deadline.remaining(Instant::now()),
        )
        .await;
        if let (Ok(Answer { status: 401, .. }), Some(tokens), Some(sent)) =
            (&answer, &self.tokens, &bearer)
        {
            // Revoked, or expired early: a cached token would be refused
            // until its refresh time, so fetch a new one next probe.
            tokens.reject(sent).await;
        }
        let outcome = self.outcome_of(answer, self.tokens.is_some());
        if let ProbeOutcome::Up { .. } = outcome {
            self.warm.store(true, Ordering::Relaxed);
        } else if let Some(admin) = self.admin.as_ref().filter(|_| !admin_asked) {
            // The Admin API may know why (a failed revision, a quota): ask
            // now if the probe's deadline allows, else for the next probe.
            if deadline.is_expired(Instant::now()) {
                admin.refresh();
            } else {
                match self.check_admin(deadline, true).await {
                    (Some(Readiness::Failed(message)), _) => return not_ready(&message),
                    (Some(Readiness::Misconfigured(message)), _) => {
                        return admin_refused(&message);
                    }
                    _ => {}
                }
            }
        }
        outcome
    }

    async fn start(&self) -> Result<(), TierError> {
        Err(TierError::new(
            "the cloud_run tier cannot be started: Cloud Run starts and scales the service itself",
        ))
    }

    /// Nothing to stop: the service belongs to Cloud Run.
    async fn stop(&self, _reason: StopReason) -> Result<(), TierError> {
        Ok(())
    }

    /// Cloud Run restarts nothing on request; a restart here starts the
    /// tier afresh: a new ID token, a new Admin API answer, a cold-start
    /// timeout again (and the tier actor resets the breaker).
    async fn restart(&self, request: RestartRequest) -> Result<RestartReport, TierError> {
        let mut plan = Vec::new();
        if self.tokens.is_some() {
            plan.push(format!(
                "drop the cached ID token; fetch a new one from the {} at the next probe",
                self.credentials.describe()
            ));
        }
        if let Some(admin) = &self.config.admin {
            plan.push(format!(
                "forget the Admin API's last answer; ask services.get for {} at the next probe",
                admin.resource_name()
            ));
        }
        plan.push(format!(
            "probe {} allowing for a cold start ({})",
            self.health_url,
            crate::text::duration(self.config.cold_start_timeout)
        ));
        plan.push("the service itself is left to Cloud Run, which restarts and scales it".into());
        if !request.dry_run {
            if let Some(tokens) = &self.tokens {
                tokens.forget().await;
            }
            if let Some(admin) = &self.admin {
                admin.forget();
            }
            self.warm.store(false, Ordering::Relaxed);
        }
        Ok(RestartReport {
            tier: TierId::CloudRun,
            dry_run: request.dry_run,
            plan,
        })
    }

    fn details(&self) -> BTreeMap<String, String> {
        let mut details = BTreeMap::new();
        details.insert("url".into(), self.config.base_url().to_owned());
        match &self.tokens {
            Some(tokens) => {
                details.insert("audience".into(), tokens.audience().to_owned());
                details.insert("auth".into(), self.credentials.describe());
                tokens.details(&mut details);
            }
            None => {
                details.insert("auth".into(), "none".into());
            }
        }
        if let Some(admin) = &self.admin {
            let view = admin.view();
            let ready = match &view {
                None => "unknown".to_owned(),
                Some(view) => view.readiness.describe(),
            };
            details.insert("admin_ready".into(), ready);
            if let Some(error) = view.and_then(|v| v.error) {
                details.insert("admin_error".into(), error);
            }
        }
        details
    }
}

impl Drop for CloudRunDriver {
    fn drop(&mut self) {
        if let Some(admin) = &self.admin {
            admin.shutdown();
        }
    }
}

fn not_ready(message: &str) -> ProbeOutcome {
    ProbeOutcome::Unavailable {
        reason: format!("Cloud Run reports the service not ready: {message}"),
    }
}

/// The Admin API refused for good: the check cannot pass until the configuration (or the
/// credentials' access) changes, so the tier waits for an operator.
fn admin_refused(message: &str) -> ProbeOutcome {
    ProbeOutcome::Unavailable {
        reason: format!("Cloud Run Admin API check failed: {message}"),
    }
}
