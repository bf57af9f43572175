//! `cascade-gcp-fake`: runs the fake Google Cloud APIs until Ctrl-C and prints their endpoints,
//! the control endpoint's fault knobs and a cascade configuration that points at them, so a
//! person can try the `cloud_run` and `gcp_vm` tiers by hand, failures included, without a
//! Google Cloud project.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cascade_gcp_fake::{FakeGcp, FakeOptions};
use clap::Parser;

/// Local stand-ins for Compute Engine, Cloud Run, the metadata server and the OAuth token
/// endpoint, validating every API request against Google's discovery documents.
#[derive(Debug, Parser)]
#[command(version, after_help = cascade_gcp_fake::KNOBS)]
struct Args {
    /// Listen on fixed ports: the Compute Engine API at PORT, then the Cloud Run Admin API,
    /// the metadata server, the token endpoint, the Cloud Run service, the control endpoint and
    /// the VMs' service port (PORT+1 .. PORT+6). Without it every start picks free ports.
    #[arg(long, value_name = "PORT")]
    port_base: Option<u16>,
    #[arg(long, default_value = "demo-project")]
    project: String,
    #[arg(long, default_value = "europe-west1-b")]
    zone: String,
    #[arg(long, default_value = "europe-west1")]
    region: String,
    /// Name of the one Cloud Run service.
    #[arg(long, default_value = "ecapa")]
    run_service: String,
    /// Port each fake VM's service binds on its own 127.0.0.x address (0 = PORT+6 with
    /// --port-base, else pick one).
    #[arg(long, default_value_t = 0)]
    vm_service_port: u16,
    #[arg(long, default_value = "/health")]
    vm_health_path: String,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime_secs: u64,
    /// How long a zone operation takes to finish, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    operation_delay_ms: u64,
    /// How long a VM takes from PROVISIONING to RUNNING, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    boot_delay_ms: u64,
    /// How long a preempted VM keeps running (STOPPING) before it is TERMINATED, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    preemption_grace_ms: u64,
    /// Let the Cloud Run service answer without an ID token.
    #[arg(long)]
    public_service: bool,
    /// Write the fake service-account key file (test-only key) here.
    #[arg(long)]
    write_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let options = FakeOptions {
        project: args.project,
        zone: args.zone,
        region: args.region,
        run_service: args.run_service,
        vm_service_port: args.vm_service_port,
        vm_health_path: args.vm_health_path,
        token_lifetime: Duration::from_secs(args.token_lifetime_secs),
        operation_delay: Duration::from_millis(args.operation_delay_ms),
        boot_delay: Duration::from_millis(args.boot_delay_ms),
        service_requires_auth: !args.public_service,
        preemption_grace: Duration::from_millis(args.preemption_grace_ms),
        port_base: args.port_base,
    };
    let fake = match FakeGcp::start(options).await {
        Ok(fake) => fake,
        Err(error) => {
            eprintln!("cascade-gcp-fake: cannot start: {error}");
            return ExitCode::from(71); // EX_OSERR
        }
    };
    if let Some(path) = &args.write_key {
        let key =
            serde_json::to_string_pretty(&fake.service_account_key_json()).unwrap_or_default();
        if let Err(error) = std::fs::write(path, key) {
            eprintln!("cascade-gcp-fake: cannot write {}: {error}", path.display());
            return ExitCode::from(73); // EX_CANTCREAT
        }
    }
    let options = fake.options();
    println!("compute endpoint:    {}", fake.compute_endpoint());
    println!("cloud run admin:     {}", fake.run_admin_endpoint());
    println!(
        "cloud run service:   {} (projects/{}/locations/{}/services/{})",
        fake.service_url(),
        options.project,
        options.region,
        options.run_service
    );
    println!(
        "metadata server:     {} (GCE_METADATA_HOST={})",
        fake.metadata_url(),
        fake.metadata_host()
    );
    println!("token endpoint:      {}", fake.token_uri());
    println!(
        "vm health:           http://127.0.0.N:{}{}",
        fake.vm_service_port(),
        options.vm_health_path
    );
    if let Some(path) = &args.write_key {
        println!("service-account key: {}", path.display());
    }
    println!(
        "control endpoint:    {} (GET it for the knobs)",
        fake.control_url()
    );
    println!();
    println!("{}", fake.cascade_config());
    println!("Ctrl-C (or SIGTERM) stops.");
    if let Err(error) = stop_signal().await {
        eprintln!("cascade-gcp-fake: cannot wait for a signal: {error}");
    }
    let rejections = fake.rejections();
    fake.shutdown().await;
    if !rejections.is_empty() {
        println!("{} request(s) were rejected:", rejections.len());
        for why in rejections {
            println!("  {why}");
        }
    }
    ExitCode::SUCCESS
}

/// Waits for Ctrl-C or SIGTERM.
async fn stop_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
