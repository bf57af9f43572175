//! Reaching the Docker daemon: where it is, whether it is installed, a
//! connection with a negotiated API version, and one deadline per call.
//!
//! Invariant: no Docker call is awaited without a deadline. bollard's own
//! timeout is whole seconds and covers only response headers, so every call
//! goes through [`Connector::call`] (or [`Connector::ping`]), and a daemon
//! that accepts and never answers yields [`DockerError::NotResponding`].
//! The deadline covers waiting for the connection too: one version
//! negotiation runs at a time, and a caller waiting behind it gives up at
//! its own deadline. A daemon found down (not running, not responding) is
//! remembered for `ping_timeout`: calls in that window fail at once with the
//! same error instead of negotiating again with a daemon that just did not
//! answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::{API_DEFAULT_VERSION, Docker};

use super::config::{DockerConfig, TlsConfig};
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
    /// `DOCKER_TLS_VERIFY` is set (to anything but the empty string, as the
    /// docker CLI reads it).
    pub tls_verify: bool,
    /// Where `ca.pem`, `cert.pem` and `key.pem` are: `DOCKER_CERT_PATH`, else
    /// `~/.docker`.
    pub cert_path: Option<PathBuf>,
}

impl DockerEnv {
    pub fn from_env() -> DockerEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let cert_path = var("DOCKER_CERT_PATH")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|home| Path::new(&home).join(".docker")));
        DockerEnv {
            host: var("DOCKER_HOST"),
            tls_verify: var("DOCKER_TLS_VERIFY").is_some(),
            cert_path,
        }
    }
}

/// The files of a TLS connection to the daemon, and where they were named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    /// The client certificate and its key, when there is one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// `tiers.docker.tls` or `DOCKER_TLS_VERIFY/DOCKER_CERT_PATH`, for errors.
    pub source: &'static str,
}

impl TlsFiles {
    /// From `tiers.docker.tls`, else from the environment when
    /// `DOCKER_TLS_VERIFY` is set (the client pair only when both files
    /// exist, as the docker CLI does).
    pub fn choose(config: Option<&TlsConfig>, env: &DockerEnv) -> Option<TlsFiles> {
        if let Some(tls) = config {
            return Some(TlsFiles {
                ca: tls.ca.clone(),
                identity: tls.cert.clone().zip(tls.key.clone()),
                source: "tiers.docker.tls",
            });
        }
        if !env.tls_verify {
            return None;
        }
        let dir = env.cert_path.clone().unwrap_or_default();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        Some(TlsFiles {
            ca: dir.join("ca.pem"),
            identity: (cert.exists() || key.exists()).then_some((cert, key)),
            source: "DOCKER_TLS_VERIFY and DOCKER_CERT_PATH",
        })
    }

    /// Each file is there and holds what it should, or an error naming it:
    /// bollard reads the client pair only during the handshake, where a bad
    /// file would be a nameless handshake failure.
    fn check(&self) -> Result<(), String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                format!(
                    "cannot read the {what} {} (from {}): {e}",
                    path.display(),
                    self.source
                )
            })
        };
        let certs = |what: &str, path: &Path| -> Result<(), String> {
            let pem = read(what, path)?;
            let found = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the {what} {} is not PEM: {e}", path.display()))?;
            if found.is_empty() {
                return Err(format!(
                    "the {what} {} holds no PEM certificate",
                    path.display()
                ));
            }
            Ok(())
        };
        certs("CA certificate", &self.ca)?;
        if let Some((cert, key)) = &self.identity {
            certs("client certificate", cert)?;
            let pem = read("client key", key)?;
            PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                format!(
                    "the client key {} holds no usable PEM private key: {e}",
                    key.display()
                )
            })?;
        }
        Ok(())
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
    /// TLS for a `tcp://` host.
    tls: Option<TlsFiles>,
    ping_timeout: Duration,
    call_timeout: Duration,
    slot: Arc<tokio::sync::Mutex<Slot>>,
}

/// The connection as the last caller left it.
#[derive(Default)]
struct Slot {
    /// The negotiated client, dropped when the daemon goes away so the next
    /// call negotiates again (the daemon may come back as another version).
    docker: Option<Docker>,
    /// The daemon was found down at this time, with this error: calls within
    /// `ping_timeout` of it fail at once with it.
    down: Option<(Instant, DockerError)>,
}

impl Connector {
    pub fn new(config: &DockerConfig, env: &DockerEnv) -> Connector {
        let host = DockerHost::resolve(config.host.as_deref(), env);
        let tls = TlsFiles::choose(config.tls.as_ref(), env);
        Connector::with_host(host, config.ping_timeout, config.call_timeout).with_tls(tls)
    }

    /// The same connector, over TLS with `tls` (a `tcp://` host only).
    pub fn with_tls(mut self, tls: Option<TlsFiles>) -> Connector {
        self.tls = tls;
        self
    }

    /// The TLS files in use, if any.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    pub fn with_host(
        host: DockerHost,
        ping_timeout: Duration,
        call_timeout: Duration,
    ) -> Connector {
        Connector {
            host,
            tls: None,
            ping_timeout,
            call_timeout,
            slot: Arc::default(),
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

    /// A connected client, for streams (events) whose items the caller bounds
    /// itself. Waiting for another caller's negotiation counts against
    /// `timeout`; a daemon found down within the last `ping_timeout` is
    /// reported at once.
    pub async fn client(&self, timeout: Duration) -> Result<Docker, DockerError> {
        let started = Instant::now();
        let Ok(mut slot) = tokio::time::timeout(timeout, self.slot.lock()).await else {
            return Err(DockerError::NotResponding {
                what: "version negotiation".into(),
                after: timeout,
            });
        };
        if let Some(docker) = slot.docker.as_ref() {
            return Ok(docker.clone());
        }
        if let Some((at, error)) = &slot.down
            && at.elapsed() < self.ping_timeout
        {
            return Err(error.clone());
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
        let left = timeout.saturating_sub(started.elapsed());
        let negotiated =
            match with_deadline(left, "version negotiation", docker.negotiate_version()).await {
                Ok(Ok(docker)) => Ok(docker),
                Ok(Err(e)) => Err(self.in_tls_terms(classify("version negotiation", e))),
                Err(_) => Err(DockerError::NotResponding {
                    what: "version negotiation".into(),
                    after: timeout,
                }),
            };
        match negotiated {
            Ok(docker) => {
                slot.down = None;
                slot.docker = Some(docker.clone());
                Ok(docker)
            }
            Err(e) => {
                if e.is_daemon_down() {
                    slot.down = Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
    }

    /// Drops the cached client; the next call connects and negotiates again.
    /// Never waits: a negotiation in flight makes a fresh client anyway.
    pub async fn forget(&self) {
        if let Ok(mut slot) = self.slot.try_lock() {
            slot.docker = None;
        }
    }

    /// A failed handshake names the files it used, so the person reading
    /// knows which CA or client certificate to look at.
    fn in_tls_terms(&self, error: DockerError) -> DockerError {
        let Some(tls) = &self.tls else {
            return error;
        };
        match error {
            DockerError::Other { what, cause }
                if ["certificate", "handshake", "tls", "alert"]
                    .iter()
                    .any(|w| cause.to_lowercase().contains(w)) =>
            {
                let identity = match &tls.identity {
                    Some((cert, _)) => format!("client certificate {}", cert.display()),
                    None => "no client certificate".into(),
                };
                DockerError::Other {
                    what,
                    cause: format!(
                        "TLS with {} failed (CA {}, {identity}, from {}): {cause}",
                        self.host,
                        tls.ca.display(),
                        tls.source
                    ),
                }
            }
            other => other,
        }
    }

    /// Drops the cached client and remembers why, so calls within
    /// `ping_timeout` fail at once instead of negotiating again. A
    /// negotiation in flight decides for itself, so this never waits.
    pub(crate) fn went_down(&self, error: &DockerError) {
        if let Ok(mut slot) = self.slot.try_lock() {
            slot.docker = None;
            slot.down = Some((Instant::now(), error.clone()));
        }
    }

    fn connect(&self) -> Result<Docker, DockerError> {
        // bollard's timeout is a backstop; the real bound is our deadline.
        let backstop = self.call_timeout.as_secs().max(1) + 1;
        let failed = |cause: String| DockerError::Other {
            what: format!("connecting to {}", self.host),
            cause,
        };
        let result = match (&self.host, &self.tls) {
            (DockerHost::Unix(path), None) => {
                Docker::connect_with_unix(&path.to_string_lossy(), backstop, API_DEFAULT_VERSION)
            }
            (DockerHost::Unix(_), Some(tls)) => {
                return Err(failed(format!(
                    "{} asks for TLS, which applies to a tcp:// host only",
                    tls.source
                )));
            }
            (DockerHost::Tcp(host), None) => {
                Docker::connect_with_http(host, backstop, API_DEFAULT_VERSION)
            }
            (DockerHost::Tcp(host), Some(tls)) => {
                tls.check().map_err(failed)?;
                install_crypto_provider();
                // bollard names the client pair's files only in its resolver;
                // without a pair these paths do not exist and none is sent.
                let (cert, key) = tls.identity.clone().unwrap_or_else(|| {
                    let none = tls.ca.with_file_name(".cascade-no-client-certificate");
                    (none.clone(), none)
                });
                Docker::connect_with_ssl(host, &key, &cert, &tls.ca, backstop, API_DEFAULT_VERSION)
            }
        };
        result.map_err(|e| failed(crate::text::root_cause(&e)))
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
            self.went_down(&result);
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
            // Nothing listens. A connection reset or a broken pipe is not
            // that: something accepted the connection and then dropped it.
            if lower.contains("connection refused") || lower.contains("no such file") {
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

/// rustls needs one process-wide crypto provider, and the dependency graph
/// enables two (ring and aws-lc-rs); ring is the one reqwest uses. Installing
/// is idempotent: a provider installed earlier stays.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
