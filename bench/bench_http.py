"""Benchmark: N HTTP checks against a local target, measured from outside the daemon.

Runs a real ``healthd run`` process with N ``http`` components against a local nginx (or, if
nginx is not installed, a small asyncio HTTP server in its own process), waits for READY, then
measures over a fixed window:

- CPU microseconds per probe for the whole daemon process (utime + stime from /proc);
- probes per second (from ``healthd_checks_total``);
- scheduler start lateness p50 and p99 (from ``healthd_scheduler_lateness_seconds``);
- peak RSS (VmHWM);
- the cost of one ``/metrics`` scrape and one status-file write, in-process, for N components.

Usage: ``.venv/bin/python bench/bench_http.py [--checks 1000] [--interval 1] [--seconds 30]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

_TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _target(workdir: Path) -> Iterator[tuple[str, str]]:
    """A fast local HTTP server: nginx when installed, else an asyncio server process."""
    port = _free_port()
    # Debian installs nginx into /usr/sbin, which is not on every user's PATH.
    nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if nginx:
        prefix = workdir / "nginx"
        (prefix / "logs").mkdir(parents=True)
        (prefix / "nginx.conf").write_text(
            textwrap.dedent(f"""
            daemon off;
            worker_processes 1;
            pid {prefix}/nginx.pid;
            error_log {prefix}/logs/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                keepalive_requests 1000000;
                keepalive_timeout 75s;
                client_body_temp_path {prefix}/body;
                proxy_temp_path {prefix}/proxy;
                fastcgi_temp_path {prefix}/fastcgi;
                uwsgi_temp_path {prefix}/uwsgi;
                scgi_temp_path {prefix}/scgi;
                server {{
                    listen 127.0.0.1:{port};
                    location / {{ return 200 'ok'; }}
                }}
            }}
            """)
        )
        command = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        label = "nginx"
    else:
        server = workdir / "server.py"
        server.write_text(
            textwrap.dedent(f"""
            import asyncio
            async def serve(reader, writer):
                try:
                    while await reader.readuntil(b"\\r\\n\\r\\n"):
                        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
                except Exception:
                    writer.close()
            async def main():
                server = await asyncio.start_server(serve, "127.0.0.1", {port}, backlog=4096)
                await server.serve_forever()
            asyncio.run(main())
            """)
        )
        command = [sys.executable, str(server)]
        label = "asyncio server"
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", label
    finally:
        process.terminate()
        process.wait(10)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _peak_rss_mib(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def _scrape(url: str) -> str:
    return httpx.get(url, timeout=30).text


def _probes(text: str) -> float:
    return sum(float(v) for v in re.findall(r"^healthd_checks_total\{[^}]*\} (\S+)$", text, re.M))


def _lateness(text: str) -> dict[float, float]:
    buckets = {}
    for le, value in re.findall(
        r'^healthd_scheduler_lateness_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
    ):
        buckets[float(le)] = float(value)
    return buckets


def _quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(
                count - lower_count, 1e-12
            )
        lower_bound, lower_count = bound, count
    return bounds[-2]


def _in_process_costs(checks: int) -> tuple[float, float]:
    """Median milliseconds for one uncached /metrics render and one status-file write."""
    from healthd.exporters import status_file
    from healthd.exporters.metrics import MetricsServer
    from healthd.model import ComponentState, Histogram, Status
    from healthd.state import StateStore

    store = StateStore()
    now = time.time()
    for i in range(checks):
        store.record(
            ComponentState(
                name=f"c{i:05d}", kind="http", critical=False, status=Status.HEALTHY,
                reason_code="ok", reason="GET / returned 200", latency_seconds=0.001,
                checked_at=now, since=now, last_success_at=now, consecutive_failures=0,
                consecutive_successes=1, details={"http_status": 200, "body_bytes": 2},
                checks_total={"success": 10}, durations=Histogram.empty((0.01, 0.1)).observe(0.001),
            ),
            stale_after_seconds=3600,
        )  # fmt: skip
    server = MetricsServer("127.0.0.1", 0, store.snapshot, "bench")
    scrape_ms, write_ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "status.json"
        for _ in range(5):
            store.notify_dropped()  # a new snapshot version, so no render is reused whole
            started = time.perf_counter()
            server.exposition()
            scrape_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            document = status_file.document(store.snapshot())
            status_file.write_atomic(path, status_file.render(document))
            write_ms.append((time.perf_counter() - started) * 1000)
    server.stop()
    return statistics.median(scrape_ms), statistics.median(write_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after READY")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="healthd-bench-") as tmp,
        _target(Path(tmp)) as (
            base,
            label,
        ),
    ):
        work = Path(tmp)
        metrics_port = _free_port()
        lines = [
            "[daemon]",
            f'metrics_address = "127.0.0.1:{metrics_port}"',
            f'status_file = "{work / "status.json"}"',
            f"interval = {args.interval}",
            f"timeout = {min(args.interval, 5.0)}",
            f"startup_spread = {args.interval}",
        ]
        for i in range(args.checks):
            lines += [f"[components.c{i:05d}]", 'kind = "http"', f'url = "{base}/c{i}"']
        config = work / "healthd.toml"
        config.write_text("\n".join(lines) + "\n")
        notify_path = str(work / "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(120)
        command = [sys.executable, "-m", "healthd", "--config", str(config)]
        daemon = subprocess.Popen(
            [*command, "--log-level", "warning", "run"],
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            time.sleep(args.warmup)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            before = _scrape(url)
            cpu0, t0 = _cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, t1 = _cpu_seconds(daemon.pid), time.monotonic()
            after = _scrape(url)
            scrape_wall = []
            for _ in range(5):
                started = time.perf_counter()
                _scrape(url)
                scrape_wall.append((time.perf_counter() - started) * 1000)
            rss = _peak_rss_mib(daemon.pid)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            notify.close()

    probes = _probes(after) - _probes(before)
    late_before, late_after = _lateness(before), _lateness(after)
    late = {b: late_after[b] - late_before.get(b, 0.0) for b in late_after}
    render_ms, write_ms = _in_process_costs(args.checks)
    print(f"target: {label}; {args.checks} http checks every {args.interval:g} s; "
          f"window {t1 - t0:.1f} s")  # fmt: skip
    print(f"probes:                     {probes:.0f} ({probes / (t1 - t0):.1f}/s)")
    print(f"daemon CPU per probe:       {(cpu1 - cpu0) / max(probes, 1) * 1e6:.0f} us")
    print(f"daemon CPU share:           {(cpu1 - cpu0) / (t1 - t0) * 100:.1f} % of one core")
    print(f"start lateness p50 / p99:   {_quantile(0.5, late) * 1000:.2f} ms / "
          f"{_quantile(0.99, late) * 1000:.2f} ms")  # fmt: skip
    print(f"peak RSS:                   {rss:.1f} MiB")
    print(f"/metrics scrape (live):     {statistics.median(scrape_wall):.1f} ms wall, median of 5")
    print(f"/metrics render (uncached): {render_ms:.1f} ms for {args.checks} components")
    print(f"status file write:          {write_ms:.1f} ms for {args.checks} components")


if __name__ == "__main__":
    main()
