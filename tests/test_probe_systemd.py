"""The systemd kind's judge in tables, and its probe where no systemd runs.

The probe against a real systemd (a crash loop, a killed unit, a unit that stays up) is in
tests/test_systemd_unit.py, which boots one in a container.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

from healthd.config import ConfigError, load
from healthd.model import Finding, Observation, Status
from healthd.probes import ProbeContext
from healthd.probes.systemd import _describe_result, _History, _unit_observation, assess
from tests.probing import make_check, run_check

unit_check = functools.partial(make_check, "systemd", unit="e2i-api.service", timeout=5)


def seen(
    active: str = "active",
    sub: str = "running",
    *,
    restarts: int = 0,
    last_failure: str | None = None,
    load: str = "loaded",
) -> Observation:
    """An observation as the probe makes it."""
    return Observation(
        0.01,
        facts={
            "load_state": load,
            "active_state": active,
            "sub_state": sub,
            "result": "success",
            "n_restarts": restarts,
            "restarts_in_window": restarts,
            "last_failure": last_failure,
            "invocation_id": "x",
        },
    )


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        (seen(), Finding(Status.HEALTHY, "ok", "running, no restarts in 10 min")),
        (
            seen("activating", "auto-restart", restarts=4, last_failure="oom-kill"),
            Finding(
                Status.UNHEALTHY,
                "restart_loop",
                "auto-restart, 4 restarts in 10 min, last result oom-kill",
            ),
        ),
        (
            seen(restarts=3, last_failure="watchdog (SIGABRT)"),
            Finding(
                Status.UNHEALTHY,
                "restart_loop",
                "running, 3 restarts in 10 min, last result watchdog (SIGABRT)",
            ),
        ),
        (
            seen(restarts=1, last_failure="signal (SIGKILL)"),
            Finding(
                Status.DEGRADED,
                "restarted",
                "running, 1 restart in 10 min, last result signal (SIGKILL)",
            ),
        ),
        (
            seen("failed", "failed", last_failure="exit-code (status 1)"),
            Finding(
                Status.UNHEALTHY, "unit_failed", "failed (failed), last result exit-code (status 1)"
            ),
        ),
        (
            seen("activating", "auto-restart", last_failure="signal (SIGKILL)"),
            Finding(Status.UNHEALTHY, "unit_failed", "auto-restart, last result signal (SIGKILL)"),
        ),
        (
            seen("inactive", "dead"),
            Finding(Status.UNHEALTHY, "unit_inactive", "inactive (dead)"),
        ),
        (
            seen("activating", "start"),
            Finding(Status.DEGRADED, "unit_changing", "activating (start)"),
        ),
        (
            seen("inactive", "dead", load="not-found"),
            Finding(Status.UNHEALTHY, "unit_not_found", "e2i-api.service is not-found"),
        ),
    ],
)
def test_assess_verdicts(observation: Observation, expected: Finding) -> None:
    assert assess(unit_check(), observation) == expected


def test_max_restarts_and_window_come_from_the_check() -> None:
    finding = assess(unit_check(max_restarts=5, restart_window="90s"), seen(restarts=4))

    assert finding == Finding(Status.DEGRADED, "restarted", "running, 4 restarts in 90 s")


@pytest.mark.parametrize(
    ("result", "code", "status", "text"),
    [
        ("exit-code", "1", "3", "exit-code (status 3)"),
        ("signal", "2", "9", "signal (SIGKILL)"),
        ("core-dump", "3", "11", "core-dump (SIGSEGV)"),
        ("watchdog", "2", "6", "watchdog (SIGABRT)"),
        ("oom-kill", "2", "9", "oom-kill"),
        ("start-limit-hit", "0", "0", "start-limit-hit"),
    ],
)
def test_result_names_exit_status_or_signal(result: str, code: str, status: str, text: str) -> None:
    assert _describe_result(result, {"ExecMainCode": code, "ExecMainStatus": status}) == text


@pytest.mark.asyncio
async def test_without_a_running_systemd_the_check_is_unhealthy_saying_why(
    ctx: ProbeContext,
) -> None:
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd runs here")

    _, finding = await run_check(unit_check(), ctx)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "systemd_unreachable")
    assert finding.reason.startswith("systemctl show e2i-api.service: ")


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ('unit = "e2i api"', "components.u.unit: unit 'e2i api' is not a unit name"),
        ('unit = "../x.service"', "components.u.unit: unit '../x.service' is not a unit name"),
        ('unit = "a.service"\nmax_restarts = 0', "components.u.max_restarts: Input should be"),
        ('unit = "a.service"\nrestart_window = "0s"', "components.u.restart_window: "),
    ],
)
def test_bad_unit_settings_name_file_key_and_line(
    tmp_path: Path, settings: str, problem: str
) -> None:
    path = tmp_path / "healthd.toml"
    path.write_text(f'[components.u]\nkind = "systemd"\n{settings}\n')

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}:"), caught.value.problems
    assert problem in caught.value.problems[0]


def _shown(n_restarts: int, changed_seconds_ago: float) -> dict[str, str]:
    changed = int((time.monotonic() - changed_seconds_ago) * 1e6)
    return {
        "LoadState": "loaded",
        "ActiveState": "active",
        "SubState": "running",
        "Result": "success",
        "NRestarts": str(n_restarts),
        "StateChangeTimestampMonotonic": str(changed),
    }


def test_first_look_dates_earlier_restarts_at_the_last_state_change() -> None:
    check = unit_check()

    recent = _unit_observation(check, _History(), _shown(4, changed_seconds_ago=60), 0.01)
    old = _unit_observation(check, _History(), _shown(4, changed_seconds_ago=700), 0.01)

    assert recent.facts["restarts_in_window"] == 4
    assert assess(check, recent).reason_code == "restart_loop"
    assert old.facts["restarts_in_window"] == 0
    assert assess(check, old).reason_code == "ok"


def test_later_looks_count_the_increase_and_a_manual_start_is_a_new_baseline() -> None:
    check = unit_check()
    history = _History()
    _unit_observation(check, history, _shown(7, changed_seconds_ago=3600), 0.01)

    once = _unit_observation(check, history, _shown(8, changed_seconds_ago=1), 0.01)
    reset = _unit_observation(check, history, _shown(0, changed_seconds_ago=0), 0.01)
    again = _unit_observation(check, history, _shown(2, changed_seconds_ago=0), 0.01)

    assert once.facts["restarts_in_window"] == 1
    assert reset.facts["restarts_in_window"] == 1
    assert again.facts["restarts_in_window"] == 3
