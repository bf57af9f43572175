//! The `local` tier's outside world: child processes, their output, the
//! health endpoint and the host's free memory.
//!
//! Invariant: a spawned child runs in its own process group and dies with
//! cascade — by parent-death signal if cascade is killed, by its group guard
//! if its handle is dropped, by SIGTERM then SIGKILL if stopped.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::resilience::with_deadline;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    /// The tier's name, for log lines.
    pub tier: &'static str,
    /// How many stderr lines to keep for crash reports.
    pub stderr_lines: usize,
}

/// The last lines a child wrote to stderr; shared between the output reader
/// that appends and the supervisor that quotes them in crash reports.
pub type StderrTail = Arc<Mutex<VecDeque<String>>>;

/// A running child. Dropping it kills the whole process group.
pub struct Process {
    pub child: Child,
    pub pid: u32,
    guard: GroupGuard,
}

struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            // ESRCH (already gone) is the normal case here.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

/// Starts `spec` in a new process group, with its output going to the log.
pub fn spawn(spec: &ProcessSpec, tail: &StderrTail, tasks: &TaskTracker) -> io::Result<Process> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        // The service manager's channel is cascade's, not the child's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("child exited before its pid was read"))?;
    let guard = GroupGuard(i32::try_from(pid).ok().map(Pid::from_raw));
    if let Some(out) = child.stdout.take() {
        forward(out, spec.tier, "stdout", None, tasks);
    }
    if let Some(err) = child.stderr.take() {
        forward(
            err,
            spec.tier,
            "stderr",
            Some((tail.clone(), spec.stderr_lines)),
            tasks,
        );
    }
    Ok(Process { child, pid, guard })
}

/// Asks the kernel to SIGKILL the child when cascade dies, however it dies.
/// The signal follows the thread that forked the child; tokio's worker
/// threads live as long as the runtime, so that is as long as cascade.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, _exit via return).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // cascade may have died between fork and prctl.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// Logs a child's output line by line until the pipe closes. Reading goes on
/// while the child shuts down: a child whose last words hit a closed pipe
/// dies of EPIPE instead of exiting cleanly.
fn forward<R: AsyncRead + Unpin + Send + 'static>(
    stream: R,
    tier: &'static str,
    name: &'static str,
    tail: Option<(StderrTail, usize)>,
    tasks: &TaskTracker,
) {
    tasks.spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            info!(backend.tier = tier, stream = name, "{line}");
            if let Some((tail, keep)) = &tail
                && let Ok(mut tail) = tail.lock()
            {
                tail.push_back(line);
                while tail.len() > *keep {
                    tail.pop_front();
                }
            }
        }
    });
}

/// Stops a child: SIGTERM to its group, SIGKILL after `grace`, then SIGKILL
/// to whatever is left of the group.
pub async fn terminate(mut process: Process, grace: Duration) -> Option<ExitStatus> {
    let group = process.guard.0;
    let pid = process.pid;
    if let Some(group) = group
        && !grace.is_zero()
    {
        let _ = killpg(group, Signal::SIGTERM);
        if let Ok(status) =
            with_deadline(grace, "child exit after SIGTERM", process.child.wait()).await
        {
            drop(process.guard);
            return status.ok();
        }
        warn!(
            pid,
            grace_ms = grace.as_millis() as u64,
            "Child ignored SIGTERM; sending SIGKILL."
        );
    }
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let status = with_deadline(
        Duration::from_secs(5),
        "child exit after SIGKILL",
        process.child.wait(),
    )
    .await;
    drop(process.guard);
    status.ok().and_then(Result::ok)
}

/// `exit code 1`, `killed by signal 9 (SIGKILL)`.
pub fn describe_exit(status: io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(name) => format!("killed by signal {sig} ({name})"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => "exited".to_owned(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// Memory the host can give a new process without swapping.
pub fn available_memory() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.available_memory()
}
