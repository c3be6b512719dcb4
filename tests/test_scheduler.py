"""The scheduler: deadlines, no self-overlap, drift-free intervals, concurrency and reload."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from healthd.config import Config
from healthd.model import UNTRACKED_DURATIONS, ComponentState, Observation, Status
from healthd.probes import PROBES, ProbeContext, ProbeKind
from healthd.probes import tcp as tcp_probe
from healthd.scheduler import Scheduler, concurrency_limit, phase_offset, startup_spread
from healthd.state import StateStore
from tests.http_target import HttpTarget, Reply


def _config(components: dict[str, dict[str, Any]], **daemon: Any) -> Config:
    return Config(daemon={"startup_spread": 0.001, **daemon}, components=components)


def _tcp(interval: float, timeout: float | None = None) -> dict[str, Any]:
    return {
        "kind": "tcp",
        "address": "127.0.0.1:9",
        "interval": interval,
        "timeout": timeout or interval,
    }


class _Recorder:
    """A probe table whose ``tcp`` probe is a test-controlled coroutine."""

    def __init__(self, body: Callable[[str], Any]) -> None:
        self.body = body
        self.starts: dict[str, list[float]] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}

    async def probe(self, check: Any, ctx: ProbeContext) -> Observation:
        name = check.description
        self.starts.setdefault(name, []).append(anyio.current_time())
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        self.max_in_flight[name] = max(self.max_in_flight.get(name, 0), self.in_flight[name])
        try:
            await self.body(name)
        finally:
            self.in_flight[name] -= 1
        return Observation(0.001)

    @property
    def table(self) -> dict[str, ProbeKind]:
        return {**PROBES, "tcp": ProbeKind(self.probe, tcp_probe.assess)}


async def _at_once(name: str) -> None:
    return None


def _named(interval: float, timeout: float | None = None, name: str = "x") -> dict[str, Any]:
    return {**_tcp(interval, timeout), "description": name}


@contextlib.asynccontextmanager
async def _running(scheduler: Scheduler, config: Config, limit: float) -> AsyncIterator[None]:
    """``scheduler.run(config)`` in the background while the block runs, cancelled at its end;
    the whole must be over within ``limit`` seconds."""
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run, config)
            yield
            tg.cancel_scope.cancel()


async def _run_until(scheduler: Scheduler, config: Config, done: anyio.Event, limit: float) -> None:
    async with _running(scheduler, config, limit):
        await done.wait()


@pytest.mark.asyncio
async def test_check_never_overlaps_itself_when_probe_outlasts_interval() -> None:
    done = anyio.Event()

    async def slow(name: str) -> None:
        # Each run takes three intervals' worth, but is cut by the deadline at one interval.
        if len(recorder.starts[name]) >= 6:
            done.set()
        await anyio.sleep(0.15)

    recorder = _Recorder(slow)
    store = StateStore()
    scheduler = Scheduler(store, probes=recorder.table)
    config = _config({"a": _named(0.05, name="a")})
    await _run_until(scheduler, config, done, limit=5)
    assert recorder.max_in_flight["a"] == 1
    state = store.get("a")
    assert state is not None
    assert state.reason_code == "timeout"
    starts = recorder.starts["a"]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # A run that overran skips the ticks it missed rather than bunching them up.
    assert all(gap >= 0.05 * 0.9 for gap in gaps), gaps


@pytest.mark.asyncio
async def test_intervals_do_not_drift_over_many_runs() -> None:
    done = anyio.Event()
    runs = 30
    interval = 0.04

    async def uneven(name: str) -> None:
        n = len(recorder.starts[name])
        if n >= runs:
            done.set()
        # Probes take a varying share of the interval; the start times must not care.
        await anyio.sleep((n % 4) * interval / 5)

    recorder = _Recorder(uneven)
    scheduler = Scheduler(StateStore(), probes=recorder.table)
    await _run_until(scheduler, _config({"a": _named(interval, name="a")}), done, limit=10)
    starts = recorder.starts["a"][:runs]
    first = starts[0]
    ticks = [round((s - first) / interval) for s in starts]
    # The grid's phase is the median start less its tick: a first start that was late (a busy
    # machine at start-up) must not make every later, punctual start look early.
    phase = statistics.median(s - t * interval for s, t in zip(starts, ticks, strict=True))
    phase_errors = [s - (phase + t * interval) for s, t in zip(starts, ticks, strict=True)]
    # Every start sits on the grid phase + k * interval, late only by event-loop latency. A
    # drifting loop (sleeping "interval" after each run) would add the probe times up, and its
    # starts would land all over the grid: errors spread evenly across +-interval/2 (20 ms), so
    # its median error would be near 10 ms. The median is the test, not a high percentile: on a
    # loaded 2-core machine a few starts are late by the machine's own latency, drift or not.
    errors = sorted(abs(e) for e in phase_errors)
    assert errors[len(errors) // 2] < 0.003, phase_errors
    # A tick is skipped only if the machine stalled; nearly all of them are kept.
    assert ticks[-1] - (runs - 1) <= 2, ticks


@pytest.mark.asyncio
async def test_hung_target_times_out_without_delaying_others(http_target: HttpTarget) -> None:
    http_target.route("/hang", Reply(action="hang"))
    http_target.route("/fast", Reply(body=b"ok"))
    hung_done = anyio.Event()
    fast_results: list[ComponentState] = []

    def changed(previous: ComponentState | None, state: ComponentState) -> None:
        if state.name == "hung":
            hung_done.set()

    store = StateStore()
    config = _config(
        {
            "hung": {
                "kind": "http",
                "url": http_target.url("/hang"),
                "interval": 5,
                "timeout": 0.5,
            },
            "fast": {"kind": "http", "url": http_target.url("/fast"), "interval": 0.05},
        }
    )
    # Spread over 1 s, so that the fast check's first client build (a one-off hold of the loop
    # of up to a few hundred ms on a busy machine) happens before the hung check starts.
    scheduler = Scheduler(store, on_change=changed, startup_spread_seconds=1.0)
    started = anyio.current_time()
    async with _running(scheduler, config, 3):
        while not hung_done.is_set():
            await anyio.sleep(0.01)
            if (state := store.get("fast")) is not None:
                fast_results.append(state)
    elapsed = anyio.current_time() - started
    hung = store.get("hung")
    assert hung is not None
    assert (hung.status, hung.reason_code) == (Status.UNHEALTHY, "timeout")
    # The deadline holds: the probe gave up within its 0.5 s, not later.
    assert 0.4 <= hung.latency_seconds <= 0.6
    assert elapsed < 1.0
    fast_checks = {s.checked_at for s in fast_results if s.status is Status.HEALTHY}
    # While the hung probe waited, the fast check kept its 50 ms rhythm.
    assert len(fast_checks) >= 6
    lateness = store.daemon().lateness
    assert lateness.count >= 6
    late_buckets = dict(zip(lateness.upper_bounds, lateness.buckets, strict=False))
    # Nothing waited on the hung probe: every start was late by far less than its 0.5 s.
    assert late_buckets[0.1] == lateness.count


@pytest.mark.asyncio
async def test_max_concurrency_bounds_probes_in_flight() -> None:
    in_flight = 0
    peak = 0
    done = anyio.Event()
    finished = 0

    async def body(name: str) -> None:
        nonlocal in_flight, peak, finished
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.02)
        in_flight -= 1
        finished += 1
        if finished >= 12:
            done.set()

    recorder = _Recorder(body)
    scheduler = Scheduler(StateStore(), max_concurrency=2, probes=recorder.table)
    config = _config({f"c{i}": _named(1, name=f"c{i}") for i in range(12)}, max_concurrency=2)
    await _run_until(scheduler, config, done, limit=5)
    assert peak == 2


@pytest.mark.asyncio
async def test_first_round_event_waits_for_every_check() -> None:
    release = anyio.Event()

    async def body(name: str) -> None:
        if name == "slow":
            await release.wait()

    recorder = _Recorder(body)
    store = StateStore()
    scheduler = Scheduler(store, probes=recorder.table)
    config = _config({"quick": _named(5, 1, "quick"), "slow": _named(5, 1, "slow")})
    async with _running(scheduler, config, 3):
        while store.get("quick") is None:
            await anyio.sleep(0.005)
        assert not scheduler.first_round_done.is_set()
        release.set()
        await scheduler.first_round_done.wait()
        assert store.get("slow") is not None


@pytest.mark.asyncio
async def test_states_keep_latencies_only_while_the_config_exports_them() -> None:
    store = StateStore()
    scheduler = Scheduler(store, probes=_Recorder(_at_once).table)
    components = {"a": _named(5, 1, "a")}
    for exported in (True, True, False):
        await scheduler.run_round(_config(components, check_duration_histogram=exported))
    state = store.get("a")
    assert state is not None
    assert state.durations is UNTRACKED_DURATIONS
    # Switched on again (a reload, say): counted from empty.
    await scheduler.run_round(_config(components, check_duration_histogram=True))
    state = store.get("a")
    assert state is not None
    assert state.durations.count == 1


@pytest.mark.asyncio
async def test_probe_bug_is_reported_as_probe_error_never_as_healthy() -> None:
    async def broken(name: str) -> None:
        raise RuntimeError("bug in probe")

    recorder = _Recorder(broken)
    store = StateStore()
    scheduler = Scheduler(store, probes=recorder.table)
    await scheduler.run_round(_config({"a": _named(5, 1, "a")}))
    state = store.get("a")
    assert state is not None
    assert (state.status, state.reason_code) == (Status.UNHEALTHY, "probe_error")
    assert store.daemon().probe_errors_total == 1
    assert store.daemon().probe_resource_errors_total == 0


@pytest.mark.asyncio
async def test_cancelling_the_scheduler_cancels_probes_in_flight_promptly() -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    async def forever(name: str) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    recorder = _Recorder(forever)
    scheduler = Scheduler(StateStore(), probes=recorder.table)
    async with _running(scheduler, _config({"a": _named(60, 60, "a")}), 2):
        await started.wait()
    assert cancelled.is_set()


@pytest.mark.asyncio
async def test_apply_keeps_unchanged_history_restarts_changed_and_drops_removed() -> None:
    recorder = _Recorder(_at_once)
    store = StateStore()
    scheduler = Scheduler(store, probes=recorder.table)
    first = _config({"keep": _named(5, 1, "keep"), "drop": _named(5, 1, "drop")})
    async with _running(scheduler, first, 3):
        await scheduler.first_round_done.wait()
        kept = store.get("keep")
        scheduler.apply(_config({"keep": _named(5, 1, "keep"), "new": _named(5, 1, "new")}))
        while store.get("new") is None:
            await anyio.sleep(0.005)
        assert store.get("keep") is kept
        assert store.get("drop") is None
        assert len(recorder.starts["keep"]) == 1


def test_phase_offset_is_stable_and_within_the_spread() -> None:
    offsets = {name: phase_offset(name, 15, 1.0) for name in ("api", "db", "redis", "mlflow")}
    assert offsets == {name: phase_offset(name, 15, 1.0) for name in offsets}
    assert all(0 <= o < 1.0 for o in offsets.values())
    assert len(set(offsets.values())) == len(offsets)
    assert phase_offset("api", 0.1, 1.0) < 0.1


@pytest.mark.asyncio
async def test_check_still_running_after_the_first_round_is_not_checked_then_taken_as_is() -> None:
    release = anyio.Event()

    async def slow_first(name: str) -> None:
        await release.wait()

    recorder = _Recorder(slow_first)
    store = StateStore()
    scheduler = Scheduler(store, probes=recorder.table)
    async with _running(scheduler, _config({"a": _named(5, 2, "a")}), 3):
        while not recorder.starts.get("a"):
            await anyio.sleep(0.005)
        # The first round's bound ran out: "not checked" is reported, never silence or "ok".
        assert scheduler.mark_unchecked(now=100.0) == ["a"]
        placeholder = store.get("a")
        assert placeholder is not None
        assert (placeholder.status, placeholder.reason_code) == (
            Status.UNHEALTHY,
            "not_checked",
        )
        assert store.snapshot().overall is Status.DEGRADED  # not critical
        release.set()
        while (state := store.get("a")) is placeholder:
            await anyio.sleep(0.005)
    assert state is not None
    # The placeholder is no history: the first real result counts as it is, not "recovering".
    assert (state.status, state.reason_code) == (Status.HEALTHY, "ok")
    assert state.consecutive_successes == 1


def test_default_concurrency_has_a_slot_for_every_hung_check_with_headroom() -> None:
    # 1,000 checks a second, each allowed its whole interval: all of them may hang at once.
    busy = _config({f"c{i}": _tcp(1.0) for i in range(1000)})
    assert concurrency_limit(busy) == 1000
    # 10,000 checks every 60 s with 5 s timeouts keep 833 slots busy at worst, on average.
    fleet = _config({f"c{i}": _tcp(60.0, 5.0) for i in range(10_000)})
    assert concurrency_limit(fleet) == math.ceil(2 * 10_000 * 5 / 60) + 64
    # Never more slots than checks, since a check cannot use two; an explicit value wins.
    assert concurrency_limit(_config({"a": _tcp(1.0)})) == 1
    assert concurrency_limit(_config({"a": _tcp(1.0)}, max_concurrency=7)) == 7


def test_default_startup_spread_is_a_millisecond_per_check_then_two() -> None:
    def spread(checks: int) -> float:
        checks_ = {f"c{i}": _tcp(60.0) for i in range(checks)}
        return startup_spread(_config(checks_, startup_spread=None))

    assert spread(10) == 0.01
    assert spread(1000) == 1.0
    # Beyond a thousand, first runs come at the rate one core sustains.
    assert spread(3000) == 5.0
    assert startup_spread(_config({"a": _tcp(1.0)}, startup_spread=2.0)) == 2.0


def test_datastore_clients_are_imported_only_when_the_config_uses_them(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from healthd.probes import PROBES\n"
        "import healthd.daemon\n"
        "assert set(PROBES) >= {'postgres', 'redis', 'falkordb', 'http'}, set(PROBES)\n"
        "PROBES['http']\n"
        "print(sorted(m for m in ('psycopg', 'redis') if m in sys.modules))\n"
        "PROBES['postgres']\n"
        "print('psycopg' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert result.stdout.splitlines() == ["[]", "True"]


@pytest.mark.asyncio
async def test_client_timeouts_racing_the_deadline_never_end_a_check_loop() -> None:
    # A listener that never accepts: connects stall once its backlog is full, so the clients'
    # own connect timeouts, the http probe's total deadline and the scheduler's deadline fire
    # together, again and again. A cancellation forwarded from a task a client cancelled used
    # to escape every scope and end its check's loop for good (200 checks: dozens died within
    # seconds), leaving the component silently stale.
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(8)
    port = frozen.getsockname()[1]
    components: dict[str, dict[str, Any]] = {}
    for i in range(200):
        target = (
            {"kind": "http", "url": f"http://127.0.0.1:{port}/health"}
            if i % 2
            else {"kind": "tcp", "address": f"127.0.0.1:{port}"}
        )
        components[f"c{i}"] = {**target, "interval": 0.1, "timeout": 0.08}
    store = StateStore()
    scheduler = Scheduler(store, max_concurrency=200)
    wanted_checks = 20

    def behind() -> list[str]:
        return [
            name
            for name in components
            if (state := store.get(name)) is None
            or sum(state.checks_total.values()) < wanted_checks
        ]

    try:
        with anyio.move_on_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(scheduler.run, _config(components))
                while behind():
                    await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
    finally:
        frozen.close()
    assert behind() == []
    assert {store.get(name).reason_code for name in components} == {"timeout"}  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_idle_checks_hold_no_task_of_their_own() -> None:
    # 300 checks every 60 s, spread over half a second: each run is over at once, so a few
    # workers take them all in turn; a task per check would leave 300 tasks waiting.
    recorder = _Recorder(_at_once)
    scheduler = Scheduler(StateStore(), probes=recorder.table, startup_spread_seconds=0.5)
    config = _config({f"c{i}": _named(60, 1, f"c{i}") for i in range(300)})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run, config)
            await scheduler.first_round_done.wait()
            tasks = len(asyncio.all_tasks())
            tg.cancel_scope.cancel()
    assert len(recorder.starts) == 300
    assert tasks < 50, tasks


@pytest.mark.asyncio
async def test_the_first_round_is_quick_and_later_rounds_spread_over_the_interval() -> None:
    # 200 checks every 2 s, their first round within 50 ms: later rounds must not repeat that
    # burst every interval, but start evenly through it, each keeping its own phase.
    done = anyio.Event()
    interval, count = 2.0, 200

    async def record(name: str) -> None:
        if sum(len(starts) >= 2 for starts in recorder.starts.values()) == count:
            done.set()

    recorder = _Recorder(record)
    scheduler = Scheduler(StateStore(), probes=recorder.table, startup_spread_seconds=0.05)
    config = _config({f"c{i}": _named(interval, 1, f"c{i}") for i in range(count)})
    await _run_until(scheduler, config, done, limit=15)
    first = [starts[0] for starts in recorder.starts.values()]
    second = [starts[1] for starts in recorder.starts.values()]
    origin = min(first)
    assert max(first) - origin < 0.05 + 0.05  # the spread, and a busy loop's latency
    # In the second round, the starts cover the interval: each tenth of it holds some.
    tenths = {int((start - origin - interval) / interval * 10) for start in second}
    assert tenths >= set(range(10)), sorted(tenths)
    # No gap between a check's first two runs reaches two intervals (staleness is three).
    assert all(0 < b - a < 2 * interval for a, b in zip(first, second, strict=True))
    # From then on each check keeps its phase: the phase within the interval is its name's.
    for name, starts in recorder.starts.items():
        expected = origin + phase_offset(name, interval, interval)
        assert abs((starts[1] - expected) - interval) < 0.1, name
