#!/usr/bin/env bash
# Writes symbols.txt beside this script: the functions an idle
# `cascade autoheal` has run, in the order it first ran them. build.rs hands
# the file to the linker, which places those functions side by side, so the
# few megabytes of code cascade runs at start-up and at rest sit on a few
# hundred pages instead of being spread over the whole executable (each
# page fault maps 64 KiB around it, and all of it counts as resident).
#
#   src/link-order/generate.sh [BINARY...]
#
# Default: target/release/cascade (`cargo build --release --bin cascade`)
# and the autoheal image's binary, if built (examples/autoheal-image/
# build.sh). Each build names its functions differently (the hash in each
# name depends on the profile and target), so the list holds both.
#
# Needs valgrind (callgrind) and a Docker engine. Run it after changes that
# rename or add much start-up code; a stale list only places fewer functions
# together (the linker skips names it does not find), it never breaks a build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [ $# -eq 0 ]; then
    set -- "$root/target/release/cascade"
    image="$root/target/docker-image/x86_64-unknown-linux-gnu/image/cascade"
    [ -x "$image" ] && set -- "$@" "$image"
fi
work="$(mktemp -d)"
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

# Prints the functions BINARY ran until it was at rest, in first-seen order.
profile() {
    local binary="$1" run="$work/run"
    rm -rf "$run" && mkdir -p "$run"
    printf '[api]\nlisten = "127.0.0.1:0"\n' >"$run/cascade.toml"
    valgrind --tool=callgrind --demangle=no --dump-instr=no \
        --callgrind-out-file="$run/callgrind.out" \
        "$binary" autoheal --config "$run/cascade.toml" --state-dir "$run/state" --log-format json \
        >"$run/log" 2>&1 &
    pid=$!
    # At rest: following the event stream, then a few quiet seconds.
    for _ in $(seq 600); do
        grep -q "Following the Docker event stream" "$run/log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if ! grep -q "Following the Docker event stream" "$run/log"; then
        echo "$binary autoheal did not reach the event stream; its log:" >&2
        cat "$run/log" >&2
        exit 1
    fi
    sleep 5
    callgrind_control -d "$pid" >/dev/null 2>&1
    for _ in $(seq 100); do
        ls "$run"/callgrind.out.* >/dev/null 2>&1 && break
        sleep 0.1
    done
    kill "$pid" && wait "$pid" 2>/dev/null || true
    pid=
    # Kept if the executable defines them as code.
    nm --defined-only "$binary" | awk '$2 ~ /^[tTW]$/ {print $3}' | sort -u >"$run/defined"
    cat "$run"/callgrind.out.* \
        | grep -oE '^c?fn=\([0-9]+\) [^ ]+' | awk '{print $2}' | awk '!seen[$0]++' \
        | awk 'NR == FNR {defined[$0] = 1; next} defined[$0]' "$run/defined" -
}

for binary in "$@"; do
    profile "$binary"
done | awk '!seen[$0]++' >"$work/symbols.txt"
mv "$work/symbols.txt" "$here/symbols.txt"
echo "$(wc -l <"$here/symbols.txt") functions written to $here/symbols.txt"
