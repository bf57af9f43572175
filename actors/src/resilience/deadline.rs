//! Time bounds on awaited work: [`with_deadline`] for one call, [`Deadline`] for a budget shared
//! by several attempts.
//!
//! Every awaited outside call goes through [`with_deadline`]. [`Deadline`] is pure arithmetic: it
//! does no I/O and never reads the clock; callers pass `now`.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{what} did not finish within {}", crate::text::duration(*.after))]
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

/// Calls `check` every `every` until it returns `Some`, for at most
/// `within` in all: the one way to wait for something to become true. A
/// `check` that hangs is cut off by the same deadline.
pub async fn poll_until<T, F, Fut>(
    within: Duration,
    every: Duration,
    what: impl Into<String>,
    mut check: F,
) -> Result<T, DeadlineExceeded>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    with_deadline(within, what, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(every).await;
        }
    })
    .await
}

/// `at + d`, clamped to the latest representable instant instead of
/// panicking, so absurd configured durations ("open for 10 000 years")
/// degrade to "as long as possible".
pub fn saturating_add(at: Instant, d: Duration) -> Instant {
    let mut d = d;
    loop {
        if let Some(t) = at.checked_add(d) {
            return t;
        }
        // Halving converges on the largest addable duration within ~100 steps.
        d /= 2;
        if d.is_zero() {
            return at;
        }
    }
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

    #[tokio::test(start_paused = true)]
    async fn poll_until_returns_the_first_answer_or_gives_up_at_the_deadline() {
        let start = Instant::now();
        let mut calls = 0;
        let found = poll_until(
            Duration::from_secs(5),
            Duration::from_secs(1),
            "three",
            || {
                calls += 1;
                let n = calls;
                async move { (n == 3).then_some(n) }
            },
        )
        .await;
        assert_eq!(found, Ok(3));
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        let never = poll_until(
            Duration::from_secs(5),
            Duration::from_secs(1),
            "never",
            || async { None::<()> },
        )
        .await;
        assert_eq!(
            never.expect_err("gives up").to_string(),
            "never did not finish within 5s"
        );
    }

    #[test]
    fn saturating_add_clamps_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            saturating_add(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        let far = saturating_add(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(1_000_000));
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
