//! The idle clock and idle deletion.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use tokio::time::Instant;
use tracing::info;

use super::jobs::Job;
use super::slot::{DeleteCheck, Deleted};
use super::{Pool, PoolState};
use crate::resilience::{Deadline, with_deadline};
use crate::tiers::gcp_vm::checkpoint::{Phase, VmEntry};

impl Pool {
    /// Deletes VMs idle for `idle_ttl`: the tier is not active, counted from the later of when it
    /// stopped being active and when the VM became ready. Choosing them and releasing the pool
    /// (`wanted = false`) is one update, so a start in between is never overwritten; each delete
    /// checks again under the slot's lock. Nothing before the first successful reconcile.
    pub(crate) fn collect_idle(self: &Arc<Self>) {
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
            info!(backend.tier = "gcp_vm", vm = %name, idle_ttl = %crate::text::duration(ttl), "VM idle too long; deleting it.");
            self.spawn_job(
                slot,
                Job::Delete {
                    why: format!("idle for {}", crate::text::duration(ttl)),
                    idle: true,
                },
            );
        }
    }

    /// Drains the pool at once because its tier left the configuration: nobody runs it again,
    /// so waiting `idle_ttl` (which keeps VMs for a failback) would only leave them to no one.
    /// Otherwise idle deletion's rules hold: a reconcile first confirms what the checkpoint holds
    /// and adopts labelled VMs it forgot, and each delete checks the pool's label and instance id.
    /// Once the pool holds nothing its checkpoint is removed. Call after [`Pool::stop`], so no
    /// background job races the deletes. Errs with what is left, by VM name, and why.
    pub async fn drain_now(self: &Arc<Self>, deadline: Deadline) -> Result<(), String> {
        self.retire();
        self.set_active(false);
        let remaining = deadline.remaining(Instant::now());
        match with_deadline(remaining, "listing the pool's VMs", self.reconcile()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(format!("cannot list the pool's VMs: {error}")),
            Err(error) => return Err(format!("cannot list the pool's VMs: {error}")),
        }
        let slots: Vec<u32> = self.read(|s| s.vms.keys().copied().collect());
        let deletes = slots.into_iter().map(|slot| async move {
            let name = self.vm_name(slot);
            info!(backend.tier = "gcp_vm", vm = %name, "The tier was removed; deleting its VM.");
            let result = self.delete_slot(slot, deadline, DeleteCheck::None).await;
            (name, result)
        });
        let mut problems = Vec::new();
        for (name, result) in join_all(deletes).await {
            match result {
                Ok(Deleted::Gone) => {}
                Ok(Deleted::Kept(why)) => problems.push(format!("{name} kept: {why}")),
                Err(error) => problems.push(format!("{name}: {error}")),
            }
        }
        if self.finish_drain() {
            return Ok(());
        }
        let left: Vec<String> = self.read(|s| s.vms.values().map(|vm| vm.name.clone()).collect());
        if problems.is_empty() {
            problems.push(format!("still holds {}", left.join(", ")));
        }
        Err(problems.join("; "))
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
}

/// Whether `vm` has been idle for `ttl`: the tier is not active and no start or restart claims
/// its slot, since the later of when the tier stopped being active and when the VM became ready.
pub(super) fn idle_for(s: &PoolState, vm: &VmEntry, now: SystemTime, ttl: Duration) -> bool {
    if s.active || s.claimed.contains_key(&vm.slot) {
        return false;
    }
    let since = s.idle_since.unwrap_or(now);
    let from = since.max(vm.ready_at.unwrap_or(vm.created_at));
    now.duration_since(from).is_ok_and(|idle| idle >= ttl)
}
