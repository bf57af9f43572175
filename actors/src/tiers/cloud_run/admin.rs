//! The Admin API check: one `services.get` in flight at a time, outliving the probe that started
//! it.
//!
//! The first call builds Google's client and fetches an access token, and any call may be slower
//! than the share of a probe the Admin API gets. Were it cancelled with the probe, a slow API
//! would never answer at all. So the check runs as a task of its own, bounded by
//! `admin.timeout`; a probe that needs an answer starts it (or joins the one in flight) and waits
//! at most its share for it, and an answer that comes later is kept for the next probes (and
//! shown in the details at once).
//!
//! Invariants: at most one check is in flight; a check started before a restart never writes its
//! answer after it; the task ends when the driver is dropped.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::client::{AdminApi, Readiness};

/// What the Admin API said last.
#[derive(Debug, Clone)]
pub(super) struct AdminView {
    pub readiness: Readiness,
    pub checked: Instant,
    /// A health probe failed and asked for a new answer: the next probe waits for it rather than
    /// trusting this one.
    pub stale: bool,
    /// Why the last check got no answer (the readiness is then the one before).
    pub error: Option<String>,
}

/// Everything mutable about the check.
#[derive(Default)]
struct State {
    view: Option<AdminView>,
    /// The check in flight: its generation and how to cancel it.
    in_flight: Option<(u64, CancellationToken)>,
    /// Bumped by every start and every `forget`, so an answer to a forgotten question is dropped.
    generation: u64,
}

pub(super) struct AdminCheck {
    api: AdminApi,
    /// How long a Ready answer is trusted.
    interval: Duration,
    /// Bound of one check, building the client included.
    timeout: Duration,
    state: Mutex<State>,
    /// Counts answers (and failures to get one): a waiting probe watches it move.
    answers: watch::Sender<u64>,
    /// The check task, so it is never detached from the driver.
    tasks: TaskTracker,
    /// Cancelled when the driver goes away.
    root: CancellationToken,
}

impl AdminCheck {
    pub(super) fn new(api: AdminApi, interval: Duration, timeout: Duration) -> Self {
        AdminCheck {
            api,
            interval,
            timeout,
            state: Mutex::new(State::default()),
            answers: watch::Sender::new(0),
            tasks: TaskTracker::new(),
            root: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn view(&self) -> Option<AdminView> {
        self.lock().view.clone()
    }

    /// The last answer, if it still stands at `now`: younger than `interval`, not marked stale,
    /// and not a failure (a failed service, or a refused question, is asked about every probe,
    /// so its recovery shows at once).
    pub(super) fn standing(&self, now: Instant) -> Option<Readiness> {
        let state = self.lock();
        let view = state.view.as_ref()?;
        let stands = !view.stale
            && !matches!(
                view.readiness,
                Readiness::Failed(_) | Readiness::Misconfigured(_)
            )
            && now.duration_since(view.checked) < self.interval;
        stands.then(|| view.readiness.clone())
    }

    /// Starts a check unless one is in flight, then waits for an answer at most `wait`. Returns
    /// the readiness to act on: the new answer if it came in time, else the last one (`None`
    /// before any).
    pub(super) async fn ask(self: &Arc<Self>, wait: Duration) -> Option<Readiness> {
        let mut answers = self.answers.subscribe();
        answers.mark_unchanged();
        self.start();
        // Not in time: the check goes on, and its answer is there for the next probe.
        let _ = tokio::time::timeout(wait, answers.changed()).await;
        self.lock().view.as_ref().map(|v| v.readiness.clone())
    }

    /// Asks for a new answer without waiting for it: the next probe reads it, or waits for it.
    pub(super) fn refresh(self: &Arc<Self>) {
        if let Some(view) = self.lock().view.as_mut() {
            view.stale = true;
        }
        self.start();
    }

    /// Starts a check unless one is in flight.
    fn start(self: &Arc<Self>) {
        let (generation, token) = {
            let mut state = self.lock();
            if state.in_flight.is_some() || self.root.is_cancelled() {
                return;
            }
            state.generation += 1;
            let token = self.root.child_token();
            state.in_flight = Some((state.generation, token.clone()));
            (state.generation, token)
        };
        let check = self.clone();
        self.tasks.spawn(async move {
            let answer = token
                .run_until_cancelled(check.api.readiness(check.timeout))
                .await;
            if let Some(answer) = answer {
                check.take(generation, answer);
            }
        });
    }

    /// Keeps the answer of the check of `generation`, unless a restart forgot the question.
    fn take(&self, generation: u64, answer: Result<Readiness, super::client::AdminError>) {
        let mut state = self.lock();
        if state.in_flight.as_ref().map(|(g, _)| *g) != Some(generation) {
            return;
        }
        state.in_flight = None;
        let last = state.view.take();
        let (readiness, error) = match answer {
            Ok(readiness) => {
                if last.as_ref().map(|v| &v.readiness) != Some(&readiness) {
                    match &readiness {
                        Readiness::Misconfigured(error) => {
                            warn!(backend.tier = "cloud_run", %error, "Admin API check failed: a configuration error.");
                        }
                        _ => {
                            info!(backend.tier = "cloud_run", ready = %readiness.describe(), "Admin API answered.");
                        }
                    }
                }
                (readiness, None)
            }
            Err(failed) => {
                let error = failed.message;
                // Said once per new error, not every interval.
                let repeated = last.as_ref().and_then(|v| v.error.as_ref()) == Some(&error);
                let known = last
                    .as_ref()
                    .map(|v| v.readiness.clone())
                    .filter(|r| !matches!(r, Readiness::Unknown | Readiness::Misconfigured(_)));
                match (&known, repeated) {
                    (_, true) => {
                        debug!(backend.tier = "cloud_run", %error, "Admin API check failed again.")
                    }
                    (Some(_), false) => {
                        warn!(backend.tier = "cloud_run", %error, "Admin API check failed; keeping its last answer.")
                    }
                    (None, false) => {
                        warn!(backend.tier = "cloud_run", %error, "Admin API check failed; no answer yet, the health check decides.")
                    }
                }
                (known.unwrap_or(Readiness::Unknown), Some(error))
            }
        };
        state.view = Some(AdminView {
            readiness,
            checked: Instant::now(),
            stale: false,
            error,
        });
        drop(state);
        self.answers.send_modify(|n| *n += 1);
    }

    /// Forgets the last answer and the check in flight (a restart): the next probe asks afresh,
    /// with a new client.
    pub(super) fn forget(&self) {
        let mut state = self.lock();
        if let Some((_, token)) = state.in_flight.take() {
            token.cancel();
        }
        state.generation += 1;
        state.view = None;
        drop(state);
        self.api.forget();
    }

    /// Cancels the check in flight for good (the driver is going away).
    pub(super) fn shutdown(&self) {
        self.root.cancel();
        self.tasks.close();
    }
}
