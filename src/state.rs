//! The state directory: the API token and the address of the running API.
//!
//! Invariant: the token file is created with mode 0600 and the directory
//! with 0700, before any byte of the secret is written.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;

pub const TOKEN_FILE: &str = "token";
pub const API_FILE: &str = "api";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
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
}

pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::CreateDir {
            path: dir.to_owned(),
            source,
        })
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

/// The address a running cascade wrote, if any.
pub fn read_api_addr(dir: &Path) -> Option<SocketAddr> {
    fs::read_to_string(dir.join(API_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
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
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn token_is_private_and_fresh_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        ensure_dir(&state).unwrap();
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
}
