//! Notifications of autoheal's restarts and give-ups: an optional JSON POST
//! to `[tiers.docker.webhook] url`.
//!
//! Owns the HTTP client for the webhook and nothing else. Invariants: a
//! notification never delays healing (each one is sent from a task in the
//! caller's `TaskTracker`, bounded by `webhook.timeout` and ended by its
//! cancellation token); a failed POST is logged and dropped, never retried,
//! because the next restart or give-up carries the up-to-date count anyway;
//! the URL (for Slack or Discord, the credential itself) is never logged:
//! logs show its scheme and host.

use std::time::SystemTime;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::contract::rfc3339;
use crate::tiers::docker::config::WebhookConfig;

/// What happened to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    Restart,
    /// A restart request failed; autoheal tries again after its backoff.
    RestartFailed,
    GiveUp,
}

impl std::fmt::Display for NoticeKind {
    /// As the JSON body names it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoticeKind::Restart => "restart",
            NoticeKind::RestartFailed => "restart_failed",
            NoticeKind::GiveUp => "give_up",
        })
    }
}

/// The JSON body of one notification.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    pub event: NoticeKind,
    /// The container's name.
    pub container: String,
    pub id: String,
    pub image: String,
    /// Why it was restarted, or why autoheal gave up on it.
    pub reason: String,
    /// Restarts autoheal has made of this container so far.
    pub restarts: u64,
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
}

/// Sends [`Notice`]s when a webhook is configured; does nothing otherwise.
#[derive(Clone)]
pub struct Notifier {
    /// `None` when no URL is configured (or the client could not be built).
    target: Option<Target>,
}

#[derive(Clone)]
struct Target {
    url: String,
    /// docker-autoheal's `{"<key>": "<text>"}` instead of the notice.
    json_key: Option<String>,
    /// Carries `webhook.timeout` and ignores proxy variables: the hook is
    /// usually on the operator's network, and a stray `HTTP_PROXY` must not
    /// reroute it.
    client: reqwest::Client,
}

impl Notifier {
    pub fn new(config: &WebhookConfig) -> Notifier {
        let Some(url) = config.url.clone() else {
            return Notifier { target: None };
        };
        match reqwest::Client::builder()
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
        {
            Ok(client) => Notifier {
                target: Some(Target {
                    url,
                    json_key: config.json_key.clone(),
                    client,
                }),
            },
            Err(error) => {
                let url = crate::secrets::url_for_logs(&url);
                warn!(%error, %url, "Webhook disabled: cannot build its HTTP client.");
                Notifier { target: None }
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// POSTs `notice` from a task in `tasks`; returns at once.
    pub fn send(&self, tasks: &TaskTracker, cancel: &CancellationToken, notice: Notice) {
        let Some(target) = self.target.clone() else {
            return;
        };
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let container = notice.container.clone();
            let event = notice.event;
            // The client's timeout bounds the POST; cancellation ends it sooner
            // when cascade shuts down.
            match cancel.run_until_cancelled(post(&target, &notice)).await {
                Some(Ok(())) => debug!(%container, %event, "Webhook delivered."),
                Some(Err(error)) => {
                    let url = crate::secrets::url_for_logs(&target.url);
                    warn!(%error, %container, %event, %url, "Webhook failed.");
                }
                None => debug!(%container, %event, "Webhook abandoned: shutting down."),
            }
        });
    }
}

/// One line for a person, as docker-autoheal words its notifications.
fn text(notice: &Notice) -> String {
    let id: String = notice.id.chars().take(12).collect();
    let who = format!("Container {} ({id})", notice.container);
    match notice.event {
        NoticeKind::Restart => format!(
            "{who} found to be {} - restarted by cascade ({} restart{} so far)",
            notice.reason,
            notice.restarts,
            if notice.restarts == 1 { "" } else { "s" }
        ),
        NoticeKind::RestartFailed => {
            format!("{who} {} - failed to restart the container!", notice.reason)
        }
        NoticeKind::GiveUp => format!("{who}: cascade {}", notice.reason),
    }
}

async fn post(target: &Target, notice: &Notice) -> Result<(), String> {
    let request = target.client.post(&target.url);
    let request = match &target.json_key {
        Some(key) => request.json(&serde_json::json!({ key.as_str(): text(notice) })),
        None => request.json(notice),
    };
    let response = request
        .send()
        .await
        // The URL is the credential (Slack, Discord): never in the error.
        .map_err(|e| crate::text::root_cause(&e.without_url()))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn notice_serializes_as_documented() {
        let notice = Notice {
            event: NoticeKind::GiveUp,
            container: "svc".into(),
            id: "abc".into(),
            image: "img:1".into(),
            reason: "3 restarts within 1m".into(),
            restarts: 2,
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_500),
        };
        let json = serde_json::to_value(&notice).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "event": "give_up",
                "container": "svc",
                "id": "abc",
                "image": "img:1",
                "reason": "3 restarts within 1m",
                "restarts": 2,
                "time": "1970-01-01T00:00:01.500Z",
            })
        );
        let restart = serde_json::to_value(NoticeKind::Restart).expect("serializes");
        assert_eq!(restart, "restart");
    }

    #[tokio::test]
    async fn a_failed_post_never_names_the_url() {
        // Nothing listens on port 9 of loopback: the POST fails at once.
        let config = WebhookConfig {
            url: Some("http://127.0.0.1:9/services/T000/B000/XXXXSECRET".into()),
            ..WebhookConfig::default()
        };
        let target = Notifier::new(&config).target.expect("enabled");
        let notice = Notice {
            event: NoticeKind::Restart,
            container: "svc".into(),
            id: "abc".into(),
            image: "img:1".into(),
            reason: "died".into(),
            restarts: 1,
            time: SystemTime::UNIX_EPOCH,
        };
        let error = post(&target, &notice).await.expect_err("nothing listens");
        assert!(!error.contains("SECRET"), "{error}");
        assert!(!error.contains("services"), "{error}");
    }

    #[test]
    fn a_json_key_sends_docker_autoheals_one_line_shape() {
        let notice = Notice {
            event: NoticeKind::Restart,
            container: "svc".into(),
            id: "0123456789abcdef".into(),
            image: "img:1".into(),
            reason: "unhealthy".into(),
            restarts: 2,
            time: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(
            text(&notice),
            "Container svc (0123456789ab) found to be unhealthy - restarted by cascade (2 restarts so far)"
        );
        let gave_up = Notice {
            event: NoticeKind::GiveUp,
            reason: "gave up after 3 restarts within 1m".into(),
            ..notice
        };
        assert_eq!(
            text(&gave_up),
            "Container svc (0123456789ab): cascade gave up after 3 restarts within 1m"
        );
    }

    #[test]
    fn no_url_means_disabled() {
        assert!(!Notifier::new(&WebhookConfig::default()).enabled());
        let on = WebhookConfig {
            url: Some("http://127.0.0.1:9/hook".into()),
            ..WebhookConfig::default()
        };
        assert!(Notifier::new(&on).enabled());
    }
}
