"""Benchmark: every row of healthd's performance table, in one command.

Each row is measured the way an operator would see it, from outside a real ``healthd run``
process (CPU from /proc, figures from ``/metrics``, READY from a real ``NOTIFY_SOCKET``), except
the two render rows, which time the exporters in-process on a store of N components:

- ``cpu``: CPU per HTTP probe of the whole daemon, side by side with
  ``prometheus-blackbox-exporter`` driven at the same rate through its ``/probe`` endpoint,
  both against the same local nginx, in the same window;
- ``lateness``: start lateness p99 at 1,000 checks a second with 10% of them hanging until
  their timeout, default concurrency;
- ``hold``: the longest hold of the event loop (``healthd_event_loop_lag_seconds``) while
  ``/metrics`` is scraped at 10,000 components;
- ``metrics``: ``/metrics`` render p50/p99 and size at 10,000 components, 5% changing between
  scrapes;
- ``status``: one status file write (render and atomic replace) at 10,000 components;
- ``history``: one ``history.json`` export at 1,000 and 10,000 components, the first after
  start (every entry rendered) and the later ones (only what changed);
- ``memory``: RSS and open descriptors of 10,000 checks every 60 s;
- ``ready``: start to READY for 10 and for 1,000 components;
- ``floor``: how late a bare Python process, sleeping 1 ms at a time, wakes on this machine:
  the part of the lateness and hold rows that no program can go under (a virtual machine's
  vCPU is descheduled now and then).

Usage::

    .venv/bin/python bench/bench.py                       # everything, full size
    .venv/bin/python bench/bench.py --scale 0.1           # every count and rate x 0.1
    .venv/bin/python bench/bench.py --only metrics,status # a subset
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
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
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http import _cpu_seconds, _free_port, _probes, _quantile, _target

ROWS = ("cpu", "lateness", "hold", "metrics", "status", "history", "memory", "ready", "floor")


@dataclass
class Row:
    """One line of the table."""

    measure: str
    result: str
    goal: str


# --- a daemon under test ---------------------------------------------------------------------


@dataclass
class Daemon:
    """A running ``healthd run`` and what it took to get there."""

    process: subprocess.Popen[bytes]
    metrics_url: str
    ready_seconds: float
    #: CPU the daemon used until READY: the part of start-up a busy machine cannot inflate.
    ready_cpu_seconds: float

    def scrape(self) -> str:
        return httpx.get(self.metrics_url, timeout=60).text


@contextmanager
def _daemon(work: Path, daemon: list[str], components: list[str]) -> Iterator[Daemon]:
    port = _free_port()
    config = work / f"healthd-{port}.toml"
    lines = [
        "[daemon]",
        f'metrics_address = "127.0.0.1:{port}"',
        f'status_file = "{work / f"status-{port}.json"}"',
        *daemon,
        *components,
    ]
    config.write_text("\n".join(lines) + "\n")
    notify_path = str(work / f"notify-{port}.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(300)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "healthd", "--config", str(config), "--log-level", "error", "run"],
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        ready = time.monotonic() - started
        url = f"http://127.0.0.1:{port}/metrics"
        yield Daemon(process, url, ready, _cpu_seconds(process.pid))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            print("note: healthd took over 60 s to stop; killed", file=sys.stderr)
            process.kill()
            process.wait(10)
        notify.close()


def _http_components(count: int, url: str, prefix: str = "c") -> list[str]:
    lines = []
    for i in range(count):
        lines += [f"[components.{prefix}{i:05d}]", 'kind = "http"', f'url = "{url}/{prefix}{i}"']
    return lines


@contextmanager
def _hanging_server(work: Path) -> Iterator[str]:
    """A server that accepts connections and never answers: a hung target.

    Plain sockets and a selector, not asyncio streams: their objects per connection made a
    collection of 20-50 ms every 4 s in this process, CPU taken from the machine that the
    lateness row measures healthd on."""
    port = _free_port()
    script = work / "hang.py"
    script.write_text(
        textwrap.dedent(f"""
        import selectors, socket
        selector = selectors.DefaultSelector()
        server = socket.create_server(("127.0.0.1", {port}), backlog=4096)
        server.setblocking(False)
        selector.register(server, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is server:
                    try:
                        connection, _ = server.accept()
                    except BlockingIOError:
                        continue
                    connection.setblocking(False)
                    selector.register(connection, selectors.EVENT_READ)
                    continue
                try:
                    data = key.fileobj.recv(65536)  # the request, read and never answered
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
        """)
    )
    process = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _histogram(text: str, name: str, labels: str = "") -> dict[float, float]:
    """Histogram ``name``'s buckets; ``labels`` as they precede ``le``, ``generation="1",``."""
    return {
        float(le): float(value)
        for le, value in re.findall(
            rf'^{name}_bucket\{{{re.escape(labels)}le="([^"]+)"\}} (\S+)$', text, re.M
        )
    }


def _delta(before: str, after: str, name: str, labels: str = "") -> dict[float, float]:
    """Histogram ``name``'s buckets gained between two scrapes."""
    earlier = _histogram(before, name, labels)
    return {
        bound: count - earlier.get(bound, 0.0)
        for bound, count in _histogram(after, name, labels).items()
    }


def _longest(buckets: dict[float, float]) -> float:
    """The upper bound of the highest bucket that gained an observation."""
    previous = 0.0
    longest = 0.0
    for bound in sorted(buckets):
        if buckets[bound] > previous:
            longest = bound
        previous = buckets[bound]
    return longest


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def _ms(seconds: float) -> str:
    return "+Inf" if seconds == float("inf") else f"{seconds * 1000:.1f} ms"


# --- rows --------------------------------------------------------------------------------------


def _blackbox_config(work: Path) -> Path:
    path = work / "blackbox.yml"
    path.write_text(
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n"
        "    http:\n      preferred_ip_protocol: ip4\n"
    )
    return path


async def _drive(url: str, target: str, rate: float, seconds: float) -> tuple[int, int]:
    """Ask blackbox for ``rate`` probes a second for ``seconds``; return how many it answered,
    and how many of those succeeded."""
    answered = ok = 0
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def one() -> None:
            nonlocal answered, ok
            response = await client.get(url, params={"module": "http_2xx", "target": target})
            answered += 1
            if "probe_success 1" in response.text:
                ok += 1

        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) - sent
            # A starved machine must not pile up requests that finish long after the window.
            for _ in range(min(due, max(0, 200 - len(tasks)))):
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent += due
            await asyncio.sleep(0.005)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return answered, ok


def row_cpu(work: Path, base: str, rate: float, seconds: float) -> list[Row]:
    count = max(1, round(rate))
    port = _free_port()
    blackbox = subprocess.Popen(
        [
            "prometheus-blackbox-exporter",
            f"--config.file={_blackbox_config(work)}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=error",
        ]
    )
    probe_url = f"http://127.0.0.1:{port}/probe"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        daemon = ['interval = "1s"']
        with _daemon(work, daemon, _http_components(count, base)) as healthd:
            time.sleep(3)  # past the first round
            before = healthd.scrape()
            h0, b0 = _cpu_seconds(healthd.process.pid), _cpu_seconds(blackbox.pid)
            t0 = time.monotonic()
            blackbox_probes, blackbox_ok = asyncio.run(
                _drive(probe_url, base + "/bb", count, seconds)
            )
            t1 = time.monotonic()
            h1, b1 = _cpu_seconds(healthd.process.pid), _cpu_seconds(blackbox.pid)
            healthd_probes = _probes(healthd.scrape()) - _probes(before)
    finally:
        blackbox.terminate()
        blackbox.wait(10)
    ours = (h1 - h0) / max(healthd_probes, 1)
    theirs = (b1 - b0) / max(blackbox_probes, 1)
    return [
        Row(
            f"CPU per HTTP probe, whole process, vs blackbox_exporter at {count} probes/s",
            f"**{ours / theirs:.2f}x** ({ours * 1e6:.0f} against {theirs * 1e6:.0f} us; "
            f"{healthd_probes / (t1 - t0):.0f} and {blackbox_probes / (t1 - t0):.0f} probes/s; "
            f"blackbox answered {blackbox_probes}, {blackbox_ok} successful)",
            "<= 0.5x",
        )
    ]


def row_lateness(work: Path, base: str, rate: float, seconds: float) -> list[Row]:
    count = max(10, round(rate))
    hanging = count // 10
    with _hanging_server(work) as hang:
        components = _http_components(count - hanging, base) + _http_components(
            hanging, hang, prefix="h"
        )
        with _daemon(work, ['interval = "1s"'], components) as healthd:
            time.sleep(3)
            before = healthd.scrape()
            time.sleep(seconds)
            after = healthd.scrape()
    late = _delta(before, after, "healthd_scheduler_lateness_seconds")
    lag = _delta(before, after, "healthd_event_loop_lag_seconds")
    return [
        Row(
            f"start lateness p99, {count} checks/s with {hanging} hanging until timeout",
            f"**{_ms(_quantile(0.99, late))}** (p50 {_ms(_quantile(0.5, late))}; "
            f"loop lag p99 {_ms(_quantile(0.99, lag))}), default config",
            "<= 5 ms",
        )
    ]


def rows_fleet(
    work: Path, base: str, count: int, seconds: float, hold: bool, memory: bool
) -> list[Row]:
    """One daemon with ``count`` checks every 60 s: the loop's longest hold while /metrics is
    scraped every second, then RSS and descriptors. Read after two intervals, not one: RSS
    still rises by a few MiB while every check runs for the second time, and that round is
    what showed a snapshot kept since READY (docs/performance.md)."""
    rows = []
    with _daemon(work, ['interval = "60s"'], _http_components(count, base)) as healthd:
        before = healthd.scrape()
        scrape_ms = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            healthd.scrape()
            scrape_ms.append(time.perf_counter() - started)
            time.sleep(1)
        after = healthd.scrape()
        pid = healthd.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    runs = _probes(after) / count
    if hold:
        lag = _delta(before, after, "healthd_event_loop_lag_seconds")
        # The lag sampler sees a hold of H ms with a chance of about H/100; every collection,
        # which holds the loop from any thread, is timed.
        collections = [
            _delta(before, after, "healthd_gc_pause_seconds", f'generation="{generation}",')
            for generation in range(3)
        ]
        longest_gc = max(_longest(pauses) for pauses in collections)
        counted = "/".join(f"{pauses[float('inf')]:.0f}" for pauses in collections)
        rows.append(
            Row(
                f"longest hold of the event loop, {count} components, /metrics scraped every 1 s",
                f"**<= {_ms(max(_longest(lag), longest_gc))}** (lag: longest <= "
                f"{_ms(_longest(lag))}, p99 {_ms(_quantile(0.99, lag))}; collections of "
                f"generation 0/1/2: {counted}, the longest <= {_ms(longest_gc)}; "
                f"{len(scrape_ms)} live scrapes, median {_ms(statistics.median(scrape_ms))})",
                "<= 5 ms",
            )
        )
        writes = _delta(before, after, "healthd_status_file_write_duration_seconds")
        rows.append(
            Row(
                f"status file write, {count} components, wall time in the daemon's own histogram",
                f"p50 {_ms(_quantile(0.5, writes))}, p99 {_ms(_quantile(0.99, writes))}, "
                f"the longest <= {_ms(_longest(writes))}; {writes[float('inf')]:.0f} writes",
                "<= 50 ms",
            )
        )
    if memory:
        rows.append(
            Row(
                f"RSS and descriptors, {count} checks every 60 s, {seconds:.0f} s after READY "
                f"(each check run {runs:.1f} times)",
                # The goal is in MB (10^6 bytes): 100 MB is 95.4 MiB.
                f"**{rss_kib / 1024:.1f} MiB** ({rss_kib * 1024 / 1e6:.1f} MB), "
                f"**{descriptors} descriptors**",
                "<= 100 MB, <= 1,000 descriptors",
            )
        )
    return rows


def _store(count: int):  # type: ignore[no-untyped-def]
    from healthd.model import DURATION_BUCKETS_SECONDS, ComponentState, Histogram, Status
    from healthd.state import StateStore

    store = StateStore()
    durations = Histogram.empty(DURATION_BUCKETS_SECONDS).observe(0.001).observe(0.02)
    # As in the daemon, a check that keeps its status keeps the time of its last change.
    since = time.time() - 3600

    def state(i: int, changes: int) -> ComponentState:
        now = time.time()
        return ComponentState(
            name=f"c{i:05d}", kind="http", critical=i % 10 == 0, status=Status.HEALTHY,
            reason_code="ok", reason="GET /health returned 200", latency_seconds=0.001 * changes,
            checked_at=now, since=since, last_success_at=now, consecutive_failures=0,
            consecutive_successes=changes, details={"http_status": 200, "body_bytes": 2},
            checks_total={"success": 10 + changes, "timeout": 1}, durations=durations,
        )  # fmt: skip

    for i in range(count):
        store.record(state(i, 0), stale_after_seconds=1e9)

    def change(share: float, round_: int) -> None:
        for i in random.sample(range(count), max(1, int(count * share))):
            store.record(state(i, round_), stale_after_seconds=1e9)

    _collect_as_the_daemon_does()
    return store, change


def _collect_as_the_daemon_does() -> None:
    """Freeze what exists and collect the youngest generation as ``healthd run`` does after
    start-up: with Python's defaults, full collections in the bench's thread showed as render
    times the daemon does not have."""
    import gc

    from healthd.daemon import GC_THRESHOLDS

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def row_metrics(count: int, rounds: int) -> list[Row]:
    from healthd.exporters.metrics import Exposition

    rows = []
    for histogram in (True, False):
        store, change = _store(count)
        renderer = Exposition("bench", check_duration_histogram=histogram)
        renderer.render(store.snapshot())
        times, cpu, rendered, size = [], [], [], 0
        for round_ in range(1, rounds + 1):
            change(0.05, round_)
            snapshot = store.snapshot()
            started, cpu_started = time.perf_counter(), time.thread_time()
            size = len(renderer.render(snapshot))
            times.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - cpu_started)
            rendered.append(renderer.rendered_components)
        rows.append(
            Row(
                f"/metrics render at {count} components, 5% changed per scrape, "
                f"check_duration_histogram = {str(histogram).lower()}",
                f"**p50 {_ms(statistics.median(times))}, p99 {_ms(_p99(times))}** "
                f"(CPU p50 {_ms(statistics.median(cpu))}, p99 {_ms(_p99(cpu))}), "
                f"{size / 1e6:.1f} MB; re-rendered {statistics.median(rendered):.0f} of {count} "
                "components per scrape",
                "p99 <= 100 ms, cost linear",
            )
        )
    return rows


def row_status(count: int, rounds: int, work: Path) -> list[Row]:
    from healthd.exporters.status_file import StatusDocument, write_atomic

    store, change = _store(count)
    document = StatusDocument()
    path = work / "status-bench.json"
    write_atomic(path, document.render(store.snapshot()))
    times, cpu, renders, rendered = [], [], [], []
    for round_ in range(1, rounds + 1):
        change(0.05, round_)
        started, cpu_started = time.perf_counter(), time.thread_time()
        data = document.render(store.snapshot())
        renders.append(time.perf_counter() - started)
        write_atomic(path, data)
        times.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - cpu_started)
        rendered.append(document.rendered_components)
    return [
        Row(
            f"status file write at {count} components (snapshot, render, write, fsync, "
            "rename), 5% changed",
            f"**p50 {_ms(statistics.median(times))}, p99 {_ms(_p99(times))}** "
            f"(CPU p50 {_ms(statistics.median(cpu))}, p99 {_ms(_p99(cpu))}), in the writer's "
            f"thread; snapshot and render alone p50 {_ms(statistics.median(renders))}, "
            f"p99 {_ms(_p99(renders))}; {path.stat().st_size / 1e6:.1f} MB; re-rendered "
            f"{statistics.median(rendered):.0f} entries per write",
            "<= 50 ms, off the loop",
        )
    ]


def row_history(counts: list[int], rounds: int, work: Path) -> list[Row]:
    """``history.json`` exports from a database of two days of hourly checks, with a tenth of
    the components down for an hour each day, and 5% of them checked between exports."""
    return [_history_row(count, rounds, work) for count in counts]


def _history_row(count: int, rounds: int, work: Path) -> Row:
    from healthd.history import History
    from healthd.model import ComponentState, Status
    from healthd.secrets import Redactor
    from healthd.state import StateStore

    now = [1_764_000_000.0]
    recorder = History(
        work / f"history-{count}.db",
        StateStore(),
        Redactor(["bench-secret-value"]),
        retention_seconds=90 * 86400,
        export_path=work / f"history-{count}.json",
        clock=lambda: now[0],
    )
    names = [f"c{i:05d}" for i in range(count)]
    recorder._components = tuple(names)
    recorder._max_gap = dict.fromkeys(names, 3600.0)
    last: dict[str, ComponentState] = {}

    def check(name: str, status: Status, at: float) -> None:
        state = ComponentState(
            name=name, kind="http", critical=True, status=status,
            reason_code="ok" if status is Status.HEALTHY else "connection_refused",
            reason="GET /health: connection refused", latency_seconds=0.01, checked_at=at,
            since=at, last_success_at=None, consecutive_failures=0, consecutive_successes=0,
        )  # fmt: skip
        recorder.check_completed(last.get(name), state)
        last[name] = state

    start = now[0] - 2 * 86400
    for hour in range(48):
        for i, name in enumerate(names):
            down = i % 10 == 0 and hour % 24 == 3
            check(name, Status.UNHEALTHY if down else Status.HEALTHY, start + hour * 3600)
        if hour % 12 == 11:
            recorder._cycle()
    started = time.thread_time()
    recorder.flush()
    first_cpu = time.thread_time() - started
    cpu = []
    for _ in range(rounds):
        now[0] += 60
        for name in random.sample(names, max(1, count // 20)):
            check(name, Status.HEALTHY, now[0])
        started = time.thread_time()
        recorder.flush()
        cpu.append(time.thread_time() - started)
    recorder.close()
    size = (work / f"history-{count}.json").stat().st_size
    return Row(
        f"history.json export at {count} components, 5% checked between exports",
        f"**CPU p50 {_ms(statistics.median(cpu))}, p99 {_ms(_p99(cpu))}** per flush and "
        f"export, in the history thread; the first after start {_ms(first_cpu)}; "
        f"{size / 1e6:.1f} MB; rendered {recorder._export.rendered_components} entries "
        "in the last",
        "off the loop, cost of what changed",
    )


_SLEEPER = textwrap.dedent("""
    import sys, time
    end = time.perf_counter() + float(sys.argv[1])
    late = []
    while time.perf_counter() < end:
        started = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - started - 0.001)
    late.sort()
    print(len(late), late[int(len(late) * 0.99)], late[-1], sum(s > 0.005 for s in late))
""")


def row_floor(seconds: float) -> list[Row]:
    """A process that does nothing but sleep 1 ms at a time, alone: how late the machine
    itself wakes a program."""
    out = subprocess.run(
        [sys.executable, "-c", _SLEEPER, str(seconds)], capture_output=True, text=True, check=True
    ).stdout.split()
    count, p99, longest, over = int(out[0]), float(out[1]), float(out[2]), int(out[3])
    return [
        Row(
            f"the machine's floor: a bare process sleeping 1 ms at a time for {seconds:.0f} s",
            f"wakes late by p99 {_ms(p99)}, at most {_ms(longest)}; {over} of {count} "
            "wake-ups more than 5 ms late",
            "context for the lateness and hold rows",
        )
    ]


def row_ready(work: Path, base: str, counts: list[int], runs: int) -> list[Row]:
    rows = []
    for count in counts:
        times, cpu = [], []
        for _ in range(runs):
            with _daemon(work, [], _http_components(count, base)) as healthd:
                times.append(healthd.ready_seconds)
                cpu.append(healthd.ready_cpu_seconds)
        rows.append(
            Row(
                f"start to READY, {count} components (median of {runs})",
                f"**{statistics.median(times):.2f} s** (runs: "
                + ", ".join(f"{t:.2f}" for t in times)
                + f"; daemon CPU until READY {statistics.median(cpu):.2f} s)",
                "<= 1.5 s for 10, <= 2.5 s for 1,000",
            )
        )
    return rows


# --- main -------------------------------------------------------------------------------------


class _Rows(list[Row]):
    """The table so far; each row also goes to stderr as soon as it is measured."""

    def __iadd__(self, rows: list[Row]) -> _Rows:  # type: ignore[override,misc]
        for row in rows:
            print(f"{row.measure}: {row.result}", file=sys.stderr, flush=True)
        self.extend(rows)
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated: {ROWS}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies counts and rates")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement windows")
    parser.add_argument(
        "--fleet-seconds",
        type=float,
        default=150.0,
        help="how long the 60 s fleet runs after READY (memory settles after two intervals)",
    )
    parser.add_argument("--rounds", type=int, default=50, help="renders per in-process row")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(ROWS):
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")

    def scaled(n: float) -> int:
        return max(1, round(n * float(args.scale)))

    rows = _Rows()
    with tempfile.TemporaryDirectory(prefix="healthd-bench-") as tmp:
        work = Path(tmp)
        if "metrics" in only:
            rows += row_metrics(scaled(10_000), args.rounds)
        if "status" in only:
            rows += row_status(scaled(10_000), args.rounds, work)
        if "history" in only:
            rows += row_history([scaled(1000), scaled(10_000)], min(args.rounds, 20), work)
        if "floor" in only:
            rows += row_floor(args.seconds)
        if only & {"cpu", "lateness", "hold", "memory", "ready"}:
            with _target(work) as (base, label):
                if label != "nginx":
                    print(f"note: no nginx; the target is an {label}", file=sys.stderr)
                if "cpu" in only:
                    rows += row_cpu(work, base, scaled(300), args.seconds)
                if "lateness" in only:
                    rows += row_lateness(work, base, scaled(1000), args.seconds)
                if only & {"hold", "memory"}:
                    rows += rows_fleet(
                        work,
                        base,
                        scaled(10_000),
                        args.fleet_seconds,
                        hold="hold" in only,
                        memory="memory" in only,
                    )
                if "ready" in only:
                    rows += row_ready(work, base, [10, scaled(1000)], runs=3)

    cpus = os.cpu_count()
    print(
        f"healthd bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.machine()}, {cpus} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}; scale {args.scale:g}"
    )
    print()
    print("| measure | result | goal |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row.measure} | {row.result} | {row.goal} |")


if __name__ == "__main__":
    main()
