//! The pool's checkpoint: what it manages, on disk, so a crash loses no VM.
//!
//! Invariant: the file at the checkpoint path is always one whole state, the old or the new,
//! whatever moment the process dies at. [`save`] writes a uniquely named temporary file in the
//! same directory, fsyncs it, renames it over the checkpoint and fsyncs the directory. [`load`]
//! never stops cascade from starting: a file that cannot be read or parsed, or that belongs to
//! another pool, project or zone, is moved aside with a warning and the pool starts empty (the
//! reconcile with `instances.list` then rebuilds it). The set-aside name is never an existing
//! file's (`NAME.corrupt-SECS-NANOS-PID`, bumped while taken), and the rename is fsynced like a
//! save. A file that cannot be moved aside is never overwritten: the pool keeps running from the
//! API and writes nothing until [`move_aside`] succeeds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::warn;

/// The format this code writes and reads.
pub const VERSION: u32 = 1;

/// Where a VM of the pool stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `instances.insert` was sent (or is about to be); its operation may still run.
    Creating,
    /// The instance exists; waiting for RUNNING, an IP and a passing health check.
    Booting,
    /// RUNNING, an IP known, and the last health check passed.
    Ready,
    /// RUNNING, but the last health check failed.
    Unhealthy,
    /// Preempted, stopped or gone: serves nothing.
    Lost,
    /// `instances.delete` was sent; its operation may still run.
    Deleting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Booting => "booting",
            Phase::Ready => "ready",
            Phase::Unhealthy => "unhealthy",
            Phase::Lost => "lost",
            Phase::Deleting => "deleting",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Insert,
    Delete,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Insert => "insert",
            OpKind::Delete => "delete",
        }
    }
}

/// A zone operation the pool started and may still have to wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpRef {
    pub name: String,
    pub kind: OpKind,
}

/// One VM of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// `{pool}-{slot}`.
    pub name: String,
    pub slot: u32,
    pub phase: Phase,
    /// Compute Engine's status when last seen.
    #[serde(default)]
    pub gce_status: Option<String>,
    #[serde(default)]
    pub ip: Option<String>,
    /// Compute Engine's id of this incarnation (a re-created VM of the same name has another).
    #[serde(default)]
    pub instance_id: Option<u64>,
    #[serde(with = "humantime_serde")]
    pub created_at: SystemTime,
    #[serde(with = "humantime_serde", default)]
    pub ready_at: Option<SystemTime>,
    #[serde(default)]
    pub last_operation: Option<OpRef>,
    #[serde(default)]
    pub lost_reason: Option<String>,
}

impl VmEntry {
    pub fn new(name: String, slot: u32, phase: Phase, now: SystemTime) -> Self {
        VmEntry {
            name,
            slot,
            phase,
            gce_status: None,
            ip: None,
            instance_id: None,
            created_at: now,
            ready_at: None,
            last_operation: None,
            lost_reason: None,
        }
    }
}

/// Everything the pool must remember across a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub version: u32,
    pub pool: String,
    pub project: String,
    pub zone: String,
    /// The start phase asked for the pool and idle deletion has not released it since: lost VMs
    /// are replaced.
    #[serde(default)]
    pub wanted: bool,
    /// When the tier stopped being the active one (the idle clock), if it is not active.
    #[serde(with = "humantime_serde", default)]
    pub idle_since: Option<SystemTime>,
    pub vms: Vec<VmEntry>,
    /// Preemption operations already acted on, so an old one never condemns a re-created VM.
    #[serde(default)]
    pub handled_preemptions: Vec<String>,
}

impl Checkpoint {
    pub fn empty(pool: &str, project: &str, zone: &str) -> Self {
        Checkpoint {
            version: VERSION,
            pool: pool.into(),
            project: project.into(),
            zone: zone.into(),
            wanted: false,
            idle_since: None,
            vms: Vec::new(),
            handled_preemptions: Vec::new(),
        }
    }
}

/// What [`load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// No checkpoint yet: a first start.
    Missing,
    Restored(Checkpoint),
    /// Unreadable, invalid or another pool's: moved to `moved_to` (None if even that failed).
    SetAside {
        moved_to: Option<PathBuf>,
        error: String,
    },
}

/// Writes `checkpoint` to `path` atomically: afterwards the file holds it whole, and a crash at any
/// point leaves the previous file whole. Creates the directory if needed.
pub fn save(path: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    let dir = parent(path);
    create_dir_durably(dir)?;
    let bytes = serde_json::to_vec_pretty(checkpoint).map_err(std::io::Error::other)?;
    let tmp = temp_path(path);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // Best effort: a leftover temporary file is harmless (load removes them) but untidy.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the checkpoint at `path`, expecting the given pool, project and zone. Never fails: a bad
/// file is set aside (see [`Loaded::SetAside`]). Removes temporary files left by interrupted saves.
pub fn load(path: &Path, pool: &str, project: &str, zone: &str) -> Loaded {
    remove_stale_temps(path);
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return set_aside(path, format!("cannot read it: {e}")),
    };
    let checkpoint: Checkpoint = match serde_json::from_slice(&bytes) {
        Ok(c) => c,
        Err(e) => return set_aside(path, format!("not a valid checkpoint: {e}")),
    };
    if checkpoint.version != VERSION {
        return set_aside(
            path,
            format!(
                "version {} (this cascade reads version {VERSION})",
                checkpoint.version
            ),
        );
    }
    if (
        checkpoint.pool.as_str(),
        checkpoint.project.as_str(),
        checkpoint.zone.as_str(),
    ) != (pool, project, zone)
    {
        return set_aside(
            path,
            format!(
                "it is for pool {} in {}/{}, the configuration says pool {pool} in {project}/{zone}",
                checkpoint.pool, checkpoint.project, checkpoint.zone
            ),
        );
    }
    Loaded::Restored(checkpoint)
}

/// Reads the checkpoint at `path` whatever pool it is for; `None` if it is not a whole checkpoint
/// of this version (the retired pools' scan leaves such files alone).
pub fn peek(path: &Path) -> Option<Checkpoint> {
    let bytes = std::fs::read(path).ok()?;
    let checkpoint: Checkpoint = serde_json::from_slice(&bytes).ok()?;
    (checkpoint.version == VERSION).then_some(checkpoint)
}

/// Where a pool's checkpoint goes when the configuration keeps its name but moves it to another
/// project or zone: `{pool}@{project}@{zone}.json` next to `path`. `@` is in no pool name, so it
/// is never a configured pool's own file.
pub fn retired_path(path: &Path, checkpoint: &Checkpoint) -> PathBuf {
    parent(path).join(format!(
        "{}@{}@{}.json",
        checkpoint.pool, checkpoint.project, checkpoint.zone
    ))
}

/// Renames `from` to `to` and fsyncs the directory.
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    std::fs::File::open(parent(to))?.sync_all()
}

/// Removes the checkpoint at `path` and fsyncs the directory.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    std::fs::File::open(parent(path))?.sync_all()
}

fn set_aside(path: &Path, error: String) -> Loaded {
    match move_aside(path) {
        Ok(aside) => {
            warn!(path = %path.display(), moved_to = %aside.display(), %error, "Checkpoint set aside; the pool is rebuilt from instances.list.");
            Loaded::SetAside {
                moved_to: Some(aside),
                error,
            }
        }
        Err(e) => {
            tracing::error!(path = %path.display(), %error, rename_error = %e, "Checkpoint unusable and could not be moved aside; the pool runs from instances.list and writes no checkpoint until it is moved away.");
            Loaded::SetAside {
                moved_to: None,
                error,
            }
        }
    }
}

/// Renames the file (or whatever is) at `path` to a name no file has
/// (`NAME.corrupt-SECS-NANOS-PID[-N]`) and fsyncs the directory. Returns the new name.
pub fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let base = format!(
        ".corrupt-{}-{:09}-{}",
        stamp.as_secs(),
        stamp.subsec_nanos(),
        std::process::id()
    );
    for n in 0..1000u32 {
        let mut aside = path.as_os_str().to_owned();
        aside.push(&base);
        if n > 0 {
            aside.push(format!("-{n}"));
        }
        let aside = PathBuf::from(aside);
        match std::fs::symlink_metadata(&aside) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::rename(path, &aside)?;
        std::fs::File::open(parent(path))?.sync_all()?;
        return Ok(aside);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "every set-aside name is taken",
    ))
}

/// `create_dir_all`, then fsyncs the parent of every directory it created, so the new directory
/// entries are as durable as the file written into them.
fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        at = d.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        std::fs::File::open(parent(d))?.sync_all()?;
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into())
}

/// `.NAME.tmp-PID-N`: unique per process and save, hidden, and never the checkpoint's own name.
fn temp_path(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    parent(path).join(format!("{}{}-{n}", temp_prefix(path), std::process::id()))
}

fn temp_prefix(path: &Path) -> String {
    format!(".{}.tmp-", file_name(path))
}

fn remove_stale_temps(path: &Path) {
    let prefix = temp_prefix(path);
    let Ok(entries) = std::fs::read_dir(parent(path)) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
pub(super) fn temp_files(path: &Path) -> Vec<PathBuf> {
    let prefix = temp_prefix(path);
    std::fs::read_dir(parent(path))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample(n: u32) -> Checkpoint {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let mut c = Checkpoint::empty("pool", "proj", "zone-a");
        c.wanted = true;
        c.idle_since = Some(t);
        c.handled_preemptions = vec!["op-1".into()];
        for slot in 0..n {
            let mut vm = VmEntry::new(format!("pool-{slot}"), slot, Phase::Ready, t);
            vm.ip = Some(format!("10.0.0.{slot}"));
            vm.instance_id = Some(u64::MAX - u64::from(slot));
            vm.ready_at = Some(t + Duration::from_secs(1));
            vm.last_operation = Some(OpRef {
                name: format!("op-{slot}"),
                kind: OpKind::Insert,
            });
            c.vms.push(vm);
        }
        c
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("nested/pool.json");
        assert_eq!(load(&path, "pool", "proj", "zone-a"), Loaded::Missing);
        save(&path, &sample(2)).expect("save");
        assert_eq!(
            load(&path, "pool", "proj", "zone-a"),
            Loaded::Restored(sample(2))
        );
        save(&path, &sample(3)).expect("save over");
        assert_eq!(
            load(&path, "pool", "proj", "zone-a"),
            Loaded::Restored(sample(3))
        );
        assert!(temp_files(&path).is_empty());
    }

    #[test]
    fn garbage_is_set_aside_and_never_an_error() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("pool.json");
        std::fs::write(&path, b"{\"version\": 1, \"vms\": [tru").expect("write");
        let Loaded::SetAside {
            moved_to: Some(aside),
            error,
        } = load(&path, "pool", "proj", "zone-a")
        else {
            panic!("garbage must be set aside");
        };
        assert!(error.contains("not a valid checkpoint"), "{error}");
        assert!(!path.exists());
        assert!(
            aside
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pool.json.corrupt-"))
        );
        assert_eq!(
            std::fs::read(&aside).expect("kept"),
            b"{\"version\": 1, \"vms\": [tru"
        );
        assert_eq!(load(&path, "pool", "proj", "zone-a"), Loaded::Missing);
    }

    #[test]
    fn a_set_aside_never_replaces_an_earlier_one() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("pool.json");
        // Files set aside earlier in this second (the names a per-second stamp would give).
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let earlier: Vec<PathBuf> = (now.saturating_sub(1)..=now + 2)
            .map(|secs| dir.path().join(format!("pool.json.corrupt-{secs}")))
            .collect();
        for file in &earlier {
            std::fs::write(file, b"earlier").expect("write");
        }
        let mut asides = Vec::new();
        for garbage in [&b"first"[..], &b"second"[..]] {
            std::fs::write(&path, garbage).expect("write garbage");
            let Loaded::SetAside {
                moved_to: Some(aside),
                ..
            } = load(&path, "pool", "proj", "zone-a")
            else {
                panic!("garbage must be set aside");
            };
            assert_eq!(std::fs::read(&aside).expect("kept"), garbage);
            asides.push(aside);
        }
        assert_ne!(asides[0], asides[1]);
        assert_eq!(std::fs::read(&asides[0]).expect("kept"), b"first");
        for file in &earlier {
            assert_eq!(std::fs::read(file).expect("kept"), b"earlier", "{file:?}");
        }
    }

    #[test]
    fn another_pool_or_version_is_set_aside() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("pool.json");
        save(&path, &sample(1)).expect("save");
        let Loaded::SetAside { error, .. } = load(&path, "pool", "proj", "zone-b") else {
            panic!("another zone's checkpoint must be set aside");
        };
        assert!(error.contains("zone-b"), "{error}");
        let mut future = sample(1);
        future.version = 2;
        save(&path, &future).expect("save");
        assert!(matches!(
            load(&path, "pool", "proj", "zone-a"),
            Loaded::SetAside { .. }
        ));
    }

    #[test]
    fn an_unreadable_path_is_set_aside() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        // A directory where the file should be: reading fails with something other than NotFound.
        let path = dir.path().join("pool.json");
        std::fs::create_dir(&path).expect("mkdir");
        assert!(matches!(
            load(&path, "pool", "proj", "zone-a"),
            Loaded::SetAside {
                moved_to: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn stale_temp_files_are_removed_and_never_read() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("pool.json");
        save(&path, &sample(1)).expect("save");
        let stale = dir.path().join(".pool.json.tmp-1-1");
        std::fs::write(&stale, b"{half a state").expect("write");
        assert_eq!(
            load(&path, "pool", "proj", "zone-a"),
            Loaded::Restored(sample(1))
        );
        assert!(!stale.exists());
    }
}
