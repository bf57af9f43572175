//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use cascade_actors::TierId;

use crate::config::LogFormat;

/// Accepts exactly the tier names, so nothing else reaches the API's path.
fn tier_parser() -> impl clap::builder::TypedValueParser<Value = TierId> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(TierId::ALL.map(TierId::as_str)).map(|name| {
        TierId::parse(&name).unwrap_or_else(|| unreachable!("clap checked the possible values"))
    })
}

#[derive(Debug, Parser)]
#[command(
    name = "cascade",
    version,
    about = "Keeps a speaker-verification inference service available through a waterfall of backend tiers."
)]
pub struct Cli {
    /// Log format; `auto` is human on a terminal and JSON otherwise.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArg {
    /// Configuration file (TOML), layered over the built-in defaults.
    #[arg(long, short, env = "CASCADE_CONFIG")]
    pub config: Option<PathBuf>,
    /// State directory (token, API address); overrides `general.state_dir`.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the supervisor in the foreground.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Status API address; overrides `api.listen`.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Show the status of a running cascade.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print the effective result (secrets redacted).
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Restart a tier of a running cascade.
    Restart {
        /// docker, cloud_run, local or gcp_vm.
        #[arg(value_parser = tier_parser())]
        tier: TierId,
        /// Restart even what looks consistent, without a graceful stop.
        #[arg(long)]
        force: bool,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write a systemd unit or a launchd agent for this binary and configuration.
    InstallUnit {
        /// A systemd unit (Type=notify, watchdog, hardening).
        #[arg(long, conflicts_with = "launchd", required_unless_present = "launchd")]
        systemd: bool,
        /// A launchd agent property list (KeepAlive, ThrottleInterval).
        #[arg(long)]
        launchd: bool,
        /// Where to write it; `-` prints it. Default: /etc/systemd/system (root),
        /// ~/.config/systemd/user, or ~/Library/LaunchAgents.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Configuration file the service runs with.
        #[arg(long, short, env = "CASCADE_CONFIG")]
        config: PathBuf,
    },
    /// Heal Docker containers as the host's autoheal, with no tier and no
    /// router (a drop-in for docker-autoheal: its AUTOHEAL_*, WEBHOOK_* and
    /// DOCKER_SOCK variables are read); the status API and metrics are
    /// served.
    Autoheal {
        #[command(flatten)]
        config: ConfigArg,
        /// Status API address; overrides `api.listen`.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Docker tier tools.
    Docker {
        #[command(subcommand)]
        command: DockerCommand,
    },
    /// gcp_vm tier tools.
    #[command(name = "gcp_vm")]
    GcpVm {
        #[command(subcommand)]
        command: GcpVmCommand,
    },
    /// Run the demo backend (a stand-in for the ECAPA service, not a model).
    #[command(hide = true)]
    DemoBackend {
        #[command(flatten)]
        options: cascade_demo::Options,
    },
}

#[derive(Debug, Subcommand)]
pub enum DockerCommand {
    /// Show, per managed container, whether it matches the configuration
    /// (keep / recreate because X / create). Changes nothing.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum GcpVmCommand {
    /// List the VMs labelled cascade-pool=NAME and the pool's checkpoints; with --yes delete
    /// them. For a pool no cascade runs any more (a running cascade drains a pool the
    /// configuration stopped naming by itself, once it is idle).
    DeletePool {
        /// The pool's name (its VMs are NAME-0, NAME-1, ...).
        name: String,
        /// Project; default: tiers.gcp_vm.project.
        #[arg(long)]
        project: Option<String>,
        /// Zone; default: tiers.gcp_vm.zone.
        #[arg(long)]
        zone: Option<String>,
        /// Delete them; without it, only list what would be deleted.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}
