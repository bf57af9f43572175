//! The watch loop: each tick's look at the API, health rounds, and when to reconcile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Pool, is_lost_status};
use crate::contract::DriverEvent;
use crate::resilience::{Backoff, BackoffConfig, Jitter, with_deadline};
use crate::tiers::gcp_vm::POOL_LABEL;
use crate::tiers::gcp_vm::checkpoint::Phase;

impl Pool {
    pub(super) async fn watch(self: Arc<Self>) {
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
            // A Retry-After in force pauses the looks too: it holds for every caller of the API.
            let held = self.retrier.held_until(Instant::now()).is_some();
            if holds && !reconcile_now && !held {
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
                    Err(error) => {
                        look_failures += 1;
                        if look_failures == 1 {
                            warn!(backend.tier = "gcp_vm", %error, "instances.list failed; trying again next tick.");
                        } else {
                            debug!(backend.tier = "gcp_vm", %error, failures = look_failures, "instances.list failed again.");
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
            let mut notes: Vec<String> = changes.into_iter().map(|c| c.note).collect();
            notes.extend(self.expire_boots());
            if !notes.is_empty() {
                (self.notify)(DriverEvent::Changed {
                    note: notes.join("; "),
                });
            }
            self.collect_idle();
            self.schedule();
            if self.finish_drain() {
                return;
            }
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
    /// An error's `Retry-After` holds every caller of the API (see `retry.rs`).
    async fn look(self: &Arc<Self>) -> Result<Look, String> {
        let api = self.api().await.map_err(|e| e.to_string())?;
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
        const CALL: &str = "compute.instances.list";
        let listed = match with_deadline(
            self.config.api_timeout,
            CALL,
            api.list_by_label(POOL_LABEL, pool),
        )
        .await
        {
            Ok(Ok(listed)) => {
                self.retrier.note_success();
                listed
            }
            Ok(Err(e)) => {
                self.retrier.note_error(CALL, &e);
                self.retrier.hold_for(CALL, &e);
                return Err(format!("{CALL}: {e}"));
            }
            Err(e) => return Err(format!("{CALL}: {e}")),
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
    pub(super) async fn health_round(&self, ready_only: bool) -> Vec<HealthChange> {
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
            async move { crate::tiers::health::check(&self.http, &url, timeout).await }
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
                        s.vm_errors.remove(slot);
                        changes.push(HealthChange::note(format!("{name} ready ({ip})")));
                    }
                    (Phase::Ready, Err(error)) => {
                        entry.phase = Phase::Unhealthy;
                        let error = format!("health check failed: {error}");
                        changes.push(HealthChange {
                            note: format!("{name} {error}"),
                            failed: true,
                        });
                        s.vm_errors.insert(*slot, error);
                    }
                    (_, Err(error)) => {
                        s.vm_errors
                            .insert(*slot, format!("health check failed: {error}"));
                    }
                    _ => {}
                }
            }
            changes
        })
    }

    /// Marks failed every booting VM that nobody works on and that is not ready `boot_timeout`
    /// after it was created, with what it lacked; the schedule then replaces or deletes it.
    pub(super) fn expire_boots(&self) -> Vec<String> {
        let now = SystemTime::now();
        let boot = self.config.boot_timeout;
        self.update(|s| {
            let expired: Vec<u32> = s
                .vms
                .values()
                .filter(|vm| vm.phase == Phase::Booting)
                .filter(|vm| !s.busy.contains(&vm.slot) && !s.claimed.contains_key(&vm.slot))
                .filter(|vm| now.duration_since(vm.created_at).is_ok_and(|t| t >= boot))
                .map(|vm| vm.slot)
                .collect();
            let mut notes = Vec::new();
            for slot in expired {
                let last = s.vm_errors.get(&slot).cloned().unwrap_or_else(|| {
                    let status = s.vms.get(&slot).and_then(|vm| vm.gce_status.clone());
                    format!("status {}", status.as_deref().unwrap_or("unknown"))
                });
                let reason = format!(
                    "failed: not ready {} after it was created ({last})",
                    crate::text::duration(boot)
                );
                if let Some(note) = s.mark_lost(slot, reason) {
                    warn!(backend.tier = "gcp_vm", %note, "VM not ready within boot_timeout.");
                    notes.push(note);
                }
            }
            notes
        })
    }
}

pub(super) struct HealthChange {
    note: String,
    pub(super) failed: bool,
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
