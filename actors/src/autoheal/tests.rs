//! Autoheal against the real engine: the loop runs in-process and the test
//! breaks containers with the docker CLI.
//!
//! Every test uses its own autoheal label and a scope label that only its
//! containers carry (`Setup::scope`), so tests running at the same time never
//! heal each other's containers. Managed containers still carry
//! `cascade.managed=true`, which any unscoped loop running at the same time
//! would also heal; assertions about managed containers therefore read this
//! loop's own report rather than only the container's state.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::resilience::{BackoffConfig, Jitter, with_deadline};
use crate::tiers::docker::config::{AutohealConfig, DockerConfig};
use crate::tiers::docker::connect::{Connector, DockerHost};
use crate::tiers::docker::testing::{
    self, Cleanup, TEST_LABEL, docker, eventually, inspect, unique,
};

const HEALED_WITHIN: Duration = Duration::from_secs(30);

fn fast(base_ms: u64, cap_ms: u64) -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_millis(base_ms),
        cap: Duration::from_millis(cap_ms),
        reset_after: Duration::from_secs(60),
        jitter: Jitter::Full,
    }
}

fn config(label: &str) -> DockerConfig {
    DockerConfig {
        call_timeout: Duration::from_secs(20),
        autoheal: AutohealConfig {
            enabled: true,
            label: label.to_owned(),
            backoff: fast(50, 400),
            max_restarts: None,
            window: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(1),
            reconnect: fast(50, 300),
            start_period: Duration::ZERO,
        },
        ..DockerConfig::default()
    }
}

/// One autoheal loop, its containers, and what it told the tier.
struct Harness {
    handle: AutohealHandle,
    tasks: TaskTracker,
    cancel: CancellationToken,
    notes: Arc<Mutex<Vec<String>>>,
    /// This test's autoheal label (value `true` marks a container).
    label: String,
    /// `key=value` carried by this test's containers only.
    scope: String,
    cleanup: Cleanup,
}

impl Harness {
    fn start(tune: impl FnOnce(&mut DockerConfig), connector: Option<Connector>) -> Harness {
        let label = unique("autoheal-test");
        let scope = format!("cascade.test.scope={}", unique("scope"));
        let mut config = config(&label);
        tune(&mut config);
        let connector = connector.unwrap_or_else(|| {
            Connector::new(&config, &crate::tiers::docker::DockerEnv::default())
        });
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let notes = Arc::new(Mutex::new(Vec::new()));
        let sink = notes.clone();
        let on_change: Arc<dyn Fn(String) + Send + Sync> =
            Arc::new(move |note| sink.lock().expect("notes").push(note));
        let autoheal = Autoheal::new();
        let handle = autoheal.handle();
        let setup = Setup {
            config,
            connector,
            scope: Some(scope.clone()),
            instance: None,
        };
        tasks.spawn(start(&autoheal, setup, &tasks, cancel.clone(), on_change));
        Harness {
            handle,
            tasks,
            cancel,
            notes,
            label,
            scope,
            cleanup: Cleanup(Vec::new()),
        }
    }

    async fn connected(&self) {
        eventually(Duration::from_secs(20), "autoheal connected", || {
            self.handle.connected()
        })
        .await;
    }

    /// `docker run -d` of the demo image with this test's labels.
    fn run(&mut self, prefix: &str, labels: &[String], env: &[&str]) -> String {
        let name = unique(prefix);
        self.cleanup.0.push(name.clone());
        let mut args = vec![
            "run".to_owned(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--label".into(),
            TEST_LABEL.into(),
            "--label".into(),
            self.scope.clone(),
        ];
        for label in labels {
            args.extend(["--label".to_owned(), label.clone()]);
        }
        for e in env {
            args.extend(["-e".to_owned(), (*e).to_owned()]);
        }
        args.push(testing::demo_image().to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args);
        name
    }

    fn managed(&mut self, prefix: &str, env: &[&str]) -> String {
        self.run(prefix, &[format!("{MANAGED_LABEL}=true")], env)
    }

    fn labelled(&mut self, prefix: &str, env: &[&str]) -> String {
        let label = format!("{}=true", self.label);
        self.run(prefix, &[label], env)
    }

    fn report(&self, name: &str) -> Option<HealReport> {
        self.handle
            .report()
            .into_iter()
            .find(|r| r.container == name)
    }

    fn notes(&self) -> Vec<String> {
        self.notes.lock().expect("notes").clone()
    }

    fn restarts(&self, name: &str) -> u64 {
        self.report(name).map_or(0, |r| r.restarts)
    }

    /// Cancels the loop; it must end promptly.
    async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        with_deadline(Duration::from_secs(5), "autoheal tasks", self.tasks.wait())
            .await
            .expect("the autoheal loop and its tasks end promptly on cancel");
    }
}

fn started_at(name: &str) -> String {
    inspect(name, "{{.State.StartedAt}}").unwrap_or_default()
}

fn running(name: &str) -> bool {
    inspect(name, "{{.State.Running}}").as_deref() == Some("true")
}

fn healthy(name: &str) -> bool {
    inspect(name, "{{.State.Health.Status}}").as_deref() == Some("healthy")
}

async fn wait_healthy(name: &str) {
    eventually(Duration::from_secs(30), &format!("{name} healthy"), || {
        healthy(name)
    })
    .await;
}

// === a webhook receiver ===

/// Collects the JSON bodies POSTed to it.
struct Hook {
    url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    server: JoinHandle<()>,
}

impl Hook {
    async fn start() -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hook");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let sink = bodies.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    if let Some(body) = read_post(&mut conn).await {
                        if let Ok(json) = serde_json::from_slice(&body) {
                            sink.lock().expect("bodies").push(json);
                        }
                        let _ = conn
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                });
            }
        });
        Hook {
            url,
            bodies,
            server,
        }
    }

    fn find(&self, event: &str, container: &str) -> Option<serde_json::Value> {
        self.bodies
            .lock()
            .expect("bodies")
            .iter()
            .find(|b| b["event"] == event && b["container"] == container)
            .cloned()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The body of one HTTP/1.1 request with a content-length.
async fn read_post(conn: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())?;
        while buf.len() < end + 4 + length {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Some(buf[end + 4..end + 4 + length].to_vec());
    }
}

// === a socket relay the test can cut ===

/// Proxies a unix socket to the real daemon's; `cut` drops every connection
/// and the socket, `resume` listens again.
struct Relay {
    path: PathBuf,
    upstream: PathBuf,
    up: Mutex<Option<CancellationToken>>,
}

impl Relay {
    fn start() -> Relay {
        let DockerHost::Unix(upstream) =
            DockerHost::resolve(None, &crate::tiers::docker::DockerEnv::from_env())
        else {
            panic!("the relay test needs the daemon on a unix socket");
        };
        let path = std::env::temp_dir().join(format!("{}.sock", unique("cascade-relay")));
        let relay = Relay {
            path,
            upstream,
            up: Mutex::new(None),
        };
        relay.resume();
        relay
    }

    fn resume(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind relay socket");
        let token = CancellationToken::new();
        *self.up.lock().expect("relay") = Some(token.clone());
        let upstream = self.upstream.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { break };
                        tokio::spawn(pipe(client, upstream.clone(), token.clone()));
                    }
                }
            }
        });
    }

    fn cut(&self) {
        if let Some(token) = self.up.lock().expect("relay").take() {
            token.cancel();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn pipe(mut client: UnixStream, upstream: PathBuf, token: CancellationToken) {
    let Ok(mut daemon) = UnixStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        () = token.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut daemon) => {}
    }
}

fn relay_connector(path: &Path) -> Connector {
    Connector::with_host(
        DockerHost::Unix(path.to_owned()),
        Duration::from_secs(5),
        Duration::from_secs(20),
    )
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_managed_container_is_restarted_healthy_and_notified() {
    if !testing::docker_available() {
        return;
    }
    let hook = Hook::start().await;
    let url = hook.url.clone();
    let mut h = Harness::start(|c| c.webhook.url = Some(url), None);
    h.connected().await;
    let name = h.managed("ah-managed", &[]);
    wait_healthy(&name).await;
    let before = started_at(&name);

    docker(&["kill", &name]);

    eventually(
        HEALED_WITHIN,
        "the killed container restarted and healthy",
        || started_at(&name) != before && running(&name) && healthy(&name),
    )
    .await;
    eventually(HEALED_WITHIN, "this loop's report counts the heal", || {
        h.restarts(&name) >= 1
    })
    .await;
    let report = h.report(&name).expect("report");
    assert!(report.gave_up.is_none());
    assert!(
        report
            .last_heal
            .as_deref()
            .is_some_and(|l| l.contains("died")),
        "{report:?}"
    );
    assert!(h.handle.last_heal_latency(&name).is_some());
    eventually(Duration::from_secs(10), "the restart webhook", || {
        hook.find("restart", &name).is_some()
    })
    .await;
    let body = hook.find("restart", &name).expect("restart notice");
    assert_eq!(body["restarts"], 1);
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("died")));
    assert!(body["id"].as_str().is_some_and(|id| id.len() == 64));
    assert_eq!(body["image"], testing::demo_image());
    assert!(body["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(
        h.notes
            .lock()
            .expect("notes")
            .iter()
            .any(|n| n.contains(&name))
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_labelled_container_is_restarted() {
    if !testing::docker_available() {
        return;
    }
    let mut h = Harness::start(|_| {}, None);
    h.connected().await;
    let name = h.labelled("ah-unhealthy", &["DEMO_FAIL_HEALTH_AFTER=1"]);
    eventually(Duration::from_secs(30), "the container is running", || {
        running(&name)
    })
    .await;
    let before = started_at(&name);

    eventually(HEALED_WITHIN, "the unhealthy container restarted", || {
        h.restarts(&name) >= 1 && started_at(&name) != before
    })
    .await;
    let report = h.report(&name).expect("report");
    assert!(
        report
            .last_heal
            .as_deref()
            .is_some_and(|l| l.contains("unhealthy")),
        "{report:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_container_stopped_or_killed_by_hand_stays_stopped() {
    if !testing::docker_available() {
        return;
    }
    let mut h = Harness::start(|_| {}, None);
    h.connected().await;
    let stopped = h.labelled("ah-stopped", &[]);
    let killed = h.labelled("ah-killed", &[]);
    wait_healthy(&stopped).await;
    wait_healthy(&killed).await;

    docker(&["stop", "-t", "1", &stopped]);
    docker(&["kill", &killed]);
    // A crash after those: once it is healed, the loop has handled the
    // stop and the kill too (one stream, in order).
    let control = h.labelled("ah-control", &["DEMO_EXIT_AFTER=1"]);
    eventually(
        HEALED_WITHIN,
        "the crashed control container healed",
        || h.restarts(&control) >= 1,
    )
    .await;

    for name in [&stopped, &killed] {
        assert!(!running(name), "{name} was restarted");
        assert_eq!(
            inspect(name, "{{.State.Status}}").as_deref(),
            Some("exited")
        );
        assert_eq!(h.restarts(name), 0, "{name}: {:?}", h.report(name));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_container_created_later_is_healed_after_a_crash() {
    if !testing::docker_available() {
        return;
    }
    let mut h = Harness::start(|_| {}, None);
    h.connected().await;
    // Created after the loop started: known only from its own events.
    let name = h.labelled("ah-late", &["DEMO_EXIT_AFTER=1.5"]);
    eventually(Duration::from_secs(30), "the container is running", || {
        running(&name)
    })
    .await;
    let before = started_at(&name);

    eventually(HEALED_WITHIN, "the crashed container restarted", || {
        h.restarts(&name) >= 1 && started_at(&name) != before
    })
    .await;
    let report = h.report(&name).expect("report");
    assert!(
        report
            .last_heal
            .as_deref()
            .is_some_and(|l| l.contains("died")),
        "{report:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_max_restarts_a_crash_loop_is_given_up_and_notified() {
    if !testing::docker_available() {
        return;
    }
    let hook = Hook::start().await;
    let url = hook.url.clone();
    let mut h = Harness::start(
        |c| {
            c.webhook.url = Some(url);
            c.autoheal.max_restarts = Some(2);
            c.autoheal.backoff = fast(50, 200);
        },
        None,
    );
    h.connected().await;
    let name = h.labelled("ah-crashloop", &["DEMO_EXIT_AFTER=0.2"]);

    eventually(Duration::from_secs(40), "autoheal gives up", || {
        h.report(&name).is_some_and(|r| r.gave_up.is_some())
    })
    .await;
    let report = h.report(&name).expect("report");
    assert_eq!(report.restarts, 2, "{report:?}");
    assert!(
        report
            .gave_up
            .as_deref()
            .is_some_and(|g| g.starts_with("gave up after 2 restarts within 1m")),
        "{report:?}"
    );

    eventually(Duration::from_secs(10), "the container stays down", || {
        !running(&name)
    })
    .await;
    let last_start = started_at(&name);
    // A crash after that: once it is healed, the loop has handled every
    // event of the given-up container too (one stream, in order).
    let control = h.labelled("ah-control", &["DEMO_EXIT_AFTER=1"]);
    eventually(
        HEALED_WITHIN,
        "the crashed control container healed",
        || h.restarts(&control) >= 1,
    )
    .await;
    assert_eq!(started_at(&name), last_start, "restarted after giving up");
    assert!(!running(&name));
    assert_eq!(h.restarts(&name), 2);

    eventually(Duration::from_secs(10), "the give_up webhook", || {
        hook.find("give_up", &name).is_some()
    })
    .await;
    let body = hook.find("give_up", &name).expect("give_up notice");
    assert_eq!(body["restarts"], 2);
    assert!(hook.find("restart", &name).is_some());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_that_died_while_the_stream_was_cut_is_healed_after_reconnect() {
    if !testing::docker_available() {
        return;
    }
    let relay = Relay::start();
    let mut h = Harness::start(|_| {}, Some(relay_connector(&relay.path)));
    h.connected().await;
    let name = h.managed("ah-relay", &[]);
    wait_healthy(&name).await;
    let before = started_at(&name);

    relay.cut();
    eventually(
        Duration::from_secs(10),
        "the loop notices the break",
        || !h.handle.connected(),
    )
    .await;
    // Through the real socket, while the loop cannot see it.
    docker(&["kill", &name]);
    eventually(Duration::from_secs(10), "the container is down", || {
        !running(&name)
    })
    .await;
    assert_eq!(h.restarts(&name), 0);

    relay.resume();
    h.connected().await;
    eventually(
        HEALED_WITHIN,
        "the container healed after the reconnect",
        || h.restarts(&name) >= 1 && started_at(&name) != before && running(&name),
    )
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_stop_is_not_healed_until_the_container_starts_again() {
    if !testing::docker_available() {
        return;
    }
    let mut h = Harness::start(|_| {}, None);
    h.connected().await;
    let name = h.managed("ah-expected", &[]);
    wait_healthy(&name).await;

    h.handle.expect_stop(&name);
    docker(&["stop", "-t", "1", &name]);
    let control = h.labelled("ah-control", &["DEMO_EXIT_AFTER=1"]);
    eventually(
        HEALED_WITHIN,
        "the crashed control container healed",
        || h.restarts(&control) >= 1,
    )
    .await;
    assert_eq!(h.restarts(&name), 0, "{:?}", h.report(&name));

    // Started again, it is cascade's to keep running once more.
    docker(&["start", &name]);
    wait_healthy(&name).await;
    docker(&["kill", &name]);
    eventually(HEALED_WITHIN, "the killed container healed", || {
        h.restarts(&name) >= 1
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_stopping_a_container_cancels_its_scheduled_heal() {
    if !testing::docker_available() {
        return;
    }
    let mut h = Harness::start(
        |c| {
            c.autoheal.backoff = BackoffConfig {
                base: Duration::from_secs(10),
                cap: Duration::from_secs(60),
                reset_after: Duration::from_secs(60),
                jitter: Jitter::None,
            };
        },
        None,
    );
    h.connected().await;
    let name = h.labelled("ah-person", &["DEMO_FAIL_HEALTH_AFTER=1"]);
    eventually(HEALED_WITHIN, "the first heal", || h.restarts(&name) >= 1).await;
    // Unhealthy again a few seconds after that restart: the second heal
    // waits out its backoff.
    eventually(HEALED_WITHIN, "a heal scheduled after its backoff", || {
        h.report(&name).is_some_and(|r| r.next_heal.is_some())
    })
    .await;
    let due = h
        .report(&name)
        .and_then(|r| r.next_heal)
        .and_then(|t| humantime::parse_rfc3339(&t).ok())
        .expect("next_heal is a time");

    docker(&["stop", "-t", "1", &name]);
    eventually(Duration::from_secs(10), "the heal cancelled", || {
        h.report(&name).is_some_and(|r| r.next_heal.is_none())
            && h.notes().iter().any(|n| n.contains("a person stopped it"))
    })
    .await;
    // Past the moment the heal was due, it is still stopped.
    let past_due = due + Duration::from_secs(1);
    eventually(Duration::from_secs(30), "the heal's due time", || {
        std::time::SystemTime::now() > past_due
    })
    .await;
    assert!(
        !running(&name),
        "a scheduled heal overrode the person's stop"
    );
    assert_eq!(h.restarts(&name), 1, "{:?}", h.report(&name));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_container_is_held_back_by_its_backoff_and_never_given_up() {
    if !testing::docker_available() {
        return;
    }
    let mut h = Harness::start(
        |c| {
            c.autoheal.backoff = BackoffConfig {
                base: Duration::from_millis(1500),
                cap: Duration::from_secs(3),
                reset_after: Duration::from_secs(10),
                jitter: Jitter::None,
            };
        },
        None,
    );
    h.connected().await;
    let name = h.labelled("ah-loop", &["DEMO_EXIT_AFTER=0.1"]);
    eventually(Duration::from_secs(60), "five heals", || {
        h.restarts(&name) >= 5
    })
    .await;
    let notes = h.notes();
    let held_back = notes
        .iter()
        .filter(|n| n.starts_with(&format!("autoheal restarts {name} in ")))
        .count();
    // The first heal of the series goes out at once; the container dies
    // well within 1.5 s of each restart, so the later ones wait (3 s from
    // the previous restart at the cap).
    assert!(held_back >= 2, "{notes:#?}");
    let report = h.report(&name).expect("report");
    assert!(report.gave_up.is_none(), "{report:?}");
    h.stop().await;
}

// === under the root ===

/// The root with no tier and this autoheal, scoped to the test's containers.
async fn root_with(spec: AutohealSpec) -> crate::supervisor::Running {
    let waterfall = crate::waterfall::WaterfallConfig {
        order: Vec::new(),
        ..Default::default()
    };
    let state_dir = std::env::temp_dir().join(unique("cascade-autoheal-root"));
    crate::supervisor::start_with_autoheal(
        Vec::new(),
        waterfall,
        crate::supervisor::SupervisorConfig::default(),
        Arc::new(crate::notify::NoNotify),
        crate::instance::Instance::from_state_dir(&state_dir),
        Some(spec),
    )
    .await
    .expect("the root starts")
}

fn status(running: &crate::supervisor::Running) -> AutohealStatus {
    running
        .snapshots
        .borrow()
        .autoheal
        .clone()
        .expect("autoheal is in the snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_root_autoheal_is_restarted_and_reloaded_keeping_its_history() {
    if !testing::docker_available() {
        return;
    }
    let label = unique("autoheal-test");
    let scope = format!("cascade.test.scope={}", unique("scope"));
    let mut settings = config(&label);
    settings.autoheal.backoff = BackoffConfig {
        base: Duration::from_millis(300),
        cap: Duration::from_millis(600),
        reset_after: Duration::from_secs(10),
        jitter: Jitter::None,
    };
    let autoheal = Autoheal::new();
    let env = crate::tiers::docker::DockerEnv::default();
    let spec = AutohealSpec::new(&settings, env.clone(), &autoheal).scoped(&scope);
    let running = root_with(spec).await;
    // The root publishes autoheal once it has spawned it.
    eventually(Duration::from_secs(20), "autoheal connected", || {
        running
            .snapshots
            .borrow()
            .autoheal
            .as_ref()
            .is_some_and(|a| a.connected)
    })
    .await;

    let mut cleanup = Cleanup(Vec::new());
    let name = unique("ah-root");
    cleanup.0.push(name.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        TEST_LABEL,
        "--label",
        &scope,
        "--label",
        &format!("{label}=true"),
        "-e",
        "DEMO_EXIT_AFTER=0.1",
        testing::demo_image(),
    ]);
    let restarts_of = |s: &AutohealStatus| {
        s.containers
            .iter()
            .find(|r| r.container == name)
            .map_or(0, |r| r.restarts)
    };
    eventually(HEALED_WITHIN, "two heals", || {
        restarts_of(&status(&running)) >= 2
    })
    .await;

    // Killed: the root restarts it after a backoff; the new actor picks up
    // the same history and goes on healing.
    let before = status(&running);
    let children = running.root.get_children();
    assert_eq!(children.len(), 1, "autoheal is the root's only child");
    children[0].kill();
    eventually(Duration::from_secs(20), "autoheal restarted", || {
        let now = status(&running);
        now.actor_restarts == 1 && now.connected
    })
    .await;
    let after = status(&running);
    assert!(
        after.heals >= before.heals && restarts_of(&after) >= restarts_of(&before),
        "the history survived the restart: before {before:?}, after {after:?}"
    );
    eventually(HEALED_WITHIN, "healing goes on", || {
        restarts_of(&status(&running)) > restarts_of(&after)
    })
    .await;

    // New settings replace the actor, not the history; unchanged ones
    // leave it alone.
    let child = running.root.get_children()[0].get_id();
    let same = AutohealSpec::new(&settings, env.clone(), &autoheal).scoped(&scope);
    running
        .root
        .send_message(crate::supervisor::RootMsg::ReloadAutoheal(Some(Box::new(
            same,
        ))))
        .expect("the root takes messages");
    // A reload of nothing, answered after the message before it.
    let waterfall = crate::waterfall::WaterfallConfig {
        order: Vec::new(),
        ..Default::default()
    };
    running
        .root
        .call(
            |reply| crate::supervisor::RootMsg::Reload {
                tiers: Vec::new(),
                waterfall,
                reply,
            },
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("the root answers");
    assert_eq!(
        running.root.get_children()[0].get_id(),
        child,
        "unchanged settings leave the actor alone"
    );
    settings.webhook.timeout = Duration::from_secs(3);
    let changed = AutohealSpec::new(&settings, env, &autoheal).scoped(&scope);
    let before = status(&running);
    running
        .root
        .send_message(crate::supervisor::RootMsg::ReloadAutoheal(Some(Box::new(
            changed,
        ))))
        .expect("the root takes messages");
    eventually(Duration::from_secs(20), "autoheal replaced", || {
        running
            .root
            .get_children()
            .first()
            .is_some_and(|c| c.get_id() != child)
            && status(&running).connected
    })
    .await;
    let after = status(&running);
    assert_eq!(after.actor_restarts, 1, "a replacement is not a failure");
    assert!(restarts_of(&after) >= restarts_of(&before), "{after:?}");

    docker(&["rm", "-f", &name]);
    running
        .root
        .call(
            crate::supervisor::RootMsg::Shutdown,
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("the root stops");
}
