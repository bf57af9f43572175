//! docker-autoheal's environment, read by `cascade autoheal` so that a
//! docker-autoheal setup (a compose file, a `docker run -e ...`) switches
//! without being rewritten.
//!
//! Each variable sets the `[tiers.docker]` setting it means, over what the
//! configuration says (file, `CASCADE_*` variables): a person who kept a
//! docker-autoheal variable in their environment meant it.
//!
//! Invariant: pure — the variables come in as a map, the settings and what
//! to tell the person come out; nothing here reads the environment.

use std::collections::HashMap;
use std::time::Duration;

use crate::tiers::docker::config::DockerConfig;

/// docker-autoheal's default `WEBHOOK_JSON_KEY`: Discord's `content`.
pub const DEFAULT_JSON_KEY: &str = "content";

/// What applying the variables found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// One line per variable that set something (`variable → key`).
    pub used: Vec<String>,
    /// Variables accepted but not needed, or not supported, and why.
    pub ignored: Vec<String>,
    /// (variable, problem): a value that cannot be used.
    pub problems: Vec<(String, String)>,
}

/// Applies docker-autoheal's variables in `vars` to `docker`.
pub fn apply(vars: &HashMap<String, String>, docker: &mut DockerConfig) -> Applied {
    let mut applied = Applied::default();
    let get = |name: &str| {
        vars.get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let Some(label) = get("AUTOHEAL_CONTAINER_LABEL") {
        applied.used.push(format!(
            "AUTOHEAL_CONTAINER_LABEL={label} sets tiers.docker.autoheal.label"
        ));
        docker.autoheal.label = label;
    }
    if let Some(text) = get("AUTOHEAL_START_PERIOD") {
        match seconds("AUTOHEAL_START_PERIOD", &text) {
            Ok(period) => {
                applied.used.push(format!(
                    "AUTOHEAL_START_PERIOD={text} sets tiers.docker.autoheal.start_period"
                ));
                docker.autoheal.start_period = period;
            }
            Err(problem) => applied.problems.push(problem),
        }
    }
    if let Some(text) = get("AUTOHEAL_DEFAULT_STOP_TIMEOUT") {
        match seconds("AUTOHEAL_DEFAULT_STOP_TIMEOUT", &text) {
            Ok(timeout) => {
                applied.used.push(format!(
                    "AUTOHEAL_DEFAULT_STOP_TIMEOUT={text} sets tiers.docker.autoheal.stop_timeout"
                ));
                docker.autoheal.stop_timeout = timeout;
            }
            Err(problem) => applied.problems.push(problem),
        }
    }
    if let Some(text) = get("CURL_TIMEOUT") {
        match seconds("CURL_TIMEOUT", &text) {
            Ok(timeout) if !timeout.is_zero() => {
                applied.used.push(format!(
                    "CURL_TIMEOUT={text} sets tiers.docker.call_timeout"
                ));
                docker.call_timeout = timeout;
            }
            Ok(_) => applied
                .problems
                .push(("CURL_TIMEOUT".into(), "must be above zero".into())),
            Err(problem) => applied.problems.push(problem),
        }
    }
    if let Some(sock) = get("DOCKER_SOCK") {
        let host = if sock.starts_with("unix://") || sock.starts_with("tcp://") {
            sock.clone()
        } else if sock.starts_with('/') {
            format!("unix://{sock}")
        } else {
            applied.problems.push((
                "DOCKER_SOCK".into(),
                format!("`{sock}` is neither a socket path (/…) nor a unix:// or tcp:// address"),
            ));
            String::new()
        };
        if !host.is_empty() {
            applied
                .used
                .push(format!("DOCKER_SOCK={sock} sets tiers.docker.host"));
            docker.host = Some(host);
        }
    }
    if let Some(url) = get("WEBHOOK_URL") {
        let key = get("WEBHOOK_JSON_KEY").unwrap_or_else(|| DEFAULT_JSON_KEY.to_owned());
        applied.used.push(format!(
            "WEBHOOK_URL sets tiers.docker.webhook.url; notifications are {{\"{key}\": \"…\"}}"
        ));
        docker.webhook.url = Some(url);
        docker.webhook.json_key = Some(key);
    } else if get("WEBHOOK_JSON_KEY").is_some() {
        applied
            .ignored
            .push("WEBHOOK_JSON_KEY: no WEBHOOK_URL to post to".into());
    }
    if let Some(text) = get("AUTOHEAL_INTERVAL") {
        applied.ignored.push(format!(
            "AUTOHEAL_INTERVAL={text}: not needed, autoheal follows the Docker event stream instead of polling"
        ));
    }
    for name in [
        "APPRISE_URL",
        "POST_RESTART_SCRIPT",
        "AUTOHEAL_ONLY_MONITOR_RUNNING",
    ] {
        if get(name).is_some() {
            applied
                .ignored
                .push(format!("{name}: not supported by cascade; ignored"));
        }
    }
    applied
}

/// docker-autoheal's whole seconds.
fn seconds(name: &str, text: &str) -> Result<Duration, (String, String)> {
    text.parse::<u64>().map(Duration::from_secs).map_err(|_| {
        (
            name.to_owned(),
            format!("`{text}` is not a whole number of seconds"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_docker_autoheal_variable_sets_its_setting() {
        let mut docker = DockerConfig::default();
        let applied = apply(
            &vars(&[
                ("AUTOHEAL_CONTAINER_LABEL", "all"),
                ("AUTOHEAL_START_PERIOD", "7"),
                ("AUTOHEAL_DEFAULT_STOP_TIMEOUT", "3"),
                ("CURL_TIMEOUT", "12"),
                ("DOCKER_SOCK", "/run/other.sock"),
                ("WEBHOOK_URL", "https://hooks.example/x"),
                ("WEBHOOK_JSON_KEY", "text"),
                ("AUTOHEAL_INTERVAL", "5"),
            ]),
            &mut docker,
        );
        assert_eq!(applied.problems, []);
        assert_eq!(docker.autoheal.label, "all");
        assert_eq!(docker.autoheal.start_period, Duration::from_secs(7));
        assert_eq!(docker.autoheal.stop_timeout, Duration::from_secs(3));
        assert_eq!(docker.call_timeout, Duration::from_secs(12));
        assert_eq!(docker.host.as_deref(), Some("unix:///run/other.sock"));
        assert_eq!(
            docker.webhook.url.as_deref(),
            Some("https://hooks.example/x")
        );
        assert_eq!(docker.webhook.json_key.as_deref(), Some("text"));
        assert_eq!(applied.used.len(), 6, "{applied:?}");
        assert!(
            applied.ignored[0].starts_with("AUTOHEAL_INTERVAL=5: not needed"),
            "{applied:?}"
        );
    }

    #[test]
    fn without_variables_nothing_changes() {
        let mut docker = DockerConfig::default();
        assert_eq!(apply(&HashMap::new(), &mut docker), Applied::default());
        assert_eq!(docker, DockerConfig::default());
    }

    #[test]
    fn a_webhook_without_a_key_speaks_discord_as_docker_autoheal_does() {
        let mut docker = DockerConfig::default();
        apply(&vars(&[("WEBHOOK_URL", "https://h.example/")]), &mut docker);
        assert_eq!(docker.webhook.json_key.as_deref(), Some(DEFAULT_JSON_KEY));
    }

    #[test]
    fn bad_values_name_their_variable_and_change_nothing() {
        let mut docker = DockerConfig::default();
        let applied = apply(
            &vars(&[
                ("AUTOHEAL_START_PERIOD", "soon"),
                ("AUTOHEAL_DEFAULT_STOP_TIMEOUT", "-1"),
                ("DOCKER_SOCK", "docker.sock"),
                ("CURL_TIMEOUT", "0"),
            ]),
            &mut docker,
        );
        let named: Vec<&str> = applied.problems.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            named,
            [
                "AUTOHEAL_START_PERIOD",
                "AUTOHEAL_DEFAULT_STOP_TIMEOUT",
                "CURL_TIMEOUT",
                "DOCKER_SOCK"
            ]
        );
        assert!(applied.problems[0].1.contains("`soon`"), "{applied:?}");
        assert_eq!(docker, DockerConfig::default());
    }
}
