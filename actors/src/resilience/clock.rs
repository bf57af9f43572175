//! The injectable source of "now" for actors that need the time without having it passed in,
//! plus saturating instant arithmetic shared by the other primitives.
//!
//! The primitives themselves never call [`Clock::now`]; only their callers do. [`TokioClock`]
//! reads `tokio::time::Instant::now()`, so a paused tokio test clock controls it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Where "now" comes from.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Instant;
}

/// The production clock: tokio's, which honours `tokio::time::pause` in tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl TokioClock {
    /// A [`SharedClock`] backed by tokio's clock.
    pub fn shared() -> SharedClock {
        Arc::new(TokioClock)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// `at + d`, clamped to the latest representable instant instead of panicking, so absurd
/// configured durations ("open for 10 000 years") degrade to "as long as possible".
pub(super) fn saturating_add(at: Instant, d: Duration) -> Instant {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::shared();
        let before = clock.now();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(clock.now() - before, Duration::from_secs(7));
    }

    #[test]
    fn saturating_add_never_panics() {
        let now = Instant::now();
        assert_eq!(
            saturating_add(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        let far = saturating_add(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(100 * 365 * 24 * 3600));
    }
}
