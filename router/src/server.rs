//! The accept loop of one worker: connections up to `max_connections`
//! (counted over all workers; more are answered 503 and closed), HTTP/1.1
//! or h2 per connection with the header-read timeout, and the drain on
//! shutdown: stop accepting, let requests in flight finish within
//! `drain_timeout`, then drop what is left.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
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
    let graceful = GracefulShutdown::new();
    let tasks = TaskTracker::new();
    // Ends the connections still open when the drain runs out.
    let cut = CancellationToken::new();
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
            .timer(TokioTimer::new())
            .header_read_timeout(settings.config.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let shared = Arc::clone(&shared);
        let client = Arc::new(crate::headers::Client::new(peer));
        let service = service_fn(move |request| {
            proxy::handle(Arc::clone(&shared), Arc::clone(&client), request)
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let cut = cut.clone();
        tasks.spawn(async move {
            tokio::select! {
                served = connection => if let Err(error) = served {
                    debug!(%peer, error = %cascade_actors::text::root_cause(error.as_ref()), "Router connection ended with an error.");
                },
                () = cut.cancelled() => {}
            }
            drop(guard);
        });
    }
    drop(listener);
    let drain = shared.settings.borrow().config.drain_timeout;
    let in_flight = graceful.count();
    if in_flight > 0 {
        info!(connections = in_flight, "Router draining.");
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            "Router requests still in flight after {} (router.drain_timeout); cutting them.",
            cascade_actors::text::duration(drain)
        );
    }
    cut.cancel();
    tasks.close();
    tasks.wait().await;
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
