//! The status API and the client CLI against a running cascade: /healthz,
//! /readyz, /status, `cascade status`, `cascade restart`, and the bearer token.

use std::os::unix::fs::PermissionsExt;

use crate::support::{Cascade, SHORT, Setup, backend_pid, cli, process_gone};

#[tokio::test]
async fn health_readiness_and_status_describe_the_active_tier() {
    let cascade = Cascade::start_ready(Setup::default()).await;

    let (code, body) = cascade.get("/healthz").await;
    assert_eq!(code, 200);
    assert_eq!(body.trim(), "ok");

    let (code, ready) = cascade.get_json("/readyz").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["active"], "local");
    assert_eq!(ready["endpoint"], cascade.endpoint());

    let status = cascade.status().await;
    assert_eq!(status["active"], "local", "{status}");
    let decision = status["decision"].as_str().expect("decision is a string");
    assert!(decision.contains("active tier: local"), "{status}");
    let tiers = status["tiers"].as_array().expect("tiers is an array");
    assert_eq!(
        tiers.len(),
        1,
        "only the local tier is configured: {status}"
    );
    let tier = &tiers[0];
    assert_eq!(tier["tier"], "local");
    assert_eq!(tier["state"], "healthy");
    assert_eq!(tier["endpoint"], cascade.endpoint());
    assert_eq!(tier["breaker"], "closed");
    assert_eq!(tier["consecutive_failures"], 0);
    assert_eq!(tier["last_error"], serde_json::Value::Null);
    assert_eq!(tier["startable"], true);
    assert_eq!(tier["backend_restarts"], 0);
    assert_eq!(tier["active"], true);
    assert_eq!(tier["actor_restarts"], 0);
    let since = tier["since"].as_str().expect("since is a string");
    humantime::parse_rfc3339(since)
        .unwrap_or_else(|e| panic!("since {since:?} is not RFC 3339: {e}"));
    let pid = backend_pid(tier).expect("details.pid");
    let reason = tier["reason"].as_str().expect("reason is a string");
    assert!(
        reason.contains(&pid.to_string()),
        "reason names the pid: {tier}"
    );
}

#[tokio::test]
async fn cli_status_prints_a_table_marking_the_active_tier() {
    let cascade = Cascade::start_ready(Setup::default()).await;

    let out = cli(&["status", "--state-dir", cascade.state_dir_str()], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("active tier: local"),
        "{}",
        out.describe()
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("local"))
        .unwrap_or_else(|| panic!("no row for the local tier:\n{}", out.stdout));
    assert!(
        row.trim_start().starts_with('*'),
        "the active row is marked `*`: {row:?}"
    );
    assert!(row.contains("healthy"), "{row:?}");
    assert!(out.stdout.contains("TIER"), "table header: {}", out.stdout);
}

#[tokio::test]
async fn cli_status_json_is_the_status_document() {
    let cascade = Cascade::start_ready(Setup::default()).await;

    // With the config file too, as an operator would pass it.
    let config = cascade.config_path.to_str().expect("temp paths are UTF-8");
    let out = cli(
        &[
            "status",
            "--json",
            "--state-dir",
            cascade.state_dir_str(),
            "--config",
            config,
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let status: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`status --json` is not JSON ({e}):\n{}", out.stdout));
    assert_eq!(status["active"], "local", "{status}");
    let tier = &status["tiers"][0];
    assert_eq!(tier["tier"], "local");
    assert_eq!(tier["state"], "healthy");
    assert_eq!(backend_pid(tier), backend_pid(&cascade.local().await));
}

#[tokio::test]
async fn cli_restart_dry_run_prints_the_plan_and_changes_nothing() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let pid = cascade.wait_backend_pid().await;

    let out = cli(
        &[
            "restart",
            "local",
            "--dry-run",
            "--state-dir",
            cascade.state_dir_str(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("restart local (would)"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains(&format!("stop process group {pid}")),
        "{}",
        out.describe()
    );
    let health = format!("{}/health", cascade.endpoint());
    assert!(out.stdout.contains(&health), "{}", out.describe());

    // A real restart stops the old process before answering; this one did not.
    assert!(!process_gone(pid), "dry run killed the backend");
    let tier = cascade.local().await;
    assert_eq!(backend_pid(&tier), Some(pid), "{tier}");
    assert_eq!(tier["state"], "healthy", "{tier}");
}

#[tokio::test]
async fn cli_restart_replaces_the_backend_process() {
    // Rare probes: a probe failing while the old process stops triggers the
    // restart race of `restart_of_a_slow_to_stop_backend_ends_with_one_healthy_backend`
    // (ignored, a cascade bug); here only the restart itself is under test.
    let setup = Setup {
        probe_interval: "5s".into(),
        ..Setup::default()
    };
    let cascade = Cascade::start_ready(setup).await;
    let old = cascade.wait_backend_pid().await;

    let out = cli(
        &["restart", "local", "--state-dir", cascade.state_dir_str()],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("restart local (did)"),
        "{}",
        out.describe()
    );
    assert!(
        process_gone(old),
        "the old backend {old} survived the restart"
    );

    cascade
        .wait_local("a new healthy backend", SHORT, |t| {
            backend_pid(t).is_some_and(|p| p != old) && t["state"] == "healthy"
        })
        .await;
    cascade.wait_readyz(200, SHORT).await;
}

#[tokio::test]
async fn restart_without_the_right_token_is_refused_and_does_nothing() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let pid = cascade.wait_backend_pid().await;
    let token = cascade.token();
    let path = "/tiers/local/restart?force=true";

    for header in [
        None,
        Some("Bearer wrong".to_owned()),
        Some(format!("Bearer {token}x")),
        Some(format!("Basic {token}")),
        Some(token.clone()),
    ] {
        let (code, body) = cascade.post(path, header.as_deref()).await;
        assert_eq!(code, 401, "Authorization {header:?}: {body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains("token"),
            "{body}"
        );
    }
    assert!(!process_gone(pid), "a refused restart killed the backend");
    assert_eq!(backend_pid(&cascade.local().await), Some(pid));
}

#[tokio::test]
async fn restart_api_answers_per_tier() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let pid = cascade.wait_backend_pid().await;

    let (code, body) = cascade.post_authorized("/tiers/nonesuch/restart").await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("nonesuch"),
        "{body}"
    );

    // A known tier that this cascade does not run.
    let (code, body) = cascade.post_authorized("/tiers/docker/restart").await;
    assert_eq!(code, 409, "{body}");

    let (code, report) = cascade
        .post_authorized("/tiers/local/restart?dry_run=true&force=true")
        .await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["tier"], "local");
    assert_eq!(report["dry_run"], true);
    let plan = report["plan"].as_array().expect("plan is an array");
    assert!(
        plan.iter()
            .any(|s| s.as_str().unwrap_or_default().contains("SIGKILL")),
        "a forced plan kills: {report}"
    );
    assert_eq!(backend_pid(&cascade.local().await), Some(pid));
}

#[tokio::test]
async fn token_file_is_private() {
    let cascade = Cascade::start(Setup::default()).await;
    let token_path = cascade.state_dir.join("token");
    let mode = std::fs::metadata(&token_path)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "token mode {:o}", mode & 0o777);
    let dir_mode = std::fs::metadata(&cascade.state_dir)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(
        dir_mode & 0o777,
        0o700,
        "state dir mode {:o}",
        dir_mode & 0o777
    );
    let token = cascade.token();
    assert!(
        token.len() >= 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
        "{token:?}"
    );
}

#[tokio::test]
async fn listen_flag_overrides_the_configured_api_address() {
    let port = crate::support::free_port();
    let setup = Setup {
        run_args: vec!["--listen".into(), format!("127.0.0.1:{port}")],
        ..Setup::default()
    };
    let cascade = Cascade::start(setup).await;
    assert_eq!(
        cascade.api.port(),
        port,
        "STATE_DIR/api should hold the --listen address"
    );
    let (code, body) = cascade.get("/healthz").await;
    assert_eq!(code, 200, "{body}");
}
