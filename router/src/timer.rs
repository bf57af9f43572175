//! hyper's header-read timeout on one tokio timer per connection, moved
//! later from request to request rather than made anew.
//!
//! hyper arms the timeout each time it waits for a request head and drops
//! it once the head is in. With hyper-util's `TokioTimer` that is, for
//! every request, a boxed `Sleep` put into tokio's timer wheel and taken
//! out again: about 800 instructions, a fortieth of a proxied request. A
//! [`ConnTimer`] keeps the connection's `Sleep` when hyper drops it, and
//! the next request's timeout reuses it with a later deadline, which tokio
//! records with one atomic store while the entry stays in the wheel.
//!
//! A kept `Sleep` can fire while its connection is busy with a long
//! request: that wakes the connection's task once for nothing, and the
//! next reuse puts it back into the wheel. The deadlines are hyper's own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

type Slot = Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>;

/// hyper's timer for one server connection (give each connection its own:
/// the spare `Sleep` is one connection's).
#[derive(Clone, Default)]
pub struct ConnTimer {
    spare: Slot,
}

/// A `Sleep` that goes back to its connection's [`ConnTimer`] when dropped.
struct Kept {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    spare: Slot,
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// tokio's clock, which tests can pause and move.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let spare = self
            .spare
            .lock()
            // A take or a put cannot leave the slot half-changed.
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let sleep = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Box::pin(Kept {
            sleep: Some(sleep),
            spare: Arc::clone(&self.spare),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Kept>() {
            Some(kept) => {
                if let Some(inner) = kept.get_mut().sleep.as_mut() {
                    inner
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(new_deadline));
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

impl Future for Kept {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut().sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl hyper::rt::Sleep for Kept {}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
            if spare.is_none() {
                *spare = Some(sleep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(start_paused = true)]
    async fn a_kept_sleep_fires_at_its_new_deadline() {
        let timer = ConnTimer::default();
        let start = timer.now();
        let first = timer.sleep_until(start + Duration::from_secs(5));
        drop(first);
        assert!(timer.spare.lock().unwrap().is_some(), "kept for reuse");

        // Reused with a later deadline: not ready at the first one.
        let mut second = timer.sleep(Duration::from_secs(10));
        assert!(timer.spare.lock().unwrap().is_none(), "taken");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(futures_util::poll!(second.as_mut()).is_ready());

        // And with an earlier one than it had.
        drop(second);
        let mut third = timer.sleep(Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(futures_util::poll!(third.as_mut()).is_ready());

        // reset moves a kept sleep.
        let mut fourth = timer.sleep(Duration::from_secs(1));
        timer.reset(&mut fourth, timer.now() + Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(futures_util::poll!(fourth.as_mut()).is_pending());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(futures_util::poll!(fourth.as_mut()).is_ready());
    }
}
