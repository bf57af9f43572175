//! Test support for the docker tier: the real engine, an image built here
//! (no registry), and cleanup. Shared by the driver's and autoheal's tests.
//!
//! Under `CI=true` a missing engine fails the test; elsewhere the test is
//! skipped with a message.

use std::path::{Path, PathBuf};
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
        let binary = static_demo_binary();
        let context = std::env::temp_dir().join(format!("cascade-demo-image-{}", std::process::id()));
        std::fs::create_dir_all(&context).expect("image build context");
        std::fs::copy(&binary, context.join("demo-backend")).expect("copy demo binary into context");
        std::fs::write(
            context.join("Dockerfile"),
            "FROM scratch\n\
             COPY demo-backend /demo-backend\n\
             ENV DEMO_HOST=0.0.0.0 DEMO_PORT=8080\n\
             EXPOSE 8080\n\
             HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD [\"/demo-backend\", \"--healthcheck\"]\n\
             ENTRYPOINT [\"/demo-backend\"]\n",
        )
        .expect("Dockerfile");
        let status = Command::new("docker")
            .args(["build", "-q", "-t", DEMO_IMAGE])
            .arg(&context)
            .status()
            .expect("docker build runs");
        assert!(status.success(), "docker build of {DEMO_IMAGE} failed");
        let _ = std::fs::remove_dir_all(&context);
    });
    DEMO_IMAGE
}

/// The demo backend linked statically (glibc static-pie), built into its own
/// target directory so it never contends with the test build.
fn static_demo_binary() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned();
    let target_dir = workspace.join("target/docker-image");
    let triple = "x86_64-unknown-linux-gnu";
    let binary = target_dir.join(triple).join("debug/demo-backend");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C debuginfo=0 -C strip=symbols",
        )
        .args([
            "build",
            "-q",
            "-p",
            "cascade-demo",
            "--bin",
            "demo-backend",
            "--target",
            triple,
            "--target-dir",
        ])
        .arg(&target_dir)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the static demo backend failed");
    binary
}

/// `docker` CLI, for test set-up and assertions; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
    let out = Command::new("docker")
        .args(["inspect", "-f", format, name])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
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
