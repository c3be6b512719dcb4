"""Maintenance: window arithmetic, config validation, the judgement, and the control socket."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from healthd.classify import judge_world, next_state
from healthd.config import ConfigError, load
from healthd.maintenance import Window, active, parse_weekly
from healthd.model import ComponentState, Finding, Maintenance, Observation, Snapshot, Status
from healthd.state import StateStore
from tests.daemon import free_port, healthd_cli, running_healthd
from tests.probing import make_check


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- window arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weekly", "zone", "now", "until"),
    [
        # 2026-11-29 is a Sunday.
        ("Sun 02:00-03:00", "UTC", "2026-11-29T02:30:00Z", "2026-11-29T03:00:00Z"),
        ("Sun 02:00-03:00", "UTC", "2026-11-29T03:00:00Z", None),
        ("Sun 02:00-03:00", "UTC", "2026-11-29T01:59:59Z", None),
        # Across midnight: Saturday 23:00 to Sunday 01:00, seen from both days.
        ("Sat 23:00-01:00", "UTC", "2026-11-28T23:30:00Z", "2026-11-29T01:00:00Z"),
        ("Sat 23:00-01:00", "UTC", "2026-11-29T00:30:00Z", "2026-11-29T01:00:00Z"),
        ("Sat 23:00-01:00", "UTC", "2026-11-29T01:00:00Z", None),
        # Across the week's end: Sunday night into Monday.
        ("Sun 23:00-Mon 01:00", "UTC", "2026-11-30T00:10:00Z", "2026-11-30T01:00:00Z"),
        # Local time in a zone: 02:00 Berlin is 01:00 UTC in winter.
        ("Sun 02:00-03:00", "Europe/Berlin", "2026-11-29T01:30:00Z", "2026-11-29T02:00:00Z"),
        # The night Berlin goes to summer time (2026-03-29): 01:30-04:00 local is 1.5 hours.
        ("Sun 01:30-04:00", "Europe/Berlin", "2026-03-29T01:45:00Z", "2026-03-29T02:00:00Z"),
        # The night it goes back (2026-10-25): 01:30-04:00 local is 3.5 hours.
        ("Sun 01:30-04:00", "Europe/Berlin", "2026-10-25T02:45:00Z", "2026-10-25T03:00:00Z"),
        ("Sun 01:30-04:00", "Europe/Berlin", "2026-10-24T23:29:00Z", None),
    ],
)  # fmt: skip
def test_weekly_window_is_active_in_its_local_hours(
    weekly: str, zone: str, now: str, until: str | None
) -> None:
    window = Window(("db",), "upgrade", "config", weekly=parse_weekly(weekly, zone))
    found, _ = active([window], ts(now))
    assert (found["db"].until if "db" in found else None) == (ts(until) if until else None)


def test_next_boundary_is_the_next_start_or_end() -> None:
    window = Window(("db",), "upgrade", "config", weekly=parse_weekly("Sat 23:00-01:00"))
    _, boundary = active([window], ts("2026-11-28T12:00:00+00:00"))
    assert boundary == ts("2026-11-28T23:00:00+00:00")
    _, boundary = active([window], ts("2026-11-28T23:00:00+00:00"))
    assert boundary == ts("2026-11-29T01:00:00+00:00")
    fixed = Window(("db",), "once", "cli", 100.0, 200.0)
    assert active([fixed], 50.0) == ({}, 100.0)
    assert active([fixed], 250.0) == ({}, math.inf)


@pytest.mark.parametrize(
    "text", ["Sun 02:00", "Sun 25:00-26:00", "Xyz 01:00-02:00", "Sun 02:00-02:00", "02:00-03:00"]
)
def test_bad_weekly_windows_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="weekly"):
        parse_weekly(text)


# --- config ---------------------------------------------------------------------------------

_BASE = """\
[components.db]
kind = "tcp"
address = "127.0.0.1:5432"

"""


def write(tmp_path: Path, tables: str) -> Path:
    path = tmp_path / "healthd.toml"
    path.write_text(_BASE + tables, encoding="utf-8")
    return path


def test_scheduled_windows_load_as_windows(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            '[[maintenance]]\ncomponents = ["db"]\nreason = "upgrade"\n'
            "start = 2026-11-29T02:00:00Z\nend = 2026-11-29T04:00:00+01:00\n\n"
            '[[maintenance]]\ncomponents = ["db"]\nreason = "vacuum"\n'
            'weekly = "Sat 23:00-01:00"\ntimezone = "Europe/Berlin"\n',
        )
    )
    fixed, weekly = config.windows()
    assert (fixed.start, fixed.end) == (ts("2026-11-29T02:00:00Z"), ts("2026-11-29T03:00:00Z"))
    assert weekly.weekly == parse_weekly("Sat 23:00-01:00", "Europe/Berlin")
    assert (fixed.source, weekly.reason) == ("config", "vacuum")


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        (
            '[[maintenance]]\ncomponents = ["nope"]\nreason = "x"\nweekly = "Sun 02:00-03:00"\n',
            "healthd.toml:6: maintenance.0.components: no component named 'nope'",
        ),
        (
            '[[maintenance]]\ncomponents = ["db"]\nreason = "x"\n'
            "start = 2026-11-29T03:00:00Z\nend = 2026-11-29T02:00:00Z\n",
            "healthd.toml:9: maintenance.0.end: end must be after start",
        ),
        (
            '[[maintenance]]\ncomponents = ["db"]\nreason = "x"\n'
            "start = 2026-11-29T03:00:00\nend = 2026-11-29T04:00:00Z\n",
            "healthd.toml:8: maintenance.0.start: start needs a UTC offset (RFC 3339), such as 'Z'",
        ),
        (
            '[[maintenance]]\ncomponents = ["db"]\nreason = "x"\nweekly = "Sun 2am"\n',
            "healthd.toml:8: maintenance.0.weekly: weekly 'Sun 2am': expected 'DAY HH:MM-HH:MM', "
            "such as 'Sun 02:00-03:00'",
        ),
        (
            '[[maintenance]]\ncomponents = ["db"]\nreason = "x"\nweekly = "Sun 02:00-03:00"\n'
            'timezone = "Mars/Olympus"\n',
            "healthd.toml:9: maintenance.0.timezone: unknown time zone 'Mars/Olympus'; use a "
            "zoneinfo name",
        ),
        (
            '[[maintenance]]\ncomponents = ["db"]\nreason = "x"\n',
            "healthd.toml:5: maintenance.0: needs start and end, or weekly",
        ),
        (
            '[[maintenance]]\ncomponents = ["db"]\nreason = "x"\nweekly = "Sun 02:00-03:00"\n'
            "start = 2026-11-29T03:00:00Z\n",
            "healthd.toml:5: maintenance.0: give either start and end, or weekly, not both",
        ),
        (
            '[[maintenance]]\ncomponents = []\nreason = "x"\nweekly = "Sun 02:00-03:00"\n',
            "healthd.toml:6: maintenance.0.components: Tuple should have at least 1 item after "
            "validation, not 0",
        ),
    ],
)
def test_bad_maintenance_window_names_file_key_and_line(
    tmp_path: Path, tables: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, tables))
    assert caught.value.problems == [f"{tmp_path}/{expected}"]


# --- judgement ------------------------------------------------------------------------------

CHECK = make_check("tcp", address="127.0.0.1:1", critical=True)
DOWN = Finding(Status.UNHEALTHY, "connection_refused", "connect: connection refused")
UP = Finding(Status.HEALTHY, "ok", "connected")


def measured(name: str, finding: Finding, now: float, **extra: Any) -> ComponentState:
    check = dataclasses.replace(CHECK, **extra)
    return next_state(
        None, name=name, check=check, finding=finding, observation=Observation(0.01), now=now
    )


def test_component_in_maintenance_is_left_out_of_the_overall_verdict() -> None:
    states = {"db": measured("db", DOWN, 1000.0), "api": measured("api", UP, 1000.0)}
    limits = {"db": 100.0, "api": 100.0}
    window = Window(("db",), "upgrade", "cli", 900.0, 1100.0)
    world = judge_world(states, limits, 1010.0, None, (window,))
    assert world.overall is Status.HEALTHY
    assert world.components["db"].status is Status.UNHEALTHY  # still measured
    assert world.components["db"].maintenance == Maintenance(1100.0, "upgrade", "cli")
    assert world.components["api"].maintenance is None
    after = judge_world(states, limits, 1100.0, world, (window,))
    assert after.overall is Status.UNHEALTHY
    assert after.components["db"].maintenance is None


def test_root_cause_in_maintenance_still_explains_its_dependents() -> None:
    states = {
        "db": measured("db", DOWN, 1000.0),
        "api": measured("api", DOWN, 1000.0, depends_on=("db",)),
    }
    limits = {"db": 100.0, "api": 100.0}
    window = Window(("db",), "upgrade", "config", 900.0, 1100.0)
    world = judge_world(states, limits, 1010.0, None, (window,))
    # The API is impacted by a root cause in maintenance: the rules page neither.
    assert world.components["api"].impacted_by == ("db",)
    assert world.components["db"].maintenance is not None
    again = judge_world(states, limits, 1020.0, world, (window,))
    assert not again.changed
    assert again.components["api"] is world.components["api"]
    assert again.components["db"] is world.components["db"]


def test_snapshot_version_changes_when_a_window_starts_and_ends_without_a_check() -> None:
    now = [1000.0]
    store = StateStore(clock=lambda: now[0])

    def snapshot_at(seconds: float) -> Snapshot:
        now[0] = seconds
        return store.snapshot()

    store.record(measured("db", DOWN, 1000.0), stale_after_seconds=10_000.0)
    store.set_windows((Window(("db",), "upgrade", "cli", 1050.0, 1100.0),))
    before = store.snapshot()
    assert before.overall is Status.UNHEALTHY
    assert snapshot_at(1049.0).version == before.version
    during = snapshot_at(1050.0)
    assert during.version > before.version
    assert during.overall is Status.HEALTHY
    assert during.components["db"].maintenance == Maintenance(1100.0, "upgrade", "cli")
    assert snapshot_at(1070.0).version == during.version
    after = snapshot_at(1100.0)
    assert after.version > during.version
    assert after.overall is Status.UNHEALTHY
    assert after.components["db"].maintenance is None


def test_weekly_window_in_a_store_turns_on_at_its_local_start() -> None:
    start = ts("2026-11-28T22:00:00+00:00")  # Sat 23:00 in Berlin
    now = [start - 1]
    store = StateStore(clock=lambda: now[0])
    store.record(measured("db", DOWN, now[0]), stale_after_seconds=1e9)
    weekly = parse_weekly("Sat 23:00-01:00", "Europe/Berlin")
    store.set_windows((Window(("db",), "vacuum", "config", weekly=weekly),))
    assert store.snapshot().components["db"].maintenance is None
    now[0] = start
    assert store.snapshot().components["db"].maintenance == Maintenance(
        start + 7200, "vacuum", "config"
    )
    assert datetime.fromtimestamp(start + 7200, UTC).hour == 0


# --- the daemon and its control socket ------------------------------------------------------


def _daemon_config(tmp_path: Path, metrics_port: int) -> Path:
    path = tmp_path / "healthd.toml"
    path.write_text(
        f"""
[daemon]
metrics_address = "127.0.0.1:{metrics_port}"
status_file = "{tmp_path}/status.json"
control_socket = "{tmp_path}/control.sock"
status_file_refresh = "0.2s"
status_file_min_interval = "0.1s"
interval = "1s"

[components.db]
kind = "tcp"
address = "127.0.0.1:{free_port()}"
critical = true
failure_threshold = 1
"""
    )
    return path


def _status(tmp_path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((tmp_path / "status.json").read_text())
    return document


def _wait_status(tmp_path: Path, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The status document once ``test`` holds (rewritten every 0.2 s here)."""
    deadline = time.monotonic() + 10
    while True:
        document = _status(tmp_path)
        if test(document) or time.monotonic() > deadline:
            return document
        time.sleep(0.05)


def _in_maintenance(document: dict[str, Any]) -> bool:
    return "maintenance" in document["components"]["db"]


def test_maintenance_from_the_cli_survives_a_restart_and_ends(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = _daemon_config(tmp_path, metrics_port)
    cli = ("--config", str(config))
    with running_healthd(config, ready=True) as healthd:
        assert _status(tmp_path)["status"] == "unhealthy"
        started = healthd_cli("maintenance", "start", "db", "--for", "30m", "--reason",
                              "disk swap", *cli)  # fmt: skip
        assert started.returncode == 0, started.stderr
        document = _wait_status(tmp_path, _in_maintenance)
        entry = document["components"]["db"]
        assert entry["status"] == "unhealthy"  # still checked and measured
        assert entry["maintenance"]["source"] == "cli"
        assert entry["maintenance"]["reason"] == "disk swap"
        until = datetime.fromisoformat(entry["maintenance"]["until"]).timestamp()
        assert 29 * 60 < until - time.time() <= 30 * 60
        assert document["status"] != "unhealthy"
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'healthd_component_maintenance{component="db"} 1.0' in metrics
        listed = healthd_cli("maintenance", "list", "--json", *cli)
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert (row["component"], row["source"], row["reason"]) == ("db", "cli", "disk swap")
        assert oct(os.stat(tmp_path / "control.sock").st_mode & 0o777) == "0o660"
        code = healthd.stop()
        assert code == 0
    with running_healthd(config, ready=True) as healthd:
        document = _wait_status(tmp_path, _in_maintenance)
        assert document["components"]["db"]["maintenance"]["reason"] == "disk swap"
        assert document["status"] != "unhealthy"
        ended = healthd_cli("maintenance", "end", "db", *cli)
        assert ended.returncode == 0, ended.stderr
        assert ended.stdout.strip() == "ended: db"
        document = _wait_status(tmp_path, lambda d: not _in_maintenance(d))
        assert not _in_maintenance(document)
        assert document["status"] == "unhealthy"
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert "healthd_component_maintenance{" not in metrics
        assert json.loads(healthd_cli("maintenance", "list", "--json", *cli).stdout) == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"op": "start", "components": ["db"], "seconds": -1, "reason": "x"}\n',
        b'{"op": "start", "components": ["nope"], "seconds": 60, "reason": "x"}\n',
        b'{"op": "start", "components": ["db"], "seconds": 60, "reason": ""}\n',
        b'{"op": "reboot"}\n',
        b"x" * (70 * 1024),
    ],
)
def test_bad_control_requests_get_an_error_and_change_nothing(
    tmp_path: Path, request_bytes: bytes
) -> None:
    config = _daemon_config(tmp_path, free_port())
    with running_healthd(config, ready=True):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(tmp_path / "control.sock"))
            with contextlib.suppress(OSError):
                sock.sendall(request_bytes)
            reply = json.loads(sock.makefile("rb").readline())
        assert reply["ok"] is False
        assert reply["error"]
        # Still serving: a good request after the bad one works.
        listed = healthd_cli("maintenance", "list", "--json", "--config", str(config))
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        assert not _in_maintenance(_status(tmp_path))


def test_maintenance_cli_without_a_daemon_says_so(tmp_path: Path) -> None:
    config = _daemon_config(tmp_path, free_port())
    result = healthd_cli("maintenance", "list", "--config", str(config))
    assert result.returncode == 69
    assert "cannot reach healthd" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_shows_a_scheduled_window(tmp_path: Path) -> None:
    config = _daemon_config(tmp_path, free_port())
    config.write_text(
        config.read_text()
        + '\n[[maintenance]]\ncomponents = ["db"]\nreason = "yearly"\n'
        + "start = 2000-01-01T00:00:00Z\nend = 2100-01-01T00:00:00Z\n"
    )
    table = healthd_cli("check", "--config", str(config))
    assert "unhealthy (maintenance)" in table.stdout
    assert "[maintenance until 2100-01-01T00:00:00" in table.stdout
    assert table.returncode == 0  # the only component is out of the verdict
    document = json.loads(healthd_cli("check", "--json", "--config", str(config)).stdout)
    assert document["components"]["db"]["maintenance"]["source"] == "config"


# --- history --------------------------------------------------------------------------------


def test_time_in_maintenance_is_left_out_of_uptime_and_opens_no_incident(tmp_path: Path) -> None:
    from healthd import history
    from tests.test_history import T0, _history, _Run

    recorder, store = _history(tmp_path)
    store.set_windows((Window(("api",), "upgrade", "cli", T0 + 10, T0 + 20),))
    run = _Run(recorder)
    for i in range(10):  # healthy 0-9 s, unhealthy 10-19 s in maintenance, healthy again
        run.check("api", Status.HEALTHY, T0 + i)
    for i in range(10, 20):
        run.check("api", Status.UNHEALTHY, T0 + i)
    for i in range(20, 31):
        run.check("api", Status.HEALTHY, T0 + i)
    recorder.flush()

    db = history.open_read_only(tmp_path / "history.db")
    try:
        api = history.report(db, T0 - 3600, T0 + 86400)["api"]
        [(api_id,)] = db.execute("SELECT id FROM components WHERE name = 'api'").fetchall()
        incidents = history.incidents(db, api_id, T0 + 100)
        flagged = db.execute("SELECT status, maintenance FROM transitions ORDER BY at").fetchall()
    finally:
        db.close()
    assert incidents == []
    assert api["seconds"] == {
        "healthy": 20.0,
        "degraded": 0.0,
        "unhealthy": 0.0,
        "maintenance": 10.0,
    }
    assert api["uptime"] == 1.0
    assert flagged == [("healthy", 0), ("unhealthy", 1), ("healthy", 0)]


def test_a_window_added_by_a_reload_takes_effect_without_a_restart(tmp_path: Path) -> None:
    config = _daemon_config(tmp_path, free_port())
    with running_healthd(config, ready=True) as healthd:
        assert not _in_maintenance(_status(tmp_path))
        config.write_text(
            config.read_text()
            + '\n[[maintenance]]\ncomponents = ["db"]\nreason = "reindex"\n'
            + 'weekly = "Mon 00:00-Mon 00:00"\n'  # the whole week
        )
        healthd.signal(signal.SIGHUP)
        document = _wait_status(tmp_path, _in_maintenance)
        assert document["components"]["db"]["maintenance"]["source"] == "config"
        assert document["components"]["db"]["maintenance"]["reason"] == "reindex"
        assert document["status"] != "unhealthy"
