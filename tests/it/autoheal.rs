//! Autoheal through the real binary and the real engine: `cascade autoheal`
//! as the host's autoheal with no tier, a configuration with no tiers,
//! docker-autoheal's environment with the `all` mode and the opt-out label,
//! and the image that runs in place of docker-autoheal's.
//!
//! Every cascade here considers only containers carrying its test's scope
//! label (`TEST_AUTOHEAL_SCOPE`, read by debug builds only), so neither the
//! `all` mode nor a shared label reaches another test's containers.

use std::time::Duration;

use serde_json::Value;

use crate::docker::{IMAGE, Removed, docker, engine};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{Cascade, Setup, wait_for};

const HEALED_WITHIN: Duration = Duration::from_secs(60);

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `cascade autoheal` with docker-autoheal's variables `env`, limited to
/// containers labelled `scope`.
fn standalone(scope: &str, env: &[(&str, &str)]) -> Setup {
    let mut setup = Setup {
        subcommand: "autoheal".into(),
        ..Setup::default()
    };
    setup
        .env
        .push(("TEST_AUTOHEAL_SCOPE".into(), scope.to_owned()));
    setup
        .env
        .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    setup
}

/// `docker run -d` of the demo image with `labels` and `env`; removed when
/// the returned guard drops.
fn run(name: &str, labels: &[&str], env: &[&str]) -> Removed {
    let mut args = vec!["run", "-d", "--name", name, "--label", "cascade.test=it"];
    for label in labels {
        args.extend(["--label", label]);
    }
    for e in env {
        args.extend(["-e", e]);
    }
    args.push(IMAGE);
    docker(&args);
    Removed(name.to_owned())
}

fn heal_of(status: &Value, name: &str) -> Option<Value> {
    status["autoheal"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["container"] == name)
        .cloned()
}

fn restarts_of(status: &Value, name: &str) -> u64 {
    heal_of(status, name).map_or(0, |c| c["restarts"].as_u64().unwrap_or(0))
}

fn inspect(name: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, name])
}

async fn connected(cascade: &Cascade) -> Value {
    wait_for(Duration::from_secs(30), "autoheal connected", async || {
        let s = cascade.status().await;
        if s["autoheal"]["connected"] == true {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
}

async fn healed(cascade: &Cascade, name: &str) -> Value {
    wait_for(HEALED_WITHIN, "the container healed", async || {
        let s = cascade.status().await;
        if restarts_of(&s, name) >= 1 {
            Ok(s)
        } else {
            Err(s["autoheal"].to_string())
        }
    })
    .await
}

#[tokio::test]
async fn cascade_autoheal_heals_with_no_tier_and_serves_status_and_metrics() {
    if !engine() {
        return;
    }
    let scope = format!("cascade.it.scope={}", unique("scope"));
    let label = unique("heal-me");
    let cascade = Cascade::start(standalone(&scope, &[("AUTOHEAL_CONTAINER_LABEL", &label)])).await;
    let status = connected(&cascade).await;
    assert_eq!(status["tiers"], serde_json::json!([]), "no tier: {status}");
    assert!(status["active"].is_null(), "{status}");

    let name = unique("ah-standalone");
    let _removed = run(
        &name,
        &[&scope, &format!("{label}=true")],
        &["DEMO_FAIL_HEALTH_AFTER=1"],
    );
    let status = healed(&cascade, &name).await;
    let heal = heal_of(&status, &name).expect("reported");
    assert!(
        heal["last_heal"]
            .as_str()
            .is_some_and(|l| l.contains("unhealthy")),
        "{heal}"
    );
    assert!(status["autoheal"]["heals"].as_u64() >= Some(1), "{status}");
    assert!(status["autoheal"]["last_event"].is_string(), "{status}");

    let (code, metrics) = cascade.get("/metrics").await;
    assert_eq!(code, 200);
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .map(str::to_owned)
    };
    let connected = line("cascade_autoheal_connected").unwrap_or_default();
    assert!(connected.ends_with(" 1"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cascade_autoheal_restarts_total")
                && l.contains(&format!("container=\"{name}\""))),
        "{metrics}"
    );
    // Nothing of its own: no service container, no router.
    let instance = status["instance"]["id"].as_str().expect("instance id");
    let own = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=cascade.instance={instance}"),
    ]);
    assert_eq!(own, "", "cascade autoheal created containers");
    assert!(status["router"].is_null(), "{status}");
    let (code, _) = cascade.get("/healthz").await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn a_configuration_with_no_tiers_runs_autoheal_alone() {
    if !engine() {
        return;
    }
    let scope = format!("cascade.it.scope={}", unique("scope"));
    let mut setup = Setup {
        order: Vec::new(),
        ..Setup::default()
    };
    setup
        .env
        .push(("TEST_AUTOHEAL_SCOPE".into(), scope.clone()));
    let cascade = Cascade::start(setup).await;
    let status = connected(&cascade).await;
    assert_eq!(status["tiers"], serde_json::json!([]), "{status}");
    assert!(
        status["decision"]
            .as_str()
            .is_some_and(|d| d.contains("no tiers configured")),
        "{status}"
    );
}

#[tokio::test]
async fn docker_autoheal_environment_all_mode_opt_out_and_webhook() {
    if !engine() {
        return;
    }
    let scope = format!("cascade.it.scope={}", unique("scope"));
    let hook = Hook::start().await;
    let url = format!("http://{}/slack", hook.addr);
    let cascade = Cascade::start(standalone(
        &scope,
        &[
            ("AUTOHEAL_CONTAINER_LABEL", "all"),
            ("AUTOHEAL_INTERVAL", "5"),
            ("AUTOHEAL_START_PERIOD", "0"),
            ("AUTOHEAL_DEFAULT_STOP_TIMEOUT", "2"),
            ("DOCKER_SOCK", "/var/run/docker.sock"),
            ("WEBHOOK_URL", &url),
            ("WEBHOOK_JSON_KEY", "text"),
        ],
    ))
    .await;
    connected(&cascade).await;
    let logs = cascade.logs();
    assert!(
        logs.contains("AUTOHEAL_INTERVAL=5: not needed"),
        "AUTOHEAL_INTERVAL not reported as unneeded:\n{logs}"
    );

    // Opted out, and unhealthy first: by the time a later container's heal
    // is done, autoheal has read this one's `unhealthy` and left it alone.
    let opted_out = unique("ah-optout");
    let _a = run(
        &opted_out,
        &[&scope, "autoheal=False"],
        &["DEMO_FAIL_HEALTH_AFTER=1"],
    );
    wait_for(
        HEALED_WITHIN,
        "the opted-out container unhealthy",
        async || {
            let health = inspect(&opted_out, "{{.State.Health.Status}}");
            if health == "unhealthy" {
                Ok(())
            } else {
                Err(health)
            }
        },
    )
    .await;
    let opted_out_started = inspect(&opted_out, "{{.State.StartedAt}}");

    // No label at all: `all` heals it, with the label's stop timeout.
    let any = unique("ah-any");
    let _b = run(
        &any,
        &[&scope, "autoheal.stop.timeout=1"],
        &["DEMO_FAIL_HEALTH_AFTER=1"],
    );
    let status = healed(&cascade, &any).await;
    assert!(heal_of(&status, &opted_out).is_none(), "{status}");
    assert_eq!(
        inspect(&opted_out, "{{.State.StartedAt}}"),
        opted_out_started,
        "the opted-out container was restarted"
    );

    // docker-autoheal's webhook shape: {"<WEBHOOK_JSON_KEY>": "<text>"}.
    let (path, json) = wait_for(Duration::from_secs(20), "the webhook", async || {
        let posts = hook.posts.lock().expect("posts").clone();
        posts
            .into_iter()
            .find(|(_, json)| json["text"].as_str().is_some_and(|t| t.contains(&any)))
            .ok_or_else(|| "no notification of the heal yet".to_owned())
    })
    .await;
    assert_eq!(path, "/slack");
    let text = json["text"].as_str().unwrap_or_default();
    assert!(text.contains("unhealthy"), "{json}");
    assert_eq!(json.as_object().map(|o| o.len()), Some(1), "{json}");
}

// === a webhook receiver ===

/// Collects (path, JSON body) of every POST it receives.
struct Hook {
    addr: std::net::SocketAddr,
    posts: Arc<Mutex<Vec<(String, Value)>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start() -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hook");
        let addr = listener.local_addr().expect("addr");
        let posts = Arc::new(Mutex::new(Vec::new()));
        let sink = posts.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    if let Some((path, body)) = read_post(&mut conn).await {
                        if let Ok(json) = serde_json::from_slice(&body) {
                            sink.lock().expect("posts").push((path, json));
                        }
                        let _ = conn
                            .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                });
            }
        });
        Hook {
            addr,
            posts,
            server,
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The path and body of one HTTP/1.1 request with a content-length.
async fn read_post(conn: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
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
        let path = head.split_whitespace().nth(1)?.to_owned();
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
        return Some((path, buf[end + 4..end + 4 + length].to_vec()));
    }
}

// === the image ===

#[tokio::test]
async fn the_image_runs_in_place_of_docker_autoheal_with_the_socket_mounted() {
    if !engine() {
        return;
    }
    // An unoptimised build is quicker to make and heals alike; it reuses
    // target/docker-image across runs.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/autoheal-image/build.sh"
    );
    let tag = "cascade-autoheal:it";
    let built = std::process::Command::new(script)
        .arg(tag)
        .env("CASCADE_IMAGE_PROFILE", "dev")
        .output()
        .expect("run build.sh");
    assert!(
        built.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert_eq!(
        docker(&["image", "inspect", "-f", "{{json .Config.Entrypoint}}", tag]),
        r#"["/cascade","autoheal"]"#
    );

    let scope = format!("cascade.it.scope={}", unique("scope"));
    let label = unique("heal-me");
    let healer = unique("ah-image");
    let _healer = Removed(healer.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &healer,
        "--label",
        "cascade.test=it",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-e",
        &format!("AUTOHEAL_CONTAINER_LABEL={label}"),
        "-e",
        &format!("TEST_AUTOHEAL_SCOPE={scope}"),
        "-e",
        "AUTOHEAL_INTERVAL=5",
        tag,
    ]);
    let status = || {
        let out = std::process::Command::new("docker")
            .args(["exec", &healer, "/cascade", "status", "--json"])
            .output()
            .expect("docker exec");
        serde_json::from_slice::<Value>(&out.stdout).map_err(|e| {
            format!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    wait_for(
        Duration::from_secs(30),
        "the image's autoheal connected",
        async || {
            let s = status()?;
            if s["autoheal"]["connected"] == true {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;

    let name = unique("ah-imaged");
    let _removed = run(
        &name,
        &[&scope, &format!("{label}=true")],
        &["DEMO_FAIL_HEALTH_AFTER=1"],
    );
    let started = inspect(&name, "{{.State.StartedAt}}");
    wait_for(HEALED_WITHIN, "healed from inside the image", async || {
        let s = status()?;
        if restarts_of(&s, &name) >= 1 {
            Ok(())
        } else {
            Err(s["autoheal"].to_string())
        }
    })
    .await;
    assert_ne!(inspect(&name, "{{.State.StartedAt}}"), started);
    let logs = std::process::Command::new("docker")
        .args(["logs", &healer])
        .output()
        .expect("docker logs");
    let logs =
        String::from_utf8_lossy(&logs.stderr).into_owned() + &String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("AUTOHEAL_INTERVAL=5: not needed"), "{logs}");
}
