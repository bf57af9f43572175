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

use crate::support::{Cascade, SHORT, Setup, Signal, free_port, http_client, tool, wait_for};

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
        if missing_spans.is_empty() && missing_metrics.is_empty() {
            Ok(())
        } else {
            let names: BTreeSet<_> = received.spans.iter().map(|(n, _)| n.as_str()).collect();
            Err(format!(
                "missing spans {missing_spans:?}, metrics {missing_metrics:?}; spans seen {names:?}, metrics seen {:?}",
                received.metrics
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
        let probe_up = received.spans.iter().any(|(n, attrs)| {
            n == "probe" && attrs.get("outcome").map(String::as_str) == Some("up")
        });
        assert!(probe_up, "a successful probe is exported with outcome=up");
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
