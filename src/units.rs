//! `cascade install-unit`: a systemd unit or a launchd agent for this binary
//! and configuration.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// The unit template, shipped as `config/cascade.service`.
const SYSTEMD_TEMPLATE: &str = include_str!("../config/cascade.service");

/// launchd's label for cascade's agent.
pub const LAUNCHD_LABEL: &str = "dev.cascade.agent";

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("cannot find the cascade executable: {0}")]
    Exe(std::io::Error),
    #[error("configuration file {path}: {source}")]
    Config {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a path in the unit contains a character the unit format cannot hold: {0}")]
    Path(String),
    #[error("cannot build the property list: {0}")]
    Plist(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a unit needs to know about the configuration it runs.
pub struct ServiceFacts {
    /// How long a clean stop may take; the service manager must wait longer.
    pub stop_within: Duration,
    /// Where the status API listens.
    pub listen: SocketAddr,
}

impl ServiceFacts {
    pub fn of(config: &Config) -> ServiceFacts {
        // The tiers' stop budget, then the telemetry flush, and the status
        // API and root each waited for at most 5 s (`run.rs`), plus a margin.
        let instance = cascade_actors::Instance::from_state_dir(&crate::config::state_dir(config));
        let stop_within = crate::run::stop_budget(&crate::config::tier_specs(config, &instance))
            .saturating_add(config.telemetry.shutdown_timeout)
            .saturating_add(Duration::from_secs(15));
        ServiceFacts {
            stop_within,
            listen: config.api.listen,
        }
    }

    /// The status page's URL, reachable from the host itself.
    fn status_page(&self) -> String {
        let mut addr = self.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{addr}/")
    }

    /// Whole seconds, rounded up.
    fn stop_secs(&self) -> u64 {
        let d = self.stop_within;
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }
}

/// The systemd unit with `{exe}`, `{config}`, `{status_page}` and
/// `{timeout_stop}` filled in.
pub fn systemd_unit(exe: &Path, config: &Path, facts: &ServiceFacts) -> Result<String, UnitError> {
    Ok(SYSTEMD_TEMPLATE
        .replace("{exe}", &unit_path(exe)?)
        .replace("{config}", &unit_path(config)?)
        .replace("{status_page}", &facts.status_page())
        .replace("{timeout_stop}", &format!("{}s", facts.stop_secs())))
}

/// Paths go into ExecStart unquoted, so refuse what would split or escape them.
fn unit_path(path: &Path) -> Result<String, UnitError> {
    let text = path
        .to_str()
        .ok_or_else(|| UnitError::Path(path.display().to_string()))?;
    if text
        .chars()
        .any(|c| c.is_whitespace() || c == '%' || c == '$' || c == '"' || c == '\\')
    {
        return Err(UnitError::Path(text.to_owned()));
    }
    Ok(text.to_owned())
}

/// A launchd agent: kept alive, restarts throttled, logs to the state directory.
pub fn launchd_plist(
    exe: &Path,
    config: &Path,
    log_dir: &Path,
    facts: &ServiceFacts,
) -> Result<String, UnitError> {
    use plist::Value;
    let text = |p: &Path| Value::String(p.display().to_string());
    let mut dict = plist::Dictionary::new();
    dict.insert("Label".into(), Value::String(LAUNCHD_LABEL.into()));
    dict.insert(
        "ProgramArguments".into(),
        Value::Array(vec![
            text(exe),
            Value::String("run".into()),
            Value::String("--config".into()),
            text(config),
            Value::String("--log-format".into()),
            Value::String("json".into()),
        ]),
    );
    dict.insert("RunAtLoad".into(), Value::Boolean(true));
    // Restart on any exit except a clean shutdown (exit 0).
    let mut keep_alive = plist::Dictionary::new();
    keep_alive.insert("SuccessfulExit".into(), Value::Boolean(false));
    dict.insert("KeepAlive".into(), Value::Dictionary(keep_alive));
    // At most one restart every 10 s, launchd's own crash-loop guard.
    dict.insert("ThrottleInterval".into(), Value::Integer(10.into()));
    // cascade stops its tiers within their grace periods before SIGKILL.
    dict.insert(
        "ExitTimeOut".into(),
        Value::Integer(facts.stop_secs().into()),
    );
    dict.insert("ProcessType".into(), Value::String("Background".into()));
    dict.insert(
        "StandardErrorPath".into(),
        text(&log_dir.join("cascade.log")),
    );
    dict.insert("StandardOutPath".into(), text(&log_dir.join("cascade.out")));
    let env: BTreeMap<&str, &str> = BTreeMap::from([("CASCADE_LOG", "info")]);
    let env = env
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect();
    dict.insert("EnvironmentVariables".into(), Value::Dictionary(env));
    let mut out = Vec::new();
    Value::Dictionary(dict)
        .to_writer_xml(&mut out)
        .map_err(|e| UnitError::Plist(e.to_string()))?;
    String::from_utf8(out).map_err(|e| UnitError::Plist(e.to_string()))
}

/// Where the unit goes unless `--output` says otherwise.
pub fn default_path(systemd: bool) -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    if systemd {
        if nix::unistd::geteuid().is_root() {
            PathBuf::from("/etc/systemd/system/cascade.service")
        } else {
            let config = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".config"));
            config.join("systemd/user/cascade.service")
        }
    } else {
        home.join("Library/LaunchAgents")
            .join(format!("{LAUNCHD_LABEL}.plist"))
    }
}

pub fn current_exe() -> Result<PathBuf, UnitError> {
    std::env::current_exe().map_err(UnitError::Exe)
}

/// The configuration path as the service will see it: absolute and existing.
pub fn absolute_config(path: &Path) -> Result<PathBuf, UnitError> {
    std::fs::canonicalize(path).map_err(|source| UnitError::Config {
        path: path.to_owned(),
        source,
    })
}

pub fn write(path: &Path, contents: &str) -> Result<(), UnitError> {
    let err = |source| UnitError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(path, contents).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_systemd_unit_is_filled_in_and_refuses_unsafe_paths() {
        let facts = ServiceFacts {
            stop_within: Duration::from_millis(95_500),
            listen: "0.0.0.0:7373".parse().unwrap(),
        };
        let unit = systemd_unit(
            Path::new("/usr/bin/cascade"),
            Path::new("/etc/cascade.toml"),
            &facts,
        )
        .unwrap();
        assert!(unit.contains("TimeoutStopSec=96s"), "{unit}");
        assert!(
            unit.contains("Documentation=http://127.0.0.1:7373/"),
            "{unit}"
        );
        assert!(unit.contains(
            "ExecStart=/usr/bin/cascade run --config /etc/cascade.toml --log-format json"
        ));
        assert!(unit.contains("Type=notify"));
        assert!(unit.contains("WatchdogSec="));
        assert!(!unit.contains('{'), "a placeholder was left: {unit}");
        assert!(
            systemd_unit(
                Path::new("/opt/my apps/cascade"),
                Path::new("/etc/c.toml"),
                &facts
            )
            .is_err()
        );
    }

    #[test]
    fn the_stop_timeout_covers_the_configured_stop_budget() {
        let mut config = Config::default();
        config.tiers.local = Some(cascade_actors::tiers::local::LocalConfig {
            stop_grace: Duration::from_secs(600),
            ..Default::default()
        });
        config.waterfall.order = vec![cascade_actors::TierId::Local];
        let facts = ServiceFacts::of(&config);
        assert!(
            facts.stop_within > Duration::from_secs(600),
            "{:?}",
            facts.stop_within
        );
    }

    #[test]
    fn the_launchd_plist_round_trips_with_keep_alive_and_throttle() {
        let xml = launchd_plist(
            Path::new("/usr/local/bin/cascade"),
            Path::new("/etc/c.toml"),
            Path::new("/tmp/logs"),
            &ServiceFacts::of(&Config::default()),
        )
        .unwrap();
        let value: plist::Value = plist::from_bytes(xml.as_bytes()).expect("valid plist");
        let dict = value.as_dictionary().expect("a dictionary");
        assert_eq!(
            dict.get("Label").and_then(|v| v.as_string()),
            Some(LAUNCHD_LABEL)
        );
        assert_eq!(
            dict.get("ThrottleInterval")
                .and_then(|v| v.as_signed_integer()),
            Some(10)
        );
        assert!(
            dict.get("KeepAlive")
                .and_then(|v| v.as_dictionary())
                .is_some()
        );
        let args = dict
            .get("ProgramArguments")
            .and_then(|v| v.as_array())
            .expect("arguments");
        assert_eq!(args[0].as_string(), Some("/usr/local/bin/cascade"));
    }
}
