//! # cascade-router: the address applications call
//!
//! Every HTTP request that reaches the router's listener is carried to the
//! active tier, and across a failover: a try that fails (connection error,
//! reset before the response head, 502/503/504, its per-try timeout) goes
//! to another endpoint of the same tier, then to the next serving tier in
//! waterfall order, within `max_attempts`, one overall deadline and the
//! retry budget, for replay-safe requests only. While a tier is starting,
//! requests wait (bounded) for it; when nothing can serve they get a 503
//! that names every tier and its reason.
//!
//! The data path is apart from the control path: the router reads the
//! [`RoutingTable`] the root publishes on a `watch` and reports request
//! outcomes to the tiers' actors by message ([`RequestReporter`]); it never
//! calls an actor per request, and keeps no breaker of its own.
//!
//! Built on hyper 1 (server: HTTP/1.1 and h2; client: hyper-util's pooled
//! client with keep-alive, h2 to https upstreams through ALPN), on tokio
//! runtimes of cascade's own: `workers` threads, each with a current-thread
//! runtime that accepts from the one listener and serves its connections
//! with its own connection pool, as nginx's worker processes do. A request
//! stays on one thread from accept to answer; the table, settings and
//! counters are shared.
//!
//! [`RequestReporter`]: cascade_actors::routing::RequestReporter

#![forbid(unsafe_code)]

mod body;
pub mod config;
mod headers;
mod plan;
mod pool;
mod proxy;
mod server;
pub mod stats;
#[cfg(test)]
mod tests;
mod timer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use cascade_actors::routing::RoutingTable;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::RouterConfig;
pub use stats::{History, RouterStatus};

use crate::plan::Plan;
use crate::proxy::{Settings, Shared};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr} (router.listen): {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS for https upstreams: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot start the router's worker threads (router.workers): {0}")]
    Workers(#[source] std::io::Error),
}

/// Binds the router's listener (done before anything starts, so a taken
/// port fails start-up at once).
pub async fn bind(config: &RouterConfig) -> Result<TcpListener, Error> {
    listen(config.listen).map_err(|source| Error::Listen {
        addr: config.listen,
        source,
    })
}

/// Connections the kernel completes for a listener before it accepts them.
/// `std`'s `bind` asks for 128: a burst of a few hundred clients connecting
/// at once (a fleet restarting, a load balancer's health checks, a
/// neighbour's connection storm) overflows that, and the kernel drops the
/// SYNs past it, so a well-behaved client waits a 1 s retransmission before
/// it is even seen. 1,024 is Go's and nginx's order of magnitude; the kernel
/// caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (and, like `std`,
/// `SO_REUSEADDR`, so a restart is not refused by the last run's
/// connections in TIME_WAIT). Used for the router and the status API.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The running router: its tasks, and the handles to reload and stop it.
pub struct Router {
    settings: watch::Sender<Arc<Settings>>,
    handle: RouterHandle,
    /// Stops accepting and starts the drain.
    stop: CancellationToken,
    /// Stops following the table (after the drain).
    follow_stop: CancellationToken,
    tasks: TaskTracker,
}

/// What the status API reads: copies of counters, never a wait.
#[derive(Clone)]
pub struct RouterHandle {
    stats: Arc<Stats>,
    address: SocketAddr,
}

impl RouterHandle {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn status(&self) -> RouterStatus {
        self.stats
            .status(self.address.to_string(), tokio::time::Instant::now())
    }

    pub fn history(&self) -> History {
        self.stats.history(tokio::time::Instant::now())
    }
}

impl Router {
    /// Starts serving `listener` with `config`, routing by the tables
    /// published on `routes`. `traced`: spans are exported, so each
    /// request's span is made at `info` (else at `debug`).
    pub fn start(
        listener: TcpListener,
        config: RouterConfig,
        routes: watch::Receiver<RoutingTable>,
        traced: bool,
    ) -> Result<Router, Error> {
        let address = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
        let stats = Arc::new(Stats::new(config.worker_count()));
        let (settings_tx, settings) = watch::channel(Arc::new(Settings::new(config, None)));
        let (plans_tx, plans) = watch::channel(Arc::new(Plan::default()));
        let tasks = TaskTracker::new();
        let follow_stop = CancellationToken::new();
        tasks.spawn(plan::follow(
            routes,
            plans_tx,
            Arc::clone(&stats),
            follow_stop.clone(),
        ));
        let stop = CancellationToken::new();
        let workers = Workers {
            plans,
            settings: settings_tx.subscribe(),
            stats: Arc::clone(&stats),
            pending: Arc::default(),
            open: Arc::default(),
            control: tokio::runtime::Handle::current(),
            stop: stop.clone(),
            traced,
        };
        let count = settings.borrow().config.worker_count();
        let finished = match workers.start(listener, count) {
            Ok(finished) => finished,
            Err(error) => {
                // The workers already started stop, and so does the follower.
                stop.cancel();
                follow_stop.cancel();
                return Err(error);
            }
        };
        let follow = follow_stop.clone();
        tasks.spawn(async move {
            for (index, done) in finished.into_iter().enumerate() {
                if done.await.is_err() {
                    tracing::error!(
                        worker = index,
                        "Router worker thread ended without finishing its drain (it panicked; the panic is logged above)."
                    );
                }
            }
            follow.cancel();
        });
        tasks.close();
        Ok(Router {
            settings: settings_tx,
            handle: RouterHandle { stats, address },
            stop,
            follow_stop,
            tasks,
        })
    }

    pub fn handle(&self) -> RouterHandle {
        self.handle.clone()
    }

    /// Applies reloaded settings to the requests that start from now on.
    pub fn reload(&self, config: RouterConfig) {
        self.settings.send_modify(|current| {
            *current = Arc::new(Settings::new(config, Some(current)));
        });
    }

    /// How long [`Router::drain`] may take.
    pub fn drain_budget(&self) -> Duration {
        self.settings.borrow().config.drain_timeout + Duration::from_secs(2)
    }

    /// Stops accepting, lets requests in flight finish within
    /// `drain_timeout`, and returns when the router's tasks are done.
    pub fn drain(self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.cancel();
        let tasks = self.tasks;
        let follow_stop = self.follow_stop;
        async move {
            tasks.wait().await;
            follow_stop.cancel();
        }
    }
}

/// What the worker threads share.
struct Workers {
    plans: watch::Receiver<Arc<Plan>>,
    settings: watch::Receiver<Arc<Settings>>,
    stats: Arc<Stats>,
    pending: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    control: tokio::runtime::Handle,
    stop: CancellationToken,
    traced: bool,
}

impl Workers {
    /// Starts `count` worker threads on `listener`; each one's receiver
    /// resolves once it has drained and its runtime is gone.
    fn start(
        self,
        listener: TcpListener,
        count: usize,
    ) -> Result<Vec<oneshot::Receiver<()>>, Error> {
        let listener = listener.into_std().map_err(Error::Workers)?;
        let mut finished = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let listener = listener.try_clone().map_err(Error::Workers)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::Workers)?;
            let shared = Arc::new(Shared {
                plans: self.plans.clone(),
                plan: proxy::Local::new(self.plans.clone()),
                settings: self.settings.clone(),
                local_settings: proxy::Local::new(self.settings.clone()),
                client: client()?,
                stats: self.stats.worker(index),
                all: Arc::clone(&self.stats),
                pending: Arc::clone(&self.pending),
                turn: AtomicUsize::new(index),
                deposits: AtomicU64::new(0),
                worker: index,
                control: self.control.clone(),
                traced: self.traced,
                // As many as requests in flight on a worker, nearly always.
                tries: timer::Spares::new(1024),
            });
            let (stop, open) = (self.stop.clone(), Arc::clone(&self.open));
            let (done, receiver) = oneshot::channel();
            std::thread::Builder::new()
                .name(format!("router-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => server::serve(listener, shared, stop, open).await,
                            Err(error) => {
                                tracing::error!(%error, "Router worker cannot use the listener.");
                            }
                        }
                    });
                    // What the drain cut is dropped here, without waiting on it.
                    runtime.shutdown_background();
                    let _ = done.send(());
                })
                .map_err(Error::Workers)?;
            finished.push(receiver);
        }
        Ok(finished)
    }
}

/// The pooled upstream client: keep-alive, HTTP/1.1 to http upstreams, h2
/// or HTTP/1.1 by ALPN to https ones, Mozilla's roots through rustls.
fn client() -> Result<proxy::HttpClient, Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https))
}
