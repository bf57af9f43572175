//! OTP restart intensity: more than `max_restarts` restarts within `window` means the supervisor
//! should stop restarting and escalate.
//!
//! Does no I/O and never reads the clock. A restart at `t` is inside the window at `now` while
//! `now - t < window`. Only restarts still inside the window are kept, so memory is bounded by
//! the restart rate, not by uptime.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct RestartIntensity {
    max_restarts: u32,
    window: Duration,
    recent: VecDeque<Instant>,
    total: u64,
}

impl RestartIntensity {
    pub fn new(max_restarts: u32, window: Duration) -> Self {
        Self {
            max_restarts,
            window,
            recent: VecDeque::new(),
            total: 0,
        }
    }

    /// Records a restart at `now`; true if it exceeds the intensity, i.e. it is the
    /// `(max_restarts + 1)`-th (or later) restart inside the window. With `max_restarts == 0`
    /// every restart exceeds.
    pub fn record(&mut self, now: Instant) -> bool {
        self.prune(now);
        self.recent.push_back(now);
        self.total = self.total.saturating_add(1);
        self.recent.len() > self.max_restarts as usize
    }

    /// Restarts inside the window at `now`.
    pub fn count(&self, now: Instant) -> u32 {
        let inside = self.recent.iter().filter(|t| self.inside(**t, now)).count();
        u32::try_from(inside).unwrap_or(u32::MAX)
    }

    /// All restarts ever recorded.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// New limits; the restarts recorded so far stay.
    pub fn set_limits(&mut self, max_restarts: u32, window: Duration) {
        self.max_restarts = max_restarts;
        self.window = window;
    }

    pub fn max_restarts(&self) -> u32 {
        self.max_restarts
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn inside(&self, t: Instant, now: Instant) -> bool {
        now.saturating_duration_since(t) < self.window
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&oldest) = self.recent.front() {
            if self.inside(oldest, now) {
                break;
            }
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn fourth_restart_within_window_exceeds_three() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(3, 10 * S);
        assert!(!r.record(t0));
        assert!(!r.record(t0 + S));
        assert!(!r.record(t0 + 2 * S));
        assert_eq!(r.count(t0 + 2 * S), 3);
        assert!(r.record(t0 + 9 * S));
        assert_eq!(r.count(t0 + 9 * S), 4);
        assert_eq!(r.total(), 4);
    }

    #[test]
    fn restarts_spaced_wider_than_window_never_exceed() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(3, 10 * S);
        for i in 0..100u32 {
            assert!(!r.record(t0 + 11 * S * i), "restart {i}");
        }
        assert_eq!(r.count(t0 + 11 * S * 99), 1);
        assert_eq!(r.total(), 100);
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(3, 10 * S);
        for i in 0..3 {
            r.record(t0 + i * S);
        }
        // t0 is exactly one window old at t0 + 10s, so it no longer counts.
        assert_eq!(r.count(t0 + 10 * S), 2);
        assert!(!r.record(t0 + 10 * S));
        assert!(r.record(t0 + 10 * S));
    }

    #[test]
    fn zero_max_restarts_escalates_immediately() {
        let mut r = RestartIntensity::new(0, 10 * S);
        assert!(r.record(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn driven_by_paused_tokio_clock() {
        let mut r = RestartIntensity::new(1, 10 * S);
        assert!(!r.record(Instant::now()));
        tokio::time::advance(5 * S).await;
        assert!(r.record(Instant::now()));
        tokio::time::advance(10 * S).await;
        assert!(!r.record(Instant::now()));
    }
}
