//! The waterfall's start phase and choice of tier through the real binary:
//! a tier whose platform does not answer is not started, and the next one
//! serves within seconds; a standby tier is kept started while a better
//! one serves.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    BIN, Cascade, KillOnDrop, SHORT, Setup, backend_pid, free_port, local_tier, toml_str, wait_for,
};

fn tier(status: &Value, name: &str) -> Value {
    status["tiers"]
        .as_array()
        .and_then(|tiers| tiers.iter().find(|t| t["tier"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} tier in status: {status}"))
}

/// A Docker socket that accepts every connection and never answers, like a
/// wedged daemon. The connections are held until the test ends.
fn wedged_socket(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind the wedged socket");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            match conn {
                Ok(conn) => held.push(conn),
                Err(_) => return,
            }
        }
    });
}

#[tokio::test]
async fn a_wedged_docker_daemon_is_skipped_and_local_serves_within_seconds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("docker.sock");
    wedged_socket(&socket);
    let host = format!("unix://{}", socket.display());
    // Autoheal off: its own connection attempt to the wedged socket would
    // hold the docker client's connection slot past the probe's deadline,
    // and the probe must be the one to find the daemon not responding.
    let setup = Setup {
        order: vec!["docker".into(), "local".into()],
        ..Setup::default()
    }
    .extra(&format!(
        "[tiers.docker]\n\
         host = {host}\n\
         ping_timeout = \"300ms\"\n\
         autoheal = {{ enabled = false }}\n\
         start_timeout = \"60s\"\n\
         probe = {{ interval = \"200ms\", timeout = \"1s\" }}\n\
         \n\
         [[tiers.docker.containers]]\n\
         name = \"cascade-it-wedged\"\n\
         image = \"cascade-demo:it\"\n\
         ports = [\"{port}:8080\"]\n",
        host = toml_str(&host),
        port = free_port(),
    ));

    let began = Instant::now();
    let cascade = Cascade::start(setup).await;
    let router = cascade.router_addr().await;
    // The router holds a request while the start phase brings a tier up;
    // the first answer is the first request served.
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build an HTTP client");
    let response = http
        .get(format!("http://{router}/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /health through cascade: {e}\n{}", cascade.log_tail()));
    let served_after = began.elapsed();
    assert_eq!(response.status(), 200, "{}", cascade.log_tail());
    eprintln!("first request served {served_after:?} after cascade was started");
    // A generous bound for a loaded machine; the wait this replaces was the
    // docker tier's whole start deadline (60 s here).
    assert!(
        served_after < Duration::from_secs(20),
        "first request served only after {served_after:?}"
    );

    let status = wait_for(SHORT, "local active", async || {
        let status = cascade.status().await;
        if status["active"] == "local" {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let docker = tier(&status, "docker");
    assert_eq!(docker["startable"], false, "{docker}");
    assert!(
        docker["reason"]
            .as_str()
            .is_some_and(|r| r.contains("daemon not responding")),
        "{docker}"
    );
    let logs = cascade.logs();
    assert!(
        !logs.contains("asking docker to start"),
        "the start phase asked a tier whose daemon does not answer to start:\n{}",
        cascade.log_tail()
    );
    assert!(
        logs.contains("asking local to start"),
        "{}",
        cascade.log_tail()
    );
}

#[tokio::test]
async fn a_standby_local_tier_is_kept_started_while_a_better_tier_serves() {
    // The better tier: a demo backend the test runs, reached as an
    // unauthenticated Cloud Run service.
    let port = free_port();
    let mut better = Command::new(BIN)
        .args(["demo-backend", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the better tier's backend");
    let _kill = KillOnDrop(i32::try_from(better.id()).expect("pids fit i32"));
    let setup = Setup {
        order: vec!["cloud_run".into(), "local".into()],
        ..Setup::default()
    }
    .local("standby = true")
    .extra(&format!(
        "[tiers.cloud_run]\n\
         url = {url}\n\
         auth = \"none\"\n\
         probe = {{ interval = \"100ms\", timeout = \"500ms\" }}\n\
         breaker = {{ consecutive_failures = 1 }}\n",
        url = toml_str(&format!("http://127.0.0.1:{port}")),
    ));
    let cascade = Cascade::start(setup).await;

    // cloud_run serves, and local is started beside it and kept healthy.
    let status = wait_for(SHORT, "cloud_run active and local warm", async || {
        let status = cascade.status().await;
        let local = local_tier(&status);
        if status["active"] == "cloud_run" && local["state"] == "healthy" {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let local = local_tier(&status);
    assert_eq!(local["standby"], true, "{local}");
    assert_eq!(local["active"], false, "{local}");
    let warm_pid = backend_pid(&local).unwrap_or_else(|| panic!("no pid: {local}"));
    assert!(
        cascade
            .logs()
            .contains("Standby: asking local to start while cloud_run is active."),
        "{}",
        cascade.log_tail()
    );

    // The better tier goes away: the failover lands on the process that was
    // already running, with no start in between.
    better.kill().expect("kill the better tier's backend");
    let _ = better.wait();
    let status = wait_for(SHORT, "local active", async || {
        let status = cascade.status().await;
        if status["active"] == "local" {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let local = local_tier(&status);
    assert_eq!(backend_pid(&local), Some(warm_pid), "{local}");
    assert_eq!(
        cascade.logs().matches("asking local to start").count(),
        1,
        "local was started once, as the standby:\n{}",
        cascade.log_tail()
    );
}

#[tokio::test]
async fn a_start_that_does_not_come_up_within_start_patience_gets_the_next_tier_started() {
    if !crate::docker::engine() {
        return;
    }
    let _one = crate::docker::ONE_AT_A_TIME.lock().await;
    let name = format!("cascade-it-patience-{}", std::process::id());
    let _removed = crate::docker::Removed(name.clone());
    // The container runs but never passes its health check, so docker's
    // start waits out its whole minute unless the start phase moves on.
    let setup = Setup {
        order: vec!["docker".into(), "local".into()],
        waterfall: vec!["start_patience = \"1s\"".into()],
        ..Setup::default()
    }
    .extra(&format!(
        "[tiers.docker]\n\
         start_timeout = \"60s\"\n\
         stop_on_exit = true\n\
         probe = {{ interval = \"200ms\", timeout = \"1s\" }}\n\
         autoheal = {{ enabled = false }}\n\
         \n\
         [[tiers.docker.containers]]\n\
         name = \"{name}\"\n\
         image = \"{image}\"\n\
         health_path = \"/never\"\n\
         ports = [\"{port}:8080\"]\n\
         labels = {{ \"cascade.test\" = \"it\" }}\n",
        image = crate::docker::IMAGE,
        port = free_port(),
    ));

    let began = Instant::now();
    let cascade = Cascade::start(setup).await;
    let router = cascade.router_addr().await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build an HTTP client");
    let response = http
        .get(format!("http://{router}/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /health through cascade: {e}\n{}", cascade.log_tail()));
    let served_after = began.elapsed();
    assert_eq!(response.status(), 200, "{}", cascade.log_tail());
    assert_eq!(
        response
            .headers()
            .get("x-cascade-tier")
            .and_then(|v| v.to_str().ok()),
        Some("local")
    );
    eprintln!("first request served {served_after:?} after cascade was started");
    // Well below docker's start deadline (60 s), which is what the start
    // phase used to wait out.
    assert!(
        served_after < Duration::from_secs(30),
        "first request served only after {served_after:?}"
    );
    let logs = cascade.logs();
    let docker_asked = logs.find("asking docker to start");
    let local_asked = logs.find("asking local to start");
    assert!(
        docker_asked.is_some() && local_asked > docker_asked,
        "docker is asked first, local after its patience:\n{}",
        cascade.log_tail()
    );
    let status = cascade.status().await;
    assert_eq!(tier(&status, "docker")["state"], "starting", "{status}");
}
