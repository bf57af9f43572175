//! The root with fake drivers: restart, escalation, failover and failback,
//! reload.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::contract::{
    Driver, DriverFactory, ProbeOutcome, RestartReport, RestartRequest, StopReason, TierError,
};
use crate::resilience::BreakerConfig;
use crate::tier::ProbeConfig;

/// A driver whose health and misbehaviour the test controls.
struct Fake {
    id: TierId,
    healthy: Arc<AtomicBool>,
    panics: bool,
    stops: Arc<Mutex<Vec<(TierId, StopReason)>>>,
}

#[async_trait]
impl Driver for Fake {
    fn endpoint(&self) -> Option<String> {
        Some(format!("http://{}.invalid", self.id))
    }
    fn startable(&self) -> bool {
        false
    }
    async fn probe(&self) -> ProbeOutcome {
        if self.healthy.load(Ordering::SeqCst) {
            ProbeOutcome::Up {
                note: "ready".into(),
            }
        } else {
            ProbeOutcome::Down {
                error: "HTTP 503".into(),
            }
        }
    }
    async fn start(&self) -> Result<(), TierError> {
        Err(TierError::new("fakes do not start"))
    }
    async fn stop(&self, reason: StopReason) -> Result<(), TierError> {
        self.stops.lock().unwrap().push((self.id, reason));
        Ok(())
    }
    async fn restart(&self, r: RestartRequest) -> Result<RestartReport, TierError> {
        Ok(RestartReport {
            tier: self.id,
            dry_run: r.dry_run,
            plan: vec![],
        })
    }
    fn details(&self) -> std::collections::BTreeMap<String, String> {
        // Called inside the tier actor's handler: a panic here is a panic of
        // the actor, which the root must contain.
        if self.panics {
            panic!("injected panic in the {} tier", self.id);
        }
        Default::default()
    }
}

struct Tiers {
    specs: Vec<TierSpec>,
    health: Vec<Arc<AtomicBool>>,
    stops: Arc<Mutex<Vec<(TierId, StopReason)>>>,
    /// How many drivers tier i's factory has built.
    builds: Vec<Arc<AtomicU32>>,
}

/// `panicking[i]`: how many instances of tier i panic before one behaves.
fn tiers(ids: &[TierId], panicking: &[u32]) -> Tiers {
    let stops = Arc::new(Mutex::new(Vec::new()));
    let mut specs = Vec::new();
    let mut health = Vec::new();
    let mut builds = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let healthy = Arc::new(AtomicBool::new(true));
        let remaining = Arc::new(AtomicU32::new(panicking[i]));
        let built = Arc::new(AtomicU32::new(0));
        let (h, s, b) = (healthy.clone(), stops.clone(), built.clone());
        let factory: DriverFactory = Arc::new(move |_events| {
            b.fetch_add(1, Ordering::SeqCst);
            let panics = remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            Ok(Arc::new(Fake {
                id,
                healthy: h.clone(),
                panics,
                stops: s.clone(),
            }) as Arc<dyn Driver>)
        });
        specs.push(TierSpec {
            id,
            factory,
            probe: ProbeConfig {
                interval: Duration::from_millis(20),
                timeout: Duration::from_millis(100),
            },
            breaker: BreakerConfig {
                consecutive_failures: 2,
                ..BreakerConfig::default()
            },
            start_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(1),
            fingerprint: "v1".into(),
        });
        health.push(healthy);
        builds.push(built);
    }
    Tiers {
        specs,
        health,
        stops,
        builds,
    }
}

fn supervisor_config() -> SupervisorConfig {
    SupervisorConfig {
        max_restarts: 2,
        restart_window: Duration::from_secs(10),
        restart_backoff: BackoffConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(40),
            reset_after: Duration::from_secs(10),
            jitter: Jitter::Full,
        },
    }
}

fn waterfall(order: &[TierId], failback_after: Duration) -> WaterfallConfig {
    WaterfallConfig {
        order: order.to_vec(),
        failback_after,
        ..WaterfallConfig::default()
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    ok: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| ok(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    if let Ok(Ok(snapshot)) = waited {
        return snapshot;
    }
    panic!(
        "timed out waiting for {what}; last snapshot: {:#?}",
        *rx.borrow()
    );
}

async fn shutdown(running: Running) -> Exit {
    let _ = running
        .root
        .call(RootMsg::Shutdown, Some(Duration::from_secs(5)))
        .await;
    tokio::time::timeout(Duration::from_secs(5), running.exit)
        .await
        .expect("root exits")
        .expect("exit sent")
}

#[tokio::test]
async fn a_panicking_tier_actor_is_restarted_and_recovers() {
    let t = tiers(&[TierId::Local], &[1]);
    let mut running = start(
        t.specs,
        waterfall(&[TierId::Local], Duration::from_secs(1)),
        supervisor_config(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    let snap = wait_for(
        &mut running.snapshots,
        "local active after one restart",
        |s| s.active == Some(TierId::Local) && s.tiers[0].actor_restarts == 1,
    )
    .await;
    assert_eq!(snap.tiers[0].status.state, TierState::Healthy);
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test]
async fn too_many_restarts_escalate_and_stop_the_others_in_reverse_order() {
    let ids = [TierId::Docker, TierId::CloudRun, TierId::Local];
    let t = tiers(&ids, &[0, u32::MAX, 0]);
    let running = start(
        t.specs,
        waterfall(&ids, Duration::from_secs(1)),
        supervisor_config(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    let exit = tokio::time::timeout(Duration::from_secs(10), running.exit)
        .await
        .expect("escalates in time");
    match exit.expect("exit sent") {
        Exit::Escalated { tier, errors } => {
            assert_eq!(tier, TierId::CloudRun);
            assert_eq!(
                errors.len(),
                3,
                "max_restarts 2 → the third failure escalates: {errors:?}"
            );
            assert!(
                errors[0].contains("injected panic in the cloud_run tier"),
                "{errors:?}"
            );
            let message = Exit::Escalated { tier, errors }.to_string();
            assert!(
                message.starts_with("the cloud_run tier failed too often"),
                "{message}"
            );
        }
        other => panic!("expected escalation, got {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), running.join)
        .await
        .expect("root stops")
        .expect("root joined");
    assert_eq!(
        *t.stops.lock().unwrap(),
        vec![
            (TierId::Local, StopReason::Exiting),
            (TierId::Docker, StopReason::Exiting)
        ]
    );
}

#[tokio::test]
async fn fails_over_at_once_and_fails_back_after_hysteresis() {
    let ids = [TierId::Docker, TierId::Local];
    let t = tiers(&ids, &[0, 0]);
    let failback = Duration::from_millis(600);
    let mut running = start(
        t.specs,
        waterfall(&ids, failback),
        supervisor_config(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    wait_for(&mut running.snapshots, "docker active", |s| {
        s.active == Some(TierId::Docker)
    })
    .await;

    t.health[0].store(false, Ordering::SeqCst);
    let snap = wait_for(&mut running.snapshots, "failover to local", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    assert!(
        snap.decision.starts_with("active tier: local (docker: "),
        "{}",
        snap.decision
    );

    t.health[0].store(true, Ordering::SeqCst);
    // The breaker opened, so docker must first pass a half-open trial; then
    // it has to stay healthy for the hysteresis before traffic returns.
    let healthy_at = {
        wait_for(&mut running.snapshots, "docker healthy again", |s| {
            s.tiers[0].status.state == TierState::Healthy
        })
        .await;
        tokio::time::Instant::now()
    };
    assert_eq!(
        running.snapshots.borrow().active,
        Some(TierId::Local),
        "failback must wait"
    );
    let snap = wait_for(&mut running.snapshots, "failback to docker", |s| {
        s.active == Some(TierId::Docker)
    })
    .await;
    assert!(
        healthy_at.elapsed() >= failback - Duration::from_millis(50),
        "failed back too early"
    );
    assert!(
        snap.decision.contains("failback from local"),
        "{}",
        snap.decision
    );
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

/// Records notifications with the time they were sent.
#[derive(Default)]
struct Recorder(Mutex<Vec<(tokio::time::Instant, String)>>);

impl crate::notify::ServiceNotify for Recorder {
    fn ready(&self) {
        self.push("READY=1".into());
    }
    fn status(&self, text: &str) {
        self.push(format!("STATUS={text}"));
    }
    fn stopping(&self) {
        self.push("STOPPING=1".into());
    }
    fn watchdog(&self) {
        self.push("WATCHDOG=1".into());
    }
    fn watchdog_period(&self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }
}

impl Recorder {
    fn push(&self, what: String) {
        self.0
            .lock()
            .unwrap()
            .push((tokio::time::Instant::now(), what));
    }
    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.split('=').next().unwrap_or("").to_owned())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_status_watchdog_and_stopping_in_order() {
    let t = tiers(&[TierId::Local], &[0]);
    let recorder = Arc::new(Recorder::default());
    let mut running = start(
        t.specs,
        waterfall(&[TierId::Local], Duration::from_secs(1)),
        supervisor_config(),
        recorder.clone(),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while recorder.names().iter().filter(|n| *n == "WATCHDOG").count() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watchdog pings: {:?}",
            recorder.names()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shutdown(running).await, Exit::Shutdown);
    let names = recorder.names();
    let first = |what: &str| {
        names
            .iter()
            .position(|n| n == what)
            .unwrap_or_else(|| panic!("no {what}: {names:?}"))
    };
    let ready = first("READY");
    let status = ready
        + names[ready..]
            .iter()
            .position(|n| n == "STATUS")
            .expect("STATUS after READY");
    let watchdog = status
        + names[status..]
            .iter()
            .position(|n| n == "WATCHDOG")
            .expect("WATCHDOG after STATUS");
    let stopping = first("STOPPING");
    assert!(
        ready < status && status < watchdog && watchdog < stopping,
        "{names:?}"
    );
    assert!(
        recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| s == "STATUS=active tier: local")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_root_stops_the_watchdog_pings() {
    // The tier's driver factory blocks for a second the first time. The root
    // awaits the tier's start inside its own loop, so the root is wedged for
    // that second, and so must be its watchdog.
    let mut t = tiers(&[TierId::Local], &[0]);
    let inner = t.specs[0].factory.clone();
    let wedged = Arc::new(AtomicBool::new(false));
    let w = wedged.clone();
    t.specs[0].factory = Arc::new(move |events| {
        if !w.swap(true, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1000));
        }
        inner(events)
    });
    let recorder = Arc::new(Recorder::default());
    let started = tokio::time::Instant::now();
    let mut running = start(
        t.specs,
        waterfall(&[TierId::Local], Duration::from_secs(1)),
        supervisor_config(),
        recorder.clone(),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while recorder.names().iter().filter(|n| *n == "WATCHDOG").count() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pings never resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shutdown(running).await, Exit::Shutdown);
    let pings: Vec<tokio::time::Instant> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s)| s == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    let first = pings[0];
    assert!(
        first - started >= Duration::from_millis(900),
        "a ping went out while the root was wedged"
    );
    let steady = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        steady < Duration::from_millis(500),
        "pings resumed irregularly: largest gap {steady:?}"
    );
}

async fn reload(
    running: &Running,
    tiers: Vec<TierSpec>,
    waterfall: WaterfallConfig,
) -> ReloadSummary {
    let answer = running
        .root
        .call(
            |reply| RootMsg::Reload {
                tiers,
                waterfall,
                reply,
            },
            Some(Duration::from_secs(5)),
        )
        .await
        .expect("reload delivered");
    match answer {
        ractor::rpc::CallResult::Success(summary) => summary,
        _ => panic!("reload not answered in time"),
    }
}

fn order(snapshot: &Snapshot) -> Vec<TierId> {
    snapshot.tiers.iter().map(|t| t.status.tier).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rebuilds_only_the_tier_whose_fingerprint_changed() {
    let ids = [TierId::Docker, TierId::Local];
    let t = tiers(&ids, &[0, 0]);
    let mut changed = t.specs.clone();
    changed[1].fingerprint = "v2".into();
    let config = waterfall(&ids, Duration::from_millis(100));
    let mut running = start(
        t.specs.clone(),
        config.clone(),
        supervisor_config(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    wait_for(
        &mut running.snapshots,
        "docker active, local healthy",
        |s| s.active == Some(TierId::Docker) && s.tiers[1].status.state == TierState::Healthy,
    )
    .await;

    let summary = reload(&running, changed, config).await;
    assert_eq!(summary.restarted, vec![TierId::Local]);
    assert!(
        summary.added.is_empty() && summary.removed.is_empty(),
        "{summary:?}"
    );
    assert_eq!(
        summary.to_string(),
        "configuration reloaded: local restarted (changed)"
    );
    assert_eq!(
        *t.stops.lock().unwrap(),
        vec![(TierId::Local, StopReason::Replaced)],
        "a changed tier is replaced, not shut down"
    );
    let snap = wait_for(&mut running.snapshots, "local healthy again", |s| {
        s.tiers[1].status.state == TierState::Healthy
    })
    .await;
    assert_eq!(snap.active, Some(TierId::Docker));
    // Give a wrongly scheduled supervision restart (an exit taken for a
    // failure) the time to happen: the backoff is at most 40ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.builds[1].load(Ordering::SeqCst), 2, "local rebuilt once");
    assert_eq!(t.builds[0].load(Ordering::SeqCst), 1, "docker untouched");
    assert_eq!(
        running.snapshots.borrow().tiers[1].actor_restarts,
        0,
        "a reload is not a failure"
    );

    let summary = reload(
        &running,
        t.specs,
        waterfall(&ids, Duration::from_millis(100)),
    )
    .await;
    assert_eq!(summary.restarted, vec![TierId::Local], "v2 back to v1");
    let summary = reload(
        &running,
        {
            let t2 = tiers(&ids, &[0, 0]);
            t2.specs
        },
        waterfall(&ids, Duration::from_millis(100)),
    )
    .await;
    assert!(summary.is_unchanged(), "{summary:?}");
    assert_eq!(summary.to_string(), "configuration unchanged");
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_tiers_in_the_new_order() {
    let all = tiers(&[TierId::Docker, TierId::Local], &[0, 0]);
    let (docker, local) = (all.specs[0].clone(), all.specs[1].clone());
    let mut running = start(
        vec![local.clone()],
        waterfall(&[TierId::Local], Duration::from_secs(60)),
        supervisor_config(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local)
    })
    .await;

    let ids = [TierId::Docker, TierId::Local];
    let summary = reload(
        &running,
        vec![docker.clone(), local],
        waterfall(&ids, Duration::from_secs(60)),
    )
    .await;
    assert_eq!(summary.added, vec![TierId::Docker]);
    assert_eq!(
        summary.to_string(),
        "configuration reloaded: docker added; waterfall order now docker, local"
    );
    assert_eq!(order(&running.snapshots.borrow()), ids.to_vec());
    wait_for(&mut running.snapshots, "docker healthy", |s| {
        s.tiers[0].status.state == TierState::Healthy
    })
    .await;

    let summary = reload(
        &running,
        vec![docker],
        waterfall(&[TierId::Docker], Duration::from_secs(60)),
    )
    .await;
    assert_eq!(summary.removed, vec![TierId::Local]);
    assert_eq!(
        *all.stops.lock().unwrap(),
        vec![(TierId::Local, StopReason::Removed)]
    );
    assert_eq!(order(&running.snapshots.borrow()), vec![TierId::Docker]);
    // With local gone, docker is the only tier left to serve.
    wait_for(&mut running.snapshots, "docker active", |s| {
        s.active == Some(TierId::Docker)
    })
    .await;
    assert_eq!(all.builds[0].load(Ordering::SeqCst), 1);
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_tier_stays_active_across_a_reload_that_does_not_touch_it() {
    let ids = [TierId::Docker, TierId::Local];
    let t = tiers(&ids, &[0, 0]);
    let mut running = start(
        t.specs.clone(),
        waterfall(&ids, Duration::from_millis(100)),
        supervisor_config(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    wait_for(
        &mut running.snapshots,
        "docker active, local healthy",
        |s| s.active == Some(TierId::Docker) && s.tiers[1].status.state == TierState::Healthy,
    )
    .await;

    // Local now comes first and is healthy: a waterfall built from scratch
    // would pick it at once. Carried over, docker stays active until local
    // has been healthy for failback_after (a minute).
    let reversed = [TierId::Local, TierId::Docker];
    let summary = reload(
        &running,
        vec![t.specs[1].clone(), t.specs[0].clone()],
        waterfall(&reversed, Duration::from_secs(60)),
    )
    .await;
    assert!(
        summary.order_changed && summary.restarted.is_empty(),
        "{summary:?}"
    );
    let snap = running.snapshots.borrow().clone();
    assert_eq!(order(&snap), reversed.to_vec());
    assert_eq!(snap.active, Some(TierId::Docker), "{snap:#?}");
    assert!(snap.tiers[1].active);
    assert!(t.stops.lock().unwrap().is_empty(), "nothing stopped");
    assert_eq!(t.builds[0].load(Ordering::SeqCst), 1);
    assert_eq!(t.builds[1].load(Ordering::SeqCst), 1);
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}
