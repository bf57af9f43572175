//! Telemetry: OTLP export over HTTP/protobuf and over gRPC to receivers in
//! the test, a collector that is down (both protocols), and `GET /metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

use crate::support::{
    BIN, Cascade, SHORT, Setup, Signal, backend_pid, free_port, http_client, local_tier,
    process_gone, send_signal, toml_str, tool, wait_for,
};

/// What the receiver has been sent.
#[derive(Default)]
pub(crate) struct Received {
    /// Each span's name and its string attributes.
    pub(crate) spans: Vec<(String, BTreeMap<String, String>)>,
    metrics: BTreeSet<String>,
    service_names: BTreeSet<String>,
}

pub(crate) type Shared = Arc<Mutex<Received>>;

/// An OTLP/HTTP receiver on 127.0.0.1:0 decoding protobuf exports.
pub(crate) async fn receiver() -> (String, Shared, tokio::task::JoinHandle<()>) {
    let received = Shared::default();
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("receiver address");
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("receiver serves");
    });
    (format!("http://{addr}"), received, server)
}

async fn traces(State(received): State<Shared>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("a valid trace export");
    record_traces(&received, request);
    ExportTraceServiceResponse::default().encode_to_vec()
}

fn record_traces(received: &Shared, request: ExportTraceServiceRequest) {
    let mut received = received.lock().unwrap();
    for resource in request.resource_spans {
        for attr in resource.resource.iter().flat_map(|r| &r.attributes) {
            if attr.key == "service.name"
                && let Some(text) = string(attr.value.as_ref().and_then(|v| v.value.as_ref()))
            {
                received.service_names.insert(text);
            }
        }
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes = span
                    .attributes
                    .iter()
                    .filter_map(|a| {
                        let value = string(a.value.as_ref().and_then(|v| v.value.as_ref()))?;
                        Some((a.key.clone(), value))
                    })
                    .collect();
                received.spans.push((span.name, attributes));
            }
        }
    }
}

async fn metrics(State(received): State<Shared>, body: Bytes) -> Vec<u8> {
    let request = ExportMetricsServiceRequest::decode(body).expect("a valid metrics export");
    record_metrics(&received, request);
    ExportMetricsServiceResponse::default().encode_to_vec()
}

fn record_metrics(received: &Shared, request: ExportMetricsServiceRequest) {
    let mut received = received.lock().unwrap();
    for resource in request.resource_metrics {
        for scope in resource.scope_metrics {
            for metric in scope.metrics {
                received.metrics.insert(metric.name);
            }
        }
    }
}

/// An OTLP/gRPC receiver (the collector's trace and metrics services).
#[derive(Clone)]
struct Grpc(Shared);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record_traces(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        record_metrics(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn grpc_receiver() -> (String, Shared, tokio::task::JoinHandle<()>) {
    let received = Shared::default();
    let incoming = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into())
        .expect("bind the gRPC receiver");
    let addr = incoming.local_addr().expect("receiver address");
    let service = Grpc(received.clone());
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(service.clone()))
            .add_service(MetricsServiceServer::new(service))
            .serve_with_incoming(incoming)
            .await
            .expect("gRPC receiver serves");
    });
    (format!("http://{addr}"), received, server)
}

fn string(value: Option<&AnyValue>) -> Option<String> {
    match value? {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Environment for OTLP export to `endpoint`, with short export intervals.
pub(crate) fn otlp_env(endpoint: &str, protocol: &str) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ("OTEL_SERVICE_NAME", "cascade-it"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into()
}

#[tokio::test]
async fn otlp_over_http_receives_probe_start_restart_and_failover_spans_and_the_metrics() {
    let (endpoint, received, server) = receiver().await;
    exported(&endpoint, "http/protobuf", &received).await;
    server.abort();
}

#[tokio::test]
async fn otlp_over_grpc_receives_probe_start_restart_and_failover_spans_and_the_metrics() {
    let (endpoint, received, server) = grpc_receiver().await;
    exported(&endpoint, "grpc", &received).await;
    server.abort();
}

/// Runs cascade exporting to `endpoint`, restarts the local tier, and
/// checks what the receiver got.
async fn exported(endpoint: &str, protocol: &str, received: &Shared) {
    let setup = Setup {
        env: otlp_env(endpoint, protocol),
        ..Setup::default()
    };
    let cascade = Cascade::start_ready(setup).await;
    let (code, body) = cascade.post_authorized("/tiers/local/restart").await;
    assert_eq!(code, 200, "{body}");
    cascade.wait_ready().await;
    // A request through the router: its span names the tier that answered.
    let router = cascade.router_addr().await;
    let response = http_client()
        .get(format!("http://{router}/health"))
        .send()
        .await
        .expect("GET /health through the router");
    assert_eq!(response.status(), 200);

    let wanted_spans = ["probe", "start", "restart", "failover"];
    let wanted_metrics = [
        "cascade.tier.state",
        "cascade.tier.active",
        "cascade.failovers",
        "cascade.restarts",
        "cascade.probe.duration",
        "cascade.breaker.state",
    ];
    wait_for(SHORT, "spans and metrics at the receiver", async || {
        let received = received.lock().unwrap();
        let missing_spans: Vec<_> = wanted_spans
            .iter()
            .filter(|name| {
                !received.spans.iter().any(|(n, attrs)| {
                    n == *name
                        && attrs.get("backend.tier").map(String::as_str) == Some("local")
                        && attrs.get("backend.name").map(String::as_str) == Some("local")
                        && attrs.contains_key("outcome")
                })
            })
            .collect();
        let missing_metrics: Vec<_> = wanted_metrics
            .iter()
            .filter(|m| !received.metrics.contains(**m))
            .collect();
        // Probes go on every 100 ms: one that succeeded arrives in time,
        // whichever batch it is in.
        let probe_up = received.spans.iter().any(|(n, attrs)| {
            n == "probe" && attrs.get("outcome").map(String::as_str) == Some("up")
        });
        let request = received.spans.iter().any(|(n, attrs)| {
            n == "request" && attrs.get("backend.tier").map(String::as_str) == Some("local")
        });
        if missing_spans.is_empty() && missing_metrics.is_empty() && probe_up && request {
            Ok(())
        } else {
            let names: BTreeSet<_> = received.spans.iter().map(|(n, _)| n.as_str()).collect();
            Err(format!(
                "missing spans {missing_spans:?}, metrics {missing_metrics:?}, a probe with outcome=up: {}, a request answered by local: {}; spans seen {names:?}, metrics seen {:?}",
                !probe_up, !request, received.metrics
            ))
        }
    })
    .await;
    {
        let received = received.lock().unwrap();
        assert!(
            received.service_names.contains("cascade-it"),
            "OTEL_SERVICE_NAME names the resource: {:?}",
            received.service_names
        );
    }
}

/// A collector that is down costs nothing but the data: cascade gets ready,
/// keeps probing, counts the failed exports, and stops within its bounds.
async fn collector_down(protocol: &str) {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let setup = Setup {
        env: otlp_env(&closed, protocol),
        ..Setup::default()
    }
    .extra("[telemetry]\nshutdown_timeout = \"1s\"\n");
    let mut cascade = Cascade::start_ready(setup).await;

    let first = probes_up(&cascade).await;
    wait_for(
        SHORT,
        "probes to continue and exports to fail",
        async || {
            let text = scrape(&cascade).await;
            let now = sample(
                &text,
                "cascade_probe_duration_seconds_count",
                "outcome=\"up\"",
            );
            let failures = sample(&text, "cascade_telemetry_export_failures_total", "");
            if now > first + 5.0 && failures > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "probes up {now} (from {first}), export failures {failures}"
                ))
            }
        },
    )
    .await;

    let started = Instant::now();
    cascade.signal(Signal::Term);
    // shutdown_timeout (1 s) + stop_grace (500 ms) + 3 s.
    let bound = Duration::from_millis(4500);
    let status = cascade.wait_exit(bound + Duration::from_secs(5)).await;
    let took = started.elapsed();
    let status = status.expect("cascade exits");
    assert!(status.success(), "{status}; {}", cascade.log_tail());
    assert!(took <= bound, "stopping took {took:?}, more than {bound:?}");
}

#[tokio::test]
async fn a_collector_that_is_down_over_http_does_not_hold_up_cascade() {
    collector_down("http/protobuf").await;
}

#[tokio::test]
async fn a_collector_that_is_down_over_grpc_does_not_hold_up_cascade() {
    collector_down("grpc").await;
}

async fn scrape(cascade: &Cascade) -> String {
    let (code, text) = cascade.get("/metrics").await;
    assert_eq!(code, 200, "{text}");
    text
}

async fn probes_up(cascade: &Cascade) -> f64 {
    let text = scrape(cascade).await;
    sample(
        &text,
        "cascade_probe_duration_seconds_count",
        "outcome=\"up\"",
    )
}

/// The sum of `name`'s samples whose labels contain `label` (0 if none).
fn sample(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_without_export() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    wait_for(SHORT, "a probe to be counted", async || {
        let n = probes_up(&cascade).await;
        if n > 0.0 {
            Ok(())
        } else {
            Err("no probe yet".into())
        }
    })
    .await;
    let response = http_client()
        .get(cascade.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("the body");
    for name in [
        "cascade_tier_state",
        "cascade_tier_active",
        "cascade_failovers_total",
        "cascade_probe_duration_seconds_bucket",
        "cascade_breaker_state",
    ] {
        assert!(text.contains(&format!("{name}{{")), "no {name} in:\n{text}");
    }
    assert!(
        text.contains("cascade_tier_active{backend_tier=\"local\""),
        "{text}"
    );

    let Some(promtool) = tool("promtool") else {
        return;
    };
    use std::io::Write;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape");
    let out = child.wait_with_output().expect("promtool finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
}

/// Whether a span named `name` with all these string attributes was received.
pub(crate) fn has_span(received: &Shared, name: &str, attrs: &[(&str, &str)]) -> bool {
    let received = received.lock().unwrap();
    received.spans.iter().any(|(n, a)| {
        n == name
            && attrs
                .iter()
                .all(|(k, v)| a.get(*k).map(String::as_str) == Some(*v))
    })
}

/// `cascade run` with its stderr a pipe that the test holds and does not
/// read (a stalled journald, a suspended terminal, a stuck `| tee`).
struct Unread {
    _root: tempfile::TempDir,
    child: std::process::Child,
    stderr: Option<std::process::ChildStderr>,
    api: std::net::SocketAddr,
    http: reqwest::Client,
}

impl Unread {
    /// The local tier runs the demo backend beside a shell loop in its
    /// process group that writes 1 KB lines to stdout and stderr as fast as
    /// cascade logs a backend's output.
    async fn start() -> Unread {
        let root = tempfile::Builder::new()
            .prefix("cascade-it-")
            .tempdir()
            .expect("temp dir");
        let state_dir = root.path().join("state");
        let port = free_port();
        let line = "x".repeat(1000);
        let script = format!(
            "while :; do i=0; while [ $i -lt 40 ]; do echo {line}; echo {line} >&2; i=$((i+1)); done; sleep 0.1; done & \
             exec '{BIN}' demo-backend --port {port}"
        );
        let config = root.path().join("cascade.toml");
        std::fs::write(
            &config,
            format!(
                "[general]\nstate_dir = {state}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n\
                 [waterfall]\norder = [\"local\"]\n\n[tiers.local]\ncommand = \"/bin/sh\"\n\
                 args = [\"-c\", {script}]\nport = {port}\nstop_grace = \"500ms\"\n\
                 start_timeout = \"10s\"\nprobe = {{ interval = \"100ms\", timeout = \"500ms\" }}\n",
                state = toml_str(state_dir.to_str().expect("UTF-8 temp path")),
                script = toml_str(&script),
            ),
        )
        .expect("write the config");
        let mut child = std::process::Command::new(BIN)
            .args(["run", "--log-format", "json", "--config"])
            .arg(&config)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CASCADE_LOG", "info")
            .env("CASCADE_ROUTER__LISTEN", "127.0.0.1:0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn `cascade run`");
        let stderr = child.stderr.take();
        let api_file = state_dir.join("api");
        let api = wait_for(SHORT, "cascade to write STATE_DIR/api", async || {
            let text = std::fs::read_to_string(&api_file).map_err(|e| e.to_string())?;
            text.trim()
                .parse::<std::net::SocketAddr>()
                .map_err(|e| format!("{text:?}: {e}"))
        })
        .await;
        Unread {
            _root: root,
            child,
            stderr,
            api,
            http: http_client(),
        }
    }

    /// GET on the status API; `Err` when it does not answer in 5 s.
    async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let response = self
            .http
            .get(format!("http://{}{path}", self.api))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let code = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        Ok((code, body))
    }

    async fn backend_pid(&self) -> Result<i32, String> {
        let (code, body) = self.get("/status").await?;
        let status: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{code} {e}: {body}"))?;
        let tier = local_tier(&status);
        match backend_pid(&tier) {
            Some(pid) if tier["state"] == "healthy" && tier["active"] == true => Ok(pid),
            _ => Err(tier.to_string()),
        }
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        // Reading now lets a cascade that blocked on its stderr stop too.
        if let Some(mut stderr) = self.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        }
        send_signal(self.child.id() as i32, Signal::Term);
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

#[tokio::test]
async fn a_stderr_nobody_reads_costs_log_lines_but_never_supervision() {
    let mut cascade = Unread::start().await;
    let first = wait_for(
        SHORT,
        "the local tier to be healthy and active",
        async || cascade.backend_pid().await,
    )
    .await;

    // The pipe (64 KB) and cascade's log queue fill up; lines are dropped.
    wait_for(
        Duration::from_secs(60),
        "cascade to count dropped log lines",
        async || {
            let (_, text) = cascade.get("/metrics").await?;
            let dropped = sample(&text, "cascade_log_lines_dropped_total", "");
            if dropped > 0.0 {
                Ok(())
            } else {
                Err(format!("{dropped} dropped so far"))
            }
        },
    )
    .await;

    // Supervision goes on: a killed backend is reaped and restarted.
    send_signal(first, Signal::Kill);
    let second = wait_for(
        SHORT,
        "a new backend, healthy and active",
        async || match cascade.backend_pid().await? {
            pid if pid != first => Ok(pid),
            pid => Err(format!("still pid {pid}")),
        },
    )
    .await;
    assert!(process_gone(first), "the killed backend {first} was reaped");
    let (code, body) = cascade.get("/healthz").await.expect("/healthz answers");
    assert_eq!(code, 200, "{body}");
    let (code, body) = cascade.get("/readyz").await.expect("/readyz answers");
    assert_eq!(code, 200, "{body}");
    assert!(!process_gone(second));

    // Once the pipe is read again, one line says what was lost.
    let stderr = cascade.stderr.take().expect("stderr not taken yet");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + SHORT;
    let stalled = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = seen
            .recv_timeout(left)
            .expect("a line about the stall before the deadline");
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if record["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Log output was stalled"))
        {
            break record;
        }
    };
    assert_eq!(stalled["level"], "WARN", "{stalled}");
    assert!(
        stalled["dropped"].as_u64().is_some_and(|n| n > 0),
        "{stalled}"
    );
    assert!(stalled["stalled_for"].is_string(), "{stalled}");
    // The reader thread keeps draining until cascade stops.
    std::thread::spawn(move || while seen.recv().is_ok() {});
}

/// What makes a logged value Rust `Debug` text rather than a plain value,
/// if anything.
fn debug_text(value: &str, check_durations: bool) -> Option<&'static str> {
    let trimmed = value.trim();
    if value.contains("Some(") || trimmed == "None" {
        return Some("an Option");
    }
    if value.contains("ExitStatus(") || value.contains("unix_wait_status") {
        return Some("an ExitStatus");
    }
    if trimmed.starts_with("Ok(") || trimmed.starts_with("Err(") {
        return Some("a Result");
    }
    if check_durations {
        for word in value.split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == ')') {
            let digits = word.trim_end_matches(|c: char| c.is_alphabetic() || c == 'µ');
            let unit = &word[digits.len()..];
            let numeric =
                !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '.');
            if numeric && matches!(unit, "us" | "µs" | "ns") {
                return Some("a duration to the nanosecond");
            }
            if numeric && digits.contains('.') && matches!(unit, "s" | "ms") {
                let decimals = digits.split('.').nth(1).map_or(0, str::len);
                if decimals > 3 {
                    return Some("a Debug duration");
                }
            }
        }
    }
    None
}

/// Every string in `value` with where it is, for the checks below.
fn strings<'a>(value: &'a serde_json::Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        serde_json::Value::String(s) => out.push((at, s)),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{at}[{i}]"), out);
            }
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                strings(item, format!("{at}.{key}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_debug_text_check_knows_what_it_rejects() {
    assert_eq!(debug_text("Some(\"local\")", false), Some("an Option"));
    assert_eq!(
        debug_text("Some(ExitStatus(unix_wait_status(9)))", false),
        Some("an Option")
    );
    assert_eq!(
        debug_text("took longer than 799ms 971us 788ns", true),
        Some("a duration to the nanosecond")
    );
    assert_eq!(
        debug_text("after 1.234567s", true),
        Some("a Debug duration")
    );
    for plain in ["local", "1s 500ms", "killed by signal 9", "250ms", "1.5s"] {
        assert_eq!(debug_text(plain, true), None, "{plain}");
    }
}

/// A run through start, a restart over the API, a killed backend, a reload
/// and a stop, logged at debug level as JSON: every line is a JSON object,
/// every field a plain value, every span named for what it does.
#[tokio::test]
async fn the_json_log_holds_plain_values_and_named_spans() {
    let setup = Setup {
        env: vec![("CASCADE_LOG".into(), "debug".into())],
        ..Setup::default()
    };
    let mut cascade = Cascade::start_ready(setup).await;
    let (code, body) = cascade.post_authorized("/tiers/local/restart").await;
    assert_eq!(code, 200, "{body}");
    let pid = cascade.wait_ready().await;
    let pid = backend_pid(&pid).expect("a pid");
    send_signal(pid, Signal::Kill);
    cascade
        .wait_local("a new backend", SHORT, |t| {
            t["state"] == "healthy" && backend_pid(t).is_some_and(|p| p != pid)
        })
        .await;
    cascade.edit_config(|text| text.replace("stop_grace = \"500ms\"", "stop_grace = \"400ms\""));
    cascade.signal(Signal::Hup);
    cascade
        .wait_local("the reloaded tier to serve", SHORT, |t| {
            t["state"] == "healthy" && t["active"] == true
        })
        .await;
    cascade.signal(Signal::Term);
    let status = cascade
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("cascade exits");
    assert!(status.success(), "{status}");

    let logs = cascade.logs();
    let mut problems = Vec::new();
    let mut spans = BTreeSet::new();
    for line in logs.lines() {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            problems.push(format!("not a JSON object: {line}"));
            continue;
        };
        // A backend's own output is logged as it was written.
        let backend_output = record.get("stream").is_some();
        let mut found = Vec::new();
        strings(&record, String::new(), &mut found);
        for (at, value) in found {
            if backend_output && at == ".message" {
                continue;
            }
            if let Some(what) = debug_text(value, true) {
                problems.push(format!("{at} is {what}: {line}"));
            }
        }
        for span in record["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(record.get("span"))
        {
            if let Some(name) = span["name"].as_str() {
                spans.insert(name.to_owned());
            }
        }
    }
    for name in &spans {
        if name == "Actor" || name.chars().next().is_some_and(char::is_uppercase) {
            problems.push(format!("a span named {name:?}, not for what it does"));
        }
    }
    assert!(!spans.is_empty(), "no spans in the log");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
