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
//! The checkpoint is written off the state lock and off the runtime's workers: `update` changes
//! the state under its lock and queues a write on the blocking pool, where one writer at a time
//! takes the newest state (so writes coalesce and never go back in time); steps that must be on
//! disk before they go on (an insert or a delete about to be sent) wait for it with `persist`.
//! A slow disk therefore never stalls the tier actor, whose handler reads the same state.
//!
//! Ownership: a name alone never gets a VM deleted. Background work (replacements, idle
//! deletion, deletions of lost VMs) waits for the first successful reconcile since start, so
//! restored entries are confirmed by the label list first; and every `instances.delete` is
//! preceded by an `instances.get` that checks the pool's label (and the instance id, if known).
//!
//! Invariants: probing never creates or deletes anything; no awaited call (nor a wait for a
//! slot's lock) runs without a deadline; the pool never holds more than `max_vms` instances it
//! created.

mod driver;
mod idle;
mod jobs;
mod reconcile;
mod slot;
mod watch;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::checkpoint::{self, Checkpoint, Loaded, Phase, VmEntry};
use super::client::{self, ApiError, ComputeApi, GceCompute, Vm};
use super::retry::{CallError, Retrier};
use super::{GcpEnv, GcpVmConfig, POOL_LABEL};
use crate::contract::DriverEvent;
use crate::resilience::{Backoff, with_deadline};

#[cfg(test)]
pub(super) use reconcile::{Merge, merge};

/// How the pool tells the tier actor that something changed.
pub type Notify = Arc<dyn Fn(DriverEvent) + Send + Sync>;

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
    /// Of those, the slots whose job brings up a VM (a replacement): they count as supply, so a
    /// lost VM is replaced once.
    pub replacing: BTreeSet<u32>,
    /// Slots a start or restart is bringing up; background jobs leave them alone.
    pub claimed: BTreeMap<u32, usize>,
    /// Slots whose last background job failed: not before this instant, with this backoff.
    pub retry_at: BTreeMap<u32, (Instant, Backoff)>,
    /// The last VM lost, why and when, for operators.
    pub last_lost: Option<LostNote>,
    /// Why a VM is not (yet) ready: its last health check, its boot, its insert. Shown only while
    /// the slot holds an entry; cleared when it is ready.
    pub vm_errors: BTreeMap<u32, String>,
    /// What loading the checkpoint found (`details["checkpoint_at_start"]`).
    pub restore_note: String,
    /// When the checkpoint was last written, and how many VMs it holds.
    written: Option<(SystemTime, usize)>,
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
    /// A pool the configuration no longer names (see `retired.rs`): never wanted, drained.
    pub retired: bool,
    /// A retired pool held nothing after a reconcile: its checkpoint is removed.
    pub drained: bool,
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
        self.last_lost = Some(LostNote {
            vm: entry.name.clone(),
            why: reason,
            at: SystemTime::now(),
        });
        Some(note)
    }
}

/// The last VM the pool lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostNote {
    pub vm: String,
    pub why: String,
    pub at: SystemTime,
}

impl LostNote {
    /// Past tense with the time, so it stays true after the VM is gone.
    pub fn describe(&self) -> String {
        format!(
            "{} lost at {}: {}",
            self.vm,
            humantime::format_rfc3339_seconds(self.at),
            self.why
        )
    }
}

/// Clears `watching` when the watch task ends, so a later start spawns a new one.
struct WatchGuard(Arc<Pool>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.lock_state().watching = false;
    }
}

/// Writes the checkpoint: one write at a time, always of the newest state, never after `close`.
struct Writer {
    path: PathBuf,
    config: Arc<GcpVmConfig>,
    state: Arc<Mutex<PoolState>>,
    /// Held through a whole write, so writes never interleave and `close` waits for the one in
    /// flight.
    lock: Mutex<()>,
    /// A write is queued and has not started: later changes ride along with it.
    queued: AtomicBool,
}

impl Writer {
    fn lock_state(&self) -> MutexGuard<'_, PoolState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes what the state holds now, unless the file holds it already. Blocks on the disk: runs
    /// on the blocking pool.
    fn persist(&self) {
        let _write = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.queued.store(false, Ordering::SeqCst);
        let (current, blocked) = {
            let state = self.lock_state();
            if state.closed {
                return;
            }
            let current = state.checkpoint(&self.config);
            if state.saved.as_ref() == Some(&current) {
                return;
            }
            (current, state.blocked.clone())
        };
        if let Some(error) = blocked {
            // Written only once the unusable file is out of the way.
            match checkpoint::move_aside(&self.path) {
                Ok(aside) => {
                    info!(backend.tier = "gcp_vm", path = %self.path.display(), moved_to = %aside.display(), "The unusable checkpoint is set aside now.");
                    let mut state = self.lock_state();
                    state.restore_note = set_aside_note(&aside, &error);
                    state.blocked = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.lock_state().blocked = None;
                }
                Err(e) => {
                    self.lock_state().save_error = Some(format!(
                        "not written: the unusable file could not be moved aside: {e}"
                    ));
                    return;
                }
            }
        }
        match checkpoint::save(&self.path, &current) {
            Ok(()) => {
                let mut state = self.lock_state();
                state.written = Some((SystemTime::now(), current.vms.len()));
                state.saved = Some(current);
                state.save_error = None;
            }
            Err(e) => {
                warn!(backend.tier = "gcp_vm", path = %self.path.display(), error = %e, "Cannot write the checkpoint.");
                self.lock_state().save_error = Some(e.to_string());
            }
        }
    }

    /// No write after this one returns (waits for a write in flight).
    fn close(&self) {
        let _write = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.lock_state().closed = true;
    }
}

pub struct Pool {
    config: Arc<GcpVmConfig>,
    env: GcpEnv,
    /// Built on first use (building needs async, and `Driver` construction is sync); built again
    /// after a permanent credentials error, so fixed credentials need no restart.
    api: tokio::sync::Mutex<Option<Arc<dyn ComputeApi>>>,
    http: reqwest::Client,
    pub(super) retrier: Retrier,
    path: PathBuf,
    state: Arc<Mutex<PoolState>>,
    writer: Arc<Writer>,
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
        let config = Arc::new(config);
        let state = Arc::new(Mutex::new(state));
        let writer = Arc::new(Writer {
            path: path.clone(),
            config: config.clone(),
            state: state.clone(),
            lock: Mutex::new(()),
            queued: AtomicBool::new(false),
        });
        Ok(Pool {
            generation: Mutex::new(root.child_token()),
            config,
            env,
            api: tokio::sync::Mutex::new(None),
            http,
            retrier,
            path,
            state,
            writer,
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

    /// Applies `f`; if what the checkpoint holds changed, queues a write (off this thread, see
    /// the module doc). Callers that must not go on before it is on disk `persist` next.
    pub(super) fn update<R>(&self, f: impl FnOnce(&mut PoolState) -> R) -> R {
        let (result, dirty) = {
            let mut state = self.lock_state();
            let result = f(&mut state);
            let dirty =
                !state.closed && state.saved.as_ref() != Some(&state.checkpoint(&self.config));
            (result, dirty)
        };
        if dirty && !self.writer.queued.swap(true, Ordering::SeqCst) {
            let writer = self.writer.clone();
            if tokio::runtime::Handle::try_current().is_ok() {
                self.tasks.spawn_blocking(move || writer.persist());
            } else {
                writer.persist();
            }
        }
        result
    }

    /// Writes the checkpoint now, if it changed, and waits until it is on disk.
    pub(super) async fn persist(&self) {
        let writer = self.writer.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            // A write that panicked left the previous file whole; the next one tries again.
            let _ = self.tasks.spawn_blocking(move || writer.persist()).await;
        } else {
            writer.persist();
        }
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

    /// The Compute Engine client: built on first use, and again once its credentials failed for
    /// good (a key file replaced, a service account fixed), which the old client would never get
    /// over.
    async fn api(&self) -> Result<Arc<dyn ComputeApi>, PoolError> {
        let mut api = self.api.lock().await;
        if let Some(current) = api.as_ref() {
            if !current.credentials_failed() {
                return Ok(current.clone());
            }
            info!(
                backend.tier = "gcp_vm",
                "Rebuilding the Compute Engine client after a credentials error."
            );
            *api = None;
        }
        let connect = GceCompute::connect(&self.config, &self.env);
        let built = match with_deadline(
            self.config.api_timeout,
            "connecting to Compute Engine",
            connect,
        )
        .await
        {
            Ok(Ok(built)) => Arc::new(built) as Arc<dyn ComputeApi>,
            Ok(Err(e)) => {
                self.retrier.note_error("connecting to Compute Engine", &e);
                return Err(PoolError::Connect(e));
            }
            Err(e) => return Err(PoolError::Connect(ApiError::timeout(e.after))),
        };
        *api = Some(built.clone());
        Ok(built)
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
            warn!(backend.tier = "gcp_vm", tasks = self.tasks.len(), wait = %crate::text::duration(STOP_WAIT), "Background tasks still running after stop.");
        }
    }

    /// Holds the writer as a write stuck on a slow disk would, until dropped.
    #[cfg(test)]
    pub(super) fn stall_writes(&self) -> MutexGuard<'_, ()> {
        self.writer
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Background tasks still tracked (the watch, replacements, deletions).
    #[cfg(test)]
    pub(super) fn tracked_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Runs this pool as a retired one: never wanted, so its VMs are deleted once idle and a lost
    /// one is not replaced; once empty its checkpoint is removed (see `retired.rs`).
    pub fn retire(&self) {
        self.update(|s| {
            s.retired = true;
            s.wanted = false;
            s.refill.clear();
        });
    }

    /// A retired pool that held nothing after a reconcile: writes nothing more, removes its
    /// checkpoint, and says so. Returns whether it did.
    pub(super) fn finish_drain(&self) -> bool {
        let done = self.read(|s| {
            s.retired && !s.drained && s.reconciled && s.vms.is_empty() && s.busy.is_empty()
        });
        if !done {
            return false;
        }
        self.writer.close();
        let note = match checkpoint::remove(&self.path) {
            Ok(()) => {
                info!(backend.tier = "gcp_vm", pool = %self.config.pool, path = %self.path.display(), "Retired pool drained; its checkpoint is removed.");
                format!(
                    "retired pool {} ({}/{}) drained: no VMs left, {} removed",
                    self.config.pool,
                    self.config.project,
                    self.config.zone,
                    self.path.display()
                )
            }
            Err(e) => {
                warn!(backend.tier = "gcp_vm", pool = %self.config.pool, path = %self.path.display(), error = %e, "Retired pool drained but its checkpoint could not be removed.");
                format!(
                    "retired pool {} drained; {} could not be removed: {e}",
                    self.config.pool,
                    self.path.display()
                )
            }
        };
        self.lock_state().drained = true;
        (self.notify)(DriverEvent::Changed { note });
        true
    }

    /// The pool's name (`{pool}` of its VMs' names).
    pub fn name(&self) -> &str {
        &self.config.pool
    }

    /// The checkpoint's file name without `.json`.
    pub fn checkpoint_name(&self) -> String {
        self.path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.config.pool.clone())
    }

    /// What a retired pool still holds, for `details`.
    pub fn retired_summary(&self) -> String {
        let now = SystemTime::now();
        self.read(|s| {
            let place = format!("{}/{}", self.config.project, self.config.zone);
            if s.drained {
                return format!("{place}: drained, checkpoint removed");
            }
            let names: Vec<String> = s
                .vms
                .values()
                .map(|vm| format!("{} {}", vm.name, vm.phase.as_str()))
                .collect();
            let idle = s
                .idle_since
                .and_then(|since| now.duration_since(since).ok())
                .unwrap_or_default();
            let mut text = format!(
                "{place}: no longer configured; {} VMs ({}), deleted once idle {} (idle {}), from {}",
                names.len(),
                if names.is_empty() { "none known yet".to_owned() } else { names.join(", ") },
                crate::text::duration(self.config.idle_ttl),
                crate::text::duration(idle),
                self.path.display()
            );
            if let Some(api) = self.retrier.api_status() {
                text.push_str(&format!("; Compute Engine: {api}"));
            }
            text
        })
    }

    /// Cancels everything and writes no checkpoint any more (the driver is going away; a new
    /// driver may load the file at once). A write in flight finishes first; a queued one is
    /// abandoned: every step that must be on disk before it goes on waited for it (`persist`), and
    /// what a queued write held (a status, an IP) the next driver's reconcile reads again.
    pub fn shutdown(&self) {
        // Waits for a write in flight (one fsync), so none lands after this returns.
        self.writer.close();
        self.root.cancel();
        self.tasks.close();
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
