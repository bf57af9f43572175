//! The `local` tier against real processes: `/bin/sh` scripts, and Python's
//! `http.server` where a backend must serve; the demo backend end to end is
//! in the integration tests.

use std::time::Duration;

use bytesize::ByteSize;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use super::client::{Lines, LogBudget};
use super::*;
use crate::contract::{Internal, TierMsg, TierState};

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

/// A tier spec, its state directory, and a way to build drivers from it as
/// the tier actor does.
struct Tier {
    spec: TierSpec,
    state: tempfile::TempDir,
}

impl Tier {
    fn new(config: LocalConfig) -> Tier {
        let state = tempfile::tempdir().expect("temp dir");
        Tier {
            spec: tier_spec(config, state.path()),
            state,
        }
    }

    async fn driver(&self) -> (Arc<dyn Driver>, mpsc::UnboundedReceiver<DriverEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (collector, _) = Actor::spawn(None, Collector, tx)
            .await
            .expect("collector starts");
        let driver = (self.spec.factory)(EventSink::new(collector)).expect("driver builds");
        (driver, rx)
    }
}

fn config(command: &str, args: &[&str], tweak: impl FnOnce(&mut LocalConfig)) -> LocalConfig {
    let mut config = LocalConfig {
        command: command.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        port: free_port(),
        min_free_memory: ByteSize::b(0),
        stop_grace: Duration::from_millis(300),
        crash_loop_cap: 3,
        crash_loop_ceiling: Duration::from_secs(300),
        restart: BackoffConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            reset_after: Duration::from_secs(10),
            jitter: Jitter::None,
        },
        ..LocalConfig::default()
    };
    tweak(&mut config);
    config
}

/// A driver running `script` with `/bin/sh -c`.
async fn driver(
    script: &str,
    tweak: impl FnOnce(&mut LocalConfig),
) -> (LocalDriver, mpsc::UnboundedReceiver<DriverEvent>) {
    let config = config("/bin/sh", &["-c", script], tweak);
    let state = tempfile::tempdir().expect("temp dir");
    let keeper = Arc::new(Keeper::new(config, record_path(state.path())).expect("keeper"));
    // The record's directory may go; the tests that look at it use `Tier`.
    std::mem::forget(state);
    let (tx, rx) = mpsc::unbounded_channel();
    let (collector, _) = Actor::spawn(None, Collector, tx)
        .await
        .expect("collector starts");
    (LocalDriver::new(keeper, EventSink::new(collector)), rx)
}

/// A backend that serves HTTP 200 on `GET /` at `{port}`: Python's
/// `http.server`, exec'd so the shell's pid is the server's.
fn python_backend(tweak: impl FnOnce(&mut LocalConfig)) -> LocalConfig {
    config(
        "/bin/sh",
        &[
            "-c",
            "cd \"$(mktemp -d)\" && exec python3 -m http.server --bind 127.0.0.1 \"$PORT\"",
        ],
        |c| {
            c.health_path = "/".into();
            c.start_timeout = Duration::from_secs(20);
            tweak(c);
        },
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn group_alive(pid: u32) -> bool {
    client::group_alive(pid)
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).expect("signal the backend");
}

/// Waits up to 10 s for the phase to satisfy `ok`.
async fn wait_phase(driver: &LocalDriver, what: &str, ok: impl Fn(&Phase) -> bool) -> Phase {
    let mut view = driver.keeper.view.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let phase = view.borrow_and_update().phase.clone();
        if ok(&phase) {
            return phase;
        }
        assert!(
            tokio::time::timeout_at(deadline, view.changed())
                .await
                .is_ok(),
            "timed out waiting for {what}; last phase: {phase:?}"
        );
    }
}

async fn running_pid(driver: &LocalDriver) -> u32 {
    match wait_phase(driver, "a running process", |p| {
        matches!(p, Phase::Running { .. })
    })
    .await
    {
        Phase::Running { pid, .. } => pid,
        _ => unreachable!(),
    }
}

fn pid_of(driver: &Arc<dyn Driver>) -> Option<u32> {
    driver.details().get("pid").and_then(|p| p.parse().ok())
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
    assert_eq!(driver.phase(), Phase::NotStarted);
}

#[tokio::test]
async fn a_crash_loop_is_reported_with_exits_stderr_and_the_next_attempt() {
    // Past a cap of 0, the first failure is a crash loop, retried 10 s later.
    let (driver, _events) = driver("echo boom on port $PORT >&2; exit 3", |c| {
        c.crash_loop_cap = 0;
        c.restart.base = Duration::from_secs(10);
        c.restart.cap = Duration::from_secs(10);
    })
    .await;
    let error = driver.start().await.expect_err("a crash loop cannot start");
    let text = error.to_string();
    assert!(
        text.starts_with("crash loop: 1 failed start without running 10s (last: exit code 3)"),
        "{text}"
    );
    assert!(text.contains("; next attempt at 20"), "{text}");
    assert!(text.contains("stderr tail: boom on port"), "{text}");
    match driver.probe().await {
        ProbeOutcome::Unavailable { reason } => assert_eq!(reason, text),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let details = driver.details();
    assert_eq!(details["crash_looping"], "true", "{details:?}");
    assert!(details["next_attempt"].starts_with("20"), "{details:?}");
    // The start phase gets the report at once instead of waiting for the
    // next attempt.
    let again = tokio::time::timeout(Duration::from_secs(1), driver.start())
        .await
        .expect("answers at once");
    assert_eq!(again.expect_err("still crash-looping").to_string(), text);
}

#[tokio::test]
async fn past_the_cap_the_process_is_retried_at_the_ceiling_not_given_up() {
    // Fails three times, then runs: the fourth failure is past the cap of
    // three, so the tier reports a crash loop, and the attempt after the
    // ceiling's wait succeeds.
    let dir = tempfile::tempdir().expect("temp dir");
    let count = dir.path().join("count");
    let script = format!(
        "echo x >> '{count}'; if [ $(wc -l < '{count}') -le 4 ]; then exit 3; fi; exec sleep 1000",
        count = count.display()
    );
    let (driver, _events) = driver(&script, |c| {
        c.crash_loop_ceiling = Duration::from_millis(400);
    })
    .await;
    driver.ensure_running().await.expect("spawns");
    let phase = wait_phase(&driver, "the crash loop", |p| {
        matches!(p, Phase::CrashLooping { .. })
    })
    .await;
    let Phase::CrashLooping { report, .. } = phase else {
        unreachable!()
    };
    assert!(
        report.contains("4 failed starts without running 10s (last: exit code 3, exit code 3, exit code 3, exit code 3)"),
        "{report}"
    );
    let pid = running_pid(&driver).await;
    // The shell counts itself just after it is spawned.
    let runs = || {
        std::fs::read_to_string(&count)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    crate::resilience::poll_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        "the fifth run",
        || std::future::ready((runs() >= 5).then_some(())),
    )
    .await
    .expect("a fifth run");
    assert_eq!(runs(), 5);
    assert_eq!(
        running_pid(&driver).await,
        pid,
        "the fifth run keeps running"
    );
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn an_operator_restart_of_a_crash_looping_tier_tries_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixed = dir.path().join("fixed");
    let script = format!(
        "if [ -e '{fixed}' ]; then exec sleep 1000; fi; exit 3",
        fixed = fixed.display()
    );
    let (driver, _events) = driver(&script, |c| {
        c.crash_loop_cap = 0;
        c.restart.base = Duration::from_secs(10);
        c.restart.cap = Duration::from_secs(10);
    })
    .await;
    driver.ensure_running().await.expect("spawns");
    wait_phase(&driver, "the crash loop", |p| {
        matches!(p, Phase::CrashLooping { .. })
    })
    .await;
    std::fs::write(&fixed, "").expect("fix it");
    // The next attempt is 10 s away; a restart does not wait for it (and
    // does not return only because `sleep` serves no health check).
    let restart = tokio::time::timeout(
        Duration::from_secs(2),
        driver.restart(RestartRequest::default()),
    )
    .await;
    assert!(restart.is_err(), "sleep never serves, so the restart waits");
    running_pid(&driver).await;
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_program_missing_for_a_moment_is_retried_within_the_cap() {
    // An upgrade by rename: the program is missing for a moment. Every
    // spawn error counts as one failed start, like an exit.
    let dir = tempfile::tempdir().expect("temp dir");
    let program = dir.path().join("backend");
    let config = config(program.to_str().expect("utf-8"), &[], |c| {
        c.crash_loop_cap = 50;
        c.restart.cap = Duration::from_millis(20);
    });
    let keeper = Arc::new(Keeper::new(config, record_path(dir.path())).expect("keeper"));
    let driver = LocalDriver::new(keeper, EventSink::discarding().await);
    driver.ensure_running().await.expect("the loop starts");
    let phase = wait_phase(&driver, "a failed start", |p| {
        matches!(p, Phase::BackingOff { .. })
    })
    .await;
    let Phase::BackingOff { last_exit, .. } = phase else {
        unreachable!()
    };
    assert!(last_exit.starts_with("cannot run "), "{last_exit}");
    assert!(last_exit.contains("No such file"), "{last_exit}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let temp = dir.path().join("backend.new");
    std::fs::write(&temp, "#!/bin/sh\nexec sleep 1000\n").expect("write");
    std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::rename(&temp, &program).expect("rename into place");
    running_pid(&driver).await;
    driver.stop(StopReason::Exiting).await.expect("stops");
}

/// Run by [`a_spawn_that_meets_emfile_is_retried`] in a process of its own,
/// whose open-file limit it may exhaust.
#[tokio::test]
#[ignore = "run by a_spawn_that_meets_emfile_is_retried in its own process"]
async fn emfile_child() {
    if std::env::var_os("CASCADE_TEST_EMFILE_CHILD").is_none() {
        return;
    }
    let (driver, _events) = driver("exec sleep 1000", |c| {
        c.crash_loop_cap = 1000;
        c.restart.cap = Duration::from_millis(20);
    })
    .await;
    // Every descriptor taken: the spawn's pipes cannot be made.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        256.min(hard),
        hard,
    )
    .expect("setrlimit");
    let mut hog = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        hog.push(file);
    }
    driver.ensure_running().await.expect("the loop starts");
    let phase = wait_phase(&driver, "a failed start", |p| {
        matches!(p, Phase::BackingOff { .. })
    })
    .await;
    let Phase::BackingOff { last_exit, .. } = phase else {
        unreachable!()
    };
    assert!(last_exit.contains("os error 24"), "{last_exit}");
    // Still retrying, not given up, after many more attempts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(driver.phase(), Phase::BackingOff { .. }),
        "{:?}",
        driver.phase()
    );
    drop(hog);
    running_pid(&driver).await;
    driver.stop(StopReason::Exiting).await.expect("stops");
    println!("EMFILE-CHILD-PASSED");
}

#[tokio::test]
async fn a_spawn_that_meets_emfile_is_retried() {
    let out = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "tiers::local::tests::emfile_child",
            "--ignored",
            "--nocapture",
        ])
        .env("CASCADE_TEST_EMFILE_CHILD", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the child test finishes")
        .expect("the child test runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("EMFILE-CHILD-PASSED"),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert_eq!(driver.phase(), Phase::NotStarted);
}

#[tokio::test]
async fn stop_terminates_the_whole_group_and_kills_what_ignores_sigterm() {
    // The shell ignores SIGTERM and has a grandchild in its group; it
    // creates the marker once the trap is in place.
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("trapped");
    let script = format!(
        "trap '' TERM; sleep 1000 & touch {}; sleep 1000",
        marker.display()
    );
    let (driver, _events) = driver(&script, |_| {}).await;
    driver.ensure_running().await.expect("spawns");
    let pid = running_pid(&driver).await;
    crate::resilience::poll_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        "the trap",
        || std::future::ready(marker.exists().then_some(())),
    )
    .await
    .expect("the script sets its trap");
    assert!(group_alive(pid));
    let started = tokio::time::Instant::now();
    driver.stop(StopReason::Exiting).await.expect("stops");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGKILL came before the grace period"
    );
    assert!(!group_alive(pid), "a process of the group survived");
    assert_eq!(driver.phase(), Phase::Stopped);
}

#[tokio::test]
async fn a_process_stopped_by_a_signal_is_killed_without_waiting_for_the_grace() {
    let (driver, _events) = driver("exec sleep 1000", |c| {
        c.stop_grace = Duration::from_secs(20);
    })
    .await;
    driver.ensure_running().await.expect("spawns");
    let pid = running_pid(&driver).await;
    signal(pid, Signal::SIGSTOP);
    crate::resilience::poll_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        "the stop",
        || async move { client::is_stopped(pid).await.then_some(()) },
    )
    .await
    .expect("the process stops");
    let report = driver
        .restart(RestartRequest {
            force: false,
            dry_run: true,
        })
        .await
        .expect("plans");
    assert!(
        report.plan[0].contains("SIGKILL: it is stopped by a signal"),
        "{:?}",
        report.plan
    );
    let started = tokio::time::Instant::now();
    driver.stop(StopReason::Exiting).await.expect("stops");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?} on a process that cannot answer SIGTERM",
        started.elapsed()
    );
    assert!(!group_alive(pid));
}

#[tokio::test]
async fn the_start_phase_replaces_a_stopped_backend_at_once() {
    let tier = Tier::new(python_backend(|c| {
        c.stop_grace = Duration::from_secs(60);
        c.start_timeout = Duration::from_secs(45);
    }));
    let (driver, mut events) = tier.driver().await;
    driver.start().await.expect("python serves");
    let pid = pid_of(&driver).expect("a pid");
    signal(pid, Signal::SIGSTOP);
    // A stopped process is not coming up: it is killed and replaced without
    // the SIGTERM grace (60 s), however slow python is to start again.
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(50), driver.start())
        .await
        .expect("in time")
        .expect("a new backend serves");
    assert!(started.elapsed() < Duration::from_secs(50));
    let new = pid_of(&driver).expect("a pid");
    assert_ne!(new, pid);
    assert!(!group_alive(pid));
    let mut restarted = false;
    while let Ok(event) = events.try_recv() {
        restarted |= matches!(event, DriverEvent::BackendRestarted { .. });
    }
    assert!(restarted, "the start phase's restart is reported");
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_backend_stopped_by_a_signal_while_it_comes_up_is_replaced() {
    let tier = Tier::new(python_backend(|c| {
        c.args[1] = format!("sleep 1; {}", c.args[1]);
        c.stop_grace = Duration::from_secs(60);
        c.start_timeout = Duration::from_secs(45);
    }));
    let (driver, _events) = tier.driver().await;
    let starting = tokio::spawn({
        let driver = driver.clone();
        async move { driver.start().await }
    });
    // Stopped after the start phase's first look, while it waits for the
    // process to serve: it will never serve, so it is replaced.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = pid_of(&driver) {
            break pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "no process");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    signal(pid, Signal::SIGSTOP);
    tokio::time::timeout(Duration::from_secs(50), starting)
        .await
        .expect("in time")
        .expect("the start task")
        .expect("a new backend serves");
    assert_ne!(pid_of(&driver), Some(pid));
    assert!(!group_alive(pid));
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_process_that_exits_is_gone_at_once_and_restarted() {
    let (driver, mut events) = driver("sleep 0.3; exit 0", |c| {
        c.crash_loop_cap = 100;
        c.restart.base = Duration::from_millis(400);
        c.restart.cap = Duration::from_millis(400);
    })
    .await;
    driver.ensure_running().await.expect("spawns");
    let first = running_pid(&driver).await;
    wait_phase(&driver, "the exit", |p| {
        matches!(p, Phase::BackingOff { .. })
    })
    .await;
    match driver.probe().await {
        ProbeOutcome::Gone { reason } => {
            assert!(reason.contains("exit code 0"), "{reason}");
            assert!(reason.contains("next attempt in 400ms"), "{reason}");
        }
        other => panic!("expected Gone, got {other:?}"),
    }
    assert!(driver.endpoints().is_empty(), "nothing serves");
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
    assert_eq!(
        driver.endpoints(),
        vec![Endpoint::new(
            format!("pid {second}"),
            driver.keeper.config.endpoint()
        )]
    );
    assert!(driver.details()["recent_exits"].contains("exit code 0"));
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn the_start_phase_skips_the_rest_of_a_backoff() {
    // A backoff of 30 s after the first exit; the start phase does not wait it out.
    let dir = tempfile::tempdir().expect("temp dir");
    let ran = dir.path().join("ran");
    let script = format!(
        "if [ -e '{ran}' ]; then exec sleep 1000; fi; touch '{ran}'; exit 1",
        ran = ran.display()
    );
    let (driver, _events) = driver(&script, |c| {
        c.restart.base = Duration::from_secs(30);
        c.restart.cap = Duration::from_secs(30);
    })
    .await;
    driver.ensure_running().await.expect("spawns");
    wait_phase(&driver, "the backoff", |p| {
        matches!(p, Phase::BackingOff { .. })
    })
    .await;
    // `sleep` never serves, so start() would wait; the process runs anyway.
    let start = driver.start();
    tokio::pin!(start);
    let ran_again = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::select! {
            _ = &mut start => panic!("sleep cannot be ready"),
            pid = running_pid(&driver) => pid,
        }
    })
    .await;
    assert!(ran_again.is_ok(), "the backoff was waited out");
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

/// Answers every connection with HTTP 200, from this test process.
async fn stranger(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the port");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await;
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    })
}

#[tokio::test]
async fn a_port_held_by_another_process_is_refused_naming_it() {
    let (driver, _events) = driver("exec sleep 1000", |c| c.crash_loop_cap = 1000).await;
    let port = driver.keeper.config.port;
    let holder = stranger(port).await;
    driver.ensure_running().await.expect("the loop starts");
    let phase = wait_phase(&driver, "a refusal", |p| {
        matches!(p, Phase::BackingOff { .. })
    })
    .await;
    let Phase::BackingOff { last_exit, .. } = phase else {
        unreachable!()
    };
    let me = std::process::id();
    assert!(
        last_exit.starts_with(&format!("port {port} is held by pid {me} (")),
        "{last_exit}"
    );
    assert!(matches!(driver.probe().await, ProbeOutcome::Gone { .. }));
    holder.abort();
    let _ = holder.await;
    running_pid(&driver).await;
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_health_check_answered_by_another_process_does_not_count() {
    let (driver, _events) = driver("exec sleep 1000", |c| c.health_path = "/".into()).await;
    driver.ensure_running().await.expect("spawns");
    let pid = running_pid(&driver).await;
    // The child never binds; a stranger answers on its port.
    let holder = stranger(driver.keeper.config.port).await;
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            let me = std::process::id();
            assert!(
                error.contains(&format!("is answered by pid {me} (")),
                "{error}"
            );
            assert!(
                error.contains(&format!("not by the backend's process group {pid}")),
                "{error}"
            );
        }
        other => panic!("expected Down, got {other:?}"),
    }
    let start = tokio::time::timeout(Duration::from_millis(500), driver.start()).await;
    assert!(start.is_err(), "a stranger's answer is no readiness");
    holder.abort();
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_backend_serving_on_its_own_socket_probes_up() {
    let tier = Tier::new(python_backend(|_| {}));
    let (driver, _events) = tier.driver().await;
    driver.start().await.expect("python serves");
    let pid = pid_of(&driver).expect("a pid");
    assert_eq!(
        driver.probe().await,
        ProbeOutcome::Up {
            note: format!("ready (pid {pid})")
        }
    );
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_dropped_driver_leaves_its_backend_to_the_next_one() {
    let tier = Tier::new(python_backend(|_| {}));
    let (first, _events) = tier.driver().await;
    first.start().await.expect("python serves");
    let pid = pid_of(&first).expect("a pid");
    // The tier actor dies (a panic, a kill): its driver is dropped.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(group_alive(pid), "dropping a driver stopped its backend");
    // Its successor adopts the same process, and hears about it.
    let (second, mut events) = tier.driver().await;
    assert_eq!(
        second.probe().await,
        ProbeOutcome::Up {
            note: format!("ready (pid {pid})")
        }
    );
    signal(pid, Signal::SIGKILL);
    let restarted = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(DriverEvent::BackendRestarted { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(restarted.is_ok(), "the successor hears of the restart");
    second.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn a_killed_tier_actor_is_replaced_without_touching_the_backend() {
    use crate::supervisor::{self, RootMsg};
    let tier = Tier::new(python_backend(|c| {
        c.probe = ProbeConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
        };
    }));
    let waterfall = crate::waterfall::WaterfallConfig {
        order: vec![TierId::Local],
        ..Default::default()
    };
    let supervisor = crate::supervisor::SupervisorConfig {
        restart_backoff: BackoffConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(20),
            ..BackoffConfig::default()
        },
        ..Default::default()
    };
    let mut running = supervisor::start(
        vec![tier.spec.clone()],
        waterfall,
        supervisor,
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    let healthy = |s: &supervisor::Snapshot| {
        s.active == Some(TierId::Local) && s.tiers[0].status.state == TierState::Healthy
    };
    let snap = tokio::time::timeout(Duration::from_secs(20), running.snapshots.wait_for(healthy))
        .await
        .expect("local becomes active")
        .expect("snapshots")
        .clone();
    let pid = snap.tiers[0].status.details["pid"].clone();
    // Requests go on throughout, straight to the backend.
    let url = format!("{}/", tier_config_endpoint(&snap));
    let traffic = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let (mut ok, mut failed) = (0u32, Vec::new());
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => ok += 1,
                Ok(r) => failed.push(r.status().to_string()),
                Err(e) => failed.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed)
    });
    let children = running.root.get_children();
    assert_eq!(children.len(), 1);
    let killed = Instant::now();
    children[0].kill();
    let snap = tokio::time::timeout(
        Duration::from_secs(10),
        running
            .snapshots
            .wait_for(|s| s.tiers[0].actor_restarts == 1 && healthy(s)),
    )
    .await
    .expect("the tier is back")
    .expect("snapshots")
    .clone();
    println!(
        "tier actor killed → healthy again after {:?}",
        killed.elapsed()
    );
    let status = &snap.tiers[0].status;
    assert_eq!(status.details["pid"], pid, "the backend was replaced");
    let (ok, failed) = traffic.await.expect("traffic");
    assert!(ok > 10 && failed.is_empty(), "{ok} ok, failed: {failed:?}");
    let _ = running
        .root
        .call(RootMsg::Shutdown, Some(Duration::from_secs(5)))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), running.exit).await;
    let pid: u32 = pid.parse().expect("a pid");
    assert!(!group_alive(pid), "shutdown stops the backend");
}

fn tier_config_endpoint(snap: &crate::supervisor::Snapshot) -> String {
    snap.tiers[0].status.endpoint.clone().expect("an endpoint")
}

#[tokio::test]
async fn what_an_earlier_run_left_is_ended_before_the_next_start() {
    // A process group as a cascade killed by SIGKILL would leave it: a
    // grandchild of a shell that forked, recorded in the state directory.
    let tier = Tier::new(config("/bin/sh", &["-c", "exec sleep 1000"], |_| {}));
    use std::os::unix::process::CommandExt;
    let mut orphan = std::process::Command::new("/bin/sh")
        .args(["-c", "sleep 1000 & wait"])
        .process_group(0)
        .spawn()
        .expect("spawn the orphan");
    let pgid = orphan.id();
    // Reaped as init would, so its end is seen.
    let reaper = std::thread::spawn(move || orphan.wait());
    client::write_record(record_path(tier.state.path()), pgid)
        .await
        .expect("recorded");
    let (driver, _events) = tier.driver().await;
    let started = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if pid_of(&driver).is_some() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), driver.start()).await;
        }
    })
    .await;
    assert!(started.is_ok(), "the tier's own process runs");
    let _ = reaper.join();
    assert!(!group_alive(pgid), "the recorded group was left running");
    let record = std::fs::read_to_string(record_path(tier.state.path())).expect("a record");
    let own = pid_of(&driver).expect("a pid");
    assert!(record.contains(&format!("\"pgid\":{own}")), "{record}");
    driver.stop(StopReason::Exiting).await.expect("stops");
    assert!(
        !record_path(tier.state.path()).exists(),
        "a clean stop removes the record"
    );
}

#[tokio::test]
async fn a_record_of_a_group_that_is_gone_is_ignored() {
    let tier = Tier::new(config("/bin/sh", &["-c", "exec sleep 1000"], |_| {}));
    // This test process is alive, but it is no group leader with this start
    // time: a record naming it must not make the tier kill it.
    let me = std::process::id();
    std::fs::create_dir_all(record_path(tier.state.path()).parent().unwrap()).unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let record = client::GroupRecord {
        pgid: me,
        starttime: 1,
        boot_id: boot.trim().to_owned(),
    };
    std::fs::write(
        record_path(tier.state.path()),
        serde_json::to_string(&record).unwrap(),
    )
    .unwrap();
    let (driver, _events) = tier.driver().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), driver.start()).await;
    assert!(pid_of(&driver).is_some());
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[tokio::test]
async fn floods_of_output_stay_small_in_reports() {
    // 25 lines of 1 MB, then a \r-only "progress bar" of 2 MB, then exit.
    let script = "for i in $(seq 25); do head -c 1000000 /dev/zero | tr '\\0' x >&2; echo >&2; done; \
                  head -c 2000000 /dev/zero | tr '\\0' '\\r' >&2; exit 3";
    let (driver, _events) = driver(script, |c| {
        c.crash_loop_cap = 0;
        c.restart.base = Duration::from_secs(10);
        c.restart.cap = Duration::from_secs(10);
    })
    .await;
    let error = tokio::time::timeout(Duration::from_secs(30), driver.start())
        .await
        .expect("in time")
        .expect_err("exits");
    let text = error.to_string();
    assert!(text.contains("stderr tail: xxx"), "{}", &text[..200]);
    assert!(text.len() < 1500, "a crash report of {} bytes", text.len());
    let details: usize = driver.details().values().map(String::len).sum();
    assert!(details < 4096, "details of {details} bytes");
}

#[test]
fn lines_end_at_newlines_and_carriage_returns_and_are_cut() {
    let mut lines = Lines::default();
    let got = lines.push(b"one\r\ntwo\rthr");
    let text: Vec<String> = got
        .iter()
        .map(|l| String::from_utf8_lossy(&l.bytes).into_owned())
        .collect();
    assert_eq!(text, ["one", "two"]);
    let got = lines.push(b"ee\n");
    assert_eq!(got[0].bytes, b"three");
    // 150 MB without a newline: never more than one line's worth is held.
    let chunk = vec![b'y'; 1 << 20];
    for _ in 0..150 {
        assert!(lines.push(&chunk).is_empty());
    }
    let last = lines.finish().expect("the cut line");
    assert_eq!(last.bytes.len(), client::LINE_MAX);
    assert!(last.cut);
    assert_eq!(lines.finish(), None);
}

#[test]
fn the_log_budget_admits_a_bounded_number_per_second_and_counts_the_rest() {
    let t0 = tokio::time::Instant::now();
    let mut budget = LogBudget::new(3);
    let admitted = (0..10).filter(|_| budget.admit(t0)).count();
    assert_eq!(admitted, 3);
    assert_eq!(budget.take_dropped(t0), None, "the window is not over");
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(budget.take_dropped(t1), Some(7));
    assert!(budget.admit(t1));
}

#[test]
fn a_quoted_tail_keeps_the_most_recent_lines_within_its_budget() {
    let lines: Vec<String> = ["a", "bb", "ccc"].map(String::from).into();
    assert_eq!(supervise::quote_tail(&lines, 100), "a | bb | ccc");
    assert_eq!(supervise::quote_tail(&lines, 12), "bb | ccc");
    assert_eq!(
        supervise::quote_tail(&["x".repeat(50)], 10),
        format!("{}…", "x".repeat(10))
    );
}

#[tokio::test]
async fn dry_run_restart_changes_nothing_and_shows_no_secret_argument() {
    // `sleep` itself refuses unknown options: the secret rides on a no-op.
    let (driver, _events) = driver(": --token s3cr3t; sleep 1000", |c| {
        c.args.push("--api-key".into());
        c.args.push("hunter2".into());
    })
    .await;
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
    let plan = report.plan.join("\n");
    assert!(
        !plan.contains("s3cr3t") && !plan.contains("hunter2"),
        "{plan}"
    );
    assert!(plan.contains("start `/bin/sh -c"), "{plan}");
    assert_eq!(running_pid(&driver).await, pid);
    assert!(group_alive(pid));
    driver.stop(StopReason::Exiting).await.expect("stops");
}

#[test]
fn the_crash_loop_ceiling_and_the_stderr_tail_are_validated() {
    let config = LocalConfig {
        crash_loop_ceiling: Duration::from_secs(30),
        stderr_tail_lines: 1000,
        ..LocalConfig::default()
    };
    let problems = config.validate();
    assert!(
        problems.contains(&(
            "crash_loop_ceiling".into(),
            "must be at least restart.cap (1m)".into()
        )),
        "{problems:?}"
    );
    assert!(
        problems.contains(&("stderr_tail_lines".into(), "must be at most 200".into())),
        "{problems:?}"
    );
    assert!(LocalConfig::default().validate().is_empty());
}
