#!/usr/bin/env bash
# User-space instructions cascade runs per proxied `GET /health`, counted by
# valgrind's callgrind: unlike seconds, the count does not change with what
# else the machine is doing, so two builds compare on a shared machine.
#
# cascade runs under callgrind with its instrumentation off; it is switched
# on for 10 s with no requests (what cascade does idle, printed apart) and
# then for 10 s of wrk (1 thread, 4 connections) through the router, after
# a 3 s warm-up that opens the upstream connections. The demo backend is
# cascade's child and runs natively. cascade logs at its default level.
#
# Usage: benches/instructions.sh [path/to/cascade]   (default: a release
# build, made first). Needs valgrind, wrk and curl (Debian's packages).
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:-}
if [ -z "$binary" ]; then
    cargo build --release --locked -q --bin cascade
    binary=target/release/cascade
fi
for tool in valgrind callgrind_control callgrind_annotate wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "instructions: $tool is not installed" >&2; exit 1; }
done

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
router=$(free_port)
backend=$(free_port)
dir=$(mktemp -d)
cat >"$dir/cascade.toml" <<EOF
[general]
state_dir = "$dir/state"
[api]
listen = "127.0.0.1:0"
[router]
listen = "127.0.0.1:$router"
[tiers.local]
port = $backend
EOF

CASCADE_LOG=info valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$dir/callgrind.out" \
    "$binary" run --config "$dir/cascade.toml" --log-format json \
    2>"$dir/cascade.log" >/dev/null &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT

for _ in $(seq 300); do
    curl -sf --max-time 5 "http://127.0.0.1:$router/health" >/dev/null && break
    sleep 0.5
done
curl -sf --max-time 5 "http://127.0.0.1:$router/health" >/dev/null || {
    echo "instructions: cascade did not answer through its router; its log:" >&2
    cat "$dir/cascade.log" >&2
    exit 1
}
wrk -t1 -c4 -d3s "http://127.0.0.1:$router/health" >/dev/null

control() { callgrind_control "$@" "$pid" >/dev/null 2>&1; }
control -i on
sleep 10
control -i off
control -d
control -z
control -i on
out=$(wrk -t1 -c4 -d10s "http://127.0.0.1:$router/health")
control -i off
control -d
# Every dump is written once cascade has ended.
kill "$pid"
wait "$pid" 2>/dev/null || true

total() {
    callgrind_annotate "$1" 2>/dev/null |
        awk '/PROGRAM TOTALS/ && !seen { gsub(",", "", $1); print $1; seen = 1 }'
}
idle=$(total "$dir/callgrind.out.1")
busy=$(total "$dir/callgrind.out.2")
requests=$(echo "$out" | awk '/ requests in / { print $1 }')
if [ -z "$requests" ] || [ "$requests" -eq 0 ] || [ -z "$idle" ] || [ -z "$busy" ]; then
    echo "instructions: no count (requests: '${requests}', idle: '${idle}', load: '${busy}'); wrk said:" >&2
    echo "$out" >&2
    exit 1
fi
echo "# cascade: user-space instructions per proxied GET /health (callgrind)"
echo "binary:                 $binary"
echo "requests:               $requests (wrk -t1 -c4 -d10s)"
echo "instructions idle 10 s: $idle"
echo "instructions, load:     $busy"
echo "per request:            $(((busy - idle) / requests)) (idle subtracted)"
