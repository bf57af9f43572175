#!/usr/bin/env bash
# Builds the autoheal image (FROM scratch with a static cascade) without a
# registry: the binary is built here, the image from a context holding only
# it and the Dockerfile.
#
#   examples/autoheal-image/build.sh [TAG]      (default cascade-autoheal:latest)
#
# CASCADE_IMAGE_PROFILE=dev builds an unoptimised binary (quicker to build,
# larger); the default is release. The build reuses target/docker-image,
# the directory CI's static demo backend is built in.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tag="${1:-cascade-autoheal:latest}"
profile="${CASCADE_IMAGE_PROFILE:-release}"
target_dir="${CASCADE_IMAGE_TARGET_DIR:-$root/target/docker-image}"
triple=x86_64-unknown-linux-gnu

case "$profile" in
    release) out=release ;;
    dev) out=debug ;;
    *) echo "CASCADE_IMAGE_PROFILE must be release or dev, not '$profile'" >&2; exit 2 ;;
esac

# static-pie glibc: runs on scratch, talks to the Docker socket, no libc needed.
RUSTFLAGS="-C target-feature=+crt-static -C debuginfo=0 -C strip=symbols" \
    cargo build --locked -q --manifest-path "$root/Cargo.toml" \
    -p cascade --bin cascade --profile "$profile" \
    --target "$triple" --target-dir "$target_dir"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$target_dir/$triple/$out/cascade" "$context/cascade"
cp "$here/Dockerfile" "$context/Dockerfile"
docker build -q -t "$tag" "$context" >/dev/null
echo "$tag"
