"""The state store: versions that follow what a snapshot says, stable identities, and staleness
that reaches the exports, down to a live scrape of a daemon whose event loop is blocked."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from healthd.exporters import status_file
from healthd.exporters.metrics import exposition
from healthd.model import ComponentState, Status
from healthd.state import StateStore
from tests.daemon import free_port, running_healthd
from tests.http_target import HttpTarget, Reply

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def measured(
    name: str, status: Status = H, *, checked_at: float = 1000.0, **fields: object
) -> ComponentState:
    """A state as the scheduler records it."""
    state = ComponentState(
        name=name, kind="http", critical=True, status=status, reason_code="ok",
        reason="GET / returned 200", latency_seconds=0.01, checked_at=checked_at, since=900.0,
        last_success_at=checked_at, consecutive_failures=0, consecutive_successes=5,
    )  # fmt: skip
    return replace(state, **fields)  # type: ignore[arg-type]


def test_version_changes_when_a_component_crosses_its_stale_bound_without_any_check() -> None:
    clock = Clock()
    store = StateStore(clock)
    store.record(measured("api"), stale_after_seconds=35)
    fresh = store.snapshot()

    clock.now = 1035.0  # exactly at the bound: still fresh
    at_bound = store.snapshot()
    clock.now = 1035.5
    crossed = store.snapshot()
    clock.now = 1090.0
    later = store.snapshot()

    assert at_bound.version == fresh.version
    assert crossed.version != fresh.version
    assert later.version == crossed.version
    stale = crossed.components["api"]
    assert (stale.status, stale.reason_code) == (U, "stale")
    assert stale.reason == "no check completed for more than 35 s; last result: GET / returned 200"
    assert crossed.overall is U
    assert later.components["api"] is stale
    assert later.generated_at == 1090.0


def test_a_fresh_result_repairs_a_stale_verdict_at_once() -> None:
    clock = Clock(2000.0)
    store = StateStore(clock)
    old = measured("api")
    store.record(old, stale_after_seconds=35)
    stale = store.snapshot()

    store.record(measured("api", checked_at=2000.0), stale_after_seconds=35)
    repaired = store.snapshot()

    assert stale.components["api"].reason_code == "stale"
    assert repaired.components["api"].reason_code == "ok"
    assert repaired.version != stale.version
    # The store keeps what was measured: the next check builds on it, not on the verdict.
    assert store.get("api") is not None
    assert store.get("api") is not stale.components["api"]


def test_unchanged_states_are_the_same_objects_in_every_snapshot() -> None:
    clock = Clock()
    store = StateStore(clock)
    api, db = measured("api", depends_on=("db",)), measured("db")
    store.record(api, stale_after_seconds=35)
    store.record(db, stale_after_seconds=35)
    first = store.snapshot()

    store.record(measured("db", U, reason_code="timeout"), stale_after_seconds=35)
    second = store.snapshot()
    store.probe_failed("probe_error")
    third = store.snapshot()

    assert first.components["api"] is api
    # api is healthy, so db's outage does not impact it: the object stays.
    assert second.components["api"] is api
    assert second.components["db"] is not first.components["db"]
    assert third.version != second.version
    assert third.components["db"] is second.components["db"]


def test_impacted_and_stale_variants_keep_their_identity_between_snapshots() -> None:
    clock = Clock()
    store = StateStore(clock)
    store.record(measured("db", checked_at=900.0), stale_after_seconds=35)
    store.record(measured("api", D, depends_on=("db",)), stale_after_seconds=35)
    first = store.snapshot()
    store.record(measured("cache"), stale_after_seconds=35)
    second = store.snapshot()

    assert first.components["db"].reason_code == "stale"
    assert first.components["api"].impacted_by == ("db",)
    assert second.version != first.version
    assert second.components["db"] is first.components["db"]
    assert second.components["api"] is first.components["api"]


def test_snapshots_between_changes_reuse_the_judgement() -> None:
    clock = Clock()
    store = StateStore(clock)
    for i in range(10_000):
        store.record(measured(f"c{i}", checked_at=1000.0 + i / 1000), stale_after_seconds=35)
    first = store.snapshot()

    clock.now = 1001.0
    again = store.snapshot()

    assert again.version == first.version
    assert again.components is first.components  # nothing was judged again
    assert again.generated_at == 1001.0


def test_removed_components_leave_the_snapshot() -> None:
    store = StateStore(Clock())
    store.record(measured("api"), stale_after_seconds=35)
    before = store.snapshot()

    store.remove("api")
    after = store.snapshot()

    assert "api" not in after.components
    assert after.version != before.version


def test_status_file_and_metrics_show_staleness_from_the_same_snapshot() -> None:
    clock = Clock()
    store = StateStore(clock)
    store.record(measured("db"), stale_after_seconds=35)
    store.record(measured("api", U, depends_on=("db",)), stale_after_seconds=35)
    clock.now = 1036.0
    snapshot = store.snapshot()

    doc = status_file.document(snapshot)
    text = exposition(snapshot, "test").decode()

    assert doc["components"]["db"]["reason_code"] == "stale"
    assert doc["components"]["api"]["impacted_by"] == ["db"]
    summary = status_file.document(snapshot, details="summary")["components"]["api"]
    assert summary["impacted_by"] == ["db"]
    assert 'healthd_component_status{component="db",kind="http"} 2.0' in text
    assert 'healthd_component_reason_info{component="db",reason_code="stale"} 1.0' in text
    assert 'healthd_component_impacted{component="api",root_cause="db"} 1.0' in text


# --- end to end -----------------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return str(response.read().decode())


def _until(condition: Callable[[], bool], timeout_seconds: float) -> bool:
    """Poll ``condition`` every 50 ms (each poll is a real scrape) until it holds."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_blocked_event_loop_turns_metrics_stale_within_a_second_of_the_bound(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    http_target.route("/health", Reply(body=b"ok"))
    stall = tmp_path / "stall"
    port = free_port()
    # 3 intervals plus the timeout: a stale bound of 1.15 s.
    bound_seconds = 1.15
    config = tmp_path / "healthd.toml"
    config.write_text(
        f"""
[daemon]
metrics_address = "127.0.0.1:{port}"
status_file = "{tmp_path / "status.json"}"
interval = "300ms"
timeout = "250ms"
startup_spread = "10ms"

[components.api]
kind = "http"
url = "{http_target.url("/health")}"
critical = true

[components.web]
kind = "http"
url = "{http_target.url("/health")}"
depends_on = ["api"]
"""
    )
    status = re.compile(r'^healthd_component_status\{component="api",kind="http"\} (\S+)$', re.M)
    checked = re.compile(
        r'^healthd_component_last_check_timestamp_seconds\{component="api"\} (\S+)$', re.M
    )
    stale_reason = 'healthd_component_reason_info{component="api",reason_code="stale"} 1.0'
    with running_healthd(
        config, env={"HEALTHD_TEST_STALL_FILE": str(stall)}, ready=True
    ) as healthd:
        assert _until(lambda: status.findall(_scrape(port)) == ["0.0"], 5)

        stall.touch()
        stalled_at = time.time()
        seen_at = None
        while time.time() < stalled_at + 10:
            text = _scrape(port)
            if status.findall(text) == ["2.0"] and stale_reason in text:
                seen_at = time.time()
                break
            time.sleep(0.05)
        assert seen_at is not None, text
        (last_check,) = (float(v) for v in checked.findall(text))
        assert seen_at - last_check <= bound_seconds + 1.0
        # A check in flight when the file appeared may still complete: allow its timeout.
        assert seen_at - stalled_at <= bound_seconds + 0.25 + 1.0
        assert "healthd_overall_status 2.0" in text
        # web's checks run at their own phase, so it may turn stale (and impacted) a moment
        # after api: within one more interval.
        impacted = 'healthd_component_impacted{component="web",root_cause="api"} 1.0'
        assert _until(lambda: impacted in _scrape(port), 2)

        stall.unlink()
        assert _until(lambda: status.findall(_scrape(port)) == ["0.0"], 10)
        assert "healthd_component_impacted{" not in _scrape(port)
        code = healthd.stop()
    assert code == 0
