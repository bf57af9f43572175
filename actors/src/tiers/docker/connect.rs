//! Reaching the Docker daemon: where it is, whether it is installed, a
//! connection with a negotiated API version, and one deadline per call.
//!
//! Invariant: no Docker call is awaited without a deadline. bollard's own
//! timeout is whole seconds and covers only response headers, so every call
//! goes through [`Connector::call`] (or [`Connector::ping`]), and a daemon
//! that accepts and never answers yields [`DockerError::NotResponding`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker};

use super::config::DockerConfig;
use crate::resilience::with_deadline;

const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Why a Docker call did not succeed, in the words the tier reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerError {
    #[error("not installed (no socket at {socket} and no docker CLI on PATH)")]
    NotInstalled { socket: String },
    #[error("daemon not running ({cause})")]
    NotRunning { cause: String },
    #[error("daemon not responding ({what} took longer than {})", crate::text::duration(*after))]
    NotResponding { what: String, after: Duration },
    /// The daemon answered with an error status.
    #[error("{what}: HTTP {status}: {message}")]
    Api {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what}: {cause}")]
    Other { what: String, cause: String },
}

impl DockerError {
    /// The daemon answered; the failure is about the request (404, 409, ...).
    pub fn status(&self) -> Option<u16> {
        match self {
            DockerError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The daemon itself is unusable (not running, not responding, not installed).
    pub fn is_daemon_down(&self) -> bool {
        matches!(
            self,
            DockerError::NotInstalled { .. }
                | DockerError::NotRunning { .. }
                | DockerError::NotResponding { .. }
        )
    }
}

/// What the docker CLI reads from the environment, read by the process when
/// it builds tier specs (at start and on reload) and handed to the driver,
/// so nothing in the tier reads environment variables and tests need not
/// set them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerEnv {
    /// `DOCKER_HOST`.
    pub host: Option<String>,
}

impl DockerEnv {
    pub fn from_env() -> DockerEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        DockerEnv {
            host: var("DOCKER_HOST"),
        }
    }
}

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerHost {
    Unix(PathBuf),
    Tcp(String),
}

impl DockerHost {
    /// From the configuration, else `DOCKER_HOST`, else the default socket.
    pub fn resolve(configured: Option<&str>, env: &DockerEnv) -> DockerHost {
        let host = configured.or(env.host.as_deref()).map(str::to_owned);
        match host {
            Some(h) if h.starts_with("tcp://") || h.starts_with("http://") => DockerHost::Tcp(h),
            Some(h) => DockerHost::Unix(PathBuf::from(h.trim_start_matches("unix://"))),
            None => DockerHost::Unix(PathBuf::from(DEFAULT_SOCKET)),
        }
    }
}

impl std::fmt::Display for DockerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DockerHost::Unix(path) => write!(f, "unix://{}", path.display()),
            DockerHost::Tcp(host) => f.write_str(host),
        }
    }
}

/// A lazily connected, cheaply cloned handle on the daemon.
#[derive(Clone)]
pub struct Connector {
    host: DockerHost,
    ping_timeout: Duration,
    call_timeout: Duration,
    /// The negotiated client, dropped when the daemon goes away so the next
    /// call negotiates again (the daemon may come back as another version).
    docker: Arc<tokio::sync::Mutex<Option<Docker>>>,
}

impl Connector {
    pub fn new(config: &DockerConfig, env: &DockerEnv) -> Connector {
        Connector::with_host(
            DockerHost::resolve(config.host.as_deref(), env),
            config.ping_timeout,
            config.call_timeout,
        )
    }

    pub fn with_host(
        host: DockerHost,
        ping_timeout: Duration,
        call_timeout: Duration,
    ) -> Connector {
        Connector {
            host,
            ping_timeout,
            call_timeout,
            docker: Arc::default(),
        }
    }

    pub fn host(&self) -> &DockerHost {
        &self.host
    }

    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// "Installed?": the socket exists, or the docker CLI is on PATH.
    pub fn installed(&self) -> bool {
        match &self.host {
            DockerHost::Unix(path) => path.exists() || cli_on_path(),
            DockerHost::Tcp(_) => true,
        }
    }

    /// "Daemon running?": a ping within `ping_timeout`. Starts nothing.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.ping_within(self.ping_timeout).await
    }

    pub async fn ping_within(&self, timeout: Duration) -> Result<(), DockerError> {
        let docker = self.client(timeout).await?;
        self.run("ping", timeout, docker.ping()).await.map(drop)
    }

    /// Runs one Docker call under `call_timeout`.
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, DockerError>
    where
        F: FnOnce(Docker) -> Fut,
        Fut: Future<Output = Result<T, bollard::errors::Error>>,
    {
        self.call_within(what, self.call_timeout, f).await
    }

    /// Runs one Docker call under `within` instead of `call_timeout`: longer
    /// for a stop or restart that waits out a container's grace, shorter for
    /// a probe that must fit its own deadline.
    pub async fn call_within<T, F, Fut>(
        &self,
        what: &str,
        within: Duration,
        f: F,
    ) -> Result<T, DockerError>
    where
        F: FnOnce(Docker) -> Fut,
        Fut: Future<Output = Result<T, bollard::errors::Error>>,
    {
        let docker = self.client(within).await?;
        // bollard's own timeout (whole seconds) must not cut a call we allow
        // to take longer; our deadline is the real bound.
        let docker = docker.with_timeout(within + Duration::from_secs(1));
        self.run(what, within, f(docker)).await
    }

    /// A connected client, for streams (events) whose items the caller bounds itself.
    pub async fn client(&self, timeout: Duration) -> Result<Docker, DockerError> {
        let mut slot = self.docker.lock().await;
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        if let DockerHost::Unix(path) = &self.host
            && !path.exists()
        {
            return Err(if cli_on_path() {
                DockerError::NotRunning {
                    cause: format!("no socket at {}", path.display()),
                }
            } else {
                DockerError::NotInstalled {
                    socket: path.display().to_string(),
                }
            });
        }
        let docker = self.connect()?;
        // An old daemon refuses bollard's newest API version; ask it which it speaks.
        let docker =
            match with_deadline(timeout, "version negotiation", docker.negotiate_version()).await {
                Ok(Ok(docker)) => docker,
                Ok(Err(e)) => return Err(classify("version negotiation", e)),
                Err(_) => {
                    return Err(DockerError::NotResponding {
                        what: "version negotiation".into(),
                        after: timeout,
                    });
                }
            };
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Drops the cached client; the next call connects and negotiates again.
    pub async fn forget(&self) {
        self.docker.lock().await.take();
    }

    fn connect(&self) -> Result<Docker, DockerError> {
        // bollard's timeout is a backstop; the real bound is our deadline.
        let backstop = self.call_timeout.as_secs().max(1) + 1;
        let result = match &self.host {
            DockerHost::Unix(path) => {
                Docker::connect_with_unix(&path.to_string_lossy(), backstop, API_DEFAULT_VERSION)
            }
            DockerHost::Tcp(host) => Docker::connect_with_http(host, backstop, API_DEFAULT_VERSION),
        };
        result.map_err(|e| DockerError::Other {
            what: format!("connecting to {}", self.host),
            cause: e.to_string(),
        })
    }

    async fn run<T>(
        &self,
        what: &str,
        timeout: Duration,
        fut: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, DockerError> {
        let result = match with_deadline(timeout, what, fut).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => classify(what, e),
            Err(_) => DockerError::NotResponding {
                what: what.into(),
                after: timeout,
            },
        };
        if result.is_daemon_down() {
            self.forget().await;
        }
        Err(result)
    }
}

/// Sorts a bollard error into what the tier reports.
pub fn classify(what: &str, error: bollard::errors::Error) -> DockerError {
    use bollard::errors::Error as E;
    match error {
        E::DockerResponseServerError {
            status_code,
            message,
        } => DockerError::Api {
            what: what.into(),
            status: status_code,
            message,
        },
        E::RequestTimeoutError => DockerError::NotResponding {
            what: what.into(),
            after: Duration::ZERO,
        },
        other => {
            let cause = crate::text::root_cause(&other);
            let lower = cause.to_lowercase();
            if lower.contains("connection refused")
                || lower.contains("no such file")
                || lower.contains("connect")
            {
                DockerError::NotRunning { cause }
            } else {
                DockerError::Other {
                    what: what.into(),
                    cause,
                }
            }
        }
    }
}

fn cli_on_path() -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join("docker"))))
        .unwrap_or(false)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
