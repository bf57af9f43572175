//! The CLI's side of the status API: `cascade status` and `cascade restart`.
//!
//! Invariant: the CLI never waits long on a server that does not answer
//! (connecting and a first `/healthz` reply each get a few seconds before
//! any long request), sends the token only to an address it can trust
//! (see `state::read_api_addr`), and reports every reply by its HTTP status
//! and the server's own message.

use std::net::SocketAddr;
use std::time::Duration;

use cascade_actors::TierId;
use cascade_actors::contract::RestartReport;
use reqwest::Url;
use serde_json::Value;

use crate::config::{self, Config};
use crate::settings::printable;
use crate::state::{self, ApiAddr};

/// Connecting to a local API takes microseconds; a few seconds means
/// nothing is going to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the server may take to answer `/healthz`, checked before a
/// request that may legitimately take long (a restart).
const FIRST_REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of a reply the CLI reads; the API's replies are far smaller.
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach cascade at {addr}: {cause} (is `cascade run` running with this configuration?)"
    )]
    Unreachable { addr: SocketAddr, cause: String },
    #[error("cascade at {addr} answered HTTP {status}: {message}")]
    Refused {
        addr: SocketAddr,
        status: u16,
        message: String,
    },
    #[error("cascade at {addr} sent a reply that is not valid: {cause}")]
    BadReply { addr: SocketAddr, cause: String },
    #[error(
        "not sending the API token to {addr}: {why} (another user may have put their address there; remove the file or fix the state directory)"
    )]
    Untrusted { addr: SocketAddr, why: String },
    #[error(transparent)]
    State(#[from] state::StateError),
}

pub struct Client {
    http: reqwest::Client,
    addr: SocketAddr,
    /// Why the token must not go to `addr`, if it must not.
    untrusted: Option<String>,
    config: Config,
}

impl Client {
    /// A client for the cascade running with `config`'s state directory;
    /// `timeout` bounds each whole request.
    pub fn new(config: Config, timeout: Duration) -> Result<Client, ClientError> {
        let dir = config::state_dir(&config);
        // The running cascade wrote where it actually listens (it may differ
        // from the configuration when the port was 0).
        let (addr, untrusted) = match state::read_api_addr(&dir) {
            ApiAddr::Trusted(addr) => (addr, None),
            ApiAddr::Untrusted { addr, why } => (
                addr,
                Some(format!(
                    "{} says so, but {why}",
                    dir.join(state::API_FILE).display()
                )),
            ),
            ApiAddr::Missing => {
                let addr = config.api.listen;
                let untrusted = (!addr.ip().is_loopback()).then(|| {
                    "it is not a loopback address and no API file of this user names it".to_owned()
                });
                (addr, untrusted)
            }
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .build()
            .map_err(|e| ClientError::Unreachable {
                addr,
                cause: e.to_string(),
            })?;
        Ok(Client {
            http,
            addr,
            untrusted,
            config,
        })
    }

    /// `GET /status`, with the token when there is one (an API off
    /// loopback needs it for reads too).
    pub async fn status(&self) -> Result<Value, ClientError> {
        let mut request = self.http.get(self.url(&["status"]));
        match self.token() {
            Ok(token) => request = request.bearer_auth(token),
            Err(ClientError::State(_)) => {}
            Err(untrusted) => return Err(untrusted),
        }
        self.send(request).await
    }

    pub async fn restart(
        &self,
        tier: TierId,
        force: bool,
        dry_run: bool,
    ) -> Result<RestartReport, ClientError> {
        let token = self.token()?;
        self.answers_at_all().await?;
        let mut url = self.url(&["tiers", tier.as_str(), "restart"]);
        url.query_pairs_mut()
            .append_pair("force", if force { "true" } else { "false" })
            .append_pair("dry_run", if dry_run { "true" } else { "false" });
        let value = self.send(self.http.post(url).bearer_auth(token)).await?;
        serde_json::from_value(value).map_err(|e| ClientError::BadReply {
            addr: self.addr,
            cause: e.to_string(),
        })
    }

    /// The token, if it may go to this address.
    fn token(&self) -> Result<String, ClientError> {
        if let Some(why) = &self.untrusted {
            return Err(ClientError::Untrusted {
                addr: self.addr,
                why: why.clone(),
            });
        }
        Ok(state::read_token(&config::state_dir(&self.config))?)
    }

    /// A quick `/healthz`, so a server that accepts and never answers is
    /// reported in seconds rather than after a restart's long timeout.
    async fn answers_at_all(&self) -> Result<(), ClientError> {
        let request = self
            .http
            .get(self.url(&["healthz"]))
            .timeout(FIRST_REPLY_TIMEOUT);
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(self.refused(response.status(), &read_body(response).await))
        }
    }

    /// `http://ADDR/` with `segments` as the path, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = Url::parse(&format!("http://{}/", self.addr))
            .unwrap_or_else(|_| unreachable!("a socket address makes a valid URL"));
        if let Ok(mut path) = url.path_segments_mut() {
            path.clear().extend(segments);
        }
        url
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let body = read_body(response).await;
        if !status.is_success() {
            return Err(self.refused(status, &body));
        }
        let body = body.map_err(|cause| ClientError::BadReply {
            addr: self.addr,
            cause,
        })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::BadReply {
            addr: self.addr,
            cause: format!("HTTP {status} with a body that is not JSON ({e})"),
        })
    }

    /// A failure status, with the server's own words: the JSON `error`, else
    /// the body's text, else the status's reason phrase.
    fn refused(&self, status: reqwest::StatusCode, body: &Result<Vec<u8>, String>) -> ClientError {
        let from_body = body.as_ref().ok().and_then(|bytes| {
            if let Ok(value) = serde_json::from_slice::<Value>(bytes)
                && let Some(message) = value.get("error").and_then(Value::as_str)
            {
                return Some(message.to_owned());
            }
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim();
            (!text.is_empty()).then(|| text.chars().take(500).collect::<String>())
        });
        let message = from_body.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_owned()
        });
        ClientError::Refused {
            addr: self.addr,
            status: status.as_u16(),
            message: printable(&message).into_owned(),
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        let cause = if e.is_timeout() {
            "no answer in time".to_owned()
        } else {
            cascade_actors::text::root_cause(e)
        };
        ClientError::Unreachable {
            addr: self.addr,
            cause,
        }
    }
}

/// The body, up to [`MAX_REPLY_BYTES`].
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(format!("reply larger than {MAX_REPLY_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A table for humans, from the status API's JSON.
pub fn render_status(status: &Value) -> String {
    let text = |v: &Value, key: &str| match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    let mut out = String::new();
    let active = text(status, "active");
    out.push_str(&format!(
        "active tier: {}\n",
        if active.is_empty() { "none" } else { &active }
    ));
    // Worth a line only when it says more than which tier is active.
    let decision = text(status, "decision");
    if !decision.is_empty() && decision != format!("active tier: {active}") {
        out.push_str(&format!("why: {decision}\n"));
    }
    let last_change = text(status, "last_change");
    if !last_change.is_empty() && last_change != decision {
        out.push_str(&format!("last change: {last_change}\n"));
    }
    if let Some(instance) = status.get("instance") {
        out.push_str(&format!(
            "instance: {} ({})\n",
            text(instance, "id"),
            text(instance, "state_dir")
        ));
    }
    out.push('\n');
    let header = [
        "", "TIER", "STATE", "BREAKER", "FAILS", "RESTARTS", "SINCE", "REASON",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for t in status
        .get("tiers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let is_active = t.get("active").and_then(Value::as_bool).unwrap_or(false);
        rows.push(vec![
            if is_active { "*".into() } else { String::new() },
            text(t, "tier"),
            text(t, "state"),
            text(t, "breaker"),
            text(t, "consecutive_failures"),
            format!(
                "{}/{}",
                text(t, "backend_restarts"),
                text(t, "actor_restarts")
            ),
            text(t, "since"),
            text(t, "reason"),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str("\nRESTARTS = backend restarts / tier actor restarts\n");
    out.push_str(&render_router(status.get("router")));
    out
}

/// The router's lines of `cascade status`.
fn render_router(router: Option<&Value>) -> String {
    let Some(router) = router.filter(|r| !r.is_null()) else {
        return "\nrouter: disabled\n".into();
    };
    let field = |key: &str| router.get(key).map(Value::to_string).unwrap_or_default();
    let address = router.get("address").and_then(Value::as_str).unwrap_or("?");
    let rate = router
        .get("request_rate")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let mut out = format!(
        "\nrouter: http://{address}  in flight {}  {rate:.1} req/s  {} requests, {} retried\n",
        field("in_flight"),
        field("requests"),
        field("retried"),
    );
    if let Some(last) = router.get("last_retried_failover").filter(|l| !l.is_null()) {
        let text = |key: &str| last.get(key).and_then(Value::as_str).unwrap_or("?");
        out.push_str(&format!(
            "last retried failover: {} → {} at {} ({})\n",
            text("from"),
            text("to"),
            text("at"),
            text("error"),
        ));
    }
    out
}
