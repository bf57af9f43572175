//! Time bounds on awaited work: [`with_deadline`] for one call, [`Deadline`] for a budget shared
//! by several attempts.
//!
//! Every awaited outside call goes through [`with_deadline`]. [`Deadline`] is pure arithmetic: it
//! does no I/O and never reads the clock; callers pass `now`.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::clock::saturating_add;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{what} did not finish within {}", humantime::format_duration(*.after))]
pub struct DeadlineExceeded {
    pub what: String,
    pub after: Duration,
}

/// Awaits `fut` for at most `after`; on timeout `fut` is dropped (cancelled).
///
/// `what` names the call for the error message. It is converted into a `String` only on the
/// timeout path, so passing a `&str` costs no allocation when the call finishes in time.
pub async fn with_deadline<F: Future>(
    after: Duration,
    what: impl Into<String>,
    fut: F,
) -> Result<F::Output, DeadlineExceeded> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| DeadlineExceeded {
            what: what.into(),
            after,
        })
}

/// An overall deadline across several attempts, e.g. "daemon ready within 60 s, one ping per
/// second".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    pub fn after(now: Instant, budget: Duration) -> Self {
        Self {
            at: saturating_add(now, budget),
            budget,
        }
    }

    /// Time left; zero once past.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.at
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    /// The budget this deadline was created with.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// `min(per_attempt, remaining(now))`: the timeout for one attempt that must not overrun the
    /// overall deadline.
    pub fn attempt_timeout(&self, now: Instant, per_attempt: Duration) -> Duration {
        per_attempt.min(self.remaining(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_finishing_future_times_out_after_exactly_the_bound() {
        let start = Instant::now();
        let err = with_deadline(
            Duration::from_secs(5),
            "docker ping",
            std::future::pending::<()>(),
        )
        .await
        .expect_err("pending never finishes");
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        assert_eq!(
            err,
            DeadlineExceeded {
                what: "docker ping".into(),
                after: Duration::from_secs(5)
            }
        );
        assert_eq!(err.to_string(), "docker ping did not finish within 5s");
    }

    #[tokio::test(start_paused = true)]
    async fn finishing_future_returns_its_output() {
        let out = with_deadline(Duration::from_secs(5), String::from("sleep"), async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            7
        })
        .await;
        assert_eq!(out, Ok(7));
    }

    #[test]
    fn attempt_timeout_never_exceeds_remaining() {
        let t0 = Instant::now();
        let d = Deadline::after(t0, Duration::from_secs(60));
        assert_eq!(d.at(), t0 + Duration::from_secs(60));
        assert_eq!(d.budget(), Duration::from_secs(60));
        let per = Duration::from_secs(10);
        for s in 0..=70 {
            let now = t0 + Duration::from_secs(s);
            let t = d.attempt_timeout(now, per);
            assert!(t <= d.remaining(now));
            assert!(t <= per);
        }
        assert_eq!(d.attempt_timeout(t0, per), per);
        assert_eq!(
            d.attempt_timeout(t0 + Duration::from_secs(55), per),
            Duration::from_secs(5)
        );
        assert_eq!(
            d.attempt_timeout(t0 + Duration::from_secs(70), per),
            Duration::ZERO
        );
    }

    #[test]
    fn expiry_and_remaining() {
        let t0 = Instant::now();
        let d = Deadline::after(t0, Duration::from_secs(1));
        assert!(!d.is_expired(t0));
        assert_eq!(d.remaining(t0), Duration::from_secs(1));
        assert!(d.is_expired(t0 + Duration::from_secs(1)));
        assert_eq!(d.remaining(t0 + Duration::from_secs(2)), Duration::ZERO);
        // An absurd budget saturates rather than panicking.
        let forever = Deadline::after(t0, Duration::MAX);
        assert!(!forever.is_expired(t0 + Duration::from_secs(1_000_000)));
    }
}
