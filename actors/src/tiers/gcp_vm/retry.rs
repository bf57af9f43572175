//! Retries of Compute Engine calls: which errors are worth another attempt, how long to wait
//! (full jitter from the one [`Backoff`], `Retry-After` as a floor, never above the cap), and when
//! to give up (attempts, the pool's shared [`SharedRetryBudget`], the caller's overall deadline).
//!
//! Every first attempt of a new request deposits into the budget and every retry withdraws from
//! it, so however many slots (or supervisors sharing a budget) hit a storm of 429s, their retries
//! together stay within the budget instead of multiplying the load, and jitter keeps them from
//! retrying in lockstep. Polls (of a zone operation, of an instance coming up) follow a request
//! already counted: [`Retrier::poll`] retries them the same way but deposits nothing.
//!
//! Waits: without `Retry-After`, the [`Backoff`]'s full jitter (`random(0, min(cap, base·2ⁿ))`).
//! With it, `floor + random(0, spread)` where `floor = min(Retry-After, cap/2)` and `spread` is the
//! backoff's ceiling for this attempt, at most `cap - floor` — or all of `cap - floor` when the
//! server asked for the cap or more (it wants clients away as long as cascade will wait). So no
//! wait exceeds `cap`, `Retry-After` is honoured up to half the cap, and clients told the same
//! thing never wait exactly as long.
//!
//! A `Retry-After` is a promise for the whole pool, not for one retry loop: it holds every caller
//! sharing this retrier (the start phase, background replacements and deletions, polls, the
//! watch's look) until `min(Retry-After, cap/2)` has passed — first attempts included, which the
//! budget never stops. Callers held at once are let go over `random(0, min(base, cap/2))` after
//! the hold, so they do not come back together; a caller whose deadline ends inside the hold
//! gives up at once with "rate limited until …". The retrier also keeps the API's last error
//! (until a call succeeds) for the tier's status.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::debug;

use super::client::ApiError;
use crate::resilience::{
    Backoff, BackoffConfig, Deadline, Jitter, RetryBudgetConfig, SharedRetryBudget, with_deadline,
};

/// `[tiers.gcp_vm.retry]`: retries of Compute Engine API calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Ceiling of the first wait; doubles per retry.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// No wait exceeds this, whatever `Retry-After` says.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// The retry budget shared by every call the pool makes.
    pub budget: RetryBudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            max_attempts: 6,
            budget: RetryBudgetConfig::default(),
        }
    }
}

impl RetryConfig {
    /// Problems as `(key relative to [tiers.gcp_vm.retry], message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = self.backoff().validate();
        if self.max_attempts == 0 {
            problems.push(("max_attempts".into(), "must be at least 1".into()));
        }
        for (key, problem) in self.budget.validate() {
            problems.push((format!("budget.{key}"), problem));
        }
        problems
    }

    fn backoff(&self) -> BackoffConfig {
        BackoffConfig {
            base: self.base,
            cap: self.cap,
            reset_after: Duration::MAX,
            jitter: Jitter::Full,
        }
    }
}

/// One wait before a retry, as chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryWait {
    /// The call, e.g. `compute.instances.insert pool-0`.
    pub call: String,
    /// The attempt that failed (1 = the first).
    pub attempt: u32,
    pub wait: Duration,
    pub error: String,
}

/// Sees every wait the retrier chooses (tests, metrics).
pub type RetryObserver = Arc<dyn Fn(&RetryWait) + Send + Sync>;

/// Why a call stopped being retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// The error is not worth another attempt (a 4xx other than 429).
    NotRetryable,
    /// `max_attempts` were made.
    Attempts,
    /// The pool's retry budget had no token left.
    Budget,
    /// The caller's overall deadline would pass before the next attempt.
    Deadline,
    /// An earlier `Retry-After` holds the pool's calls past the caller's deadline.
    Held { until: SystemTime },
}

/// A call that failed for good: its last error and why it was not retried again.
#[derive(Debug, Clone, thiserror::Error)]
pub struct CallError {
    pub call: String,
    pub attempts: u32,
    pub gave_up: GaveUp,
    pub last: ApiError,
}

impl CallError {
    /// Stopped by the caller's deadline (its own, or a hold past it), not by an answer.
    pub fn out_of_time(&self) -> bool {
        matches!(self.gave_up, GaveUp::Deadline | GaveUp::Held { .. })
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.last)?;
        match self.gave_up {
            GaveUp::NotRetryable => Ok(()),
            GaveUp::Attempts => write!(f, " (gave up after {} attempts)", self.attempts),
            GaveUp::Budget => write!(
                f,
                " (gave up after {} attempts: the pool's retry budget is exhausted)",
                self.attempts
            ),
            GaveUp::Deadline => write!(
                f,
                " (gave up after {} attempts: out of time)",
                self.attempts
            ),
            GaveUp::Held { until } => write!(
                f,
                " (not sent again: rate limited until {}, past this call's deadline)",
                humantime::format_rfc3339_seconds(until)
            ),
        }
    }
}

/// Runs calls with retries; clones share the budget, the counters, the hold and the last error.
#[derive(Clone)]
pub struct Retrier {
    config: RetryConfig,
    budget: SharedRetryBudget,
    observer: Option<RetryObserver>,
    retries: Arc<AtomicU64>,
    api: Arc<Mutex<ApiState>>,
}

/// What every caller of the API learns from the others.
#[derive(Debug, Default)]
struct ApiState {
    /// No call goes out before this.
    hold: Option<Hold>,
    /// The last error a call got, cleared by the next success.
    last_error: Option<String>,
}

/// A `Retry-After` in force.
#[derive(Debug, Clone)]
struct Hold {
    until: Instant,
    /// `until` on the wall clock, for people.
    until_wall: SystemTime,
    /// The call and the answer that asked for it.
    call: String,
    error: ApiError,
}

impl Retrier {
    pub fn new(config: RetryConfig, now: Instant) -> Self {
        Self {
            budget: SharedRetryBudget::new(config.budget.clone(), now),
            config,
            observer: None,
            retries: Arc::new(AtomicU64::new(0)),
            api: Arc::new(Mutex::new(ApiState::default())),
        }
    }

    fn api_state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.api
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds every caller for `error`'s `Retry-After` (up to `cap/2`), unless a longer hold is in
    /// force already.
    pub fn hold_for(&self, call: &str, error: &ApiError) {
        let Some(asked) = error.retry_after else {
            return;
        };
        let hold = asked.min(self.config.cap / 2);
        let now = Instant::now();
        let until = now + hold;
        let mut api = self.api_state();
        if api.hold.as_ref().is_none_or(|h| h.until < until) {
            api.hold = Some(Hold {
                until,
                until_wall: SystemTime::now() + hold,
                call: call.to_owned(),
                error: error.clone(),
            });
        }
    }

    /// When the hold in force ends, if one is.
    pub fn held_until(&self, now: Instant) -> Option<Instant> {
        let mut api = self.api_state();
        match &api.hold {
            Some(hold) if hold.until > now => Some(hold.until),
            Some(_) => {
                api.hold = None;
                None
            }
            None => None,
        }
    }

    /// Records a call's failure for the status.
    pub fn note_error(&self, call: &str, error: &ApiError) {
        self.api_state().last_error = Some(format!("{call}: {error}"));
    }

    /// The API answered: its last error is history.
    pub fn note_success(&self) {
        self.api_state().last_error = None;
    }

    /// The API's state for the tier's reason: a hold in force (`rate limited until …`), else the
    /// last error since the last success; `None` when calls succeed.
    pub fn api_status(&self) -> Option<String> {
        let now = Instant::now();
        let api = self.api_state();
        match (&api.hold, &api.last_error) {
            (Some(hold), _) if hold.until > now => Some(format!(
                "rate limited until {}: {}: {}",
                humantime::format_rfc3339_seconds(hold.until_wall),
                hold.call,
                hold.error
            )),
            (_, Some(error)) => Some(error.clone()),
            _ => None,
        }
    }

    /// Waits out the hold in force, if any, plus a little jitter; gives up at once if it lasts
    /// past `deadline`.
    async fn gate(&self, deadline: Deadline) -> Result<(), Hold> {
        loop {
            let now = Instant::now();
            let hold = {
                let api = self.api_state();
                match &api.hold {
                    Some(hold) if hold.until > now => hold.clone(),
                    _ => return Ok(()),
                }
            };
            if hold.until.saturating_duration_since(now) >= deadline.remaining(now) {
                return Err(hold);
            }
            let spread = self.config.base.min(self.config.cap / 2);
            let nanos = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
            let jitter = Duration::from_nanos(rand::rng().random_range(0..=nanos));
            let wake = (hold.until + jitter).min(now + deadline.remaining(now));
            tokio::time::sleep_until(wake).await;
        }
    }

    pub fn with_observer(mut self, observer: RetryObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Retries made so far by every call of this retrier.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Tokens the shared budget holds now.
    #[cfg(test)]
    pub fn budget_balance(&self, now: Instant) -> f64 {
        self.budget.balance(now)
    }

    /// Runs a new request `op` until it succeeds or one of the limits stops it: its first attempt
    /// deposits into the budget. Each attempt is also bounded by what is left of `deadline`.
    pub async fn run<T, F, Fut>(
        &self,
        call: &str,
        deadline: Deadline,
        op: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        self.attempts(call, deadline, true, op).await
    }

    /// Like [`run`](Self::run) for a poll that follows a request already counted (an operation's
    /// status, an instance coming up): retried the same way, but it deposits nothing, so waiting
    /// long for an operation does not earn retries.
    pub async fn poll<T, F, Fut>(
        &self,
        call: &str,
        deadline: Deadline,
        op: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        self.attempts(call, deadline, false, op).await
    }

    async fn attempts<T, F, Fut>(
        &self,
        call: &str,
        deadline: Deadline,
        deposit: bool,
        mut op: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut backoff = Backoff::new(self.config.backoff());
        let cap = self.config.cap;
        let mut attempt = 0u32;
        loop {
            if let Err(hold) = self.gate(deadline).await {
                return Err(CallError {
                    call: call.to_owned(),
                    attempts: attempt,
                    gave_up: GaveUp::Held {
                        until: hold.until_wall,
                    },
                    last: hold.error,
                });
            }
            attempt = attempt.saturating_add(1);
            let now = Instant::now();
            if attempt == 1 && deposit {
                self.budget.deposit(now);
            }
            let remaining = deadline.remaining(now);
            let error = match with_deadline(remaining, call, op()).await {
                Ok(Ok(value)) => {
                    self.note_success();
                    return Ok(value);
                }
                Ok(Err(error)) => error,
                Err(timeout) => ApiError::timeout(timeout.after),
            };
            self.note_error(call, &error);
            self.hold_for(call, &error);
            let stop = |gave_up| CallError {
                call: call.to_owned(),
                attempts: attempt,
                gave_up,
                last: error.clone(),
            };
            if !error.is_retryable() {
                return Err(stop(GaveUp::NotRetryable));
            }
            if attempt >= self.config.max_attempts {
                return Err(stop(GaveUp::Attempts));
            }
            // Another caller's Retry-After counts as this one's.
            let held = self
                .held_until(Instant::now())
                .map(|until| until.saturating_duration_since(Instant::now()));
            let asked = match (error.retry_after, held) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let wait = retry_wait(&mut backoff, cap, asked);
            let now = Instant::now();
            if wait >= deadline.remaining(now) {
                return Err(stop(GaveUp::Deadline));
            }
            if !self.budget.try_withdraw(now) {
                return Err(stop(GaveUp::Budget));
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            let chosen = RetryWait {
                call: call.to_owned(),
                attempt,
                wait,
                error: error.to_string(),
            };
            debug!(call = %chosen.call, attempt, wait_ms = wait.as_millis() as u64, error = %chosen.error, "Retrying a Compute Engine call.");
            if let Some(observer) = &self.observer {
                observer(&chosen);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// The wait before the next attempt (see the module doc): never above `cap`, never below
/// `min(asked, cap/2)`, and random, so clients told the same `Retry-After` spread out.
fn retry_wait(backoff: &mut Backoff, cap: Duration, asked: Option<Duration>) -> Duration {
    let ceiling = backoff.ceiling().min(cap);
    let jittered = backoff.next_delay().min(cap);
    let Some(asked) = asked else {
        return jittered;
    };
    let floor = asked.min(cap / 2);
    let room = cap.saturating_sub(floor);
    let spread = if asked >= cap {
        room
    } else {
        ceiling.min(room)
    };
    let nanos = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
    let extra = Duration::from_nanos(rand::rng().random_range(0..=nanos));
    floor.saturating_add(extra).min(cap)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn retrier(max_attempts: u32, reserve: f64) -> (Retrier, Arc<Mutex<Vec<RetryWait>>>) {
        let waits = Arc::new(Mutex::new(Vec::new()));
        let seen = waits.clone();
        let config = RetryConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(40),
            max_attempts,
            budget: RetryBudgetConfig {
                ratio: 0.0,
                min_per_sec: reserve / 10.0,
                window: Duration::from_secs(10),
            },
        };
        let r = Retrier::new(config, Instant::now()).with_observer(Arc::new(move |w| {
            seen.lock().expect("lock").push(w.clone())
        }));
        (r, waits)
    }

    fn status(code: u16, retry_after: Option<Duration>) -> ApiError {
        ApiError {
            status: Some(code),
            reason: None,
            message: "nope".into(),
            retry_after,
            timed_out: false,
            credentials: false,
        }
    }

    fn far() -> Deadline {
        Deadline::after(Instant::now(), Duration::from_secs(60))
    }

    #[tokio::test(start_paused = true)]
    async fn not_retryable_errors_fail_at_once() {
        let (r, waits) = retrier(5, 10.0);
        let mut calls = 0;
        let err = r
            .run("x", far(), || {
                calls += 1;
                async { Err::<(), _>(status(403, None)) }
            })
            .await
            .expect_err("403 fails");
        assert_eq!(
            (calls, err.attempts, err.gave_up),
            (1, 1, GaveUp::NotRetryable)
        );
        assert!(waits.lock().expect("lock").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_errors_stop_at_max_attempts() {
        let (r, waits) = retrier(4, 100.0);
        let err = r
            .run("x", far(), || async { Err::<(), _>(status(503, None)) })
            .await
            .expect_err("always 503");
        assert_eq!((err.attempts, err.gave_up), (4, GaveUp::Attempts));
        assert_eq!(waits.lock().expect("lock").len(), 3);
        assert!(
            err.to_string().contains("gave up after 4 attempts"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_after_retries_returns_the_value() {
        let (r, _) = retrier(5, 10.0);
        let mut calls = 0;
        let v = r
            .run("x", far(), || {
                calls += 1;
                let fail = calls < 3;
                async move { if fail { Err(status(429, None)) } else { Ok(7) } }
            })
            .await
            .expect("third attempt succeeds");
        assert_eq!((v, calls), (7, 3));
        assert_eq!(r.retries(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_stops_retries_shared_by_clones() {
        let (r, _) = retrier(100, 3.0);
        let other = r.clone();
        let a = r
            .run("a", far(), || async { Err::<(), _>(status(429, None)) })
            .await
            .expect_err("budget");
        assert_eq!((a.attempts, a.gave_up), (4, GaveUp::Budget));
        let b = other
            .run("b", far(), || async { Err::<(), _>(status(429, None)) })
            .await
            .expect_err("budget");
        assert_eq!((b.attempts, b.gave_up), (1, GaveUp::Budget));
        assert!(b.to_string().contains("retry budget"), "{b}");
    }

    async fn waits_for(retry_after: Duration, attempts: u32) -> Vec<Duration> {
        let (r, waits) = retrier(attempts, 100.0);
        let _ = r
            .run("x", far(), || async {
                Err::<(), _>(status(429, Some(retry_after)))
            })
            .await;
        let seen: Vec<Duration> = waits.lock().expect("lock").iter().map(|w| w.wait).collect();
        assert_eq!(seen.len() as u32, attempts - 1);
        seen
    }

    fn assert_distinct(waits: &[Duration]) {
        for (i, a) in waits.iter().enumerate() {
            for b in &waits[i + 1..] {
                assert_ne!(a, b, "two retries waited exactly as long: {waits:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor_under_the_cap() {
        // Cap 40 ms. Asked for 15 ms (under half the cap): a floor, plus jitter.
        let waits = waits_for(Duration::from_millis(15), 4).await;
        for w in &waits {
            assert!(*w >= Duration::from_millis(15), "{waits:?}");
            assert!(*w <= Duration::from_millis(40), "{waits:?}");
        }
        assert_distinct(&waits);
        // Asked for 30 ms: honoured up to half the cap, so waits keep room to spread.
        let waits = waits_for(Duration::from_millis(30), 6).await;
        for w in &waits {
            assert!(*w >= Duration::from_millis(20), "{waits:?}");
            assert!(*w <= Duration::from_millis(40), "{waits:?}");
        }
        assert_distinct(&waits);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_beyond_the_cap_still_spreads_waits_below_it() {
        // Everyone told "an hour" must not come back together at exactly the cap.
        let mut all = Vec::new();
        for _ in 0..4 {
            all.extend(waits_for(Duration::from_secs(3600), 6).await);
        }
        for w in &all {
            assert!(*w >= Duration::from_millis(20), "{all:?}");
            assert!(*w <= Duration::from_millis(40), "{all:?}");
        }
        assert_distinct(&all);
        let spread = *all.iter().max().expect("waits") - *all.iter().min().expect("waits");
        assert!(spread >= Duration::from_millis(5), "{all:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn polls_deposit_nothing_into_the_budget() {
        let config = RetryConfig {
            budget: RetryBudgetConfig {
                ratio: 1.0,
                min_per_sec: 0.0,
                window: Duration::from_secs(10),
            },
            ..RetryConfig::default()
        };
        let r = Retrier::new(config, Instant::now());
        r.run("compute.instances.insert", far(), || async { Ok(()) })
            .await
            .expect("ok");
        for _ in 0..5 {
            r.poll("compute.zoneOperations.get", far(), || async { Ok(()) })
                .await
                .expect("ok");
        }
        assert_eq!(
            r.budget_balance(Instant::now()),
            1.0,
            "one request, one deposit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_attempts_and_waits() {
        let (r, _) = retrier(100, 1000.0);
        let start = Instant::now();
        let err = r
            .run(
                "x",
                Deadline::after(start, Duration::from_millis(500)),
                || async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err::<(), _>(status(500, None))
                },
            )
            .await
            .expect_err("out of time");
        assert_eq!(err.gave_up, GaveUp::Deadline);
        assert!(Instant::now() - start <= Duration::from_millis(500));
        // A call that hangs is cut at the deadline.
        let err = r
            .run(
                "hang",
                Deadline::after(Instant::now(), Duration::from_millis(100)),
                std::future::pending::<Result<(), ApiError>>,
            )
            .await
            .expect_err("hangs");
        assert!(err.last.timed_out);
    }
}
