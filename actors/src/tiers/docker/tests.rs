//! The docker tier's driver against the real Docker Engine: no mocks. Each
//! test uses its own container names and host ports, labels everything it
//! creates with [`TEST_LABEL`], and removes it on the way out. Autoheal is
//! off here: it watches every managed container on the engine, so one test's
//! autoheal would heal another test's deliberate recreations.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::config::{ContainerConfig, DockerConfig, HASH_LABEL, MANAGED_LABEL};
use super::connect::{DockerEnv, DockerError};
use super::driver::{DockerDriver, daemon_outcome};
use super::testing::{
    Cleanup, SlowDaemon, TEST_LABEL, WedgedDaemon, demo_image, docker, docker_available,
    eventually, free_port, inspect, unique,
};
use crate::contract::{Driver, EventSink, ProbeOutcome, RestartRequest, StopReason};
use crate::instance::Instance;

/// The instance these tests' drivers run as: one per test process.
fn instance() -> Instance {
    Instance::from_state_dir(
        &std::env::temp_dir().join(format!("cascade-docker-tests-{}", std::process::id())),
    )
}

async fn driver(config: DockerConfig) -> DockerDriver {
    driver_as(config, instance()).await
}

async fn driver_as(config: DockerConfig, instance: Instance) -> DockerDriver {
    let env = DockerEnv::default();
    DockerDriver::new(config, &env, instance, EventSink::discarding().await, None)
        .expect("driver builds")
}

/// A demo-backend container on host port `port`, labelled for cleanup.
fn service(name: &str, port: u16) -> ContainerConfig {
    ContainerConfig {
        name: name.into(),
        image: demo_image().into(),
        ports: vec![format!("{port}:8080")],
        labels: BTreeMap::from([(TEST_LABEL.to_owned(), "true".to_owned())]),
        stop_timeout: Duration::from_secs(1),
        ..ContainerConfig::default()
    }
}

fn with_env(mut c: ContainerConfig, key: &str, value: &str) -> ContainerConfig {
    c.env.insert(key.into(), value.into());
    c
}

fn config(containers: Vec<ContainerConfig>) -> DockerConfig {
    let mut config = DockerConfig {
        containers,
        start_timeout: Duration::from_secs(60),
        ..DockerConfig::default()
    };
    config.autoheal.enabled = false;
    config.probe.timeout = Duration::from_secs(3);
    config
}

fn id(name: &str) -> String {
    inspect(name, "{{.Id}}").unwrap_or_else(|| panic!("container {name} exists"))
}

fn started_at(name: &str) -> String {
    inspect(name, "{{.State.StartedAt}}").unwrap_or_else(|| panic!("container {name} exists"))
}

fn label(name: &str, key: &str) -> String {
    inspect(name, &format!("{{{{index .Config.Labels \"{key}\"}}}}")).unwrap_or_default()
}

async fn http_ok(port: u16) -> bool {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

fn error_of<T: std::fmt::Debug, E: ToString>(result: Result<T, E>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn start_from_nothing_creates_a_labelled_healthy_container_and_probes_up() {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-start");
    let port = free_port();
    let _cleanup = Cleanup(vec![name.clone()]);
    let d = driver(config(vec![service(&name, port)])).await;

    // A probe before the start creates nothing and asks for a start.
    match d.probe().await {
        ProbeOutcome::Idle { reason } => assert!(reason.contains("does not exist"), "{reason}"),
        other => panic!("expected Idle before the start, got {other:?}"),
    }
    assert_eq!(inspect(&name, "{{.Id}}"), None, "the probe created nothing");

    d.start().await.expect("starts");

    assert_eq!(label(&name, MANAGED_LABEL), "true");
    let hash = label(&name, HASH_LABEL);
    assert!(
        hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hash}"
    );
    assert_eq!(label(&name, TEST_LABEL), "true");
    assert_eq!(
        inspect(&name, "{{.State.Health.Status}}").as_deref(),
        Some("healthy")
    );
    assert_eq!(
        inspect(
            &name,
            "{{(index (index .HostConfig.PortBindings \"8080/tcp\") 0).HostIp}}"
        )
        .as_deref(),
        Some("127.0.0.1")
    );
    assert!(http_ok(port).await, "the health endpoint answers");
    assert_eq!(
        d.probe().await,
        ProbeOutcome::Up {
            note: "ready (daemon running, container healthy)".into()
        }
    );
    let details = d.details();
    assert_eq!(
        details
            .get(&format!("container.{name}.state"))
            .map(String::as_str),
        Some("running")
    );
    assert_eq!(
        details
            .get(&format!("container.{name}.health"))
            .map(String::as_str),
        Some("healthy")
    );

    // stop_on_exit off: the container is left to Docker ...
    let before = id(&name);
    d.stop(StopReason::Exiting).await.expect("stops");
    assert_eq!(
        inspect(&name, "{{.State.Running}}").as_deref(),
        Some("true")
    );
    drop(d);

    // ... and the next driver adopts it as is, then stops it when asked to.
    let mut next = config(vec![service(&name, port)]);
    next.stop_on_exit = true;
    let d = driver(next).await;
    d.start().await.expect("adopts");
    assert_eq!(
        id(&name),
        before,
        "a consistent container is adopted, not recreated"
    );
    d.stop(StopReason::Exiting).await.expect("stops");
    assert_eq!(
        inspect(&name, "{{.State.Running}}").as_deref(),
        Some("false")
    );
}

#[tokio::test]
async fn a_changed_env_recreates_that_container_and_leaves_its_consistent_sibling() {
    if !docker_available() {
        return;
    }
    let (a, b) = (unique("cascade-t-env-a"), unique("cascade-t-env-b"));
    let (pa, pb) = (free_port(), free_port());
    let _cleanup = Cleanup(vec![a.clone(), b.clone()]);
    let first = driver(config(vec![
        with_env(service(&a, pa), "USER_ID", "1000"),
        service(&b, pb),
    ]))
    .await;
    first.start().await.expect("starts");
    let (a_id, b_id, b_started) = (id(&a), id(&b), started_at(&b));
    drop(first);

    let second = driver(config(vec![
        with_env(service(&a, pa), "USER_ID", "1001"),
        service(&b, pb),
    ]))
    .await;
    let report = second
        .restart(RestartRequest::default())
        .await
        .expect("restarts");

    assert!(
        report.plan.contains(&format!(
            "recreate {a} because env USER_ID differs (1000 → 1001)"
        )),
        "{:?}",
        report.plan
    );
    assert!(
        report.plan.contains(&format!("keep {b} (consistent)")),
        "{:?}",
        report.plan
    );
    assert_ne!(id(&a), a_id, "the drifted container is new");
    let env = inspect(&a, "{{json .Config.Env}}").unwrap_or_default();
    assert!(env.contains("\"USER_ID=1001\""), "{env}");
    assert_eq!(id(&b), b_id, "the consistent sibling is the same container");
    assert_eq!(started_at(&b), b_started, "and was not restarted");
    assert!(http_ok(pa).await && http_ok(pb).await);
}

#[tokio::test]
async fn a_plain_restart_restarts_in_place_and_force_recreates() {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-force");
    let port = free_port();
    let _cleanup = Cleanup(vec![name.clone()]);
    let d = driver(config(vec![service(&name, port)])).await;
    d.start().await.expect("starts");
    let (first_id, first_started) = (id(&name), started_at(&name));

    // Nothing drifted: a plain restart is `docker restart` of the same container.
    let report = d
        .restart(RestartRequest::default())
        .await
        .expect("restarts");
    assert!(
        report.plan[0].starts_with(&format!("restart {name} (consistent")),
        "{:?}",
        report.plan
    );
    assert_eq!(id(&name), first_id);
    assert_ne!(started_at(&name), first_started);

    let report = d
        .restart(RestartRequest {
            force: true,
            dry_run: false,
        })
        .await
        .expect("force restarts");
    assert_eq!(report.plan, vec![format!("recreate {name} (forced)")]);
    assert_ne!(
        id(&name),
        first_id,
        "force recreates a consistent container"
    );
    assert!(http_ok(port).await);
}

#[tokio::test]
async fn a_dry_run_reports_the_plan_and_changes_nothing() {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-dry");
    let port = free_port();
    let _cleanup = Cleanup(vec![name.clone()]);
    driver(config(vec![with_env(
        service(&name, port),
        "USER_ID",
        "1000",
    )]))
    .await
    .start()
    .await
    .expect("starts");
    let (before_id, before_started) = (id(&name), started_at(&name));

    let d = driver(config(vec![with_env(
        service(&name, port),
        "USER_ID",
        "1001",
    )]))
    .await;
    let dry = RestartRequest {
        force: false,
        dry_run: true,
    };
    let report = d.restart(dry).await.expect("plans");
    assert!(report.dry_run);
    assert_eq!(
        report.plan,
        vec![format!(
            "recreate {name} because env USER_ID differs (1000 → 1001)"
        )]
    );
    let forced = d
        .restart(RestartRequest {
            force: true,
            dry_run: true,
        })
        .await
        .expect("plans");
    assert_eq!(forced.plan, vec![format!("recreate {name} (forced)")]);

    assert_eq!(id(&name), before_id);
    assert_eq!(started_at(&name), before_started);
    let env = inspect(&name, "{{json .Config.Env}}").unwrap_or_default();
    assert!(env.contains("\"USER_ID=1000\""), "{env}");
}

#[tokio::test]
async fn a_foreign_container_on_the_port_is_named_and_left_running() {
    if !docker_available() {
        return;
    }
    let (ours, foreign) = (unique("cascade-t-ours"), unique("cascade-t-foreign"));
    let port = free_port();
    let _cleanup = Cleanup(vec![ours.clone(), foreign.clone()]);
    let image = demo_image();
    let publish = format!("127.0.0.1:{port}:8080");
    docker(&[
        "run", "-d", "--name", &foreign, "--label", TEST_LABEL, "-p", &publish, image,
    ]);

    let d = driver(config(vec![service(&ours, port)])).await;
    let error = error_of(d.start().await);

    assert!(error.contains(&foreign), "names the container: {error}");
    assert!(error.contains(image), "names its image: {error}");
    assert!(error.contains(&port.to_string()), "names the port: {error}");
    assert_eq!(
        inspect(&foreign, "{{.State.Running}}").as_deref(),
        Some("true"),
        "the foreign container is untouched"
    );
    assert_eq!(inspect(&ours, "{{.Id}}"), None, "nothing was created");
}

#[tokio::test]
async fn stale_owned_containers_are_removed_and_replaced() {
    if !docker_available() {
        return;
    }
    let (name, stale) = (unique("cascade-t-svc"), unique("cascade-t-stale"));
    let port = free_port();
    let _cleanup = Cleanup(vec![name.clone(), stale.clone()]);
    let image = demo_image();
    let publish = format!("127.0.0.1:{port}:8080");
    let managed = format!("{MANAGED_LABEL}=true");
    let old_hash = format!("{HASH_LABEL}=0000000000000000");
    let ours = format!("{}={}", Instance::LABEL, instance().id());
    // Another name, running on the port: this instance's, left over from an
    // older config.
    docker(&[
        "run", "-d", "--name", &stale, "--label", &managed, "--label", &old_hash, "--label", &ours,
        "--label", TEST_LABEL, "-p", &publish, image,
    ]);
    // The configured name with an old hash (created, not running).
    let old_id = docker(&[
        "create", "--name", &name, "--label", &managed, "--label", &old_hash, "--label", &ours,
        "--label", TEST_LABEL, "-p", &publish, image,
    ]);

    let d = driver(config(vec![service(&name, port)])).await;
    d.start().await.expect("starts");

    assert_eq!(
        inspect(&stale, "{{.Id}}"),
        None,
        "the stale container is gone"
    );
    assert_ne!(id(&name), old_id, "the old-hash container was recreated");
    assert_ne!(label(&name, HASH_LABEL), "0000000000000000");
    assert_eq!(
        inspect(&name, "{{.State.Running}}").as_deref(),
        Some("true")
    );
    assert!(http_ok(port).await);
}

#[tokio::test]
async fn a_process_outside_docker_on_the_port_is_refused_with_the_port() {
    if !docker_available() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let name = unique("cascade-t-busy");
    let _cleanup = Cleanup(vec![name.clone()]);
    let d = driver(config(vec![service(&name, port)])).await;

    let error = error_of(d.start().await);

    assert!(
        error.contains(&format!("host port {port}:8080")) && error.contains("outside Docker"),
        "{error}"
    );
    assert!(
        error.contains(&format!("pid {}", std::process::id())),
        "names the process holding it: {error}"
    );
    assert_eq!(inspect(&name, "{{.Id}}"), None, "nothing was created");
    drop(listener);
}

#[tokio::test]
async fn a_daemon_that_accepts_and_never_answers_is_not_responding_within_the_bound() {
    if !docker_available() {
        return;
    }
    let wedged = WedgedDaemon::start();
    let mut c = config(vec![service("cascade-t-never-created", free_port())]);
    c.host = Some(wedged.host());
    c.ping_timeout = Duration::from_millis(300);
    let d = driver(c).await;

    let began = Instant::now();
    let outcome = d.probe().await;
    let took = began.elapsed();

    match outcome {
        ProbeOutcome::PlatformDown { error: reason } => {
            assert!(reason.starts_with("daemon not responding"), "{reason}")
        }
        other => panic!("expected PlatformDown, got {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "probe took {took:?}");
}

#[tokio::test]
async fn with_a_wedged_daemon_a_dry_run_answers_within_its_bound_and_nothing_negotiates_twice() {
    if !docker_available() {
        return;
    }
    let wedged = WedgedDaemon::start();
    let mut c = config(vec![service("cascade-t-never-created", free_port())]);
    c.host = Some(wedged.host());
    c.ping_timeout = Duration::from_millis(600);
    let d = driver(c).await;
    let dry = RestartRequest {
        force: false,
        dry_run: true,
    };

    // A probe, a start and a dry run at once: one negotiation runs, the
    // others wait for it within their own deadline and take its verdict.
    let began = Instant::now();
    let (probe, start, check) = tokio::join!(d.probe(), d.start(), async {
        let result = d.restart(dry).await;
        (result, began.elapsed())
    });
    assert!(
        matches!(&probe, ProbeOutcome::PlatformDown { error: reason } if reason.starts_with("daemon not responding")),
        "{probe:?}"
    );
    let error = error_of(start);
    assert!(error.contains("daemon not responding"), "{error}");
    let (result, took) = check;
    let error = error_of(result);
    assert!(error.starts_with("daemon not responding"), "{error}");
    assert!(
        took < Duration::from_millis(1100),
        "the dry run waited behind others' negotiations: {took:?}"
    );

    // Right after, the daemon is known not to answer: no new negotiation.
    let began = Instant::now();
    let error = error_of(d.restart(dry).await);
    let took = began.elapsed();
    assert!(error.starts_with("daemon not responding"), "{error}");
    assert!(
        took < Duration::from_millis(300),
        "a failed negotiation was tried again at once: {took:?}"
    );
}

#[tokio::test]
async fn a_slow_docker_api_is_degraded_while_the_service_answers_and_platform_down_when_it_does_not()
 {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-slow");
    let _cleanup = Cleanup(vec![name.clone()]);
    let slow = SlowDaemon::start();
    let mut c = config(vec![service(&name, free_port())]);
    c.host = Some(slow.host());
    c.ping_timeout = Duration::from_millis(400);
    c.probe.timeout = Duration::from_secs(2);
    let d = driver(c.clone()).await;
    d.start().await.expect("starts");
    assert!(matches!(d.probe().await, ProbeOutcome::Up { .. }));

    // Docker takes longer than ping_timeout; the service still answers.
    slow.set_delay(Duration::from_millis(1500));
    let began = Instant::now();
    let outcome = d.probe().await;
    let took = began.elapsed();
    match &outcome {
        ProbeOutcome::Degraded { note } => assert!(
            note.starts_with(
                "serving (the service answers), but Docker does not: daemon not responding"
            ),
            "{note}"
        ),
        other => panic!("expected Degraded, got {other:?}"),
    }
    assert!(
        took < c.probe_deadline(),
        "the probe fits the tier's deadline: {took:?}"
    );

    // The service stops answering while Docker is still slow: nothing
    // serves and cascade cannot start anything through this daemon.
    docker(&["stop", "-t", "0", &name]);
    let outcome = d.probe().await;
    assert!(
        matches!(&outcome, ProbeOutcome::PlatformDown { error: reason }
            if reason.starts_with("daemon not responding") && reason.contains(&name)),
        "{outcome:?}"
    );

    // Docker answers again: it says the container exited.
    slow.set_delay(Duration::ZERO);
    let outcome = poll_outcome(&d, |o| matches!(o, ProbeOutcome::Gone { .. })).await;
    assert!(
        matches!(&outcome, ProbeOutcome::Gone { reason } if reason.contains("exited")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_removed_container_is_gone_at_the_first_probe_and_start_recreates_it() {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-gone");
    let port = free_port();
    let _cleanup = Cleanup(vec![name.clone()]);
    let d = driver(config(vec![service(&name, port)])).await;
    d.start().await.expect("starts");
    assert!(matches!(d.probe().await, ProbeOutcome::Up { .. }));
    let before = id(&name);

    docker(&["rm", "-f", &name]);
    match d.probe().await {
        ProbeOutcome::Gone { reason } => {
            assert_eq!(reason, format!("container {name} does not exist"))
        }
        other => panic!("expected Gone at the first probe, got {other:?}"),
    }

    d.start().await.expect("recreates");
    assert_ne!(id(&name), before, "a new container");
    assert!(matches!(d.probe().await, ProbeOutcome::Up { .. }));
}

/// Probes until `done` holds (a slow daemon's remembered failure expires
/// within its ping_timeout).
async fn poll_outcome(d: &DockerDriver, done: impl Fn(&ProbeOutcome) -> bool) -> ProbeOutcome {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outcome = d.probe().await;
        if done(&outcome) || Instant::now() >= deadline {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_missing_socket_is_daemon_not_running_and_start_says_so() {
    if !docker_available() {
        return;
    }
    let mut c = config(vec![service("cascade-t-never-created", free_port())]);
    c.host = Some(format!("unix:///tmp/{}.sock", unique("cascade-t-none")));
    let d = driver(c).await;

    match d.probe().await {
        ProbeOutcome::PlatformDown { error: reason } => assert!(
            reason.starts_with("daemon not running") && reason.contains("daemon.start is off"),
            "{reason}"
        ),
        other => panic!("expected PlatformDown, got {other:?}"),
    }
    let error = error_of(d.start().await);
    assert!(error.contains("daemon not running"), "{error}");
    assert!(error.contains("daemon.start is off"), "{error}");
}

#[test]
fn daemon_failures_map_to_probe_outcomes() {
    let failing = "container svc does not answer: connection refused";
    let unavailable = daemon_outcome(
        DockerError::NotInstalled {
            socket: "/var/run/docker.sock".into(),
        },
        true,
        failing,
    );
    assert!(
        matches!(&unavailable, ProbeOutcome::Unavailable { reason } if reason.starts_with("not installed")),
        "{unavailable:?}"
    );
    let not_running = || DockerError::NotRunning {
        cause: "no socket".into(),
    };
    let startable = daemon_outcome(not_running(), true, failing);
    assert!(
        matches!(&startable, ProbeOutcome::Down { error } if error.starts_with("daemon not running")),
        "cascade may start it: a failure the start phase acts on: {startable:?}"
    );
    let left = daemon_outcome(not_running(), false, failing);
    assert!(
        matches!(&left, ProbeOutcome::PlatformDown { error: reason }
            if reason.starts_with("daemon not running") && reason.contains("daemon.start is off")),
        "{left:?}"
    );
    let mute = daemon_outcome(
        DockerError::NotResponding {
            what: "ping".into(),
            after: Duration::from_millis(300),
        },
        true,
        failing,
    );
    assert!(
        matches!(&mute, ProbeOutcome::PlatformDown { error: reason }
            if reason.starts_with("daemon not responding") && reason.contains(failing)),
        "a daemon that does not answer cannot be started either: {mute:?}"
    );
    let refused = daemon_outcome(
        DockerError::Api {
            what: "inspecting container svc".into(),
            status: 500,
            message: "boom".into(),
        },
        false,
        failing,
    );
    assert!(
        matches!(&refused, ProbeOutcome::Down { error } if error.contains("HTTP 500")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_daemon_start_command_that_fails_is_reported_at_once_with_its_stderr() {
    if !docker_available() {
        return;
    }
    let mut c = config(vec![service("cascade-t-never-created", free_port())]);
    c.host = Some(format!("unix:///tmp/{}.sock", unique("cascade-t-nodaemon")));
    c.daemon.start = true;
    c.daemon.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo cannot start >&2; exit 1".into(),
    ];
    assert_eq!(c.daemon.timeout, Duration::from_secs(60));
    let d = driver(c).await;

    let began = Instant::now();
    let error = error_of(d.start().await);

    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}",
        began.elapsed()
    );
    assert!(
        error.contains("docker daemon exited with code 1") && error.contains("cannot start"),
        "{error}"
    );
}

#[tokio::test]
async fn a_missing_image_is_named_and_nothing_is_created() {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-noimage");
    let _cleanup = Cleanup(vec![name.clone()]);
    let mut c = service(&name, free_port());
    c.image = "cascade-no-such-image:never".into();
    let d = driver(config(vec![c])).await;

    let error = error_of(d.start().await);

    assert!(error.contains("cascade-no-such-image:never"), "{error}");
    assert!(error.contains(&name), "{error}");
    assert_eq!(inspect(&name, "{{.Id}}"), None);
}

#[tokio::test]
async fn an_unhealthy_container_probes_down_with_its_health_output() {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-sick");
    let port = free_port();
    let _cleanup = Cleanup(vec![name.clone()]);
    let d = driver(config(vec![with_env(
        service(&name, port),
        "DEMO_FAIL_HEALTH_AFTER",
        "4",
    )]))
    .await;
    d.start().await.expect("starts healthy");

    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        if let ProbeOutcome::Down { error } = d.probe().await
            && error.starts_with("container unhealthy")
        {
            break error;
        }
        assert!(Instant::now() < deadline, "never probed unhealthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(error.contains(&name), "{error}");
    eventually(
        Duration::from_secs(10),
        "Docker to mark it unhealthy",
        || inspect(&name, "{{.State.Health.Status}}").as_deref() == Some("unhealthy"),
    )
    .await;
}

#[tokio::test]
async fn stop_cancels_a_start_that_waits_for_health_and_stops_the_container() {
    if !docker_available() {
        return;
    }
    let name = unique("cascade-t-cancel");
    let _cleanup = Cleanup(vec![name.clone()]);
    // Never healthy: the start waits until its deadline unless stopped.
    let mut c = config(vec![with_env(
        service(&name, free_port()),
        "DEMO_FAIL_HEALTH_AFTER",
        "0",
    )]);
    c.stop_on_exit = true;
    let d = driver(c).await;

    let began = Instant::now();
    let (started, stopped) = tokio::join!(d.start(), async {
        let name = name.clone();
        eventually(Duration::from_secs(20), "the container to run", move || {
            inspect(&name, "{{.State.Running}}").as_deref() == Some("true")
        })
        .await;
        d.stop(StopReason::Exiting).await
    });

    assert!(
        began.elapsed() < Duration::from_secs(20),
        "took {:?}",
        began.elapsed()
    );
    let error = error_of(started);
    assert!(error.contains("cancelled"), "{error}");
    stopped.expect("stops");
    assert_eq!(
        inspect(&name, "{{.State.Running}}").as_deref(),
        Some("false")
    );
}

#[tokio::test]
async fn another_instances_container_on_the_port_is_named_and_left_running() {
    if !docker_available() {
        return;
    }
    let (theirs, ours) = (unique("cascade-t-theirs"), unique("cascade-t-mine"));
    let port = free_port();
    let _cleanup = Cleanup(vec![theirs.clone(), ours.clone()]);
    let other = Instance::from_state_dir(&std::env::temp_dir().join(unique("cascade-t-other")));
    let first = driver_as(config(vec![service(&theirs, port)]), other.clone()).await;
    first.start().await.expect("the other instance starts");
    let before = id(&theirs);
    assert_eq!(label(&theirs, Instance::LABEL), other.id());

    // This instance wants the same host port for a container of its own.
    let d = driver(config(vec![service(&ours, port)])).await;
    let error = error_of(d.start().await);
    assert!(
        error.contains(&theirs)
            && error.contains(&format!(
                "managed by another cascade (instance {})",
                other.id()
            )),
        "{error}"
    );
    let dry = d
        .restart(RestartRequest {
            force: true,
            dry_run: true,
        })
        .await
        .expect("plans");
    assert!(
        dry.plan
            .iter()
            .any(|l| l.contains(&theirs) && l.contains("another cascade")),
        "{:?}",
        dry.plan
    );

    // And a container of the other instance's name: refused, not recreated.
    let same_name = driver(config(vec![service(&theirs, free_port())])).await;
    let error = error_of(same_name.start().await);
    assert!(error.contains("managed by another cascade"), "{error}");

    assert_eq!(
        id(&theirs),
        before,
        "the other instance's container is untouched"
    );
    assert_eq!(
        inspect(&theirs, "{{.State.Running}}").as_deref(),
        Some("true")
    );
    assert_eq!(inspect(&ours, "{{.Id}}"), None, "nothing was created");
}

#[tokio::test]
async fn stop_on_exit_stops_only_this_instances_containers_by_id() {
    if !docker_available() {
        return;
    }
    let (stranger, mine) = (unique("cascade-t-stranger"), unique("cascade-t-mine"));
    let _cleanup = Cleanup(vec![stranger.clone(), mine.clone()]);
    // A person's container with a name this cascade's config also uses.
    docker(&[
        "run",
        "-d",
        "--name",
        &stranger,
        "--label",
        TEST_LABEL,
        demo_image(),
    ]);
    let mut c = config(vec![
        service(&mine, free_port()),
        service(&stranger, free_port()),
    ]);
    c.stop_on_exit = true;
    let d = driver(c).await;
    let error = error_of(d.start().await);
    assert!(
        error.contains(&stranger) && error.contains("not managed by cascade"),
        "{error}"
    );
    assert_eq!(
        inspect(&mine, "{{.State.Running}}").as_deref(),
        Some("true"),
        "the first container was created before the refusal"
    );

    d.stop(StopReason::Exiting).await.expect("stops");

    assert_eq!(
        inspect(&stranger, "{{.State.Running}}").as_deref(),
        Some("true"),
        "a stranger's container of a configured name is never stopped"
    );
    assert_eq!(
        inspect(&mine, "{{.State.Running}}").as_deref(),
        Some("false")
    );
}
