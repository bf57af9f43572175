#!/usr/bin/env python3
"""What a local backend's output costs cascade; prints numbers.

Each case runs `cascade run` with a local tier whose command floods its
output, then reports cascade's resident memory (VmRSS now, VmHWM peak; the
cascade process only, not its child) and the size and time of GET /status.

1. `no-newline`: 150 MB of stderr without a newline, then the process sleeps.
2. `big-lines`: 25 lines of 1 MB on stderr, then the process exits (it is
   reported as crash-looping with the tail of its stderr).
3. `progress`: 150 MB of a `\\r`-only progress bar, then it sleeps.
4. `quiet`: nothing written; the baseline.

Usage: benches/local_output.py [--binary PATH] [--cases a,b,...]
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "quiet": "exec sleep 1000",
    "no-newline": "head -c 150000000 /dev/zero | tr '\\0' x >&2; exec sleep 1000",
    "big-lines": "for i in $(seq 25); do head -c 1000000 /dev/zero | tr '\\0' x >&2; echo >&2; done; exit 3",
    "progress": "head -c 150000000 /dev/zero | tr '\\0' '\\r' >&2; exec sleep 1000",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kib(pid):
    """(VmRSS, VmHWM) of `pid` in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def get(url):
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    return body, time.perf_counter() - t0


def wait_api(state_dir, proc, limit=30.0):
    path = os.path.join(state_dir, "api")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if proc.poll() is not None:
            raise SystemExit(f"cascade exited with {proc.returncode}")
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            time.sleep(0.02)
    raise SystemExit("cascade never wrote its api file")


def run_case(binary, name, script, settle):
    with tempfile.TemporaryDirectory(prefix="cascade-bench-output-") as d:
        state = os.path.join(d, "state")
        config = os.path.join(d, "cascade.toml")
        with open(config, "w") as f:
            f.write(f"""
[general]
state_dir = {json.dumps(state)}
[api]
listen = "127.0.0.1:0"
[router]
enabled = false
[waterfall]
order = ["local"]
[tiers.local]
command = "/bin/sh"
args = ["-c", {json.dumps(script)}]
port = {free_port()}
min_free_memory = "0 B"
crash_loop_cap = 0
restart = {{ base = "10m", cap = "10m", jitter = "none" }}
crash_loop_ceiling = "10m"
""")
        proc = subprocess.Popen(
            [binary, "run", "--config", config, "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items()
                 if not k.startswith(("CASCADE_", "OTEL_", "RUST_LOG"))},
        )
        try:
            api = wait_api(state, proc)
            time.sleep(settle)
            rss, hwm = memory_kib(proc.pid)
            body, took = get(f"http://{api}/status")
            print(f"{name:11} RSS {rss / 1024:7.1f} MiB   peak {hwm / 1024:7.1f} MiB   "
                  f"/status {len(body):7d} bytes in {took * 1000:6.1f} ms")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/cascade"))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds to let the backend write before measuring")
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        raise SystemExit(f"{args.binary} not found: cargo build --release first, or --binary")
    print(f"cascade: {args.binary}; measured {args.settle:.0f} s after start")
    for name in args.cases.split(","):
        run_case(args.binary, name, CASES[name], args.settle)


if __name__ == "__main__":
    sys.exit(main())
