#!/usr/bin/env python3
"""A soak of cascade's status API while its backend keeps dying; prints numbers.

`cascade run` (open-file limit 1,024, soft and hard) supervises the built-in
demo backend as its local tier. Against its status API the soak holds 1,000
idle connections and 500 `GET /events` clients (each reconnects when it is
closed or refused, so the pressure stays), while the backend is SIGKILLed
every 2 s. Meanwhile `GET /healthz` is timed on a fresh connection every
100 ms, and cascade's memory and descriptors are sampled every second. The
clients run in a process of their own, so the timer never waits for them.

Reported: /healthz latency p50, p99 and max (and how many did not answer
200), kills and respawns (a kill counts as respawned when a new backend pid
serves before the next kill; `backend_restarts` from /status beside it),
how many event streams and idle connections were open at the end, RSS now
and at its peak (VmHWM), and open descriptors at the peak. The targets the
soak checks: /healthz under 50 ms, every kill respawned, RSS under 40 MiB.
The exit code is 1 when one is missed.

Usage: benches/soak.py [--binary PATH] [--seconds N] [--idle N] [--sse N]
                       [--nofile N] [--kill-every S]
(the binary defaults to target/release/cascade, else target/debug/cascade)
"""

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def get(addr, path, timeout=5.0):
    """(status, body) of a GET on a fresh connection."""
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{addr[0]}:{addr[1]}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Pressure:
    """Idle connections and event-stream clients, on an asyncio loop in a
    process of its own: in the timing process they would hold Python's
    interpreter lock while a /healthz request waits for it, and the soak
    would time itself rather than cascade."""

    def __init__(self, addr, idle, sse):
        self.addr = addr
        self.idle = idle
        self.sse = sse
        self.open_idle = 0
        self.open_streams = 0
        self.stream_refusals = 0
        self.stream_events = 0
        self.connect_errors = 0
        self.stopping = False
        self.process = None
        self.control = None

    def start(self):
        context = multiprocessing.get_context("fork")
        self.control, child = context.Pipe()
        self.process = context.Process(target=self._serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def counts(self):
        """The pressure's counters now: idle and stream connections open,
        stream refusals, snapshot events read, failed connects."""
        self.control.send("counts")
        return self.control.recv()

    def stop(self):
        try:
            self.control.send("stop")
        except OSError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()

    def _serve(self, control):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        # The loop holds its tasks only weakly; these references keep them.
        tasks = [loop.create_task(self._idle()) for _ in range(self.idle)]
        tasks += [loop.create_task(self._stream()) for _ in range(self.sse)]
        tasks.append(loop.create_task(self._answer(control)))
        loop.run_forever()

    async def _answer(self, control):
        """Answers the timing process's requests on `control`."""
        loop = asyncio.get_running_loop()
        while True:
            request = await loop.run_in_executor(None, control.recv)
            if request == "counts":
                control.send(
                    (
                        self.open_idle,
                        self.open_streams,
                        self.stream_refusals,
                        self.stream_events,
                        self.connect_errors,
                    )
                )
            else:
                self.stopping = True
                os._exit(0)

    async def _connect(self):
        try:
            return await asyncio.open_connection(*self.addr)
        except OSError:
            self.connect_errors += 1
            return None

    async def _idle(self):
        """Connects and sends nothing; again when cascade closes it."""
        while not self.stopping:
            pair = await self._connect()
            if pair is None:
                await asyncio.sleep(0.5)
                continue
            reader, writer = pair
            self.open_idle += 1
            try:
                await reader.read()
            except OSError:
                pass
            finally:
                self.open_idle -= 1
                writer.close()
            await asyncio.sleep(0.5)

    async def _stream(self):
        """Reads `GET /events` for as long as cascade serves it."""
        host = f"{self.addr[0]}:{self.addr[1]}"
        while not self.stopping:
            pair = await self._connect()
            if pair is None:
                await asyncio.sleep(1)
                continue
            reader, writer = pair
            try:
                writer.write(f"GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await writer.drain()
                head = await reader.readline()
                if b" 200 " not in head:
                    self.stream_refusals += 1
                else:
                    self.open_streams += 1
                    try:
                        while True:
                            chunk = await reader.read(65536)
                            if not chunk:
                                break
                            self.stream_events += chunk.count(b"event: snapshot")
                    finally:
                        self.open_streams -= 1
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(1)


def local_tier(addr):
    status, body = get(addr, "/status")
    if status != 200:
        return None
    for tier in json.loads(body)["tiers"]:
        if tier["tier"] == "local":
            return tier
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--sse", type=int, default=500)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--kill-every", type=float, default=2.0)
    args = parser.parse_args()

    binary = args.binary
    if binary is None:
        for profile in ("release", "debug"):
            candidate = os.path.join(ROOT, "target", profile, "cascade")
            if os.path.exists(candidate):
                binary = candidate
                break
    if binary is None:
        sys.exit("no cascade binary: build one or pass --binary")

    # The soak's own sockets must not be limited by the limit it sets for cascade.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.idle + args.sse + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            sys.exit(f"the soak needs {wanted} descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    work = tempfile.mkdtemp(prefix="cascade-soak-")
    state_dir = os.path.join(work, "state")
    port = free_port()
    config = os.path.join(work, "cascade.toml")
    with open(config, "w") as f:
        f.write(
            f"""[general]
state_dir = {json.dumps(state_dir)}

[api]
listen = "127.0.0.1:0"

[waterfall]
order = ["local"]

[tiers.local]
command = "{{cascade}}"
args = ["demo-backend", "--port", "{{port}}"]
port = {port}
stop_grace = "500ms"
start_timeout = "10s"
probe = {{ interval = "200ms", timeout = "500ms" }}
"""
        )
    log_path = os.path.join(work, "cascade.log")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CASCADE_", "OTEL_", "DEMO_")) and k != "RUST_LOG"
    }
    env["CASCADE_LOG"] = "info"
    env["CASCADE_ROUTER__LISTEN"] = "127.0.0.1:0"

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))

    with open(log_path, "wb") as log:
        cascade = subprocess.Popen(
            [binary, "run", "--config", config, "--log-format", "json"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=limit,
        )
    try:
        deadline = time.monotonic() + 30
        api_file = os.path.join(state_dir, "api")
        while True:
            if cascade.poll() is not None:
                sys.exit(f"cascade exited ({cascade.returncode}); see {log_path}")
            try:
                host, _, api_port = open(api_file).read().strip().rpartition(":")
                addr = (host, int(api_port))
                if get(addr, "/readyz")[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                sys.exit(f"cascade did not get ready; see {log_path}")
            time.sleep(0.1)

        pressure = Pressure(addr, args.idle, args.sse)
        pressure.start()

        latencies = []
        failures = []
        rss_peak = 0
        fds_peak = 0
        kills = 0
        respawned = 0
        last_killed = None
        waiting_respawn = False
        next_kill = time.monotonic() + args.kill_every
        next_sample = time.monotonic()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                rss, _ = memory_kib(cascade.pid)
                rss_peak = max(rss_peak, rss)
                fds_peak = max(fds_peak, open_fds(cascade.pid))
                next_sample = now + 1
            if now >= next_kill or waiting_respawn:
                try:
                    tier = local_tier(addr)
                except (OSError, http.client.HTTPException, ValueError):
                    tier = None
                pid = tier and tier.get("details", {}).get("pid")
                serving = tier and tier["state"] == "healthy" and pid
                if serving and waiting_respawn and pid != last_killed:
                    respawned += 1
                    waiting_respawn = False
                if now >= next_kill:
                    if serving and not waiting_respawn:
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                            kills += 1
                            last_killed = pid
                            waiting_respawn = True
                        except ProcessLookupError:
                            pass
                    next_kill = now + args.kill_every
            started = time.perf_counter()
            try:
                status, _ = get(addr, "/healthz")
            except (OSError, http.client.HTTPException) as e:
                status = f"{type(e).__name__}: {e}"
            took = time.perf_counter() - started
            latencies.append(took)
            if status != 200:
                failures.append(status)
            time.sleep(max(0.0, 0.1 - took))

        # A kill in the last interval gets time to be answered.
        settle = time.monotonic() + 10
        while waiting_respawn and time.monotonic() < settle:
            tier = local_tier(addr)
            pid = tier and tier.get("details", {}).get("pid")
            if tier and tier["state"] == "healthy" and pid and pid != last_killed:
                respawned += 1
                waiting_respawn = False
            time.sleep(0.1)

        tier = local_tier(addr) or {}
        restarts = tier.get("backend_restarts")
        open_idle, open_streams, refusals, events, errors = pressure.counts()
        rss, hwm = memory_kib(cascade.pid)
        pressure.stop()
    finally:
        cascade.send_signal(signal.SIGTERM)
        try:
            cascade.wait(timeout=15)
        except subprocess.TimeoutExpired:
            cascade.kill()

    ms = sorted(x * 1000 for x in latencies)
    rss_mib, hwm_mib, peak_mib = rss / 1024, hwm / 1024, rss_peak / 1024
    print(f"binary: {binary}")
    print(
        f"load: {args.idle} idle connections, {args.sse} event-stream clients, "
        f"open-file limit {args.nofile}, backend killed every {args.kill_every:g} s, "
        f"{args.seconds:g} s"
    )
    print(
        f"/healthz: {len(ms)} requests, p50 {percentile(ms, 50):.2f} ms, "
        f"p99 {percentile(ms, 99):.2f} ms, max {ms[-1]:.2f} ms, not 200: {len(failures)}"
        + (f" (first: {failures[0]})" if failures else "")
    )
    print(f"kills: {kills}, respawned: {respawned}, backend_restarts: {restarts}")
    print(
        f"at the end: {open_idle} idle connections and {open_streams} event streams open; "
        f"{refusals} event-stream refusals, {events} snapshot events, "
        f"{errors} failed connects"
    )
    print(
        f"cascade RSS: {rss_mib:.1f} MiB now, {peak_mib:.1f} MiB peak sampled, "
        f"{hwm_mib:.1f} MiB VmHWM; descriptors at most {fds_peak}"
    )
    print(f"log: {log_path}")
    missed = []
    if ms and percentile(ms, 99) >= 50:
        missed.append("/healthz p99 under 50 ms")
    if failures:
        missed.append("every /healthz answered 200")
    if respawned != kills or kills == 0:
        missed.append("every kill respawned")
    if hwm_mib >= 40:
        missed.append("RSS under 40 MiB")
    if missed:
        print("missed: " + "; ".join(missed))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Cancelled client tasks would be reported one by one at interpreter exit.
    os._exit(code)
