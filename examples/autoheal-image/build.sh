#!/usr/bin/env bash
# Builds the autoheal image (FROM scratch with a static cascade) without a
# registry: the binary is built here, the image from a context holding only
# it and the Dockerfile.
#
#   examples/autoheal-image/build.sh [TAG]      (default cascade-autoheal:latest)
#
# The default profile is `image` (Cargo.toml: release, optimised for size,
# since the image heals containers and routes nothing); CASCADE_IMAGE_PROFILE
# =release builds for speed, =dev unoptimised (quicker to build, larger).
# The build reuses target/docker-image, the directory CI's static demo
# backend is built in.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tag="${1:-cascade-autoheal:latest}"
profile="${CASCADE_IMAGE_PROFILE:-image}"
target_dir="${CASCADE_IMAGE_TARGET_DIR:-$root/target/docker-image}"
triple=x86_64-unknown-linux-gnu

case "$profile" in
    image) out=image ;;
    release) out=release ;;
    dev) out=debug ;;
    *) echo "CASCADE_IMAGE_PROFILE must be image, release or dev, not '$profile'" >&2; exit 2 ;;
esac

# Static glibc, not position-independent: runs on scratch, talks to the
# Docker socket, needs no libc, and has no relocations to apply (and so
# touch) at start. Built with its symbols, which src/link-order/generate.sh
# reads; the image gets a stripped copy.
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static -C debuginfo=0" \
    cargo build --locked -q --manifest-path "$root/Cargo.toml" \
    -p cascade --bin cascade --profile "$profile" \
    --target "$triple" --target-dir "$target_dir"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$target_dir/$triple/$out/cascade" "$context/cascade"
# The symbol table is never loaded, so this only makes the image smaller.
if command -v strip >/dev/null; then
    strip "$context/cascade"
fi
cp "$here/Dockerfile" "$context/Dockerfile"
docker build -q -t "$tag" "$context" >/dev/null
echo "$tag"
