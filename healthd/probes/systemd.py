"""The ``systemd`` kind: a unit's state, its last result and how often it restarted.

The probe asks systemd with ``systemctl show`` (over the system bus: no dependency, and what an
operator would type). Restarts are counted from ``NRestarts`` deltas between probes, kept in
the probe context with their times, so "4 restarts in 10 min" means restarts healthd saw
happen. At the first look (and for ``healthd check``, which looks once) healthd cannot tell
when earlier restarts happened: if the unit's last state change (its latest restart) is within
the window, all of ``NRestarts`` are taken to be, dated at that change, so that they leave the
window with it.

systemd resets ``Result`` when the unit starts again, so the probe also remembers the last
failing result it saw: a unit that was OOM-killed and came back still says so while the
restart is within the window.

Verdicts (``assess``):

- ``unit_not_found``: systemd has no such unit loaded;
- ``restart_loop``: restarts within ``restart_window`` reached ``max_restarts``;
- ``unit_failed``: not running, with a failing result (``failed``, or waiting in
  ``auto-restart``); ``unit_inactive``: not running, cleanly stopped;
- degraded ``restarted``: running, but restarted within the window; degraded
  ``unit_changing`` while starting, stopping or reloading.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass, field

import anyio

from healthd.config import SystemdCheck
from healthd.findings import OK, failed, format_seconds
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes._errors import CLIENT_TIMEOUT_SHARE

PROPERTIES = (
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "NRestarts",
    "ExecMainCode",
    "ExecMainStatus",
    "InvocationID",
    "StateChangeTimestampMonotonic",
)
#: ``ExecMainCode``: the ``si_code`` of the main process's exit (``CLD_*``).
_EXIT_CODES = {1: "exited", 2: "killed", 3: "dumped"}
#: Bounds the remembered restart times of a unit restarting every 100 ms for a day.
_MAX_REMEMBERED = 1024


@dataclass
class _History:
    """What earlier probes of one unit saw: the last ``NRestarts`` and recent restarts."""

    n_restarts: int | None = None
    #: Monotonic times of restarts seen, each with how many restarts it stands for.
    restarts: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=_MAX_REMEMBERED)
    )
    last_failure: str | None = None


async def probe(check: SystemdCheck, ctx: ProbeContext) -> Observation:
    """``systemctl show`` the unit's properties and count restarts since the last probe."""
    history = ctx.get("history", _History)
    argv = ["systemctl", "show", "--no-pager", "-p", ",".join(PROPERTIES), "--", check.unit]
    started = time.perf_counter()
    with anyio.move_on_after(check.timeout_seconds * CLIENT_TIMEOUT_SHARE):
        try:
            done = await anyio.run_process(argv, check=False)
        except FileNotFoundError:
            failure = Failure("systemd_unreachable", "systemctl is not installed")
            return Observation(time.perf_counter() - started, failure=failure)
        latency = time.perf_counter() - started
        if done.returncode != 0:
            text = done.stderr.decode("utf-8", "replace").strip().splitlines()
            message = f"systemctl show {check.unit}: {text[0][:160] if text else done.returncode}"
            return Observation(latency, failure=Failure("systemd_unreachable", message))
        return _unit_observation(check, history, _parse(done.stdout), latency)
    limit = format_seconds(check.timeout_seconds)
    failure = Failure("timeout", f"systemctl show {check.unit}: no answer (timeout {limit})")
    return Observation(time.perf_counter() - started, failure=failure)


def _parse(out: bytes) -> dict[str, str]:
    properties: dict[str, str] = {}
    for line in out.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            properties[key] = value
    return properties


def _unit_observation(
    check: SystemdCheck, history: _History, properties: dict[str, str], latency: float
) -> Observation:
    """The unit's facts from its ``properties``; restarts seen since the last probe are added
    to ``history``."""
    now = time.monotonic()
    try:
        n_restarts = int(properties.get("NRestarts") or 0)
    except ValueError:
        n_restarts = 0
    if history.n_restarts is None:
        changed_at = _monotonic_seconds(properties.get("StateChangeTimestampMonotonic", ""))
        if n_restarts and changed_at is not None and changed_at >= now - check.restart_window:
            history.restarts.append((changed_at, n_restarts))
    # NRestarts goes back to 0 when the unit is started by hand: a new baseline, no restart.
    elif n_restarts > history.n_restarts:
        history.restarts.append((now, n_restarts - history.n_restarts))
    history.n_restarts = n_restarts
    while history.restarts and history.restarts[0][0] < now - check.restart_window:
        history.restarts.popleft()
    result = properties.get("Result", "")
    if result and result != "success":
        history.last_failure = _describe_result(result, properties)
    elif not history.restarts:
        history.last_failure = None  # nothing left in the window that it could explain
    facts: dict[str, object] = {
        "load_state": properties.get("LoadState", ""),
        "active_state": properties.get("ActiveState", ""),
        "sub_state": properties.get("SubState", ""),
        "result": result,
        "n_restarts": n_restarts,
        "restarts_in_window": sum(count for _, count in history.restarts),
        "last_failure": history.last_failure,
        "invocation_id": properties.get("InvocationID", ""),
    }
    return Observation(latency, facts=facts)


def _monotonic_seconds(text: str) -> float | None:
    """systemd's CLOCK_MONOTONIC microseconds as ``time.monotonic()`` seconds; 0 is never."""
    try:
        microseconds = int(text)
    except ValueError:
        return None
    return microseconds / 1e6 if microseconds > 0 else None


def _describe_result(result: str, properties: dict[str, str]) -> str:
    """``exit-code (status 1)``, ``signal (SIGKILL)``, ``oom-kill``."""
    try:
        code = _EXIT_CODES.get(int(properties.get("ExecMainCode") or 0))
        status = int(properties.get("ExecMainStatus") or 0)
    except ValueError:
        return result
    if result == "exit-code" and code == "exited":
        return f"exit-code (status {status})"
    if result in ("signal", "core-dump", "watchdog") and code in ("killed", "dumped") and status:
        try:
            return f"{result} ({signal.Signals(status).name})"
        except ValueError:
            return f"{result} (signal {status})"
    return result


def assess(check: SystemdCheck, observation: Observation) -> Finding:
    """Not running is unhealthy; a restart loop is unhealthy; a recent restart is degraded."""
    if observation.failure is not None:
        return failed(observation)
    facts = observation.facts
    active, sub = facts["active_state"], facts["sub_state"]
    if facts["load_state"] not in ("loaded", ""):
        return Finding(Status.UNHEALTHY, "unit_not_found", f"{check.unit} is {facts['load_state']}")
    restarts: int = facts["restarts_in_window"]
    parts = [sub if active == "active" and sub == "running" else f"{active} ({sub})"]
    if sub == "auto-restart":
        parts = ["auto-restart"]
    if restarts:
        noun = "restart" if restarts == 1 else "restarts"
        parts.append(f"{restarts} {noun} in {_window(check.restart_window)}")
    if facts["last_failure"]:
        parts.append(f"last result {facts['last_failure']}")
    reason = ", ".join(parts)
    if restarts >= check.max_restarts:
        return Finding(Status.UNHEALTHY, "restart_loop", reason)
    if active == "failed" or sub == "auto-restart":
        return Finding(Status.UNHEALTHY, "unit_failed", reason)
    if active == "inactive":
        return Finding(Status.UNHEALTHY, "unit_inactive", reason)
    if active not in ("active", "reloading"):
        return Finding(Status.DEGRADED, "unit_changing", reason)
    if restarts:
        return Finding(Status.DEGRADED, "restarted", reason)
    if active == "reloading":
        return Finding(Status.DEGRADED, "unit_changing", reason)
    return Finding(Status.HEALTHY, OK, f"{reason}, no restarts in {_window(check.restart_window)}")


def _window(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return format_seconds(seconds)
