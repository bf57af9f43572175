//! cascade's own life and death: no orphan backend when it is SIGKILLed,
//! graceful SIGTERM/SIGINT shutdown, and a second signal forcing exit 130
//! (also when nobody reads cascade's stderr).

use std::time::{Duration, Instant};

use crate::support::{
    BIN, Cascade, KillOnDrop, SHORT, Setup, Signal, backend_pid, cli, describe_exit, http_client,
    http_get, local_tier, process_gone, send_signal, wait_for, wait_gone,
};

#[tokio::test]
async fn sigkill_of_cascade_leaves_no_orphan_backend() {
    let mut cascade = Cascade::start_ready(Setup::default()).await;
    let backend = cascade.wait_backend_pid().await;

    cascade.signal(Signal::Kill);
    let status = cascade
        .wait_exit(SHORT)
        .await
        .expect("cascade dies on SIGKILL");
    assert_eq!(describe_exit(status), "signal 9");

    // The parent-death signal kills the backend; init reaps it asynchronously.
    wait_gone(backend, SHORT, "the backend to die with cascade").await;

    // The API file is stale now; the CLI must say it cannot reach cascade.
    let out = cli(&["status", "--state-dir", cascade.state_dir_str()], &[]).await;
    assert_eq!(out.code, Some(69), "{}", out.describe());
    assert!(
        out.stderr.contains("cannot reach cascade"),
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn backend_respawned_after_a_crash_also_dies_with_cascade() {
    let mut cascade = Cascade::start_ready(Setup::default()).await;
    let first = cascade.wait_backend_pid().await;
    send_signal(first, Signal::Kill);
    let tier = cascade
        .wait_local("a respawned backend", SHORT, |t| {
            backend_pid(t).is_some_and(|p| p != first)
        })
        .await;
    let second = backend_pid(&tier).expect("checked above");

    cascade.signal(Signal::Kill);
    cascade
        .wait_exit(SHORT)
        .await
        .expect("cascade dies on SIGKILL");
    wait_gone(second, SHORT, "the respawned backend to die with cascade").await;
}

/// Sends `signal` to a ready cascade and checks it stops its backend and exits 0.
async fn shuts_down_gracefully_on(signal: Signal) {
    let mut cascade = Cascade::start_ready(Setup::default()).await;
    let backend = cascade.wait_backend_pid().await;

    let sent = Instant::now();
    cascade.signal(signal);
    let status = cascade
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "cascade still runs 10s after signal {signal:?}:\n{}",
                cascade.log_tail()
            )
        });
    assert_eq!(
        status.code(),
        Some(0),
        "{}\n{}",
        describe_exit(status),
        cascade.log_tail()
    );
    // stop_grace is 500ms and the demo backend stops at once on SIGTERM.
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        sent.elapsed()
    );

    // cascade waited for its backend before exiting: it is gone already.
    assert!(
        process_gone(backend),
        "backend {backend} outlived a graceful shutdown"
    );
    assert!(
        !cascade.state_dir.join("api").exists(),
        "STATE_DIR/api must be removed on shutdown"
    );

    let logs = cascade.logs();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("--log-format json wrote a non-JSON line ({e}): {line}"));
        assert!(
            value.get("message").is_some(),
            "log line without message: {line}"
        );
    }
    let stopped = logs
        .find("\"Tier stopped.\"")
        .expect("log says the tier stopped");
    let exited = logs
        .find("\"cascade stopped.\"")
        .expect("log says cascade stopped");
    assert!(stopped < exited, "tiers stop before cascade does:\n{logs}");
}

#[tokio::test]
async fn sigterm_stops_the_backend_and_exits_zero() {
    shuts_down_gracefully_on(Signal::Term).await;
}

#[tokio::test]
async fn sigint_stops_the_backend_and_exits_zero() {
    shuts_down_gracefully_on(Signal::Int).await;
}

#[tokio::test]
async fn second_signal_forces_exit_130() {
    // A backend that outlives SIGTERM, with a long grace: the first signal
    // leaves cascade waiting; the second must not.
    let mut cascade = Cascade::start_ready(Setup::slow_to_stop("30s")).await;
    let backend = cascade.wait_backend_pid().await;

    cascade.signal(Signal::Term);
    wait_for(SHORT, "cascade to start its shutdown", async || {
        if cascade.logs().contains("Signal received") {
            Ok(())
        } else {
            Err(cascade.log_tail())
        }
    })
    .await;
    // Once the group has had its SIGTERM, only the shell is left (the demo
    // backend under it has stopped); a second signal sooner would orphan the
    // demo backend (see `forced_exit_kills_the_backends_whole_process_group`).
    cascade.wait_endpoint_down(SHORT).await;
    assert!(
        cascade.try_exit().is_none(),
        "the backend ignores SIGTERM; cascade should still wait"
    );

    let sent = Instant::now();
    cascade.signal(Signal::Term);
    let status = cascade
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "second SIGTERM did not end cascade:\n{}",
                cascade.log_tail()
            )
        });
    assert_eq!(status.code(), Some(130), "{}", describe_exit(status));
    assert!(sent.elapsed() < Duration::from_secs(5));
    wait_gone(backend, SHORT, "the backend to die with cascade").await;
}

#[tokio::test]
async fn forced_exit_kills_the_backends_whole_process_group() {
    // The backend's own child ignores SIGTERM, like a worker of a service.
    let marks = tempfile::tempdir().expect("temp dir");
    let pid_file = marks.path().join("worker.pid");
    let script = format!(
        "trap '' TERM; sleep 300 & echo $! > '{pid_file}'; \
         '{bin}' demo-backend --port {{port}} & while :; do sleep 0.1; done",
        pid_file = pid_file.display(),
        bin = crate::support::BIN,
    );
    let setup = Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        stop_grace: "30s".into(),
        ..Setup::default()
    };
    let mut cascade = Cascade::start_ready(setup).await;
    let worker: i32 = std::fs::read_to_string(&pid_file)
        .expect("the backend wrote its worker's pid")
        .trim()
        .parse()
        .expect("a pid");
    let _cleanup = KillOnDrop(worker);

    cascade.signal(Signal::Term);
    cascade.wait_endpoint_down(SHORT).await;
    cascade.signal(Signal::Term);
    let status = cascade
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("second SIGTERM ends cascade");
    assert_eq!(status.code(), Some(130), "{}", describe_exit(status));
    wait_gone(
        worker,
        Duration::from_secs(3),
        "the backend's worker to die with cascade",
    )
    .await;
}

/// Starts cascade with the test-only fault hook set to `fault` and waits for
/// it to exit by itself once the local tier is active.
async fn failing_root(fault: &str) -> (Cascade, i32, std::process::ExitStatus) {
    let setup = Setup {
        env: vec![("CASCADE_TEST_FAULT".into(), fault.into())],
        ..Setup::default()
    };
    let mut cascade = Cascade::start(setup).await;
    let backend = cascade.wait_backend_pid().await;
    std::fs::write(cascade.state_dir.join("fault"), b"").expect("pull the trigger");
    let status = cascade
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("cascade still runs after {fault}:\n{}", cascade.log_tail()));
    (cascade, backend, status)
}

#[tokio::test]
async fn a_panicking_root_stops_the_backend_logs_the_panic_and_exits_70() {
    let (cascade, backend, status) = failing_root("root-panic").await;
    assert_eq!(
        status.code(),
        Some(70),
        "{}\n{}",
        describe_exit(status),
        cascade.log_tail()
    );
    assert!(
        process_gone(backend),
        "backend {backend} outlived the failed root"
    );
    let logs = cascade.logs();
    // The one plain line is the exit's summary for a person at a terminal.
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("cascade: "))
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a non-JSON line on stderr ({e}): {line}"))
        })
        .collect();
    let panic = lines
        .iter()
        .find(|l| l["message"] == "Panic.")
        .unwrap_or_else(|| panic!("the panic is not in the JSON log:\n{logs}"));
    assert_eq!(panic["level"], "ERROR", "{panic}");
    assert_eq!(panic["panic"], "injected root failure", "{panic}");
    let position = |message: &str| {
        logs.find(message)
            .unwrap_or_else(|| panic!("no {message} in the log:\n{logs}"))
    };
    assert!(
        position("\"Tier stopped.\"")
            < position("cascade: the root supervisor panicked: injected root failure; giving up"),
        "the tiers stop before the failure is reported:\n{logs}"
    );
    assert!(
        logs.trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("cascade: the root supervisor panicked")),
        "the summary is the last line on stderr:\n{logs}"
    );
}

#[tokio::test]
async fn a_root_that_vanishes_without_reporting_exits_70() {
    let (cascade, backend, status) = failing_root("root-kill").await;
    assert_eq!(
        status.code(),
        Some(70),
        "{}\n{}",
        describe_exit(status),
        cascade.log_tail()
    );
    assert!(
        cascade
            .logs()
            .contains("the root supervisor stopped without reporting why"),
        "{}",
        cascade.log_tail()
    );
    wait_gone(backend, SHORT, "the backend to end with cascade").await;
}

/// A pipe whose read end the test holds and never reads, filled to capacity
/// before cascade gets its write end as stderr: cascade's first write to it
/// would block.
fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::io::Write;
    let (reader, mut writer) = std::io::pipe().expect("create a pipe");
    let set = |writer: &std::io::PipeWriter, flags: OFlag| {
        fcntl(writer, FcntlArg::F_SETFL(flags)).expect("set pipe flags")
    };
    set(&writer, OFlag::O_NONBLOCK);
    let chunk = [b'x'; 4096];
    loop {
        match writer.write(&chunk) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("fill the pipe: {e}"),
        }
    }
    // cascade gets the pipe as a service manager would hand it over: blocking.
    set(&writer, OFlag::empty());
    (reader, writer)
}

#[tokio::test]
async fn a_second_signal_exits_130_even_when_nobody_reads_stderr() {
    let root = tempfile::Builder::new()
        .prefix("cascade-it-")
        .tempdir()
        .expect("temp dir");
    let state_dir = root.path().join("state");
    let port = crate::support::free_port();
    // The backend outlives SIGTERM (as in `second_signal_forces_exit_130`),
    // so the first signal leaves cascade waiting out a long grace.
    let config = root.path().join("cascade.toml");
    std::fs::write(&config, Setup::slow_to_stop("30s").render(&state_dir, port))
        .expect("write the config");
    let (unread, stderr) = full_pipe();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CASCADE_LOG", "info")
        .env("CASCADE_ROUTER__LISTEN", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn `cascade run`");
    let pid = child.id() as i32;
    // A cascade blocked on its stderr is killed when the test fails.
    let _cascade = KillOnDrop(pid);

    let api_file = state_dir.join("api");
    let api = wait_for(SHORT, "cascade to write STATE_DIR/api", async || {
        let text = std::fs::read_to_string(&api_file).map_err(|e| e.to_string())?;
        text.trim()
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("{text:?}: {e}"))
    })
    .await;
    let http = http_client();
    let shell = wait_for(SHORT, "the local tier to be healthy", async || {
        let (code, body) = http_get(&http, &format!("http://{api}/status")).await;
        let status: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{code} {e}: {body}"))?;
        let tier = local_tier(&status);
        match backend_pid(&tier) {
            Some(pid) if tier["state"] == "healthy" => Ok(pid),
            _ => Err(tier.to_string()),
        }
    })
    .await;
    let _shell = KillOnDrop(shell);

    send_signal(pid, Signal::Term);
    let health = format!("http://127.0.0.1:{port}/health");
    wait_for(
        SHORT,
        "the backend to stop listening",
        async || match http.get(&health).send().await {
            Err(_) => Ok(()),
            Ok(response) => Err(format!("{health} answered {}", response.status())),
        },
    )
    .await;
    assert!(
        child.try_wait().expect("wait on cascade").is_none(),
        "the backend ignores SIGTERM; cascade should still wait"
    );

    send_signal(pid, Signal::Term);
    let status = wait_for(
        Duration::from_secs(10),
        "the second SIGTERM to end cascade although its stderr is full",
        async || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("still running".to_owned()),
            Err(e) => Err(e.to_string()),
        },
    )
    .await;
    assert_eq!(status.code(), Some(130), "{}", describe_exit(status));
    wait_gone(shell, SHORT, "the backend to die with cascade").await;
    drop(unread);
}
