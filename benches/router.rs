//! The router's benchmark: what routing through cascade costs, side by side
//! with nginx on the same demo backend, and what a failover under load
//! costs the clients. Prints numbers; asserts nothing.
//!
//! `cargo bench --bench router` (root: installs nginx and wrk with apt-get
//! when they are missing; otherwise install them first); `-- overhead` or
//! `-- failover` runs one part. Parts:
//! - overhead: wrk's requests/s and p50/p99 for `GET /health` and
//!   `POST /embed` (1 s of 16 kHz audio), direct, through cascade, through
//!   nginx (upstream keepalive), and through nginx adding the headers
//!   cascade adds (so that backend and client parse the same bytes either
//!   way), with the CPU time (user and system) the proxy spent per request,
//!   nginx's workers included. After a second of warm-up each, three
//!   rounds take turns and each figure is a median: this machine's speed drifts by a tenth within minutes, which
//!   one run per target would charge to whichever ran in a slow moment.
//!   Then a fixed
//!   1,000 req/s (an open-loop client that measures from each request's
//!   scheduled time, as wrk2 does) with p50/p99, and cascade's CPU and RSS
//!   meanwhile;
//! - failover: 200 req/s of `POST /embed` for 20 s, docker tier first and
//!   local second, the container killed at 5 s: non-2xx and the p99 of the
//!   failover second, through cascade twice — the local tier cold-started
//!   by the failover, and `standby = true` (kept warm, as nginx's backup
//!   is) — and through nginx (`backup` upstream, `proxy_next_upstream
//!   error timeout http_502 http_503 non_idempotent`). Needs the Docker
//!   engine; skipped (with a note) without it.
//!
//! Each scenario prints one Markdown table. On a 2-core machine the load
//! generator, the backend, cascade and nginx share the CPU: every table's
//! title says so.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CASCADE: &str = env!("CARGO_BIN_EXE_cascade");
const SHARED: &str = "(load generator, backend and proxy share this machine's CPU)";
const IMAGE: &str = "cascade-demo:bench-router";
/// nginx adding the headers cascade adds (see [`start_nginx`]).
const NGINX_SAME: &str = "nginx, same headers";
/// Throughput rounds per target.
const ROUNDS: usize = 3;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}

/// A child process killed (with its group) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// nginx and wrk, installed from Debian when missing.
fn tools() -> Result<(), String> {
    let missing: Vec<&str> = [("nginx", "nginx-light"), ("wrk", "wrk")]
        .into_iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {} with apt-get", missing.join(", "));
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!(
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {} >/dev/null",
                missing.join(" ")
            ),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if ok && have("nginx") && have("wrk") {
        Ok(())
    } else {
        Err(format!(
            "cannot install {}: install them (apt-get install nginx-light wrk) and run again",
            missing.join(" ")
        ))
    }
}

/// One second of 16 kHz mono 16-bit PCM as a WAV file.
fn wav() -> Vec<u8> {
    let samples: Vec<i16> = (0..16_000)
        .map(|i| ((i * 37) % 2000) as i16 - 1000)
        .collect();
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    for v in [1u16, 1] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [16_000u32, 32_000] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [2u16, 16] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

async fn wait_ok(url: &str, within: Duration) -> Result<(), String> {
    let http = client();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{url} did not answer 200 within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client")
}

// === cascade and nginx ===

fn start_cascade(dir: &Path, router: u16, extra: &str) -> Proc {
    let config = dir.join("cascade.toml");
    std::fs::write(
        &config,
        format!(
            "[general]\nstate_dir = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
             [router]\nlisten = \"127.0.0.1:{router}\"\n{extra}",
            dir.join("state").display()
        ),
    )
    .expect("write the config");
    let log = std::fs::File::create(dir.join("cascade.log")).expect("a log file");
    Proc(
        Command::new(CASCADE)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--log-format", "json"])
            // The default level, as a user runs it.
            .env("CASCADE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cascade"),
    )
}

/// nginx on `port` in front of `upstream`. With `same_headers`, it adds the
/// headers cascade adds: `Forwarded` and the `X-Forwarded-*` family on the
/// way up, a tier and a try count on the way down, so that the backend and
/// the client parse the same bytes through either proxy.
fn start_nginx(dir: &Path, port: u16, upstream: &str, failover: bool, same_headers: bool) -> Proc {
    let prefix = dir.join(format!("nginx-{port}"));
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let user = if nix_is_root() { "user root;" } else { "" };
    let next = if failover {
        "proxy_next_upstream error timeout http_502 http_503 non_idempotent;"
    } else {
        ""
    };
    let headers = if same_headers {
        "proxy_set_header Forwarded \"for=$remote_addr;proto=$scheme;host=\\\"$http_host\\\"\";\n   \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n   \
         proxy_set_header X-Forwarded-Proto $scheme;\n   \
         proxy_set_header X-Forwarded-Host $http_host;\n   \
         add_header X-Cascade-Tier local always;\n   \
         add_header X-Cascade-Attempts 1 always;"
    } else {
        ""
    };
    let conf = format!(
        "{user}\nworker_processes 2;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n access_log off;\n client_body_temp_path {p}/body;\n proxy_temp_path {p}/proxy;\n\
          fastcgi_temp_path {p}/fastcgi;\n uwsgi_temp_path {p}/uwsgi;\n scgi_temp_path {p}/scgi;\n\
          client_max_body_size 64m;\n client_body_buffer_size 1m;\n\
          upstream backend {{ {upstream} keepalive 256; }}\n\
          server {{\n  listen 127.0.0.1:{port};\n  location / {{\n   proxy_pass http://backend;\n\
           proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   proxy_connect_timeout 2s;\n   {next}\n   {headers}\n  }}\n }}\n}}\n",
        p = prefix.display()
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    Proc(
        Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx"),
    )
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `pid` and its children (nginx's master and its workers).
fn with_children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    std::iter::once(pid)
        .chain(out.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect()
}

/// User and system CPU time of `pids`, in clock ticks: `(user, system)`.
fn cpu_ticks_of(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .map(|pid| cpu_split(*pid))
        .fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps))
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// User and system CPU time of `pid`, in clock ticks: `(user, system)`.
fn cpu_split(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(11), field(12))
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let read = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (read("VmRSS:"), read("VmHWM:"))
}

// === wrk ===

struct WrkResult {
    rps: f64,
    /// Requests completed in the run.
    requests: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: String,
}

fn wrk(url: &str, lua: Option<&Path>) -> WrkResult {
    wrk_for(url, lua, "5s")
}

fn wrk_for(url: &str, lua: Option<&Path>, duration: &str) -> WrkResult {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c32", &format!("-d{duration}"), "--latency"]);
    if let Some(script) = lua {
        cmd.arg("-s").arg(script);
    }
    let out = cmd.arg(url).output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let number = |prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.trim_start()[prefix.len()..].split_whitespace().next())
            .and_then(parse_duration_ms)
    };
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // `  123456 requests in 5.00s, 12.34MB read`
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    WrkResult {
        rps,
        requests,
        p50_ms: number("50%").unwrap_or(f64::NAN),
        p99_ms: number("99%").unwrap_or(f64::NAN),
        errors,
    }
}

/// `1.23ms`, `456.00us`, `1.01s` → milliseconds.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(v) = text.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

// === the open-loop client ===

#[derive(Clone)]
enum Kind {
    Health,
    Embed(Arc<Vec<u8>>),
}

/// One request's (scheduled offset, latency from its scheduled time, 2xx?).
/// (when it was due after the start, its latency, why it failed if it did:
/// the status with `x-cascade-attempts` and the body's start, or the error).
type Sample = (Duration, Duration, Option<String>);

/// Sends `rate` requests a second for `length`, each at its scheduled time
/// whatever happened to the others, and measures from that time.
async fn fixed_rate(base: &str, kind: Kind, rate: u32, length: Duration) -> Vec<Sample> {
    let http = client();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = (length.as_secs_f64() * f64::from(rate)) as u32;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + interval * i;
        tokio::time::sleep_until(at).await;
        let (http, kind, base) = (http.clone(), kind.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            let request = match kind {
                Kind::Health => http.get(format!("{base}/health")),
                Kind::Embed(body) => http.post(format!("{base}/embed")).body(body.to_vec()),
            };
            let failure = match request.send().await {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                    None
                }
                Ok(r) => {
                    let status = r.status();
                    let attempts = r
                        .headers()
                        .get("x-cascade-attempts")
                        .and_then(|v| v.to_str().ok())
                        .map(|v| format!(" after {v} attempts"))
                        .unwrap_or_default();
                    let body = r.text().await.unwrap_or_default();
                    let body: String = body.chars().take(160).collect();
                    Some(format!("HTTP {}{attempts}: {body}", status.as_u16()))
                }
                Err(e) => Some(format!("{e}")),
            };
            (at - start, at.elapsed(), failure)
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(sample) = task.await {
            samples.push(sample);
        }
    }
    samples
}

fn percentile(latencies: &mut [Duration], p: f64) -> f64 {
    if latencies.is_empty() {
        return f64::NAN;
    }
    latencies.sort();
    let rank = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
    latencies[rank - 1].as_secs_f64() * 1000.0
}

fn summary(samples: &[Sample]) -> (f64, f64, usize) {
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    let failed = samples.iter().filter(|s| s.2.is_some()).count();
    (
        percentile(&mut latencies, 0.50),
        percentile(&mut latencies, 0.99),
        failed,
    )
}

// === the run ===

async fn run() {
    if let Err(e) = tools() {
        eprintln!("router bench: {e}");
        std::process::exit(1);
    }
    let dir = tempfile::Builder::new()
        .prefix("cascade-bench-router-")
        .tempdir()
        .expect("a temp dir");
    let body = Arc::new(wav());
    let wav_path = dir.path().join("speech.wav");
    std::fs::write(&wav_path, body.as_slice()).expect("write the wav");
    let lua = dir.path().join("embed.lua");
    std::fs::write(
        &lua,
        format!(
            "wrk.method = \"POST\"\nlocal f = io.open(\"{}\", \"rb\")\nwrk.body = f:read(\"*all\")\nf:close()\n\
             wrk.headers[\"Content-Type\"] = \"audio/wav\"\n",
            wav_path.display()
        ),
    )
    .expect("write the wrk script");

    println!("# cascade router benchmark");
    println!(
        "# {} cores; {SHARED}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // `cargo bench --bench router -- overhead` (or `failover`) runs one part.
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
    if wanted("overhead") {
        overhead(dir.path(), &body, &lua).await;
    }
    if wanted("failover") {
        failover(dir.path(), &body).await;
    }
}

async fn overhead(dir: &Path, body: &Arc<Vec<u8>>, lua: &Path) {
    let backend = free_port();
    let router = free_port();
    let nginx_port = free_port();
    let cascade_dir = dir.join("overhead");
    std::fs::create_dir_all(&cascade_dir).expect("dir");
    let cascade = start_cascade(
        &cascade_dir,
        router,
        &format!("[tiers.local]\nport = {backend}\n"),
    );
    let direct = format!("http://127.0.0.1:{backend}");
    let through_cascade = format!("http://127.0.0.1:{router}");
    let through_nginx = format!("http://127.0.0.1:{nginx_port}");
    if let Err(e) = wait_ok(
        &format!("{through_cascade}/health"),
        Duration::from_secs(60),
    )
    .await
    {
        eprintln!(
            "router bench: {e}; cascade's log is in {}",
            cascade_dir.display()
        );
        std::process::exit(1);
    }
    let nginx = start_nginx(
        dir,
        nginx_port,
        &format!("server 127.0.0.1:{backend};"),
        false,
        false,
    );
    let nginx_headers_port = free_port();
    let through_nginx_headers = format!("http://127.0.0.1:{nginx_headers_port}");
    let nginx_headers = start_nginx(
        dir,
        nginx_headers_port,
        &format!("server 127.0.0.1:{backend};"),
        false,
        true,
    );
    for url in [&through_nginx, &through_nginx_headers] {
        if let Err(e) = wait_ok(&format!("{url}/health"), Duration::from_secs(10)).await {
            eprintln!("router bench: nginx: {e}");
            std::process::exit(1);
        }
    }
    let targets = [
        ("direct", direct.as_str()),
        ("cascade", through_cascade.as_str()),
        ("nginx", through_nginx.as_str()),
    ];
    // The throughput runs add nginx doing cascade's header work.
    let throughput_targets = [
        ("direct", direct.as_str()),
        ("cascade", through_cascade.as_str()),
        ("nginx", through_nginx.as_str()),
        (NGINX_SAME, through_nginx_headers.as_str()),
    ];
    // The processes whose CPU time a run through each proxy is charged.
    let proxy_pids = |via: &str| match via {
        "cascade" => vec![cascade.0.id()],
        "nginx" => with_children(nginx.0.id()),
        NGINX_SAME => with_children(nginx_headers.0.id()),
        _ => Vec::new(),
    };

    let mut rows = Vec::new();
    let mut rounds_lines = Vec::new();
    for (name, path, script) in [
        ("GET /health", "/health", None),
        ("POST /embed", "/embed", Some(lua)),
    ] {
        // Rounds that take turns, so that a change in the machine's speed
        // (other work, frequency) falls on every target alike; each
        // target's figures are the median of its rounds.
        let mut runs: Vec<Vec<(WrkResult, (u64, u64))>> =
            throughput_targets.iter().map(|_| Vec::new()).collect();
        // A second of warm-up each, not counted: connections to the
        // backend opened, pages touched.
        for (_, base) in &throughput_targets {
            wrk_for(&format!("{base}{path}"), script, "1s");
        }
        for _ in 0..ROUNDS {
            for ((via, base), runs) in throughput_targets.iter().zip(runs.iter_mut()) {
                let pids = proxy_pids(via);
                let (user0, system0) = cpu_ticks_of(&pids);
                let result = wrk(&format!("{base}{path}"), script);
                let (user1, system1) = cpu_ticks_of(&pids);
                let ticks = (user1.saturating_sub(user0), system1.saturating_sub(system0));
                runs.push((result, ticks));
            }
        }
        let rps = |i: usize| -> Vec<f64> { runs[i].iter().map(|(r, _)| r.rps).collect() };
        let ratios = |of: usize, to: usize| -> Vec<f64> {
            rps(of).iter().zip(rps(to)).map(|(a, b)| a / b).collect()
        };
        let index = |via: &str| {
            throughput_targets
                .iter()
                .position(|(v, _)| *v == via)
                .expect("a target")
        };
        let (nginx_i, same_i, cascade_i) = (index("nginx"), index(NGINX_SAME), index("cascade"));
        let round_list = |values: &[f64]| {
            values
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rounds_lines.push(format!(
            "{name}: cascade / nginx by round: {}; cascade / {NGINX_SAME}: {}",
            round_list(&ratios(cascade_i, nginx_i)),
            round_list(&ratios(cascade_i, same_i)),
        ));
        for (i, (via, _)) in throughput_targets.iter().enumerate() {
            let results = &runs[i];
            let requests: f64 = results.iter().map(|(r, _)| r.requests).sum();
            let (user, system) = results
                .iter()
                .fold((0, 0), |(u, s), (_, (du, ds))| (u + du, s + ds));
            // Clock ticks are 10 ms.
            let per_request = |ticks: u64| ticks as f64 * 10_000.0 / requests;
            let (user, system) = (per_request(user), per_request(system));
            let errors: Vec<&str> = results
                .iter()
                .map(|(r, _)| r.errors.as_str())
                .filter(|e| !e.is_empty())
                .collect();
            rows.push(vec![
                name.to_owned(),
                (*via).to_owned(),
                format!("{:.0}", median(rps(i))),
                format!("{:.2}", median(ratios(i, nginx_i))),
                format!("{:.2}", median(ratios(i, same_i))),
                format!(
                    "{:.3}",
                    median(results.iter().map(|(r, _)| r.p50_ms).collect())
                ),
                format!(
                    "{:.3}",
                    median(results.iter().map(|(r, _)| r.p99_ms).collect())
                ),
                if *via == "direct" {
                    "-".to_owned()
                } else {
                    format!("{:.1} ({user:.1} + {system:.1})", user + system)
                },
                if errors.is_empty() {
                    "-".to_owned()
                } else {
                    errors.join("; ")
                },
            ]);
        }
    }
    table(
        &format!(
            "overhead at maximum throughput: wrk -t2 -c32 -d5s, {ROUNDS} rounds taking turns, medians {SHARED}; target: cascade ≥ 0.90 × nginx"
        ),
        &[
            "request",
            "via",
            "req/s",
            "× nginx",
            "× nginx, same headers",
            "p50 ms",
            "p99 ms",
            "proxy CPU µs/req (user + kernel)",
            "errors",
        ],
        &rows,
    );
    for line in &rounds_lines {
        println!("{line}");
    }
    println!();

    let pid = cascade.0.id();
    let mut rows = Vec::new();
    let mut usage = Vec::new();
    for (name, kind) in [
        ("GET /health", Kind::Health),
        ("POST /embed", Kind::Embed(body.clone())),
    ] {
        let mut measured = Vec::new();
        for (via, base) in targets {
            let before = (cpu_ticks(pid), Instant::now());
            let samples = fixed_rate(base, kind.clone(), 1000, Duration::from_secs(5)).await;
            if via == "cascade" {
                let ticks = cpu_ticks(pid).saturating_sub(before.0) as f64;
                let hz = 100.0;
                let cpu = ticks / hz / before.1.elapsed().as_secs_f64() * 100.0;
                let (rss, peak) = rss_kib(pid);
                usage.push(vec![
                    name.to_owned(),
                    format!("{cpu:.0}"),
                    format!("{:.1}", rss as f64 / 1024.0),
                    format!("{:.1}", peak as f64 / 1024.0),
                ]);
            }
            measured.push((via, summary(&samples)));
        }
        let direct = measured
            .iter()
            .find(|(via, _)| *via == "direct")
            .map_or(f64::NAN, |(_, (_, p99, _))| *p99);
        for (via, (p50, p99, failed)) in measured {
            rows.push(vec![
                name.to_owned(),
                via.to_owned(),
                format!("{p50:.3}"),
                format!("{p99:.3}"),
                if via == "direct" {
                    "-".to_owned()
                } else {
                    format!("{:+.3}", p99 - direct)
                },
                failed.to_string(),
            ]);
        }
    }
    table(
        &format!(
            "overhead at a fixed 1000 req/s for 5 s (open loop, latency from each request's \
             scheduled time) {SHARED}; target: cascade's p99 − direct p99 < 1 ms"
        ),
        &[
            "request",
            "via",
            "p50 ms",
            "p99 ms",
            "p99 − direct ms",
            "failed",
        ],
        &rows,
    );
    table(
        "cascade's resources during the fixed 1000 req/s runs through it",
        &["request", "CPU % of one core", "RSS MiB", "peak RSS MiB"],
        &usage,
    );
    drop(cascade);
}

fn docker(args: &[&str]) -> Result<String, String> {
    cascade_demo::image::docker_cli(args)
}

/// The columns of [`table`] that hold text rather than numbers.
const TEXT: [&str; 4] = ["request", "via", "second tier", "errors"];

/// Prints `rows` under `title` as one Markdown table, columns sized to fit:
/// the [`TEXT`] columns left-aligned, numbers right-aligned. A shorter row
/// (a run that failed) says why in its third cell.
/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                let pad = w.saturating_sub(cell.chars().count());
                if TEXT.contains(&header[i]) {
                    format!("{cell}{}", " ".repeat(pad))
                } else {
                    format!("{}{cell}", " ".repeat(pad))
                }
            })
            .collect();
        println!("| {} |", text.join(" | "));
    };
    println!("\n## {title}\n");
    line(header.to_vec());
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// How the failover run through cascade finds its second tier.
#[derive(Clone, Copy)]
enum Local {
    /// Stopped until the failover starts it.
    Cold,
    /// `standby = true`: started beside the active tier and kept warm, as
    /// nginx's backup is.
    Standby,
}

async fn failover(dir: &Path, body: &Arc<Vec<u8>>) {
    let title = format!(
        "failover under load: 200 req/s of POST /embed for 20 s, docker tier first and \
         local second, the container killed at 5 s {SHARED}; target: cascade 0 non-2xx"
    );
    let header = [
        "via",
        "second tier",
        "requests",
        "non-2xx",
        "p99 ms of the 5–6 s second",
        "p99 ms of the rest",
    ];
    if docker(&["version", "--format", "{{.Server.Version}}"]).is_err() {
        println!("\n## {title}\n\nskipped: no Docker engine");
        return;
    }
    if let Err(e) = cascade_demo::image::build(IMAGE) {
        println!("\n## {title}\n\nskipped: cannot build the demo image: {e}");
        return;
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for local in [Local::Cold, Local::Standby] {
        let second = match local {
            Local::Cold => "local, cold-started by the failover",
            Local::Standby => "local, standby (kept warm)",
        };
        rows.push(match failover_cascade(dir, body, local).await {
            Ok(samples) => {
                failures.push((format!("cascade, {second}"), reasons(&samples)));
                row("cascade", second, &samples)
            }
            Err(e) => vec!["cascade".into(), second.into(), e],
        });
    }
    let second = "backup, already running";
    rows.push(match failover_nginx(dir, body).await {
        Ok(samples) => {
            failures.push((format!("nginx, {second}"), reasons(&samples)));
            row("nginx", second, &samples)
        }
        Err(e) => vec!["nginx".into(), second.into(), e],
    });
    table(&title, &header, &rows);
    for (run, reasons) in failures.iter().filter(|(_, r)| !r.is_empty()) {
        println!("\nnon-2xx through {run}:");
        for (reason, count) in reasons {
            println!("  {count} × {reason}");
        }
    }
}

/// Why the failed samples failed, each reason with how often.
fn reasons(samples: &[Sample]) -> std::collections::BTreeMap<String, usize> {
    let mut reasons = std::collections::BTreeMap::new();
    for reason in samples.iter().filter_map(|s| s.2.clone()) {
        *reasons.entry(reason).or_insert(0) += 1;
    }
    reasons
}

/// The failover run through cascade; the samples, or why there are none.
async fn failover_cascade(
    dir: &Path,
    body: &Arc<Vec<u8>>,
    local: Local,
) -> Result<Vec<Sample>, String> {
    let label = match local {
        Local::Cold => "cold",
        Local::Standby => "standby",
    };
    let name = format!("cascade-bench-router-{label}-{}", std::process::id());
    let tag = format!("{IMAGE}-{label}-{}", std::process::id());
    docker(&["tag", IMAGE, &tag])?;
    let router = free_port();
    let local_port = free_port();
    let cascade_dir = dir.join(format!("failover-{label}"));
    std::fs::create_dir_all(&cascade_dir).expect("dir");
    let standby = match local {
        Local::Cold => "",
        Local::Standby => "standby = true\n",
    };
    let cascade = start_cascade(
        &cascade_dir,
        router,
        &format!(
            "[waterfall]\norder = [\"docker\", \"local\"]\n\
             [tiers.local]\nport = {local_port}\n{standby}\
             [tiers.docker]\nstart_timeout = \"60s\"\nstop_on_exit = true\n\
             probe = {{ interval = \"200ms\", timeout = \"1s\" }}\n\
             autoheal = {{ enabled = false }}\n\
             [[tiers.docker.containers]]\nname = \"{name}\"\nimage = \"{tag}\"\nports = [\"{}:8080\"]\n",
            free_port()
        ),
    );
    let base = format!("http://127.0.0.1:{router}");
    let ready = async {
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(r) = http.get(format!("{base}/health")).send().await
                && r.headers()
                    .get("x-cascade-tier")
                    .is_some_and(|t| t == "docker")
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "docker never served; see {}",
            cascade_dir.display()
        ))
    };
    let mut outcome = ready.await;
    if outcome.is_ok() && matches!(local, Local::Standby) {
        outcome = wait_ok(
            &format!("http://127.0.0.1:{local_port}/health"),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| format!("the standby local tier did not come up: {e}"));
    }
    let result = match outcome {
        Ok(()) => {
            let (tag, name) = (tag.clone(), name.clone());
            Ok(under_load_kill_at_5s(&base, body, move || {
                let _ = docker(&["rmi", &tag]);
                let _ = docker(&["rm", "-f", &name]);
            })
            .await)
        }
        Err(e) => Err(e),
    };
    drop(cascade);
    let _ = docker(&["rm", "-f", &name]);
    let _ = docker(&["rmi", &tag]);
    result
}

/// The same run through nginx: the same container as primary, a running
/// demo backend as backup.
async fn failover_nginx(dir: &Path, body: &Arc<Vec<u8>>) -> Result<Vec<Sample>, String> {
    let primary = free_port();
    let backup = free_port();
    let nginx_port = free_port();
    let container = format!("cascade-bench-router-nginx-{}", std::process::id());
    let started = docker(&[
        "run",
        "-d",
        "--name",
        &container,
        "-p",
        &format!("127.0.0.1:{primary}:8080"),
        IMAGE,
    ]);
    let _local = Proc(
        Command::new(CASCADE)
            .args(["demo-backend", "--port", &backup.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the backup backend"),
    );
    let _nginx = start_nginx(
        dir,
        nginx_port,
        &format!(
            "server 127.0.0.1:{primary} max_fails=1 fail_timeout=10s; server 127.0.0.1:{backup} backup;"
        ),
        true,
        false,
    );
    let base = format!("http://127.0.0.1:{nginx_port}");
    let up = async {
        started?;
        wait_ok(
            &format!("http://127.0.0.1:{primary}/health"),
            Duration::from_secs(30),
        )
        .await?;
        wait_ok(
            &format!("http://127.0.0.1:{backup}/health"),
            Duration::from_secs(30),
        )
        .await?;
        wait_ok(&format!("{base}/health"), Duration::from_secs(10)).await
    };
    let result = match up.await {
        Ok(()) => {
            let container = container.clone();
            Ok(under_load_kill_at_5s(&base, body, move || {
                let _ = docker(&["kill", &container]);
            })
            .await)
        }
        Err(e) => Err(format!("the primary, backup or nginx did not come up: {e}")),
    };
    let _ = docker(&["rm", "-f", &container]);
    result
}

/// 200 req/s of `POST /embed` to `base` for 20 s, with `kill` run 5 s in.
async fn under_load_kill_at_5s(
    base: &str,
    body: &Arc<Vec<u8>>,
    kill: impl FnOnce() + Send + 'static,
) -> Vec<Sample> {
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        kill();
    });
    let samples = fixed_rate(
        base,
        Kind::Embed(body.clone()),
        200,
        Duration::from_secs(20),
    )
    .await;
    let _ = killer.await;
    samples
}

/// One row of the failover table.
fn row(via: &str, second: &str, samples: &[Sample]) -> Vec<String> {
    let failed = samples.iter().filter(|s| s.2.is_some()).count();
    let in_second = |s: &&Sample| s.0 >= Duration::from_secs(5) && s.0 < Duration::from_secs(6);
    let mut during: Vec<Duration> = samples.iter().filter(in_second).map(|s| s.1).collect();
    let mut rest: Vec<Duration> = samples
        .iter()
        .filter(|s| !in_second(s))
        .map(|s| s.1)
        .collect();
    vec![
        via.to_owned(),
        second.to_owned(),
        samples.len().to_string(),
        failed.to_string(),
        format!("{:.1}", percentile(&mut during, 0.99)),
        format!("{:.1}", percentile(&mut rest, 0.99)),
    ]
}
