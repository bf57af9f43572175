//! The reconcile: reading what Compute Engine holds and merging it into the state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{LostNote, Pool, PoolError, PoolState, adopt, is_lost_status};
use crate::resilience::Deadline;
use crate::tiers::gcp_vm::checkpoint::{Phase, VmEntry};
use crate::tiers::gcp_vm::client::{Op, Vm};
use crate::tiers::gcp_vm::{OnPreemption, POOL_LABEL};

impl Pool {
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
                    let why = "vanished (deleted outside cascade, or preempted)";
                    s.last_lost = Some(LostNote {
                        vm: entry.name.clone(),
                        why: why.into(),
                        at: m.now,
                    });
                    notes.push(format!("{} {why}", entry.name));
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
