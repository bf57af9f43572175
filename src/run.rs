//! `cascade run`: a straight line — state directory, supervisor, status API,
//! wait for a signal or an escalation, stop everything within its grace.
//!
//! SIGHUP reloads the configuration from the same file and flags: an invalid
//! one is refused (logged, the running configuration kept); a valid one goes
//! to the root, which restarts only the tiers it touches. Settings bound at
//! start-up (listen address, state directory, log format, supervision
//! policy) are reported as needing a restart and otherwise ignored.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cascade_actors::Instance;
use cascade_actors::autoheal::Autoheal;
use cascade_actors::supervisor::{self, Exit, RootMsg};
use cascade_actors::tier::TierSpec;
use cascade_router::Router;
use ractor::ActorRef;
use ractor::rpc::CallResult;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{self, Config, Overrides};
use crate::http::{self, ApiState};
use crate::telemetry::{Scrape, Telemetry};
use crate::{EXIT_ESCALATED, EXIT_FAILURE};
use crate::{serve, state};

/// Where the running configuration came from, so SIGHUP reads it the same way.
pub struct Source {
    /// `--config FILE`, if given.
    pub file: Option<PathBuf>,
    /// The flags that override configuration keys.
    pub overrides: Overrides,
}

pub async fn run(config: Config, source: Source, telemetry: Telemetry) -> ExitCode {
    let flush_within = config.telemetry.shutdown_timeout;
    let traced = telemetry.exports_traces();
    let (code, summary) = match run_inner(config, source, telemetry.scrape(), traced).await {
        Ok(Ended::Stopped) => (ExitCode::SUCCESS, None),
        Ok(Ended::GaveUp(summary)) => (ExitCode::from(EXIT_ESCALATED), Some(summary)),
        Err(message) => {
            error!("{message}");
            (ExitCode::from(EXIT_FAILURE), Some(message))
        }
    };
    // The log lines are queued; the summary follows the last of them.
    telemetry.shutdown(flush_within).await;
    if let Some(summary) = summary {
        eprintln!("cascade: {summary}");
    }
    code
}

/// How a run that started ended.
enum Ended {
    Stopped,
    /// The root gave up: the summary line for a person at a terminal.
    GaveUp(String),
}

async fn run_inner(
    config: Config,
    source: Source,
    scrape: Scrape,
    traced: bool,
) -> Result<Ended, String> {
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let mut hangup =
        signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;

    // Lock first, bind second, write last: a second cascade on this state
    // directory stops at the lock and changes nothing of the first one's.
    let nofile = serve::raise_open_file_limit();
    if let Some(warning) = config.api.exposure_warning() {
        warn!("{warning}");
    }
    let dir = config::state_dir(&config);
    if let Some(warning) = state::ensure_dir(&dir).map_err(|e| e.to_string())? {
        warn!("{warning}");
    }
    let _lock = state::lock(&dir).map_err(|e| e.to_string())?;
    let listener = cascade_router::listen(config.api.listen)
        .map_err(|e| format!("cannot listen on {} (api.listen): {e}", config.api.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the API address: {e}"))?;
    let token = state::write_token(&dir).map_err(|e| e.to_string())?;
    state::write_api_addr(&dir, addr).map_err(|e| e.to_string())?;
    // Bound before anything starts, so a taken port fails start-up at once.
    let router_listener = match config.router.enabled {
        true => Some(
            cascade_router::bind(&config.router)
                .await
                .map_err(|e| e.to_string())?,
        ),
        false => None,
    };

    // Computed once: what this cascade creates on a shared platform is
    // labelled with it, and only what carries it is stopped or removed.
    let instance = Instance::from_state_dir(&dir);
    // Made once: every autoheal actor of this process keeps its history here.
    let autoheal = Autoheal::new();
    let heals = autoheal.handle();
    let specs = config::tier_specs_with(&config, &instance, Some(&heals));
    let restart_timeout = specs
        .iter()
        .map(|s| s.stop_grace + s.start_timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_secs(5);
    let mut running = supervisor::start_with_autoheal(
        specs,
        config.waterfall.clone(),
        config.supervisor.clone(),
        std::sync::Arc::new(cascade_actors::notify::Systemd::from_env()),
        instance.clone(),
        config::autoheal_spec(&config, &instance, &autoheal),
    )
    .await
    .map_err(|e| format!("cannot start the supervisor: {e}"))?;

    // The router reads the table the root publishes with every decision.
    let router = match router_listener {
        Some(listener) => Some(
            Router::start(
                listener,
                config.router.clone(),
                running.routes.clone(),
                traced,
            )
            .map_err(|e| format!("cannot start the router: {e}"))?,
        ),
        None => None,
    };
    let api = ApiState {
        router: router.as_ref().map(Router::handle),
        snapshots: running.snapshots.clone(),
        root: running.root.clone(),
        token,
        reads_need_token: !config.api.is_loopback(),
        allowed_hosts: std::sync::Arc::new(
            config
                .api
                .allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        ),
        event_streams: std::sync::Arc::new(tokio::sync::Semaphore::new(
            config.api.max_event_streams,
        )),
        restart_timeout,
        scrape,
    };
    let limits = serve::Limits::within(
        config.api.max_connections,
        nofile,
        config.api.header_timeout,
        config.api.idle_timeout,
    );
    info!(
        open_files = nofile,
        api_connections = limits.max_connections,
        "Open-file limit {nofile}; the status API takes at most {} connections.",
        limits.max_connections
    );
    let stop_http = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve::serve(
        listener,
        http::router(api),
        limits,
        stop_http.clone(),
    ));
    match &router {
        Some(router) => info!(
            api = %addr,
            router = %router.handle().address(),
            state_dir = %dir.display(),
            %instance,
            "cascade is running."
        ),
        None => {
            info!(api = %addr, state_dir = %dir.display(), %instance, "cascade is running (router disabled).")
        }
    }

    #[cfg(debug_assertions)]
    let _fault = fault::inject(&running, &dir);

    // The configuration in effect: what a reload is compared against.
    let mut current = config;
    // Reloads in flight: the root applies them while this loop keeps
    // answering signals, so a SIGTERM during a slow reload is not held up.
    let mut reloads = tokio::task::JoinSet::new();
    let exit = loop {
        tokio::select! {
            _ = interrupt.recv() => break None,
            _ = terminate.recv() => break None,
            _ = hangup.recv() => {
                if let Some(apply) = reload(&running.root, router.as_ref(), &source, &instance, &autoheal, &mut current) {
                    reloads.spawn(apply);
                }
            }
            Some(_) = reloads.join_next(), if !reloads.is_empty() => {}
            exit = &mut running.exit => break Some(exit.unwrap_or_else(|_| vanished())),
        }
    };
    reloads.abort_all();
    let shutdown_budget = stop_budget(&config::tier_specs(&current, &instance));
    let exit = match exit {
        Some(exit) => exit,
        None => {
            info!("Signal received; stopping tiers (a second signal forces exit).");
            let snapshots = running.snapshots.clone();
            let force = tokio::spawn(async move {
                tokio::select! {
                    _ = interrupt.recv() => {},
                    _ = terminate.recv() => {},
                }
                // The direct children would die with cascade (parent-death
                // signal), but not what they started; their groups go now.
                kill_process_groups(&snapshots.borrow());
                say_without_blocking("cascade: second signal, exiting now\n");
                std::process::exit(130);
            });
            // Requests in flight finish on the tiers that serve them before
            // any tier is stopped.
            if let Some(router) = router {
                drain_router(router).await;
            }
            let stopped = running
                .root
                .call(RootMsg::Shutdown, Some(shutdown_budget))
                .await;
            if !matches!(stopped, Ok(CallResult::Success(()))) {
                warn!(
                    "Tiers did not all stop within {}.",
                    cascade_actors::text::duration(shutdown_budget)
                );
            }
            force.abort();
            // The root reports its exit before it answers Shutdown; if the
            // call timed out, the root is wedged and there is nothing to wait for.
            match tokio::time::timeout(Duration::from_secs(5), &mut running.exit).await {
                Ok(exit) => exit.unwrap_or_else(|_| vanished()),
                Err(_) => {
                    warn!("Root supervisor did not report its exit within 5s.");
                    Exit::Shutdown
                }
            }
        }
    };

    stop_http.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "Status API task failed."),
        Err(_) => warn!("Status API did not stop within 5s."),
    }
    if tokio::time::timeout(Duration::from_secs(5), running.join)
        .await
        .is_err()
    {
        warn!("Root supervisor did not finish within 5s.");
    }
    let _ = std::fs::remove_file(dir.join(state::API_FILE));

    match exit {
        Exit::Shutdown => {
            info!("cascade stopped.");
            Ok(Ended::Stopped)
        }
        failed @ (Exit::Escalated { .. } | Exit::Failed { .. }) => {
            Ok(Ended::GaveUp(failed.to_string()))
        }
    }
}

/// The root went away without reporting why: it failed in a way it could
/// not contain, and ractor killed the tiers with it.
fn vanished() -> Exit {
    let error = "the root supervisor stopped without reporting why".to_owned();
    error!(%error, "cascade is failing.");
    Exit::Failed { error }
}

/// How long stopping `specs` may take: each tier's grace and a margin.
pub fn stop_budget(specs: &[TierSpec]) -> Duration {
    specs
        .iter()
        .map(|s| s.stop_grace.saturating_add(Duration::from_secs(2)))
        .fold(Duration::from_secs(5), Duration::saturating_add)
}

/// Settings read once at start-up, which a reload cannot apply.
fn needs_restart(current: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if new.api.listen != current.api.listen {
        keys.push("api.listen");
    } else if new.api != current.api {
        keys.push("api");
    }
    if new.general.state_dir != current.general.state_dir {
        keys.push("general.state_dir");
    }
    if new.log.format != current.log.format {
        keys.push("log.format");
    }
    // The root's restart policy is fixed when it starts.
    if new.supervisor != current.supervisor {
        keys.push("supervisor");
    }
    // The exporters are built once, before the supervisor.
    if new.telemetry != current.telemetry {
        keys.push("telemetry");
    }
    // The router's listener and its workers are set up once; its other
    // settings reload.
    if new.router.enabled != current.router.enabled {
        keys.push("router.enabled");
    }
    if new.router.listen != current.router.listen {
        keys.push("router.listen");
    }
    if new.router.workers != current.router.workers {
        keys.push("router.workers");
    }
    keys
}

/// SIGHUP: reads the configuration again and returns the hand-over of a
/// valid one to the root, which the caller runs as a task. `current`
/// becomes the new configuration, except the settings that need a restart,
/// which keep their running values.
fn reload(
    root: &ActorRef<RootMsg>,
    router: Option<&Router>,
    source: &Source,
    instance: &Instance,
    autoheal: &Autoheal,
    current: &mut Config,
) -> Option<impl Future<Output = ()> + use<>> {
    info!("SIGHUP received; reloading the configuration.");
    let mut new = match config::load(source.file.as_deref(), &source.overrides) {
        Ok(new) => new,
        Err(e) => {
            error!(error = %e, "Configuration reload refused; keeping the running configuration.");
            return None;
        }
    };
    for key in needs_restart(current, &new) {
        warn!(
            key,
            "{key} changed: needs a restart to take effect; ignored until then."
        );
    }
    new.api = current.api.clone();
    new.general = current.general.clone();
    new.log = current.log.clone();
    new.supervisor = current.supervisor.clone();
    new.telemetry = current.telemetry.clone();
    new.router.enabled = current.router.enabled;
    new.router.listen = current.router.listen;
    new.router.workers = current.router.workers;
    if let Some(router) = router {
        router.reload(new.router.clone());
    }

    // Stopping every old tier and spawning the new ones bounds the reload.
    let budget = stop_budget(&config::tier_specs(current, instance))
        .saturating_add(stop_budget(&config::tier_specs(&new, instance)));
    let tiers = config::tier_specs_with(&new, instance, Some(&autoheal.handle()));
    let waterfall = new.waterfall.clone();
    let heal = config::autoheal_spec(&new, instance, autoheal);
    if let Err(e) = root.send_message(RootMsg::ReloadAutoheal(heal.map(Box::new))) {
        warn!(error = %e, "Autoheal's reload could not be delivered.");
    }
    *current = new;
    let root = root.clone();
    Some(async move {
        let answer = root
            .call(
                |reply| RootMsg::Reload {
                    tiers,
                    waterfall,
                    reply,
                },
                Some(budget),
            )
            .await;
        match answer {
            Ok(CallResult::Success(summary)) => info!("{summary}"),
            Ok(CallResult::Timeout) => warn!(
                "Reload not confirmed within {}; it may still be in progress.",
                cascade_actors::text::duration(budget)
            ),
            Ok(CallResult::SenderError) => warn!("Reload not applied: cascade is stopping."),
            Err(e) => warn!(error = %e, "Reload could not be delivered."),
        }
    })
}

/// Stops the router accepting and waits for its requests in flight, at
/// most `router.drain_timeout` (and a margin).
async fn drain_router(router: Router) {
    let budget = router.drain_budget();
    if tokio::time::timeout(budget, router.drain()).await.is_err() {
        warn!(
            "Router did not finish draining within {}.",
            cascade_actors::text::duration(budget)
        );
    }
}

/// Writes `line` to stderr only if the sink takes it at once: a stderr
/// nobody reads must not hold up a forced exit.
fn say_without_blocking(line: &str) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let stderr = std::io::stderr();
    if let Ok(flags) = fcntl(&stderr, FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        let _ = fcntl(&stderr, FcntlArg::F_SETFL(flags));
    }
    let _ = nix::unistd::write(&stderr, line.as_bytes());
}

/// SIGKILLs every process group a tier reports (`details.pgid`).
fn kill_process_groups(snapshot: &supervisor::Snapshot) {
    use nix::sys::signal::{Signal, killpg};
    for tier in &snapshot.tiers {
        let Some(pgid) = tier
            .status
            .details
            .get("pgid")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pgid > 1 {
            let _ = killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// A test-only fault hook, compiled out of release builds: with
/// `CASCADE_TEST_FAULT=root-panic` the root panics (a bug it contains), with
/// `root-kill` it is killed (a failure it cannot report), once a tier is
/// active and the file `fault` appears in the state directory (so a test
/// reads what it needs first). Tests use it to check the exit code and
/// that tiers are stopped.
#[cfg(debug_assertions)]
mod fault {
    use cascade_actors::supervisor::{Fault, RootMsg};
    use tracing::warn;

    pub fn inject(
        running: &cascade_actors::supervisor::Running,
        state_dir: &std::path::Path,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let fault = match std::env::var("CASCADE_TEST_FAULT").ok()?.as_str() {
            "root-panic" => Fault::Panic,
            "root-kill" => Fault::Kill,
            other => {
                warn!(fault = other, "Unknown CASCADE_TEST_FAULT; ignored.");
                return None;
            }
        };
        let mut snapshots = running.snapshots.clone();
        let root = running.root.clone();
        let trigger = state_dir.join("fault");
        Some(tokio::spawn(async move {
            while !trigger.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if snapshots.wait_for(|s| s.active.is_some()).await.is_ok() {
                warn!(%fault, "Injecting a root failure (test hook).");
                let _ = root.send_message(RootMsg::Fault(fault));
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_s_listener_and_workers_need_a_restart_its_limits_do_not() {
        let current = config::load(None, &config::Overrides::default()).expect("the defaults load");
        let mut new = current.clone();
        new.router.workers = 7;
        new.router.listen = "127.0.0.1:9999".parse().unwrap();
        new.router.max_attempts = 2;
        assert_eq!(
            needs_restart(&current, &new),
            ["router.listen", "router.workers"]
        );
    }
}
