//! The local tier end to end with the demo backend: becoming active, restarts
//! after a crash, failing health, crash loops and their recovery, the
//! free-memory guard, a port someone else holds or answers on, what a
//! forking backend leaves after a SIGKILL, output floods, and operator
//! restarts of backends that are slow to stop.

use std::time::Duration;

use crate::support::{
    Cascade, KillOnDrop, SHORT, Setup, Signal, backend_pid, http_client, http_get, process_gone,
    send_signal, wait_gone,
};

#[tokio::test]
async fn local_tier_becomes_active_and_serves_its_endpoint() {
    // The env map reaches the backend, with `{port}` replaced there too.
    let cascade =
        Cascade::start(Setup::default().local(r#"env = { DEMO_NAME = "it-{port}" }"#)).await;
    let tier = cascade.wait_ready().await;

    let (code, ready) = cascade.get_json("/readyz").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["active"], "local", "{ready}");
    assert_eq!(ready["endpoint"], cascade.endpoint(), "{ready}");

    assert_eq!(tier["state"], "healthy", "{tier}");
    assert_eq!(tier["breaker"], "closed", "{tier}");
    assert_eq!(tier["endpoint"], cascade.endpoint(), "{tier}");
    let pid = backend_pid(&tier).expect("a running backend has a pid");
    assert!(
        !process_gone(pid),
        "backend pid {pid} from status does not exist"
    );

    // The endpoint cascade advertises is the backend, answering its health check.
    let (code, body) = http_get(&http_client(), &format!("{}/health", cascade.endpoint())).await;
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("health is JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["name"], format!("it-{}", cascade.port), "{health}");
}

#[tokio::test]
async fn killed_backend_is_restarted() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let first = backend_pid(&cascade.local().await).expect("backend pid");

    send_signal(first, Signal::Kill);

    let tier = cascade
        .wait_local("a new healthy backend after SIGKILL", SHORT, |t| {
            backend_pid(t).is_some_and(|p| p != first)
                && t["state"] == "healthy"
                && t["backend_restarts"].as_u64() >= Some(1)
        })
        .await;
    let exits = tier["details"]["recent_exits"].as_str().unwrap_or_default();
    assert!(
        exits.contains("SIGKILL"),
        "recent_exits should name the kill: {tier}"
    );
    cascade.wait_readyz(200, SHORT).await;
    wait_gone(first, SHORT, "the killed backend to be reaped").await;
}

#[tokio::test]
async fn failing_health_makes_the_tier_unhealthy_and_not_ready() {
    // Healthy for 2 s (long enough to be seen active), then /health answers 503.
    let cascade = Cascade::start_ready(Setup::demo(&["--fail-health-after", "2"])).await;

    let tier = cascade
        .wait_local("the tier to stop serving", SHORT, |t| {
            t["state"] == "unhealthy" || t["breaker"] == "open"
        })
        .await;
    let error = tier["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("503"),
        "last_error should quote the failed check: {tier}"
    );

    let body = cascade.wait_readyz(503, SHORT).await;
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["active"], serde_json::Value::Null, "{body}");
    assert_eq!(cascade.status().await["active"], serde_json::Value::Null);
}

/// Start rounds far apart, so a failed start is not retried during a test.
const QUIET_START_RETRY: &str =
    "[waterfall.start_retry]\nbase = \"30s\"\ncap = \"30s\"\njitter = \"none\"\n";

#[tokio::test]
async fn a_crash_loop_is_reported_and_retried_until_its_cause_is_gone() {
    // Crashes until the marker exists. The breaker is kept closed and start
    // retries far apart, so the recovery is the crash loop's own retry.
    let marks = tempfile::tempdir().expect("temp dir");
    let mark = marks.path().join("fixed");
    let script = format!(
        "if [ ! -e '{mark}' ]; then echo exit-after elapsed >&2; exit 3; fi; \
         exec '{bin}' demo-backend --port {{port}}",
        mark = mark.display(),
        bin = crate::support::BIN,
    );
    let setup = Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        ..Setup::default()
    }
    .local("crash_loop_cap = 2")
    .local(r#"crash_loop_ceiling = "1s""#)
    .local(r#"restart = { base = "20ms", cap = "100ms", jitter = "none" }"#)
    .local("breaker = { consecutive_failures = 50, minimum_volume = 50 }")
    .extra(QUIET_START_RETRY);
    let cascade = Cascade::start(setup).await;

    let tier = cascade
        .wait_local("the crash loop", SHORT, |t| t["state"] == "unavailable")
        .await;
    let reason = tier["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("crash loop: "), "{tier}");
    assert!(reason.contains("exit code 3"), "{tier}");
    assert!(reason.contains("; next attempt at 20"), "{tier}");
    // The tail of the backend's stderr is quoted.
    assert!(reason.contains("exit-after elapsed"), "{tier}");
    assert_eq!(tier["details"]["crash_looping"], "true", "{tier}");
    assert!(
        tier["details"]["next_attempt"]
            .as_str()
            .is_some_and(|t| t.starts_with("20")),
        "{tier}"
    );
    assert!(
        backend_pid(&tier).is_none(),
        "a crash-looping tier runs nothing between attempts: {tier}"
    );
    let (code, body) = cascade.get_json("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("crash loop"),
        "readyz should say why: {body}"
    );

    // The cause goes away; nobody acts; the tier serves again.
    std::fs::write(&mark, "").expect("write the marker");
    cascade.wait_readyz(200, SHORT).await;
    cascade
        .wait_local("a healthy backend", SHORT, |t| t["state"] == "healthy")
        .await;
}

#[tokio::test]
async fn six_sigkills_in_a_row_do_not_leave_the_tier_down_for_good() {
    // The default restart schedule and crash-loop cap (5).
    let cascade = Cascade::start_ready(Setup::default()).await;
    let mut last = None;
    for _ in 0..6 {
        let tier = cascade
            .wait_local("a new backend", SHORT, |t| {
                backend_pid(t).is_some() && backend_pid(t) != last
            })
            .await;
        let pid = backend_pid(&tier).expect("checked above");
        send_signal(pid, Signal::Kill);
        last = Some(pid);
    }
    cascade
        .wait_local("the crash loop", SHORT, |t| {
            t["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("crash loop: 6 failed starts"))
        })
        .await;
    cascade
        .wait_local("a healthy backend again", SHORT, |t| {
            t["state"] == "healthy" && backend_pid(t) != last
        })
        .await;
    cascade.wait_readyz(200, SHORT).await;
}

#[tokio::test]
async fn a_port_held_for_a_few_seconds_delays_the_backend_only_that_long() {
    let port = crate::support::free_port();
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the port");
    let cascade = Cascade::start(Setup {
        port: Some(port),
        ..Setup::default()
    })
    .await;
    let me = std::process::id();
    let tier = cascade
        .wait_local("the port to be refused", SHORT, |t| {
            t["reason"]
                .as_str()
                .is_some_and(|r| r.contains(&format!("port {port} is held by pid {me} (")))
        })
        .await;
    assert_ne!(tier["state"], "healthy", "{tier}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(holder);
    cascade.wait_ready().await;
}

#[tokio::test]
async fn another_process_answering_on_the_port_is_never_taken_for_the_backend() {
    // A stranger serves a healthy /health on the tier's port before cascade
    // starts; the tier's own command never binds.
    let port = crate::support::free_port();
    let stranger = Reaped(
        std::process::Command::new(crate::support::BIN)
            .args(["demo-backend", "--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the stranger"),
    );
    let http = http_client();
    crate::support::wait_for(SHORT, "the stranger to serve", async || {
        match http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let cascade = Cascade::start(Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), "exec sleep 1000".into()],
        port: Some(port),
        ..Setup::default()
    })
    .await;
    let stranger_pid = stranger.0.id();
    cascade
        .wait_local("the stranger to be named", SHORT, |t| {
            t.to_string()
                .contains(&format!("port {port} is held by pid {stranger_pid} ("))
        })
        .await;
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        let tier = cascade.local().await;
        assert_ne!(tier["state"], "healthy", "{tier}");
        let (code, body) = cascade.get_json("/readyz").await;
        assert_eq!(code, 503, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child of the test, killed and reaped when dropped.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

#[tokio::test]
async fn what_a_forking_backend_left_after_a_sigkill_is_ended_at_the_next_start() {
    // The shell forks the backend (it has more to do after it), so the
    // backend is a grandchild: the parent-death signal reaches only the shell.
    let script = format!(
        "'{bin}' demo-backend --port {{port}}; echo done",
        bin = crate::support::BIN
    );
    let mut cascade = Cascade::start_ready(Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        ..Setup::default()
    })
    .await;
    let shell = backend_pid(&cascade.local().await).expect("a pid");
    let backend = crate::support::wait_for(SHORT, "the forked backend", async || {
        children_of(shell)
            .first()
            .copied()
            .ok_or_else(|| "no child yet".to_owned())
    })
    .await;
    let _kill = KillOnDrop(backend);

    cascade.signal(Signal::Kill);
    cascade.wait_exit(SHORT).await.expect("cascade dies");
    wait_gone(shell, SHORT, "the shell to die with cascade").await;
    assert!(!process_gone(backend), "the grandchild outlives cascade");

    cascade.respawn().await;
    wait_gone(backend, SHORT, "the orphan to be ended").await;
    let tier = cascade.wait_ready().await;
    assert_ne!(backend_pid(&tier), Some(shell), "{tier}");
}

#[tokio::test]
async fn a_backend_program_missing_for_two_seconds_is_retried() {
    // An upgrade by rename: the program is not there for 2 s.
    let dir = tempfile::tempdir().expect("temp dir");
    let program = dir.path().join("backend");
    let cascade = Cascade::start(Setup {
        command: program.to_str().expect("utf-8").into(),
        args: Vec::new(),
        ..Setup::default()
    })
    .await;
    let tier = cascade
        .wait_local("the failed start", SHORT, |t| {
            t.to_string().contains("No such file or directory")
        })
        .await;
    assert_ne!(tier["state"], "healthy", "{tier}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let temp = dir.path().join("backend.new");
    std::fs::write(
        &temp,
        format!(
            "#!/bin/sh\nexec '{}' demo-backend --port \"$PORT\"\n",
            crate::support::BIN
        ),
    )
    .expect("write the program");
    std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::rename(&temp, &program).expect("rename into place");
    cascade.wait_ready().await;
}

#[tokio::test]
async fn a_backend_flooding_its_output_keeps_status_small() {
    // 25 lines of 1 MB and 20 MB of a `\r`-only progress bar, then an exit.
    let script = "for i in $(seq 25); do head -c 1000000 /dev/zero | tr '\\0' x >&2; echo >&2; done; \
                  head -c 20000000 /dev/zero | tr '\\0' '\\r' >&2; exit 3";
    let cascade = Cascade::start(
        Setup {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Setup::default()
        }
        .local("crash_loop_cap = 0")
        .local(r#"restart = { base = "30s", cap = "30s", jitter = "none" }"#),
    )
    .await;
    let tier = cascade
        .wait_local("the crash loop", Duration::from_secs(30), |t| {
            t["state"] == "unavailable"
        })
        .await;
    assert!(
        tier["reason"]
            .as_str()
            .is_some_and(|r| r.contains("stderr tail: xxx")),
        "{}",
        &tier.to_string()[..400.min(tier.to_string().len())]
    );
    let (code, status) = cascade.get("/status").await;
    assert_eq!(code, 200);
    assert!(
        status.len() < 16 * 1024,
        "/status is {} bytes",
        status.len()
    );
}

#[tokio::test]
async fn low_free_memory_refuses_to_start_the_backend() {
    let cascade = Cascade::start(Setup::default().local(r#"min_free_memory = "1 PiB""#)).await;

    let tier = cascade
        .wait_local("the start to be refused", SHORT, |t| {
            let text = format!("{} {}", t["reason"], t["last_error"]);
            text.contains("refusing to start") && text.contains("min_free_memory")
        })
        .await;
    assert_ne!(tier["state"], "healthy", "{tier}");
    assert!(backend_pid(&tier).is_none(), "nothing may run: {tier}");

    // It stays that way: sample readiness across a start-retry round (1 s base).
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        let (code, body) = cascade.get_json("/readyz").await;
        assert_eq!(code, 503, "readyz must stay 503: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tier = cascade.local().await;
    assert!(backend_pid(&tier).is_none(), "nothing may run: {tier}");
}

#[tokio::test]
async fn restart_of_a_slow_to_stop_backend_ends_with_one_healthy_backend() {
    let cascade = Cascade::start_ready(Setup::slow_to_stop("1s")).await;
    let old = cascade.wait_backend_pid().await;

    let (code, body) = cascade.post_authorized("/tiers/local/restart").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        process_gone(old),
        "the old backend {old} survived the restart"
    );

    let tier = cascade
        .wait_local("a healthy new backend with a pid", SHORT, |t| {
            t["state"] == "healthy" && backend_pid(t).is_some_and(|p| p != old)
        })
        .await;
    let new = backend_pid(&tier).expect("checked above");
    // And it stays that way: no flapping, no second start.
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        let tier = cascade.local().await;
        assert_eq!(tier["state"], "healthy", "{tier}");
        assert_eq!(backend_pid(&tier), Some(new), "{tier}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let starts = cascade.logs().matches("\"Starting tier.\"").count();
    assert_eq!(
        starts, 1,
        "the start phase started the tier again after the restart"
    );
}

#[tokio::test]
async fn forced_restart_kills_without_waiting_for_stop_grace() {
    let cascade = Cascade::start_ready(Setup::slow_to_stop("5s")).await;
    let old = cascade.wait_backend_pid().await;

    let started = std::time::Instant::now();
    let (code, body) = cascade
        .post_authorized("/tiers/local/restart?force=true")
        .await;
    let took = started.elapsed();
    assert_eq!(code, 200, "{body}");
    assert!(
        process_gone(old),
        "the old backend {old} survived a forced restart"
    );
    assert!(
        took < Duration::from_millis(2500),
        "a forced restart waited {took:?} (stop_grace is 5s)"
    );
    assert!(
        !cascade.logs().contains("Child ignored SIGTERM"),
        "a forced restart sent SIGTERM first"
    );
}

#[tokio::test]
async fn status_shows_the_backend_pid_while_it_starts() {
    // A backend that needs 5 s before it listens, like a model loading.
    let cascade = Cascade::start(Setup::demo(&["--startup-delay-ms", "5000"])).await;
    let tier = cascade
        .wait_local("the starting backend's pid", Duration::from_secs(3), |t| {
            backend_pid(t).is_some()
        })
        .await;
    assert_eq!(tier["state"], "starting", "{tier}");
}

#[tokio::test]
async fn a_crash_looping_tier_waits_for_its_next_attempt_whatever_the_start_phase_does() {
    // First run: a healthy demo backend that exits after 300 ms; every later
    // run would crash at once. Past a cap of 0 the first exit is a crash
    // loop with its next attempt 5 s away; start rounds every 100-200 ms
    // must not bring it forward.
    let marks = tempfile::tempdir().expect("temp dir");
    let mark = marks.path().join("ran-once");
    let script = format!(
        "if [ -e '{mark}' ]; then echo boom >&2; exit 3; fi; touch '{mark}'; \
         exec '{bin}' demo-backend --port {{port}} --exit-after 0.3 --exit-code 3",
        mark = mark.display(),
        bin = crate::support::BIN,
    );
    let setup = Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        ..Setup::default()
    }
    .local("crash_loop_cap = 0")
    .local(r#"restart = { base = "5s", cap = "5s", jitter = "none" }"#)
    .local("breaker = { consecutive_failures = 1 }")
    .extra("[waterfall.start_retry]\nbase = \"100ms\"\ncap = \"200ms\"\njitter = \"none\"\n");
    let cascade = Cascade::start_ready(setup).await;

    cascade
        .wait_local("the crash loop", SHORT, |t| t["state"] == "unavailable")
        .await;
    // Several start rounds later, nothing was spawned again.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        let tier = cascade.local().await;
        assert_eq!(tier["state"], "unavailable", "{tier}");
        assert!(backend_pid(&tier).is_none(), "{tier}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = cascade.logs().matches("\"Process started.\"").count();
    assert_eq!(started, 1, "the backend was spawned {started} times");
}

#[tokio::test]
async fn a_backend_stopped_by_sigstop_is_replaced_without_waiting_out_the_grace() {
    let cascade = Cascade::start_ready(Setup {
        stop_grace: "10s".into(),
        ..Setup::default()
    })
    .await;
    let frozen = cascade.wait_backend_pid().await;
    let _kill = KillOnDrop(frozen);
    let stopped = std::time::Instant::now();
    send_signal(frozen, Signal::Stop);

    // Its probes fail, the start phase finds it stopped and replaces it at
    // once: no SIGTERM it could not answer, no 10 s grace.
    let tier = cascade
        .wait_local("a new healthy backend", SHORT, |t| {
            t["state"] == "healthy" && backend_pid(t).is_some_and(|p| p != frozen)
        })
        .await;
    let took = stopped.elapsed();
    wait_gone(frozen, SHORT, "the stopped backend to be killed").await;
    assert!(
        took < Duration::from_secs(8),
        "replacing a stopped backend took {took:?} (stop_grace is 10s): {tier}"
    );
    assert!(
        !cascade.logs().contains("Child ignored SIGTERM"),
        "a stopped backend was sent SIGTERM and waited for"
    );
    assert!(
        tier["backend_restarts"].as_u64() >= Some(1),
        "the start phase's restart is counted: {tier}"
    );
}
