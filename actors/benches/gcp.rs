//! The Google Cloud tiers against the local fake (`cascade-gcp-fake`):
//! the CPU time one Cloud Run probe costs cascade, the time from a
//! preemption to the waterfall choosing another tier, and the preemption
//! gap (preemption → the pool serving from a ready VM again) with
//! `max_vms = 1` (the slot is deleted, then inserted again) and `max_vms = 2`
//! (the replacement goes into the spare slot at once). Prints numbers;
//! asserts nothing.
//!
//! Run: `cargo bench -p cascade-actors --bench gcp` (about three minutes).
//!
//! The fake runs on its own runtime and threads; cascade's side (root,
//! tier actors, drivers) runs on a current-thread runtime on the main
//! thread, so that thread's CPU clock is cascade's cost and nothing else.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cascade_actors::contract::{
    Driver, DriverFactory, ProbeOutcome, RestartReport, RestartRequest, StopReason, TierError,
};
use cascade_actors::notify::NoNotify;
use cascade_actors::supervisor::{self, SupervisorConfig};
use cascade_actors::tier::{ProbeConfig, TierSpec};
use cascade_actors::tiers::cloud_run::{self, CloudRunConfig};
use cascade_actors::tiers::gcp::GcpEnv;
use cascade_actors::tiers::gcp_vm::{self, GcpVmConfig};
use cascade_actors::waterfall::WaterfallConfig;
use cascade_actors::{TierId, TierState};
use cascade_gcp_fake::{FakeGcp, FakeOptions};
use nix::time::{ClockId, clock_gettime};

/// Probes measured for the CPU figure.
const PROBES: usize = 2000;
/// Preemptions measured for the latency figure.
const PREEMPTIONS: usize = 20;
/// Preemptions measured per `max_vms` for the gap.
const GAPS: usize = 5;

fn main() {
    let fake_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime for the fake");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let fake = fake_runtime
        .block_on(FakeGcp::start(FakeOptions {
            vm_service_port: port,
            ..FakeOptions::default()
        }))
        .expect("start the fake");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime for cascade");
    runtime.block_on(probe_cpu(&fake));
    runtime.block_on(preemption(&fake));
    fake_runtime.block_on(fake.shutdown());

    // Compute Engine's own pace, roughly (the fake binary's defaults): an
    // operation takes 2 s, a boot 5 s.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let paced = fake_runtime
        .block_on(FakeGcp::start(FakeOptions {
            vm_service_port: port,
            operation_delay: Duration::from_secs(2),
            boot_delay: Duration::from_secs(5),
            ..FakeOptions::default()
        }))
        .expect("start the fake");
    println!(
        "== preemption gap: preemption → a ready VM again, gcp_vm alone ({GAPS} preemptions each; operations 2 s, boot 5 s)"
    );
    for max_vms in [1, 2] {
        runtime.block_on(preemption_gap(&paced, max_vms));
    }
    fake_runtime.block_on(paced.shutdown());
}

fn thread_cpu() -> Duration {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

fn env(fake: &FakeGcp) -> GcpEnv {
    GcpEnv {
        metadata_host: Some(fake.metadata_host()),
        credentials_file: None,
    }
}

/// The whole tier (actor, breaker, spans, driver, HTTP with an ID token)
/// probing as fast as it can; CPU of cascade's thread per probe the service saw.
async fn probe_cpu(fake: &FakeGcp) {
    println!(
        "== Cloud Run probe: cascade CPU per probe ({PROBES} probes, ID token from the metadata server)"
    );
    let config = CloudRunConfig {
        url: fake.service_url(),
        probe: ProbeConfig {
            interval: Duration::from_millis(1),
            timeout: Duration::from_secs(2),
        },
        ..CloudRunConfig::default()
    };
    let spec = cloud_run::tier_spec(config, env(fake));
    let running = supervisor::start(
        vec![spec],
        WaterfallConfig {
            order: vec![TierId::CloudRun],
            ..WaterfallConfig::default()
        },
        SupervisorConfig::default(),
        Arc::new(NoNotify),
        cascade_actors::Instance::from_state_dir("/nonexistent/cascade-bench".as_ref()),
    )
    .await
    .expect("start the root");
    let mut snapshots = running.snapshots.clone();
    wait_until(&mut snapshots, Duration::from_secs(10), |s| {
        s.active == Some(TierId::CloudRun)
    })
    .await;
    // Warm: connection pooled, token cached.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let seen = fake.service_requests().len();
    let cpu = thread_cpu();
    let wall = Instant::now();
    while fake.service_requests().len() - seen < PROBES {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = thread_cpu() - cpu;
    let probes = fake.service_requests().len() - seen;
    let wall = wall.elapsed();
    println!(
        "  {probes} probes in {:.2} s: {:.1} µs of cascade CPU per probe",
        wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / probes as f64
    );
    running.root.stop(None);
    let _ = running.join.await;
}

async fn preemption(fake: &FakeGcp) {
    println!(
        "== preemption → waterfall choice ({PREEMPTIONS} preemptions, default gcp_vm and waterfall settings, failback 1 s)"
    );
    let options = fake.options();
    let config = GcpVmConfig {
        project: options.project.clone(),
        zone: options.zone.clone(),
        pool: "bench".into(),
        endpoint: fake.compute_endpoint(),
        service_port: fake.vm_service_port(),
        ..GcpVmConfig::default()
    };
    let checkpoint_dir = tempfile::TempDir::new().expect("temp dir");
    let checkpoint = checkpoint_dir.path().join("bench.json");
    let gcp_spec = gcp_vm::tier_spec(config, checkpoint, env(fake));
    // The tier traffic goes to when the VM is gone: healthy once the pool serves.
    let fallback_up = Arc::new(AtomicBool::new(false));
    let fallback = Fallback {
        up: fallback_up.clone(),
    };
    let fallback = Arc::new(fallback);
    let fallback_factory: DriverFactory =
        Arc::new(move |_| Ok(fallback.clone() as Arc<dyn Driver>));
    let fallback_spec = TierSpec {
        id: TierId::Local,
        factory: fallback_factory,
        probe: ProbeConfig::default(),
        breaker: Default::default(),
        start_timeout: Duration::from_secs(1),
        stop_grace: Duration::from_secs(1),
        fingerprint: "fallback".into(),
    };
    let running = supervisor::start(
        vec![gcp_spec, fallback_spec],
        WaterfallConfig {
            order: vec![TierId::GcpVm, TierId::Local],
            failback_after: Duration::from_secs(1),
            ..WaterfallConfig::default()
        },
        SupervisorConfig::default(),
        Arc::new(NoNotify),
        cascade_actors::Instance::from_state_dir("/nonexistent/cascade-bench".as_ref()),
    )
    .await
    .expect("start the root");
    let mut snapshots = running.snapshots.clone();
    let created = Instant::now();
    wait_until(&mut snapshots, Duration::from_secs(30), |s| {
        s.active == Some(TierId::GcpVm)
    })
    .await;
    println!(
        "  pool created its VM and took traffic in {:.2} s",
        created.elapsed().as_secs_f64()
    );
    fallback_up.store(true, Ordering::SeqCst);

    let mut latencies = Vec::new();
    for _ in 0..PREEMPTIONS {
        wait_until(&mut snapshots, Duration::from_secs(60), |s| {
            s.active == Some(TierId::GcpVm)
                && s.tiers.iter().all(|t| t.status.state == TierState::Healthy)
        })
        .await;
        // A random moment, so the preemption lands anywhere in the pool's
        // 500 ms watch cycle rather than always at the same phase.
        // The VM serving now: a replacement may sit in another slot.
        let vm = running_vm(fake, "bench").await;
        let phase = Duration::from_millis(rand::random_range(0..1000));
        tokio::time::sleep(phase).await;
        let preempted = Instant::now();
        fake.preempt(&vm);
        wait_until(&mut snapshots, Duration::from_secs(30), |s| {
            s.active == Some(TierId::Local)
        })
        .await;
        latencies.push(preempted.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  preemption → another tier chosen: median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 9 / 10]),
        ms(latencies[latencies.len() - 1]),
    );
    running.root.stop(None);
    let _ = running.join.await;
}

/// With gcp_vm the only tier: from a preemption until gcp_vm is the active
/// tier again (a replacement VM ready), `GAPS` times.
async fn preemption_gap(fake: &FakeGcp, max_vms: u32) {
    let options = fake.options();
    let pool = format!("gap{max_vms}");
    let config = GcpVmConfig {
        project: options.project.clone(),
        zone: options.zone.clone(),
        pool: pool.clone(),
        endpoint: fake.compute_endpoint(),
        service_port: fake.vm_service_port(),
        vms: 1,
        max_vms,
        ..GcpVmConfig::default()
    };
    let checkpoint_dir = tempfile::TempDir::new().expect("temp dir");
    let checkpoint = checkpoint_dir.path().join(format!("{pool}.json"));
    let spec = gcp_vm::tier_spec(config, checkpoint, env(fake));
    let running = supervisor::start(
        vec![spec],
        WaterfallConfig {
            order: vec![TierId::GcpVm],
            failback_after: Duration::from_secs(1),
            ..WaterfallConfig::default()
        },
        SupervisorConfig::default(),
        Arc::new(NoNotify),
        cascade_actors::Instance::from_state_dir("/nonexistent/cascade-bench".as_ref()),
    )
    .await
    .expect("start the root");
    let mut snapshots = running.snapshots.clone();
    let mut gaps = Vec::new();
    for _ in 0..GAPS {
        wait_until(&mut snapshots, Duration::from_secs(120), |s| {
            s.active == Some(TierId::GcpVm)
        })
        .await;
        // Each round starts alike: one VM, RUNNING, the lost one gone.
        let vm = running_vm(fake, &pool).await;
        let phase = Duration::from_millis(rand::random_range(0..1000));
        tokio::time::sleep(phase).await;
        let preempted = Instant::now();
        fake.preempt(&vm);
        wait_until(&mut snapshots, Duration::from_secs(30), |s| {
            s.active != Some(TierId::GcpVm)
        })
        .await;
        wait_until(&mut snapshots, Duration::from_secs(120), |s| {
            s.active == Some(TierId::GcpVm)
        })
        .await;
        gaps.push(preempted.elapsed());
    }
    gaps.sort();
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "  max_vms = {max_vms}: gap median {:.1} s, min {:.1} s, max {:.1} s",
        s(gaps[gaps.len() / 2]),
        s(gaps[0]),
        s(gaps[gaps.len() - 1]),
    );
    running.root.stop(None);
    let _ = running.join.await;
}

/// The pool's only VM once it is RUNNING and any lost one is gone.
async fn running_vm(fake: &FakeGcp, pool: &str) -> String {
    loop {
        let vms: Vec<_> = fake
            .instances()
            .into_iter()
            .filter(|vm| vm.labels.get("cascade-pool").map(String::as_str) == Some(pool))
            .collect();
        if let [vm] = vms.as_slice()
            && vm.status == "RUNNING"
        {
            return vm.name.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(
    snapshots: &mut tokio::sync::watch::Receiver<supervisor::Snapshot>,
    timeout: Duration,
    done: impl Fn(&supervisor::Snapshot) -> bool,
) {
    let waited = tokio::time::timeout(timeout, snapshots.wait_for(|s| done(s)))
        .await
        .map(|found| found.is_ok());
    match waited {
        Ok(true) => {}
        Ok(false) => panic!("the root stopped"),
        Err(_) => {
            let decision = snapshots.borrow().decision.clone();
            panic!("timed out after {timeout:?}; last decision: {decision}")
        }
    }
}

/// A tier that is healthy when told to be and never starts anything.
struct Fallback {
    up: Arc<AtomicBool>,
}

#[async_trait]
impl Driver for Fallback {
    fn endpoint(&self) -> Option<String> {
        Some("http://fallback.invalid".into())
    }
    fn startable(&self) -> bool {
        false
    }
    async fn probe(&self) -> ProbeOutcome {
        if self.up.load(Ordering::SeqCst) {
            ProbeOutcome::Up {
                note: "ready".into(),
            }
        } else {
            ProbeOutcome::Idle {
                reason: "not yet".into(),
            }
        }
    }
    async fn start(&self) -> Result<(), TierError> {
        Err(TierError::new("the fallback does not start"))
    }
    async fn stop(&self, _reason: StopReason) -> Result<(), TierError> {
        Ok(())
    }
    async fn restart(&self, request: RestartRequest) -> Result<RestartReport, TierError> {
        Ok(RestartReport {
            tier: TierId::Local,
            dry_run: request.dry_run,
            plan: Vec::new(),
        })
    }
    fn details(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}
