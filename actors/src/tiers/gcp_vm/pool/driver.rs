//! What the driver calls: start, probe, endpoint, restart, details.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::join_all;
use tokio::time::Instant;
use tracing::warn;

use super::{Pool, PoolError, PoolState};
use crate::contract::{ProbeOutcome, RestartReport, RestartRequest, TierId};
use crate::resilience::Deadline;
use crate::routing::Endpoint;
use crate::tiers::gcp_vm::OnPreemption;
use crate::tiers::gcp_vm::checkpoint::{Phase, VmEntry};

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

impl Pool {
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
        let slots = self.read(|s| start_slots(s, self.config.vms, self.config.max_vms));
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

    /// The pool's health as the tier sees it. Every reason names what each VM lacks (its last
    /// health check, its boot, why it was lost) and the API's last error (`rate limited until …`,
    /// a project that does not exist), and says nothing of VMs already gone nor promises a start
    /// that will not run.
    pub async fn probe(&self) -> ProbeOutcome {
        let (entries, errors, last_lost, replacing) = self.read(|s| {
            (
                s.vms.values().cloned().collect::<Vec<_>>(),
                s.vm_errors.clone(),
                s.last_lost.clone(),
                s.wanted
                    && self.config.on_preemption == OnPreemption::Replace
                    && (!s.refill.is_empty() || !s.busy.is_empty()),
            )
        });
        let api = self.retrier.api_status();
        let with_api = |text: String| match &api {
            Some(api) => format!("{text}; Compute Engine: {api}"),
            None => text,
        };
        if entries.is_empty() {
            let mut reason = "no VMs".to_owned();
            if let Some(lost) = &last_lost {
                reason.push_str(&format!(
                    " (the last one was lost at {}: {})",
                    humantime::format_rfc3339_seconds(lost.at),
                    lost.why
                ));
            }
            reason.push_str(if replacing {
                "; a replacement is being created"
            } else {
                "; none are created until the waterfall starts this tier"
            });
            return ProbeOutcome::Idle {
                reason: with_api(reason),
            };
        }
        let candidates = entries
            .iter()
            .filter(|vm| matches!(vm.phase, Phase::Ready | Phase::Unhealthy) && vm.ip.is_some())
            .count();
        if candidates == 0 {
            // Nothing runs that could serve: say so at once, so the waterfall moves on without
            // waiting for the breaker.
            return ProbeOutcome::Idle {
                reason: with_api(describe(&entries, &errors)),
            };
        }
        let changes = self.health_round(true).await;
        if changes.iter().any(|c| c.failed) {
            self.wake.notify_one();
        }
        let (entries, errors) = self.read(|s| {
            (
                s.vms.values().cloned().collect::<Vec<_>>(),
                s.vm_errors.clone(),
            )
        });
        let (ready, others): (Vec<VmEntry>, Vec<VmEntry>) = entries
            .iter()
            .cloned()
            .partition(|vm| vm.phase == Phase::Ready);
        if ready.is_empty() {
            self.wake.notify_one();
            return ProbeOutcome::Down {
                error: with_api(format!(
                    "no VM passes its health check: {}",
                    describe(&entries, &errors)
                )),
            };
        }
        let list: Vec<String> = ready
            .iter()
            .map(|vm| format!("{} {}", vm.name, vm.ip.as_deref().unwrap_or("?")))
            .collect();
        let mut note = format!(
            "{}/{} VMs ready: {}",
            ready.len(),
            entries.len(),
            list.join(", ")
        );
        if !others.is_empty() {
            note.push_str(&format!("; {}", describe(&others, &errors)));
        }
        ProbeOutcome::Up {
            note: with_api(note),
        }
    }

    /// Every ready VM, by slot, named by the VM: the router spreads requests over them.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.read(|s| {
            s.vms
                .values()
                .filter(|vm| vm.phase == Phase::Ready)
                .filter_map(|vm| {
                    let ip = vm.ip.as_ref()?;
                    Some(Endpoint::new(
                        vm.name.clone(),
                        format!("http://{ip}:{}", self.config.service_port),
                    ))
                })
                .collect()
        })
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
        let now = SystemTime::now();
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
                let mut text = describe_vm(vm, s.vm_errors.get(&vm.slot));
                if vm.phase == Phase::Booting {
                    let booting = now.duration_since(vm.created_at).unwrap_or_default();
                    text.push_str(&format!(
                        " (for {} of boot_timeout {})",
                        crate::text::duration(booting),
                        crate::text::duration(self.config.boot_timeout)
                    ));
                }
                details.insert(format!("vm.{}", vm.name), text);
            }
            let path = self.path.display();
            let checkpoint = match (&s.written, &s.saved) {
                (Some((at, vms)), _) => format!(
                    "{path}: {vms} VMs, written {}",
                    humantime::format_rfc3339_seconds(*at)
                ),
                (None, Some(saved)) => {
                    format!("{path}: {} VMs, as found at start", saved.vms.len())
                }
                (None, None) => format!("{path}: not written yet (nothing to keep)"),
            };
            details.insert("checkpoint".into(), checkpoint);
            details.insert("checkpoint_at_start".into(), s.restore_note.clone());
            if let Some(error) = &s.save_error {
                details.insert("checkpoint_error".into(), error.clone());
            }
            if let Some(lost) = &s.last_lost {
                details.insert("last_lost".into(), lost.describe());
            }
            if !s.active
                && !s.vms.is_empty()
                && let Some(since) = s.idle_since
            {
                let idle = now.duration_since(since).unwrap_or_default();
                details.insert(
                    "idle".into(),
                    format!(
                        "{} of {} (VMs are deleted after idle_ttl)",
                        crate::text::duration(idle),
                        crate::text::duration(self.config.idle_ttl)
                    ),
                );
            }
        });
        if let Some(api) = self.retrier.api_status() {
            details.insert("api".into(), api);
        }
        details.insert("api_retries".into(), self.retrier.retries().to_string());
        details
    }
}

/// The `vms` slots a start brings up: VMs that are up or on their way first (ready ones first,
/// then replacements in flight), then free slots while `max_vms` leaves room, then lost VMs'
/// slots (replaced in place). So a start after a preemption waits for the replacement the pool
/// already creates instead of creating another VM.
pub(super) fn start_slots(s: &PoolState, vms: u32, max_vms: u32) -> Vec<u32> {
    let rank = |phase: Phase| match phase {
        Phase::Ready => 0,
        Phase::Unhealthy => 1,
        Phase::Booting => 2,
        Phase::Creating => 3,
        Phase::Lost | Phase::Deleting => 4,
    };
    let mut live: Vec<&VmEntry> = s.vms.values().filter(|vm| rank(vm.phase) < 4).collect();
    live.sort_by_key(|vm| (rank(vm.phase), vm.slot));
    let mut chosen: Vec<u32> = live.iter().map(|vm| vm.slot).collect();
    for slot in &s.replacing {
        if !chosen.contains(slot) {
            chosen.push(*slot);
        }
    }
    let mut held = s.vms.len();
    for free in 0..max_vms {
        if held >= max_vms as usize {
            break;
        }
        if !s.vms.contains_key(&free) && !chosen.contains(&free) {
            chosen.push(free);
            held += 1;
        }
    }
    for slot in s.vms.keys() {
        if !chosen.contains(slot) {
            chosen.push(*slot);
        }
    }
    chosen.truncate(vms as usize);
    chosen.sort_unstable();
    chosen
}

/// One VM for operators: phase, address, Compute Engine's status, and what it lacks.
fn describe_vm(vm: &VmEntry, error: Option<&String>) -> String {
    let mut text = vm.phase.as_str().to_owned();
    if let Some(ip) = &vm.ip {
        text.push_str(&format!(" {ip}"));
    }
    if let Some(status) = &vm.gce_status {
        text.push_str(&format!(" ({status})"));
    }
    if let (Phase::Lost, Some(reason)) = (vm.phase, &vm.lost_reason) {
        text.push_str(&format!(": {reason}"));
    } else if let Some(error) = error.filter(|_| vm.phase != Phase::Ready) {
        text.push_str(&format!(": {error}"));
    }
    if let (Phase::Creating | Phase::Deleting, Some(op)) = (vm.phase, &vm.last_operation) {
        text.push_str(&format!(" (operation {})", op.name));
    }
    text
}

/// The VMs for a reason: each with what it lacks; stable between probes (no elapsed times).
fn describe(entries: &[VmEntry], errors: &BTreeMap<u32, String>) -> String {
    entries
        .iter()
        .map(|vm| format!("{} {}", vm.name, describe_vm(vm, errors.get(&vm.slot))))
        .collect::<Vec<_>>()
        .join(", ")
}
