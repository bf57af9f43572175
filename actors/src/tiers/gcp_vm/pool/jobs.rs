//! Background jobs: the replacements and deletions the state calls for, retried with backoff.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::slot::{DeleteCheck, Deleted, Ensured};
use super::{Pool, PoolState};
use crate::contract::DriverEvent;
use crate::resilience::{Backoff, BackoffConfig, Deadline, Jitter};
use crate::tiers::gcp_vm::OnPreemption;
use crate::tiers::gcp_vm::checkpoint::Phase;

/// Spacing of background attempts on a slot whose replacement or deletion failed.
fn job_backoff() -> Backoff {
    Backoff::new(BackoffConfig {
        base: Duration::from_secs(5),
        cap: Duration::from_secs(300),
        reset_after: Duration::MAX,
        jitter: Jitter::Full,
    })
}

/// Removes a slot from `busy` when its background job ends, cancelled or not.
struct BusyGuard {
    pool: Arc<Pool>,
    slot: u32,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut state = self.pool.lock_state();
        state.busy.remove(&self.slot);
        state.replacing.remove(&self.slot);
    }
}

impl Pool {
    pub(super) fn spawn_job(self: &Arc<Self>, slot: u32, job: Job) {
        {
            let mut state = self.lock_state();
            if state.claimed.contains_key(&slot) || !state.busy.insert(slot) {
                return;
            }
            if matches!(job, Job::Replace) {
                state.replacing.insert(slot);
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
    ///
    /// While the pool is wanted (and `on_preemption = "replace"`), it keeps `vms` VMs up or on
    /// their way: live ones and replacements in flight count. A lost VM is replaced in a free
    /// slot when `max_vms` leaves room, at once and alongside the lost VM's deletion, so the gap
    /// is one insert and boot; without room, the same slot is deleted and then inserted again.
    /// Lost VMs nobody needs are deleted.
    pub(super) fn schedule(self: &Arc<Self>) {
        let now = Instant::now();
        let replace_policy = self.config.on_preemption == OnPreemption::Replace;
        let want = self.config.vms as usize;
        let max = self.config.max_vms as usize;
        let jobs = self.update(|s| {
            let mut jobs = Vec::new();
            if !s.reconciled {
                return jobs;
            }
            let replacing = s.wanted && replace_policy;
            if !replacing {
                s.refill.clear();
            }
            let waiting = |s: &PoolState, slot: u32| {
                s.busy.contains(&slot)
                    || s.claimed.contains_key(&slot)
                    || s.retry_at.get(&slot).is_some_and(|(at, _)| *at > now)
            };
            // VMs up or on their way: live entries, replacements in flight, slots a start brings
            // up.
            let mut supply: BTreeSet<u32> = s
                .vms
                .values()
                .filter(|vm| !matches!(vm.phase, Phase::Lost | Phase::Deleting))
                .map(|vm| vm.slot)
                .chain(s.replacing.iter().copied())
                .chain(s.claimed.keys().copied())
                .collect();
            let mut spares_taken = 0usize;
            // Lost VMs, and deletes a crash or a stop interrupted.
            for (slot, entry) in &s.vms {
                if !matches!(entry.phase, Phase::Lost | Phase::Deleting) || waiting(s, *slot) {
                    continue;
                }
                let why = entry.lost_reason.clone().unwrap_or_else(|| "lost".into());
                if !replacing || supply.len() >= want {
                    jobs.push((*slot, Job::Delete { why, idle: false }));
                    continue;
                }
                let spare = (0..self.config.max_vms).find(|free| {
                    !s.vms.contains_key(free)
                        && !supply.contains(free)
                        && !s.busy.contains(free)
                        && !waiting(s, *free)
                });
                match spare.filter(|_| s.vms.len() + spares_taken < max) {
                    Some(spare) => {
                        spares_taken += 1;
                        supply.insert(spare);
                        jobs.push((spare, Job::Replace));
                        jobs.push((*slot, Job::Delete { why, idle: false }));
                    }
                    None => {
                        supply.insert(*slot);
                        jobs.push((*slot, Job::Replace));
                    }
                }
            }
            let refill: Vec<u32> = s.refill.iter().copied().collect();
            for slot in refill {
                if s.vms.contains_key(&slot) || waiting(s, slot) || supply.contains(&slot) {
                    continue;
                }
                if supply.len() >= want {
                    // Replaced elsewhere already.
                    s.refill.remove(&slot);
                    continue;
                }
                supply.insert(slot);
                jobs.push((slot, Job::Replace));
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
}

#[derive(Debug, Clone)]
pub(super) enum Job {
    /// Bring the slot to a ready VM (replacing a lost one).
    Replace,
    /// Delete the slot's VM and forget it: an idle one (`idle`), or a lost one.
    Delete { why: String, idle: bool },
}

enum JobDone {
    Ensured(Ensured),
    Deleted(Deleted),
}
