//! tokio timers kept from one use to the next: hyper's header-read timeout
//! on a connection, and the per-try timeout of a worker's requests.
//!
//! hyper arms the header-read timeout each time it waits for a request head
//! and drops it once the head is in, and every try arms a timeout of its
//! own. A new tokio `Sleep` each time is, for every request, an insert into
//! tokio's timer wheel and a removal from it, each under the wheel's lock:
//! about 400 instructions a timer, a fortieth of a proxied request for the
//! two. A kept `Sleep` is given a later deadline instead, which tokio
//! records with one atomic store while the entry stays in the wheel.
//!
//! A kept `Sleep` can fire while nothing uses it: that wakes, once and for
//! nothing, the task that used it last, and its next use puts it back into
//! the wheel. The deadlines are the callers' own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

type Sleep = Pin<Box<tokio::time::Sleep>>;

/// Sleeps kept for reuse, at most `cap` of them.
pub struct Spares {
    list: Mutex<Vec<Sleep>>,
    cap: usize,
}

impl Spares {
    pub fn new(cap: usize) -> Spares {
        Spares {
            list: Mutex::new(Vec::new()),
            cap,
        }
    }

    /// A sleep until `deadline`: a kept one moved there, or a new one.
    pub fn take(&self, deadline: tokio::time::Instant) -> Sleep {
        let kept = self
            .list
            .lock()
            // A push or a pop cannot leave the list half-changed.
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Keeps `sleep` for the next [`take`](Spares::take), unless enough are kept.
    pub fn put(&self, sleep: Sleep) {
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        if list.len() < self.cap {
            list.push(sleep);
        }
    }
}

/// `future` ran past its deadline.
#[derive(Debug)]
pub struct Elapsed;

/// `future`'s output, or [`Elapsed`] at `deadline`, on a sleep of `spares`.
pub async fn within<F: Future>(
    spares: &Spares,
    deadline: tokio::time::Instant,
    future: F,
) -> Result<F::Output, Elapsed> {
    let mut sleep = spares.take(deadline);
    let output = tokio::select! {
        biased;
        output = future => Ok(output),
        () = sleep.as_mut() => Err(Elapsed),
    };
    spares.put(sleep);
    output
}

/// hyper's timer for one server connection (give each connection its own:
/// the kept `Sleep` is one connection's).
#[derive(Clone)]
pub struct ConnTimer {
    spare: Arc<Spares>,
}

impl Default for ConnTimer {
    fn default() -> Self {
        ConnTimer {
            spare: Arc::new(Spares::new(1)),
        }
    }
}

/// A `Sleep` that goes back to its connection's [`ConnTimer`] when dropped.
struct Kept {
    sleep: Option<Sleep>,
    spare: Arc<Spares>,
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
        let sleep = self.spare.take(tokio::time::Instant::from_std(deadline));
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
            self.spare.put(sleep);
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
        assert_eq!(timer.spare.list.lock().unwrap().len(), 1, "kept for reuse");

        // Reused with a later deadline: not ready at the first one.
        let mut second = timer.sleep(Duration::from_secs(10));
        assert!(timer.spare.list.lock().unwrap().is_empty(), "taken");
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

    #[tokio::test(start_paused = true)]
    async fn within_ends_a_future_at_its_deadline_and_keeps_the_sleep() {
        let spares = Spares::new(2);
        let now = tokio::time::Instant::now();
        let done = within(&spares, now + Duration::from_secs(1), async { 7 }).await;
        assert_eq!(done.unwrap(), 7);
        let late = within(
            &spares,
            now + Duration::from_secs(2),
            tokio::time::sleep(Duration::from_secs(5)),
        )
        .await;
        assert!(late.is_err(), "cut at its deadline");
        assert!(tokio::time::Instant::now() < now + Duration::from_secs(3));
        assert_eq!(spares.list.lock().unwrap().len(), 1, "one sleep, kept");
        // A kept sleep that already fired serves a later deadline.
        let again = within(
            &spares,
            tokio::time::Instant::now() + Duration::from_secs(1),
            tokio::time::sleep(Duration::from_millis(500)),
        )
        .await;
        assert!(again.is_ok());
    }
}
