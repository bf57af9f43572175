//! The one place where cascade's tracing subscriber and its OpenTelemetry
//! providers are built.
//!
//! Logs: human-readable lines on a terminal, JSON lines otherwise (or as the
//! configuration or `--log-format` says); the level comes from `CASCADE_LOG`,
//! else `RUST_LOG`, else `info`. Lines go to stderr through a bounded queue
//! and a writer thread (`tracing-appender`'s lossy non-blocking writer): a
//! sink that stalls (journald behind, a suspended terminal, a pipe nobody
//! reads) costs lines, never a runtime worker. Dropped lines are counted in
//! `cascade.log.lines.dropped`, and once the queue has drained one line says
//! how many were lost.
//!
//! Metrics: one `SdkMeterProvider`, installed as the global one, which the
//! instruments of `cascade_actors::metrics` bind to. It always has a
//! Prometheus reader (`GET /metrics` renders its registry), and with OTLP
//! export on also a periodic reader that pushes the same instruments.
//!
//! Traces: with OTLP export on, `tracing-opentelemetry` turns cascade's
//! spans (probe, start, restart, failover, heal) into OpenTelemetry spans
//! sent by a batch span processor.
//!
//! Export is on when an endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `telemetry.otlp_endpoint`) and `OTEL_SDK_DISABLED` is not `true`. The
//! standard `OTEL_*` variables take precedence over `[telemetry]`, as the
//! OpenTelemetry specification says.
//!
//! Invariant: export never blocks a tier or the root. The batch span
//! processor and the periodic reader run their exports on their own threads
//! (the HTTP exporter uses a blocking client there; the gRPC exporter's
//! connection is tonic's, whose tasks run on the runtime but only await); a
//! collector that is down
//! or slow costs only the dropped batches, each counted in
//! `cascade.telemetry.export.failures`. Shutdown runs on its own thread and
//! is waited for at most `telemetry.shutdown_timeout`.
//!
//! Invariant: logging never blocks a tier or the root either: a thread
//! that logs only ever queues a line or drops it.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cascade_actors::metrics::metrics;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::{info, warn};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{self, LogFormat, OtlpProtocol};

/// What `init` built; kept by `cascade run` until shutdown.
pub struct Telemetry {
    /// Present when OTLP export is on.
    tracer: Option<SdkTracerProvider>,
    meters: SdkMeterProvider,
    /// Whether `meters` pushes over OTLP (else it only serves scrapes).
    exporting: bool,
    scrape: Scrape,
    logs: Logs,
}

/// Renders the Prometheus text exposition of cascade's metrics.
#[derive(Clone)]
pub struct Scrape {
    registry: prometheus::Registry,
}

impl Scrape {
    /// The current values; collecting reads in-memory aggregates only.
    pub fn render(&self) -> Result<String, String> {
        let families = self.registry.gather();
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&families, &mut text)
            .map_err(|e| e.to_string())?;
        Ok(text)
    }
}

/// Where and how to export, after the environment and `[telemetry]` are combined.
#[derive(Debug, Clone, PartialEq)]
struct Export {
    /// `None`: the exporters read `OTEL_EXPORTER_OTLP_*ENDPOINT` themselves.
    endpoint: Option<String>,
    protocol: OtlpProtocol,
    headers: HashMap<String, String>,
    timeout: Duration,
}

/// `Some` when export is on. `env` reads a variable (injected for tests).
fn resolve(config: &config::Telemetry, env: impl Fn(&str) -> Option<String>) -> Option<Export> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    let from_env = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if !from_env && config.otlp_endpoint.is_none() {
        return None;
    }
    let protocol = match env("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref().map(str::trim) {
        Some("grpc") => OtlpProtocol::Grpc,
        Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
        _ => config.protocol,
    };
    Some(Export {
        endpoint: if from_env {
            None
        } else {
            config.otlp_endpoint.clone()
        },
        protocol,
        // The exporters add `OTEL_EXPORTER_OTLP_HEADERS` over these.
        headers: config
            .secret_headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        timeout: config.export_timeout,
    })
}

/// Builds the subscriber and the providers and installs them globally.
pub fn init(format: LogFormat, config: &config::Telemetry) -> Telemetry {
    let directives = std::env::var("CASCADE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("cascade: ignoring invalid log filter {directives:?}: {e}");
        EnvFilter::new("info")
    });
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };

    let export = resolve(config, |name| std::env::var(name).ok());
    let resource = resource(config);
    let mut problems = Vec::new();
    let (scrape, prometheus_reader) = match prometheus_reader() {
        Ok((scrape, reader)) => (scrape, Some(reader)),
        Err(e) => {
            problems.push(format!("no Prometheus metrics: {e}"));
            (
                Scrape {
                    registry: prometheus::Registry::new(),
                },
                None,
            )
        }
    };
    let mut meters = SdkMeterProvider::builder().with_resource(resource.clone());
    if let Some(reader) = prometheus_reader {
        meters = meters.with_reader(reader);
    }
    let mut tracer = None;
    let mut exporting = false;
    if let Some(export) = &export {
        match build_exporters(export) {
            Ok((spans, metrics)) => {
                tracer = Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(spans)
                        .with_resource(resource)
                        .build(),
                );
                meters = meters.with_reader(PeriodicReader::builder(metrics).build());
                exporting = true;
            }
            Err(e) => problems.push(format!("OpenTelemetry export is off: {e}")),
        }
    }
    let meters = meters.build();
    opentelemetry::global::set_meter_provider(meters.clone());

    let otel = tracer
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("cascade")));
    let (writer, logs) = Logs::start(std::io::stderr());
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(not_an_actor_span))
        .with(otel);
    let result = if json {
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer);
        registry.with(layer).try_init()
    } else {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(std::io::stderr().is_terminal());
        registry.with(layer).try_init()
    };
    if let Err(e) = result {
        eprintln!("cascade: logging was already set up: {e}");
    }
    for problem in problems {
        warn!("{problem}");
    }
    if let Some(export) = export.filter(|_| exporting) {
        // Scheme and host only: an endpoint can carry `user:password@`.
        let endpoint = export.endpoint.as_deref().map_or_else(
            || "(from OTEL_EXPORTER_OTLP_ENDPOINT)".to_owned(),
            cascade_actors::secrets::url_for_logs,
        );
        info!(
            endpoint,
            protocol = protocol_name(export.protocol),
            "OpenTelemetry export is on."
        );
    }
    Telemetry {
        tracer,
        meters,
        exporting,
        scrape,
        logs,
    }
}

impl Telemetry {
    /// Whether spans go anywhere but the log: the router then makes its
    /// per-request span at `info`, else at `debug`, where it costs nothing
    /// unless debug logging asks for it.
    pub fn exports_traces(&self) -> bool {
        self.tracer.is_some()
    }

    pub fn scrape(&self) -> Scrape {
        self.scrape.clone()
    }

    /// Flushes and stops the exporters, waiting at most `within`, then
    /// the log writer, waiting at most [`LOG_FLUSH`]. The work runs on
    /// threads of its own: the SDK's shutdown blocks (and the meter
    /// provider's ignores its timeout), and so does a write to a stalled
    /// stderr, so neither may hold a runtime worker, and a thread left
    /// behind must not hold up the process's exit as a `spawn_blocking`
    /// task would hold up the runtime's drop.
    pub async fn shutdown(self, within: Duration) {
        let Telemetry {
            tracer,
            meters,
            exporting,
            logs,
            ..
        } = self;
        if exporting {
            flush_exports(tracer, meters, within).await;
        }
        logs.close().await;
    }
}

/// Flushes and stops the exporters, waiting at most `within`.
async fn flush_exports(
    tracer: Option<SdkTracerProvider>,
    meters: SdkMeterProvider,
    within: Duration,
) {
    let (done, finished) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("otel-shutdown".into())
        .spawn(move || {
            let traces = tracer.map(|t| t.shutdown_with_timeout(within));
            let metrics = meters.shutdown_with_timeout(within);
            let _ = done.send((traces, metrics));
        });
    if let Err(e) = spawned {
        warn!(error = %e, "Cannot flush telemetry: no thread for it.");
        return;
    }
    match tokio::time::timeout(within, finished).await {
        Ok(Ok((traces, metrics))) => {
            if let Some(Err(e)) = traces {
                warn!(error = %e, "Traces were not all flushed.");
            }
            if let Err(e) = metrics {
                warn!(error = %e, "Metrics were not all flushed.");
            }
        }
        Ok(Err(_)) => warn!("Telemetry shutdown thread failed."),
        Err(_) => warn!(
            "Telemetry was not flushed within {}; the rest is dropped.",
            cascade_actors::text::duration(within)
        ),
    }
}

/// ractor wraps every actor's life in a span named `Actor`: one span as
/// long as the process for the root, named for no work. cascade's own spans
/// (`probe`, `start`, `restart`, `failover`, `heal`) say what is done; the
/// events inside ractor's spans are kept.
fn not_an_actor_span(metadata: &tracing::Metadata<'_>) -> bool {
    !(metadata.is_span() && metadata.target().starts_with("ractor"))
}

/// The protocol as `OTEL_EXPORTER_OTLP_PROTOCOL` spells it.
fn protocol_name(protocol: OtlpProtocol) -> &'static str {
    match protocol {
        OtlpProtocol::Grpc => "grpc",
        OtlpProtocol::HttpProtobuf => "http/protobuf",
    }
}

fn resource(config: &config::Telemetry) -> Resource {
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if named_by_env {
        builder.build()
    } else {
        builder
            .with_service_name(config.service_name.clone())
            .build()
    }
}

fn prometheus_reader() -> Result<(Scrape, opentelemetry_prometheus::PrometheusExporter), String> {
    let registry = prometheus::Registry::new();
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .map_err(|e| e.to_string())?;
    Ok((Scrape { registry }, reader))
}

fn build_exporters(export: &Export) -> Result<(Counted<Spans>, Counted<Metrics>), String> {
    let error = |e: opentelemetry_otlp::ExporterBuildError| e.to_string();
    let signal = |path: &str| {
        export
            .endpoint
            .as_ref()
            .map(|e| format!("{}/{path}", e.trim_end_matches('/')))
    };
    let (spans, metrics) = match export.protocol {
        OtlpProtocol::HttpProtobuf => {
            let mut spans = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(export.timeout)
                .with_headers(export.headers.clone());
            let mut metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(export.timeout)
                .with_headers(export.headers.clone());
            if let (Some(traces), Some(points)) = (signal("v1/traces"), signal("v1/metrics")) {
                spans = spans.with_endpoint(traces);
                metrics = metrics.with_endpoint(points);
            }
            (
                spans.build().map_err(error)?,
                metrics.build().map_err(error)?,
            )
        }
        OtlpProtocol::Grpc => {
            let metadata = grpc_metadata(&export.headers)?;
            let mut spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_timeout(export.timeout)
                .with_metadata(metadata.clone());
            let mut metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_timeout(export.timeout)
                .with_metadata(metadata);
            if let Some(endpoint) = &export.endpoint {
                spans = spans.with_endpoint(endpoint);
                metrics = metrics.with_endpoint(endpoint);
            }
            (
                spans.build().map_err(error)?,
                metrics.build().map_err(error)?,
            )
        }
    };
    Ok((
        Counted {
            inner: spans,
            signal: "traces",
        },
        Counted {
            inner: metrics,
            signal: "metrics",
        },
    ))
}

fn grpc_metadata(
    headers: &HashMap<String, String>,
) -> Result<opentelemetry_otlp::tonic_types::metadata::MetadataMap, String> {
    let mut map = http::HeaderMap::new();
    for (name, value) in headers {
        let name = http::HeaderName::try_from(name.as_str())
            .map_err(|e| format!("telemetry.secret_headers: `{name}`: {e}"))?;
        let value = http::HeaderValue::try_from(value.as_str())
            .map_err(|e| format!("telemetry.secret_headers.{name}: {e}"))?;
        map.insert(name, value);
    }
    Ok(opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map))
}

// === logs ===

/// Log lines held while the sink is slower than cascade logs: a burst's
/// worth, and at most a few MB (a backend's output lines are cut at 4 KB).
/// A line that finds the queue full is dropped and counted.
const LOG_QUEUE_LINES: usize = 1024;
/// How often the drop watcher reads the counts.
const LOG_WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long a stopping cascade waits for the queued lines to be written.
pub const LOG_FLUSH: Duration = Duration::from_secs(2);

/// Lines offered to the queue and lines the writer thread has handed to
/// the sink; with the queue's drop count they tell how many wait.
#[derive(Clone, Default)]
struct LogCounts {
    offered: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

/// The subscriber's writer: the non-blocking queue, counting what it is
/// offered. The formatter writes each event with one `write_all`.
#[derive(Clone)]
struct LogWriter {
    queue: NonBlocking,
    offered: Arc<AtomicU64>,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.offered.fetch_add(1, Ordering::Relaxed);
        self.queue.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.write(buf).map(|_| ())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.queue.flush()
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

/// The sink as the writer thread sees it, counting each line it has
/// handled (written, or failed to write: either way it no longer waits).
struct CountedSink<W> {
    inner: W,
    written: Arc<AtomicU64>,
}

impl<W: Write> Write for CountedSink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let result = self.inner.write_all(buf);
        self.written.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The log pipeline's threads: the writer (held by its guard) and the
/// drop watcher (stopped by dropping `stop`).
struct Logs {
    guard: WorkerGuard,
    stop: mpsc::Sender<()>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl Logs {
    /// A lossy non-blocking writer to `sink` and the thread that counts
    /// its drops.
    fn start<W: Write + Send + 'static>(sink: W) -> (LogWriter, Logs) {
        let counts = LogCounts::default();
        let (queue, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(LOG_QUEUE_LINES)
            .thread_name("cascade-log")
            .finish(CountedSink {
                inner: sink,
                written: counts.written.clone(),
            });
        let dropped = queue.error_counter();
        let writer = LogWriter {
            queue,
            offered: counts.offered.clone(),
        };
        // Visible as 0 before the first drop.
        metrics().log_lines_dropped(0);
        let (stop, stopped) = mpsc::channel();
        let watcher = std::thread::Builder::new()
            .name("cascade-log-drops".into())
            .spawn(move || watch_drops(&dropped, &counts, &stopped))
            .map_err(|e| eprintln!("cascade: log drops will not be counted: {e}"))
            .ok();
        (
            writer,
            Logs {
                guard,
                stop,
                watcher,
            },
        )
    }

    /// Stops the watcher and lets the writer thread write what is queued,
    /// waiting at most [`LOG_FLUSH`] (a stalled sink keeps the rest).
    async fn close(self) {
        let Logs {
            guard,
            stop,
            watcher,
        } = self;
        drop(stop);
        let (done, finished) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("cascade-log-flush".into())
            .spawn(move || {
                if let Some(watcher) = watcher {
                    let _ = watcher.join();
                }
                // Waits for the writer thread, at most about a second.
                drop(guard);
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = tokio::time::timeout(LOG_FLUSH, finished).await;
        }
    }
}

/// Counts drops into the metric until `stop` is dropped, and logs one
/// line per stall once the queue has drained.
fn watch_drops(dropped: &ErrorCounter, counts: &LogCounts, stop: &mpsc::Receiver<()>) {
    let mut watch = DropWatch::default();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(LOG_WATCH_EVERY) {
        // Drops and writes first: a line offered meanwhile only makes the
        // backlog look longer, never drained.
        let lost = dropped.dropped_lines() as u64;
        let written = counts.written.load(Ordering::Relaxed);
        let offered = counts.offered.load(Ordering::Relaxed);
        let backlog = offered.saturating_sub(written).saturating_sub(lost);
        let (new, recovered) = watch.look(lost, backlog, Instant::now());
        if new > 0 {
            metrics().log_lines_dropped(new);
        }
        if let Some(stall) = recovered {
            warn!(
                dropped = stall.dropped,
                stalled_for = %cascade_actors::text::duration(stall.took),
                "Log output was stalled; lines were dropped rather than wait for it."
            );
        }
    }
}

/// The drop watcher's memory: drops already counted, and the stall in progress.
#[derive(Debug, Default)]
struct DropWatch {
    counted: u64,
    /// When the first line of this stall was dropped, and the drop count before it.
    stall: Option<(Instant, u64)>,
}

/// A stall that is over: how many lines it cost and how long it lasted.
#[derive(Debug, PartialEq)]
struct Stall {
    dropped: u64,
    took: Duration,
}

impl DropWatch {
    /// Given the drop count so far and the lines still queued, returns
    /// how many drops are new and, when the queue has drained after a
    /// stall, that stall.
    fn look(&mut self, dropped: u64, backlog: u64, now: Instant) -> (u64, Option<Stall>) {
        let new = dropped.saturating_sub(self.counted);
        self.counted = self.counted.max(dropped);
        if new > 0 {
            self.stall.get_or_insert((now, dropped - new));
            return (new, None);
        }
        if backlog > 0 {
            return (0, None);
        }
        let over = self.stall.take().map(|(since, before)| Stall {
            dropped: dropped - before,
            took: now.saturating_duration_since(since),
        });
        (0, over)
    }
}

// === impl Counted ===

type Spans = opentelemetry_otlp::SpanExporter;
type Metrics = opentelemetry_otlp::MetricExporter;

/// An exporter that counts its failed exports in
/// `cascade.telemetry.export.failures{signal}`: the SDK drops a batch whose
/// export fails, so this is the count of lost batches.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    signal: &'static str,
}

impl<E> Counted<E> {
    fn count(&self, result: OTelSdkResult) -> OTelSdkResult {
        if result.is_err() {
            metrics().export_failure(self.signal);
        }
        result
    }
}

impl SpanExporter for Counted<Spans> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.count(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl PushMetricExporter for Counted<Metrics> {
    async fn export(&self, batch: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.count(result)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn export_is_off_without_an_endpoint_or_when_the_sdk_is_disabled() {
        let config = config::Telemetry::default();
        assert_eq!(resolve(&config, env(&[])), None);
        let configured = config::Telemetry {
            otlp_endpoint: Some("http://collector:4318".into()),
            ..config::Telemetry::default()
        };
        assert!(resolve(&configured, env(&[])).is_some());
        assert_eq!(
            resolve(&configured, env(&[("OTEL_SDK_DISABLED", "TRUE")])),
            None
        );
        let from_env = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]);
        assert!(resolve(&config, from_env).is_some());
    }

    #[test]
    fn the_environment_takes_precedence_over_the_configuration() {
        let config = config::Telemetry {
            otlp_endpoint: Some("http://from-config:4317".into()),
            protocol: OtlpProtocol::Grpc,
            ..config::Telemetry::default()
        };
        let export = resolve(
            &config,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://from-env:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ]),
        )
        .expect("export on");
        // `None`: the exporters read the variable themselves.
        assert_eq!(export.endpoint, None);
        assert_eq!(export.protocol, OtlpProtocol::HttpProtobuf);
        let export = resolve(&config, env(&[])).expect("export on");
        assert_eq!(export.endpoint.as_deref(), Some("http://from-config:4317"));
        assert_eq!(export.protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn check_config_redacts_the_export_headers() {
        let mut config = config::Config::default();
        config
            .telemetry
            .secret_headers
            .insert("authorization".into(), "Bearer hunter2".into());
        let text = crate::settings::render_redacted(&config).expect("renders");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("authorization = \"<redacted>\""), "{text}");
    }

    /// A sink whose first write waits until the test opens it.
    struct Stalled {
        open: mpsc::Receiver<()>,
        opened: bool,
        lines: Arc<std::sync::Mutex<u64>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.opened {
                let _ = self.open.recv();
                self.opened = true;
            }
            *self.lines.lock().unwrap() += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_costs_lines_and_never_blocks_the_caller() {
        let (open, opened) = mpsc::channel();
        let written = Arc::new(std::sync::Mutex::new(0));
        let (writer, logs) = Logs::start(Stalled {
            open: opened,
            opened: false,
            lines: written.clone(),
        });
        let lines = 4 * LOG_QUEUE_LINES;
        let (done, finished) = mpsc::channel();
        let mut caller = writer.clone();
        std::thread::spawn(move || {
            for n in 0..lines {
                let _ = caller.write_all(format!("line {n}\n").as_bytes());
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("writing to a stalled sink returns");
        let dropped = writer.queue.error_counter().dropped_lines();
        assert!(
            dropped >= lines - LOG_QUEUE_LINES - 1,
            "{dropped} of {lines} dropped"
        );

        drop(open);
        let deadline = Instant::now() + Duration::from_secs(30);
        while *written.lock().unwrap() + dropped as u64 != lines as u64 {
            assert!(
                Instant::now() < deadline,
                "the queue drains once the sink takes lines"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(logs);
    }

    #[test]
    fn a_stall_is_reported_once_after_the_queue_has_drained() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = DropWatch::default();
        assert_eq!(watch.look(0, 0, at(0)), (0, None));
        assert_eq!(watch.look(5, 1024, at(250)), (5, None));
        assert_eq!(watch.look(12, 1024, at(500)), (7, None));
        // No new drops, but lines still wait: not over yet.
        assert_eq!(watch.look(12, 300, at(750)), (0, None));
        assert_eq!(
            watch.look(12, 0, at(1000)),
            (
                0,
                Some(Stall {
                    dropped: 12,
                    took: Duration::from_millis(750)
                })
            )
        );
        assert_eq!(watch.look(12, 0, at(1250)), (0, None), "said once");
        assert_eq!(watch.look(13, 1024, at(1500)), (1, None));
        assert_eq!(
            watch.look(13, 0, at(1750)),
            (
                0,
                Some(Stall {
                    dropped: 1,
                    took: Duration::from_millis(250)
                })
            )
        );
    }
}
