"""Benchmark: the http probe's CPU against prometheus-blackbox-exporter, and the daemon's
memory and descriptors at many checks. Loopback only; every run is bounded.

``cpu``: one local nginx; a real ``healthd run`` probing it at ``--rate`` probes/s (``--rate``
x ``--interval`` checks) and, at the same time, ``prometheus-blackbox-exporter`` whose
``/probe`` endpoint is driven at the same rate against the same nginx. For each of ``--reps``
windows it prints the CPU (utime + stime from /proc/PID/stat) of each whole process per probe,
and their ratio. Probes are counted from ``healthd_checks_total`` and from the driver's
completed ``/probe`` requests that reported ``probe_success 1``.

``scale``: ``--checks`` http checks at ``--interval`` against nginx; once every check has run
(after ``startup_spread``), the daemon's RSS and open descriptors, in total and per check.

``--source DIR`` runs the healthd found in DIR (another worktree, say) for a before/after.
``BENCH_LOG_DIR`` keeps the daemon's log there (else it goes with the work directory).

Usage::

    .venv/bin/python bench/bench_transport.py cpu --rate 300 --reps 3
    .venv/bin/python bench/bench_transport.py scale --checks 10000 --interval 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httptools
import httpx

_TICKS = os.sysconf("SC_CLK_TCK")
_REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {seconds} s")


@contextmanager
def _nginx(workdir: Path) -> Iterator[str]:
    """nginx on loopback answering 200 "ok" (keepalive_timeout 75 s, its default)."""
    nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if nginx is None:
        raise SystemExit("nginx is not installed (apt-get install -y nginx)")
    port = _free_port()
    prefix = workdir / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "nginx.conf").write_text(
        textwrap.dedent(f"""
        daemon off;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/logs/error.log warn;
        worker_rlimit_nofile 40000;
        events {{ worker_connections 20000; }}
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
                listen 127.0.0.1:{port} backlog=4096;
                location / {{ return 200 'ok'; }}
            }}
        }}
        """)
    )
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
    try:
        _wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def _blackbox(workdir: Path) -> Iterator[tuple[int, str]]:
    exporter = shutil.which("prometheus-blackbox-exporter")
    if exporter is None:
        raise SystemExit("apt-get install -y prometheus-blackbox-exporter")
    config = workdir / "blackbox.yml"
    config.write_text(
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n"
        "    http:\n      preferred_ip_protocol: ip4\n"
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            exporter,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/metrics")
        yield process.pid, f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def _healthd(
    workdir: Path, source: Path, components: list[str], daemon: dict[str, str]
) -> Iterator[tuple[int, str]]:
    metrics_port = _free_port()
    lines = [
        "[daemon]",
        f'metrics_address = "127.0.0.1:{metrics_port}"',
        f'status_file = "{workdir / "status.json"}"',
        *(f"{key} = {value}" for key, value in daemon.items()),
        *components,
    ]
    config = workdir / "healthd.toml"
    config.write_text("\n".join(lines) + "\n")
    notify_path = str(workdir / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(300)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "PYTHONPATH": str(source)}
    # The daemon's log, kept where BENCH_LOG_DIR says (else dropped with the work directory).
    log = (Path(os.environ.get("BENCH_LOG_DIR", workdir)) / "healthd.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "healthd", "--config", str(config), "--log-level", "warning", "run"],
        env=env,
        cwd=source,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        # Keep reading as systemd does: a full socket buffer would block the daemon's sd_notify.
        threading.Thread(target=_drain, args=(notify,), daemon=True).start()
        yield process.pid, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            print("healthd did not stop within 60 s of SIGTERM; killed", flush=True)
            process.kill()
            process.wait(10)
        notify.close()
        log.close()


def _drain(notify: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while notify.recv(4096):
            pass


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _status_kib(pid: int, field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _checks_total(url: str) -> float:
    text = httpx.get(url, timeout=30).text
    pattern = r"^healthd_checks_total\{[^}]*\} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


class _Driver:
    """Drives blackbox's ``/probe`` at a steady rate from a thread of its own, over a few
    kept-alive connections, and counts the probes that succeeded."""

    def __init__(self, blackbox: str, target: str, rate: float) -> None:
        self._host, port = blackbox.split(":")
        self._port = int(port)
        self._path = f"/probe?module=http_2xx&target={target}"
        self._rate = rate
        self.succeeded = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        workers = 16
        await asyncio.gather(*(self._worker(i, workers) for i in range(workers)))

    async def _worker(self, index: int, workers: int) -> None:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        request = f"GET {self._path} HTTP/1.1\r\nHost: {self._host}\r\n\r\n".encode()
        period = workers / self._rate
        loop = asyncio.get_running_loop()
        next_at = loop.time() + index / self._rate
        while not self._stop.is_set():
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += period
            writer.write(request)
            response = _Response()
            parser = httptools.HttpResponseParser(response)
            while not response.complete:
                parser.feed_data(await reader.read(65536))
            if b"\nprobe_success 1" in b"".join(response.body):
                self.succeeded += 1
            else:
                self.failed += 1
        writer.close()


class _Response:
    """Collects one response's body for httptools (blackbox answers chunked)."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def _cpu(args: argparse.Namespace) -> None:
    source = Path(args.source).resolve()
    checks = round(args.rate * args.interval)
    with tempfile.TemporaryDirectory(prefix="healthd-bench-") as tmp:
        work = Path(tmp)
        with _nginx(work) as base, _blackbox(work) as (bb_pid, bb_address):
            components = []
            for i in range(checks):
                components += [f"[components.c{i:05d}]", 'kind = "http"', f'url = "{base}/c{i}"']
            daemon = {
                "interval": str(args.interval),
                "timeout": "5",
                "startup_spread": str(args.interval),
            }
            with _healthd(work, source, components, daemon) as (pid, metrics):
                driver = _Driver(bb_address, f"{base}/bb", args.rate)
                driver.start()
                time.sleep(args.warmup)
                ratios = []
                for rep in range(args.reps):
                    h0, b0 = _checks_total(metrics), driver.succeeded
                    hc0, bc0, t0 = _cpu_seconds(pid), _cpu_seconds(bb_pid), time.monotonic()
                    time.sleep(args.seconds)
                    hc1, bc1, t1 = _cpu_seconds(pid), _cpu_seconds(bb_pid), time.monotonic()
                    h1, b1 = _checks_total(metrics), driver.succeeded
                    h_us = (hc1 - hc0) / max(h1 - h0, 1) * 1e6
                    b_us = (bc1 - bc0) / max(b1 - b0, 1) * 1e6
                    ratios.append(h_us / b_us)
                    print(
                        f"rep {rep + 1}: {t1 - t0:.1f} s; healthd {(h1 - h0) / (t1 - t0):.0f}"
                        f" probes/s, {h_us:.0f} us CPU/probe; blackbox"
                        f" {(b1 - b0) / (t1 - t0):.0f} probes/s, {b_us:.0f} us CPU/probe;"
                        f" ratio {h_us / b_us:.2f}x",
                        flush=True,
                    )
                driver.stop()
                if driver.failed:
                    print(f"blackbox probes failed: {driver.failed}")
                print(
                    f"healthd {source}: {checks} checks every {args.interval:g} s;"
                    f" ratio per rep {', '.join(f'{r:.2f}' for r in ratios)}"
                )


def _scale(args: argparse.Namespace) -> None:
    source = Path(args.source).resolve()
    with tempfile.TemporaryDirectory(prefix="healthd-bench-") as tmp:
        work = Path(tmp)
        with _nginx(work) as base:
            components = []
            for i in range(args.checks):
                components += [f"[components.c{i:05d}]", 'kind = "http"', f'url = "{base}/c{i}"']
            daemon = {
                "interval": str(args.interval),
                "timeout": "5",
                "startup_spread": str(args.interval),
            }
            started = time.monotonic()
            with _healthd(work, source, components, daemon) as (pid, metrics):
                ready = time.monotonic() - started
                # Every check has run once after the spread; then one more interval's worth.
                time.sleep(args.interval * 1.2)
                samples = []
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    samples.append((_status_kib(pid, "VmRSS"), _fds(pid)))
                    time.sleep(1)
                probes = _checks_total(metrics)
                hwm = _status_kib(pid, "VmHWM")
                rss = max(s[0] for s in samples) / 1024
                fds = max(s[1] for s in samples)
                print(
                    f"healthd {source}: {args.checks} http checks every {args.interval:g} s;"
                    f" READY after {ready:.1f} s; {probes:.0f} probes done\n"
                    f"RSS max {rss:.1f} MiB (peak {hwm / 1024:.1f} MiB),"
                    f" {rss * 1024 / args.checks:.1f} KiB per check;"
                    f" descriptors max {fds}, {fds / args.checks:.3f} per check",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(_REPO), help="the healthd tree to run")
    sub = parser.add_subparsers(dest="mode", required=True)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--rate", type=float, default=300.0, help="probes/s for each side")
    cpu.add_argument("--interval", type=float, default=1.0, help="seconds between a check's runs")
    cpu.add_argument("--reps", type=int, default=3)
    cpu.add_argument("--seconds", type=float, default=20.0, help="each window")
    cpu.add_argument("--warmup", type=float, default=5.0)
    scale = sub.add_parser("scale")
    scale.add_argument("--checks", type=int, default=10_000)
    scale.add_argument("--interval", type=float, default=60.0)
    scale.add_argument("--seconds", type=float, default=20.0, help="sampling window")
    args = parser.parse_args()
    _cpu(args) if args.mode == "cpu" else _scale(args)


if __name__ == "__main__":
    main()
