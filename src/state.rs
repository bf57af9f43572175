//! The state directory: who owns it, the lock that makes one cascade per
//! directory, the API token, and the address of the running API.
//!
//! Invariant: the directory belongs to this user and has mode 0700 before
//! anything is written in it (a looser one is tightened, with a warning;
//! another user's is refused); the running cascade holds an exclusive
//! `flock` on `STATE_DIR/lock` for its whole life, so a second one exits
//! before it binds or writes anything; the token file is created with mode
//! 0600 before any byte of the secret is written. The CLI trusts the `api`
//! file only when this user owns it and nobody else can write it or its
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rand::Rng;

pub const TOKEN_FILE: &str = "token";
pub const API_FILE: &str = "api";
pub const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {path} belongs to uid {owner}, not to this user (uid {me}); refusing to keep a token there (set general.state_dir or --state-dir to a directory of your own)"
    )]
    Foreign { path: PathBuf, owner: u32, me: u32 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source} (is cascade running with this state directory?)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another cascade{} is already running with state directory {}; stop it first, or give this one its own --state-dir",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display()
    )]
    Locked { dir: PathBuf, pid: Option<u32> },
}

/// Creates the state directory (mode 0700) or checks the existing one:
/// another user's is refused, a looser mode is tightened to 0700. Returns a
/// warning for the log when it tightened something.
pub fn ensure_dir(dir: &Path) -> Result<Option<String>, StateError> {
    let create = |source| StateError::CreateDir {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(create)?;
    let metadata = fs::metadata(dir).map_err(create)?;
    let me = nix::unistd::geteuid().as_raw();
    if metadata.uid() != me {
        return Err(StateError::Foreign {
            path: dir.to_owned(),
            owner: metadata.uid(),
            me,
        });
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(create)?;
    Ok(Some(format!(
        "state directory {} had mode {mode:04o}; set it to 0700 (other users could read or replace its files)",
        dir.display()
    )))
}

/// The exclusive lock that makes one cascade per state directory. Held
/// until dropped (or the process ends, however it ends).
#[derive(Debug)]
pub struct Lock {
    _file: Flock<File>,
}

/// Takes the state directory's lock without waiting and records this
/// process's pid in the lock file; fails with [`StateError::Locked`] naming
/// the holder's pid when another process has it.
pub fn lock(dir: &Path) -> Result<Lock, StateError> {
    let path = dir.join(LOCK_FILE);
    let err = |source| StateError::Lock {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(err)?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StateError::Locked {
                dir: dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        Err((_, errno)) => return Err(err(errno.into())),
    };
    file.set_len(0).map_err(err)?;
    file.rewind().map_err(err)?;
    writeln!(file, "{}", std::process::id()).map_err(err)?;
    Ok(Lock { _file: file })
}

/// Writes a fresh random token readable only by this user, replacing the old one.
pub fn write_token(dir: &Path) -> Result<String, StateError> {
    let bytes: [u8; 32] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&dir.join(TOKEN_FILE), &token)?;
    Ok(token)
}

pub fn read_token(dir: &Path) -> Result<String, StateError> {
    let path = dir.join(TOKEN_FILE);
    let text = fs::read_to_string(&path).map_err(|source| StateError::Read { path, source })?;
    Ok(text.trim().to_owned())
}

pub fn write_api_addr(dir: &Path, addr: SocketAddr) -> Result<(), StateError> {
    write_private(&dir.join(API_FILE), &addr.to_string())
}

/// The address a running cascade wrote, and whether it can be trusted with
/// the token: only when this user owns the file and nobody else can write
/// it or replace it (its directory). Otherwise another user may have put
/// their own address there.
pub enum ApiAddr {
    Missing,
    Trusted(SocketAddr),
    Untrusted { addr: SocketAddr, why: String },
}

pub fn read_api_addr(dir: &Path) -> ApiAddr {
    let path = dir.join(API_FILE);
    let Some(addr) = fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
    else {
        return ApiAddr::Missing;
    };
    match untrusted_because(dir, &path) {
        None => ApiAddr::Trusted(addr),
        Some(why) => ApiAddr::Untrusted { addr, why },
    }
}

fn untrusted_because(dir: &Path, file: &Path) -> Option<String> {
    let me = nix::unistd::geteuid().as_raw();
    for (path, what) in [(dir, "its directory"), (file, "it")] {
        let Ok(metadata) = fs::symlink_metadata(path) else {
            return Some(format!("{} cannot be inspected", path.display()));
        };
        if metadata.uid() != me {
            return Some(format!("{what} belongs to uid {}", metadata.uid()));
        }
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Some(format!("{what} is writable by others (mode {mode:04o})"));
        }
    }
    None
}

/// Writes through a temporary file and a rename, so readers never see half a
/// token and the file never exists with looser permissions.
fn write_private(path: &Path, contents: &str) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let err = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_private_and_fresh_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(ensure_dir(&state).unwrap().is_none());
        let first = write_token(&state).unwrap();
        let mode = fs::metadata(state.join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(read_token(&state).unwrap(), first);
        assert_eq!(first.len(), 64);
        assert_ne!(write_token(&state).unwrap(), first);
    }

    #[test]
    fn a_loose_state_directory_is_tightened_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let warning = ensure_dir(dir.path()).unwrap().expect("a warning");
        assert!(warning.contains("0777"), "{warning}");
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        match lock(dir.path()) {
            Err(StateError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        lock(dir.path()).expect("free again once dropped");
    }

    #[test]
    fn an_api_file_others_can_write_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dir(dir.path()).unwrap();
        write_api_addr(dir.path(), "127.0.0.1:7373".parse().unwrap()).unwrap();
        assert!(matches!(read_api_addr(dir.path()), ApiAddr::Trusted(_)));
        let file = dir.path().join(API_FILE);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            read_api_addr(dir.path()),
            ApiAddr::Untrusted { .. }
        ));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            read_api_addr(dir.path()),
            ApiAddr::Untrusted { .. }
        ));
    }
}
