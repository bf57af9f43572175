//! Starting the Docker daemon: the start phase's opt-in (`daemon.start`)
//! step before any container is touched.
//!
//! Runs `daemon.command` (typically `systemctl start docker` or
//! `open -a Docker`, which start the daemon and return), then polls for the
//! daemon — socket present and a ping answered, each attempt bounded by
//! `attempt_timeout`, one every `poll_interval` — until `daemon.timeout`.
//!
//! Invariants: the probe never comes here. If the command (or a daemon run in
//! the foreground) exits non-zero before the daemon answers, the start fails
//! at once with `docker daemon exited with code N` and the last lines of its
//! stderr, not at the deadline. If the start is cancelled before the daemon
//! answers, the command is killed. Once the daemon answers, a command still
//! running (a foreground `dockerd`) is left running: killing the daemon
//! cascade just started would take every container down with it. That is
//! why this uses a guard instead of tokio's `kill_on_drop`, which cannot be
//! disarmed, and why stderr goes to an unlinked temporary file instead of a
//! pipe: a pipe nobody reads any more would kill a foreground daemon with
//! EPIPE on its next log line.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn};

use super::config::DaemonConfig;
use super::connect::{Connector, DockerError};
use crate::resilience::Deadline;

/// Lines of the command's stderr quoted when it fails.
const STDERR_LINES: usize = 10;
/// Bytes read from the end of the stderr file to find those lines.
const STDERR_TAIL_BYTES: u64 = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaemonError {
    #[error("daemon.command is empty")]
    NoCommand,
    #[error("cannot run the docker daemon start command `{command}`: {cause}")]
    Spawn { command: String, cause: String },
    #[error("docker daemon {how}{}", quote(stderr))]
    Exited { how: String, stderr: Vec<String> },
    #[error("docker daemon not ready after {} ({attempts} attempts; last: {last})", crate::text::duration(*after))]
    Timeout {
        after: Duration,
        attempts: u32,
        last: String,
    },
}

fn quote(stderr: &[String]) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.join(" | "))
    }
}

/// Runs the start command and waits for the daemon to answer a ping.
pub async fn start(config: &DaemonConfig, connector: &Connector) -> Result<(), DaemonError> {
    let (program, args) = config.command.split_first().ok_or(DaemonError::NoCommand)?;
    let command = config.command.join(" ");
    let spawn_error = |cause: io::Error| DaemonError::Spawn {
        command: command.clone(),
        cause: cause.to_string(),
    };
    let (stderr, child_stderr) = stderr_file().map_err(spawn_error)?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(child_stderr))
        .spawn()
        .map_err(spawn_error)?;
    let mut guard = KillUnlessReady(Some(child));
    let started = Instant::now();
    info!(%command, pid = guard.pid(), host = %connector.host(), "Starting the Docker daemon.");

    let deadline = Deadline::after(started, config.timeout);
    let mut command_done = false;
    let mut attempts = 0u32;
    let mut last = String::from("no attempt finished");
    loop {
        if deadline.is_expired(Instant::now()) {
            warn!(%command, attempts, %last, "Docker daemon did not become ready in time.");
            return Err(DaemonError::Timeout {
                after: config.timeout,
                attempts,
                last,
            });
        }
        attempts += 1;
        let attempt = attempt(config, connector, &deadline, attempts, started);
        tokio::select! {
            // A failing command is reported as soon as it exits, even in the
            // middle of a ping.
            status = guard.wait(), if !command_done => {
                match status {
                    Ok(status) if status.success() => {
                        info!(%command, "Daemon start command finished; waiting for the daemon.");
                        command_done = true;
                    }
                    Ok(status) => {
                        let stderr = tail(&stderr);
                        let how = describe(status);
                        warn!(%command, exit = %how, stderr = %stderr.join(" | "), "Docker daemon start failed.");
                        return Err(DaemonError::Exited { how, stderr });
                    }
                    Err(e) => return Err(spawn_error(e)),
                }
                attempts -= 1;
            }
            outcome = attempt => match outcome {
                Ok(()) => {
                    info!(attempts, elapsed_ms = elapsed_ms(started), "Docker daemon is ready.");
                    guard.release();
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            },
        }
    }
}

/// One ping under `attempt_timeout`; on failure, logs it and waits out the
/// poll interval before returning the error.
async fn attempt(
    config: &DaemonConfig,
    connector: &Connector,
    deadline: &Deadline,
    attempt: u32,
    started: Instant,
) -> Result<(), DockerError> {
    let timeout = deadline.attempt_timeout(Instant::now(), config.attempt_timeout);
    let pinged = connector.ping_within(timeout).await;
    if let Err(e) = &pinged {
        info!(attempt, elapsed_ms = elapsed_ms(started), error = %e, "Docker daemon not ready yet.");
        let pause = deadline.attempt_timeout(Instant::now(), config.poll_interval);
        tokio::time::sleep(pause).await;
    }
    pinged
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "exited".into(),
    }
}

/// The command's process until the daemon is ready: killed on drop unless
/// released.
struct KillUnlessReady(Option<Child>);

impl KillUnlessReady {
    fn pid(&self) -> Option<u32> {
        self.0.as_ref().and_then(Child::id)
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self.0.as_mut() {
            Some(child) => child.wait().await,
            None => std::future::pending().await,
        }
    }

    /// The daemon is ready: whatever still runs is left running (tokio reaps
    /// it when it exits).
    fn release(&mut self) {
        if let Some(child) = self.0.take()
            && let Some(pid) = child.id()
        {
            info!(
                pid,
                "Daemon start command still running; leaving it running."
            );
        }
    }
}

impl Drop for KillUnlessReady {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut()
            && child.id().is_some()
        {
            // Fails only if it exited meanwhile.
            let _ = child.start_kill();
        }
    }
}

/// A temporary file for the command's stderr, unlinked at once so nothing is
/// left behind: (our handle, the child's handle).
fn stderr_file() -> io::Result<(File, File)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let path = std::env::temp_dir().join(format!(
        "cascade-docker-daemon-{}-{nanos}.stderr",
        std::process::id()
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    let child_end = file.try_clone()?;
    Ok((file, child_end))
}

/// The last non-empty lines of the stderr file. Reads by offset, because the
/// child shares the file position of its duplicate handle.
fn tail(file: &File) -> Vec<String> {
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return Vec::new();
    };
    let from = len.saturating_sub(STDERR_TAIL_BYTES);
    let mut bytes = vec![0; usize::try_from(len - from).unwrap_or(0)];
    if file.read_exact_at(&mut bytes, from).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let skip = lines.len().saturating_sub(STDERR_LINES);
    lines.into_iter().skip(skip).collect()
}
