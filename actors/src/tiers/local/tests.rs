//! The `local` tier against real processes (`/bin/sh` scripts); the demo
//! backend end to end is in the integration tests.

use std::time::Duration;

use bytesize::ByteSize;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use super::*;
use crate::contract::{Internal, StopReason, TierMsg};

/// Stands in for the tier actor: collects the driver's events.
struct Collector;

impl Actor for Collector {
    type Msg = TierMsg;
    type State = mpsc::UnboundedSender<DriverEvent>;
    type Arguments = mpsc::UnboundedSender<DriverEvent>;

    async fn pre_start(
        &self,
        _myself: ActorRef<TierMsg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _myself: ActorRef<TierMsg>,
        msg: TierMsg,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let TierMsg::Internal(Internal::Driver(event)) = msg {
            let _ = tx.send(event);
        }
        Ok(())
    }
}

async fn driver(
    script: &str,
    tweak: impl FnOnce(&mut LocalConfig),
) -> (LocalDriver, mpsc::UnboundedReceiver<DriverEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (collector, _) = Actor::spawn(None, Collector, tx)
        .await
        .expect("collector starts");
    let mut config = LocalConfig {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        port: free_port(),
        min_free_memory: ByteSize::b(0),
        stop_grace: Duration::from_millis(300),
        crash_loop_cap: 3,
        restart: BackoffConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            reset_after: Duration::from_secs(10),
            jitter: Jitter::None,
        },
        ..LocalConfig::default()
    };
    tweak(&mut config);
    (
        LocalDriver::new(config, EventSink::new(collector)).expect("driver builds"),
        rx,
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn group_alive(pid: u32) -> bool {
    killpg(Pid::from_raw(pid as i32), None).is_ok()
}

async fn running_pid(driver: &LocalDriver) -> u32 {
    let mut view = driver.view.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Phase::Running { pid, .. } = view.borrow().phase {
            return pid;
        }
        assert!(
            tokio::time::timeout_at(deadline, view.changed())
                .await
                .is_ok(),
            "process never ran"
        );
    }
}

#[tokio::test]
async fn probing_never_starts_anything() {
    let (driver, _events) = driver("sleep 100", |_| {}).await;
    for _ in 0..3 {
        assert_eq!(
            driver.probe().await,
            ProbeOutcome::Idle {
                reason: "not started".into()
            }
        );
    }
    assert_eq!(driver.view.borrow().phase, Phase::NotStarted);
}

#[tokio::test]
async fn a_crash_loop_gives_up_with_exit_codes_and_stderr() {
    let (driver, _events) = driver("echo boom on port $PORT >&2; exit 3", |_| {}).await;
    let error = driver.start().await.expect_err("a crash loop cannot start");
    let text = error.to_string();
    assert!(text.starts_with("crash loop: exited 4 times"), "{text}");
    assert!(text.contains("exit code 3, exit code 3"), "{text}");
    assert!(text.contains("stderr tail: boom on port"), "{text}");
    match driver.probe().await {
        ProbeOutcome::Unavailable { reason } => assert_eq!(reason, text),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn refuses_to_start_below_min_free_memory() {
    let (driver, _events) = driver("sleep 100", |c| c.min_free_memory = ByteSize::pib(64)).await;
    let error = driver
        .start()
        .await
        .expect_err("no host has 64 PiB free")
        .to_string();
    assert!(error.starts_with("refusing to start: "), "{error}");
    assert!(error.contains("below min_free_memory 64.0 PiB"), "{error}");
    assert_eq!(driver.view.borrow().phase, Phase::NotStarted);
}

#[tokio::test]
async fn stop_terminates_the_whole_group_and_kills_what_ignores_sigterm() {
    // The shell ignores SIGTERM and has a grandchild in its group; it
    // creates the marker once the trap is in place.
    let dir = std::env::temp_dir().join(format!("cascade-local-test-{}", std::process::id()));
    let marker = dir.join("trapped");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let script = format!(
        "trap '' TERM; sleep 1000 & touch {}; sleep 1000",
        marker.display()
    );
    let (driver, _events) = driver(&script, |_| {}).await;
    driver.ensure_running().await.expect("spawns");
    let pid = running_pid(&driver).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !marker.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the script never set its trap"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(group_alive(pid));
    let started = tokio::time::Instant::now();
    driver.stop(StopReason::Exiting).await.expect("stops");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGKILL came before the grace period"
    );
    // The orphaned grandchild is reaped by init, asynchronously.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while group_alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a process of the group survived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(driver.view.borrow().phase, Phase::Stopped);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_process_that_exits_is_restarted_and_reported() {
    let (driver, mut events) = driver("sleep 0.2; exit 0", |c| c.crash_loop_cap = 100).await;
    driver.ensure_running().await.expect("spawns");
    let first = running_pid(&driver).await;
    let restarted = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Some(DriverEvent::BackendRestarted { .. }) => return,
                Some(_) => continue,
                None => panic!("event channel closed"),
            }
        }
    })
    .await;
    assert!(restarted.is_ok(), "no restart reported");
    let second = running_pid(&driver).await;
    assert_ne!(first, second);
    assert!(driver.details()["recent_exits"].contains("exit code 0"));
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_running_process_without_health_endpoint_probes_down() {
    let (driver, _events) = driver("sleep 1000", |_| {}).await;
    driver.ensure_running().await.expect("spawns");
    running_pid(&driver).await;
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            assert!(error.contains("health check http://127.0.0.1:"), "{error}")
        }
        other => panic!("expected Down, got {other:?}"),
    }
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn dry_run_restart_changes_nothing() {
    let (driver, _events) = driver("sleep 1000", |_| {}).await;
    driver.ensure_running().await.expect("spawns");
    let pid = running_pid(&driver).await;
    let report = driver
        .restart(RestartRequest {
            force: true,
            dry_run: true,
        })
        .await
        .expect("plans");
    assert!(report.dry_run);
    assert_eq!(
        report.plan[0],
        format!("kill process group {pid} (SIGKILL)")
    );
    assert_eq!(running_pid(&driver).await, pid);
    assert!(group_alive(pid));
    driver.stop(StopReason::Exiting).await.expect("stops");
}
