"""History in SQLite: what is recorded, how time is credited, and that a broken database never
stops the checks. The database is always a real file; failures are real (a corrupt file, a lock
held by another connection, a read-only or full filesystem)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from healthd import history
from healthd.exporters import status_file
from healthd.history import History
from healthd.model import ComponentState, Status
from healthd.secrets import Redactor
from healthd.state import StateStore
from tests.daemon import daemon_settings, free_port, healthd_cli, running_healthd, write_config
from tests.http_target import HttpTarget, Reply
from tests.probing import make_state

T0 = 1_764_000_000.0  # 2025-11-24T16:00:00Z, the start of an hour
SECRET = "hunter2-very-secret"


def _state(name: str, status: Status, at: float, reason: str = "fine") -> ComponentState:
    code = "ok" if status is Status.HEALTHY else "connection_refused"
    return make_state(
        name,
        status,
        kind="http",
        critical=True,
        reason_code=code,
        reason=reason,
        checked_at=at,
        since=at,
        checks_total={"success": 1},
    )


class _Run:
    """Feeds ``History.check_completed`` a sequence of checks, each given the one before."""

    def __init__(self, recorder: History) -> None:
        self.recorder = recorder
        self.last: dict[str, ComponentState] = {}

    def check(self, name: str, status: Status, at: float, reason: str = "fine") -> None:
        state = _state(name, status, at, reason)
        self.recorder.check_completed(self.last.get(name), state)
        self.last[name] = state


def _history(
    tmp_path: Path, db: Path | None = None, **kwargs: object
) -> tuple[History, StateStore]:
    store = StateStore()
    recorder = History(
        db or tmp_path / "history.db",
        store,
        Redactor([SECRET]),
        retention_seconds=90 * 86400,
        export_path=tmp_path / "history.json",
        clock=lambda: T0 + 7200,
        **kwargs,  # type: ignore[arg-type]
    )
    recorder._max_gap = {"api": 60.0, "db": 60.0}
    return recorder, store


def _report(path: Path, since: float = T0 - 3600, until: float = T0 + 86400) -> dict[str, object]:
    db = history.open_read_only(path)
    try:
        return history.report(db, since, until)
    finally:
        db.close()


def _api_report(tmp_path: Path, since: float = T0 - 3600, until: float = T0 + 86400) -> Any:
    """The report's entry for component "api", from the database in ``tmp_path``."""
    api = _report(tmp_path / "history.db", since, until)["api"]
    assert isinstance(api, dict)
    return api


def test_transitions_and_time_per_status_are_recorded(tmp_path: Path) -> None:
    recorder, _ = _history(tmp_path)
    run = _Run(recorder)
    for i in range(10):  # healthy 0-9 s, unhealthy from 10 s, healthy again from 20 s
        run.check("api", Status.HEALTHY, T0 + i)
    for i in range(10, 20):
        run.check("api", Status.UNHEALTHY, T0 + i, reason=f"refused, password {SECRET}")
    for i in range(20, 31):
        run.check("api", Status.HEALTHY, T0 + i)
    recorder.flush()

    api = _api_report(tmp_path)
    # Time between two checks goes to the status reported during it: 10 s unhealthy of 30.
    assert api["seconds"] == {"healthy": 20.0, "degraded": 0.0, "unhealthy": 10.0, "maintenance": 0}
    assert api["uptime"] == pytest.approx(2 / 3)
    assert api["checks"] == {"healthy": 21, "degraded": 0, "unhealthy": 10}
    changes = [(t["previous_status"], t["status"]) for t in api["transitions"]]
    assert changes == [(None, "healthy"), ("healthy", "unhealthy"), ("unhealthy", "healthy")]
    assert api["transitions"][1]["reason"] == "refused, password <redacted>"
    raw = (tmp_path / "history.db").read_bytes()
    assert SECRET.encode() not in raw


def test_time_is_split_at_hour_boundaries_and_gaps_are_capped(tmp_path: Path) -> None:
    recorder, _ = _history(tmp_path)
    run = _Run(recorder)
    run.check("api", Status.HEALTHY, T0 - 10)
    run.check("api", Status.HEALTHY, T0 + 20)  # 10 s in the hour before, 20 s in this one
    run.check("api", Status.UNHEALTHY, T0 + 1000)  # a stall: only 60 s (the cap) is checked
    recorder.flush()

    before = _api_report(tmp_path, T0 - 3600, T0)
    during = _api_report(tmp_path, T0, T0 + 3600)
    assert before["seconds"]["healthy"] == 10.0
    assert during["seconds"]["healthy"] == 80.0


def test_a_restart_keeps_history_and_repeats_no_transition(tmp_path: Path) -> None:
    first, _ = _history(tmp_path)
    run = _Run(first)
    run.check("api", Status.HEALTHY, T0)
    run.check("api", Status.UNHEALTHY, T0 + 1)
    run.check("api", Status.UNHEALTHY, T0 + 2)
    first.close()

    second, _ = _history(tmp_path)  # a new daemon: no previous state in memory
    run = _Run(second)
    run.check("api", Status.UNHEALTHY, T0 + 100)  # the same status: not a transition
    run.check("api", Status.HEALTHY, T0 + 101)
    second.close()

    api = _api_report(tmp_path)
    changes = [(t["previous_status"], t["status"]) for t in api["transitions"]]
    assert changes == [(None, "healthy"), ("healthy", "unhealthy"), ("unhealthy", "healthy")]
    # Downtime of the daemon (T0+2 to T0+100) is neither up nor down.
    assert api["seconds"]["unhealthy"] == 2.0
    assert api["seconds"]["healthy"] == 1.0


def test_history_json_has_daily_uptime_and_incidents(tmp_path: Path) -> None:
    recorder, _ = _history(tmp_path)
    run = _Run(recorder)
    run.check("api", Status.HEALTHY, T0)
    run.check("api", Status.UNHEALTHY, T0 + 30, reason=f"down, token {SECRET}")
    run.check("api", Status.UNHEALTHY, T0 + 40)
    run.check("api", Status.HEALTHY, T0 + 60)
    run.check("db", Status.UNHEALTHY, T0)
    run.check("db", Status.UNHEALTHY, T0 + 10)
    recorder._components = ("api", "db", "new")
    recorder.flush()

    raw = (tmp_path / "history.json").read_text()
    assert SECRET not in raw
    doc = json.loads(raw)
    assert (doc["days"], doc["first_day"]) == (90, "2025-08-27")
    api, db, new = (doc["components"][n] for n in ("api", "db", "new"))
    assert len(api["daily_uptime"]) == 90
    assert api["daily_uptime"][-1] == pytest.approx(0.5)
    assert api["daily_uptime"][:-1] == [None] * 89
    assert api["incidents"] == [
        {
            "start": "2025-11-24T16:00:30.000Z",
            "end": "2025-11-24T16:01:00.000Z",
            "duration_seconds": 30.0,
            "status": "unhealthy",
            "reason_code": "connection_refused",
            "reason": "down, token <redacted>",
        }
    ]
    assert db["incidents"][0]["end"] is None  # still going on
    assert db["incidents"][0]["duration_seconds"] == 7200.0
    assert new == {"daily_uptime": [None] * 90, "incidents": []}


def test_history_json_renders_again_only_the_components_whose_history_changed(
    tmp_path: Path,
) -> None:
    """An export renders a component's entry again only when its uptime share, its incidents
    or an open incident's duration changed; the file is byte for byte the whole document."""
    now = [T0 + 600]
    redactor = Redactor([SECRET])
    recorder = History(
        tmp_path / "history.db",
        StateStore(),
        redactor,
        retention_seconds=90 * 86400,
        export_path=tmp_path / "history.json",
        clock=lambda: now[0],
    )
    names = [f"c{i:02d}" for i in range(20)]
    recorder._components = (*names, "new")
    recorder._max_gap = dict.fromkeys(names, 60.0)
    run = _Run(recorder)

    def export() -> int:
        recorder.flush()
        db = history.open_read_only(tmp_path / "history.db")
        try:
            whole = history.export_document(db, recorder._components, now[0])
        finally:
            db.close()
        assert (tmp_path / "history.json").read_bytes() == status_file.render(
            redactor.scrub_tree(whole)
        )
        return recorder._export.rendered_components

    for at in (T0, T0 + 30):
        for name in names:
            run.check(name, Status.HEALTHY, at)
    run.check("c03", Status.UNHEALTHY, T0 + 40, reason=f"down, token {SECRET}")
    assert export() == 21
    # Entries alike are kept once: the healthy ones, c03, and "new" (never checked).
    values = [entry[-1] for entry in recorder._export._entries.values()]
    assert len({id(value) for value in values}) == len(set(values)) == 3
    # Each entry is one flat tuple: nesting the key's tuple kept the entry in the collector's
    # sight for minutes in the daemon, whose young collections often looked at the outer tuple
    # before the inner one (docs/performance.md). Only c03's holds a tuple: its incidents.
    entries = recorder._export._entries.items()
    assert [name for name, entry in entries if any(type(v) is tuple and v for v in entry)] == [
        "c03"
    ]

    now[0] += 60  # a round of checks that changes no share: only c03's open incident grew
    for name in names:
        run.check(name, Status.UNHEALTHY if name == "c03" else Status.HEALTHY, T0 + 60)
    assert export() == 1

    now[0] += 60  # c05 goes down: its share and incidents change
    run.check("c05", Status.UNHEALTHY, T0 + 70)
    assert export() == 2

    now[0] += 86400  # a new day: the window moved, every entry is new
    assert export() == 21


def test_summary_mode_leaves_reasons_out_of_history_json(tmp_path: Path) -> None:
    recorder, _ = _history(tmp_path, details="summary")
    recorder._components = ("api",)
    run = _Run(recorder)
    run.check("api", Status.UNHEALTHY, T0, reason="connect to 10.1.2.3:5432 refused")
    recorder.flush()
    incident = json.loads((tmp_path / "history.json").read_text())["components"]["api"]
    assert "reason" not in incident["incidents"][0]
    assert incident["incidents"][0]["reason_code"] == "connection_refused"


def test_transitions_are_bounded_per_component(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "MAX_TRANSITIONS_PER_COMPONENT", 5)
    recorder, _ = _history(tmp_path)
    run = _Run(recorder)
    for i in range(20):
        run.check("api", Status.HEALTHY if i % 2 else Status.UNHEALTHY, T0 + i)
    recorder.flush()
    recorder._next_prune = 0
    recorder.flush()
    api = _api_report(tmp_path)
    assert api["transitions"][0]["at"] == "2025-11-24T16:00:15.000Z"
    assert len(api["transitions"]) == 5


# --- a broken database never stops the checks ----------------------------------------------


def _failures(store: StateStore) -> int:
    return store.daemon().history_write_failures_total


def _assert_fails_then_keeps_going(
    recorder: History, store: StateStore, caplog: pytest.LogCaptureFixture
) -> _Run:
    run = _Run(recorder)
    with caplog.at_level(logging.INFO, logger="healthd.history"):
        for i in range(3):
            run.check("api", Status.HEALTHY, T0 + i)
            recorder.flush()  # never raises
    assert _failures(store) == 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "logged once, not once per attempt"
    assert "cannot write history" in errors[0].getMessage()
    return run


def test_a_corrupt_database_is_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "history.db").write_bytes(b"this is not a database " * 100)
    recorder, store = _history(tmp_path)
    _assert_fails_then_keeps_going(recorder, store, caplog)


def test_a_locked_database_fails_then_catches_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "_BUSY_TIMEOUT_MS", 100)
    recorder, store = _history(tmp_path)
    recorder.flush()  # create it
    other = sqlite3.connect(tmp_path / "history.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        run = _assert_fails_then_keeps_going(recorder, store, caplog)
    finally:
        other.execute("ROLLBACK")
        other.close()
    with caplog.at_level(logging.INFO, logger="healthd.history"):
        recorder.flush()
    assert "being written again" in caplog.text
    api = _api_report(tmp_path)
    assert api["checks"]["healthy"] == 3, "the rows pending during the lock were kept"
    assert run.last["api"].checked_at == T0 + 2


@contextmanager
def _read_only_directory(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o755)
        return
    # root ignores permissions: mount a read-only filesystem instead.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_read_only_directory_is_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _read_only_directory(tmp_path) as directory:
        recorder, store = _history(tmp_path, db=directory / "history.db")
        _assert_fails_then_keeps_going(recorder, store, caplog)


def test_a_full_filesystem_is_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "small"
    directory.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], check=False
        ).returncode
    ):
        pytest.skip("needs root and the right to mount a small tmpfs")
    try:
        (directory / "filler").write_bytes(b"x" * (60 * 1024))
        recorder, store = _history(tmp_path, db=directory / "history.db")
        _assert_fails_then_keeps_going(recorder, store, caplog)
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_daily_uptime_reads_settled_days_once_and_recent_days_every_time(
    tmp_path: Path,
) -> None:
    recorder, _ = _history(tmp_path)
    run = _Run(recorder)
    day = 86400
    for at in (T0 - 3 * day, T0 - 3 * day + 10, T0 - 3 * day + 20):  # 3 days ago: healthy
        run.check("api", Status.HEALTHY, at)
    run.check("api", Status.HEALTHY, T0)
    run.check("api", Status.UNHEALTHY, T0 + 10)
    recorder.flush()
    db = history.open_read_only(tmp_path / "history.db")
    cache: history.DailyCache = {}
    _, cold = history.daily_uptime(db, T0 + 100, cache=cache)
    (api_id,) = cold
    assert cold[api_id][-4:] == [1.0, None, None, 1.0]
    assert T0 // day - 3 in cache
    run.check("api", Status.UNHEALTHY, T0 + 20)  # today changes
    recorder.flush()
    _, warm = history.daily_uptime(db, T0 + 100, cache=cache)
    assert warm[api_id][-4:] == [1.0, None, None, 0.5]
    db.close()


def test_observe_never_touches_the_database(tmp_path: Path) -> None:
    """The loop's side only counts in memory: with the database locked it returns at once."""
    recorder, store = _history(tmp_path)
    recorder.flush()
    other = sqlite3.connect(tmp_path / "history.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        run = _Run(recorder)
        for i in range(1000):
            run.check("api", Status.HEALTHY, T0 + i)
        assert _failures(store) == 0
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_slo_must_lie_strictly_between_0_and_1(tmp_path: Path) -> None:
    for bad in ("1.0", "0", "99.9"):
        config = tmp_path / "healthd.toml"
        config.write_text(
            f'[daemon]\nstatus_file = "{tmp_path}/s.json"\n\n[components.api]\n'
            f'kind = "tcp"\naddress = "127.0.0.1:1"\nslo = {bad}\n'
        )
        checked = healthd_cli("--config", str(config), "config", "validate")
        assert checked.returncode == 78
        assert "slo" in checked.stderr
        assert checked.stderr.count("\n") == 1, checked.stderr


def test_since_accepts_minutes_hours_days_and_weeks() -> None:
    assert history.parse_since("30m") == 1800
    assert history.parse_since("24h") == 86400
    assert history.parse_since("7d") == 7 * 86400
    assert history.parse_since("2w") == 14 * 86400
    for bad in ("", "7", "0d", "1y", "-1h"):
        with pytest.raises(ValueError, match="bad --since"):
            history.parse_since(bad)


# --- a real daemon, restarted in the middle -------------------------------------------------


def _wait_for_file(
    path: Path, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if predicate(doc):
                return doc
        time.sleep(0.05)
    raise AssertionError(f"{path} never matched; last: {doc}")


def _api_status(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: doc["components"]["api"]["status"] == status


def test_history_survives_a_restart_and_the_cli_reports_it(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    status = tmp_path / "status.json"
    config = write_config(
        tmp_path / "healthd.toml",
        daemon_settings(tmp_path, interval="1s", timeout="900ms"),
        {"api": {"kind": "http", "url": http_target.url(f"/health?token={SECRET}"),
                 "critical": True, "failure_threshold": 1, "recovery_threshold": 1,
                 "slo": 0.99}},
    )  # fmt: skip
    env = {"HEALTHD_TEST_SECRET": SECRET}
    started = time.time()
    with running_healthd(config, env=env, ready=True) as healthd:
        _wait_for_file(status, _api_status("healthy"))
        http_target.default = Reply(status=503, body=b"down")
        _wait_for_file(status, _api_status("unhealthy"))
        code = healthd.stop()
        assert code == 0
    stopped = time.time()
    with running_healthd(config, env=env, ready=True) as healthd:
        restarted = time.time()
        http_target.default = Reply()
        _wait_for_file(status, _api_status("healthy"))
        # The CLI reads the database while the daemon runs; the transition is written promptly.
        deadline = time.monotonic() + 10
        while True:
            shown = healthd_cli("--config", str(config), "history", "--json")
            assert shown.returncode == 0, shown.stderr
            api = json.loads(shown.stdout)["components"]["api"]
            if len(api["transitions"]) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        history_json = _wait_for_file(
            tmp_path / "history.json",
            lambda d: d["components"]["api"]["incidents"][0]["end"] is not None,
        )
        with urllib.request.urlopen(_metrics_url(config), timeout=5) as response:  # noqa: S310
            metrics = response.read().decode()
        text = healthd_cli("--config", str(config), "history", "api", "--since", "1h")
        healthd.stop()
    finished = time.time()

    changes = [(t["previous_status"], t["status"]) for t in api["transitions"]]
    # Normally three transitions; a loaded machine may add a failed first check before them.
    assert changes[-2:] == [("healthy", "unhealthy"), ("unhealthy", "healthy")], api
    assert changes[0][0] is None
    # Each transition changes the status: the restart (unhealthy before and after) added none.
    assert all(before != after for before, after in changes[1:]), changes
    assert all(changes[i][1] == changes[i + 1][0] for i in range(len(changes) - 1)), changes
    assert api["transitions"][-2]["reason_code"] == "http_status"
    seconds = api["seconds"]
    checked = seconds["healthy"] + seconds["degraded"] + seconds["unhealthy"]
    assert 0 < api["uptime"] < 1
    assert api["uptime"] == pytest.approx((seconds["healthy"] + seconds["degraded"]) / checked)
    # The restart's downtime is not checked time.
    assert checked < (finished - started) - (restarted - stopped) + 0.5
    incident = history_json["components"]["api"]["incidents"][0]
    assert incident["reason_code"] == "http_status"
    assert incident["duration_seconds"] > restarted - stopped, "the incident spans the restart"
    assert "healthd_history_write_failures_total 0.0" in metrics
    assert 'healthd_component_slo_objective{component="api"} 0.99' in metrics
    assert text.returncode == 0
    assert "unhealthy -> healthy" in text.stdout
    for output in (shown.stdout, text.stdout, (tmp_path / "history.json").read_text()):
        assert SECRET not in output
    assert SECRET.encode() not in (tmp_path / "history.db").read_bytes()


def _metrics_url(config: Path) -> str:
    address = next(
        line.split('"')[1] for line in config.read_text().splitlines() if "metrics_address" in line
    )
    return f"http://{address}/metrics"


def test_the_cli_says_when_there_is_no_history(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "healthd.toml",
        {"status_file": str(tmp_path / "status.json")},
        # A config without components is invalid everywhere, so it has one it never ran.
        {"api": {"kind": "tcp", "address": "127.0.0.1:1"}},
    )
    shown = healthd_cli("--config", str(config), "history")
    assert shown.returncode == 66
    assert "no history database" in shown.stderr
    bad = healthd_cli("--config", str(config), "history", "--since", "1y")
    assert bad.returncode == 64
    assert "bad --since" in bad.stderr


def test_a_reload_changes_objectives_and_the_components_in_history_json(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    port = free_port()
    settings = daemon_settings(tmp_path, port, interval="1s", timeout="900ms")
    api = {"kind": "http", "url": http_target.url("/"), "slo": 0.99}
    config = write_config(tmp_path / "healthd.toml", settings, {"api": api})
    with running_healthd(config, ready=True) as healthd:
        _wait_for_file(tmp_path / "history.json", lambda d: set(d["components"]) == {"api"})
        write_config(
            config,
            settings,
            {"api": {**api, "slo": 0.999}, "db": {"kind": "tcp", "address": "127.0.0.1:1"}},
        )
        healthd.signal(signal.SIGHUP)
        healthd.wait_for("RELOADING", "1")
        _wait_for_file(tmp_path / "history.json", lambda d: set(d["components"]) == {"api", "db"})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
    objectives = [line for line in metrics.splitlines() if line.startswith("healthd_component_slo")]
    assert objectives == ['healthd_component_slo_objective{component="api"} 0.999']
