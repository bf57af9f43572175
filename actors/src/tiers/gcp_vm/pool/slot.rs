//! Work on one slot under its lock: bringing it to a ready VM (insert, wait) and deleting it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{info, warn};

use super::idle::idle_for;
use super::{Pool, PoolError, adopt, is_lost_status};
use crate::resilience::{Backoff, BackoffConfig, Deadline, Jitter};
use crate::tiers::gcp_vm::POOL_LABEL;
use crate::tiers::gcp_vm::checkpoint::{OpKind, OpRef, Phase, VmEntry};
use crate::tiers::gcp_vm::client::{self, ComputeApi, Op};

/// Steps one slot may take in one `ensure_slot` before giving up (lost → deleted → created →
/// ready is four).
const MAX_STEPS: usize = 12;

/// Polls of operations, instance status and health while waiting: 100 ms doubling to 2 s.
fn poll_backoff() -> Backoff {
    Backoff::new(BackoffConfig {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(2),
        reset_after: Duration::MAX,
        jitter: Jitter::None,
    })
}

/// What [`Pool::ensure_slot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    AlreadyReady,
    /// It created (or finished creating) the VM.
    Created,
}

impl Pool {
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
        match crate::tiers::health::check(&self.http, &url, self.health_timeout()).await {
            Ok(()) => true,
            Err(error) => {
                self.update(|s| {
                    if let Some(e) = s.vms.get_mut(&slot) {
                        e.phase = Phase::Unhealthy;
                    }
                    s.vm_errors
                        .insert(slot, format!("health check failed: {error}"));
                });
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
            s.vm_errors.remove(&slot);
            None
        });
        if let Some(held) = full {
            return Err(PoolError::Full {
                vm: name,
                held,
                max,
            });
        }
        // On disk before the insert goes out.
        self.persist().await;
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
                if e.attempts == 0 || (e.last.status.is_some() && !e.out_of_time()) {
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
                Err(e) if e.out_of_time() || op_deadline.is_expired(Instant::now()) => {
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
        warn!(backend.tier = "gcp_vm", vm = %vm, operation = %op.name, after = %crate::text::duration(bound), "Operation did not finish; abandoned.");
        Err(PoolError::OperationTimeout {
            op: op.name.clone(),
            kind: op.kind.as_str(),
            vm: vm.to_owned(),
            after: crate::text::duration(bound),
        })
    }

    /// Waits for RUNNING, an IP and a passing health check; a VM lost meanwhile is marked so
    /// (the caller replaces it), one that vanished is forgotten (the caller inserts it again). A
    /// VM not ready `boot_timeout` after it was created has failed: it is marked lost with why,
    /// so it is replaced rather than left booting.
    async fn wait_ready(&self, slot: u32, deadline: Deadline) -> Result<(), PoolError> {
        let name = self.vm_name(slot);
        let api = self.api().await?;
        let mut poll = poll_backoff();
        let call = format!("compute.instances.get {name}");
        let started = Instant::now();
        let created = self
            .entry(slot)
            .map_or_else(SystemTime::now, |e| e.created_at);
        let boot_ends = created + self.config.boot_timeout;
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
                            match crate::tiers::health::check(
                                &self.http,
                                &url,
                                self.health_timeout(),
                            )
                            .await
                            {
                                Ok(()) => {
                                    info!(backend.tier = "gcp_vm", vm = %name, %ip, "VM ready.");
                                    self.update(|s| {
                                        if let Some(e) = s.vms.get_mut(&slot) {
                                            e.phase = Phase::Ready;
                                            e.ready_at = Some(SystemTime::now());
                                            e.last_operation = None;
                                        }
                                        s.vm_errors.remove(&slot);
                                    });
                                    return Ok(());
                                }
                                Err(error) => last = format!("health check failed: {error}"),
                            }
                        }
                        (None, "RUNNING") => last = "RUNNING without an IP yet".into(),
                        (_, status) => last = format!("status {status}"),
                    }
                    self.update(|s| {
                        if s.vms.contains_key(&slot) {
                            s.vm_errors.insert(slot, last.clone());
                        }
                    });
                }
                Err(e) if e.out_of_time() => {}
                Err(e) => return Err(e.into()),
            }
            if SystemTime::now() >= boot_ends {
                let boot = crate::text::duration(self.config.boot_timeout);
                warn!(backend.tier = "gcp_vm", vm = %name, %last, "VM not ready within boot_timeout; it has failed.");
                self.update(|s| {
                    s.mark_lost(
                        slot,
                        format!("failed: not ready {boot} after it was created ({last})"),
                    )
                });
                return Err(PoolError::NotReady {
                    vm: name,
                    after: boot,
                    last,
                });
            }
            let remaining = deadline.remaining(Instant::now());
            if !remaining.is_zero() {
                tokio::time::sleep(poll.next_delay().min(remaining)).await;
            }
            if deadline.is_expired(Instant::now()) {
                return Err(PoolError::NotReady {
                    vm: name,
                    after: crate::text::duration(started.elapsed()),
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
    pub(super) async fn delete_slot(
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
                // On disk before the delete goes out.
                self.persist().await;
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
pub(super) enum DeleteCheck {
    /// Nothing (a start or restart replacing the slot's VM).
    None,
    /// The VM is still idle: the tier is not active, no start claimed the slot, `idle_ttl` passed.
    Idle,
    /// The VM is still lost (a reconcile may have seen it run again) and no start claimed it.
    Lost,
}
