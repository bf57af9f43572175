//! Resilience primitives: the one implementation of each that every tier uses.
//!
//! - [`CircuitBreaker`]: stops calling a backend that keeps failing, probes it again later.
//! - [`Backoff`]: capped exponential delays (with full jitter) between restarts or retries.
//! - [`with_deadline`] / [`Deadline`]: every awaited outside call is bounded in time;
//!   [`poll_until`]: every wait for a condition too.
//! - [`RetryBudget`] / [`SharedRetryBudget`]: bounds what retries add to first attempts across a
//!   group of callers (Finagle-style token budget).
//! - [`RestartIntensity`]: OTP-style "too many restarts in too short a time".
//!
//! Invariants shared by all of them: the breaker, backoff, retry budget, deadline arithmetic and
//! restart intensity do no I/O and never read the clock themselves; every method that needs time
//! takes `now: tokio::time::Instant`, so tests drive them with tokio's paused clock or with
//! instants built by hand. No input (configuration or time) makes them panic: arithmetic
//! saturates instead.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod deadline;
pub mod intensity;

pub use backoff::{Backoff, BackoffConfig, Jitter};
pub use breaker::{Admission, BreakerConfig, BreakerState, CircuitBreaker, TripReason};
pub use budget::{RetryBudget, RetryBudgetConfig, SharedRetryBudget};
pub use deadline::{Deadline, DeadlineExceeded, poll_until, saturating_add, with_deadline};
pub use intensity::RestartIntensity;
