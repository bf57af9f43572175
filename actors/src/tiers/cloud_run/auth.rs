//! ID tokens for the service: where they come from (the metadata server, or a
//! service-account key whose signed assertion is exchanged at the key's
//! `token_uri`), how long one is kept, and keeping them out of every message.
//!
//! A token is cached as a ready-made, sensitive `Authorization` header value
//! and refreshed by the probe that finds less than 4 minutes left (half the
//! lifetime for tokens living under 8 minutes), so between refreshes a probe
//! only clones that header. A failed refresh keeps using the cached token
//! while it is valid, and says so in the status details; while a valid token
//! is cached a refresh gets only a short slice of the probe's time, so a
//! hanging token source cannot starve the health check. A token the service
//! rejects (HTTP 401) is dropped, so the next probe fetches a new one.
//!
//! A token's claims are outside data: a lifetime is trusted for a day at
//! most, and an `exp` no clock can hold counts as no `exp` at all.
//!
//! Why not google-cloud-auth's ID-token credentials: that module sits behind
//! the crate's `idtoken` feature, which the workspace does not enable; its
//! service-account flow always posts to `oauth2.googleapis.com` whatever the
//! key's `token_uri` says; and its metadata flow refreshes from a detached
//! task whose HTTP calls have no timeout and that stops for good after a
//! non-transient error. Signing is still the crate's (`build_signer`).
//!
//! Invariant: token text lives only in the cache's header value (marked
//! sensitive) and on its way there; no error built here contains it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use google_cloud_auth::signer::Signer;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use super::Credentials;
use super::client;
use crate::contract::{ProbeOutcome, TierError};
use crate::resilience::with_deadline;
use crate::routing::RequestCredentials;
use crate::text::root_cause;

/// Where a key without `token_uri` exchanges its assertions.
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Refresh this long before expiry ...
const REFRESH_SLACK: Duration = Duration::from_secs(4 * 60);
/// ... or, for a token living less than twice that, halfway through.
/// Google's ID tokens live an hour; assumed when a token does not say.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest a token is trusted for, whatever its claims say (Google's
/// live an hour): bounds every time computed from a token.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A token is not sent in the last 10 s of its life (an eighth of a short one).
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Lifetime asked of the token endpoint for a self-signed assertion.
const ASSERTION_LIFETIME: u64 = 3600;

/// Why no token: either an operator must fix the credentials, or fetching failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum TokenError {
    /// A key file that is missing, malformed or of the wrong kind.
    #[error("ID token: {0}")]
    Credentials(String),
    /// The metadata server or the token endpoint did not give one.
    #[error("ID token: {0}")]
    Fetch(String),
}

impl TokenError {
    /// A credentials problem waits for an operator (Unavailable); a fetch
    /// failure counts against the breaker like any failed probe.
    pub(super) fn into_outcome(self) -> ProbeOutcome {
        match self {
            TokenError::Credentials(_) => ProbeOutcome::Unavailable {
                reason: self.to_string(),
            },
            TokenError::Fetch(_) => ProbeOutcome::Down {
                error: self.to_string(),
            },
        }
    }
}

enum Source {
    Metadata {
        host: String,
        /// The metadata server is never reached through a proxy.
        http: reqwest::Client,
    },
    KeyFile(PathBuf),
}

/// A usable service-account key: what the assertion needs.
struct Key {
    client_email: String,
    private_key_id: Option<String>,
    token_uri: String,
    signer: Signer,
}

#[derive(Clone)]
struct Cached {
    /// `Bearer <token>`, marked sensitive so no debug output shows it.
    bearer: HeaderValue,
    refresh_at: Instant,
    /// The end of its use, a margin before it expires.
    expires_at: Instant,
}

#[derive(Default)]
struct Cache {
    token: Option<Cached>,
    /// Parsed once; dropped by `forget` so a fixed key file is read again.
    key: Option<Arc<Key>>,
}

/// What the status details show: times and errors, never a token.
#[derive(Default, Clone)]
struct View {
    refreshed: Option<SystemTime>,
    expires: Option<SystemTime>,
    refresh_error: Option<String>,
}

/// ID tokens for one audience from one source, cached. Probes and routed
/// requests share one instance (the tier's one cache).
pub(super) struct IdTokens {
    source: Source,
    audience: String,
    /// Held across a refresh, so two callers never fetch at once.
    cache: tokio::sync::Mutex<Cache>,
    /// A copy of the cached token, read without waiting: a caller finds a
    /// token that needs no refresh here, and while another caller refreshes
    /// it uses this one as long as it is valid, so routed requests never
    /// queue behind a refresh.
    current: Mutex<Option<Cached>>,
    view: Mutex<View>,
}

impl IdTokens {
    pub(super) fn new(credentials: &Credentials, audience: String) -> Result<Self, TierError> {
        let source = match credentials {
            Credentials::Metadata { host } => Source::Metadata {
                host: host.clone(),
                http: client::metadata_client()?,
            },
            Credentials::KeyFile(path) => Source::KeyFile(path.clone()),
        };
        Ok(IdTokens {
            source,
            audience,
            cache: tokio::sync::Mutex::new(Cache::default()),
            current: Mutex::new(None),
            view: Mutex::new(View::default()),
        })
    }

    fn current(&self) -> Option<Cached> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Sets the cached token (under the cache lock) and its copy.
    fn set_token(&self, cache: &mut Cache, token: Option<Cached>) {
        if let Ok(mut current) = self.current.lock() {
            current.clone_from(&token);
        }
        cache.token = token;
    }

    pub(super) fn audience(&self) -> &str {
        &self.audience
    }

    /// The `Authorization` header value, from the cache unless a refresh is
    /// due. A fetch takes at most `timeout`, or `refresh_timeout` while the
    /// cached token is still valid: if the refresh does not finish by then,
    /// the cached token is used.
    pub(super) async fn bearer(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
        refresh_timeout: Duration,
    ) -> Result<HeaderValue, TokenError> {
        let now = Instant::now();
        let current = self.current();
        if let Some(token) = &current
            && now < token.refresh_at
        {
            return Ok(token.bearer.clone());
        }
        let mut cache = match self.cache.try_lock() {
            Ok(cache) => cache,
            // Someone is refreshing: a still-valid token serves meanwhile.
            Err(_) => match current {
                Some(token) if now < token.expires_at => return Ok(token.bearer.clone()),
                _ => self.cache.lock().await,
            },
        };
        let now = Instant::now();
        let timeout = match &cache.token {
            Some(token) if now < token.refresh_at => return Ok(token.bearer.clone()),
            Some(token) if now < token.expires_at => refresh_timeout.min(timeout),
            _ => timeout,
        };
        let fetched = match with_deadline(timeout, "ID token", self.fetch(&mut cache, http)).await {
            Ok(result) => result,
            Err(_) => Err(TokenError::Fetch(format!(
                "{} did not answer within {}",
                self.source_name(),
                crate::text::duration(timeout)
            ))),
        };
        match fetched {
            Ok((fresh, times)) => {
                let bearer = fresh.bearer.clone();
                info!(backend.tier = "cloud_run", source = %self.source_name(), lifetime_s = times.lifetime.as_secs(), left_s = times.left.as_secs(), "ID token refreshed.");
                if let Ok(mut view) = self.view.lock() {
                    let wall = SystemTime::now();
                    *view = View {
                        refreshed: Some(wall),
                        expires: wall.checked_add(times.left),
                        refresh_error: None,
                    };
                }
                self.set_token(&mut cache, Some(fresh));
                Ok(bearer)
            }
            Err(error) => {
                if let Ok(mut view) = self.view.lock() {
                    view.refresh_error = Some(error.to_string());
                }
                match &cache.token {
                    Some(token) if Instant::now() < token.expires_at => {
                        warn!(backend.tier = "cloud_run", %error, "ID token refresh failed; the current one is still valid.");
                        Ok(token.bearer.clone())
                    }
                    _ => Err(error),
                }
            }
        }
    }

    /// Drops the cached token if it is still `rejected` (the service refused
    /// it: revoked, or expired early), so the next call fetches a new one;
    /// the key stays parsed. Logged once per token, however many requests
    /// carried it.
    pub(super) async fn reject(&self, rejected: &HeaderValue) {
        let mut cache = self.cache.lock().await;
        if cache.token.as_ref().is_some_and(|t| t.bearer == *rejected) {
            warn!(
                backend.tier = "cloud_run",
                "The service rejected the ID token (HTTP 401); fetching a new one."
            );
            self.set_token(&mut cache, None);
            if let Ok(mut view) = self.view.lock() {
                view.expires = None;
            }
        }
    }

    /// Drops the cached token and key, so the next probe starts afresh.
    pub(super) async fn forget(&self) {
        let mut cache = self.cache.lock().await;
        *cache = Cache::default();
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
        if let Ok(mut view) = self.view.lock() {
            *view = View::default();
        }
    }

    pub(super) fn details(&self, details: &mut BTreeMap<String, String>) {
        let Ok(view) = self.view.lock() else { return };
        if let Some(at) = view.refreshed {
            details.insert(
                "token_refreshed".into(),
                humantime::format_rfc3339_seconds(at).to_string(),
            );
        }
        if let Some(at) = view.expires {
            details.insert(
                "token_expires".into(),
                humantime::format_rfc3339_seconds(at).to_string(),
            );
        }
        if let Some(error) = &view.refresh_error {
            details.insert("token_error".into(), error.clone());
        }
    }

    fn source_name(&self) -> String {
        match &self.source {
            Source::Metadata { host, .. } => format!("metadata server {host}"),
            Source::KeyFile(path) => format!("token endpoint of {}", path.display()),
        }
    }

    async fn fetch(
        &self,
        cache: &mut Cache,
        http: &reqwest::Client,
    ) -> Result<(Cached, TokenTimes), TokenError> {
        let token = match &self.source {
            Source::Metadata { host, http } => {
                client::metadata_id_token(http, host, &self.audience)
                    .await
                    .map_err(TokenError::Fetch)?
            }
            Source::KeyFile(path) => {
                let key = match &cache.key {
                    Some(key) => key.clone(),
                    None => {
                        let key = Arc::new(load_key(path).await?);
                        cache.key = Some(key.clone());
                        key
                    }
                };
                let assertion = key
                    .assertion(path, &self.audience, SystemTime::now())
                    .await?;
                client::exchange_assertion(http, &key.token_uri, &assertion)
                    .await
                    .map_err(TokenError::Fetch)?
            }
        };
        let now = Instant::now();
        let times = token_times(&token, SystemTime::now());
        let mut bearer = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
            TokenError::Fetch(format!(
                "{} answered a token that is not a valid header value",
                self.source_name()
            ))
        })?;
        bearer.set_sensitive(true);
        let cached = Cached {
            bearer,
            refresh_at: times.refresh_at(now),
            expires_at: times.usable_until(now),
        };
        Ok((cached, times))
    }
}

/// The tier's token cache as the router uses it: routed requests carry the
/// same ID token the probes do, and a 401 from the service drops it for both.
pub(super) struct RequestTokens {
    pub(super) tokens: Arc<IdTokens>,
    /// The probes' pooled client (token exchanges at a key's `token_uri`).
    pub(super) http: reqwest::Client,
    /// How long a request waits for a token when none is cached; a due
    /// refresh of a still-valid one gets a quarter of it.
    pub(super) timeout: Duration,
}

#[async_trait::async_trait]
impl RequestCredentials for RequestTokens {
    async fn authorization(&self) -> Result<HeaderValue, TierError> {
        self.tokens
            .bearer(&self.http, self.timeout, self.timeout / 4)
            .await
            .map_err(|e| TierError::new(e.to_string()))
    }

    async fn rejected(&self, value: &HeaderValue) {
        self.tokens.reject(value).await;
    }
}

/// How long before expiry a token is replaced.
pub(super) fn refresh_slack(lifetime: Duration) -> Duration {
    REFRESH_SLACK.min(lifetime / 2)
}

/// How long a token lives and how much of that is left, from its own
/// claims: the lifetime is `exp - iat` (else what is left), what is left is
/// `exp - now` capped at the lifetime (a clock running behind must not stretch
/// it), both at most [`MAX_LIFETIME`]. A token that does not say, or whose
/// `exp` is past what `SystemTime` holds, is taken to live an hour.
pub(super) fn token_times(token: &str, now: SystemTime) -> TokenTimes {
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
        iat: Option<u64>,
    }
    let claims = token
        .split('.')
        .nth(1)
        .and_then(b64_decode)
        .and_then(|payload| serde_json::from_slice::<Claims>(&payload).ok());
    let unknown = TokenTimes {
        lifetime: DEFAULT_LIFETIME,
        left: DEFAULT_LIFETIME,
    };
    let Some(Claims {
        exp: Some(exp),
        iat,
    }) = claims
    else {
        return unknown;
    };
    let Some(expires) = UNIX_EPOCH.checked_add(Duration::from_secs(exp)) else {
        return unknown;
    };
    let left = expires
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .min(MAX_LIFETIME);
    match iat {
        Some(iat) if exp > iat => {
            let lifetime = Duration::from_secs(exp - iat).min(MAX_LIFETIME);
            TokenTimes {
                lifetime,
                left: left.min(lifetime),
            }
        }
        _ => TokenTimes {
            lifetime: left,
            left,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenTimes {
    pub lifetime: Duration,
    pub left: Duration,
}

impl TokenTimes {
    /// When, from `now`, to fetch the next token (`now` if the clock cannot
    /// hold the time).
    fn refresh_at(self, now: Instant) -> Instant {
        let wait = self.left.saturating_sub(refresh_slack(self.lifetime));
        now.checked_add(wait).unwrap_or(now)
    }

    /// Until when, from `now`, the token may still be sent: a little before
    /// it expires, so no request carries it past expiry (`now` if the clock
    /// cannot hold the time).
    fn usable_until(self, now: Instant) -> Instant {
        let use_for = self
            .left
            .saturating_sub(EXPIRY_MARGIN.min(self.lifetime / 8));
        now.checked_add(use_for).unwrap_or(now)
    }
}

// === service-account keys ===

fn key_error(path: &Path, problem: impl std::fmt::Display) -> TokenError {
    TokenError::Credentials(format!("service-account key {}: {problem}", path.display()))
}

async fn load_key(path: &Path) -> Result<Key, TokenError> {
    let text = client::read_key_file(path)
        .await
        .map_err(|e| key_error(path, format_args!("cannot be read: {e}")))?;
    let key = parse_key(path, &text)?;
    // The signer parses the PEM only when it signs: try it now, so a key
    // that cannot sign is never kept and a fixed file is read again.
    key.signer
        .sign(b"cascade: can this key sign?")
        .await
        .map_err(|e| {
            key_error(
                path,
                format_args!(
                    "private_key is not a usable PKCS#8 RSA key ({})",
                    root_cause(&e)
                ),
            )
        })?;
    Ok(key)
}

/// Parses a key file. Errors name the file and the problem and never quote
/// the file's content.
fn parse_key(path: &Path, text: &str) -> Result<Key, TokenError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        key_error(
            path,
            format_args!("not valid JSON at line {} column {}", e.line(), e.column()),
        )
    })?;
    let Some(fields) = value.as_object() else {
        return Err(key_error(path, "not a JSON object"));
    };
    match fields.get("type").and_then(Value::as_str) {
        Some("service_account") => {}
        Some(other) => {
            return Err(key_error(
                path,
                format_args!("type is {other:?}, expected \"service_account\""),
            ));
        }
        None => return Err(key_error(path, "missing field type")),
    }
    let text_of = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
    };
    // The fields google-cloud-auth's signer requires.
    let missing: Vec<&str> = [
        "client_email",
        "private_key",
        "private_key_id",
        "project_id",
    ]
    .into_iter()
    .filter(|name| text_of(name).is_none())
    .collect();
    match missing.as_slice() {
        [] => {}
        [one] => return Err(key_error(path, format_args!("missing field {one}"))),
        many => {
            return Err(key_error(
                path,
                format_args!("missing fields {}", many.join(", ")),
            ));
        }
    }
    // The signed assertion is a credential: never posted over plain HTTP to another host.
    crate::tiers::gcp::check_token_uri(&value).map_err(|e| key_error(path, e))?;
    let signer = google_cloud_auth::credentials::service_account::Builder::new(value.clone())
        .build_signer()
        .map_err(|e| key_error(path, e))?;
    Ok(Key {
        client_email: text_of("client_email").unwrap_or_default().to_owned(),
        private_key_id: text_of("private_key_id").map(str::to_owned),
        token_uri: text_of("token_uri").unwrap_or(GOOGLE_TOKEN_URI).to_owned(),
        signer,
    })
}

impl Key {
    /// A JWT asking the token endpoint for an ID token for `audience`,
    /// signed RS256 with the key (as Google's own libraries build it).
    async fn assertion(
        &self,
        path: &Path,
        audience: &str,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut header = json!({ "alg": "RS256", "typ": "JWT" });
        if let Some(kid) = &self.private_key_id {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": self.client_email,
            "sub": self.client_email,
            "aud": self.token_uri,
            "target_audience": audience,
            "iat": iat,
            "exp": iat.saturating_add(ASSERTION_LIFETIME),
        });
        let mut jwt = format!(
            "{}.{}",
            b64_encode(header.to_string().as_bytes()),
            b64_encode(claims.to_string().as_bytes())
        );
        // The signer parses the PEM on every call; a bad private key shows here.
        let signature = self.signer.sign(jwt.as_bytes()).await.map_err(|e| {
            key_error(
                path,
                format_args!("private_key cannot sign ({})", root_cause(&e)),
            )
        })?;
        jwt.push('.');
        jwt.push_str(&b64_encode(&signature));
        Ok(jwt)
    }
}

// === keeping tokens out of text ===

/// `text` with every token-shaped run replaced by `[redacted]`: a JWT
/// (dot-joined base64url segments, one starting `eyJ`, the encoding of
/// `{"`) or a Google access token (`ya29.`). A body or message that echoes
/// a token must not carry it into a log or the status.
pub(super) fn redact(text: &str) -> String {
    fn is_token_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=')
    }
    fn is_token(run: &str) -> bool {
        let jwt = run.len() >= 32
            && run.matches('.').count() >= 2
            && run.split('.').any(|part| part.starts_with("eyJ"));
        jwt || (run.starts_with("ya29.") && run.len() > 5)
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest.find(is_token_char).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(|c| !is_token_char(c)).unwrap_or(rest.len());
        let run = &rest[..end];
        out.push_str(if is_token(run) { "[redacted]" } else { run });
        rest = &rest[end..];
    }
    out
}

// === base64url (RFC 4648 §5), without padding ===

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub(super) fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Accepts padding; `None` for anything outside the alphabet.
pub(super) fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut n = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        n = n << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits & 0xff) as u8);
        }
    }
    Some(out)
}
