//! Keep-alive HTTP/1.1 connections to plain-`http` endpoints, one idle list
//! per endpoint and worker, on hyper's connection API.
//!
//! A connection belongs to the worker that opened it: its task runs on that
//! worker's runtime, so a request and the connection that carries it stay
//! on one thread, and a worker's idle list is touched by that worker alone
//! (its lock is never contended). The list lives in the endpoint's
//! [`EndpointState`]: when an endpoint leaves the plan and its last request
//! ends, its connections close with it.
//!
//! A connection goes back to its list when the response it carried has been
//! read to the end (hyper can then send the next request on it), or, when
//! that takes too long, is simply dropped with the response. A checkout
//! takes the most recently used one that is ready (the warmest), drops
//! those the upstream closed or that sat idle for [`IDLE_TIMEOUT`], and
//! opens a new connection when none is left.
//!
//! Invariant: nothing here holds a lock across an await.
//! Boundary: https endpoints (Cloud Run) are not pooled here; they go
//! through hyper-util's client, which speaks TLS and h2.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::body::ProxyBody;
use crate::config::MAX_WORKERS;
use crate::plan::EndpointState;

/// How long opening a connection may take before the try counts it failed
/// (the per-try timeout still applies).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection older than this is closed instead of reused: the
/// upstream may have dropped it without a word (a NAT or a firewall).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per endpoint and worker; more are closed.
pub const MAX_IDLE: usize = 256;

type Sender = SendRequest<ProxyBody>;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One worker's idle connections to one endpoint, on a cache line of its
/// own so that two workers never write the same line.
#[repr(align(128))]
#[derive(Default)]
struct Slot(Mutex<Vec<Idle>>);

/// The idle connections to one endpoint, a list per worker.
pub struct Pool {
    slots: Box<[Slot]>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            slots: (0..MAX_WORKERS).map(|_| Slot::default()).collect(),
        }
    }
}

impl Pool {
    fn slot(&self, worker: usize) -> MutexGuard<'_, Vec<Idle>> {
        self.slots[worker % self.slots.len()]
            .0
            .lock()
            // A push or a pop cannot leave the list half-changed.
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A ready idle connection of `worker`'s, the most recently used first.
    fn take(&self, worker: usize, now: Instant) -> Option<Sender> {
        let mut idle = self.slot(worker);
        // The oldest are at the front: those past the idle timeout go first.
        let expired = idle
            .iter()
            .take_while(|c| now.saturating_duration_since(c.since) >= IDLE_TIMEOUT)
            .count();
        if expired > 0 {
            idle.drain(..expired);
        }
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].sender.is_closed() {
                idle.remove(i);
            } else if idle[i].sender.is_ready() {
                return Some(idle.remove(i).sender);
            }
        }
        None
    }

    /// Gives `sender` back to `worker`'s list, unless the upstream closed it
    /// or the list is full.
    pub fn give_back(&self, worker: usize, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.slot(worker);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// Why no request could be sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Handshake(#[from] hyper::Error),
    #[error(
        "not connected within {}",
        cascade_actors::text::duration(CONNECT_TIMEOUT)
    )]
    TimedOut,
}

/// A connection for one request to `endpoint`: `(sender, reused)`.
pub async fn checkout(
    endpoint: &EndpointState,
    worker: usize,
) -> Result<(Sender, bool), ConnectError> {
    if let Some(sender) = endpoint.pool.take(worker, Instant::now()) {
        return Ok((sender, true));
    }
    // Boxed: the connect future is large and seldom needed, and inline it
    // would be copied with every request's future.
    Ok((Box::pin(connect(endpoint)).await?, false))
}

/// Opens a new connection to `endpoint`; its task runs on the current
/// (the worker's) runtime until the upstream or cascade closes it.
///
/// The task is not tracked, on purpose: it ends by itself once the upstream
/// closes the socket or its `SendRequest` is dropped (the pool dropping a
/// connection that was closed, idle too long or one too many; hyper closes
/// one whose response body was dropped unread), and the worker's runtime
/// drops whatever is left when it shuts down after the drain. A handle per
/// connection would only be bookkeeping for what hyper already ends.
pub async fn connect(endpoint: &EndpointState) -> Result<Sender, ConnectError> {
    let host = endpoint.authority.host();
    // IPv6 literals come bracketed in an authority.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = endpoint.authority.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| ConnectError::TimedOut)??;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    let id = endpoint.endpoint.id.clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(endpoint = %id, error = %cascade_actors::text::root_cause(&error), "Upstream connection ended with an error.");
        }
    });
    Ok(sender)
}
