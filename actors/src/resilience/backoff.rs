//! Capped exponential backoff with optional full jitter, for restarts and retries.
//!
//! Owns the attempt count and the jitter RNG. Does no I/O and never reads the clock: the
//! run-length reset ([`Backoff::started`] / [`Backoff::ended`]) is driven by the caller's
//! `now`. The ceiling is `min(cap, base * 2^attempt)`, computed without overflow for every
//! attempt count.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How the delay is drawn below the ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Uniform in `[0, ceiling]`: spreads out many clients restarting at once.
    #[default]
    Full,
    /// Exactly the ceiling.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// Ceiling of the first delay.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// No delay exceeds this.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// A run that lasted at least this long counts as healthy and resets the attempt count.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
    pub jitter: Jitter,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(60),
            reset_after: Duration::from_secs(10),
            jitter: Jitter::Full,
        }
    }
}

impl BackoffConfig {
    /// Problems with this configuration as `(field, problem)`; empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.base.is_zero() {
            // A zero base never grows: restarts would spin.
            problems.push(("base".into(), "must be greater than zero".into()));
        }
        if self.cap < self.base {
            problems.push((
                "cap".into(),
                format!(
                    "must be at least base ({})",
                    crate::text::duration(self.base)
                ),
            ));
        }
        problems
    }
}

/// `min(cap, base * 2^times)` without overflow. Doubling stops as soon as the cap (or zero)
/// is reached, so this takes at most ~100 steps whatever `times` is.
pub(super) fn doubled_capped(base: Duration, times: u32, cap: Duration) -> Duration {
    let mut d = base;
    for _ in 0..times {
        if d >= cap || d.is_zero() {
            break;
        }
        d = d.saturating_mul(2);
    }
    d.min(cap)
}

#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    rng: SmallRng,
    attempt: u32,
    run_started: Option<Instant>,
}

impl Backoff {
    /// Jitter seeded from OS entropy.
    pub fn new(config: BackoffConfig) -> Self {
        // Jitter needs spread, not secrecy: if the OS cannot give entropy, the wall clock will do
        // rather than panicking.
        let rng = SmallRng::try_from_os_rng().unwrap_or_else(|_| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            SmallRng::seed_from_u64(nanos)
        });
        Self::with_rng(config, rng)
    }

    /// Reproducible jitter, for tests.
    pub fn with_seed(config: BackoffConfig, seed: u64) -> Self {
        Self::with_rng(config, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(config: BackoffConfig, rng: SmallRng) -> Self {
        Self {
            config,
            rng,
            attempt: 0,
            run_started: None,
        }
    }

    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// New settings for the attempts to come; the count so far stays.
    pub fn set_config(&mut self, config: BackoffConfig) {
        self.config = config;
    }

    /// The ceiling for the next attempt: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        doubled_capped(self.config.base, self.attempt, self.config.cap)
    }

    /// The delay before the next attempt; counts the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        match self.config.jitter {
            Jitter::None => ceiling,
            Jitter::Full => {
                // Ceilings beyond u64 nanoseconds (~584 years) are clamped; the range is never
                // empty, so sampling cannot panic.
                let max = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(self.rng.random_range(0..=max))
            }
        }
    }

    /// Attempts counted since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A run (a process, a container, an actor) started now.
    pub fn started(&mut self, now: Instant) {
        self.run_started = Some(now);
    }

    /// The run that [`started`](Self::started) last ended now. If it lasted at least
    /// `reset_after` it was healthy, so the attempt count resets first. Returns the delay before
    /// the next start (= [`next_delay`](Self::next_delay)). An end without a recorded start
    /// counts as a short run.
    pub fn ended(&mut self, now: Instant) -> Duration {
        let reset_after = self.config.reset_after;
        if self
            .run_started
            .take()
            .is_some_and(|started| now.saturating_duration_since(started) >= reset_after)
        {
            self.reset();
        }
        self.next_delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> BackoffConfig {
        BackoffConfig {
            jitter: Jitter::None,
            ..BackoffConfig::default()
        }
    }

    #[test]
    fn no_jitter_doubles_from_base_up_to_cap() {
        let mut b = Backoff::with_seed(no_jitter(), 1);
        let ms: Vec<u128> = (0..12).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(
            ms,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 60000, 60000
            ]
        );
        assert_eq!(b.attempt(), 12);
    }

    #[test]
    fn full_jitter_stays_within_ceiling_and_varies() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut samples = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            samples.push(d);
            // Keep the ceiling small and varied so the bound is exercised at many levels.
            if b.attempt() > 12 {
                b.reset();
            }
        }
        assert!(samples.iter().any(|d| *d != samples[0]));
        // Full jitter must reach well below the ceiling, not just wobble near it.
        assert!(samples.iter().any(|d| *d < Duration::from_millis(50)));
    }

    #[test]
    fn fixed_seed_is_reproducible() {
        let run = |seed| {
            let mut b = Backoff::with_seed(BackoffConfig::default(), seed);
            (0..20).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn huge_attempt_counts_never_overflow() {
        for jitter in [Jitter::None, Jitter::Full] {
            let mut b = Backoff::with_seed(
                BackoffConfig {
                    jitter,
                    ..BackoffConfig::default()
                },
                7,
            );
            for _ in 0..200 {
                assert!(b.next_delay() <= Duration::from_secs(60));
            }
            assert_eq!(b.ceiling(), Duration::from_secs(60));
            b.attempt = u32::MAX;
            assert_eq!(b.ceiling(), Duration::from_secs(60));
            b.next_delay();
            assert_eq!(b.attempt(), u32::MAX);
        }
        // A tiny base must still climb to the cap, not stop at a truncated multiplier.
        let tiny = BackoffConfig {
            base: Duration::from_nanos(1),
            cap: Duration::from_secs(3600),
            ..no_jitter()
        };
        assert_eq!(
            doubled_capped(tiny.base, 40, tiny.cap),
            Duration::from_nanos(1 << 40)
        );
        assert_eq!(doubled_capped(tiny.base, u32::MAX, tiny.cap), tiny.cap);
        assert_eq!(
            doubled_capped(Duration::MAX, u32::MAX, Duration::MAX),
            Duration::MAX
        );
        let mut b = Backoff::with_seed(
            BackoffConfig {
                cap: Duration::MAX,
                base: Duration::MAX,
                ..BackoffConfig::default()
            },
            3,
        );
        b.next_delay();
    }

    #[test]
    fn long_run_resets_attempts_short_run_does_not() {
        let t0 = Instant::now();
        let mut b = Backoff::with_seed(no_jitter(), 1);
        b.started(t0);
        assert_eq!(
            b.ended(t0 + Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        b.started(t0 + Duration::from_secs(2));
        assert_eq!(
            b.ended(t0 + Duration::from_secs(3)),
            Duration::from_millis(200)
        );
        b.started(t0 + Duration::from_secs(4));
        assert_eq!(
            b.ended(t0 + Duration::from_secs(5)),
            Duration::from_millis(400)
        );
        assert_eq!(b.attempt(), 3);

        // Exactly reset_after counts as long enough.
        b.started(t0 + Duration::from_secs(10));
        assert_eq!(
            b.ended(t0 + Duration::from_secs(20)),
            Duration::from_millis(100)
        );
        assert_eq!(b.attempt(), 1);

        // An end without a start is a short run.
        assert_eq!(
            b.ended(t0 + Duration::from_secs(100)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn validate_flags_bad_values() {
        assert!(BackoffConfig::default().validate().is_empty());
        let bad = BackoffConfig {
            base: Duration::ZERO,
            ..BackoffConfig::default()
        };
        assert_eq!(bad.validate()[0].0, "base");
        let bad = BackoffConfig {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(1),
            ..BackoffConfig::default()
        };
        assert_eq!(bad.validate()[0].0, "cap");
    }

    #[test]
    fn config_uses_humantime_and_rejects_unknown_fields() {
        let c: BackoffConfig =
            serde_json::from_str(r#"{"base":"250ms","cap":"2m","jitter":"none"}"#)
                .expect("valid config");
        assert_eq!(c.base, Duration::from_millis(250));
        assert_eq!(c.cap, Duration::from_secs(120));
        assert_eq!(c.reset_after, Duration::from_secs(10));
        assert_eq!(c.jitter, Jitter::None);
        let json = serde_json::to_value(BackoffConfig::default()).expect("serializes");
        assert_eq!(json["base"], "100ms");
        assert!(serde_json::from_str::<BackoffConfig>(r#"{"bsae":"1s"}"#).is_err());
    }
}
