//! The demo backend as a Docker image, for tests and benchmarks of the
//! docker tier on machines without a registry: the binary linked statically
//! (glibc, not position-independent) in a `FROM scratch` image with a
//! HEALTHCHECK.
//!
//! Built with the `cargo` and `docker` command-line tools; meant for test
//! and benchmark code, not for the service.

use std::path::{Path, PathBuf};
use std::process::Command;

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

const DOCKERFILE: &str = "FROM scratch\n\
COPY demo-backend /demo-backend\n\
ENV DEMO_HOST=0.0.0.0 DEMO_PORT=8080\n\
EXPOSE 8080\n\
HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD [\"/demo-backend\", \"--healthcheck\"]\n\
ENTRYPOINT [\"/demo-backend\"]\n";

/// Builds the image as `tag`; the container listens on 0.0.0.0:8080 and
/// takes the `DEMO_*` knobs as environment variables.
pub fn build(tag: &str) -> Result<(), String> {
    let binary = static_binary()?;
    let context = std::env::temp_dir().join(format!(
        "cascade-demo-image-{}-{}",
        std::process::id(),
        tag.replace([':', '/'], "_")
    ));
    std::fs::create_dir_all(&context)
        .map_err(|e| format!("cannot create {}: {e}", context.display()))?;
    let result = (|| {
        std::fs::copy(&binary, context.join("demo-backend"))
            .map_err(|e| format!("cannot copy {}: {e}", binary.display()))?;
        std::fs::write(context.join("Dockerfile"), DOCKERFILE)
            .map_err(|e| format!("cannot write the Dockerfile: {e}"))?;
        let out = Command::new("docker")
            .args(["build", "-q", "-t", tag])
            .arg(&context)
            .output()
            .map_err(|e| format!("cannot run docker: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "docker build of {tag} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&context);
    result
}

/// Builds the static binary into its own target directory (so it never
/// contends with the caller's build) and returns its path. The flags are
/// the ones `.ci/run` and `examples/autoheal-image/build.sh` use in the same
/// directory: with other flags, each build would rebuild the other's crates.
fn static_binary() -> Result<PathBuf, String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target_dir = workspace.join("target/docker-image");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static -C debuginfo=0",
        )
        .args([
            "build",
            "-q",
            "-p",
            "cascade-demo",
            "--bin",
            "demo-backend",
            "--target",
            TRIPLE,
            "--target-dir",
        ])
        .arg(&target_dir)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building the static demo backend failed".into());
    }
    Ok(target_dir.join(TRIPLE).join("debug/demo-backend"))
}

/// Runs the `docker` CLI and returns its trimmed stdout, or its stderr as
/// the error: for test and benchmark set-up and assertions.
pub fn docker_cli(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
