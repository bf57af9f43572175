//! The only file of the `cloud_run` tier that talks to the outside world:
//! the health GET, the metadata server's identity endpoint, the token
//! endpoint, reading the key file, and the Admin API's `services.get`.
//!
//! Invariants: every call here is bounded by a deadline, by the caller
//! (`with_deadline` around a whole token fetch) or here; an error text never
//! carries a credential: bodies are quoted only through [`excerpt`], which
//! cuts them short and blanks anything shaped like a JWT.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use google_cloud_gax::retry_policy::NeverRetry;
use google_cloud_run_v2::client::Services;
use google_cloud_run_v2::model::condition::State as ConditionState;
use google_cloud_run_v2::model::{Condition, Service};
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};

use super::auth::redact;
use super::{AdminConfig, Credentials};
use crate::contract::TierError;
use crate::resilience::with_deadline;
use crate::text::root_cause;

/// Bytes of a 2xx body read so the connection can go back to the pool.
const DRAIN_LIMIT: usize = 64 * 1024;
/// Bytes of an error body read for the excerpt.
const EXCERPT_READ: usize = 4 * 1024;
/// Characters of an error body quoted in a message.
const EXCERPT_CHARS: usize = 200;

/// The client every probe and token exchange shares: its pool keeps the
/// connection to the service warm between probes.
pub(super) fn http_client() -> Result<reqwest::Client, TierError> {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| TierError::new(format!("cannot build an HTTP client: {e}")))
}

/// The metadata server is link-local: never reached through a proxy.
pub(super) fn metadata_client() -> Result<reqwest::Client, TierError> {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| TierError::new(format!("cannot build an HTTP client: {e}")))
}

// === the service ===

/// The service's answer to a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    /// The start of the body of an error answer, credential-free; empty for 2xx.
    pub excerpt: String,
}

/// One GET of the health URL within `timeout`, body included.
pub(super) async fn health(
    http: &reqwest::Client,
    url: &Url,
    bearer: Option<HeaderValue>,
    timeout: Duration,
) -> Result<Answer, String> {
    let mut request = http.get(url.clone());
    if let Some(bearer) = bearer {
        request = request.header(AUTHORIZATION, bearer);
    }
    let exchange = async {
        let mut response = request.send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let excerpt = if response.status().is_success() {
            let mut read = 0;
            while read < DRAIN_LIMIT {
                match response.chunk().await? {
                    Some(chunk) => read += chunk.len(),
                    None => break,
                }
            }
            String::new()
        } else {
            excerpt(response).await
        };
        Ok::<_, reqwest::Error>(Answer {
            status,
            retry_after,
            excerpt,
        })
    };
    match with_deadline(timeout, "health check", exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(format!("health check {url} failed: {}", root_cause(&e))),
        Err(_) => Err(format!(
            "health check {url} did not answer within {}",
            crate::text::duration(timeout)
        )),
    }
}

/// The start of a body, on one line, without anything shaped like a token.
async fn excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < EXCERPT_READ {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut short: String = redact(&one_line).chars().take(EXCERPT_CHARS).collect();
    if short.len() < one_line.len() && !short.is_empty() {
        short.push('…');
    }
    short
}

// === tokens ===

/// An ID token for `audience` from the metadata server at `host`.
pub(super) async fn metadata_id_token(
    http: &reqwest::Client,
    host: &str,
    audience: &str,
) -> Result<String, String> {
    let url =
        format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/identity");
    let response = http
        .get(&url)
        .query(&[("audience", audience)])
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .map_err(|e| format!("metadata server {host} failed: {}", root_cause(&e)))?;
    let status = response.status();
    if !status.is_success() {
        let excerpt = excerpt(response).await;
        return Err(format!(
            "metadata server {host} answered HTTP {}{}",
            status.as_u16(),
            colon(&excerpt)
        ));
    }
    let token = response
        .text()
        .await
        .map_err(|e| format!("metadata server {host} failed: {}", root_cause(&e)))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("metadata server {host} answered an empty ID token"));
    }
    Ok(token.to_owned())
}

/// Exchanges a signed JWT assertion for an ID token at `token_uri`.
pub(super) async fn exchange_assertion(
    http: &reqwest::Client,
    token_uri: &str,
    assertion: &str,
) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        id_token: Option<String>,
    }
    let response = http
        .post(token_uri)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion),
        ])
        .send()
        .await
        .map_err(|e| format!("token endpoint {token_uri} failed: {}", root_cause(&e)))?;
    let status = response.status();
    if !status.is_success() {
        let excerpt = excerpt(response).await;
        return Err(format!(
            "token endpoint {token_uri} answered HTTP {}{}",
            status.as_u16(),
            colon(&excerpt)
        ));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("token endpoint {token_uri} failed: {}", root_cause(&e)))?;
    // The body holds the token: its parse error is not quoted.
    match serde_json::from_slice::<TokenResponse>(&body) {
        Ok(TokenResponse {
            id_token: Some(token),
        }) if !token.is_empty() => Ok(token),
        Ok(_) => Err(format!(
            "token endpoint {token_uri} answered without an id_token"
        )),
        Err(_) => Err(format!(
            "token endpoint {token_uri} answered something other than JSON"
        )),
    }
}

pub(super) async fn read_key_file(path: &Path) -> std::io::Result<String> {
    tokio::fs::read_to_string(path).await
}

fn colon(excerpt: &str) -> String {
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
    }
}

// === the Admin API ===

/// What Cloud Run says of the service's Ready condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Readiness {
    Ready,
    /// Ready failed: the service does not serve (or serves a revision that
    /// cannot be replaced); the message says why.
    Failed(String),
    /// A deploy in progress: traffic still goes to the serving revision, so
    /// the health check decides.
    Pending(String),
    /// The Admin API refused the question for good (HTTP 400, 401, 403 or 404: a wrong project,
    /// region or service, or credentials without access): a configuration error, reported as a
    /// failed check rather than ignored.
    Misconfigured(String),
    /// No answer yet, or no Ready condition in it.
    Unknown,
}

/// Why `services.get` gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AdminError {
    pub message: String,
    /// Asking again will not help until the configuration or the credentials change.
    pub permanent: bool,
}

impl Readiness {
    pub(super) fn describe(&self) -> String {
        match self {
            Readiness::Ready => "true".into(),
            Readiness::Failed(message) => format!("false: {message}"),
            Readiness::Pending(message) if message.is_empty() => "reconciling".into(),
            Readiness::Pending(message) => format!("reconciling: {message}"),
            Readiness::Misconfigured(message) => format!("check failed: {message}"),
            Readiness::Unknown => "unknown".into(),
        }
    }
}

/// The service's Ready condition: the terminal condition, or the `Ready`
/// entry among the conditions.
pub(super) fn readiness_of(service: &Service) -> Readiness {
    let ready = service
        .terminal_condition
        .as_ref()
        .filter(|c| c.r#type.is_empty() || c.r#type == "Ready")
        .or_else(|| service.conditions.iter().find(|c| c.r#type == "Ready"));
    match ready {
        None => Readiness::Unknown,
        Some(condition) => readiness_of_condition(condition),
    }
}

fn readiness_of_condition(condition: &Condition) -> Readiness {
    let message = redact(condition.message.trim());
    match condition.state {
        ConditionState::ConditionSucceeded => Readiness::Ready,
        ConditionState::ConditionFailed => Readiness::Failed(if message.is_empty() {
            "Ready condition failed (no message)".into()
        } else {
            message
        }),
        ConditionState::ConditionPending | ConditionState::ConditionReconciling => {
            Readiness::Pending(message)
        }
        _ => Readiness::Unknown,
    }
}

/// `services.get` through Google's client, built on first use and kept, so
/// its access token is cached between checks.
pub(super) struct AdminApi {
    endpoint: String,
    name: String,
    credentials: Credentials,
    /// Dropped by a restart, so a client whose credentials gave up is rebuilt.
    client: Mutex<Option<Services>>,
}

impl AdminApi {
    pub(super) fn new(config: &AdminConfig, credentials: Credentials) -> Self {
        AdminApi {
            endpoint: config.endpoint.trim_end_matches('/').to_owned(),
            name: config.resource_name(),
            credentials,
            client: Mutex::new(None),
        }
    }

    /// Asks for the service within `timeout` (building the client included). A refusal for
    /// good comes back as [`Readiness::Misconfigured`], saying what to check.
    pub(super) async fn readiness(&self, timeout: Duration) -> Result<Readiness, AdminError> {
        let transient = |message: String| AdminError {
            message,
            permanent: false,
        };
        let ask = async {
            let client = self.client().await.map_err(transient)?;
            client
                .get_service()
                .set_name(&self.name)
                .send()
                .await
                .map_err(|e| self.refusal(&e))
        };
        match with_deadline(timeout, "services.get", ask).await {
            Ok(Ok(service)) => Ok(readiness_of(&service)),
            Ok(Err(error)) if error.permanent => Ok(Readiness::Misconfigured(error.message)),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(transient(format!(
                "services.get {} did not answer within {}",
                self.name,
                crate::text::duration(timeout)
            ))),
        }
    }

    /// A failed `services.get` as text (short, credential-free), and whether it is for good.
    fn refusal(&self, error: &google_cloud_gax::error::Error) -> AdminError {
        let status = error.http_status_code();
        let hint = match status {
            Some(404) => Some("check tiers.cloud_run.admin: project, region and service"),
            Some(403) => Some(
                "the credentials may not read the service: grant run.services.get, e.g. roles/run.viewer",
            ),
            Some(401) => Some("the Admin API refused the credentials"),
            Some(400) => Some("check tiers.cloud_run.admin"),
            _ => None,
        };
        let mut message = match status {
            Some(status) => format!("services.get {}: HTTP {status}: {error}", self.name),
            None => format!("services.get {}: {error}", self.name),
        };
        if message.chars().count() > EXCERPT_CHARS * 2 {
            message = message.chars().take(EXCERPT_CHARS * 2).collect();
            message.push('…');
        }
        let mut message = redact(&message);
        if let Some(hint) = hint {
            message.push_str(&format!(" ({hint})"));
        }
        AdminError {
            message,
            permanent: hint.is_some(),
        }
    }

    pub(super) fn forget(&self) {
        if let Ok(mut client) = self.client.lock() {
            *client = None;
        }
    }

    async fn client(&self) -> Result<Services, String> {
        if let Some(client) = self.client.lock().ok().and_then(|c| c.clone()) {
            return Ok(client);
        }
        let credentials = match &self.credentials {
            Credentials::Metadata { host } => {
                google_cloud_auth::credentials::mds::Builder::default()
                    .with_endpoint(format!("http://{host}"))
                    .build()
                    .map_err(|e| {
                        format!("Admin API credentials from metadata server {host}: {e}")
                    })?
            }
            Credentials::KeyFile(path) => {
                let what = || {
                    format!(
                        "Admin API credentials from service-account key {}",
                        path.display()
                    )
                };
                let text = read_key_file(path)
                    .await
                    .map_err(|e| format!("{}: cannot be read: {e}", what()))?;
                let key: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not valid JSON at line {}", what(), e.line()))?;
                crate::tiers::gcp::check_token_uri(&key).map_err(|e| format!("{}: {e}", what()))?;
                google_cloud_auth::credentials::service_account::Builder::new(key)
                    .build()
                    .map_err(|e| format!("{}: {e}", what()))?
            }
        };
        let client = Services::builder()
            .with_endpoint(&self.endpoint)
            .with_credentials(credentials)
            .with_retry_policy(NeverRetry)
            .build()
            .await
            .map_err(|e| format!("cannot build the Cloud Run Admin API client: {e}"))?;
        if let Ok(mut slot) = self.client.lock() {
            *slot = Some(client.clone());
        }
        Ok(client)
    }
}
