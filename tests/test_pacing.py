"""Worker threads pause between slices of a render so that the event loop's thread gets the
GIL back (``healthd.pacing``): who is paced, when, and that every export's render is.

The clock is a fake one that moves on every reading, so a slice ends after a known number of
steps, whatever the machine's speed; the effect on start lateness is a bench row
(``bench/bench.py --only lateness``), not a timed test."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import anyio
import anyio.to_thread
import pytest

from healthd import pacing
from healthd.exporters.metrics import Exposition
from healthd.exporters.status_file import StatusDocument
from healthd.history import History
from healthd.model import ComponentState, DaemonStats, Snapshot, Status
from healthd.secrets import Redactor
from healthd.state import StateStore
from tests.daemon import in_process_daemon
from tests.http_target import TcpTarget

#: How far the fake clock moves at each reading: a tenth of a slice.
STEP_SECONDS = pacing.SLICE_SECONDS / 10


class _Clock:
    """``time`` as ``healthd.pacing`` sees it: readings step on, and pauses are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.rests: list[float] = []
        self._lock = threading.Lock()

    def perf_counter(self) -> float:
        with self._lock:
            self.now += STEP_SECONDS
            return self.now

    def sleep(self, seconds: float) -> None:
        self.rests.append(seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Clock]:
    fake = _Clock()
    monkeypatch.setattr(
        pacing, "time", SimpleNamespace(perf_counter=fake.perf_counter, sleep=fake.sleep)
    )
    yield fake
    pacing.disable()


def _in_worker(job: Callable[[], object]) -> None:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as exc:  # re-raised on the test's thread
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


def _pace_times(count: int) -> None:
    pace = pacing.pacer()
    for _ in range(count):
        pace()


def test_a_worker_rests_once_per_slice(clock: _Clock) -> None:
    pacing.enable()
    # Each call reads the clock once (a step); a slice is ten steps.
    _in_worker(lambda: _pace_times(95))
    assert len(clock.rests) == 9
    assert set(clock.rests) == {pacing.REST_SECONDS}


def test_the_loops_own_thread_never_rests(clock: _Clock) -> None:
    pacing.enable()
    _pace_times(100)
    assert clock.rests == []
    assert pacing.pacer() is pacing.pacer()  # the shared no-op: nothing to keep per job


def test_nothing_rests_while_pacing_is_off(clock: _Clock) -> None:
    _in_worker(lambda: _pace_times(100))
    pacing.enable()
    pacing.disable()
    _in_worker(lambda: _pace_times(100))
    assert clock.rests == []


def _state(name: str, checked_at: float) -> ComponentState:
    return ComponentState(
        name=name, kind="http", critical=False, status=Status.HEALTHY, reason_code="ok",
        reason="GET /health returned 200", latency_seconds=0.012, checked_at=checked_at,
        since=1_795_000_000.0, last_success_at=checked_at, consecutive_failures=0,
        consecutive_successes=3, details={"http_status": 200},
    )  # fmt: skip


def _snapshot(count: int, checked_at: float) -> Snapshot:
    components = {f"c{i:03d}": _state(f"c{i:03d}", checked_at) for i in range(count)}
    return Snapshot(1, checked_at, Status.HEALTHY, components, DaemonStats(checked_at))


def _status_file(directory: Path) -> None:
    StatusDocument().render(_snapshot(200, 1_795_000_001.0))


def _metrics(directory: Path) -> None:
    Exposition("1").render(_snapshot(200, 1_795_000_001.0))


def _history(directory: Path) -> None:
    recorder = History(
        directory / "history.db",
        StateStore(),
        Redactor(),
        retention_seconds=86400,
        export_path=directory / "history.json",
        clock=lambda: 1_795_000_100.0,
    )
    for i in range(200):
        recorder.check_completed(None, _state(f"c{i:03d}", 1_795_000_000.0))
    recorder.flush()  # writes the rows, then exports
    recorder.close()


EXPORTS: dict[str, Callable[[Path], None]] = {
    "status_file": _status_file,
    "metrics": _metrics,
    "history": _history,
}


@pytest.mark.parametrize("export", EXPORTS)
def test_every_export_rests_in_a_worker_and_never_on_the_loop(
    export: str, clock: _Clock, tmp_path: Path
) -> None:
    render = EXPORTS[export]
    (tmp_path / "loop").mkdir()
    (tmp_path / "worker").mkdir()
    pacing.enable()
    render(tmp_path / "loop")
    assert clock.rests == [], "the loop's thread rested"
    _in_worker(lambda: render(tmp_path / "worker"))
    assert len(clock.rests) >= 10, f"{export} rendered 200 components without resting"


def test_a_scrape_with_nothing_to_render_still_rests_between_families(clock: _Clock) -> None:
    # A family's text is a megabyte at 10,000 components: joining and compressing the cached
    # columns alone is work enough to make room for the loop between them.
    renderer, snapshot = Exposition("1"), _snapshot(200, 1_795_000_001.0)
    renderer.render(snapshot)
    pacing.enable()
    _in_worker(lambda: renderer.render(snapshot))
    assert renderer.rendered_components == 0
    assert len(clock.rests) >= 1


@pytest.mark.asyncio
async def test_the_daemon_paces_once_ready_and_not_after_it_stops(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    daemon = in_process_daemon(tmp_path, tcp_target.address)
    unpaced = pacing.pacer()

    async def worker_paces() -> bool:
        return await anyio.to_thread.run_sync(pacing.pacer) is not unpaced

    assert not await worker_paces()
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(15):
            while not await worker_paces():
                await anyio.sleep(0.02)
        assert (tmp_path / "status.json").exists(), "paced before the first write"
        assert pacing.pacer() is unpaced, "the loop's own thread is paced"
        tg.cancel_scope.cancel()
    assert not await worker_paces()
