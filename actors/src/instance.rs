//! This cascade's identity among the others that share a host or a Docker
//! engine: a short hash of its canonical state directory.
//!
//! Two cascades with different state directories are different instances
//! (and [`crate::supervisor`]'s one-instance-per-state-directory rule makes
//! the converse true). What cascade creates on a shared platform carries the
//! instance in a label ([`Instance::LABEL`]), and cascade removes, stops,
//! recreates or heals only what carries its own.
//!
//! Invariant: computed once by the process from the state directory and
//! handed to whoever needs it; nothing here reads the environment, and the
//! value never changes while the process runs (a reload cannot move the
//! state directory).

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Serialize, Serializer};

/// One cascade instance: `cascade.instance=<id>` on what it owns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    id: String,
    state_dir: PathBuf,
}

impl Instance {
    /// The label (Docker) that names the instance owning a resource.
    pub const LABEL: &'static str = "cascade.instance";

    /// The instance of the state directory `dir`: the hash of its canonical
    /// path (symlinks resolved), so two spellings of one directory are one
    /// instance. A directory that does not exist yet is made absolute and
    /// normalized lexically instead.
    pub fn from_state_dir(dir: &Path) -> Instance {
        let state_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| lexical_absolute(dir));
        let hash = stable_hash(state_dir.as_os_str().as_encoded_bytes());
        Instance {
            id: format!("{:012x}", hash >> 16),
            state_dir,
        }
    }

    /// Twelve hex digits, e.g. `3f9a0c1d2e4b`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The canonical state directory the id was derived from.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Whether a resource's instance label (`None`: it has none) is this one.
    pub fn owns(&self, label: Option<&str>) -> bool {
        label == Some(self.id.as_str())
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Serialized as `{"id": "...", "state_dir": "..."}` for `/status`.
impl Serialize for Instance {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = s.serialize_struct("Instance", 2)?;
        out.serialize_field("id", &self.id)?;
        out.serialize_field("state_dir", &self.state_dir.to_string_lossy())?;
        out.end()
    }
}

/// `dir` made absolute against the working directory, with `.` and `..`
/// resolved without touching the file system.
fn lexical_absolute(dir: &Path) -> PathBuf {
    let joined = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(dir)
    };
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// FNV-1a 64: a hash that is the same in every build and Rust release
/// (`DefaultHasher` is not), for identities stored in labels.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned() {
        // A change here would orphan every labelled resource on upgrade.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        let instance = Instance::from_state_dir(Path::new("/nonexistent/cascade/state"));
        assert_eq!(instance.id().len(), 12);
        assert!(instance.id().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn one_directory_is_one_instance_however_it_is_spelled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let real = dir.path().join("state");
        std::fs::create_dir(&real).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let a = Instance::from_state_dir(&real);
        assert_eq!(a, Instance::from_state_dir(&link));
        assert_eq!(a, Instance::from_state_dir(&real.join("../state/.")));
        assert_eq!(a.state_dir(), std::fs::canonicalize(&real).expect("canon"));
        let other = Instance::from_state_dir(&dir.path().join("elsewhere"));
        assert_ne!(a.id(), other.id());
        assert!(a.owns(Some(a.id())));
        assert!(!a.owns(Some(other.id())));
        assert!(!a.owns(None));
    }

    #[test]
    fn a_missing_directory_is_normalized_lexically() {
        let a = Instance::from_state_dir(Path::new("/nonexistent/x/../y/./z"));
        assert_eq!(a.state_dir(), Path::new("/nonexistent/y/z"));
        let json = serde_json::to_value(&a).expect("serializes");
        assert_eq!(json["id"], a.id());
        assert_eq!(json["state_dir"], "/nonexistent/y/z");
    }
}
