//! Pools the configuration no longer names: drained, never leaked.
//!
//! A pool's identity is its name, project and zone. When a reload (or a restart with an edited
//! file) changes any of them, the VMs of the old identity would otherwise run forever: no
//! cascade looks for them again. So every checkpoint in the pool directory that is not the
//! configured pool's is a retired pool, and the driver runs it as a pool of its own that is never
//! wanted and never active: its first reconcile confirms (or adopts, by label) what it holds, its
//! VMs are deleted under the idle-deletion rules (`idle_ttl` after it was last active, each
//! delete checking the pool's label and the instance id first), a lost VM is deleted and not
//! replaced, and once it holds nothing its checkpoint is removed and it ends.
//!
//! A checkpoint at the configured pool's own path that names another project or zone (the name
//! was kept, the place changed) is renamed to [`checkpoint::retired_path`] first, so it is drained
//! rather than set aside. Renaming the pool back within `idle_ttl` finds its checkpoint again and
//! adopts the VMs.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::GcpVmConfig;
use super::checkpoint::{self, Checkpoint};

/// Moves the checkpoint at the configured pool's `path` out of the way if it is the same pool
/// name in another project or zone.
pub(super) fn retire_moved(path: &Path, config: &GcpVmConfig) {
    let Some(found) = checkpoint::peek(path) else {
        return;
    };
    if found.pool != config.pool || (found.project == config.project && found.zone == config.zone) {
        // Another pool's file (load sets it aside) or this pool's own.
        return;
    }
    let to = checkpoint::retired_path(path, &found);
    match checkpoint::rename_durably(path, &to) {
        Ok(()) => info!(
            backend.tier = "gcp_vm",
            pool = %found.pool,
            from = %format!("{}/{}", found.project, found.zone),
            to = %format!("{}/{}", config.project, config.zone),
            "The pool moved: its VMs in the old project or zone are drained."
        ),
        Err(error) => warn!(
            backend.tier = "gcp_vm",
            path = %path.display(),
            %error,
            "The pool moved but its old checkpoint could not be renamed; it is set aside instead and its VMs are left to `cascade gcp_vm delete-pool`."
        ),
    }
}

/// Every retired pool's checkpoint next to `path`: whole checkpoints of this version for another
/// pool name, project or zone. The configured pool's identity found under another file name
/// (moved back to where it was) is dropped: the configured pool's reconcile adopts its VMs.
pub(super) fn find(path: &Path, config: &GcpVmConfig) -> Vec<(PathBuf, Checkpoint)> {
    let Some(dir) = path.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let file = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if file == path || name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Some(c) = checkpoint::peek(&file) else {
            continue;
        };
        if (c.pool.as_str(), c.project.as_str(), c.zone.as_str())
            == (
                config.pool.as_str(),
                config.project.as_str(),
                config.zone.as_str(),
            )
        {
            if let Err(error) = checkpoint::remove(&file) {
                warn!(backend.tier = "gcp_vm", path = %file.display(), %error, "Cannot remove a second checkpoint of the configured pool.");
            }
            continue;
        }
        found.push((file, c));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The configuration a retired pool runs with: the configured one (endpoint, credentials,
/// retries, intervals, `idle_ttl`) with the retired pool's name, project and zone.
pub(super) fn config_for(config: &GcpVmConfig, retired: &Checkpoint) -> GcpVmConfig {
    let max_vms = retired
        .vms
        .iter()
        .map(|vm| vm.slot + 1)
        .max()
        .unwrap_or(0)
        .max(config.max_vms);
    GcpVmConfig {
        pool: retired.pool.clone(),
        project: retired.project.clone(),
        zone: retired.zone.clone(),
        vms: 0,
        max_vms,
        ..config.clone()
    }
}
