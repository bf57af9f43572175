#!/usr/bin/env python3
"""cascade's foundation benchmarks; prints numbers.

1. Start to ready: time from exec of `cascade run` to GET /readyz = 200, minus
   the demo backend's own start time (exec of `cascade demo-backend` to
   GET /health = 200). Median of N runs each.
2. Idle resident memory of the cascade process (not its child), after it has
   been idle for a while.
3. Idle CPU of the cascade process over a window, as % of one core.

With --otlp-endpoint URL, cascade exports traces and metrics there
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL); --otlp-sink runs
a local OTLP/HTTP sink that accepts every export and uses it as the endpoint.
A closed port (e.g. http://127.0.0.1:9) measures a collector that is down.

Usage: benches/startup.py [--runs N] [--idle-seconds S] [--binary PATH]
                          [--otlp-endpoint URL | --otlp-sink]
                          [--otlp-protocol grpc|http/protobuf]
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_of(url):
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status
    except Exception:
        return None


def wait_200(url, start, limit=30.0):
    while time.perf_counter() - start < limit:
        if status_of(url) == 200:
            return time.perf_counter() - start
        time.sleep(0.002)
    raise SystemExit(f"{url} never answered 200")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def backend_start(binary):
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([binary, "demo-backend", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = wait_200(f"http://127.0.0.1:{port}/health", t0)
    stop(proc)
    return took


def write_config(directory, api_port, backend_port):
    path = os.path.join(directory, "cascade.toml")
    with open(path, "w") as f:
        f.write(f"""
[general]
state_dir = "{directory}/state"
[api]
listen = "127.0.0.1:{api_port}"
[router]
listen = "127.0.0.1:0"
[tiers.local]
port = {backend_port}
""")
    return path


class Sink(BaseHTTPRequestHandler):
    """Accepts every OTLP/HTTP export (an empty protobuf response is valid)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def start_sink():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


OTLP_ENV = {}


def start_cascade(binary, directory):
    api_port, backend_port = free_port(), free_port()
    config = write_config(directory, api_port, backend_port)
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTLP_ENV)
    proc = subprocess.Popen([binary, "run", "--config", config, "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    took = wait_200(f"http://127.0.0.1:{api_port}/readyz", t0)
    return proc, took


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/cascade"))
    ap.add_argument("--otlp-endpoint")
    ap.add_argument("--otlp-sink", action="store_true")
    ap.add_argument("--otlp-protocol", default="http/protobuf")
    args = ap.parse_args()
    endpoint = start_sink() if args.otlp_sink else args.otlp_endpoint
    if endpoint:
        OTLP_ENV["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        OTLP_ENV["OTEL_EXPORTER_OTLP_PROTOCOL"] = args.otlp_protocol
        print(f"OTLP export to {endpoint} ({args.otlp_protocol})")
    if not os.path.exists(args.binary):
        subprocess.run(["cargo", "build", "--release", "--bin", "cascade"], cwd=ROOT, check=True)

    backend = [backend_start(args.binary) for _ in range(args.runs)]
    ready = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            proc, took = start_cascade(args.binary, d)
            ready.append(took)
            stop(proc)
    b, r = statistics.median(backend), statistics.median(ready)
    print(f"backend start (exec → /health 200), median of {args.runs}: {b * 1000:.1f} ms")
    print(f"cascade start (exec → /readyz 200), median of {args.runs}: {r * 1000:.1f} ms")
    print(f"cascade overhead beyond the backend's own start: {(r - b) * 1000:.1f} ms (target < 300 ms)")

    with tempfile.TemporaryDirectory() as d:
        proc, _ = start_cascade(args.binary, d)
        time.sleep(5)  # let start-up work settle before measuring idle
        c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(args.idle_seconds)
        c1, t1 = cpu_seconds(proc.pid), time.perf_counter()
        rss = rss_kib(proc.pid)
        stop(proc)
    cpu = (c1 - c0) / (t1 - t0) * 100
    print(f"idle RSS of cascade: {rss / 1024:.1f} MiB (target < 20 MiB)")
    print(f"idle CPU of cascade over {args.idle_seconds:.0f} s: {cpu:.3f} % of one core (target < 0.5 %)")


if __name__ == "__main__":
    sys.exit(main())
