//! The docker tier through the real binary and the real engine: preferred
//! over local, `cascade docker check`, dry-run restart, autoheal reported in
//! `/status`, and failover to local when the container cannot serve.
//!
//! Docker tests run one at a time: a cascade heals every managed container
//! on the engine, so two at once would heal each other's deliberate breaks.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Mutex;

use crate::support::{Cascade, Setup, Signal, cli, free_port, wait_for};
use crate::telemetry::{has_span, otlp_env, receiver};

pub(crate) const IMAGE: &str = "cascade-demo:it";
pub(crate) static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Under CI=true a missing engine fails the test; elsewhere it is skipped.
pub(crate) fn engine() -> bool {
    let ok = Command::new("docker")
        .args(["version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var("CI").as_deref() != Ok("true"),
        "the Docker engine is required under CI=true"
    );
    if ok {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| cascade_demo::image::build(IMAGE).unwrap_or_else(|e| panic!("{e}")));
    } else {
        eprintln!("skipped: no Docker engine");
    }
    ok
}

pub(crate) fn docker(args: &[&str]) -> String {
    cascade_demo::image::docker_cli(args).unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) struct Removed(pub(crate) String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

pub(crate) fn setup(name: &str, image: &str, host_port: u16, autoheal: bool) -> Setup {
    Setup {
        env: vec![("CASCADE_WATERFALL__ORDER".into(), "docker,local".into())],
        extra: format!(
            "[tiers.docker]\n\
         start_timeout = \"60s\"\n\
         stop_on_exit = true\n\
         probe = {{ interval = \"200ms\", timeout = \"1s\" }}\n\
         breaker = {{ consecutive_failures = 2 }}\n\
         autoheal = {{ enabled = {autoheal} }}\n\
         \n\
         [[tiers.docker.containers]]\n\
         name = \"{name}\"\n\
         image = \"{image}\"\n\
         env = {{ USER_ID = \"1000\" }}\n\
         ports = [\"{host_port}:8080\"]\n\
         labels = {{ \"cascade.test\" = \"it\" }}\n"
        ),
        ..Setup::default()
    }
}

fn tier<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tier"] == name))
        .expect("tier in status")
}

#[tokio::test]
async fn docker_is_preferred_checked_and_healed_through_the_binary() {
    if !engine() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let name = format!("cascade-it-{}", std::process::id());
    let _removed = Removed(name.clone());
    let (endpoint, received, collector) = receiver().await;
    let mut with_otlp = setup(&name, IMAGE, free_port(), true);
    with_otlp.env.extend(otlp_env(&endpoint, "http/protobuf"));
    let cascade = Cascade::start(with_otlp).await;

    // The start phase creates the container; docker beats local, and its
    // probes then report it ready.
    let ready = "ready (daemon running, container healthy)";
    let status = wait_for(Duration::from_secs(60), "docker active", async || {
        let s = cascade.status().await;
        if s["active"] == "docker" && tier(&s, "docker")["reason"] == ready {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    assert_eq!(
        tier(&status, "docker")["reason"],
        "ready (daemon running, container healthy)"
    );
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"cascade.managed\"}}",
            &name
        ]),
        "true"
    );
    let id = docker(&["inspect", "-f", "{{.Id}}", &name]);

    let state = cascade.state_dir_str().to_owned();
    let check = cli(&["docker", "check", "--state-dir", &state], &[]).await;
    assert_eq!(check.code, Some(0), "{}", check.describe());
    assert!(
        check.stdout.contains(&name) && check.stdout.contains("consistent"),
        "{}",
        check.stdout
    );

    let dry = cli(
        &[
            "restart",
            "docker",
            "--force",
            "--dry-run",
            "--state-dir",
            &state,
        ],
        &[],
    )
    .await;
    assert_eq!(dry.code, Some(0), "{}", dry.describe());
    assert!(
        dry.stdout.contains(&format!("recreate {name} (forced)")),
        "{}",
        dry.stdout
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.Id}}", &name]),
        id,
        "a dry run changed the container"
    );

    // Killed by hand: a managed container is cascade's to keep running.
    docker(&["kill", &name]);
    let status = wait_for(
        Duration::from_secs(30),
        "autoheal reported in /status",
        async || {
            let s = cascade.status().await;
            let healed = s["autoheal"]["containers"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["container"] == *name && c["restarts"] == 1)
            });
            let healthy = tier(&s, "docker")["state"] == "healthy";
            if healed && s["active"] == "docker" && healthy {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    assert_eq!(
        tier(&status, "docker")["backend_restarts"],
        0,
        "healed by autoheal, not recreated"
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &name]),
        "true"
    );
    // The heal is a span at the collector, named for the container.
    wait_for(Duration::from_secs(15), "a heal span", async || {
        let attrs = [("backend.tier", "docker"), ("backend.name", name.as_str())];
        if has_span(&received, "heal", &attrs) {
            Ok(())
        } else {
            Err("no heal span yet".into())
        }
    })
    .await;
    collector.abort();
}

#[tokio::test]
async fn a_docker_tier_that_cannot_start_fails_over_to_local() {
    if !engine() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let name = format!("cascade-it-failover-{}", std::process::id());
    // A tag of its own, so removing it breaks only this test's tier.
    let image = format!("cascade-demo:it-failover-{}", std::process::id());
    docker(&["tag", IMAGE, &image]);
    let _removed = Removed(name.clone());
    let (endpoint, received, collector) = receiver().await;
    let mut with_otlp = setup(&name, &image, free_port(), false);
    with_otlp.env.extend(otlp_env(&endpoint, "http/protobuf"));
    let cascade = Cascade::start(with_otlp).await;
    wait_for(Duration::from_secs(60), "docker active", async || {
        let s = cascade.status().await;
        if s["active"] == "docker" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;

    // The image and then the container go away (in that order: a removed
    // container is recreated at once while its image is there): the docker
    // tier stops serving, its start fails (the image is missing and pull is
    // off), and the start phase moves on to local.
    docker(&["rmi", &image]);
    docker(&["rm", "-f", &name]);
    let status = wait_for(Duration::from_secs(60), "failover to local", async || {
        let s = cascade.status().await;
        if s["active"] == "local" {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let decision = status["decision"].as_str().unwrap_or("");
    assert!(
        decision.starts_with("active tier: local (docker: "),
        "{decision}"
    );
    assert_eq!(tier(&status, "local")["state"], "healthy");
    // The failover is a span at the collector: from docker to local.
    wait_for(Duration::from_secs(15), "a failover span", async || {
        let attrs = [
            ("backend.tier", "local"),
            ("from", "docker"),
            ("outcome", "failover"),
        ];
        if has_span(&received, "failover", &attrs) {
            Ok(())
        } else {
            Err("no failover span yet".into())
        }
    })
    .await;
    collector.abort();
}

/// `[tiers.docker]` for one cascade of several on the engine: autoheal off
/// (one cascade's autoheal would otherwise act on another's stops).
fn containers(stop_on_exit: bool, containers: &[(&str, u16)]) -> String {
    let mut text = format!(
        "[tiers.docker]\n\
         start_timeout = \"30s\"\n\
         stop_on_exit = {stop_on_exit}\n\
         probe = {{ interval = \"200ms\", timeout = \"1s\" }}\n\
         autoheal = {{ enabled = false }}\n"
    );
    for (name, port) in containers {
        text.push_str(&format!(
            "\n[[tiers.docker.containers]]\n\
             name = \"{name}\"\n\
             image = \"{IMAGE}\"\n\
             ports = [\"{port}:8080\"]\n\
             labels = {{ \"cascade.test\" = \"it\" }}\n"
        ));
    }
    text
}

fn docker_first(extra: String) -> Setup {
    Setup {
        order: vec!["docker".into(), "local".into()],
        extra,
        ..Setup::default()
    }
}

fn running(name: &str) -> String {
    docker(&["inspect", "-f", "{{.Id}} {{.State.Running}}", name])
}

#[tokio::test]
async fn two_cascades_on_one_engine_touch_only_their_own_containers() {
    if !engine() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let pid = std::process::id();
    let (a_name, b_name, user) = (
        format!("cascade-it-a-{pid}"),
        format!("cascade-it-b-{pid}"),
        format!("cascade-it-user-{pid}"),
    );
    let _removed = [&a_name, &b_name, &user].map(|n| Removed(n.clone()));
    let a_port = free_port();

    // A person's own container, named like a service container and not labelled.
    let user_port = free_port();
    docker(&[
        "run",
        "-d",
        "--name",
        &user,
        "-p",
        &format!("127.0.0.1:{user_port}:8080"),
        IMAGE,
    ]);
    let user_before = running(&user);

    let a = Cascade::start(docker_first(containers(true, &[(&a_name, a_port)]))).await;
    let a_status = wait_for(
        Duration::from_secs(60),
        "A's docker tier active",
        async || {
            let s = a.status().await;
            if s["active"] == "docker" {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    let a_instance = a_status["instance"]["id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    assert_eq!(a_instance.len(), 12, "{a_status}");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"cascade.instance\"}}",
            &a_name
        ]),
        a_instance,
        "A's container carries A's instance"
    );
    let a_before = running(&a_name);

    // B wants A's host port for a container of its own, and the person's
    // container's name for another; it may stop its containers on exit.
    let b = Cascade::start(docker_first(containers(
        true,
        &[(&b_name, a_port), (&user, free_port())],
    )))
    .await;
    let b_status = wait_for(
        Duration::from_secs(60),
        "B to fall back to local",
        async || {
            let s = b.status().await;
            let error = tier(&s, "docker")["last_error"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if s["active"] == "local" && error.contains("is published by container") {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    let b_instance = b_status["instance"]["id"].as_str().unwrap_or("");
    assert_ne!(
        b_instance, a_instance,
        "two state directories, two instances"
    );
    let error = tier(&b_status, "docker")["last_error"]
        .as_str()
        .unwrap_or("");
    assert!(
        error.contains(&a_name)
            && error.contains(&format!(
                "managed by another cascade (instance {a_instance})"
            )),
        "B names A's container and instance: {error}"
    );
    assert_eq!(running(&a_name), a_before, "A's container is untouched");
    assert_eq!(a.status().await["active"], "docker");

    // B exits: it stops nothing that is not its own.
    b.signal(Signal::Term);
    let mut b = b;
    assert!(
        b.wait_exit(Duration::from_secs(30)).await.is_some(),
        "B exits"
    );
    assert_eq!(
        running(&user),
        user_before,
        "the person's container still runs"
    );
    assert_eq!(running(&a_name), a_before, "A's container still runs");
    assert!(
        b.logs()
            .contains("Not stopping a container this cascade does not own"),
        "{}",
        b.log_tail()
    );

    // A exits: with stop_on_exit it stops its own container, by id.
    let mut a = a;
    a.signal(Signal::Term);
    assert!(
        a.wait_exit(Duration::from_secs(30)).await.is_some(),
        "A exits"
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &a_name]),
        "false",
        "A stopped its own container"
    );
    assert_eq!(running(&user), user_before);
}

/// A unix socket that accepts connections and never answers: a wedged
/// Docker daemon. Held open until dropped.
struct WedgedSocket {
    _dir: tempfile::TempDir,
    host: String,
    task: tokio::task::JoinHandle<()>,
}

impl WedgedSocket {
    fn start() -> WedgedSocket {
        let dir = tempfile::Builder::new()
            .prefix("cascade-it-wedged-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind socket");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        WedgedSocket {
            host: format!("unix://{}", socket.display()),
            _dir: dir,
            task,
        }
    }
}

impl Drop for WedgedSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn with_a_wedged_docker_socket_the_tier_is_not_startable_and_check_answers_within_its_bound()
{
    // No engine involved: the socket is the test's own.
    let wedged = WedgedSocket::start();
    let setup = Setup {
        order: vec!["docker".into(), "local".into()],
        env: vec![("DOCKER_HOST".into(), wedged.host.clone())],
        extra: format!(
            "[tiers.docker]\n\
             ping_timeout = \"2s\"\n\
             \n\
             [[tiers.docker.containers]]\n\
             name = \"cascade-it-wedged-{}\"\n\
             image = \"{IMAGE}\"\n\
             ports = [\"{}:8080\"]\n",
            std::process::id(),
            free_port()
        ),
        ..Setup::default()
    };
    let began = std::time::Instant::now();
    let cascade = Cascade::start(setup).await;
    let status = wait_for(Duration::from_secs(30), "local serving", async || {
        let s = cascade.status().await;
        if s["active"] == "local" {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    eprintln!(
        "wedged docker socket first: local active {:?} after start",
        began.elapsed()
    );
    let docker_tier = tier(&status, "docker");
    assert_eq!(docker_tier["startable"], false, "{status}");
    let reason = docker_tier["reason"].as_str().unwrap_or("");
    assert!(reason.contains("daemon not responding"), "{reason}");

    // Both answer within ping_timeout (and the API's own overhead), with
    // what is wrong, while the socket still accepts and never answers.
    let state = cascade.state_dir_str().to_owned();
    for args in [
        vec!["docker", "check", "--state-dir", &state],
        vec!["restart", "docker", "--dry-run", "--state-dir", &state],
    ] {
        let began = std::time::Instant::now();
        let out = cli(&args, &[]).await;
        let took = began.elapsed();
        eprintln!("`cascade {}` answered in {took:?}", args.join(" "));
        assert_ne!(out.code, Some(0), "{}", out.describe());
        assert!(
            out.stderr.contains("daemon not responding"),
            "{}",
            out.describe()
        );
        assert!(
            took < Duration::from_secs(5),
            "`cascade {}` took {took:?}",
            args.join(" ")
        );
    }
}

/// Waits (up to a minute: the first run builds and starts the container)
/// until the docker tier is healthy and active.
async fn wait_docker_serving(cascade: &Cascade) {
    wait_for(Duration::from_secs(60), "docker active", async || {
        let s = cascade.status().await;
        if s["active"] == "docker" && tier(&s, "docker")["state"] == "healthy" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
}

#[tokio::test]
async fn a_removed_service_container_stops_serving_at_once_and_is_recreated_without_the_breaker() {
    if !engine() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let name = format!("cascade-it-gone-{}", std::process::id());
    let _removed = Removed(name.clone());
    let mut with_three = setup(&name, IMAGE, free_port(), true);
    // Before a failure is definitive, three in a row would be needed.
    with_three.extra = with_three
        .extra
        .replace("consecutive_failures = 2", "consecutive_failures = 3");
    let cascade = Cascade::start(with_three).await;
    wait_docker_serving(&cascade).await;
    let before = docker(&["inspect", "-f", "{{.Id}}", &name]);

    // Removed: the first probe says so and the tier stops serving (it is
    // never reported as a degraded tier still serving), and the start phase
    // recreates it.
    docker(&["rm", "-f", &name]);
    let began = std::time::Instant::now();
    let status = wait_for(
        Duration::from_secs(60),
        "docker serving from a new container",
        async || {
            let s = cascade.status().await;
            let t = tier(&s, "docker");
            assert_ne!(
                t["state"], "degraded",
                "still serving a removed container: {s}"
            );
            let now = cascade_demo::image::docker_cli(&["inspect", "-f", "{{.Id}}", &name]).ok();
            let recreated = now.is_some_and(|id| id != before);
            if s["active"] == "docker" && t["state"] == "healthy" && recreated {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    eprintln!(
        "docker rm -f: serving from a new container after {:?}",
        began.elapsed()
    );
    assert_eq!(tier(&status, "docker")["breaker"], "closed", "{status}");
    assert_eq!(
        tier(&status, "docker")["consecutive_failures"],
        0,
        "{status}"
    );
}

#[tokio::test]
async fn a_reload_that_replaces_the_docker_tier_leaves_its_container_running_and_an_exit_stops_it()
{
    if !engine() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let name = format!("cascade-it-replaced-{}", std::process::id());
    let _removed = Removed(name.clone());
    // `stop_on_exit = true`: cascade's exit stops the container.
    let mut cascade = Cascade::start(setup(&name, IMAGE, free_port(), false)).await;
    wait_docker_serving(&cascade).await;
    let started = |name: &str| {
        docker(&[
            "inspect",
            "-f",
            "{{.Id}} {{.State.Running}} {{.State.StartedAt}}",
            name,
        ])
    };
    let before = started(&name);
    assert!(before.contains(" true "), "{before}");

    // A change to a key that does not touch the container replaces the
    // tier's actor: that is not cascade exiting.
    cascade.edit_config(|text| {
        assert!(text.contains("interval = \"200ms\""), "{text}");
        text.replacen("interval = \"200ms\"", "interval = \"300ms\"", 1)
    });
    cascade.signal(Signal::Hup);
    wait_for(
        crate::support::SHORT,
        "the reload to replace the docker tier",
        async || {
            let logs = cascade.logs();
            if logs.contains("configuration reloaded: docker restarted (changed)") {
                Ok(())
            } else {
                Err(cascade.log_tail())
            }
        },
    )
    .await;
    wait_docker_serving(&cascade).await;
    assert_eq!(
        started(&name),
        before,
        "the service container was stopped or replaced by a reload:\n{}",
        cascade.log_tail()
    );

    cascade.signal(Signal::Term);
    let status = cascade
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("cascade still runs after SIGTERM:\n{}", cascade.log_tail()));
    assert_eq!(status.code(), Some(0), "{}", cascade.log_tail());
    let after = docker(&["inspect", "-f", "{{.Id}} {{.State.Running}}", &name]);
    let id = before.split(' ').next().unwrap_or_default();
    assert_eq!(
        after,
        format!("{id} false"),
        "cascade's exit stops the container (stop_on_exit)"
    );
}
