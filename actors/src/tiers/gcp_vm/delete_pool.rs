//! `cascade gcp_vm delete-pool NAME`: by-hand clean-up of a pool no cascade runs any more.
//!
//! Lists the instances labelled `cascade-pool=NAME` in the project and zone, and the pool's
//! checkpoints in the state directory; with `yes` it deletes every listed instance (each with the
//! pool's retries, waiting for its operation, 404 counting as deleted) and then removes the
//! checkpoints. Only instances carrying the pool's label are touched: a name alone never gets a VM
//! deleted. A pool the configuration runs is refused: the running cascade would create it again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::checkpoint::{self, Checkpoint};
use super::client::{ComputeApi, GceCompute, Vm};
use super::retry::Retrier;
use super::{GcpEnv, GcpVmConfig, POOL_LABEL};
use crate::resilience::{Deadline, with_deadline};

/// What the command found and did, line by line, for the terminal.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    /// Every listed instance is gone and every checkpoint removed (or nothing was to be done).
    pub complete: bool,
}

/// `config` is the pool to delete (its `pool`, `project`, `zone`, `endpoint`, retries);
/// `configured` is the configuration's own `[tiers.gcp_vm]`, if any; `pool_dir` is
/// `STATE_DIR/gcp_vm`.
pub async fn delete_pool(
    config: &GcpVmConfig,
    configured: Option<&GcpVmConfig>,
    env: &GcpEnv,
    pool_dir: &Path,
    yes: bool,
) -> Result<Report, String> {
    let pool = config.pool.as_str();
    if let Some(running) = configured
        && (
            running.pool.as_str(),
            running.project.as_str(),
            running.zone.as_str(),
        ) == (pool, config.project.as_str(), config.zone.as_str())
    {
        return Err(format!(
            "pool {pool} in {}/{} is the pool tiers.gcp_vm configures: a running cascade would create its VMs again. Rename or remove tiers.gcp_vm first (a running cascade then drains it by itself), or stop cascade for good",
            config.project, config.zone
        ));
    }
    for (key, value) in [("project", &config.project), ("zone", &config.zone)] {
        if value.trim().is_empty() {
            return Err(format!(
                "no {key}: pass --{key}, or configure tiers.gcp_vm.{key}"
            ));
        }
    }
    let checkpoints = checkpoints(pool_dir, config);
    let api = with_deadline(
        config.api_timeout,
        "connecting to Compute Engine",
        GceCompute::connect(config, env),
    )
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("connecting to Compute Engine: {e}"))?;
    let retrier = Retrier::new(config.retry.clone(), Instant::now());
    let deadline = Deadline::after(
        Instant::now(),
        config.operation_timeout + config.api_timeout,
    );
    const LIST: &str = "compute.instances.list";
    let listed = retrier
        .run(LIST, deadline, || api.list_by_label(POOL_LABEL, pool))
        .await
        .map_err(|e| format!("{LIST}: {}", e.last))?;

    let mut report = Report::default();
    report.lines.push(format!(
        "pool {pool} in {}/{}: {} instances labelled {POOL_LABEL}={pool}",
        config.project,
        config.zone,
        listed.len()
    ));
    for vm in &listed {
        report.lines.push(format!("  {}", describe(vm)));
    }
    for (path, found) in &checkpoints {
        report.lines.push(format!(
            "checkpoint {} ({} VMs)",
            path.display(),
            found.vms.len()
        ));
    }
    if checkpoints.is_empty() {
        report.lines.push(format!(
            "no checkpoint of this pool in {}",
            pool_dir.display()
        ));
    }
    if !yes {
        report.complete = listed.is_empty() && checkpoints.is_empty();
        report.lines.push(if report.complete {
            "nothing to delete".into()
        } else {
            "dry run: nothing deleted; run again with --yes to delete them".into()
        });
        return Ok(report);
    }

    let mut failed = 0;
    for vm in &listed {
        match delete_one(&api, &retrier, config, vm).await {
            Ok(()) => report.lines.push(format!("deleted {}", vm.name)),
            Err(error) => {
                failed += 1;
                report
                    .lines
                    .push(format!("not deleted {}: {error}", vm.name));
            }
        }
    }
    if failed > 0 {
        report.lines.push(format!(
            "{failed} instances not deleted; the checkpoints are kept. Run again to retry."
        ));
        return Ok(report);
    }
    for (path, _) in &checkpoints {
        match checkpoint::remove(path) {
            Ok(()) => report.lines.push(format!("removed {}", path.display())),
            Err(e) => {
                failed += 1;
                report
                    .lines
                    .push(format!("cannot remove {}: {e}", path.display()));
            }
        }
    }
    report.complete = failed == 0;
    Ok(report)
}

/// The pool's checkpoints in `pool_dir`: `NAME.json` and `NAME@PROJECT@ZONE.json`, each only if it
/// is this pool's (name, project and zone).
fn checkpoints(pool_dir: &Path, config: &GcpVmConfig) -> Vec<(PathBuf, Checkpoint)> {
    let own = pool_dir.join(format!("{}.json", config.pool));
    let moved = checkpoint::retired_path(
        &own,
        &Checkpoint::empty(&config.pool, &config.project, &config.zone),
    );
    [own, moved]
        .into_iter()
        .filter_map(|path| {
            let found = checkpoint::peek(&path)?;
            ((
                found.pool.as_str(),
                found.project.as_str(),
                found.zone.as_str(),
            ) == (
                config.pool.as_str(),
                config.project.as_str(),
                config.zone.as_str(),
            ))
                .then_some((path, found))
        })
        .collect()
}

fn describe(vm: &Vm) -> String {
    match &vm.ip {
        Some(ip) => format!("{} {} {ip}", vm.name, vm.status),
        None => format!("{} {}", vm.name, vm.status),
    }
}

/// Deletes one instance of the pool: checks its label again, sends the delete (retried), and
/// waits for the operation (at most `operation_timeout`).
async fn delete_one(
    api: &GceCompute,
    retrier: &Retrier,
    config: &GcpVmConfig,
    vm: &Vm,
) -> Result<(), String> {
    let deadline = Deadline::after(Instant::now(), config.operation_timeout);
    let get = format!("compute.instances.get {}", vm.name);
    let current = retrier
        .run(&get, deadline, || api.get(&vm.name))
        .await
        .map_err(|e| format!("{get}: {}", e.last))?;
    let Some(current) = current else {
        return Ok(());
    };
    if current.labels.get(POOL_LABEL) != Some(&config.pool) || current.id != vm.id {
        return Err(
            "it changed since it was listed (another instance by that name now); left alone".into(),
        );
    }
    let call = format!("compute.instances.delete {}", vm.name);
    let op = match retrier.run(&call, deadline, || api.delete(&vm.name)).await {
        Ok(op) => op,
        Err(e) if e.last.is_not_found() => return Ok(()),
        Err(e) => return Err(format!("{call}: {}", e.last)),
    };
    let mut wait = Duration::from_millis(200);
    let mut op = op;
    while !op.done {
        if deadline.remaining(Instant::now()).is_zero() {
            return Err(format!(
                "operation {} not done within {}",
                op.name,
                crate::text::duration(config.operation_timeout)
            ));
        }
        tokio::time::sleep(wait.min(deadline.remaining(Instant::now()))).await;
        wait = (wait * 2).min(Duration::from_secs(2));
        let poll = format!("compute.zoneOperations.get {}", op.name);
        let name = op.name.clone();
        op = retrier
            .run(&poll, deadline, || api.get_operation(&name))
            .await
            .map_err(|e| format!("{poll}: {}", e.last))?;
    }
    match op.error {
        Some(error) => Err(format!("operation {} failed: {error}", op.name)),
        None => Ok(()),
    }
}
