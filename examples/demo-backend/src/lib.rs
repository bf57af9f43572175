//! # cascade-demo: a stand-in for the ECAPA speaker-embedding service
//!
//! **This is not a model.** It is a small HTTP server that speaks the ECAPA
//! service's contract (`GET /health`, `POST /embed` with a 16-bit PCM WAV body,
//! 192-float embeddings) so that cascade can be demonstrated and tested
//! without GPUs or weights. Its "embeddings" are a deterministic hash of the
//! samples ([`embed`]): identical audio gives an identical vector, but the
//! vectors carry no speaker information whatsoever.
//!
//! Two diagnostic routes serve testing a proxy in front of it: `/echo`
//! answers the request it received (method, path, headers) as JSON, and
//! `GET /stream` answers in chunks, optionally holding all but the first
//! until `POST /stream/release`.
//!
//! It exists to misbehave on request: [`Options`] can delay start-up, add
//! latency to every request, make `/health` start failing, or make the server
//! stop so that its process exits with a chosen code.
//!
//! This crate owns the options, the server lifecycle ([`bind`], [`Server::run`],
//! [`serve`]) and re-exports the router and the embedding function. It never
//! installs a global tracing subscriber; the binary does that.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod embed;
mod http;
pub mod image;
#[cfg(test)]
mod tests;

use std::future::{Future, IntoFuture};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{error, info};

pub use embed::{EMBEDDING_DIM, MAX_AUDIO_SECONDS, embed};
pub use http::{AppState, ECHO_HOP_BY_HOP, MAX_BODY_BYTES, MODEL_LABEL, router};

/// Port used when neither `--port`, `DEMO_PORT` nor `PORT` says otherwise.
pub const DEFAULT_PORT: u16 = 8080;

/// Command-line and environment knobs of the demo backend (a stand-in for
/// the ECAPA service, not a model). Embeddable in another binary's CLI.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Address to listen on.
    #[arg(long, env = "DEMO_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,

    /// Port to listen on; 0 picks any free port. If DEMO_PORT is unset, the
    /// PORT environment variable is used as the default.
    #[arg(long, env = "DEMO_PORT", default_value_t = default_port())]
    pub port: u16,

    /// Make GET /health answer 503 once this many seconds have passed since
    /// the listener was bound.
    #[arg(long, env = "DEMO_FAIL_HEALTH_AFTER", value_name = "SECONDS", value_parser = parse_seconds)]
    pub fail_health_after: Option<f64>,

    /// Stop serving this many seconds after the listener was bound; the
    /// process then exits with --exit-code, without draining requests.
    #[arg(long, env = "DEMO_EXIT_AFTER", value_name = "SECONDS", value_parser = parse_seconds)]
    pub exit_after: Option<f64>,

    /// Exit code used when --exit-after fires.
    #[arg(
        long,
        env = "DEMO_EXIT_CODE",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub exit_code: i32,

    /// Extra latency added to every request, in milliseconds.
    #[arg(long, env = "DEMO_LATENCY_MS", value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Delay before the listener binds, simulating model loading, in milliseconds.
    #[arg(
        long,
        env = "DEMO_STARTUP_DELAY_MS",
        value_name = "MS",
        default_value_t = 0
    )]
    pub startup_delay_ms: u64,

    /// Name reported by GET /health.
    #[arg(long, env = "DEMO_NAME", default_value = "demo-ecapa")]
    pub name: String,

    /// Do not serve: GET http://127.0.0.1:PORT/health once and exit 0 on a
    /// 200, 1 otherwise (a HEALTHCHECK for images without curl).
    #[arg(long)]
    pub healthcheck: bool,
}

/// The documented defaults; unlike the CLI, this ignores the environment.
impl Default for Options {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: DEFAULT_PORT,
            fail_health_after: None,
            exit_after: None,
            exit_code: 1,
            latency_ms: 0,
            startup_delay_ms: 0,
            name: "demo-ecapa".to_string(),
            healthcheck: false,
        }
    }
}

/// Why [`Server::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The shutdown future resolved and in-flight requests were drained;
    /// a binary should exit 0.
    Shutdown,
    /// `exit_after` elapsed; the caller should exit with this code
    /// (the binary calls `std::process::exit`).
    ExitRequested(i32),
}

/// A bound, not yet serving, demo backend.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    exit_after: Option<Duration>,
    exit_code: i32,
}

/// Waits `startup_delay_ms`, then binds the listener. Uptime, the health
/// failure and the exit timer all count from the moment of binding.
///
/// Fails with `InvalidInput` if a duration is negative or not finite.
pub async fn bind(opts: Options) -> io::Result<Server> {
    // Validated before the delay so a bad option fails fast.
    let exit_after = opts
        .exit_after
        .map(|secs| seconds(secs, "exit_after"))
        .transpose()?;
    if let Some(secs) = opts.fail_health_after {
        seconds(secs, "fail_health_after")?;
    }
    if opts.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(opts.startup_delay_ms)).await;
    }
    let listener = TcpListener::bind((opts.host, opts.port)).await?;
    let local_addr = listener.local_addr()?;
    let state = AppState::new(
        opts.name,
        opts.fail_health_after,
        Duration::from_millis(opts.latency_ms),
    )?;
    Ok(Server {
        listener,
        local_addr,
        state,
        exit_after,
        exit_code: opts.exit_code,
    })
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves (graceful: in-flight requests finish,
    /// then [`Outcome::Shutdown`]) or `exit_after` elapses (abrupt: the accept
    /// loop is dropped at once, like a crash, then
    /// [`Outcome::ExitRequested`]). Exiting the process is left to the caller.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<Outcome> {
        info!(addr = %self.local_addr, "demo backend listening");
        let exit_at = self.exit_after.map(|d| self.state.started() + d);
        let exit_timer = async move {
            match exit_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let serving = axum::serve(self.listener, router(self.state))
            .with_graceful_shutdown(shutdown)
            .into_future();
        tokio::select! {
            result = serving => result.map(|()| Outcome::Shutdown),
            () = exit_timer => {
                info!(code = self.exit_code, "exit-after elapsed, stopping");
                Ok(Outcome::ExitRequested(self.exit_code))
            }
        }
    }
}

/// [`bind`] then [`Server::run`].
pub async fn serve(
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<Outcome> {
    bind(opts).await?.run(shutdown).await
}

/// The clap default for `--port`: `$PORT` if it holds a port number, else 8080.
fn default_port() -> u16 {
    port_or_default(std::env::var("PORT").ok().as_deref())
}

fn port_or_default(port_env: Option<&str>) -> u16 {
    port_env
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(DEFAULT_PORT)
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    seconds(secs, "value").map_err(|e| e.to_string())?;
    Ok(secs)
}

/// Converts option seconds to a Duration; `Duration::from_secs_f64` would
/// panic on negative or non-finite input, which may arrive from library callers.
pub(crate) fn seconds(secs: f64, what: &str) -> io::Result<Duration> {
    Duration::try_from_secs_f64(secs).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} must be a finite, non-negative number of seconds, got {secs}"),
        )
    })
}

type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the server until SIGINT/SIGTERM (exit code 0) or `--exit-after`
/// (its exit code); 1 if it cannot start. For binaries embedding the demo.
pub async fn run_until_signal(opts: Options) -> i32 {
    if opts.healthcheck {
        return healthcheck(opts.port).await;
    }
    let mut shutdown = match shutdown_signal() {
        Ok(signal) => signal,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return 1;
        }
    };
    // A signal during the simulated model load must stop us too, not wait for it.
    let server = tokio::select! {
        bound = bind(opts) => match bound {
            Ok(server) => server,
            Err(e) => {
                error!(error = %e, "cannot start demo backend");
                return 1;
            }
        },
        () = &mut shutdown => {
            info!("shutdown requested before listening");
            return 0;
        }
    };
    match server.run(shutdown).await {
        Ok(Outcome::Shutdown) => {
            info!("demo backend shut down");
            0
        }
        Ok(Outcome::ExitRequested(code)) => code,
        Err(e) => {
            error!(error = %e, "demo backend failed");
            1
        }
    }
}

/// Resolves on SIGINT or SIGTERM. Handlers are installed up front so a
/// failure to install them is reported instead of silently ignored.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<Shutdown> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }))
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<Shutdown> {
    Ok(Box::pin(async {
        // Without a handler we could not stop gracefully; run until killed.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }))
}

/// One GET of our own /health over a bare socket, within two seconds.
async fn healthcheck(port: u16) -> i32 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let check = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<bool, io::Error>(head.starts_with(b"HTTP/1.1 200"))
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(true)) => 0,
        _ => 1,
    }
}
