"""Soak: a real ``healthd run`` against failing targets until N probes have completed.

The targets live in this process, on loopback, each bounded:

- **refused**: a port nobody listens on;
- **frozen**: for ``http``, a listener that accepts and never answers (at most 4,096
  connections held; the oldest is dropped beyond that); for ``tcp``, a listener that never
  accepts, whose one-slot queue is full, so connecting hangs;
- **resetting**: accepts, then closes with ``SO_LINGER 0`` so the client gets an RST;
- **garbage**: accepts, sends bytes that are no protocol at all, then closes.

Half the checks are ``http``, half ``tcp``, spread over the four targets. Once a second the
soak reads ``healthd_checks_total`` from ``/metrics`` and samples the daemon's descriptor
count (``/proc/PID/fd``) and RSS. The first ``--warmup`` share of the probes is warm-up; the
table reports what happened after it. The goals: descriptors flat, RSS growth under 5 %.

Usage: ``.venv/bin/python bench/soak.py [--probes 1000000] [--checks 200] [--interval 0.1]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

_REPO = Path(__file__).resolve().parent.parent
#: How many silent connections the frozen target holds at most.
_FROZEN_MAX = 4096
_GARBAGE = b"\x00\xff\x16\x03 this is no protocol \r\n\r\n\xfe\xfe"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Frozen(asyncio.Protocol):
    held: ClassVar[collections.deque[asyncio.WriteTransport]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
        self.held.append(transport)
        if len(self.held) > _FROZEN_MAX:
            self.held.popleft().abort()

    def connection_lost(self, exc: Exception | None) -> None:
        with contextlib.suppress(ValueError):
            self.held.remove(self.transport)


class _Resetting(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert isinstance(transport, asyncio.WriteTransport)
        transport.abort()


class _Garbage(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_GARBAGE)
        transport.close()


class Targets:
    """The four failing targets, served from one thread's event loop."""

    def __init__(self) -> None:
        self.refused = _free_port()  # bound, released: nothing listens there
        # Never accepted: once its queue holds a connection, further SYNs are dropped.
        self._unaccepting = socket.socket()
        self._unaccepting.bind(("127.0.0.1", 0))
        self._unaccepting.listen(0)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.ports: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            for name, protocol in (
                ("frozen", _Frozen),
                ("resetting", _Resetting),
                ("garbage", _Garbage),
            ):
                server = await self._loop.create_server(protocol, "127.0.0.1", 0, backlog=4096)
                self.ports[name] = server.sockets[0].getsockname()[1]
            self.ports["refused"] = self.refused
            self.ports["frozen-tcp"] = self._unaccepting.getsockname()[1]

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        """Stop serving."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._unaccepting.close()


def _config(path: Path, targets: Targets, checks: int, interval: float, port: int) -> None:
    timeout = min(0.8 * interval, 1.0)  # a frozen target holds a slot this long
    lines = [
        "[daemon]",
        f'metrics_address = "127.0.0.1:{port}"',
        f'status_file = "{path.parent / "status.json"}"',
        f'interval = "{interval * 1000:.0f}ms"',
        f'timeout = "{timeout * 1000:.0f}ms"',
        f'startup_spread = "{interval * 1000:.0f}ms"',
        f"max_concurrency = {max(64, checks)}",
    ]
    names = ["refused", "frozen", "resetting", "garbage"]
    for i in range(checks):
        target = names[i % len(names)]
        lines.append(f"\n[components.{target}-{i}]")
        if (i // len(names)) % 2 == 0:
            port_ = targets.ports[target]
            lines += ['kind = "http"', f'url = "http://127.0.0.1:{port_}/health"']
        else:
            port_ = targets.ports["frozen-tcp" if target == "frozen" else target]
            lines += ['kind = "tcp"', f'address = "127.0.0.1:{port_}"']
    path.write_text("\n".join(lines) + "\n")


def _probes(port: int) -> float:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (http only)
        text = gzip.decompress(response.read()).decode()
    return sum(float(v) for v in re.findall(r"^healthd_checks_total\{[^}]*\} (\S+)$", text, re.M))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


@dataclass
class Sample:
    """One second of the soak: time since start, probes so far, descriptors, RSS."""

    seconds: float
    probes: float
    fds: int
    rss_mib: float


@dataclass
class Result:
    """A soak's samples, split at the end of warm-up."""

    samples: list[Sample]
    warmup_probes: float
    log: str = ""
    steady: list[Sample] = field(init=False)

    def __post_init__(self) -> None:
        self.steady = [s for s in self.samples if s.probes >= self.warmup_probes]

    @property
    def probes(self) -> float:
        """Probes completed in all."""
        return self.samples[-1].probes

    @property
    def probes_per_second(self) -> float:
        """The rate after warm-up."""
        first, last = self.steady[0], self.steady[-1]
        return (last.probes - first.probes) / max(last.seconds - first.seconds, 1e-9)

    @property
    def rss_growth(self) -> float:
        """RSS growth from the end of warm-up to the end, as a fraction."""
        return self.steady[-1].rss_mib / self.steady[0].rss_mib - 1

    def table(self) -> str:
        """The figures as a Markdown table."""
        fds = [s.fds for s in self.steady]
        tenth = max(len(fds) // 10, 1)
        # Descriptors swing with the probes in flight; the medians of the first and last
        # tenth after warm-up show whether they drift.
        early, late = statistics.median(fds[:tenth]), statistics.median(fds[-tenth:])
        return "\n".join(
            [
                "| probes | probes/s | fds min / max after warm-up | fds median, first / last "
                "tenth | RSS after warm-up | RSS at end | RSS growth |",
                "|---|---|---|---|---|---|---|",
                f"| {self.probes:,.0f} | {self.probes_per_second:,.0f} | {min(fds)} / {max(fds)} "
                f"| {early:.0f} / {late:.0f} "
                f"| {self.steady[0].rss_mib:.1f} MiB | {self.steady[-1].rss_mib:.1f} MiB "
                f"| {self.rss_growth * 100:+.1f} % |",
            ]
        )


@contextlib.contextmanager
def _daemon(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEALTHD_", "NOTIFY_"))}
    env["PYTHONPATH"] = str(_REPO)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "healthd", "--config", str(config), "run"],
            cwd=_REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _probes(port)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"healthd did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def soak(
    probes: int,
    *,
    checks: int = 200,
    interval: float = 0.1,
    warmup: float = 0.2,
    max_seconds: float = 3600,
    progress: bool = False,
) -> Result:
    """Run the daemon until ``probes`` probes have completed (or ``max_seconds`` passed)."""
    targets = Targets()
    try:
        with tempfile.TemporaryDirectory(prefix="healthd-soak-") as tmp:
            config = Path(tmp) / "healthd.toml"
            port = _free_port()
            _config(config, targets, checks, interval, port)
            log = Path(tmp) / "healthd.log"
            samples: list[Sample] = []
            with _daemon(config, port, log) as process:
                started = time.monotonic()
                while True:
                    done = _probes(port)
                    now = time.monotonic() - started
                    samples.append(Sample(now, done, _fds(process.pid), _rss_mib(process.pid)))
                    if progress and len(samples) % 30 == 0:
                        last = samples[-1]
                        print(
                            f"{now:6.0f} s  {done:10,.0f} probes  {last.fds} fds  "
                            f"{last.rss_mib:.1f} MiB",
                            file=sys.stderr,
                        )
                    if done >= probes or now > max_seconds:
                        break
                    time.sleep(1.0)
            return Result(samples, warmup * samples[-1].probes, log.read_text(errors="replace"))
    finally:
        targets.close()


def main() -> None:
    """Parse the arguments, soak, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=1_000_000)
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the probes")
    parser.add_argument("--max-seconds", type=float, default=3600)
    args = parser.parse_args()
    result = soak(
        args.probes,
        checks=args.checks,
        interval=args.interval,
        warmup=args.warmup,
        max_seconds=args.max_seconds,
        progress=True,
    )
    print(result.table())


if __name__ == "__main__":
    main()
