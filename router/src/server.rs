//! The accept loop of one worker: connections up to `max_connections`
//! (counted over all workers; more are answered 503 and closed), HTTP/1.1
//! or h2 per connection with the header-read timeout, and the drain on
//! shutdown: stop accepting, let requests in flight finish within
//! `drain_timeout`, then drop what is left.
//!
//! The drain reaches a connection through its own [`Signal`], an atomic
//! and a waker slot, which the connection's task reads on every wake-up.
//! hyper-util's `GracefulShutdown` and a `CancellationToken` did the same
//! through `Notify`, whose poll takes a lock each time: about 500
//! instructions per proxied request, for a signal sent once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use http::{Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::proxy::{self, Shared};

/// Counts one open client connection while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `listener` until `stop` is cancelled, then drains. `open` counts
/// the client connections of all workers.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    open: Arc<AtomicUsize>,
) {
    let connections = Connections::default();
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                warn!(%error, "Router cannot accept a connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let settings = shared.settings.borrow().clone();
        let count = open.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = Open(Arc::clone(&open));
        if count > settings.config.max_connections {
            tasks.spawn(too_many(stream, settings.config.max_connections, guard));
            continue;
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(crate::timer::ConnTimer::default())
            .header_read_timeout(settings.config.header_read_timeout)
            // A response's head and body are copied into one buffer and
            // written with one `write`: cheaper than hyper's queue of
            // buffers for `writev` (about 600 instructions a `GET /health`),
            // and the copy of a body is small beside its system call. The
            // upstream side keeps `writev`: a 32 KiB `POST /embed` copied
            // cost about 2 µs of CPU more than it saved.
            .writev(false);
        builder.http2().timer(TokioTimer::new());
        let shared = Arc::clone(&shared);
        let client = Arc::new(crate::headers::Client::new(peer));
        let service = service_fn(move |request| {
            proxy::handle(Arc::clone(&shared), Arc::clone(&client), request)
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = Drained {
            connection,
            finish: |connection| connection.graceful_shutdown(),
            signal: connections.add(),
            finishing: false,
        };
        tasks.spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, error = %cascade_actors::text::root_cause(error.as_ref()), "Router connection ended with an error.");
            }
            drop(guard);
        });
    }
    drop(listener);
    let drain = shared.settings.borrow().config.drain_timeout;
    let open = connections.tell(FINISH);
    if open > 0 {
        info!(connections = open, "Router draining.");
    }
    tasks.close();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        warn!(
            "Router requests still in flight after {} (router.drain_timeout); cutting them.",
            cascade_actors::text::duration(drain)
        );
        connections.tell(CUT);
        tasks.wait().await;
    }
}

/// What the drain asks of a connection: nothing yet, to finish the request
/// in flight and close, or to end at once.
const SERVE: u8 = 0;
const FINISH: u8 = 1;
const CUT: u8 = 2;

/// One connection's end of the drain.
#[derive(Default)]
struct Signal {
    state: AtomicU8,
    waker: AtomicWaker,
}

/// The signals of a worker's open connections.
#[derive(Default)]
struct Connections {
    /// Weak: a connection that ended frees its signal; the dead entries
    /// are swept out when the list has doubled since the last sweep.
    signals: Mutex<(Vec<Weak<Signal>>, usize)>,
}

impl Connections {
    /// A signal for a new connection.
    fn add(&self) -> Arc<Signal> {
        let signal = Arc::new(Signal::default());
        let mut guard = self.signals.lock().unwrap_or_else(PoisonError::into_inner);
        let (list, sweep_at) = &mut *guard;
        if list.len() >= *sweep_at {
            list.retain(|s| s.strong_count() > 0);
            *sweep_at = (2 * list.len()).max(64);
        }
        list.push(Arc::downgrade(&signal));
        signal
    }

    /// Sends `state` to every open connection; how many there were.
    fn tell(&self, state: u8) -> usize {
        let guard = self.signals.lock().unwrap_or_else(PoisonError::into_inner);
        let mut open = 0;
        for signal in guard.0.iter().filter_map(Weak::upgrade) {
            signal.state.store(state, Ordering::Release);
            signal.waker.wake();
            open += 1;
        }
        open
    }
}

pin_project_lite::pin_project! {
    /// A connection that follows its [`Signal`]: asked to finish, it lets
    /// hyper answer the request in flight and close; cut, it ends.
    struct Drained<C> {
        #[pin]
        connection: C,
        // The connection's graceful shutdown.
        finish: fn(Pin<&mut C>),
        signal: Arc<Signal>,
        finishing: bool,
    }
}

impl<C, T, E> Future for Drained<C>
where
    C: Future<Output = Result<T, E>>,
    T: Default,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Registered before the state is read: a signal sent in between
        // still wakes this task.
        this.signal.waker.register(cx.waker());
        match this.signal.state.load(Ordering::Acquire) {
            SERVE => {}
            FINISH if !*this.finishing => {
                *this.finishing = true;
                (this.finish)(this.connection.as_mut());
            }
            FINISH => {}
            _ => return Poll::Ready(Ok(T::default())),
        }
        this.connection.poll(cx)
    }
}

/// A connection beyond `max_connections`: one 503 and close.
async fn too_many(stream: TcpStream, max: usize, guard: Open) {
    let service = service_fn(move |_request| async move {
        let mut response: Response<ProxyBody> = Response::new(body::full(
            serde_json::json!({
                "error": format!("{max} connections are open already (router.max_connections)")
            })
            .to_string(),
        ));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            "application/json".parse().expect("valid"),
        );
        headers.insert(header::RETRY_AFTER, 1.into());
        headers.insert(header::CONNECTION, "close".parse().expect("valid"));
        crate::headers::mark(headers, "none", 0);
        Ok::<_, Infallible>(response)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(2))
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    drop(guard);
}
