//! The `local` tier's outside world: child processes (spawning, stopping,
//! what `/proc` says of them), their output, the process-group record in the
//! state directory, and the host's free memory.
//!
//! Invariants: a spawned child runs in its own process group and dies with
//! cascade — by parent-death signal if cascade is killed, by its group guard
//! if its handle is dropped, by SIGTERM then SIGKILL if stopped (SIGKILL at
//! once if it is stopped by a signal and could not answer SIGTERM). Child
//! output costs bounded memory whatever the child writes: lines end at `\n`
//! or `\r`, are cut at [`LINE_MAX`] bytes, and are logged at most
//! [`LINES_PER_SECOND`] a second per stream.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::resilience::{poll_until, with_deadline};
use crate::tiers::ports;

/// Bytes of one output line kept; the rest of the line is dropped.
pub const LINE_MAX: usize = 4096;
/// Characters of one line kept in the stderr tail that crash reports quote.
pub const TAIL_LINE_MAX: usize = 300;
/// Output lines logged per second and stream; beyond, they are counted and
/// the count logged once the second is over.
pub const LINES_PER_SECOND: u32 = 200;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    /// The tier's name, for log lines.
    pub tier: &'static str,
}

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

/// Starts `spec` in a new process group, with its output going to the log
/// and its stderr's last lines to `tail`.
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
        forward(err, spec.tier, "stderr", Some(tail.clone()), tasks);
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

/// Stops a child: SIGTERM to its group, SIGKILL after `grace`, then SIGKILL
/// to whatever is left of the group. A child stopped by a signal (state
/// `T`) cannot act on SIGTERM, so it gets SIGKILL at once.
pub async fn terminate(mut process: Process, grace: Duration) -> Option<ExitStatus> {
    let group = process.guard.0;
    let pid = process.pid;
    let frozen = is_stopped(pid).await;
    if let Some(group) = group
        && !grace.is_zero()
        && !frozen
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
            grace = %crate::text::duration(grace),
            "Child ignored SIGTERM; sending SIGKILL."
        );
    }
    if frozen {
        info!(pid, "Child is stopped by a signal; sending SIGKILL.");
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

/// Whether `pid` is stopped by a signal (SIGSTOP, SIGTSTP: `/proc` state
/// `T`). Always false where there is no `/proc`.
pub async fn is_stopped(pid: u32) -> bool {
    let lookup = tokio::task::spawn_blocking(move || ports::stat(pid));
    matches!(
        with_deadline(Duration::from_secs(1), "process state", lookup).await,
        Ok(Ok(Some(stat))) if stat.state == 'T'
    )
}

/// Whether process group `pgid` still has a process that is not a zombie
/// (a zombie only waits to be reaped: by init, for an orphan). Reads
/// `/proc`: call it off the runtime.
pub(super) fn group_alive(pgid: u32) -> bool {
    let Ok(raw) = i32::try_from(pgid) else {
        return false;
    };
    if killpg(Pid::from_raw(raw), None).is_err() {
        return false;
    }
    !Path::new("/proc/self").exists() || !ports::group_members(pgid).is_empty()
}

/// Waits up to `within` for group `pgid` to be gone; whether it is.
pub async fn wait_group_gone(pgid: u32, within: Duration) -> bool {
    let gone = poll_until(
        within,
        Duration::from_millis(50),
        "process group exit",
        || async move {
            let alive = tokio::task::spawn_blocking(move || group_alive(pgid)).await;
            (!alive.unwrap_or(true)).then_some(())
        },
    );
    gone.await.is_ok()
}

/// Memory the host can give a new process without swapping.
pub fn available_memory() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.available_memory()
}

// === output ===

/// The last lines a child wrote to stderr, each cut to [`TAIL_LINE_MAX`]
/// characters; shared between the output reader that appends and the
/// supervision loop that quotes them in crash reports.
#[derive(Clone)]
pub struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    keep: usize,
}

impl StderrTail {
    pub fn new(keep: usize) -> Self {
        StderrTail {
            lines: Arc::new(Mutex::new(VecDeque::new())),
            keep,
        }
    }

    fn push(&self, line: &str) {
        if self.keep == 0 {
            return;
        }
        let Ok(mut lines) = self.lines.lock() else {
            return;
        };
        lines.push_back(cut(line, TAIL_LINE_MAX));
        while lines.len() > self.keep {
            lines.pop_front();
        }
    }

    /// Oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// `text` cut to at most `max` characters, with `…` when cut.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Logs a child's output line by line until the pipe closes. Reading goes on
/// while the child shuts down: a child whose last words hit a closed pipe
/// dies of EPIPE instead of exiting cleanly.
fn forward<R: AsyncRead + Unpin + Send + 'static>(
    mut stream: R,
    tier: &'static str,
    name: &'static str,
    tail: Option<StderrTail>,
    tasks: &TaskTracker,
) {
    tasks.spawn(async move {
        let mut splitter = Lines::default();
        let mut budget = LogBudget::new(LINES_PER_SECOND);
        let mut buf = vec![0u8; 16 * 1024];
        let emit = |line: Line, budget: &mut LogBudget| {
            let text = String::from_utf8_lossy(&line.bytes);
            let text = if line.cut {
                format!("{text}… (line cut at {LINE_MAX} bytes)")
            } else {
                text.into_owned()
            };
            if let Some(dropped) = budget.take_dropped(Instant::now()) {
                warn!(
                    backend.tier = tier,
                    stream = name,
                    dropped,
                    "Output lines not logged: more than {LINES_PER_SECOND} a second."
                );
            }
            if budget.admit(Instant::now()) {
                info!(backend.tier = tier, stream = name, "{text}");
            }
            if let Some(tail) = &tail {
                tail.push(&text);
            }
        };
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for line in splitter.push(&buf[..n]) {
                emit(line, &mut budget);
            }
        }
        if let Some(line) = splitter.finish() {
            emit(line, &mut budget);
        }
        if let Some(dropped) = budget.take_dropped_now() {
            warn!(
                backend.tier = tier,
                stream = name,
                dropped,
                "Output lines not logged: more than {LINES_PER_SECOND} a second."
            );
        }
    });
}

/// One line of output, without its terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub bytes: Vec<u8>,
    /// The line was longer than [`LINE_MAX`] and the rest was dropped.
    pub cut: bool,
}

/// Splits a byte stream into lines ending at `\n` or `\r` (a progress bar
/// redraws its line with `\r`), keeping at most [`LINE_MAX`] bytes of each.
/// Empty lines (as between `\r` and `\n`) are skipped.
#[derive(Debug, Default)]
pub struct Lines {
    current: Vec<u8>,
    cut: bool,
}

impl Lines {
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n' || b == b'\r');
            let (part, rest) = match end {
                Some(at) => (&bytes[..at], Some(&bytes[at + 1..])),
                None => (bytes, None),
            };
            let room = LINE_MAX - self.current.len();
            if part.len() > room {
                self.current.extend_from_slice(&part[..room]);
                self.cut = true;
            } else {
                self.current.extend_from_slice(part);
            }
            match rest {
                Some(rest) => {
                    out.extend(self.take());
                    bytes = rest;
                }
                None => break,
            }
        }
        out
    }

    /// The last line, if the stream ended without a terminator.
    pub fn finish(&mut self) -> Option<Line> {
        self.take()
    }

    fn take(&mut self) -> Option<Line> {
        let cut = std::mem::take(&mut self.cut);
        if self.current.is_empty() {
            return None;
        }
        Some(Line {
            bytes: std::mem::take(&mut self.current),
            cut,
        })
    }
}

/// At most `per_second` admissions in each one-second window; counts the rest.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    window: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl LogBudget {
    pub fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            window: None,
            used: 0,
            dropped: 0,
        }
    }

    pub fn admit(&mut self, now: Instant) -> bool {
        let fresh = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if fresh {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// The count of lines dropped in a window that is over.
    pub fn take_dropped(&mut self, now: Instant) -> Option<u64> {
        let over = self
            .window
            .is_some_and(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if over { self.take_dropped_now() } else { None }
    }

    pub fn take_dropped_now(&mut self) -> Option<u64> {
        (self.dropped > 0).then(|| std::mem::take(&mut self.dropped))
    }
}

// === the process-group record ===

/// Which process group the tier's child leads, kept in the state directory
/// so a later cascade (after this one was SIGKILLed) can end what a child
/// that forked left behind. `starttime` and `boot_id` make sure the group
/// is that child's and not a stranger's that reuses the number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub pgid: u32,
    /// The leader's start, in clock ticks after boot (`/proc/PID/stat`).
    pub starttime: u64,
    pub boot_id: String,
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Records that `pid` leads the tier's process group. Atomic (a temporary
/// file renamed over the old one). Nothing is recorded where `/proc` is
/// missing: there, nothing could be checked later.
pub async fn write_record(path: PathBuf, pid: u32) -> Result<(), String> {
    let work = move || -> Result<(), String> {
        let (Some(boot_id), Some(stat)) = (boot_id(), ports::stat(pid)) else {
            return Ok(());
        };
        let record = GroupRecord {
            pgid: pid,
            starttime: stat.starttime,
            boot_id,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let text = serde_json::to_string(&record).map_err(|e| e.to_string())?;
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, text)
            .and_then(|()| std::fs::rename(&temp, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    blocking(work).await
}

/// Removes the record if it still names `pgid` (a successor may have
/// written its own meanwhile).
pub async fn remove_record(path: PathBuf, pgid: u32) {
    let work = move || -> Result<(), String> {
        if read_record(&path).is_some_and(|r| r.pgid == pgid) {
            std::fs::remove_file(&path).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    if let Err(error) = blocking(work).await {
        warn!(backend.tier = "local", %error, "Process group record not removed.");
    }
}

fn read_record(path: &Path) -> Option<GroupRecord> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The recorded group, if it still has processes and is the one recorded
/// (same boot; its leader, if it still runs, started when recorded).
fn live_recorded_group(path: &Path) -> Option<GroupRecord> {
    let record = read_record(path)?;
    if boot_id().as_deref() != Some(record.boot_id.as_str()) || !group_alive(record.pgid) {
        return None;
    }
    match ports::stat(record.pgid) {
        // A pid is not reused while a group of that number exists, so a
        // leader with another start time means the recorded group is gone
        // and this is someone else's.
        Some(leader) if leader.pgrp == record.pgid && leader.starttime != record.starttime => None,
        _ => Some(record),
    }
}

/// Ends what is left of the recorded process group, if anything: a child's
/// children outliving a cascade that was SIGKILLed, or a predecessor's
/// process still stopping. SIGTERM, up to `grace`, then SIGKILL. Returns
/// what was ended, for the log.
pub async fn end_recorded_group(path: PathBuf, grace: Duration) -> Option<String> {
    let record = blocking(move || Ok::<_, String>(live_recorded_group(&path)))
        .await
        .ok()
        .flatten()?;
    let pgid = record.pgid;
    let members = blocking(move || Ok::<_, String>(ports::group_members(pgid)))
        .await
        .unwrap_or_default()
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let group = Pid::from_raw(i32::try_from(pgid).ok()?);
    warn!(
        backend.tier = "local",
        pgid,
        %members,
        "A process group from an earlier run is still alive; ending it."
    );
    let _ = killpg(group, Signal::SIGTERM);
    if !wait_group_gone(pgid, grace).await {
        let _ = killpg(group, Signal::SIGKILL);
        if !wait_group_gone(pgid, Duration::from_secs(2)).await {
            warn!(
                backend.tier = "local",
                pgid, "A process group from an earlier run survived SIGKILL."
            );
        }
    }
    Some(format!("process group {pgid} from an earlier run"))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let task = tokio::task::spawn_blocking(work);
    match with_deadline(Duration::from_secs(5), "state directory", task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(join.to_string()),
        Err(e) => Err(e.to_string()),
    }
}
