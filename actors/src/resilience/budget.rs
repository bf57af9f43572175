//! The retry budget: how many retries a group of callers may add to their first attempts.
//!
//! Backoff spaces one caller's retries out; the budget bounds what all of them add together, so a
//! storm of errors (an API answering 429 to everyone) cannot multiply the load on the API by the
//! number of attempts each caller allows. Finagle's `RetryBudget` model: every first attempt
//! deposits `ratio` of a token, every retry withdraws one whole token, and a reserve of
//! `min_per_sec * window` tokens lets a caller that sends little still retry. Deposits and
//! withdrawals count for `window` and then expire, so over any `window` the retries stay below
//! `min_per_sec * window + ratio * first_attempts`.
//!
//! Pure: no I/O, never reads the clock (`now` is passed in), saturating arithmetic, never panics.
//! [`SharedRetryBudget`] is the cheap clonable handle every caller of one group holds.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The window is kept as this many buckets: expiry is accurate to `window / BUCKETS`.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Retries may add this fraction of first attempts (0.2: one retry per five requests).
    pub ratio: f64,
    /// Retries per second allowed whatever the traffic, so a quiet caller can still retry.
    pub min_per_sec: f64,
    /// How long a deposit or a withdrawal counts.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            // Six retries a minute for a caller that sends almost nothing: enough to ride out a
            // blip, too few to hammer a rate-limited API.
            min_per_sec: 0.1,
            window: Duration::from_secs(60),
        }
    }
}

impl RetryBudgetConfig {
    /// Problems with this configuration as `(field, problem)`; empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        // Written so that NaN fails too.
        if !(self.ratio >= 0.0 && self.ratio.is_finite()) {
            problems.push((
                "ratio".into(),
                format!("must be a finite number of at least 0, got {}", self.ratio),
            ));
        }
        if !(self.min_per_sec >= 0.0 && self.min_per_sec.is_finite()) {
            problems.push((
                "min_per_sec".into(),
                format!(
                    "must be a finite number of at least 0, got {}",
                    self.min_per_sec
                ),
            ));
        }
        if self.window.is_zero() {
            problems.push(("window".into(), "must be greater than zero".into()));
        }
        problems
    }

    /// Tokens always available in a window; non-finite or negative values count as zero.
    fn reserve(&self) -> f64 {
        sanitize(self.min_per_sec * self.window.as_secs_f64())
    }
}

fn sanitize(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    /// Which slice of time (counted in bucket widths from the origin) the counts belong to.
    index: u64,
    deposits: u64,
    withdrawals: u64,
}

#[derive(Debug, Clone)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    origin: Instant,
    /// Nanoseconds per bucket; at least 1.
    width: u128,
    buckets: [Bucket; BUCKETS],
}

impl RetryBudget {
    /// A full budget (only the reserve: nothing deposited yet) starting at `now`.
    pub fn new(config: RetryBudgetConfig, now: Instant) -> Self {
        let width = (config.window.as_nanos() / BUCKETS as u128).max(1);
        Self {
            config,
            origin: now,
            width,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    pub fn config(&self) -> &RetryBudgetConfig {
        &self.config
    }

    /// A first attempt was made: adds `ratio` of a token.
    pub fn deposit(&mut self, now: Instant) {
        self.deposit_many(now, 1);
    }

    /// `count` first attempts were made.
    pub fn deposit_many(&mut self, now: Instant, count: u64) {
        let bucket = self.bucket_mut(now);
        bucket.deposits = bucket.deposits.saturating_add(count);
    }

    /// A retry wants to go: takes one token if the balance holds one, else refuses.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        // The epsilon keeps float rounding (0.1 * 10 = 0.999...) from refusing a whole token.
        if self.balance(now) < 1.0 - 1e-9 {
            return false;
        }
        let bucket = self.bucket_mut(now);
        bucket.withdrawals = bucket.withdrawals.saturating_add(1);
        true
    }

    /// Tokens available now: `reserve + ratio * deposits - withdrawals` over the last window.
    pub fn balance(&self, now: Instant) -> f64 {
        let current = self.index(now);
        let (deposits, withdrawals) = self
            .buckets
            .iter()
            .filter(|b| in_window(b.index, current))
            .fold((0u64, 0u64), |(d, w), b| {
                (
                    d.saturating_add(b.deposits),
                    w.saturating_add(b.withdrawals),
                )
            });
        let earned = sanitize(self.config.ratio) * deposits as f64;
        self.config.reserve() + earned - withdrawals as f64
    }

    fn index(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / self.width).unwrap_or(u64::MAX)
    }

    fn bucket_mut(&mut self, now: Instant) -> &mut Bucket {
        let index = self.index(now);
        let bucket = &mut self.buckets[(index % BUCKETS as u64) as usize];
        // A bucket holding an older slice is reused; one holding a newer slice (time handed in
        // out of order) keeps its counts, which errs on the side of fewer retries.
        if bucket.index < index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket
    }
}

/// Whether a bucket for slice `index` still counts at slice `current` (slices from the future,
/// possible only when instants are handed in out of order, count too).
fn in_window(index: u64, current: u64) -> bool {
    index.saturating_add(BUCKETS as u64) > current
}

/// One [`RetryBudget`] shared by every caller of a group (all slots of a VM pool): cloning is
/// cheap and every clone draws on the same tokens.
#[derive(Debug, Clone)]
pub struct SharedRetryBudget {
    inner: Arc<Mutex<RetryBudget>>,
}

impl SharedRetryBudget {
    pub fn new(config: RetryBudgetConfig, now: Instant) -> Self {
        Self {
            inner: Arc::new(Mutex::new(RetryBudget::new(config, now))),
        }
    }

    pub fn deposit(&self, now: Instant) {
        self.lock().deposit(now);
    }

    /// `count` first attempts, counted elsewhere and handed in together.
    pub fn deposit_many(&self, now: Instant, count: u64) {
        if count > 0 {
            self.lock().deposit_many(now, count);
        }
    }

    pub fn try_withdraw(&self, now: Instant) -> bool {
        self.lock().try_withdraw(now)
    }

    pub fn balance(&self, now: Instant) -> f64 {
        self.lock().balance(now)
    }

    fn lock(&self) -> MutexGuard<'_, RetryBudget> {
        // The budget's methods cannot panic, so a poisoned lock still holds consistent counts.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ratio: f64, min_per_sec: f64, window_secs: u64) -> RetryBudgetConfig {
        RetryBudgetConfig {
            ratio,
            min_per_sec,
            window: Duration::from_secs(window_secs),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Withdraws until refused; returns how many went through.
    fn drain(b: &mut RetryBudget, now: Instant) -> u32 {
        let mut n = 0;
        while b.try_withdraw(now) {
            n += 1;
            assert!(n < 1_000_000, "budget never ran out");
        }
        n
    }

    #[test]
    fn reserve_alone_allows_min_per_sec_times_window() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(0.0, 0.5, 10), t0);
        assert_eq!(b.balance(t0), 5.0);
        assert_eq!(drain(&mut b, t0), 5);
        assert_eq!(b.balance(t0), 0.0);
        assert!(!b.try_withdraw(t0 + secs(9)));
    }

    #[test]
    fn many_deposits_count_as_each_one_would() {
        let t0 = Instant::now();
        let mut one_by_one = RetryBudget::new(config(0.2, 0.0, 10), t0);
        let mut together = one_by_one.clone();
        for _ in 0..10 {
            one_by_one.deposit(t0);
        }
        together.deposit_many(t0, 10);
        assert_eq!(one_by_one.balance(t0), together.balance(t0));
        assert_eq!(drain(&mut together, t0), 2);
    }

    #[test]
    fn deposits_earn_ratio_of_a_token_each() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(0.2, 0.0, 10), t0);
        assert!(!b.try_withdraw(t0), "nothing deposited, no reserve");
        for _ in 0..4 {
            b.deposit(t0);
        }
        assert!((b.balance(t0) - 0.8).abs() < 1e-9);
        assert!(!b.try_withdraw(t0), "0.8 of a token is not a token");
        b.deposit(t0);
        assert!(b.try_withdraw(t0));
        assert!(!b.try_withdraw(t0));
        for _ in 0..100 {
            b.deposit(t0);
        }
        assert_eq!(drain(&mut b, t0), 20);
    }

    #[test]
    fn reserve_and_deposits_add_up() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(0.5, 0.3, 10), t0);
        b.deposit(t0);
        b.deposit(t0);
        // 3 (reserve) + 2 * 0.5
        assert_eq!(drain(&mut b, t0), 4);
    }

    #[test]
    fn withdrawals_expire_after_the_window_and_the_reserve_comes_back() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(0.0, 0.2, 10), t0);
        assert_eq!(drain(&mut b, t0), 2);
        // Still within the window (bucket width 1 s): nothing back.
        assert!(!b.try_withdraw(t0 + Duration::from_millis(9_999)));
        // One full window later the withdrawals no longer count.
        assert_eq!(drain(&mut b, t0 + secs(10)), 2);
    }

    #[test]
    fn deposits_expire_after_the_window() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(1.0, 0.0, 10), t0);
        for _ in 0..3 {
            b.deposit(t0);
        }
        assert_eq!(b.balance(t0 + secs(9)), 3.0);
        assert_eq!(b.balance(t0 + secs(10)), 0.0);
        assert!(!b.try_withdraw(t0 + secs(10)));
    }

    #[test]
    fn expiry_is_per_bucket_so_a_window_slides() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(1.0, 0.0, 10), t0);
        for s in 0..10 {
            b.deposit(t0 + secs(s));
        }
        assert_eq!(b.balance(t0 + secs(9)), 10.0);
        // Each further second drops the oldest second's deposit.
        for s in 10..20 {
            assert_eq!(b.balance(t0 + secs(s)), (19 - s) as f64);
        }
    }

    #[test]
    fn a_long_quiet_period_resets_everything() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(0.5, 0.1, 10), t0);
        for _ in 0..10 {
            b.deposit(t0);
        }
        drain(&mut b, t0);
        let later = t0 + secs(3600);
        assert_eq!(b.balance(later), 1.0);
        // Buckets reused after wrapping around many times start from zero.
        b.deposit(later);
        assert_eq!(b.balance(later), 1.5);
    }

    #[test]
    fn zero_ratio_and_zero_reserve_never_allow_a_retry() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(0.0, 0.0, 10), t0);
        for _ in 0..1000 {
            b.deposit(t0);
        }
        assert!(!b.try_withdraw(t0));
    }

    #[test]
    fn out_of_order_and_absurd_instants_never_panic() {
        let t0 = Instant::now() + secs(100);
        let mut b = RetryBudget::new(config(1.0, 0.0, 10), t0);
        // Before the origin: counted in the first slice.
        b.deposit(t0 - secs(50));
        assert_eq!(b.balance(t0), 1.0);
        // Far future, then back: the newer bucket keeps its counts.
        let far = t0 + secs(1_000_000_000);
        b.deposit(far);
        assert_eq!(b.balance(far), 1.0);
        b.deposit(t0);
        assert!(b.balance(t0) >= 1.0);
        assert!(b.try_withdraw(far));
    }

    #[test]
    fn tiny_and_huge_windows_and_values_never_panic() {
        let t0 = Instant::now();
        for window in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            for (ratio, min) in [
                (f64::NAN, f64::NAN),
                (f64::INFINITY, f64::INFINITY),
                (-1.0, -1.0),
                (f64::MAX, f64::MAX),
            ] {
                let mut b = RetryBudget::new(
                    RetryBudgetConfig {
                        ratio,
                        min_per_sec: min,
                        window,
                    },
                    t0,
                );
                b.deposit(t0);
                b.try_withdraw(t0 + secs(1));
                let balance = b.balance(t0 + secs(2));
                assert!(!balance.is_nan(), "{ratio} {min} {window:?}");
            }
        }
        // Non-finite and negative inputs count as zero rather than as an endless budget.
        let mut b = RetryBudget::new(config(0.0, f64::INFINITY, 10), t0);
        assert!(!b.try_withdraw(t0));
        let mut b = RetryBudget::new(
            RetryBudgetConfig {
                ratio: -5.0,
                min_per_sec: 0.1,
                window: secs(10),
            },
            t0,
        );
        b.deposit(t0);
        assert_eq!(b.balance(t0), 1.0);
    }

    #[test]
    fn counts_saturate() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(config(1.0, 0.0, 10), t0);
        b.buckets[0].deposits = u64::MAX;
        b.buckets[1] = Bucket {
            index: 1,
            deposits: u64::MAX,
            withdrawals: 0,
        };
        b.deposit(t0);
        assert_eq!(b.buckets[0].deposits, u64::MAX);
        assert!(b.balance(t0 + secs(1)) > 0.0);
    }

    #[test]
    fn shared_handles_draw_on_one_budget() {
        let t0 = Instant::now();
        let a = SharedRetryBudget::new(config(0.5, 0.0, 10), t0);
        let b = a.clone();
        a.deposit(t0);
        b.deposit(t0);
        assert_eq!(a.balance(t0), 1.0);
        assert!(b.try_withdraw(t0));
        assert!(
            !a.try_withdraw(t0),
            "the clone's withdrawal emptied the shared budget"
        );
        assert_eq!(b.balance(t0), 0.0);
    }

    #[test]
    fn validate_names_bad_keys() {
        assert!(RetryBudgetConfig::default().validate().is_empty());
        let bad = RetryBudgetConfig {
            ratio: f64::NAN,
            min_per_sec: -1.0,
            window: Duration::ZERO,
        };
        let keys: Vec<String> = bad.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["ratio", "min_per_sec", "window"]);
        let inf = RetryBudgetConfig {
            ratio: f64::INFINITY,
            ..RetryBudgetConfig::default()
        };
        assert_eq!(inf.validate()[0].0, "ratio");
    }

    #[test]
    fn config_uses_humantime_and_rejects_unknown_fields() {
        let c: RetryBudgetConfig =
            serde_json::from_str(r#"{"ratio":0.1,"window":"30s"}"#).expect("valid config");
        assert_eq!(c.ratio, 0.1);
        assert_eq!(c.min_per_sec, 0.1);
        assert_eq!(c.window, secs(30));
        assert!(serde_json::from_str::<RetryBudgetConfig>(r#"{"ratoi":1}"#).is_err());
    }
}
