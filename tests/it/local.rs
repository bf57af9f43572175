//! The local tier end to end with the demo backend: becoming active, restarts
//! after a crash, failing health, crash loops, the free-memory guard, and
//! operator restarts of backends that are slow to stop.

use std::time::Duration;

use crate::support::{
    Cascade, SHORT, Setup, Signal, backend_pid, http_client, http_get, process_gone, send_signal,
    wait_gone,
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
async fn crash_looping_backend_becomes_unavailable_with_its_exit_codes() {
    // The breaker is kept closed and start retries far apart, so this checks
    // crash-loop detection alone (see the ignored test below for the
    // interaction that restarts a given-up tier).
    let setup = Setup::demo(&["--exit-after", "0.05", "--exit-code", "3"])
        .local("crash_loop_cap = 2")
        .local(r#"restart = { base = "20ms", cap = "100ms", jitter = "none" }"#)
        .local("breaker = { consecutive_failures = 50, minimum_volume = 50 }")
        .extra(QUIET_START_RETRY);
    let cascade = Cascade::start(setup).await;

    let tier = cascade
        .wait_local("the tier to give up", SHORT, |t| {
            t["state"] == "unavailable"
        })
        .await;
    let reason = tier["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("crash loop"), "{tier}");
    assert!(reason.contains("exit code 3"), "{tier}");
    // The tail of the backend's stderr is quoted.
    assert!(reason.contains("exit-after elapsed"), "{tier}");
    assert_eq!(tier["last_error"], tier["reason"], "{tier}");
    // crash_loop_cap restarts, then no more processes.
    assert_eq!(tier["backend_restarts"], 2, "{tier}");
    assert!(
        backend_pid(&tier).is_none(),
        "a given-up tier runs nothing: {tier}"
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
    assert!(starts <= 2, "the tier was started {starts} times");
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
async fn tier_that_gave_up_is_not_started_again() {
    // First run: a healthy demo backend that exits after 300 ms. Every later
    // run crashes at once, so the restarts happen inside a start-phase start
    // (the first exit opens the breaker, which makes the tier unhealthy).
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
    .local("crash_loop_cap = 2")
    .local(r#"restart = { base = "100ms", cap = "200ms", jitter = "none" }"#)
    .local("breaker = { consecutive_failures = 1 }")
    .extra("[waterfall.start_retry]\nbase = \"100ms\"\ncap = \"200ms\"\njitter = \"none\"\n");
    let cascade = Cascade::start_ready(setup).await;

    crate::support::wait_for(SHORT, "the first give-up", async || {
        if cascade.logs().contains("\"Giving up on the process.\"") {
            Ok(())
        } else {
            Err(cascade.log_tail())
        }
    })
    .await;
    // Several start rounds (100-200 ms apart) later, nothing was spawned again.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        let tier = cascade.local().await;
        let restarts = tier["backend_restarts"].as_u64().unwrap_or_default();
        assert!(
            restarts <= 2,
            "more restarts than crash_loop_cap = 2: {tier}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gave_up = cascade
        .logs()
        .matches("\"Giving up on the process.\"")
        .count();
    assert_eq!(gave_up, 1, "the tier crash-looped {gave_up} times");
    assert_eq!(cascade.local().await["state"], "unavailable");
}
