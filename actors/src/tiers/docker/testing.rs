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
