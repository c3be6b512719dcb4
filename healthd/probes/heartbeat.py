"""The ``heartbeat`` kind: judges the pings a job pushed (``healthd.heartbeats``).

The probe only reads the last pings from the store the push listener fills; ``assess``
judges them against ``period``, ``grace`` and ``max_runtime``. Nothing is sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from healthd.config import HeartbeatCheck
from healthd.findings import OK, failed
from healthd.heartbeats import Pings
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes._context import ProbeContext

MISSED = "missed"
FAILED = "failed"
RUNNING_TOO_LONG = "running_too_long"
#: Healthy: no ping yet, and the first period (plus grace) has not passed.
WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class HeartbeatFacts:
    """The pings as the probe read them, and the wall-clock time it read them at."""

    now: float
    pings: Pings


async def probe(check: HeartbeatCheck, ctx: ProbeContext) -> Observation:
    """Read the last pings of this heartbeat; the listener that receives them runs in
    ``healthd run`` (``healthd check`` reads the pings file it keeps)."""
    store = ctx.shared.heartbeats
    pings = store.get(ctx.name) if store is not None else None
    if store is None or pings is None:
        return Observation(
            0.0,
            failure=Failure(
                "not_checked", "heartbeats are received by the running daemon (healthd run)"
            ),
        )
    facts = {
        key: value
        for key, value in (
            ("last_ping_at", pings.success_at),
            ("last_start_at", pings.start_at),
            ("last_fail_at", pings.fail_at),
            ("exit_code", pings.exit_code),
            ("watching_since", pings.watching_since),
        )
        if value is not None
    }
    return Observation(0.0, facts=facts, payload=HeartbeatFacts(store.now(), pings))


def assess(check: HeartbeatCheck, observation: Observation) -> Finding:
    """Running too long, then failed (the last finished run), then missed, in that order;
    else ok, or waiting for the first ping."""
    if observation.failure is not None:
        return failed(observation)
    facts: HeartbeatFacts = observation.payload
    now, pings = facts.now, facts.pings
    expected = f"expected every {human_seconds(check.period)} + {human_seconds(check.grace)} grace"
    finished = max((t for t in (pings.success_at, pings.fail_at) if t is not None), default=None)
    # A start after the last finish (or with none yet) is a run in progress.
    started = pings.start_at
    if started is not None and finished is not None and started <= finished:
        started = None
    limit = check.max_runtime
    if started is not None and limit is not None and now - started > limit:
        return Finding(
            Status.UNHEALTHY,
            RUNNING_TOO_LONG,
            f"started {human_seconds(now - started)} ago and not finished; "
            f"max_runtime {human_seconds(limit)}",
        )
    if pings.fail_at is not None and pings.fail_at == finished:
        code = "no exit code" if pings.exit_code is None else f"exit code {pings.exit_code}"
        ago = human_seconds(now - pings.fail_at)
        return Finding(Status.UNHEALTHY, FAILED, f"job failed ({code}) {ago} ago")
    due = check.period + check.grace
    if pings.success_at is None:
        waited = now - pings.watching_since
        if waited > due:
            return Finding(
                Status.UNHEALTHY,
                MISSED,
                f"no ping since healthd began watching {human_seconds(waited)} ago; {expected}",
            )
        return Finding(Status.HEALTHY, WAITING, f"waiting for the first ping; {expected}")
    since = now - pings.success_at
    if since > due:
        return Finding(
            Status.UNHEALTHY, MISSED, f"last ping {human_seconds(since)} ago; {expected}"
        )
    reason = f"last ping {human_seconds(since)} ago"
    if started is not None:
        reason += f"; running for {human_seconds(now - started)}"
    return Finding(Status.HEALTHY, OK, reason)


def human_seconds(seconds: float) -> str:
    """``45 s``, ``7 min``, ``1.5 h``, ``2 d``: how people say a job's period."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{round(seconds / 60, 1):g} min"
    if seconds < 86400:
        return f"{round(seconds / 3600, 1):g} h"
    return f"{round(seconds / 86400, 1):g} d"
