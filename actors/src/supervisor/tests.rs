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
    /// Stops entered; each is recorded in `stops` once `stop_gate` is open.
    stops_entered: Arc<AtomicU32>,
    stop_gate: watch::Receiver<bool>,
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
        self.stops_entered.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.stop_gate.clone();
        let _ = gate.wait_for(|open| *open).await;
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
    /// Tier i's stops wait while its gate is closed (`false`).
    stop_gates: Vec<watch::Sender<bool>>,
    stops_entered: Vec<Arc<AtomicU32>>,
}

/// `panicking[i]`: how many instances of tier i panic before one behaves.
fn tiers(ids: &[TierId], panicking: &[u32]) -> Tiers {
    let stops = Arc::new(Mutex::new(Vec::new()));
    let mut specs = Vec::new();
    let mut health = Vec::new();
    let mut builds = Vec::new();
    let mut stop_gates = Vec::new();
    let mut stops_entered = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let healthy = Arc::new(AtomicBool::new(true));
        let remaining = Arc::new(AtomicU32::new(panicking[i]));
        let built = Arc::new(AtomicU32::new(0));
        let (gate, gate_rx) = watch::channel(true);
        let entered = Arc::new(AtomicU32::new(0));
        let (h, s, b, e) = (
            healthy.clone(),
            stops.clone(),
            built.clone(),
            entered.clone(),
        );
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
                stops_entered: e.clone(),
                stop_gate: gate_rx.clone(),
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
        stop_gates.push(gate);
        stops_entered.push(entered);
    }
    Tiers {
        specs,
        health,
        stops,
        builds,
        stop_gates,
        stops_entered,
    }
}

/// A root over `specs` with the tests' supervision settings, notifying
/// `notify`, for an instance whose state directory does not exist.
async fn start_root(
    specs: Vec<TierSpec>,
    config: WaterfallConfig,
    notify: Arc<dyn ServiceNotify>,
) -> Running {
    start(
        specs,
        config,
        supervisor_config(),
        notify,
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts")
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
    let mut running = start_root(
        t.specs,
        waterfall(&[TierId::Local], Duration::from_secs(1)),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
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
    let mut t = tiers(&ids, &[0, u32::MAX, 0]);
    // Local's stop is held until the test lets it finish, well within its grace.
    t.specs[2].stop_grace = Duration::from_secs(60);
    t.stop_gates[2].send_replace(false);
    let mut running = start_root(
        t.specs,
        waterfall(&ids, Duration::from_secs(1)),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
    eventually("escalation stops local", || {
        t.stops_entered[2].load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut running.exit)
            .await
            .is_err(),
        "the exit was reported while local was still stopping"
    );
    t.stop_gates[2].send_replace(true);
    let exit = tokio::time::timeout(Duration::from_secs(10), running.exit)
        .await
        .expect("escalates in time");
    assert_eq!(
        t.stops.lock().unwrap().len(),
        2,
        "every tier stopped before the exit was reported"
    );
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
    let mut running = start_root(
        t.specs,
        waterfall(&ids, failback),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
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
        let snap = wait_for(&mut running.snapshots, "docker healthy again", |s| {
            s.tiers[0].status.state == TierState::Healthy
        })
        .await;
        // What /status says is true now, not when local became active.
        assert!(
            snap.decision.starts_with("active tier: local (docker: ")
                && snap.decision.contains("failback at "),
            "{}",
            snap.decision
        );
        assert!(
            snap.last_change.starts_with("active tier: local (docker: "),
            "{}",
            snap.last_change
        );
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
        snap.last_change.contains("failback from local"),
        "{}",
        snap.last_change
    );
    assert_eq!(snap.decision, "active tier: docker");
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
    let mut running = start_root(
        t.specs,
        waterfall(&[TierId::Local], Duration::from_secs(1)),
        recorder.clone(),
    )
    .await;
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
    let mut running = start_root(
        t.specs,
        waterfall(&[TierId::Local], Duration::from_secs(1)),
        recorder.clone(),
    )
    .await;
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
    let mut running = start_root(
        t.specs.clone(),
        config.clone(),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
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
    let mut running = start_root(
        vec![local.clone()],
        waterfall(&[TierId::Local], Duration::from_secs(60)),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
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
    let mut running = start_root(
        t.specs.clone(),
        waterfall(&ids, Duration::from_millis(100)),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
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

/// Sends a reload from a task, so the test can act while it is in progress.
fn reload_in_background(
    running: &Running,
    tiers: Vec<TierSpec>,
    waterfall: WaterfallConfig,
) -> JoinHandle<Result<ractor::rpc::CallResult<ReloadSummary>, ractor::MessagingErr<RootMsg>>> {
    let root = running.root.clone();
    tokio::spawn(async move {
        root.call(
            |reply| RootMsg::Reload {
                tiers,
                waterfall,
                reply,
            },
            Some(Duration::from_secs(30)),
        )
        .await
    })
}

fn watchdog_pings(recorder: &Recorder) -> usize {
    recorder.names().iter().filter(|n| *n == "WATCHDOG").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_stopping_a_slow_tier_holds_up_neither_failover_nor_the_watchdog() {
    let ids = [TierId::Docker, TierId::Local, TierId::CloudRun];
    let mut t = tiers(&ids, &[0, 0, 0]);
    // cloud_run's old actor stops only when the test lets it, well within
    // its grace.
    t.specs[2].stop_grace = Duration::from_secs(60);
    let mut changed = t.specs.clone();
    changed[2].fingerprint = "v2".into();
    let config = waterfall(&ids, Duration::from_secs(60));
    let recorder = Arc::new(Recorder::default());
    let mut running = start_root(t.specs.clone(), config.clone(), recorder.clone()).await;
    wait_for(&mut running.snapshots, "docker active, all healthy", |s| {
        s.active == Some(TierId::Docker)
            && s.tiers.iter().all(|t| t.status.state == TierState::Healthy)
    })
    .await;

    t.stop_gates[2].send_replace(false);
    let first = reload_in_background(&running, changed.clone(), config.clone());
    eventually("the reload stops the old cloud_run", || {
        t.stops_entered[2].load(Ordering::SeqCst) == 1
    })
    .await;
    // A second reload while the first one's stop is in flight waits its turn.
    let second = reload_in_background(&running, changed, config);

    t.health[0].store(false, Ordering::SeqCst);
    wait_for(
        &mut running.snapshots,
        "failover to local during the reload",
        |s| s.active == Some(TierId::Local),
    )
    .await;
    let pings = watchdog_pings(&recorder);
    eventually("watchdog pings during the reload", || {
        watchdog_pings(&recorder) >= pings + 3
    })
    .await;
    assert!(
        !first.is_finished(),
        "the reload was answered before its stop"
    );
    assert_eq!(
        t.builds[2].load(Ordering::SeqCst),
        1,
        "the new cloud_run was built while the old one was stopping"
    );

    t.stop_gates[2].send_replace(true);
    let answer = |joined| match joined {
        Ok(Ok(ractor::rpc::CallResult::Success(summary))) => summary,
        other => panic!("reload not answered: {other:?}"),
    };
    let summary = answer(first.await);
    assert_eq!(summary.restarted, vec![TierId::CloudRun]);
    let summary = answer(second.await);
    assert!(
        summary.is_unchanged(),
        "the second reload is applied after the first: {summary:?}"
    );
    assert_eq!(t.builds[2].load(Ordering::SeqCst), 2);
    assert_eq!(
        *t.stops.lock().unwrap(),
        vec![(TierId::CloudRun, StopReason::Replaced)]
    );
    wait_for(&mut running.snapshots, "the new cloud_run healthy", |s| {
        s.tiers[2].status.state == TierState::Healthy
    })
    .await;
    assert_eq!(running.snapshots.borrow().tiers[2].actor_restarts, 0);
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_reload_waits_for_its_stops_and_spawns_nothing() {
    let ids = [TierId::Docker, TierId::Local];
    let mut t = tiers(&ids, &[0, 0]);
    t.specs[1].stop_grace = Duration::from_secs(60);
    let mut changed = t.specs.clone();
    changed[1].fingerprint = "v2".into();
    let config = waterfall(&ids, Duration::from_secs(60));
    let mut running = start_root(
        t.specs.clone(),
        config.clone(),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
    wait_for(&mut running.snapshots, "docker active", |s| {
        s.active == Some(TierId::Docker)
    })
    .await;

    t.stop_gates[1].send_replace(false);
    let reloading = reload_in_background(&running, changed, config);
    eventually("the reload stops the old local", || {
        t.stops_entered[1].load(Ordering::SeqCst) == 1
    })
    .await;
    let root = running.root.clone();
    let shutting_down = tokio::spawn(async move {
        root.call(RootMsg::Shutdown, Some(Duration::from_secs(30)))
            .await
    });
    eventually("shutdown stops docker", || {
        t.stops
            .lock()
            .unwrap()
            .contains(&(TierId::Docker, StopReason::Exiting))
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut running.exit)
            .await
            .is_err(),
        "the exit was reported while the reload's stop was in flight"
    );

    t.stop_gates[1].send_replace(true);
    let exit = tokio::time::timeout(Duration::from_secs(10), running.exit)
        .await
        .expect("exits once the stop finished")
        .expect("exit sent");
    assert_eq!(exit, Exit::Shutdown);
    assert!(
        matches!(
            shutting_down.await,
            Ok(Ok(ractor::rpc::CallResult::Success(())))
        ),
        "shutdown answered"
    );
    assert!(
        matches!(
            reloading.await,
            Ok(Ok(ractor::rpc::CallResult::SenderError))
        ),
        "a reload cut short by shutdown is answered as not applied"
    );
    assert_eq!(
        *t.stops.lock().unwrap(),
        vec![
            (TierId::Docker, StopReason::Exiting),
            (TierId::Local, StopReason::Replaced)
        ]
    );
    assert_eq!(
        t.builds[1].load(Ordering::SeqCst),
        1,
        "nothing is spawned during a shutdown"
    );
}

// === lifecycle, panics in driver calls, stale reports ===

/// A backend the test scripts, shared by every driver its tier's factory
/// builds (as a real tier's backend outlives one actor).
#[derive(Default)]
struct Backend {
    running: AtomicBool,
    /// Set when anything stopped the backend.
    ever_stopped: AtomicBool,
    probes: AtomicU32,
    starts: AtomicU32,
    /// Starts whose future was dropped before it finished.
    starts_abandoned: AtomicU32,
    restarts: AtomicU32,
    stops: Mutex<Vec<StopReason>>,
    /// How many of the next calls panic.
    panic_probes: AtomicU32,
    panic_starts: AtomicU32,
    panic_restarts: AtomicU32,
    panic_details: AtomicU32,
    /// How long a start and a restart take.
    slow: Mutex<Duration>,
}

fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Counts a start as abandoned unless it is disarmed on completion.
struct Abandoned<'a>(Option<&'a AtomicU32>);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct Scripted {
    id: TierId,
    backend: Arc<Backend>,
}

#[async_trait]
impl Driver for Scripted {
    fn endpoint(&self) -> Option<String> {
        Some(format!("http://{}.invalid", self.id))
    }
    fn startable(&self) -> bool {
        true
    }
    async fn probe(&self) -> ProbeOutcome {
        self.backend.probes.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.backend.panic_probes) {
            panic!("injected panic in probe");
        }
        if self.backend.running.load(Ordering::SeqCst) {
            ProbeOutcome::Up {
                note: "ready".into(),
            }
        } else {
            ProbeOutcome::Idle {
                reason: "not started".into(),
            }
        }
    }
    async fn start(&self) -> Result<(), TierError> {
        let b = &self.backend;
        b.starts.fetch_add(1, Ordering::SeqCst);
        if take_one(&b.panic_starts) {
            panic!("injected panic in start");
        }
        let mut guard = Abandoned(Some(&b.starts_abandoned));
        let slow = *b.slow.lock().unwrap();
        tokio::time::sleep(slow).await;
        guard.0 = None;
        b.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    async fn stop(&self, reason: StopReason) -> Result<(), TierError> {
        self.backend.stops.lock().unwrap().push(reason);
        if reason != StopReason::Replaced {
            self.backend.running.store(false, Ordering::SeqCst);
            self.backend.ever_stopped.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    async fn restart(&self, r: RestartRequest) -> Result<RestartReport, TierError> {
        let report = RestartReport {
            tier: self.id,
            dry_run: r.dry_run,
            plan: vec!["stop, then start".into()],
        };
        if r.dry_run {
            return Ok(report);
        }
        let b = &self.backend;
        b.restarts.fetch_add(1, Ordering::SeqCst);
        if take_one(&b.panic_restarts) {
            panic!("injected panic in restart");
        }
        b.ever_stopped.store(true, Ordering::SeqCst);
        let slow = *b.slow.lock().unwrap();
        tokio::time::sleep(slow).await;
        b.running.store(true, Ordering::SeqCst);
        Ok(report)
    }
    fn details(&self) -> std::collections::BTreeMap<String, String> {
        if take_one(&self.backend.panic_details) {
            panic!("injected panic in the {} tier actor", self.id);
        }
        Default::default()
    }
}

fn scripted(id: TierId, backend: &Arc<Backend>) -> TierSpec {
    let backend = backend.clone();
    TierSpec {
        id,
        factory: Arc::new(move |_events| {
            Ok(Arc::new(Scripted {
                id,
                backend: backend.clone(),
            }) as Arc<dyn Driver>)
        }),
        probe: ProbeConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
        },
        breaker: BreakerConfig {
            consecutive_failures: 2,
            ..BreakerConfig::default()
        },
        start_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(1),
        fingerprint: "v1".into(),
    }
}

fn backend(running: bool) -> Arc<Backend> {
    let b = Backend::default();
    b.running.store(running, Ordering::SeqCst);
    Arc::new(b)
}

fn quick_rounds(order: &[TierId]) -> WaterfallConfig {
    WaterfallConfig {
        start_retry: BackoffConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            reset_after: Duration::from_secs(10),
            jitter: Jitter::Full,
        },
        ..waterfall(order, Duration::from_millis(100))
    }
}

async fn run_root(specs: Vec<TierSpec>, order: &[TierId]) -> Running {
    start_root(
        specs,
        quick_rounds(order),
        Arc::new(crate::notify::NoNotify),
    )
    .await
}

async fn eventually(what: &str, ok: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn restart_tier(
    running: &Running,
    tier: TierId,
    request: RestartRequest,
) -> Result<RestartReport, TierError> {
    let answer = running
        .root
        .call(
            |reply| RootMsg::Restart {
                tier,
                request,
                reply,
            },
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("restart delivered");
    match answer {
        ractor::rpc::CallResult::Success(result) => result,
        ractor::rpc::CallResult::Timeout => panic!("restart not answered in time"),
        ractor::rpc::CallResult::SenderError => panic!("restart dropped without an answer"),
    }
}

/// The actor running `tier` now (the root's children come in no order).
async fn tier_actor(running: &Running, tier: TierId) -> ActorRef<TierMsg> {
    for cell in running.root.get_children() {
        let actor = ActorRef::<TierMsg>::from(cell);
        let status = actor
            .call(TierMsg::Status, Some(Duration::from_secs(5)))
            .await;
        if let Ok(ractor::rpc::CallResult::Success(status)) = status
            && status.tier == tier
        {
            return actor;
        }
    }
    panic!("no actor runs the {tier} tier");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_probe_is_a_failed_probe_and_probing_goes_on() {
    let b = backend(true);
    b.panic_probes.store(1, Ordering::SeqCst);
    let mut running = run_root(vec![scripted(TierId::Local, &b)], &[TierId::Local]).await;
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    eventually("probes go on after the panic", || {
        b.probes.load(Ordering::SeqCst) >= 5
    })
    .await;
    let snap = running.snapshots.borrow().clone();
    assert_eq!(snap.tiers[0].actor_restarts, 0, "contained in the task");
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_start_is_a_failed_start_and_the_start_phase_goes_on() {
    let b = backend(false);
    b.panic_starts.store(1, Ordering::SeqCst);
    let mut running = run_root(vec![scripted(TierId::Local, &b)], &[TierId::Local]).await;
    // The tier's own start deadline is 30 s: only the panic reported as a
    // failed start lets the start phase try again within the wait.
    wait_for(&mut running.snapshots, "local active after a retry", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
    assert_eq!(running.snapshots.borrow().tiers[0].actor_restarts, 0);
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_restart_answers_the_restart_and_probing_resumes() {
    let b = backend(true);
    b.panic_restarts.store(1, Ordering::SeqCst);
    let mut running = run_root(vec![scripted(TierId::Local, &b)], &[TierId::Local]).await;
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    let error = restart_tier(&running, TierId::Local, RestartRequest::default())
        .await
        .expect_err("the restart panicked");
    assert!(
        error
            .0
            .contains("restart panicked: injected panic in restart"),
        "{error}"
    );
    let probes = b.probes.load(Ordering::SeqCst);
    eventually("probes resume after the failed restart", || {
        b.probes.load(Ordering::SeqCst) >= probes + 3
    })
    .await;
    wait_for(&mut running.snapshots, "local healthy", |s| {
        s.tiers[0].status.state == TierState::Healthy
    })
    .await;
    // The next restart goes through, and is counted as a backend restart.
    restart_tier(&running, TierId::Local, RestartRequest::default())
        .await
        .expect("restarts");
    wait_for(&mut running.snapshots, "one backend restart counted", |s| {
        s.tiers[0].status.backend_restarts == 1 && s.tiers[0].status.state == TierState::Healthy
    })
    .await;
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_result_from_a_replaced_actor_is_ignored() {
    let ids = [TierId::Docker, TierId::Local];
    let docker = backend(false);
    *docker.slow.lock().unwrap() = Duration::from_millis(800);
    let local = backend(false);
    let mut running = run_root(
        vec![
            scripted(TierId::Docker, &docker),
            scripted(TierId::Local, &local),
        ],
        &ids,
    )
    .await;
    wait_for(&mut running.snapshots, "docker starting", |s| {
        s.tiers[0].status.state == TierState::Starting
    })
    .await;
    // A failed start as an actor replaced meanwhile would have sent it.
    running
        .root
        .send_message(RootMsg::StartFinished {
            from: ractor::ActorId::Local(u64::MAX),
            tier: TierId::Docker,
            result: Err(TierError::new("stale")),
        })
        .expect("root alive");
    wait_for(&mut running.snapshots, "docker active", |s| {
        s.active == Some(TierId::Docker)
    })
    .await;
    assert_eq!(
        local.starts.load(Ordering::SeqCst),
        0,
        "the stale failure sent the start phase on to local"
    );
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_actor_killed_during_a_start_neither_wedges_the_start_phase_nor_leaves_its_start_running()
 {
    let ids = [TierId::Docker, TierId::Local];
    let docker = backend(false);
    // Far beyond the wait below: only the actor's exit can end this start.
    *docker.slow.lock().unwrap() = Duration::from_secs(60);
    let local = backend(false);
    let mut running = run_root(
        vec![
            scripted(TierId::Docker, &docker),
            scripted(TierId::Local, &local),
        ],
        &ids,
    )
    .await;
    eventually("docker's start entered", || {
        docker.starts.load(Ordering::SeqCst) == 1
    })
    .await;
    tier_actor(&running, TierId::Docker).await.kill();
    eventually("the killed actor's start is abandoned", || {
        docker.starts_abandoned.load(Ordering::SeqCst) == 1
    })
    .await;
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local) && s.tiers[0].actor_restarts == 1
    })
    .await;
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_actor_panic_leaves_the_backend_serving_and_probing_resumes() {
    let b = backend(false);
    let mut running = run_root(vec![scripted(TierId::Local, &b)], &[TierId::Local]).await;
    wait_for(&mut running.snapshots, "local started and active", |s| {
        s.active == Some(TierId::Local) && s.tiers[0].status.state == TierState::Healthy
    })
    .await;
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
    let probes = b.probes.load(Ordering::SeqCst);
    let panicked = tokio::time::Instant::now();
    b.panic_details.store(1, Ordering::SeqCst);
    wait_for(&mut running.snapshots, "the actor restarted", |s| {
        s.tiers[0].actor_restarts == 1
    })
    .await;
    let probes_after = b.probes.load(Ordering::SeqCst);
    eventually("the new actor probes", || {
        b.probes.load(Ordering::SeqCst) > probes_after
    })
    .await;
    let probing_again = panicked.elapsed();
    wait_for(&mut running.snapshots, "local healthy and active", |s| {
        s.active == Some(TierId::Local) && s.tiers[0].status.state == TierState::Healthy
    })
    .await;
    println!(
        "tier actor panic → probing again after {probing_again:?}, healthy and active after {:?} ({} probes before)",
        panicked.elapsed(),
        probes
    );
    assert!(b.running.load(Ordering::SeqCst));
    assert!(
        !b.ever_stopped.load(Ordering::SeqCst),
        "the backend was stopped: {:?}",
        b.stops.lock().unwrap()
    );
    assert_eq!(b.starts.load(Ordering::SeqCst), 1, "no second start");
    assert_eq!(b.restarts.load(Ordering::SeqCst), 0, "no restart");
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_start_or_a_restart_is_refused_naming_what_is_in_progress() {
    let b = backend(false);
    *b.slow.lock().unwrap() = Duration::from_millis(500);
    let mut running = run_root(vec![scripted(TierId::Local, &b)], &[TierId::Local]).await;
    wait_for(&mut running.snapshots, "local starting", |s| {
        s.tiers[0].status.state == TierState::Starting
    })
    .await;
    let error = restart_tier(&running, TierId::Local, RestartRequest::default())
        .await
        .expect_err("refused during a start");
    assert!(
        error.0.contains("a start of the tier is in progress"),
        "{error}"
    );
    // A dry run changes nothing, so it is answered whatever is in progress.
    let plan = restart_tier(
        &running,
        TierId::Local,
        RestartRequest {
            dry_run: true,
            ..RestartRequest::default()
        },
    )
    .await
    .expect("a dry run is answered");
    assert!(plan.dry_run);
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local)
    })
    .await;

    let first = {
        let root = running.root.clone();
        tokio::spawn(async move {
            root.call(
                |reply| RootMsg::Restart {
                    tier: TierId::Local,
                    request: RestartRequest::default(),
                    reply,
                },
                Some(Duration::from_secs(10)),
            )
            .await
        })
    };
    eventually("the first restart in flight", || {
        b.restarts.load(Ordering::SeqCst) == 1
    })
    .await;
    let error = restart_tier(&running, TierId::Local, RestartRequest::default())
        .await
        .expect_err("refused during a restart");
    assert!(
        error
            .0
            .contains("a restart of the tier is already in progress"),
        "{error}"
    );
    match first.await.expect("joined").expect("delivered") {
        ractor::rpc::CallResult::Success(Ok(_)) => {}
        _ => panic!("the first restart did not succeed"),
    }
    assert_eq!(b.restarts.load(Ordering::SeqCst), 1);
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_queued_behind_a_stop_never_starts_the_backend() {
    let b = backend(true);
    let mut running = run_root(vec![scripted(TierId::Local, &b)], &[TierId::Local]).await;
    wait_for(&mut running.snapshots, "local active", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    let actor = tier_actor(&running, TierId::Local).await;
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
    let (restarted_tx, restarted) = tokio::sync::oneshot::channel();
    actor
        .send_message(TierMsg::Stop(StopReason::Exiting, stopped_tx.into()))
        .expect("tier alive");
    actor
        .send_message(TierMsg::Restart(
            RestartRequest::default(),
            restarted_tx.into(),
        ))
        .expect("tier alive");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("stop answered in time")
        .expect("stop answered");
    let answer = tokio::time::timeout(Duration::from_secs(5), restarted)
        .await
        .expect("restart answered in time")
        .expect("restart answered");
    let error = answer.expect_err("refused after a stop");
    assert!(error.0.contains("the tier is stopping"), "{error}");
    assert_eq!(b.restarts.load(Ordering::SeqCst), 0);
    assert!(
        !b.running.load(Ordering::SeqCst),
        "started again after Stop"
    );
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_reports_when_it_lets_the_next_probe_through() {
    let ids = [TierId::Docker, TierId::Local];
    let t = tiers(&ids, &[0, 0]);
    t.health[0].store(false, Ordering::SeqCst);
    let mut running = start_root(
        t.specs,
        waterfall(&ids, Duration::from_secs(1)),
        Arc::new(crate::notify::NoNotify),
    )
    .await;
    let snap = wait_for(&mut running.snapshots, "docker's breaker open", |s| {
        s.tiers[0].status.breaker == crate::resilience::BreakerState::Open
    })
    .await;
    let retry_in = snap.tiers[0]
        .status
        .details
        .get("breaker_retry_in")
        .unwrap_or_else(|| panic!("no breaker_retry_in: {snap:#?}"));
    assert!(
        humantime::parse_duration(retry_in).is_ok(),
        "not a duration: {retry_in}"
    );
    assert_eq!(shutdown(running).await, Exit::Shutdown);
}
