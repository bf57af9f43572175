//! The `cascade` executable: command line, wiring and exit codes. The work
//! happens in the `cascade-actors` crate; this stays thin.

#![forbid(unsafe_code)]

mod cli;
mod client;
mod config;
mod http;
mod run;
mod serve;
mod settings;
mod state;
mod telemetry;
mod units;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command, ConfigArg, DockerCommand, GcpVmCommand};
use crate::config::{Config, LogFormat, Overrides};

/// sysexits.h: EX_CONFIG, configuration error.
pub const EXIT_CONFIG: u8 = 78;
/// sysexits.h: EX_UNAVAILABLE, the running cascade could not be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// sysexits.h: EX_SOFTWARE, a tier failed too often and cascade gave up.
pub const EXIT_ESCALATED: u8 = 70;
pub const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cascade: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(dispatch(cli))
}

/// Sends every panic to the log (and from there to OpenTelemetry) as an
/// error with its location, instead of raw text on stderr beside the JSON
/// lines. Supervision contains the panic itself; this makes it seen.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let panic = cascade_actors::tier::panic_text(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        tracing::error!(%panic, %location, thread, "Panic.");
    }));
}

async fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config, listen } => {
            let overrides = overrides(&config, listen, cli.log_format);
            let Some(loaded) = load(&config, &overrides) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let telemetry = telemetry::init(loaded.log.format, &loaded.telemetry);
            install_panic_hook();
            let source = run::Source {
                file: config.config,
                overrides,
            };
            run::run(loaded, source, telemetry).await
        }
        Command::Autoheal { config, listen } => {
            let overrides = Overrides {
                autoheal: true,
                ..overrides(&config, listen, cli.log_format)
            };
            let Some(loaded) = load(&config, &overrides) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let telemetry = telemetry::init(loaded.log.format, &loaded.telemetry);
            for notice in loaded.standalone.iter().flat_map(|s| &s.notices) {
                tracing::info!("docker-autoheal setting: {notice}");
            }
            let source = run::Source {
                file: config.config,
                overrides,
            };
            run::run(loaded, source, telemetry).await
        }
        Command::CheckConfig { config } => {
            let Some(loaded) = load(&config, &overrides(&config, None, cli.log_format)) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            match settings::render_redacted(&loaded) {
                Ok(text) => {
                    println!("{text}");
                    if let Some(warning) = loaded.api.exposure_warning() {
                        eprintln!("warning: {warning}");
                    }
                    eprintln!("configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cascade: cannot render the configuration: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Status { config, json } => {
            let Some(loaded) = load(&config, &overrides(&config, None, cli.log_format)) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let result = async {
                let client = client::Client::new(loaded, Duration::from_secs(5))?;
                client.status().await
            }
            .await;
            match result {
                Ok(value) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&value).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(value) => {
                    print!("{}", client::render_status(&value));
                    ExitCode::SUCCESS
                }
                Err(e) => client_error(e),
            }
        }
        Command::Restart {
            tier,
            force,
            dry_run,
            config,
        } => match request_restart(&config, cli.log_format, tier, force, dry_run).await {
            Ok(report) => {
                let verb = if report.dry_run { "would" } else { "did" };
                println!("restart {} ({verb}):", report.tier);
                print_plan(&report);
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Docker {
            command: DockerCommand::Check { config },
        } => {
            // The consistency check is the docker tier's restart plan, unexecuted.
            match request_restart(
                &config,
                cli.log_format,
                cascade_actors::TierId::Docker,
                false,
                true,
            )
            .await
            {
                Ok(report) => {
                    println!("docker containers against the configuration:");
                    print_plan(&report);
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::InstallUnit {
            systemd,
            launchd: _,
            output,
            config,
        } => install_unit(systemd, output, &config),
        Command::GcpVm {
            command:
                GcpVmCommand::DeletePool {
                    name,
                    project,
                    zone,
                    yes,
                    config,
                },
        } => {
            let Some(loaded) = load(&config, &overrides(&config, None, cli.log_format)) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let configured = loaded.tiers.gcp_vm.clone();
            let mut target = configured.clone().unwrap_or_default();
            target.pool = name;
            target.project = project.unwrap_or(target.project);
            target.zone = zone.unwrap_or(target.zone);
            let pool_dir = config::state_dir(&loaded).join("gcp_vm");
            match cascade_actors::tiers::gcp_vm::delete_pool(
                &target,
                configured.as_ref(),
                &cascade_actors::tiers::gcp::GcpEnv::from_env(),
                &pool_dir,
                yes,
            )
            .await
            {
                Ok(report) => {
                    for line in &report.lines {
                        println!("{line}");
                    }
                    if yes && !report.complete {
                        ExitCode::from(EXIT_FAILURE)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("cascade gcp_vm delete-pool: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::DemoBackend { options } => demo_backend(options).await,
    }
}

fn install_unit(
    systemd: bool,
    output: Option<std::path::PathBuf>,
    config_path: &std::path::Path,
) -> ExitCode {
    // A unit for a configuration that cannot run would only fail later,
    // under the service manager, with the problems in its journal.
    let config_arg = ConfigArg {
        config: Some(config_path.to_owned()),
        state_dir: None,
    };
    let Some(loaded) = load(&config_arg, &Overrides::default()) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let facts = units::ServiceFacts::of(&loaded);
    let result = (|| {
        let exe = units::current_exe()?;
        let config_file = units::absolute_config(config_path)?;
        let text = if systemd {
            units::systemd_unit(&exe, &config_file, &facts)?
        } else {
            units::launchd_plist(&exe, &config_file, &config::state_dir(&loaded), &facts)?
        };
        let path = output.unwrap_or_else(|| units::default_path(systemd));
        if path.as_os_str() == "-" {
            print!("{text}");
            return Ok(None);
        }
        units::write(&path, &text)?;
        Ok::<_, units::UnitError>(Some(path))
    })();
    match result {
        Ok(Some(path)) => {
            eprintln!("wrote {}", path.display());
            if systemd {
                eprintln!("next: systemctl daemon-reload && systemctl enable --now cascade");
            } else {
                eprintln!("next: launchctl load -w {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cascade: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Asks the running cascade to restart (or plan restarting) `tier`.
async fn request_restart(
    config: &ConfigArg,
    log_format: Option<LogFormat>,
    tier: cascade_actors::TierId,
    force: bool,
    dry_run: bool,
) -> Result<cascade_actors::contract::RestartReport, ExitCode> {
    let Some(loaded) = load(config, &overrides(config, None, log_format)) else {
        return Err(ExitCode::from(EXIT_CONFIG));
    };
    let timeout = restart_timeout(&loaded);
    let client = client::Client::new(loaded, timeout).map_err(client_error)?;
    client
        .restart(tier, force, dry_run)
        .await
        .map_err(client_error)
}

fn print_plan(report: &cascade_actors::contract::RestartReport) {
    for step in &report.plan {
        println!("  - {step}");
    }
}

fn overrides(
    config: &ConfigArg,
    listen: Option<String>,
    log_format: Option<LogFormat>,
) -> Overrides {
    Overrides {
        listen,
        state_dir: config.state_dir.clone(),
        log_format,
        autoheal: false,
    }
}

fn load(config: &ConfigArg, overrides: &Overrides) -> Option<Config> {
    match config::load(config.config.as_deref(), overrides) {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!("cascade: {e}");
            None
        }
    }
}

fn restart_timeout(config: &Config) -> Duration {
    let instance = cascade_actors::Instance::from_state_dir(&config::state_dir(config));
    let tiers = config::tier_specs(config, &instance);
    tiers
        .iter()
        .map(|s| s.stop_grace + s.start_timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_secs(10)
}

fn client_error(e: client::ClientError) -> ExitCode {
    eprintln!("cascade: {e}");
    match e {
        // No token file: no cascade has run with this state directory.
        client::ClientError::Unreachable { .. }
        | client::ClientError::State(_)
        | client::ClientError::Untrusted { .. } => ExitCode::from(EXIT_UNAVAILABLE),
        _ => ExitCode::from(EXIT_FAILURE),
    }
}

async fn demo_backend(options: cascade_demo::Options) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = cascade_demo::run_until_signal(options).await;
    ExitCode::from(u8::try_from(code).unwrap_or(EXIT_FAILURE))
}
