//! Serving the status API so that no client can starve cascade: HTTP/1.1
//! over hyper with a cap on connections, a deadline for every request head
//! (which is also how long a kept-alive connection may wait for its next
//! request), and connections closed when no byte has moved for a while.
//! axum's own `serve` has none of these; the router is the same.
//!
//! At the cap, the oldest connection with no request in progress is closed
//! to make room (as nginx reuses idle keep-alive connections); when every
//! connection is busy, the new one gets an immediate 503 and is closed, and
//! the API keeps serving the ones it has. The cap is kept below the
//! process's open-file limit, so probes, children and checkpoints always
//! have descriptors left.
//!
//! Invariant: the accept loop never blocks on a connection and never spins
//! on a failing `accept` (descriptor exhaustion backs off); every
//! connection is a task in one `TaskTracker`, ended by the shutdown token.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

/// Descriptors kept for everything but the API: probes, children and their
/// pipes, Docker and Google connections, checkpoint writes.
const RESERVED_FDS: u64 = 256;
/// The request head may not be larger than this (hyper answers 431).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a stopping API lets a busy connection finish.
const DRAIN: Duration = Duration::from_secs(1);

/// What one API server allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// A request head must arrive within this, counted from when the
    /// connection is ready for a request (accepted, or its last response
    /// sent).
    pub header_timeout: Duration,
    /// A connection on which no byte moved for this long is closed.
    pub idle_timeout: Duration,
}

impl Limits {
    /// `configured` connections at most, and never more than the open-file
    /// limit `nofile` leaves after [`RESERVED_FDS`] (or half of it, on a
    /// very low limit).
    pub fn within(
        configured: usize,
        nofile: u64,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Limits {
        let room = if nofile > 2 * RESERVED_FDS {
            nofile - RESERVED_FDS
        } else {
            nofile / 2
        };
        let room = usize::try_from(room).unwrap_or(usize::MAX).max(1);
        Limits {
            max_connections: configured.min(room),
            header_timeout,
            idle_timeout,
        }
    }
}

/// Raises the soft open-file limit to the hard one (as Go's runtime and
/// many daemons do) and returns the limit in effect.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Serves `app` on `listener` within `limits` until `shutdown` is
/// cancelled; then lets busy connections finish for [`DRAIN`] and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let registry = Registry::default();
    let tasks = TaskTracker::new();
    let mut exhausted = Exhaustion::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) if is_exhaustion(&error) => {
                exhausted.note(&error);
                // The connection stays in the backlog; trying again at once
                // would spin. Supervision keeps its reserved descriptors.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
            Err(error) => {
                debug!(%error, "Status API: accept failed.");
                continue;
            }
        };
        exhausted.recovered();
        let Some(conn) = registry.admit(limits.max_connections) else {
            refuse(&stream);
            continue;
        };
        let app = app.clone();
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            serve_connection(stream, app, &conn, limits, shutdown).await;
            registry.remove(conn.id);
        });
    }
    tasks.close();
    if tokio::time::timeout(DRAIN + Duration::from_secs(1), tasks.wait())
        .await
        .is_err()
    {
        warn!("Status API connections did not all close in time.");
    }
}

/// One connection, until it ends, idles out, is evicted, or the API stops.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    conn: &Arc<Conn>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Watched {
        inner: stream,
        conn: conn.clone(),
    });
    let tracked = conn.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = Busy::start(&tracked);
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await?;
            // The request is in progress until its body is sent (for
            // `/events`, until the stream ends).
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &busy;
                    frame
                }))
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES.max(8192));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut tick = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%error, "Status API connection ended with an error.");
                }
                return;
            }
            _ = conn.evicted.cancelled() => return,
            _ = shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, connection.as_mut()).await;
                return;
            }
            _ = tick.tick() => {
                if conn.idle_for() >= limits.idle_timeout {
                    debug!("Status API connection idle; closing it.");
                    return;
                }
            }
        }
    }
}

/// A 503 written without waiting (the socket buffer of a new connection
/// has room), then the connection is closed.
fn refuse(stream: &TcpStream) {
    const BODY: &str = "{\"error\":\"too many connections to the status API; try again\"}";
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(reply.as_bytes());
}

fn is_exhaustion(error: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Logs descriptor exhaustion once per episode, not once per accept.
#[derive(Default)]
struct Exhaustion {
    since: Option<(Instant, u64)>,
}

impl Exhaustion {
    fn note(&mut self, error: &io::Error) {
        match &mut self.since {
            Some((_, count)) => *count += 1,
            None => {
                warn!(%error, "Status API cannot accept connections: out of descriptors; backing off.");
                self.since = Some((Instant::now(), 1));
            }
        }
    }

    fn recovered(&mut self) {
        if let Some((since, count)) = self.since.take() {
            info!(
                refused = count,
                took = %cascade_actors::text::duration(since.elapsed()),
                "Status API accepts connections again."
            );
        }
    }
}

// === connections ===

/// The open connections, to count them and pick one to evict. Locked only
/// to add, remove or scan, never across an await.
#[derive(Clone)]
struct Registry {
    inner: Arc<Mutex<RegistryInner>>,
    /// What every connection's `last_io` counts from, so they compare.
    epoch: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: Arc::default(),
            epoch: Instant::now(),
        }
    }
}

#[derive(Default)]
struct RegistryInner {
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
}

impl Registry {
    /// A slot for a new connection: a free one, or the one of the connection
    /// that has been idle longest (which is told to close); `None` when all
    /// `max` are busy.
    fn admit(&self, max: usize) -> Option<Arc<Conn>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.open.len() >= max {
            let victim = inner
                .open
                .values()
                .filter(|c| c.busy.load(Ordering::Relaxed) == 0)
                .min_by_key(|c| c.last_io.load(Ordering::Relaxed))
                .map(|c| c.id)?;
            if let Some(conn) = inner.open.remove(&victim) {
                conn.evicted.cancel();
            }
        }
        inner.next_id += 1;
        let conn = Arc::new(Conn::new(inner.next_id, self.epoch));
        inner.open.insert(conn.id, conn.clone());
        Some(conn)
    }

    fn remove(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.open.remove(&id);
    }
}

/// What the server knows about one connection.
struct Conn {
    id: u64,
    /// Requests in progress (head received, body not yet sent).
    busy: AtomicUsize,
    /// Milliseconds since `epoch` at the last byte read or written.
    last_io: AtomicU64,
    epoch: Instant,
    /// Cancelled when the connection is chosen to make room for a new one.
    evicted: CancellationToken,
}

impl Conn {
    fn new(id: u64, epoch: Instant) -> Conn {
        let conn = Conn {
            id,
            busy: AtomicUsize::new(0),
            last_io: AtomicU64::new(0),
            epoch,
            evicted: CancellationToken::new(),
        };
        conn.touch();
        conn
    }

    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_io.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Marks a request in progress on its connection until dropped.
struct Busy(Arc<Conn>);

impl Busy {
    fn start(conn: &Arc<Conn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::Relaxed);
        Busy(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The socket, noting every byte that moves so idle connections are found.
struct Watched {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_supervision() {
        let t = Duration::from_secs(5);
        assert_eq!(Limits::within(512, 1024, t, t).max_connections, 512);
        assert_eq!(Limits::within(2048, 1024, t, t).max_connections, 768);
        assert_eq!(Limits::within(512, 128, t, t).max_connections, 64);
        assert_eq!(Limits::within(512, 1, t, t).max_connections, 1);
    }

    #[test]
    fn a_full_registry_evicts_the_longest_idle_connection_only() {
        let registry = Registry::default();
        let first = registry.admit(2).expect("room");
        let second = registry.admit(2).expect("room");
        let _busy = Busy::start(&second);
        first.last_io.store(0, Ordering::Relaxed);
        let third = registry.admit(2).expect("the idle one makes room");
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled());
        let _busy_too = Busy::start(&third);
        assert!(registry.admit(2).is_none(), "every connection is busy");
    }
}
