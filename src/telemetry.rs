//! The one place where cascade's tracing subscriber is built.
//!
//! Human-readable lines on a terminal, JSON lines otherwise (or as the
//! configuration or `--log-format` says); the level comes from `CASCADE_LOG`,
//! else `RUST_LOG`, else `info`. Exporters (OpenTelemetry) are added here.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
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
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr);
        registry.with(layer).try_init()
    } else {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        registry.with(layer).try_init()
    };
    if let Err(e) = result {
        eprintln!("cascade: logging was already set up: {e}");
    }
}
