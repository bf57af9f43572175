//! Test support for the docker tier: the real engine, an image built here
//! (no registry), and cleanup. Shared by the driver's and autoheal's tests.
//!
//! Under `CI=true` a missing engine fails the test; elsewhere the test is
//! skipped with a message.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The demo backend in a `FROM scratch` image with a HEALTHCHECK; listens on
/// 0.0.0.0:8080 inside the container.
pub const DEMO_IMAGE: &str = "cascade-demo:test";

/// Labels every container a test creates, so cleanup finds them all.
pub const TEST_LABEL: &str = "cascade.test";

/// Whether the engine answers. Panics under `CI=true` when it does not.
pub fn docker_available() -> bool {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the Docker engine is required under CI=true, and `docker version` cannot reach it");
    }
    if !ok {
        eprintln!("skipped: no Docker engine here (set CI=true to make this a failure)");
    }
    ok
}

/// Builds [`DEMO_IMAGE`] once per test process.
pub fn demo_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if let Err(e) = cascade_demo::image::build(DEMO_IMAGE) {
            panic!("{e}");
        }
    });
    DEMO_IMAGE
}

/// `docker` CLI, for test set-up and assertions; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    cascade_demo::image::docker_cli(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`docker`], but failures are fine (cleanup).
pub fn docker_quiet(args: &[&str]) {
    let _ = Command::new("docker").args(args).output();
}

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Removes the named containers when dropped, even if the test panicked.
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            docker_quiet(&["rm", "-f", name]);
        }
    }
}

/// Polls `check` until it is true or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `docker inspect -f FORMAT NAME`, or None if the container does not exist.
pub fn inspect(name: &str, format: &str) -> Option<String> {
    cascade_demo::image::docker_cli(&["inspect", "-f", format, name]).ok()
}

/// A unix socket in front of the engine's that holds every chunk of every
/// response for a settable delay: a daemon busy with a build or a prune.
pub struct SlowDaemon {
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowDaemon {
    /// Listens on a fresh socket; responses pass at once until `set_delay`.
    pub fn start() -> SlowDaemon {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let upstream =
            match super::connect::DockerHost::resolve(None, &super::connect::DockerEnv::from_env())
            {
                super::connect::DockerHost::Unix(path) => path,
                tcp => panic!("the slow daemon proxies a unix socket, not {tcp}"),
            };
        let dir = std::env::temp_dir().join(unique("cascade-t-slow"));
        std::fs::create_dir_all(&dir).expect("dir");
        let socket = dir.join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind socket");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(daemon) = tokio::net::UnixStream::connect(&upstream).await else {
                    continue;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_daemon, mut to_daemon) = daemon.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_daemon).await;
                    let _ = to_daemon.shutdown().await;
                });
                let delay = delay.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = from_daemon.read(&mut buf).await {
                        let ms = delay.load(Ordering::SeqCst);
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SlowDaemon {
            dir,
            socket,
            delay_ms,
            task,
        }
    }

    /// `unix://` and the socket's path.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SlowDaemon {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A unix socket that accepts connections and never answers: a wedged daemon.
pub struct WedgedDaemon {
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl WedgedDaemon {
    pub fn start() -> WedgedDaemon {
        let dir = std::env::temp_dir().join(unique("cascade-t-mute"));
        std::fs::create_dir_all(&dir).expect("dir");
        let socket = dir.join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind socket");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        WedgedDaemon { dir, socket, task }
    }

    /// `unix://` and the socket's path.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for WedgedDaemon {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_image_builds_and_becomes_healthy() {
        if !docker_available() {
            return;
        }
        let image = demo_image();
        let name = unique("cascade-img");
        let _cleanup = Cleanup(vec![name.clone()]);
        docker(&["run", "-d", "--name", &name, "--label", TEST_LABEL, image]);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let health = inspect(&name, "{{.State.Health.Status}}").unwrap_or_default();
            if health == "healthy" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "container never became healthy (last: {health})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
