//! The pool of spot VMs: its state, the steps that change it, and the watch that keeps it true.
//!
//! Slots `0..max_vms` each hold at most one VM named `{pool}-{slot}`, so every insert is
//! idempotent (a 409 adopts the existing VM). Work on one slot (create, replace, delete) holds that
//! slot's lock; the reconcile never waits for a busy slot, it leaves it alone. Every change is
//! written to the checkpoint before the next step, so a crash or a cancelled start leaves a state
//! the next reconcile can finish. Background work (the watch, replacements, idle deletions) runs
//! in the pool's `TaskTracker` under the current generation's `CancellationToken`; `stop` cancels
//! the generation and waits (briefly) for the tracked tasks to end; dropping the driver cancels
//! everything and stops every later checkpoint write, so an old pool never overwrites the file a
//! new one has loaded.
//!
//! Preemption is learnt from the API, never from a failing health check: a preempted VM keeps
//! answering during its ~30 s shutdown (STOPPING). While the pool holds VMs, every watch tick
//! (`watch_interval`) sends one `instances.list` filtered by the pool's label (one attempt, no
//! retries and no budget deposit: the next tick is the retry; a `Retry-After` pauses these looks)
//! and marks any VM seen STOPPING, TERMINATED or SUSPENDED lost at once. API cost: with the default
//! 500 ms tick, 2 reads/s (120/min) per pool while it holds VMs, none while it is empty, plus the
//! full reconcile (`instances.list` and `zoneOperations.list` of preemptions) every
//! `reconcile_interval`. A VM the quick look does not list at all triggers that reconcile at once.
//!
//! Ownership: a name alone never gets a VM deleted. Background work (replacements, idle
//! deletion, deletions of lost VMs) waits for the first successful reconcile since start, so
//! restored entries are confirmed by the label list first; and every `instances.delete` is
//! preceded by an `instances.get` that checks the pool's label (and the instance id, if known).
//!
//! Invariants: probing never creates or deletes anything; no awaited call (nor a wait for a
//! slot's lock) runs without a deadline; the pool never holds more than `max_vms` instances it
//! created.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::checkpoint::{self, Checkpoint, Loaded, OpKind, OpRef, Phase, VmEntry};
use super::client::{self, ApiError, ComputeApi, GceCompute, Op, Vm};
use super::retry::{CallError, GaveUp, Retrier};
use super::{GcpEnv, GcpVmConfig, OnPreemption, POOL_LABEL};
use crate::contract::{DriverEvent, ProbeOutcome, RestartReport, RestartRequest, TierId};
use crate::resilience::{Backoff, BackoffConfig, Deadline, Jitter, with_deadline};

/// How the pool tells the tier actor that something changed.
pub type Notify = Arc<dyn Fn(DriverEvent) + Send + Sync>;

/// Steps one slot may take in one `ensure_slot` before giving up (lost → deleted → created →
/// ready is four).
const MAX_STEPS: usize = 12;
/// How long `stop` waits for cancelled background tasks to end.
pub const STOP_WAIT: Duration = Duration::from_secs(5);
/// Preemption operations remembered as handled.
const HANDLED_KEPT: usize = 64;
/// Instance statuses of a VM that serves nothing and will not by itself.
const LOST_STATUSES: [&str; 5] = [
    "STOPPING",
    "STOPPED",
    "TERMINATED",
    "SUSPENDING",
    "SUSPENDED",
];

fn is_lost_status(status: &str) -> bool {
    LOST_STATUSES.contains(&status)
}

/// Polls of operations, instance status and health while waiting: 100 ms doubling to 2 s.
fn poll_backoff() -> Backoff {
    Backoff::new(BackoffConfig {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(2),
        reset_after: Duration::MAX,
        jitter: Jitter::None,
    })
}

/// Spacing of background attempts on a slot whose replacement or deletion failed.
fn job_backoff() -> Backoff {
    Backoff::new(BackoffConfig {
        base: Duration::from_secs(5),
        cap: Duration::from_secs(300),
        reset_after: Duration::MAX,
        jitter: Jitter::Full,
    })
}

/// Why a step on the pool failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("cannot use Compute Engine: {0}")]
    Connect(ApiError),
    #[error(
        "operation {op} ({kind} of VM {vm}) did not finish within {after}; abandoned — the VM will be reconciled"
    )]
    OperationTimeout {
        op: String,
        kind: &'static str,
        vm: String,
        after: String,
    },
    #[error("operation {op} ({kind} of VM {vm}) failed: {error}")]
    OperationFailed {
        op: String,
        kind: &'static str,
        vm: String,
        error: String,
    },
    #[error("VM {vm} did not become ready within {after}: {last}")]
    NotReady {
        vm: String,
        after: String,
        last: String,
    },
    #[error("an instance named {vm} exists without the label {POOL_LABEL}={pool}; not adopting it")]
    Foreign { vm: String, pool: String },
    #[error("the pool already holds {held} instances (max_vms = {max}); not creating {vm}")]
    Full { vm: String, held: usize, max: u32 },
    #[error("VM {vm} kept changing while being brought up; giving up for now")]
    Unsettled { vm: String },
    #[error(
        "VM {vm} stayed busy with other work (a start, replacement or deletion) until the deadline"
    )]
    Busy { vm: String },
}

/// `details["checkpoint"]` once an unusable checkpoint is out of the way.
fn set_aside_note(aside: &Path, error: &str) -> String {
    format!(
        "set aside as {} ({error}); rebuilt from instances.list",
        aside.display()
    )
}

fn format_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(
        d.as_millis().try_into().unwrap_or(u64::MAX),
    ))
    .to_string()
}

/// Everything mutable about the pool.
#[derive(Debug, Default)]
pub struct PoolState {
    pub vms: BTreeMap<u32, VmEntry>,
    /// The start phase asked for the pool and idle deletion has not released it since.
    pub wanted: bool,
    pub active: bool,
    /// The idle clock: when the tier stopped being active (None while active).
    pub idle_since: Option<SystemTime>,
    pub handled_preemptions: VecDeque<String>,
    /// Empty slots to fill again (a lost VM vanished, a partial start).
    pub refill: BTreeSet<u32>,
    /// Slots with a background job in flight.
    pub busy: BTreeSet<u32>,
    /// Slots a start or restart is bringing up; background jobs leave them alone.
    pub claimed: BTreeMap<u32, usize>,
    /// Slots whose last background job failed: not before this instant, with this backoff.
    pub retry_at: BTreeMap<u32, (Instant, Backoff)>,
    /// The last VM lost and why, for operators.
    pub last_lost: Option<String>,
    /// What loading the checkpoint found (`details["checkpoint"]`).
    pub restore_note: String,
    /// A reconcile succeeded since the pool was built: restored entries are confirmed.
    pub reconciled: bool,
    pub watching: bool,
    /// What is on disk, to skip writes that change nothing.
    saved: Option<Checkpoint>,
    save_error: Option<String>,
    /// The unusable checkpoint could not be moved aside (why it was unusable): nothing is written
    /// over it until it is.
    blocked: Option<String>,
    /// The driver is gone: nothing is written any more.
    closed: bool,
}

impl PoolState {
    fn checkpoint(&self, config: &GcpVmConfig) -> Checkpoint {
        Checkpoint {
            wanted: self.wanted,
            idle_since: if self.active { None } else { self.idle_since },
            vms: self.vms.values().cloned().collect(),
            handled_preemptions: self.handled_preemptions.iter().cloned().collect(),
            ..Checkpoint::empty(&config.pool, &config.project, &config.zone)
        }
    }

    fn remember_handled(&mut self, op: &str) {
        if !self.handled_preemptions.iter().any(|h| h == op) {
            self.handled_preemptions.push_back(op.to_owned());
            while self.handled_preemptions.len() > HANDLED_KEPT {
                self.handled_preemptions.pop_front();
            }
        }
    }

    fn mark_lost(&mut self, slot: u32, reason: String) -> Option<String> {
        let entry = self.vms.get_mut(&slot)?;
        if matches!(entry.phase, Phase::Lost | Phase::Deleting) {
            return None;
        }
        entry.phase = Phase::Lost;
        entry.ready_at = None;
        entry.lost_reason = Some(reason.clone());
        let note = format!("{} {reason}", entry.name);
        self.last_lost = Some(note.clone());
        Some(note)
    }
}

/// What [`Pool::ensure_slot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    AlreadyReady,
    /// It created (or finished creating) the VM.
    Created,
}

/// Removes a slot from `busy` when its background job ends, cancelled or not.
struct BusyGuard {
    pool: Arc<Pool>,
    slot: u32,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.pool.lock_state().busy.remove(&self.slot);
    }
}

/// Claims slots for a start or restart until dropped (cancelled or not).
struct Claim {
    pool: Arc<Pool>,
    slots: Vec<u32>,
}

impl Claim {
    fn new(pool: &Arc<Pool>, slots: impl IntoIterator<Item = u32>) -> Self {
        let slots: Vec<u32> = slots.into_iter().collect();
        let mut state = pool.lock_state();
        for slot in &slots {
            *state.claimed.entry(*slot).or_default() += 1;
        }
        drop(state);
        Claim {
            pool: pool.clone(),
            slots,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.pool.lock_state();
        for slot in &self.slots {
            if let Some(n) = state.claimed.get_mut(slot) {
                *n -= 1;
                if *n == 0 {
                    state.claimed.remove(slot);
                }
            }
        }
    }
}

/// Clears `watching` when the watch task ends, so a later start spawns a new one.
struct WatchGuard(Arc<Pool>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.lock_state().watching = false;
    }
}

pub struct Pool {
    config: Arc<GcpVmConfig>,
    env: GcpEnv,
    /// Built on first use: building needs async, and `Driver` construction is sync.
    api: OnceCell<Arc<dyn ComputeApi>>,
    http: reqwest::Client,
    pub(super) retrier: Retrier,
    path: PathBuf,
    state: Mutex<PoolState>,
    slot_locks: Mutex<BTreeMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    notify: Notify,
    /// Asks the watch to reconcile now (a probe saw every VM fail).
    wake: tokio::sync::Notify,
    tasks: TaskTracker,
    /// Cancelled when the pool is dropped.
    root: CancellationToken,
    /// The current generation of background work; `stop` cancels it and starts a new one.
    generation: Mutex<CancellationToken>,
}

impl Pool {
    /// A pool restored from the checkpoint at `path` (or empty, see [`checkpoint::load`]).
    pub fn new(
        config: GcpVmConfig,
        path: PathBuf,
        env: GcpEnv,
        retrier: Retrier,
        notify: Notify,
    ) -> Result<Self, String> {
        let http = client::http_client()?;
        let mut state = PoolState {
            idle_since: Some(SystemTime::now()),
            ..PoolState::default()
        };
        match checkpoint::load(&path, &config.pool, &config.project, &config.zone) {
            Loaded::Missing => state.restore_note = format!("none yet ({})", path.display()),
            Loaded::Restored(c) => {
                state.restore_note =
                    format!("restored {} VMs from {}", c.vms.len(), path.display());
                info!(backend.tier = "gcp_vm", path = %path.display(), vms = c.vms.len(), "Checkpoint restored.");
                state.wanted = c.wanted;
                state.idle_since = c.idle_since.or(state.idle_since);
                state.vms = c.vms.iter().map(|vm| (vm.slot, vm.clone())).collect();
                state.handled_preemptions = c.handled_preemptions.iter().cloned().collect();
                state.saved = Some(c);
            }
            Loaded::SetAside {
                moved_to: Some(aside),
                error,
            } => state.restore_note = set_aside_note(&aside, &error),
            Loaded::SetAside {
                moved_to: None,
                error,
            } => {
                state.restore_note = format!(
                    "unusable ({error}) and could not be moved aside; running from instances.list, nothing written to {} until it is moved away",
                    path.display()
                );
                state.blocked = Some(error);
            }
        }
        let root = CancellationToken::new();
        Ok(Pool {
            generation: Mutex::new(root.child_token()),
            config: Arc::new(config),
            env,
            api: OnceCell::new(),
            http,
            retrier,
            path,
            state: Mutex::new(state),
            slot_locks: Mutex::new(BTreeMap::new()),
            notify,
            wake: tokio::sync::Notify::new(),
            tasks: TaskTracker::new(),
            root,
        })
    }

    // === state ===

    pub(super) fn lock_state(&self) -> MutexGuard<'_, PoolState> {
        // No code panics while holding the lock; if one did, the state is still the last whole
        // update, which is what the checkpoint holds too.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn read<R>(&self, f: impl FnOnce(&PoolState) -> R) -> R {
        f(&self.lock_state())
    }

    /// Applies `f` and writes the checkpoint if what it holds changed. The write happens under
    /// the lock, so saves are never reordered; it is a few small synchronous writes.
    pub(super) fn update<R>(&self, f: impl FnOnce(&mut PoolState) -> R) -> R {
        let mut state = self.lock_state();
        let result = f(&mut state);
        if state.closed {
            return result;
        }
        let current = state.checkpoint(&self.config);
        if state.saved.as_ref() != Some(&current) {
            if let Some(error) = state.blocked.clone() {
                // Written only once the unusable file is out of the way.
                match checkpoint::move_aside(&self.path) {
                    Ok(aside) => {
                        info!(backend.tier = "gcp_vm", path = %self.path.display(), moved_to = %aside.display(), "The unusable checkpoint is set aside now.");
                        state.restore_note = set_aside_note(&aside, &error);
                        state.blocked = None;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => state.blocked = None,
                    Err(e) => {
                        state.save_error = Some(format!(
                            "not written: the unusable file could not be moved aside: {e}"
                        ));
                        return result;
                    }
                }
            }
            match checkpoint::save(&self.path, &current) {
                Ok(()) => {
                    state.saved = Some(current);
                    state.save_error = None;
                }
                Err(e) => {
                    warn!(backend.tier = "gcp_vm", path = %self.path.display(), error = %e, "Cannot write the checkpoint.");
                    state.save_error = Some(e.to_string());
                }
            }
        }
        result
    }

    fn entry(&self, slot: u32) -> Option<VmEntry> {
        self.read(|s| s.vms.get(&slot).cloned())
    }

    fn update_entry(&self, slot: u32, f: impl FnOnce(&mut VmEntry)) {
        self.update(|s| {
            if let Some(entry) = s.vms.get_mut(&slot) {
                f(entry);
            }
        });
    }

    fn remove_entry(&self, slot: u32) {
        self.update(|s| s.vms.remove(&slot));
    }

    pub fn vm_name(&self, slot: u32) -> String {
        format!("{}-{slot}", self.config.pool)
    }

    /// The slot a VM name stands for, if it is exactly `{pool}-{slot}`.
    fn slot_of(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(&self.config.pool)?.strip_prefix('-')?;
        let slot: u32 = rest.parse().ok()?;
        (slot.to_string() == rest).then_some(slot)
    }

    fn health_url(&self, ip: &str) -> String {
        format!(
            "http://{ip}:{}{}",
            self.config.service_port, self.config.health_path
        )
    }

    /// A health check's own timeout: a little under the probe's, so a probe whose checks all
    /// time out still reports why rather than hitting the tier's deadline.
    fn health_timeout(&self) -> Duration {
        let t = self.config.probe.timeout;
        t.saturating_sub((t / 10).min(Duration::from_millis(100)))
    }

    pub(super) fn slot_lock(&self, slot: u32) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .slot_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(slot).or_default().clone()
    }

    async fn api(&self) -> Result<Arc<dyn ComputeApi>, PoolError> {
        self.api
            .get_or_try_init(|| async {
                let connect = GceCompute::connect(&self.config, &self.env);
                match with_deadline(
                    self.config.api_timeout,
                    "connecting to Compute Engine",
                    connect,
                )
                .await
                {
                    Ok(Ok(api)) => Ok(Arc::new(api) as Arc<dyn ComputeApi>),
                    Ok(Err(e)) => Err(PoolError::Connect(e)),
                    Err(e) => Err(PoolError::Connect(ApiError::timeout(e.after))),
                }
            })
            .await
            .cloned()
    }

    // === background work ===

    fn job_token(&self) -> CancellationToken {
        self.generation
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|_| self.root.child_token())
    }

    /// Starts the watch unless it runs. Needs a tokio runtime; without one it is started by the
    /// next `start`.
    pub fn ensure_watching(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let start = {
            let mut state = self.lock_state();
            !std::mem::replace(&mut state.watching, true)
        };
        if start {
            let pool = self.clone();
            let token = self.job_token();
            self.tasks.spawn(async move {
                let guard = WatchGuard(pool.clone());
                token.run_until_cancelled(pool.watch()).await;
                drop(guard);
            });
        }
    }

    /// Stops the watch and background jobs and waits (at most [`STOP_WAIT`]) until every
    /// tracked task has ended, so none writes the checkpoint afterwards; VMs stay as they are.
    pub async fn stop(&self) {
        let old = match self.generation.lock() {
            Ok(mut g) => std::mem::replace(&mut *g, self.root.child_token()),
            Err(_) => {
                self.root.cancel();
                self.root.child_token()
            }
        };
        old.cancel();
        // Cancelled tasks end at their next await. `close` lets `wait` return once the tracker is
        // empty; `reopen` lets a later start track new tasks again.
        self.tasks.close();
        let ended = tokio::time::timeout(STOP_WAIT, self.tasks.wait()).await;
        self.tasks.reopen();
        if ended.is_err() {
            warn!(backend.tier = "gcp_vm", tasks = self.tasks.len(), wait = %format_duration(STOP_WAIT), "Background tasks still running after stop.");
        }
    }

    /// Background tasks still tracked (the watch, replacements, deletions).
    #[cfg(test)]
    pub(super) fn tracked_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Cancels everything and writes no checkpoint any more (the driver is going away; a new
    /// driver may load the file at once).
    pub fn shutdown(&self) {
        self.lock_state().closed = true;
        self.root.cancel();
        self.tasks.close();
    }

    fn spawn_job(self: &Arc<Self>, slot: u32, job: Job) {
        {
            let mut state = self.lock_state();
            if state.claimed.contains_key(&slot) || !state.busy.insert(slot) {
                return;
            }
        }
        let pool = self.clone();
        let token = self.job_token();
        self.tasks.spawn(async move {
            let guard = BusyGuard {
                pool: pool.clone(),
                slot,
            };
            token.run_until_cancelled(pool.run_job(slot, job)).await;
            drop(guard);
        });
    }

    async fn run_job(self: &Arc<Self>, slot: u32, job: Job) {
        let name = self.vm_name(slot);
        let deadline = Deadline::after(Instant::now(), self.config.start_timeout);
        let result = match &job {
            Job::Replace => self.ensure_slot(slot, deadline).await.map(JobDone::Ensured),
            Job::Delete { why, idle } => {
                info!(backend.tier = "gcp_vm", vm = %name, why = %why, "Deleting VM.");
                let check = if *idle {
                    DeleteCheck::Idle
                } else {
                    DeleteCheck::Lost
                };
                self.delete_slot(slot, deadline, check)
                    .await
                    .map(JobDone::Deleted)
            }
        };
        match result {
            Ok(done) => {
                self.update(|s| {
                    s.retry_at.remove(&slot);
                    if matches!(job, Job::Replace) {
                        s.refill.remove(&slot);
                    }
                });
                match (job, done) {
                    (Job::Replace, JobDone::Ensured(Ensured::Created)) => {
                        info!(backend.tier = "gcp_vm", vm = %name, "VM replaced.");
                        (self.notify)(DriverEvent::BackendRestarted {
                            note: format!("VM {name} replaced"),
                        });
                    }
                    (Job::Delete { why, .. }, JobDone::Deleted(Deleted::Gone)) => {
                        info!(backend.tier = "gcp_vm", vm = %name, "VM deleted.");
                        (self.notify)(DriverEvent::Changed {
                            note: format!("VM {name} deleted ({why})"),
                        });
                    }
                    (Job::Delete { .. }, JobDone::Deleted(Deleted::Kept(why))) => {
                        info!(backend.tier = "gcp_vm", vm = %name, why = %why, "VM kept.");
                    }
                    _ => {}
                }
            }
            Err(error) => {
                let wait = self.update(|s| {
                    let (at, backoff) = s
                        .retry_at
                        .entry(slot)
                        .or_insert_with(|| (Instant::now(), job_backoff()));
                    let wait = backoff.next_delay();
                    *at = Instant::now() + wait;
                    wait
                });
                warn!(backend.tier = "gcp_vm", vm = %name, %error, retry_in_ms = wait.as_millis() as u64, "Background work on a VM failed.");
                (self.notify)(DriverEvent::Changed {
                    note: format!("VM {name}: {error}"),
                });
            }
        }
    }

    /// Starts the replacements and deletions the state calls for; nothing before the first
    /// successful reconcile (restored entries are not trusted until the label list confirms them).
    pub(super) fn schedule(self: &Arc<Self>) {
        let now = Instant::now();
        let replace_policy = self.config.on_preemption == OnPreemption::Replace;
        let jobs = self.update(|s| {
            let mut jobs = Vec::new();
            if !s.reconciled {
                return jobs;
            }
            let wanted = s.wanted;
            if !(wanted && replace_policy) {
                s.refill.clear();
            }
            let waiting = |s: &PoolState, slot: u32| {
                s.busy.contains(&slot)
                    || s.claimed.contains_key(&slot)
                    || s.retry_at.get(&slot).is_some_and(|(at, _)| *at > now)
            };
            // Lost VMs, and deletes a crash or a stop interrupted.
            for (slot, entry) in &s.vms {
                if !matches!(entry.phase, Phase::Lost | Phase::Deleting) || waiting(s, *slot) {
                    continue;
                }
                if wanted && replace_policy {
                    jobs.push((*slot, Job::Replace));
                } else {
                    let why = entry.lost_reason.clone().unwrap_or_else(|| "lost".into());
                    jobs.push((*slot, Job::Delete { why, idle: false }));
                }
            }
            for slot in &s.refill {
                if !s.vms.contains_key(slot) && !waiting(s, *slot) {
                    jobs.push((*slot, Job::Replace));
                }
            }
            jobs
        });
        for (slot, job) in jobs {
            // A slot someone works on (a start) is theirs; look again next round.
            if self.slot_lock(slot).try_lock().is_err() {
                continue;
            }
            self.spawn_job(slot, job);
        }
    }

    /// Deletes VMs idle for `idle_ttl`: the tier is not active, counted from the later of when it
    /// stopped being active and when the VM became ready. Choosing them and releasing the pool
    /// (`wanted = false`) is one update, so a start in between is never overwritten; each delete
    /// checks again under the slot's lock. Nothing before the first successful reconcile.
    pub(super) fn collect_idle(self: &Arc<Self>) {
        let now = SystemTime::now();
        let ttl = self.config.idle_ttl;
        let idle: Vec<(u32, String)> = self.update(|s| {
            if !s.reconciled {
                return Vec::new();
            }
            let idle: Vec<(u32, String)> = s
                .vms
                .values()
                .filter(|vm| vm.phase != Phase::Deleting && !s.busy.contains(&vm.slot))
                .filter(|vm| idle_for(s, vm, now, ttl))
                .map(|vm| (vm.slot, vm.name.clone()))
                .collect();
            if !idle.is_empty() {
                s.wanted = false;
                s.refill.clear();
            }
            idle
        });
        for (slot, name) in idle {
            info!(backend.tier = "gcp_vm", vm = %name, idle_ttl = %format_duration(ttl), "VM idle too long; deleting it.");
            self.spawn_job(
                slot,
                Job::Delete {
                    why: format!("idle for {}", format_duration(ttl)),
                    idle: true,
                },
            );
        }
    }

    // === the watch ===

    async fn watch(self: Arc<Self>) {
        let interval = self.config.reconcile_interval;
        let mut first = true;
        let mut next_reconcile = Instant::now();
        // After a failed reconcile: 1 s doubling, never longer than `reconcile_interval`.
        let mut reconcile_backoff = Backoff::new(BackoffConfig {
            base: Duration::from_secs(1).min(interval),
            cap: interval,
            reset_after: Duration::MAX,
            jitter: Jitter::None,
        });
        let mut look_failures = 0u32;
        let mut quiet_until: Option<Instant> = None;
        let mut woken = false;
        loop {
            // An empty pool nobody asked for has nothing to lose; after the first reconcile
            // (which adopts what a lost checkpoint forgot) it costs no API calls.
            let (holds, idle_empty) = self.read(|s| {
                (
                    !s.vms.is_empty(),
                    s.vms.is_empty() && !s.wanted && s.reconciled,
                )
            });
            let mut reconcile_now =
                first || woken || (Instant::now() >= next_reconcile && !idle_empty);
            if holds && !reconcile_now && quiet_until.is_none_or(|at| Instant::now() >= at) {
                quiet_until = None;
                match self.look().await {
                    Ok(look) => {
                        look_failures = 0;
                        reconcile_now |= look.reconcile;
                        if !look.notes.is_empty() {
                            // At once: the tier actor probes and the waterfall moves on.
                            (self.notify)(DriverEvent::Changed {
                                note: look.notes.join("; "),
                            });
                        }
                    }
                    Err((error, retry_after)) => {
                        look_failures += 1;
                        if look_failures == 1 {
                            warn!(backend.tier = "gcp_vm", %error, "instances.list failed; trying again next tick.");
                        } else {
                            debug!(backend.tier = "gcp_vm", %error, failures = look_failures, "instances.list failed again.");
                        }
                        if let Some(wait) = retry_after {
                            quiet_until = Some(Instant::now() + wait.min(interval));
                        }
                    }
                }
            }
            let mut changes = self.health_round(false).await;
            let failed = changes.iter().any(|c| c.failed);
            if reconcile_now || failed {
                first = false;
                match self.reconcile().await {
                    Ok(notes) => {
                        changes.extend(notes.into_iter().map(HealthChange::note));
                        reconcile_backoff.reset();
                        next_reconcile = Instant::now() + interval;
                    }
                    Err(error) => {
                        let wait = reconcile_backoff.next_delay().min(interval);
                        warn!(backend.tier = "gcp_vm", %error, retry_in_ms = wait.as_millis() as u64, "Reconcile failed.");
                        next_reconcile = Instant::now() + wait;
                    }
                }
            }
            let notes: Vec<String> = changes.into_iter().map(|c| c.note).collect();
            if !notes.is_empty() {
                (self.notify)(DriverEvent::Changed {
                    note: notes.join("; "),
                });
            }
            self.collect_idle();
            self.schedule();
            tokio::select! {
                () = tokio::time::sleep(self.config.watch_interval) => woken = false,
                () = self.wake.notified() => woken = true,
            }
        }
    }

    /// One watch tick's look at the API: a single `instances.list` by the pool's label (no
    /// retries, no budget deposit; bounded by `api_timeout`). Marks every VM listed STOPPING,
    /// TERMINATED, SUSPENDED (...) lost at once; asks for a reconcile when a VM known to exist is
    /// not listed, or is another incarnation. Only slots nobody else works on are looked at.
    /// Errors come with the server's `Retry-After`, if any.
    async fn look(self: &Arc<Self>) -> Result<Look, (String, Option<Duration>)> {
        let api = self.api().await.map_err(|e| (e.to_string(), None))?;
        let slots: Vec<u32> = self.read(|s| {
            s.vms
                .values()
                .filter(|vm| matches!(vm.phase, Phase::Ready | Phase::Unhealthy | Phase::Booting))
                .map(|vm| vm.slot)
                .collect()
        });
        // Held from before the list until the state is updated, so the list is never older
        // than what it is compared with.
        let held: BTreeMap<u32, tokio::sync::OwnedMutexGuard<()>> = slots
            .into_iter()
            .filter_map(|slot| Some((slot, self.slot_lock(slot).try_lock_owned().ok()?)))
            .collect();
        if held.is_empty() {
            return Ok(Look::default());
        }
        let pool = self.config.pool.as_str();
        let listed = match with_deadline(
            self.config.api_timeout,
            "compute.instances.list",
            api.list_by_label(POOL_LABEL, pool),
        )
        .await
        {
            Ok(Ok(listed)) => listed,
            Ok(Err(e)) => return Err((format!("compute.instances.list: {e}"), e.retry_after)),
            Err(e) => return Err((format!("compute.instances.list: {e}"), None)),
        };
        let look = self.update(|s| {
            let mut look = Look::default();
            for slot in held.keys() {
                let Some(entry) = s.vms.get(slot) else {
                    continue;
                };
                if !matches!(
                    entry.phase,
                    Phase::Ready | Phase::Unhealthy | Phase::Booting
                ) {
                    continue;
                }
                let Some(vm) = listed.iter().find(|vm| vm.name == entry.name) else {
                    // Known to exist (Compute Engine reported it) and now gone.
                    look.reconcile |= entry.gce_status.is_some();
                    continue;
                };
                if let (Some(known), Some(found)) = (entry.instance_id, vm.id)
                    && known != found
                {
                    look.reconcile = true;
                    continue;
                }
                if is_lost_status(&vm.status) {
                    let reason = format!("{} (spot VM preempted or stopped)", vm.status);
                    if let Some(e) = s.vms.get_mut(slot) {
                        e.gce_status = Some(vm.status.clone());
                    }
                    if let Some(note) = s.mark_lost(*slot, reason) {
                        look.notes.push(note);
                    }
                }
            }
            look
        });
        drop(held);
        for note in &look.notes {
            info!(backend.tier = "gcp_vm", %note, "VM lost.");
        }
        Ok(look)
    }

    /// Health-checks every VM that has an IP and should serve; moves it between Booting, Ready
    /// and Unhealthy. `failed` marks a VM that was Ready and failed.
    async fn health_round(&self, ready_only: bool) -> Vec<HealthChange> {
        let targets: Vec<(u32, String, String)> = self.read(|s| {
            s.vms
                .values()
                .filter(|vm| match vm.phase {
                    Phase::Ready | Phase::Unhealthy => true,
                    Phase::Booting => !ready_only && vm.gce_status.as_deref() == Some("RUNNING"),
                    _ => false,
                })
                .filter_map(|vm| Some((vm.slot, vm.name.clone(), vm.ip.clone()?)))
                .collect()
        });
        let timeout = self.health_timeout();
        let checks = targets.iter().map(|(_, _, ip)| {
            let url = self.health_url(ip);
            async move { client::health(&self.http, &url, timeout).await }
        });
        let results = join_all(checks).await;
        let now = SystemTime::now();
        self.update(|s| {
            let mut changes = Vec::new();
            for ((slot, name, ip), result) in targets.iter().zip(results) {
                let Some(entry) = s.vms.get_mut(slot) else {
                    continue;
                };
                if entry.name != *name || entry.ip.as_deref() != Some(ip.as_str()) {
                    continue;
                }
                match (entry.phase, result) {
                    (Phase::Ready, Ok(())) => {}
                    (Phase::Booting | Phase::Unhealthy, Ok(())) => {
                        entry.phase = Phase::Ready;
                        entry.ready_at = Some(now);
                        changes.push(HealthChange::note(format!("{name} ready ({ip})")));
                    }
                    (Phase::Ready, Err(error)) => {
                        entry.phase = Phase::Unhealthy;
                        changes.push(HealthChange {
                            note: format!("{name} failed its health check: {error}"),
                            failed: true,
                        });
                    }
                    _ => {}
                }
            }
            changes
        })
    }

    // === reconcile ===

    /// Makes the state agree with Compute Engine: adopts the pool's instances the state lacks,
    /// drops entries whose instance is gone, refreshes statuses and marks lost (preempted,
    /// stopped) VMs at once. Slots busy with other work are left alone. Returns what changed.
    pub async fn reconcile(self: &Arc<Self>) -> Result<Vec<String>, PoolError> {
        let api = self.api().await?;
        let deadline = Deadline::after(Instant::now(), self.config.api_timeout);
        // Hold every free slot's lock from before the list until the merge, so the list is never
        // older than the state it is merged into.
        let mut held: BTreeMap<u32, tokio::sync::OwnedMutexGuard<()>> = BTreeMap::new();
        let slots: Vec<u32> = self.read(|s| s.vms.keys().copied().collect());
        for slot in slots.into_iter().chain(0..self.config.max_vms) {
            if held.contains_key(&slot) {
                continue;
            }
            if let Ok(guard) = self.slot_lock(slot).try_lock_owned() {
                held.insert(slot, guard);
            }
        }
        let pool = self.config.pool.as_str();
        let listed = self
            .retrier
            .run("compute.instances.list", deadline, || {
                api.list_by_label(POOL_LABEL, pool)
            })
            .await?;
        let preempted = match self
            .retrier
            .run("compute.zoneOperations.list", deadline, || {
                api.list_preempted_operations()
            })
            .await
        {
            Ok(ops) => ops,
            Err(error) => {
                warn!(backend.tier = "gcp_vm", %error, "Cannot list preemptions; going by instance status alone.");
                Vec::new()
            }
        };
        // Adopt into slots nobody was working on when the list was taken; a slot whose lock
        // could not be had then is not touched now either.
        for vm in &listed {
            if let Some(slot) = self.slot_of(&vm.name)
                && !held.contains_key(&slot)
                && let Ok(guard) = self.slot_lock(slot).try_lock_owned()
                && self.read(|s| !s.vms.contains_key(&slot))
            {
                held.insert(slot, guard);
            }
        }
        // A pending insert whose instance is not listed is looked up once.
        let pending: Vec<(u32, String)> = self.read(|s| {
            s.vms
                .values()
                .filter(|vm| held.contains_key(&vm.slot) && vm.phase == Phase::Creating)
                .filter(|vm| !listed.iter().any(|l| l.name == vm.name))
                .filter_map(|vm| Some((vm.slot, vm.last_operation.as_ref()?.name.clone())))
                .collect()
        });
        let mut ops = BTreeMap::new();
        for (slot, op) in pending {
            let looked_up = self
                .retrier
                .run("compute.zoneOperations.get", deadline, || {
                    api.get_operation(&op)
                })
                .await;
            ops.insert(
                slot,
                match looked_up {
                    Ok(op) => Some(op),
                    Err(e) if e.last.is_not_found() => None,
                    Err(e) => return Err(e.into()),
                },
            );
        }
        let replace = self.config.on_preemption == OnPreemption::Replace;
        let notes = self.update(|s| {
            let notes = merge(
                s,
                &Merge {
                    held: &held.keys().copied().collect(),
                    listed: &listed,
                    preempted: &preempted,
                    ops: &ops,
                    slot_of: &|name| self.slot_of(name),
                    replace,
                    max_vms: self.config.max_vms,
                    now: SystemTime::now(),
                },
            );
            s.reconciled = true;
            notes
        });
        for note in &notes {
            info!(backend.tier = "gcp_vm", %note, "Reconciled.");
        }
        drop(held);
        Ok(notes)
    }

    // === bringing a slot up ===

    /// Brings slot `slot` to a ready VM: finishes what the state says is in progress, replaces a
    /// lost VM (delete, then insert the same name), adopts one that exists already.
    pub async fn ensure_slot(
        self: &Arc<Self>,
        slot: u32,
        deadline: Deadline,
    ) -> Result<Ensured, PoolError> {
        let _guard = self.lock_slot(slot, deadline).await?;
        let mut did = Ensured::AlreadyReady;
        for _ in 0..MAX_STEPS {
            let Some(entry) = self.entry(slot) else {
                did = Ensured::Created;
                self.insert(slot, deadline).await?;
                continue;
            };
            match entry.phase {
                Phase::Ready => {
                    if self.confirm_ready(slot, &entry).await {
                        return Ok(did);
                    }
                }
                Phase::Creating => {
                    did = Ensured::Created;
                    self.finish_insert(slot, &entry, deadline).await?;
                }
                Phase::Booting | Phase::Unhealthy => {
                    did = Ensured::Created;
                    self.wait_ready(slot, deadline).await?;
                }
                Phase::Lost | Phase::Deleting => {
                    did = Ensured::Created;
                    self.delete_locked(slot, deadline, DeleteCheck::None)
                        .await?;
                }
            }
        }
        Err(PoolError::Unsettled {
            vm: self.vm_name(slot),
        })
    }

    /// One health check of a VM the state calls ready; a failure makes it Unhealthy.
    async fn confirm_ready(&self, slot: u32, entry: &VmEntry) -> bool {
        let Some(ip) = &entry.ip else {
            self.update_entry(slot, |e| e.phase = Phase::Booting);
            return false;
        };
        let url = self.health_url(ip);
        match client::health(&self.http, &url, self.health_timeout()).await {
            Ok(()) => true,
            Err(_) => {
                self.update_entry(slot, |e| e.phase = Phase::Unhealthy);
                false
            }
        }
    }

    async fn insert(self: &Arc<Self>, slot: u32, deadline: Deadline) -> Result<(), PoolError> {
        let name = self.vm_name(slot);
        let max = self.config.max_vms;
        let full = self.update(|s| {
            let held = s.vms.len();
            if held >= max as usize {
                return Some(held);
            }
            // Recorded before the call: a crash between here and the answer leaves an entry the
            // reconcile resolves (adopted if the insert went through, dropped if not).
            s.vms.insert(
                slot,
                VmEntry::new(name.clone(), slot, Phase::Creating, SystemTime::now()),
            );
            None
        });
        if let Some(held) = full {
            return Err(PoolError::Full {
                vm: name,
                held,
                max,
            });
        }
        let api = self.api().await?;
        let body = client::instance_body(&self.config, &name);
        let call = format!("compute.instances.insert {name}");
        match self
            .retrier
            .run(&call, deadline, || api.insert(&body))
            .await
        {
            Ok(op) => {
                info!(backend.tier = "gcp_vm", vm = %name, operation = %op.name, "Insert accepted.");
                self.update_entry(slot, |e| {
                    e.last_operation = Some(OpRef {
                        name: op.name,
                        kind: OpKind::Insert,
                    })
                });
                Ok(())
            }
            Err(e) if e.last.is_already_exists() => self.adopt_existing(slot, deadline).await,
            Err(e) => {
                // An answer that says no means nothing was created; no answer might mean it was,
                // and the entry stays for the reconcile to settle.
                if e.last.status.is_some() && e.gave_up != GaveUp::Deadline {
                    self.remove_entry(slot);
                }
                Err(e.into())
            }
        }
    }

    /// `instances.insert` said the name exists: take the instance over if it is the pool's.
    async fn adopt_existing(&self, slot: u32, deadline: Deadline) -> Result<(), PoolError> {
        let name = self.vm_name(slot);
        let api = self.api().await?;
        let call = format!("compute.instances.get {name}");
        let found = self.retrier.run(&call, deadline, || api.get(&name)).await?;
        match found {
            None => {
                // Deleted meanwhile: the next step inserts again.
                self.remove_entry(slot);
                Ok(())
            }
            Some(vm) if vm.labels.get(POOL_LABEL) != Some(&self.config.pool) => {
                self.remove_entry(slot);
                Err(PoolError::Foreign {
                    vm: name,
                    pool: self.config.pool.clone(),
                })
            }
            Some(vm) => {
                info!(backend.tier = "gcp_vm", vm = %name, status = %vm.status, "Adopted the existing VM.");
                self.update_entry(slot, |e| adopt(e, &vm));
                Ok(())
            }
        }
    }

    async fn finish_insert(
        &self,
        slot: u32,
        entry: &VmEntry,
        deadline: Deadline,
    ) -> Result<(), PoolError> {
        let api = self.api().await?;
        if let Some(op) = &entry.last_operation {
            let done = self.wait_operation(&api, op, &entry.name, deadline).await?;
            if let Some(error) = done.and_then(|op| op.error) {
                self.remove_entry(slot);
                return Err(PoolError::OperationFailed {
                    op: op.name.clone(),
                    kind: op.kind.as_str(),
                    vm: entry.name.clone(),
                    error,
                });
            }
        }
        let name = entry.name.clone();
        let call = format!("compute.instances.get {name}");
        match self.retrier.run(&call, deadline, || api.get(&name)).await? {
            Some(vm) => self.update_entry(slot, |e| adopt(e, &vm)),
            // The insert never took (or the VM was deleted since): insert again.
            None => self.remove_entry(slot),
        }
        Ok(())
    }

    /// Polls a zone operation until it is done or `operation_timeout` (or the overall deadline)
    /// passes. `None` when the operation no longer exists (done long ago).
    async fn wait_operation(
        &self,
        api: &Arc<dyn ComputeApi>,
        op: &OpRef,
        vm: &str,
        deadline: Deadline,
    ) -> Result<Option<Op>, PoolError> {
        let start = Instant::now();
        let bound = self.config.operation_timeout.min(deadline.remaining(start));
        let op_deadline = Deadline::after(start, bound);
        let mut poll = poll_backoff();
        let call = format!("compute.zoneOperations.get {}", op.name);
        loop {
            // A poll of an operation already counted: no budget deposit.
            match self
                .retrier
                .poll(&call, op_deadline, || api.get_operation(&op.name))
                .await
            {
                Ok(found) if found.done => return Ok(Some(found)),
                Ok(_) => {}
                Err(e) if e.last.is_not_found() => return Ok(None),
                Err(e)
                    if e.gave_up == GaveUp::Deadline || op_deadline.is_expired(Instant::now()) =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            }
            let remaining = op_deadline.remaining(Instant::now());
            if remaining.is_zero() {
                break;
            }
            tokio::time::sleep(poll.next_delay().min(remaining)).await;
            if op_deadline.is_expired(Instant::now()) {
                break;
            }
        }
        warn!(backend.tier = "gcp_vm", vm = %vm, operation = %op.name, after = %format_duration(bound), "Operation did not finish; abandoned.");
        Err(PoolError::OperationTimeout {
            op: op.name.clone(),
            kind: op.kind.as_str(),
            vm: vm.to_owned(),
            after: format_duration(bound),
        })
    }

    /// Waits for RUNNING, an IP and a passing health check; a VM lost meanwhile is marked so
    /// (the caller replaces it), one that vanished is forgotten (the caller inserts it again).
    async fn wait_ready(&self, slot: u32, deadline: Deadline) -> Result<(), PoolError> {
        let name = self.vm_name(slot);
        let api = self.api().await?;
        let mut poll = poll_backoff();
        let call = format!("compute.instances.get {name}");
        let started = Instant::now();
        let mut last = "not RUNNING yet".to_owned();
        loop {
            // Polls of an instance coming up follow its insert: no budget deposit.
            match self.retrier.poll(&call, deadline, || api.get(&name)).await {
                Ok(None) => {
                    warn!(backend.tier = "gcp_vm", vm = %name, "VM vanished while starting.");
                    self.remove_entry(slot);
                    return Ok(());
                }
                Ok(Some(vm)) => {
                    if is_lost_status(&vm.status) {
                        self.update(|s| {
                            if let Some(e) = s.vms.get_mut(&slot) {
                                adopt(e, &vm);
                            }
                            s.mark_lost(slot, format!("{} while starting", vm.status));
                        });
                        return Ok(());
                    }
                    self.update_entry(slot, |e| {
                        e.gce_status = Some(vm.status.clone());
                        e.ip = vm.ip.clone();
                        e.instance_id = vm.id.or(e.instance_id);
                    });
                    match (&vm.ip, vm.status.as_str()) {
                        (Some(ip), "RUNNING") => {
                            let url = self.health_url(ip);
                            match client::health(&self.http, &url, self.health_timeout()).await {
                                Ok(()) => {
                                    info!(backend.tier = "gcp_vm", vm = %name, %ip, "VM ready.");
                                    self.update_entry(slot, |e| {
                                        e.phase = Phase::Ready;
                                        e.ready_at = Some(SystemTime::now());
                                        e.last_operation = None;
                                    });
                                    return Ok(());
                                }
                                Err(error) => last = error,
                            }
                        }
                        (None, "RUNNING") => last = "RUNNING without an IP yet".into(),
                        (_, status) => last = format!("status {status}"),
                    }
                }
                Err(e) if e.gave_up == GaveUp::Deadline => {}
                Err(e) => return Err(e.into()),
            }
            let remaining = deadline.remaining(Instant::now());
            if !remaining.is_zero() {
                tokio::time::sleep(poll.next_delay().min(remaining)).await;
            }
            if deadline.is_expired(Instant::now()) {
                return Err(PoolError::NotReady {
                    vm: name,
                    after: format_duration(started.elapsed()),
                    last,
                });
            }
        }
    }

    /// Waits for the slot's lock, but not past `deadline`.
    pub(super) async fn lock_slot(
        &self,
        slot: u32,
        deadline: Deadline,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, PoolError> {
        let lock = self.slot_lock(slot);
        let remaining = deadline.remaining(Instant::now());
        tokio::time::timeout(remaining, lock.lock_owned())
            .await
            .map_err(|_| PoolError::Busy {
                vm: self.vm_name(slot),
            })
    }

    /// Deletes the slot's VM and forgets it, taking the slot's lock (waiting no longer than
    /// `deadline`), if `check` still holds then.
    async fn delete_slot(
        &self,
        slot: u32,
        deadline: Deadline,
        check: DeleteCheck,
    ) -> Result<Deleted, PoolError> {
        let _guard = self.lock_slot(slot, deadline).await?;
        self.delete_locked(slot, deadline, check).await
    }

    /// Deletes the slot's VM (or finishes a delete in flight) and forgets it; the caller holds
    /// the slot's lock. Before `instances.delete` goes out, `instances.get` must show the pool's
    /// label (and the entry's instance id, if known), and `check` must still hold — checked in
    /// the same state update that marks the entry Deleting. 404 counts as deleted.
    async fn delete_locked(
        &self,
        slot: u32,
        deadline: Deadline,
        check: DeleteCheck,
    ) -> Result<Deleted, PoolError> {
        let Some(entry) = self.entry(slot) else {
            return Ok(Deleted::Gone);
        };
        let api = self.api().await?;
        let name = entry.name.clone();
        let op = match entry
            .last_operation
            .clone()
            .filter(|op| op.kind == OpKind::Delete)
        {
            Some(op) if entry.phase == Phase::Deleting => op,
            _ => {
                let call = format!("compute.instances.get {name}");
                let Some(vm) = self.retrier.run(&call, deadline, || api.get(&name)).await? else {
                    self.remove_entry(slot);
                    return Ok(Deleted::Gone);
                };
                if vm.labels.get(POOL_LABEL) != Some(&self.config.pool) {
                    warn!(backend.tier = "gcp_vm", vm = %name, "An instance of this name exists without the pool's label; forgetting the entry, not deleting it.");
                    self.remove_entry(slot);
                    return Err(PoolError::Foreign {
                        vm: name,
                        pool: self.config.pool.clone(),
                    });
                }
                if let (Some(known), Some(found)) = (entry.instance_id, vm.id)
                    && known != found
                {
                    info!(backend.tier = "gcp_vm", vm = %name, known, found, "Another incarnation of the VM exists; taking it in instead of deleting it.");
                    self.update_entry(slot, |e| adopt(e, &vm));
                    return Ok(Deleted::Kept(format!(
                        "instance {found} is not the one the pool knew ({known})"
                    )));
                }
                let config = &self.config;
                let cleared = self.update(|s| {
                    let now = SystemTime::now();
                    let Some(entry) = s.vms.get(&slot) else {
                        return Err("forgotten meanwhile".to_owned());
                    };
                    match check {
                        DeleteCheck::None => {}
                        DeleteCheck::Idle if s.active => {
                            // In use again: idle deletion's release is undone.
                            s.wanted = true;
                            return Err("the tier is active again".to_owned());
                        }
                        DeleteCheck::Idle if !idle_for(s, entry, now, config.idle_ttl) => {
                            return Err("no longer idle".to_owned());
                        }
                        DeleteCheck::Idle => {}
                        DeleteCheck::Lost if s.claimed.contains_key(&slot) => {
                            return Err("a start claimed it".to_owned());
                        }
                        DeleteCheck::Lost
                            if !matches!(entry.phase, Phase::Lost | Phase::Deleting) =>
                        {
                            return Err(format!("it is {} now", entry.phase.as_str()));
                        }
                        DeleteCheck::Lost => {}
                    }
                    if let Some(e) = s.vms.get_mut(&slot) {
                        e.phase = Phase::Deleting;
                        e.last_operation = None;
                    }
                    Ok(())
                });
                if let Err(why) = cleared {
                    return Ok(Deleted::Kept(why));
                }
                let call = format!("compute.instances.delete {name}");
                match self
                    .retrier
                    .run(&call, deadline, || api.delete(&name))
                    .await
                {
                    Ok(op) => {
                        info!(backend.tier = "gcp_vm", vm = %name, operation = %op.name, "Delete accepted.");
                        let op = OpRef {
                            name: op.name,
                            kind: OpKind::Delete,
                        };
                        self.update_entry(slot, |e| e.last_operation = Some(op.clone()));
                        op
                    }
                    Err(e) if e.last.is_not_found() => {
                        self.remove_entry(slot);
                        return Ok(Deleted::Gone);
                    }
                    Err(e) => {
                        let before = entry.phase;
                        self.update_entry(slot, |e| e.phase = before);
                        return Err(e.into());
                    }
                }
            }
        };
        let done = self.wait_operation(&api, &op, &name, deadline).await?;
        if let Some(error) = done.and_then(|op| op.error) {
            // Failed: forget the operation so the next attempt sends a new delete.
            self.update_entry(slot, |e| e.last_operation = None);
            return Err(PoolError::OperationFailed {
                op: op.name,
                kind: op.kind.as_str(),
                vm: name,
                error,
            });
        }
        self.remove_entry(slot);
        Ok(Deleted::Gone)
    }

    // === what the driver calls ===

    /// The start phase wants `vms` ready VMs.
    pub async fn start(self: &Arc<Self>) -> Result<(), PoolError> {
        self.ensure_watching();
        self.update(|s| {
            s.wanted = true;
            if !s.active {
                // Being asked for counts as use: the idle clock starts again.
                s.idle_since = Some(SystemTime::now());
            }
        });
        if !self.read(|s| s.reconciled)
            && let Err(error) = self.reconcile().await
        {
            // Inserts adopt what exists (409), so starting without a reconcile is safe.
            warn!(backend.tier = "gcp_vm", %error, "Reconcile before start failed; starting anyway.");
        }
        let deadline = Deadline::after(Instant::now(), self.config.start_timeout);
        let slots: Vec<u32> = (0..self.config.vms).collect();
        let _claim = Claim::new(self, slots.iter().copied());
        let results = join_all(slots.iter().map(|&slot| self.ensure_slot(slot, deadline))).await;
        let mut errors = Vec::new();
        for (slot, result) in slots.iter().zip(results) {
            if let Err(error) = result {
                warn!(backend.tier = "gcp_vm", vm = %self.vm_name(*slot), %error, "VM did not start.");
                errors.push((*slot, error));
            }
        }
        let ready = self.read(|s| s.vms.values().filter(|vm| vm.phase == Phase::Ready).count());
        if errors.is_empty() {
            return Ok(());
        }
        if ready > 0 {
            // Serving with fewer VMs than asked; the watch keeps trying the others.
            self.update(|s| s.refill.extend(errors.iter().map(|(slot, _)| *slot)));
            return Ok(());
        }
        Err(errors.swap_remove(0).1)
    }

    pub async fn probe(&self) -> ProbeOutcome {
        let (entries, last_lost) = self.read(|s| {
            (
                s.vms.values().cloned().collect::<Vec<_>>(),
                s.last_lost.clone(),
            )
        });
        if entries.is_empty() {
            return ProbeOutcome::Idle {
                reason: match last_lost {
                    Some(lost) => format!("no VMs ({lost}; the start phase creates new ones)"),
                    None => "no VMs (the start phase creates them)".into(),
                },
            };
        }
        let candidates = entries
            .iter()
            .filter(|vm| matches!(vm.phase, Phase::Ready | Phase::Unhealthy) && vm.ip.is_some())
            .count();
        if candidates == 0 {
            // Nothing runs that could serve: say so at once, so the waterfall moves on without
            // waiting for the breaker.
            let mut reason = describe(&entries);
            if let Some(lost) = last_lost.filter(|lost| !reason.contains(lost.as_str())) {
                reason.push_str(&format!(" (last lost: {lost})"));
            }
            return ProbeOutcome::Idle { reason };
        }
        let changes = self.health_round(true).await;
        if changes.iter().any(|c| c.failed) {
            self.wake.notify_one();
        }
        let entries = self.read(|s| s.vms.values().cloned().collect::<Vec<_>>());
        let ready: Vec<&VmEntry> = entries
            .iter()
            .filter(|vm| vm.phase == Phase::Ready)
            .collect();
        if ready.is_empty() {
            self.wake.notify_one();
            return ProbeOutcome::Down {
                error: format!("no VM passes its health check: {}", describe(&entries)),
            };
        }
        let list: Vec<String> = ready
            .iter()
            .map(|vm| format!("{} {}", vm.name, vm.ip.as_deref().unwrap_or("?")))
            .collect();
        ProbeOutcome::Up {
            note: format!(
                "{}/{} VMs ready: {}",
                ready.len(),
                entries.len(),
                list.join(", ")
            ),
        }
    }

    /// The first ready VM by slot.
    pub fn endpoint(&self) -> Option<String> {
        self.read(|s| {
            s.vms
                .values()
                .find(|vm| vm.phase == Phase::Ready)
                .and_then(|vm| vm.ip.as_ref())
                .map(|ip| format!("http://{ip}:{}", self.config.service_port))
        })
    }

    pub fn set_active(&self, active: bool) {
        self.update(|s| {
            if s.active == active {
                return;
            }
            s.active = active;
            s.idle_since = (!active).then(SystemTime::now);
        });
    }

    pub async fn restart(
        self: &Arc<Self>,
        request: RestartRequest,
    ) -> Result<RestartReport, PoolError> {
        let entries = self.read(|s| s.vms.values().cloned().collect::<Vec<_>>());
        let mut slots: BTreeSet<u32> = (0..self.config.vms).collect();
        let mut plan = Vec::new();
        for vm in &entries {
            slots.insert(vm.slot);
            let at = vm
                .ip
                .clone()
                .or_else(|| vm.gce_status.clone())
                .unwrap_or_else(|| vm.phase.as_str().into());
            plan.push(format!(
                "delete VM {} ({at}) and wait for the operation",
                vm.name
            ));
        }
        for slot in &slots {
            plan.push(format!(
                "insert {}: {} spot VM from {}",
                self.vm_name(*slot),
                self.config.machine_type,
                self.config.image
            ));
        }
        plan.push(format!(
            "wait for RUNNING, an IP and GET http://IP:{}{}",
            self.config.service_port, self.config.health_path
        ));
        let report = RestartReport {
            tier: TierId::GcpVm,
            dry_run: request.dry_run,
            plan,
        };
        if request.dry_run {
            return Ok(report);
        }
        self.ensure_watching();
        let _claim = Claim::new(self, slots.iter().copied());
        self.update(|s| {
            s.wanted = true;
            for slot in &slots {
                s.mark_lost(*slot, "replaced on request".into());
            }
        });
        let deadline = Deadline::after(Instant::now(), self.config.start_timeout);
        let results = join_all(slots.iter().map(|&slot| self.ensure_slot(slot, deadline))).await;
        for result in results {
            result?;
        }
        Ok(report)
    }

    pub fn details(&self) -> BTreeMap<String, String> {
        let mut details = BTreeMap::new();
        self.read(|s| {
            let ready = s.vms.values().filter(|vm| vm.phase == Phase::Ready).count();
            details.insert(
                "pool".into(),
                format!(
                    "{}: {ready}/{} VMs ready ({} wanted, max {})",
                    self.config.pool,
                    s.vms.len(),
                    self.config.vms,
                    self.config.max_vms
                ),
            );
            for vm in s.vms.values() {
                details.insert(format!("vm.{}", vm.name), describe_vm(vm));
            }
            details.insert("checkpoint".into(), s.restore_note.clone());
            if let Some(error) = &s.save_error {
                details.insert("checkpoint_error".into(), error.clone());
            }
            if let Some(lost) = &s.last_lost {
                details.insert("last_lost".into(), lost.clone());
            }
            if !s.active
                && !s.vms.is_empty()
                && let Some(since) = s.idle_since
            {
                let idle = SystemTime::now().duration_since(since).unwrap_or_default();
                details.insert(
                    "idle".into(),
                    format!(
                        "{} of {} (VMs are deleted after idle_ttl)",
                        format_duration(idle),
                        format_duration(self.config.idle_ttl)
                    ),
                );
            }
        });
        details.insert("api_retries".into(), self.retrier.retries().to_string());
        details
    }
}

#[derive(Debug, Clone)]
enum Job {
    /// Bring the slot to a ready VM (replacing a lost one).
    Replace,
    /// Delete the slot's VM and forget it: an idle one (`idle`), or a lost one.
    Delete { why: String, idle: bool },
}

enum JobDone {
    Ensured(Ensured),
    Deleted(Deleted),
}

/// What [`Pool::delete_locked`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// The VM is gone (deleted now, or already) and forgotten.
    Gone,
    /// Not deleted, and why: it is in use again, or the instance of that name is another
    /// incarnation (taken into the entry instead).
    Kept(String),
}

/// What must still hold, under the slot's lock, for a background delete to go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeleteCheck {
    /// Nothing (a start or restart replacing the slot's VM).
    None,
    /// The VM is still idle: the tier is not active, no start claimed the slot, `idle_ttl` passed.
    Idle,
    /// The VM is still lost (a reconcile may have seen it run again) and no start claimed it.
    Lost,
}

/// Whether `vm` has been idle for `ttl`: the tier is not active and no start or restart claims
/// its slot, since the later of when the tier stopped being active and when the VM became ready.
fn idle_for(s: &PoolState, vm: &VmEntry, now: SystemTime, ttl: Duration) -> bool {
    if s.active || s.claimed.contains_key(&vm.slot) {
        return false;
    }
    let since = s.idle_since.unwrap_or(now);
    let from = since.max(vm.ready_at.unwrap_or(vm.created_at));
    now.duration_since(from).is_ok_and(|idle| idle >= ttl)
}

struct HealthChange {
    note: String,
    failed: bool,
}

/// What one watch tick's [`Pool::look`] found.
#[derive(Debug, Default)]
struct Look {
    /// VMs marked lost.
    notes: Vec<String>,
    /// Something only a full reconcile can sort out.
    reconcile: bool,
}

impl HealthChange {
    fn note(note: String) -> Self {
        HealthChange {
            note,
            failed: false,
        }
    }
}

/// Takes what Compute Engine says about `vm` into `entry`.
fn adopt(entry: &mut VmEntry, vm: &Vm) {
    entry.gce_status = Some(vm.status.clone());
    entry.ip = vm.ip.clone();
    entry.instance_id = vm.id.or(entry.instance_id);
    entry.last_operation = None;
    if is_lost_status(&vm.status) {
        entry.phase = Phase::Lost;
        entry.lost_reason = Some(vm.status.clone());
    } else if entry.phase != Phase::Ready {
        entry.phase = Phase::Booting;
    }
}

fn describe_vm(vm: &VmEntry) -> String {
    let mut text = vm.phase.as_str().to_owned();
    if let Some(ip) = &vm.ip {
        text.push_str(&format!(" {ip}"));
    }
    if let Some(status) = &vm.gce_status {
        text.push_str(&format!(" ({status})"));
    }
    if let (Phase::Lost, Some(reason)) = (vm.phase, &vm.lost_reason) {
        text.push_str(&format!(": {reason}"));
    }
    if let (Phase::Creating | Phase::Deleting, Some(op)) = (vm.phase, &vm.last_operation) {
        text.push_str(&format!(" (operation {})", op.name));
    }
    text
}

fn describe(entries: &[VmEntry]) -> String {
    entries
        .iter()
        .map(|vm| match (vm.phase, &vm.lost_reason) {
            (Phase::Lost, Some(reason)) => format!("{} {reason}", vm.name),
            (phase, _) => format!("{} {}", vm.name, phase.as_str()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inputs of [`merge`].
pub struct Merge<'a> {
    /// Slots whose lock the reconcile holds: only these may change.
    pub held: &'a BTreeSet<u32>,
    pub listed: &'a [Vm],
    pub preempted: &'a [Op],
    /// Pending insert operations looked up (None: the operation no longer exists).
    pub ops: &'a BTreeMap<u32, Option<Op>>,
    pub slot_of: &'a dyn Fn(&str) -> Option<u32>,
    pub replace: bool,
    pub max_vms: u32,
    pub now: SystemTime,
}

/// The reconcile's decisions, pure: merges what Compute Engine listed into the state. Returns
/// one note per change an operator (and the tier actor) should hear about.
pub fn merge(s: &mut PoolState, m: &Merge<'_>) -> Vec<String> {
    let mut notes = Vec::new();
    let slots: Vec<u32> = s
        .vms
        .keys()
        .copied()
        .filter(|k| m.held.contains(k))
        .collect();
    for slot in slots {
        let Some(entry) = s.vms.get(&slot).cloned() else {
            continue;
        };
        match m.listed.iter().find(|vm| vm.name == entry.name) {
            None => match entry.phase {
                Phase::Creating => {
                    let pending = entry.last_operation.is_some()
                        && matches!(m.ops.get(&slot), Some(Some(op)) if !op.done);
                    if !pending {
                        s.vms.remove(&slot);
                        let why = match m.ops.get(&slot) {
                            Some(Some(Op {
                                error: Some(error), ..
                            })) => format!("its insert failed: {error}"),
                            _ => "its insert never created it".into(),
                        };
                        notes.push(format!("{} dropped: {why}", entry.name));
                    }
                }
                Phase::Deleting => {
                    s.vms.remove(&slot);
                    notes.push(format!("{} deleted", entry.name));
                }
                Phase::Lost => {
                    s.vms.remove(&slot);
                    notes.push(format!("{} gone", entry.name));
                    if s.wanted && m.replace {
                        s.refill.insert(slot);
                    }
                }
                Phase::Booting | Phase::Ready | Phase::Unhealthy => {
                    s.vms.remove(&slot);
                    let note = format!(
                        "{} vanished (deleted outside cascade, or preempted)",
                        entry.name
                    );
                    s.last_lost = Some(note.clone());
                    notes.push(note);
                    if s.wanted && m.replace {
                        s.refill.insert(slot);
                    }
                }
            },
            Some(vm) => {
                let matching: Vec<&Op> = m
                    .preempted
                    .iter()
                    .filter(|op| op.target_name() == Some(vm.name.as_str()))
                    .filter(|op| match (op.target_id, vm.id) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    })
                    .filter(|op| !s.handled_preemptions.iter().any(|h| *h == op.name))
                    .collect();
                if let Some(e) = s.vms.get_mut(&slot) {
                    e.gce_status = Some(vm.status.clone());
                    e.ip = vm.ip.clone();
                    e.instance_id = vm.id.or(e.instance_id);
                }
                if is_lost_status(&vm.status) || !matching.is_empty() {
                    let reason = if matching.is_empty() {
                        vm.status.clone()
                    } else {
                        format!("preempted ({})", vm.status)
                    };
                    for op in &matching {
                        s.remember_handled(&op.name);
                    }
                    if let Some(note) = s.mark_lost(slot, reason.clone()) {
                        notes.push(note);
                        if s.wanted && m.replace {
                            s.refill.insert(slot);
                        }
                    } else if !matching.is_empty()
                        && let Some(e) = s.vms.get_mut(&slot)
                        && e.phase == Phase::Lost
                    {
                        // Already lost (a watch tick saw it stop): now it is known why.
                        e.lost_reason = Some(reason);
                    }
                } else if let Some(e) = s.vms.get_mut(&slot) {
                    match e.phase {
                        Phase::Creating => {
                            e.phase = Phase::Booting;
                            e.last_operation = None;
                        }
                        Phase::Lost => {
                            e.phase = Phase::Booting;
                            e.lost_reason = None;
                            notes.push(format!("{} runs again ({})", e.name, vm.status));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    for vm in m.listed {
        let Some(slot) = (m.slot_of)(&vm.name) else {
            continue;
        };
        if !m.held.contains(&slot) || s.vms.contains_key(&slot) {
            continue;
        }
        let mut entry = VmEntry::new(vm.name.clone(), slot, Phase::Booting, m.now);
        adopt(&mut entry, vm);
        // Preemptions of an adopted VM's past are not news.
        for op in m
            .preempted
            .iter()
            .filter(|op| op.target_name() == Some(vm.name.as_str()))
        {
            s.remember_handled(&op.name);
        }
        s.vms.insert(slot, entry);
        notes.push(format!("{} adopted ({})", vm.name, vm.status));
        if s.vms.len() > m.max_vms as usize {
            warn!(
                backend.tier = "gcp_vm",
                vms = s.vms.len(),
                max_vms = m.max_vms,
                "The pool holds more instances than max_vms; idle deletion removes them."
            );
        }
    }
    notes
}
