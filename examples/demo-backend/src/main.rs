//! The `demo-backend` binary: parses the CLI, installs a stderr tracing
//! subscriber, serves until SIGINT/SIGTERM or `--exit-after`, and turns the
//! outcome into the process exit code.

#![forbid(unsafe_code)]

use cascade_demo::Options;
use clap::Parser;
use tracing_subscriber::EnvFilter;

const ABOUT: &str =
    "Demo backend: a stand-in for the ECAPA speaker-embedding service. NOT a model.";
const LONG_ABOUT: &str = "\
Demo backend: a stand-in for the ECAPA speaker-embedding service. NOT a model.

Serves GET /health and POST /embed (body: 16-bit PCM WAV, mono or stereo, at most 60 s)
with the real service's JSON contract. The 192-float \"embeddings\" are a deterministic
hash of the samples and carry no speaker information. Options inject failures
(start-up delay, latency, failing health, exit) for testing a supervisor.

For testing a proxy in front of it: GET|POST /echo answers the request's method, path,
query and headers as JSON; GET /stream?chunks=N&gap_ms=M answers N chunks M ms apart,
and with &hold=true sends the first at once and the rest after POST /stream/release.";

#[derive(Debug, Parser)]
#[command(name = "demo-backend", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(flatten)]
    opts: Options,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    std::process::exit(cascade_demo::run_until_signal(cli.opts).await);
}
