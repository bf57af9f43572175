//! Bodies on the way through: the bounded replay buffer for requests that
//! may be sent again, the size limit on everything else, and the response
//! body that streams to the client with an idle bound and keeps the
//! request counted as in flight until its last byte.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the router sends, upstream or to a client.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The request body grew past `max_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {max} bytes")]
pub struct TooLarge {
    pub max: u64,
}

/// A request body made ready for its tries.
pub enum Prepared {
    /// Held whole: every try sends a copy.
    Replayable(Bytes),
    /// Sent once as it arrives (not replay-safe, or larger than the replay
    /// buffer); `None` once the first try took it.
    Streaming(Option<ProxyBody>),
}

impl Prepared {
    pub fn replayable(&self) -> bool {
        matches!(self, Prepared::Replayable(_))
    }

    /// The body for the next try, if there is one to send.
    pub fn take(&mut self) -> Option<ProxyBody> {
        match self {
            // No body (most GETs): `Empty` has no size, so boxing it
            // allocates nothing.
            Prepared::Replayable(bytes) if bytes.is_empty() => Some(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Prepared::Replayable(bytes) => Some(full(bytes.clone())),
            Prepared::Streaming(body) => body.take(),
        }
    }
}

/// Reads up to `max_replay` bytes of `body` into memory. A body that ends
/// within that is [`Prepared::Replayable`]; a longer one streams on (what
/// was read first, then the rest), limited to `max_body` in all.
pub async fn prepare<B>(body: B, max_replay: u64, max_body: u64) -> Result<Prepared, BoxError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = body;
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(Prepared::Replayable(buffer.freeze())),
            Some(Err(error)) => return Err(error.into()),
            Some(Ok(frame)) => {
                // Trailers on a request are dropped along with the replay.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buffer.extend_from_slice(&data);
                if buffer.len() as u64 > max_replay {
                    let seen = buffer.len() as u64;
                    if seen > max_body {
                        linger(body);
                        return Err(Box::new(TooLarge { max: max_body }));
                    }
                    let rest = Limited::new(body, max_body, seen);
                    let prefix = Full::new(buffer.freeze()).map_err(|never| match never {});
                    return Ok(Prepared::Streaming(Some(
                        Chain::new(prefix, rest).boxed_unsync(),
                    )));
                }
            }
        }
    }
}

/// `body` sent once as it arrives, limited to `max_body`.
pub fn streaming<B>(body: B, max_body: u64) -> Prepared
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    Prepared::Streaming(Some(Limited::new(body, max_body, 0).boxed_unsync()))
}

/// Whether `error` (from a client call) is the request body growing past its limit.
pub fn too_large(error: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(t) = e.downcast_ref::<TooLarge>() {
            return Some(t.max);
        }
        cause = e.source();
    }
    None
}

/// How long, and how much of, a refused request body is still read and
/// thrown away, so that the client reads its 413 instead of a connection
/// reset from closing a socket with unread data: nginx's lingering close.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 4 * 1024 * 1024;

/// Reads and discards what is left of a refused request `body`, within
/// [`LINGER_TIME`] and [`LINGER_BYTES`], on a task of its own.
pub fn linger<B>(body: B)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut body = body;
        let mut read = 0u64;
        let discard = async {
            while read <= LINGER_BYTES {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        read += frame.data_ref().map_or(0, |d| d.remaining() as u64);
                    }
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, discard).await;
    });
}

/// A body that fails once more than `max` bytes (counting `seen` already
/// passed) have gone through; what is left of it is then [`linger`]ed.
struct Limited<B> {
    inner: Option<B>,
    max: u64,
    seen: u64,
}

impl<B> Limited<B> {
    fn new(inner: B, max: u64, seen: u64) -> Self {
        Limited {
            inner: Some(inner),
            max,
            seen,
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.max {
                        if let Some(rest) = this.inner.take() {
                            linger(rest);
                        }
                        return Poll::Ready(Some(Err(Box::new(TooLarge { max: this.max }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// `first`, then `second`.
struct Chain<A, B> {
    first: Option<A>,
    second: B,
}

impl<A, B> Chain<A, B> {
    fn new(first: A, second: B) -> Self {
        Chain {
            first: Some(first),
            second,
        }
    }
}

impl<A, B> Body for Chain<A, B>
where
    A: Body<Data = Bytes, Error = BoxError> + Unpin,
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(first) = this.first.as_mut() {
            match Pin::new(first).poll_frame(cx) {
                Poll::Ready(None) => this.first = None,
                other => return other,
            }
        }
        Pin::new(&mut this.second).poll_frame(cx)
    }
}

/// A response body on its way to the client: fails when the upstream sends
/// nothing for `idle`, and holds `guard` (the request's in-flight counts)
/// until the body ends or the client goes away.
pub struct Tracked<B, G> {
    inner: B,
    idle: Duration,
    /// Made the first time the upstream keeps the body waiting, and moved on
    /// by each frame after that: a body that arrives with its head (most
    /// answers) neither arms a timer nor reads the clock. The idle time is
    /// counted from that first wait, which follows the head or the last
    /// frame by no more than the time to pass it on.
    timer: Option<Pin<Box<Sleep>>>,
    guard: Option<G>,
}

/// The upstream stopped sending in the middle of a response.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0}")]
pub struct Stalled(String);

impl<B, G> Tracked<B, G> {
    pub fn new(inner: B, idle: Duration, guard: G) -> Self {
        Tracked {
            inner,
            idle,
            timer: None,
            guard: Some(guard),
        }
    }
}

impl<B, G> Body for Tracked<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(timer) = this.timer.as_mut() {
                    timer.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.guard = None;
                Poll::Ready(None)
            }
            Poll::Pending => match this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.idle)))
                .as_mut()
                .poll(cx)
            {
                Poll::Ready(()) => {
                    this.guard = None;
                    Poll::Ready(Some(Err(Box::new(Stalled(
                        cascade_actors::text::duration(this.idle),
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn collect(body: ProxyBody) -> Result<Bytes, BoxError> {
        Ok(body.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn small_bodies_are_kept_for_replay() {
        let mut prepared = prepare(chunks(&[b"ab", b"cd"]), 4, 100).await.unwrap();
        assert!(prepared.replayable());
        for _ in 0..3 {
            assert_eq!(collect(prepared.take().unwrap()).await.unwrap(), "abcd");
        }
    }

    #[tokio::test]
    async fn an_empty_body_is_sent_as_none_on_every_try() {
        let mut prepared = prepare(chunks(&[]), 4, 100).await.unwrap();
        assert!(prepared.replayable());
        for _ in 0..3 {
            let body = prepared.take().unwrap();
            assert!(body.is_end_stream());
            assert_eq!(body.size_hint().exact(), Some(0));
            assert_eq!(collect(body).await.unwrap(), "");
        }
    }

    #[tokio::test]
    async fn larger_bodies_stream_once_whole() {
        let mut prepared = prepare(chunks(&[b"ab", b"cd", b"ef"]), 3, 100)
            .await
            .unwrap();
        assert!(!prepared.replayable());
        assert_eq!(collect(prepared.take().unwrap()).await.unwrap(), "abcdef");
        assert!(prepared.take().is_none(), "a streamed body is sent once");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_fail_with_too_large() {
        let mut prepared = prepare(chunks(&[b"ab", b"cd", b"ef"]), 3, 5).await.unwrap();
        let error = collect(prepared.take().unwrap()).await.unwrap_err();
        assert_eq!(too_large(error.as_ref()), Some(5));
        let mut prepared = streaming(chunks(&[b"abc", b"def"]), 4);
        let error = collect(prepared.take().unwrap()).await.unwrap_err();
        assert_eq!(too_large(error.as_ref()), Some(4));
        let error = prepare(chunks(&[b"abcdef"]), 3, 5).await.err().unwrap();
        assert_eq!(too_large(error.as_ref()), Some(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_response_fails_after_the_idle_bound_and_releases_its_guard() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let guard = std::sync::Arc::new(());
        let body = Tracked::new(
            StreamBody::new(Box::pin(stream)),
            Duration::from_secs(5),
            guard.clone(),
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        let mut body = body;
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "x");
        assert_eq!(std::sync::Arc::strong_count(&guard), 2);
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("5s"), "{error}");
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            1,
            "the guard is released"
        );
        drop(tx);
    }
}
