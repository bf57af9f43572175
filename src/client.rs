//! The CLI's side of the status API: `cascade status` and `cascade restart`.

use std::net::SocketAddr;
use std::time::Duration;

use cascade_actors::contract::RestartReport;
use serde_json::Value;

use crate::config::{self, Config};
use crate::state;

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
    #[error(transparent)]
    State(#[from] state::StateError),
}

pub struct Client {
    http: reqwest::Client,
    addr: SocketAddr,
    config: Config,
}

impl Client {
    pub fn new(config: Config, timeout: Duration) -> Result<Client, ClientError> {
        let dir = config::state_dir(&config);
        // The running cascade wrote where it actually listens (it may differ
        // from the configuration when the port was 0).
        let addr = state::read_api_addr(&dir).unwrap_or(config.api.listen);
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
            .map_err(|e| ClientError::Unreachable {
                addr,
                cause: e.to_string(),
            })?;
        Ok(Client { http, addr, config })
    }

    pub async fn status(&self) -> Result<Value, ClientError> {
        self.get_json("/status").await
    }

    pub async fn restart(
        &self,
        tier: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<RestartReport, ClientError> {
        let token = state::read_token(&config::state_dir(&self.config))?;
        let url = format!(
            "http://{}/tiers/{tier}/restart?force={force}&dry_run={dry_run}",
            self.addr
        );
        let response = self
            .http
            .post(url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let value = self.read(response).await?;
        serde_json::from_value(value).map_err(|e| ClientError::BadReply {
            addr: self.addr,
            cause: e.to_string(),
        })
    }

    async fn get_json(&self, path: &str) -> Result<Value, ClientError> {
        let url = format!("http://{}{path}", self.addr);
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        self.read(response).await
    }

    async fn read(&self, response: reqwest::Response) -> Result<Value, ClientError> {
        let status = response.status();
        let value: Value = response.json().await.map_err(|e| ClientError::BadReply {
            addr: self.addr,
            cause: e.to_string(),
        })?;
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_owned();
            return Err(ClientError::Refused {
                addr: self.addr,
                status: status.as_u16(),
                message,
            });
        }
        Ok(value)
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            addr: self.addr,
            cause: cascade_actors::text::root_cause(e),
        }
    }
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
    let decision = text(status, "decision");
    if !decision.is_empty() {
        out.push_str(&format!("last decision: {decision}\n"));
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
