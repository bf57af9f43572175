//! Autoheal against the real engine: heal latency, idle Docker traffic with
//! 100 labelled containers, and memory. Prints numbers; asserts nothing.
//!
//! Run: `cargo bench -p cascade-actors --bench heal` (about five minutes).
//!
//! Then the same autoheal heals, ten times each, a labelled container that
//! turns unhealthy about 12 s after each start (every heal should go out at
//! once) and one that dies 100 ms after each start (its backoff must hold
//! it back), and the idle memory of `cascade autoheal` is read: the binary
//! at `CASCADE_BIN` (else target/release/cascade) on the host, and the
//! autoheal image (`CASCADE_AUTOHEAL_IMAGE`, else cascade-autoheal:latest)
//! in its container, as a docker-autoheal user runs it.
//!
//! The loop reaches the daemon through a unix-socket relay in this process
//! that counts HTTP requests, so "no periodic per-container calls" is a
//! number rather than a claim. Heal latency is the loop's own measure: the
//! `die` event's `timeNano` to the moment the restart request is sent
//! ([`AutohealHandle::last_heal_latency`]). The bench cannot use the crate's
//! `#[cfg(test)]` helpers, so it builds the demo image with a copy of them;
//! every container it creates carries `cascade.bench=<pid>` and is removed
//! at the end, also after a panic.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cascade_actors::Instance;
use cascade_actors::autoheal::{Autoheal, AutohealHandle, AutohealSpec};
use cascade_actors::notify::NoNotify;
use cascade_actors::supervisor::{self, RootMsg, SupervisorConfig};
use cascade_actors::tiers::docker::config::{DockerConfig, MANAGED_LABEL};
use cascade_actors::tiers::docker::connect::{DockerEnv, DockerHost};
use cascade_actors::waterfall::WaterfallConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "cascade-demo:bench";
const BENCH_LABEL: &str = "cascade.bench";
/// Containers killed one by one to measure healing (managed).
const KILLED: usize = 20;
/// Labelled containers that only sit there during the idle window.
const IDLE: usize = 80;
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Heals measured of each repeatedly failing container.
const REPEATED: u64 = 10;

fn main() {
    if !docker_available() {
        println!("heal bench skipped: no Docker engine here");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cleanup = Cleanup::default();
    runtime.block_on(bench(&cleanup));
}

async fn bench(cleanup: &Cleanup) {
    let started = Instant::now();
    let pid = std::process::id();
    step(&format!("building {IMAGE}"));
    build_image();

    let relay = Relay::start(PathBuf::from(format!("/tmp/cascade-bench-{pid}.sock")));
    let label = format!("cascade-bench-{pid}");
    let mut config = DockerConfig::default();
    config.autoheal.label = label.clone();
    config.host = Some(format!("unix://{}", relay.path.display()));
    // autoheal as cascade runs it: an actor under a root with no tier.
    let autoheal = Autoheal::new();
    let handle = autoheal.handle();
    let spec = AutohealSpec::new(&config, DockerEnv::default(), &autoheal);
    let root = root_with(spec).await;
    wait_for("autoheal connected", Duration::from_secs(20), || {
        handle.connected()
    })
    .await;

    step(&format!(
        "starting {} containers ({KILLED} managed, {IDLE} labelled {label}=true)",
        KILLED + IDLE
    ));
    let bench_label = format!("{BENCH_LABEL}={pid}");
    let managed: Vec<String> = (0..KILLED).map(|i| format!("heal-m-{pid}-{i}")).collect();
    let idle: Vec<String> = (0..IDLE).map(|i| format!("heal-l-{pid}-{i}")).collect();
    cleanup.add(managed.iter().chain(&idle).cloned());
    let managed_label = format!("{MANAGED_LABEL}=true");
    let labelled = format!("{label}=true");
    let mut runs: Vec<Vec<String>> = Vec::new();
    for name in &managed {
        runs.push(run_args(name, &[&bench_label, &managed_label], &[]));
    }
    for name in &idle {
        // A slow health check keeps 80 containers from loading the daemon;
        // they are here to be many, not to be checked.
        runs.push(run_args(
            name,
            &[&bench_label, &labelled],
            &["--health-interval=30s"],
        ));
    }
    let create = Instant::now();
    run_all(runs);
    println!(
        "  created and started in {:.1} s",
        create.elapsed().as_secs_f64()
    );
    for name in &managed {
        let name = name.clone();
        wait_for(
            &format!("{name} healthy"),
            Duration::from_secs(60),
            move || inspect(&name, "{{.State.Health.Status}}").as_deref() == Some("healthy"),
        )
        .await;
    }

    step(&format!(
        "idle for {} s with {} labelled containers running",
        IDLE_WINDOW.as_secs(),
        KILLED + IDLE
    ));
    // Let the events of the start-up burst drain first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = relay.count();
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_requests = relay.count() - before;
    let idle_rss = vm_kib("VmRSS");
    println!(
        "  Docker requests by autoheal while idle: {idle_requests} in {} s",
        IDLE_WINDOW.as_secs()
    );
    for line in relay.lines_since(before as usize) {
        println!("    {line}");
    }
    println!("  bench process VmRSS while idle: {}", mib(idle_rss));

    step(&format!(
        "killing {KILLED} managed containers, one at a time"
    ));
    let before_heals = relay.count();
    let mut latencies = Vec::new();
    let mut to_healthy = Vec::new();
    for name in &managed {
        let started_at = inspect(name, "{{.State.StartedAt}}").unwrap_or_default();
        let kill = Instant::now();
        docker(&["kill", name]);
        wait_for(&format!("{name} healed"), Duration::from_secs(30), || {
            restarts(&handle, name) >= 1
        })
        .await;
        if let Some(latency) = handle.last_heal_latency(name) {
            latencies.push(latency);
        }
        let n = name.clone();
        wait_for(
            &format!("{name} healthy again"),
            Duration::from_secs(60),
            move || {
                inspect(&n, "{{.State.StartedAt}}").is_some_and(|s| s != started_at)
                    && inspect(&n, "{{.State.Health.Status}}").as_deref() == Some("healthy")
            },
        )
        .await;
        to_healthy.push(kill.elapsed());
    }
    let heal_requests = relay.count() - before_heals;

    println!();
    println!(
        "autoheal heal bench ({KILLED} kills of managed containers, Docker {})",
        server_version()
    );
    print_stats("die event -> restart request", &mut latencies);
    print_stats("docker kill -> healthy again", &mut to_healthy);
    println!("  Docker requests by autoheal for {KILLED} heals: {heal_requests}");
    println!(
        "  idle: {idle_requests} requests in {} s with {} labelled containers (target: no periodic per-container calls)",
        IDLE_WINDOW.as_secs(),
        KILLED + IDLE
    );
    println!(
        "  memory: VmRSS {} idle, {} now, VmHWM {} (target: under 30 MiB)",
        mib(idle_rss),
        mib(vm_kib("VmRSS")),
        mib(vm_kib("VmHWM"))
    );

    step(&format!(
        "a labelled container unhealthy about 12 s after each start, healed {REPEATED} times"
    ));
    // DEMO_FAIL_HEALTH_AFTER=10 with the image's health check (every 1 s,
    // 2 retries): unhealthy about 12 s after each start, past the backoff's
    // 10 s reset, so every heal should go out at once. A shorter
    // DEMO_FAIL_HEALTH_AFTER (or `--health-interval`) shortens the run, but
    // below `reset_after` the heals count as a crash loop.
    let flaky = format!("heal-u-{pid}");
    cleanup.add([flaky.clone()]);
    run_all(vec![run_args(
        &flaky,
        &[&bench_label, &labelled],
        &["-e", "DEMO_FAIL_HEALTH_AFTER=10"],
    )]);
    let mut unhealthy = follow_heals(&handle, &flaky, REPEATED, Duration::from_secs(600)).await;
    docker(&["rm", "-f", &flaky]);

    // Stop healing before removing, or the removals would be healed.
    stop_root(root).await;

    step(&format!(
        "a labelled container dying 100 ms after each start, healed {REPEATED} times (backoff 250 ms doubling to 4 s)"
    ));
    let loop_label = format!("cascade-bench-loop-{pid}");
    let mut looping = DockerConfig::default();
    looping.autoheal.label = loop_label.clone();
    looping.autoheal.backoff.base = Duration::from_millis(250);
    looping.autoheal.backoff.cap = Duration::from_secs(4);
    let loop_heal = Autoheal::new();
    let loop_handle = loop_heal.handle();
    let loop_root = root_with(AutohealSpec::new(
        &looping,
        DockerEnv::default(),
        &loop_heal,
    ))
    .await;
    wait_for("autoheal connected", Duration::from_secs(20), || {
        loop_handle.connected()
    })
    .await;
    let crasher = format!("heal-c-{pid}");
    cleanup.add([crasher.clone()]);
    let loop_labelled = format!("{loop_label}=true");
    run_all(vec![run_args(
        &crasher,
        &[&bench_label, &loop_labelled],
        &["-e", "DEMO_EXIT_AFTER=0.1"],
    )]);
    let mut crashing =
        follow_heals(&loop_handle, &crasher, REPEATED, Duration::from_secs(120)).await;
    stop_root(loop_root).await;
    docker(&["rm", "-f", &crasher]);

    println!();
    print_stats(
        "unhealthy ~12 s after each start: unhealthy -> restart request",
        &mut unhealthy,
    );
    print_stats(
        "dying 100 ms after each start: die -> restart request (held back by the backoff)",
        &mut crashing,
    );
    print_each("  dying 100 ms after each start, in order", &crashing);
    standalone_rss(&label);
    image_rss(&label);

    relay.stop();
    step("removing the containers");
    cleanup.run();
    println!("bench finished in {:.0} s", started.elapsed().as_secs_f64());
}

/// A root supervisor with no tier and this autoheal.
async fn root_with(spec: AutohealSpec) -> supervisor::Running {
    let waterfall = WaterfallConfig {
        order: Vec::new(),
        ..WaterfallConfig::default()
    };
    let state_dir = std::env::temp_dir().join(format!("cascade-bench-{}", std::process::id()));
    supervisor::start_with_autoheal(
        Vec::new(),
        waterfall,
        SupervisorConfig::default(),
        Arc::new(NoNotify),
        Instance::from_state_dir(&state_dir),
        Some(spec),
    )
    .await
    .expect("the root starts")
}

async fn stop_root(root: supervisor::Running) {
    let stopped = root
        .root
        .call(RootMsg::Shutdown, Some(Duration::from_secs(10)))
        .await;
    if !matches!(stopped, Ok(ractor::rpc::CallResult::Success(()))) {
        println!("  warning: autoheal did not stop within 10 s");
    }
}

/// Heals of `name` until `heals` were made, each with autoheal's own
/// measure: the failure event's daemon time to the restart request.
async fn follow_heals(
    handle: &AutohealHandle,
    name: &str,
    heals: u64,
    within: Duration,
) -> Vec<Duration> {
    let deadline = Instant::now() + within;
    let mut seen = 0;
    let mut latencies = Vec::new();
    while seen < heals {
        assert!(
            Instant::now() < deadline,
            "timed out after {seen} heals of {name}"
        );
        let now = restarts(handle, name);
        if now > seen {
            if now > seen + 1 {
                println!("  (heals {}..{now} came together; one sample)", seen + 1);
            }
            if let Some(latency) = handle.last_heal_latency(name) {
                println!("  heal {now}: {:.1} ms", latency.as_secs_f64() * 1e3);
                latencies.push(latency);
            }
            seen = now;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies
}

fn print_each(what: &str, samples: &[Duration]) {
    let ms: Vec<String> = samples
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect();
    println!("{what}: {} ms", ms.join(", "));
}

/// Idle resident memory of `cascade autoheal` (the binary at `CASCADE_BIN`,
/// else target/release/cascade) with one label to watch.
fn standalone_rss(label: &str) {
    let bin = std::env::var_os("CASCADE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/cascade")
        });
    if !bin.exists() {
        println!(
            "  idle RSS of `cascade autoheal`: skipped, no {} (cargo build --release --bin cascade, or set CASCADE_BIN)",
            bin.display()
        );
        return;
    }
    let state = std::env::temp_dir().join(format!("cascade-bench-rss-{}", std::process::id()));
    let mut child = Command::new(&bin)
        .args(["autoheal", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env("AUTOHEAL_CONTAINER_LABEL", label)
        .env("CASCADE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn cascade autoheal");
    let api = state.join("api");
    let up = Instant::now();
    while !api.exists() && up.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Idle: connected, nothing to heal.
    std::thread::sleep(Duration::from_secs(10));
    print_memory(
        &format!("idle `cascade autoheal` ({})", bin.display()),
        child.id(),
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state);
}

/// Idle resident memory of the autoheal image (`CASCADE_AUTOHEAL_IMAGE`,
/// else `cascade-autoheal:latest`, built by examples/autoheal-image/build.sh)
/// run as a docker-autoheal user runs it: its own container, the Docker
/// socket mounted, watching `label`.
fn image_rss(label: &str) {
    let image = std::env::var("CASCADE_AUTOHEAL_IMAGE")
        .unwrap_or_else(|_| "cascade-autoheal:latest".to_owned());
    if inspect(&image, "{{.Id}}").is_none() {
        println!(
            "  idle RSS of the autoheal image: skipped, no image {image} (examples/autoheal-image/build.sh)"
        );
        return;
    }
    let name = format!("heal-image-{}", std::process::id());
    let socket = std::env::var("DOCKER_SOCK").unwrap_or_else(|_| "/var/run/docker.sock".into());
    let started = cascade_demo::image::docker_cli(&[
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        &format!("{BENCH_LABEL}={}", std::process::id()),
        "-e",
        &format!("AUTOHEAL_CONTAINER_LABEL={label}"),
        "-v",
        &format!("{socket}:/var/run/docker.sock"),
        &image,
    ]);
    if let Err(e) = started {
        println!("  idle RSS of the autoheal image: cannot start {image}: {e}");
        return;
    }
    std::thread::sleep(Duration::from_secs(10));
    match inspect(&name, "{{.State.Pid}}").and_then(|p| p.parse::<u32>().ok()) {
        Some(pid) if pid > 0 => print_memory(
            &format!("idle autoheal image ({image}), in its container"),
            pid,
        ),
        _ => println!("  idle RSS of the autoheal image: {image} is not running"),
    }
    let _ = cascade_demo::image::docker_cli(&["rm", "-f", &name]);
}

/// Prints `pid`'s resident memory, split into what it allocated and the
/// pages of its executable and libraries the kernel mapped.
fn print_memory(what: &str, pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    println!(
        "  {what}: VmRSS {}, VmHWM {} (target: under 10 MiB)",
        mib(field("VmRSS:")),
        mib(field("VmHWM:"))
    );
    // What the process allocated against the pages of its own executable
    // and libraries the kernel has mapped (file-backed, shared by every
    // process running the same file).
    println!(
        "    of which RssAnon {}, RssFile {} (the mapped binary and libraries); {} threads",
        mib(field("RssAnon:")),
        mib(field("RssFile:")),
        field("Threads:")
    );
}

fn restarts(handle: &AutohealHandle, name: &str) -> u64 {
    handle
        .report()
        .iter()
        .find(|r| r.container == name)
        .map_or(0, |r| r.restarts)
}

fn print_stats(what: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        println!("  {what}: no samples");
        return;
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    println!(
        "  {what}: median {:.1} ms, p90 {:.1} ms, max {:.1} ms (n = {})",
        at(0.5),
        at(0.9),
        at(1.0),
        samples.len()
    );
}

fn step(what: &str) {
    println!("== {what}");
    let _ = std::io::stdout().flush();
}

async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(str::to_owned))
        })
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// === Docker CLI helpers (the crate's test helpers are #[cfg(test)]) ===

fn docker_available() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn server_version() -> String {
    docker(&[
        "version",
        "--format",
        "{{.Server.Version}} (API {{.Server.APIVersion}})",
    ])
}

fn docker(args: &[&str]) -> String {
    cascade_demo::image::docker_cli(args).unwrap_or_else(|e| panic!("{e}"))
}

fn inspect(name: &str, format: &str) -> Option<String> {
    cascade_demo::image::docker_cli(&["inspect", "-f", format, name]).ok()
}

fn run_args(name: &str, labels: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.into()];
    for label in labels {
        args.extend(["--label".to_owned(), (*label).to_owned()]);
    }
    args.extend(extra.iter().map(|e| (*e).to_owned()));
    args.push(IMAGE.into());
    args
}

/// Runs the `docker` invocations on a few threads: the daemon does most of
/// the work, so a little parallelism shortens the set-up a lot.
fn run_all(runs: Vec<Vec<String>>) {
    let queue = Mutex::new(runs);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let Some(args) = queue.lock().expect("queue").pop() else {
                        break;
                    };
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    docker(&args);
                }
            });
        }
    });
}

/// Removes every container the bench created, on drop too (after a panic).
#[derive(Default)]
struct Cleanup(Mutex<Vec<String>>);

impl Cleanup {
    fn add(&self, names: impl IntoIterator<Item = String>) {
        self.0.lock().expect("cleanup").extend(names);
    }

    fn run(&self) {
        let names = std::mem::take(&mut *self.0.lock().expect("cleanup"));
        for chunk in names.chunks(50) {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(chunk)
                .output();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// The demo backend, linked statically, in a `FROM scratch` image with a
/// HEALTHCHECK (the same recipe as the tests' `testing::demo_image`).
fn build_image() {
    if let Err(e) = cascade_demo::image::build(IMAGE) {
        panic!("{e}");
    }
}

// === a counting relay ===

/// Proxies a unix socket to the daemon's and counts the HTTP requests sent
/// through it (request lines in the client-to-daemon direction).
struct Relay {
    path: PathBuf,
    /// Request lines, in order; their number is the request count.
    lines: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Relay {
    fn start(path: PathBuf) -> Relay {
        let DockerHost::Unix(upstream) = DockerHost::resolve(None, &DockerEnv::from_env()) else {
            panic!("the bench needs the daemon on a unix socket");
        };
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind the relay socket");
        let relay = Relay {
            path,
            lines: Arc::default(),
            count: Arc::default(),
            cancel: CancellationToken::new(),
        };
        let (lines, count, cancel) = (
            relay.lines.clone(),
            relay.count.clone(),
            relay.cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { break };
                        let (lines, count, cancel) = (lines.clone(), count.clone(), cancel.clone());
                        let upstream = upstream.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                () = cancel.cancelled() => {}
                                () = pipe(client, upstream, lines, count) => {}
                            }
                        });
                    }
                }
            }
        });
        relay
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn lines_since(&self, from: usize) -> Vec<String> {
        self.lines.lock().expect("lines")[from..].to_vec()
    }

    fn stop(&self) {
        self.cancel.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn pipe(
    client: UnixStream,
    upstream: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicU64>,
) {
    let Ok(daemon) = UnixStream::connect(&upstream).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_daemon, mut to_daemon) = daemon.into_split();
    let up = async {
        let mut buf = [0u8; 8192];
        let mut pending = Vec::new();
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            while let Some(end) = pending.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&pending[..end]).into_owned();
                pending.drain(..end + 2);
                if line.ends_with(" HTTP/1.1") {
                    lines.lock().expect("lines").push(line);
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
            if to_daemon.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_daemon.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut from_daemon, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}
