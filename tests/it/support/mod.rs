//! The harness: a real `cascade run` process with its own temp state directory
//! and free ports, HTTP and CLI helpers, deadline-bounded polling, and process
//! checks. Dropping a [`Cascade`] stops and reaps it, so no test leaks processes.

use std::collections::HashSet;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test; `{cascade}` in the local tier's command is this too.
pub const BIN: &str = env!("CARGO_BIN_EXE_cascade");

/// Bound for things that normally take well under a second. Generous because
/// the suite runs its tests in parallel on a small machine.
pub const SHORT: Duration = Duration::from_secs(15);

/// How often [`wait_for`] looks again.
const POLL: Duration = Duration::from_millis(50);

// === ports, processes, polling ===

/// Ports already handed out by this test binary, so two tests never get the same one.
static HANDED_OUT: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// A TCP port on 127.0.0.1 that was free a moment ago and that no other test of
/// this binary has been given. Drawn from below the kernel's ephemeral range
/// (32768 and up on Linux): a port picked there can be taken by any outgoing
/// connection before the test's backend binds it, sometimes seconds later.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Start at a per-process offset so concurrent test binaries spread out.
    static NEXT: LazyLock<AtomicU16> =
        LazyLock::new(|| AtomicU16::new(20_000 + (std::process::id() % 4_000) as u16 * 3));
    loop {
        let candidate = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = if (20_000..32_000).contains(&candidate) {
            candidate
        } else {
            NEXT.store(20_000, Ordering::Relaxed);
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut used = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if used.insert(port) {
            return port;
        }
    }
}

/// Polls `check` until it returns `Ok`, at most for `timeout`. `Err` carries
/// what was last seen; it is returned when time runs out.
pub async fn poll<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// [`poll`], panicking with `what` and the last observation on timeout.
pub async fn wait_for<T>(
    timeout: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    match poll(timeout, check).await {
        Ok(value) => value,
        Err(last) => panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}"),
    }
}

/// Whether `pid` is gone: no such process, or a zombie waiting for init to reap it.
pub fn process_gone(pid: i32) -> bool {
    // /proc/PID/stat: "pid (comm) S ..."; comm may contain spaces and parentheses.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Polls until `pid` is gone.
pub async fn wait_gone(pid: i32, timeout: Duration, what: &str) {
    wait_for(timeout, what, async || {
        if process_gone(pid) {
            Ok(())
        } else {
            Err(format!("process {pid} still exists"))
        }
    })
    .await;
}

/// The signals the tests send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Int,
    Term,
    Kill,
    Hup,
    Stop,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Int => "INT",
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
            Signal::Hup => "HUP",
            Signal::Stop => "STOP",
        }
    }
}

/// SIGKILLs a process a test started indirectly (say, a backend's own child)
/// when dropped, so a failing test leaks nothing.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !process_gone(self.0) {
            let _ = Command::new("kill")
                .args(["-s", "KILL", &self.0.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sends `signal` to `pid` (with kill(1): the test crate has no libc or nix).
pub fn send_signal(pid: i32, signal: Signal) {
    let out = Command::new("kill")
        .args(["-s", signal.name(), &pid.to_string()])
        .output()
        .expect("run kill(1)");
    assert!(
        out.status.success(),
        "kill -s {} {pid} failed: {}",
        signal.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes inherited variables that would change what cascade or the demo
/// backend does (config keys, config file, log level, demo knobs).
fn clean_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("CASCADE_")
            || text.starts_with("DEMO_")
            || text == "RUST_LOG"
            || text == "STATE_DIRECTORY"
            || text == "XDG_STATE_HOME"
            || text.starts_with("OTEL_")
            || text == "GCE_METADATA_HOST"
            || text == "GOOGLE_APPLICATION_CREDENTIALS"
            || text == "GOOGLE_CLOUD_PROJECT"
        {
            cmd.env_remove(&name);
        }
    }
    cmd.env("CASCADE_LOG", "info");
}

// === one-shot CLI runs ===

/// What a finished `cascade ...` command printed.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Both streams, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cascade ARGS` with a clean environment plus `env`, bounded in time.
pub async fn cli(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    clean_env(&mut cmd);
    cmd.envs(env.iter().copied());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`cascade {}` did not finish within 60s", args.join(" ")))
        .unwrap_or_else(|e| panic!("cannot run `cascade {}`: {e}", args.join(" ")));
    CliOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A temp directory holding one config file, for `check-config` and friends.
pub struct ConfigFile {
    pub dir: TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        let dir = tempfile::Builder::new()
            .prefix("cascade-it-")
            .tempdir()
            .expect("create a temp dir");
        let path = dir.path().join("cascade.toml");
        fs::write(&path, text).expect("write the config file");
        ConfigFile { dir, path }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

/// A TOML string literal.
pub fn toml_str(text: &str) -> String {
    // JSON string escapes are valid in TOML basic strings.
    serde_json::to_string(text).expect("strings serialize")
}

fn toml_array(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", items.join(", "))
}

// === a running cascade ===

/// What to run as the local tier, and any extra configuration.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `[tiers.local] command`.
    pub command: String,
    /// `[tiers.local] args`.
    pub args: Vec<String>,
    /// `[tiers.local] stop_grace`.
    pub stop_grace: String,
    /// More `key = value` lines for `[tiers.local]` (keys not set above).
    pub local: Vec<String>,
    /// Raw TOML appended after `[tiers.local]` (other tables).
    pub extra: String,
    /// Extra flags for `cascade run`.
    pub run_args: Vec<String>,
    /// `[tiers.local.probe] interval`.
    pub probe_interval: String,
    /// Extra environment variables for `cascade run`.
    pub env: Vec<(String, String)>,
    /// `[waterfall] order`.
    pub order: Vec<String>,
    /// Extra `key = value` lines for `[waterfall]`.
    pub waterfall: Vec<String>,
    /// Extra `key = value` lines for `[api]` (besides `listen`).
    pub api: Vec<String>,
    /// Options for the shell's `ulimit` before cascade starts (e.g. `-n 160`
    /// for an open-file limit of 160, `-Sn 200` for the soft one only).
    pub ulimit: Option<String>,
    /// `[tiers.local] port`; a free one when `None`.
    pub port: Option<u16>,
    /// `run`, or `autoheal`.
    pub subcommand: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            command: "{cascade}".into(),
            args: ["demo-backend", "--port", "{port}"]
                .map(String::from)
                .into(),
            stop_grace: "500ms".into(),
            local: Vec::new(),
            extra: String::new(),
            run_args: Vec::new(),
            probe_interval: "100ms".into(),
            env: Vec::new(),
            order: vec!["local".into()],
            waterfall: Vec::new(),
            api: Vec::new(),
            ulimit: None,
            port: None,
            subcommand: "run".into(),
        }
    }
}

impl Setup {
    /// The built-in demo backend with these extra arguments.
    pub fn demo(extra_args: &[&str]) -> Setup {
        let mut setup = Setup::default();
        setup.args.extend(extra_args.iter().map(|a| a.to_string()));
        setup
    }

    /// A backend that is slow to stop, like a service draining requests: a
    /// shell that ignores SIGTERM (so only SIGKILL after `stop_grace` ends
    /// it) running the demo backend, which stops serving on SIGTERM at once.
    /// `details.pid` is the shell's.
    pub fn slow_to_stop(stop_grace: &str) -> Setup {
        let script = format!(
            "trap '' TERM; '{BIN}' demo-backend --port {{port}} & while :; do sleep 0.1; done"
        );
        Setup {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), script],
            stop_grace: stop_grace.into(),
            ..Setup::default()
        }
    }

    /// Adds a `key = value` line under `[tiers.local]`.
    pub fn local(mut self, line: &str) -> Setup {
        self.local.push(line.to_owned());
        self
    }

    /// Appends raw TOML (other tables) after `[tiers.local]`.
    pub fn extra(mut self, toml: &str) -> Setup {
        self.extra.push_str(toml);
        self
    }

    /// The configuration file for a cascade with state in `state_dir` and
    /// the local tier on `port`.
    pub fn render(&self, state_dir: &Path, port: u16) -> String {
        let state_dir = state_dir.to_str().expect("temp paths are UTF-8");
        let mut text = format!(
            "[general]\n\
             state_dir = {state_dir}\n\
             \n\
             [api]\n\
             listen = \"127.0.0.1:0\"\n\
             {api}\n\
             [waterfall]\n\
             order = {order}\n\
             {waterfall}\n\
             [tiers.local]\n\
             command = {command}\n\
             args = {args}\n\
             port = {port}\n\
             stop_grace = {grace}\n\
             start_timeout = \"10s\"\n\
             probe = {{ interval = {interval}, timeout = \"500ms\" }}\n",
            state_dir = toml_str(state_dir),
            command = toml_str(&self.command),
            args = toml_array(&self.args),
            grace = toml_str(&self.stop_grace),
            interval = toml_str(&self.probe_interval),
            order = toml_array(&self.order),
            api = self
                .api
                .iter()
                .map(|line| format!("{line}\n"))
                .collect::<String>(),
            waterfall = self
                .waterfall
                .iter()
                .map(|line| format!("{line}\n"))
                .collect::<String>(),
        );
        for line in &self.local {
            text.push_str(line);
            text.push('\n');
        }
        text.push('\n');
        text.push_str(&self.extra);
        text
    }
}

/// Spawns `cascade run` on `config`, appending its stderr to `stderr_path`.
fn spawn(setup: &Setup, config: &Path, root: &Path, stderr_path: &Path) -> Child {
    let append = |path: &Path| {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    };
    let mut cmd = match &setup.ulimit {
        // `exec`, so the pid is cascade's own.
        Some(limit) => {
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", &format!("ulimit {limit} && exec \"$0\" \"$@\""), BIN]);
            cmd
        }
        None => Command::new(BIN),
    };
    cmd.arg(&setup.subcommand)
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json"])
        .args(&setup.run_args)
        .stdin(Stdio::null())
        .stdout(append(&root.join("stdout.log")))
        .stderr(append(stderr_path));
    clean_env(&mut cmd);
    // The router's default port may be taken (another cascade, another
    // test): every test cascade routes on a port of its own, which `/status`
    // reports, unless the test says otherwise.
    cmd.env("CASCADE_ROUTER__LISTEN", "127.0.0.1:0");
    cmd.envs(setup.env.iter().map(|(k, v)| (k, v)));
    cmd.spawn().expect("spawn `cascade run`")
}

/// A `cascade run --config FILE --log-format json` child process.
pub struct Cascade {
    /// Holds the config, the logs and the state dir; removed on drop.
    root: TempDir,
    /// What it was started with, for [`Cascade::respawn`].
    setup: Setup,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    /// The local tier's port.
    pub port: u16,
    /// Where the status API listens (read from `STATE_DIR/api`).
    pub api: SocketAddr,
    child: Child,
    exit: Option<ExitStatus>,
    stderr_path: PathBuf,
    http: reqwest::Client,
}

impl Cascade {
    /// Starts cascade with `setup` and waits until it has written `STATE_DIR/api`.
    pub async fn start(setup: Setup) -> Cascade {
        let root = tempfile::Builder::new()
            .prefix("cascade-it-")
            .tempdir()
            .expect("create a temp dir");
        let state_dir = root.path().join("state");
        let port = setup.port.unwrap_or_else(free_port);
        let config_path = root.path().join("cascade.toml");
        fs::write(&config_path, setup.render(&state_dir, port)).expect("write the config file");
        let stderr_path = root.path().join("stderr.log");
        let child = spawn(&setup, &config_path, root.path(), &stderr_path);

        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("build an HTTP client");
        let mut cascade = Cascade {
            root,
            setup,
            state_dir,
            config_path,
            port,
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
            exit: None,
            stderr_path,
            http,
        };
        cascade.wait_api().await;
        cascade
    }

    /// Starts cascade again, on the same configuration and state directory,
    /// after it has exited (e.g. after a SIGKILL). Logs of all runs are
    /// kept in one file.
    pub async fn respawn(&mut self) {
        assert!(
            self.try_exit().is_some(),
            "respawn while cascade still runs"
        );
        // A stale address from the previous run must not be mistaken for the new one.
        let _ = fs::remove_file(self.state_dir.join("api"));
        self.child = spawn(
            &self.setup,
            &self.config_path,
            self.root.path(),
            &self.stderr_path,
        );
        self.exit = None;
        self.wait_api().await;
    }

    async fn wait_api(&mut self) {
        let cascade = self;
        let api_file = cascade.state_dir.join("api");
        let api = wait_for(SHORT, "cascade to write STATE_DIR/api", async || {
            if let Some(status) = cascade.try_exit() {
                panic!(
                    "cascade exited during start-up ({status}); stderr:\n{}",
                    cascade.logs()
                );
            }
            let text = fs::read_to_string(&api_file).map_err(|e| e.to_string())?;
            text.trim()
                .parse::<SocketAddr>()
                .map_err(|e| format!("{text:?}: {e}"))
        })
        .await;
        cascade.api = api;
    }

    /// Starts cascade and waits until the local tier is active and healthy.
    pub async fn start_ready(setup: Setup) -> Cascade {
        let cascade = Cascade::start(setup).await;
        cascade.wait_ready().await;
        cascade
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit i32")
    }

    pub fn state_dir_str(&self) -> &str {
        self.state_dir.to_str().expect("temp paths are UTF-8")
    }

    /// The local tier's endpoint as status reports it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// cascade's stderr so far (its JSON log lines).
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The exit status, if cascade has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait on cascade");
        }
        self.exit
    }

    /// Waits for cascade to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rewrites cascade's config file with `edit` applied to its current
    /// text (for reloads).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = fs::read_to_string(&self.config_path).expect("read the config file");
        fs::write(&self.config_path, edit(text)).expect("write the config file");
    }

    /// Sends `signal` to cascade.
    pub fn signal(&self, signal: Signal) {
        send_signal(self.pid(), signal);
    }

    /// The bearer token cascade wrote.
    pub fn token(&self) -> String {
        fs::read_to_string(self.state_dir.join("token"))
            .expect("read STATE_DIR/token")
            .trim()
            .to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// GET on the status API: (HTTP status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.http, &self.url(path)).await
    }

    /// GET on the status API, body parsed as JSON.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (code, body) = self.get(path).await;
        (code, parse_json(&body, path))
    }

    /// POST on the status API with an optional `Authorization` header value.
    pub async fn post(&self, path: &str, authorization: Option<&str>) -> (u16, Value) {
        // Restarts answer after stop_grace plus the new start.
        let mut request = self
            .http
            .post(self.url(path))
            .timeout(Duration::from_secs(30));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let code = response.status().as_u16();
        let body = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: reading the body: {e}"));
        (code, parse_json(&body, path))
    }

    /// POST with the right bearer token.
    pub async fn post_authorized(&self, path: &str) -> (u16, Value) {
        let header = format!("Bearer {}", self.token());
        self.post(path, Some(&header)).await
    }

    /// Where the router listens, as `/status` reports it.
    pub async fn router_addr(&self) -> SocketAddr {
        let status = self.status().await;
        status["router"]["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no router address in status: {status}"))
    }

    /// `GET /status`, which must answer 200.
    pub async fn status(&self) -> Value {
        let (code, body) = self.get_json("/status").await;
        assert_eq!(code, 200, "GET /status: {body}");
        body
    }

    /// The local tier's entry in `GET /status`.
    pub async fn local(&self) -> Value {
        local_tier(&self.status().await)
    }

    /// Polls `GET /status` until the local tier satisfies `accept`; returns that entry.
    pub async fn wait_local(
        &self,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Value {
        let found = poll(timeout, async || {
            let tier = self.local().await;
            if accept(&tier) {
                Ok(tier)
            } else {
                Err(tier.to_string())
            }
        })
        .await;
        self.or_fail(found, what, timeout)
    }

    /// Polls `GET /readyz` until it answers `code`; returns the body.
    pub async fn wait_readyz(&self, code: u16, timeout: Duration) -> Value {
        let found = poll(timeout, async || {
            let (got, body) = self.get_json("/readyz").await;
            if got == code {
                Ok(body)
            } else {
                Err(format!("{got} {body}"))
            }
        })
        .await;
        self.or_fail(found, &format!("/readyz to answer {code}"), timeout)
    }

    /// Unwraps a [`poll`] result, or panics with what was awaited, the last
    /// observation and the tail of cascade's log.
    pub fn or_fail<T>(&self, found: Result<T, String>, what: &str, timeout: Duration) -> T {
        found.unwrap_or_else(|last| {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last seen: {last}\n\
                 --- cascade log tail ---\n{}",
                self.log_tail()
            )
        })
    }

    /// Waits until `/readyz` is 200 and the local tier is healthy and active;
    /// returns the tier's status entry.
    pub async fn wait_ready(&self) -> Value {
        self.wait_readyz(200, SHORT).await;
        self.wait_local("the local tier to be healthy and active", SHORT, |t| {
            t["state"] == "healthy" && t["active"] == true && backend_pid(t).is_some()
        })
        .await
    }

    /// Waits until nothing answers on the local tier's port any more.
    pub async fn wait_endpoint_down(&self, timeout: Duration) {
        let url = format!("{}/health", self.endpoint());
        let found = poll(timeout, async || match self.http.get(&url).send().await {
            Err(_) => Ok(()),
            Ok(response) => Err(format!("{url} answered {}", response.status())),
        })
        .await;
        self.or_fail(found, "the backend to stop listening", timeout)
    }

    /// The pid of the backend process as status reports it, once it runs.
    pub async fn wait_backend_pid(&self) -> i32 {
        let tier = self
            .wait_local("the local tier to report a backend pid", SHORT, |t| {
                backend_pid(t).is_some()
            })
            .await;
        backend_pid(&tier).expect("checked above")
    }
}

impl Drop for Cascade {
    fn drop(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        // SIGTERM first so cascade stops its backend itself; SIGKILL if it
        // does not exit in time (the backend then dies by its parent-death signal).
        // Not reaped yet, so the pid is still ours.
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === status documents and plain HTTP ===

/// The `local` entry of a `/status` document.
pub fn local_tier(status: &Value) -> Value {
    status["tiers"]
        .as_array()
        .and_then(|tiers| tiers.iter().find(|t| t["tier"] == "local"))
        .cloned()
        .unwrap_or_else(|| panic!("no local tier in status: {status}"))
}

/// `details.pid` of a tier entry, as a number.
pub fn backend_pid(tier: &Value) -> Option<i32> {
    tier["details"]["pid"].as_str().and_then(|p| p.parse().ok())
}

/// A plain GET: (HTTP status, body). Panics when the request cannot be made.
pub async fn http_get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let code = response.status().as_u16();
    let body = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
    (code, body)
}

fn parse_json(body: &str, what: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body}"))
}

/// A fresh HTTP client (no proxy, short timeout) for talking to backends directly.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("build an HTTP client")
}

/// The exit code, or the signal that killed the process, as text.
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => "unknown".into(),
    }
}

/// A tool the test needs: under CI=true its absence is a failure, elsewhere a skip.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is required under CI=true (.ci/run installs it)"
        );
        eprintln!("skipped: {name} is not installed");
    }
    found
}

// === raw HTTP and stand-in servers ===

/// Sends `request` (raw HTTP/1.1 text) on a new connection to `addr` and
/// returns everything the server sent until it closed, or until `timeout`.
pub async fn raw_http(addr: SocketAddr, request: &str, timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

/// The status code of a raw HTTP reply (`HTTP/1.1 403 Forbidden` → 403).
pub fn status_of(reply: &str) -> Option<u16> {
    reply.split_whitespace().nth(1)?.parse().ok()
}

/// A TCP server on 127.0.0.1 that answers every connection with `reply`
/// (raw HTTP text), or never answers when `reply` is `None`, and records
/// what it received. Stops with the test process.
pub struct FakeServer {
    pub addr: SocketAddr,
    received: std::sync::Arc<Mutex<Vec<u8>>>,
}

impl FakeServer {
    pub fn start(reply: Option<&'static str>) -> FakeServer {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a fake server");
        let addr = listener.local_addr().expect("its address");
        let received = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        std::thread::spawn(move || {
            // Held, so a silent server keeps its connections open.
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
                let mut buf = [0u8; 8192];
                if let Ok(n) = stream.read(&mut buf) {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
                match reply {
                    Some(reply) => {
                        let _ = stream.write_all(reply.as_bytes());
                    }
                    None => held.push(stream),
                }
            }
        });
        FakeServer { addr, received }
    }

    /// Everything the server has received so far, as text.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned()
    }
}

/// A state directory as a running cascade leaves it (mode 0700, `token` and
/// `api` files of mode 0600) pointing the CLI at `api`.
pub fn state_dir_for(root: &Path, api: SocketAddr, token: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("state");
    fs::create_dir_all(&dir).expect("create the state dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod the state dir");
    for (name, text) in [("token", token.to_owned()), ("api", api.to_string())] {
        let path = dir.join(name);
        fs::write(&path, text).expect("write a state file");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod a state file");
    }
    dir
}
