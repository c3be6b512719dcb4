"""Checks the way the daemon runs them, for the tests of one kind.

``make_check`` builds a check as a loaded config hands it over (``make_state`` a component's
state as the store holds it); ``Component`` runs it through
the scheduler's own code: the probe under the check's deadline, the kind's judgement and the
latency limit (``probe``), then hysteresis and the state store (``check_once``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import pytest_asyncio
from pydantic import TypeAdapter

from healthd import classify
from healthd.config import CheckBase, CheckConfig
from healthd.model import ComponentState, Finding, Observation, Status
from healthd.probes import PROBES, ProbeContext, SharedResources
from healthd.scheduler import Scheduler, run_probe
from healthd.state import StateStore

__all__ = [
    "Component",
    "check_once",
    "component",
    "ctx",
    "make_check",
    "make_state",
    "probe_concurrently",
    "probe_once",
    "run_check",
    "shown_runs",
    "states_after",
]

#: Shared as the daemon shares them: an SSL context costs about 21 ms of CPU to build.
_SHARED = SharedResources()
_CHECKS: TypeAdapter[Any] = TypeAdapter(CheckConfig)


def make_check(kind: str, **overrides: Any) -> Any:
    """A ``kind`` check as a loaded config hands it over: interval 10 s and timeout 1 s (the
    ``[daemon]`` defaults a test would set) unless ``overrides`` say otherwise."""
    return _CHECKS.validate_python({"kind": kind, "interval": 10, "timeout": 1, **overrides})


@pytest_asyncio.fixture
async def ctx() -> AsyncIterator[ProbeContext]:
    """A fresh probe context per test, closed afterwards like the scheduler does."""
    context = ProbeContext(_SHARED)
    yield context
    await context.aclose()


class Component:
    """One component checked through the real scheduler path. ``ctx`` lives as long as the
    component, so clients are reused across checks exactly as in the daemon."""

    def __init__(self, check: CheckBase, ctx: ProbeContext, name: str = "svc") -> None:
        self.name = name
        self.check = check
        self.ctx = ctx
        self.kind = PROBES[check.kind]
        self.scheduler = Scheduler(StateStore(), shared=_SHARED)

    async def probe(self) -> tuple[Observation, Finding]:
        """Probe under the check's deadline, then judge: the kind's verdict and the latency
        limit, before any hysteresis."""
        observation = await run_probe(self.check, self.kind, self.ctx)
        return observation, classify.judge(self.check, observation, self.kind.assess)

    async def check_once(self) -> ComponentState:
        """Run one whole check, hysteresis included; return the component's new state."""
        return await self.scheduler.run_once(self.name, self.check, self.kind, self.ctx)


@contextlib.asynccontextmanager
async def component(check: CheckBase, name: str = "svc") -> AsyncIterator[Component]:
    """A ``Component`` with a probe context of its own, closed at the end."""
    context = ProbeContext(_SHARED)
    try:
        yield Component(check, context, name)
    finally:
        await context.aclose()


async def check_once(check: CheckBase) -> ComponentState:
    """One whole check of a fresh ``component(check)``; its new state."""
    async with component(check) as once:
        return await once.check_once()


async def run_check(check: CheckBase, ctx: ProbeContext) -> tuple[Observation, Finding]:
    """``Component(check, ctx).probe()``: one probe and its judgement, in ``ctx``."""
    return await Component(check, ctx).probe()


async def probe_once(check: CheckBase) -> tuple[Observation, Finding]:
    """``run_check`` in a probe context of its own, closed afterwards."""
    async with component(check) as once:
        return await once.probe()


async def probe_concurrently(*checks: CheckBase) -> list[tuple[Observation, Finding, float]]:
    """``probe_once`` every check at the same time; for each, in order, its observation,
    finding and the seconds it took: what shows whether one slow target delays another."""
    results: dict[int, tuple[Observation, Finding, float]] = {}

    async def timed(index: int, check: CheckBase) -> None:
        started = time.perf_counter()
        observation, finding = await probe_once(check)
        results[index] = (observation, finding, time.perf_counter() - started)

    async with anyio.create_task_group() as tg:
        for index, check in enumerate(checks):
            tg.start_soon(timed, index, check)
    return [results[index] for index in range(len(checks))]


def make_state(name: str = "c", status: Status = Status.HEALTHY, **fields: Any) -> ComponentState:
    """A component's state with every required field filled in (a tcp check, last checked at
    0, no history); ``fields`` say what a test cares about."""
    values: dict[str, Any] = {
        "name": name,
        "kind": "tcp",
        "critical": False,
        "status": status,
        "reason_code": "ok",
        "reason": "ok",
        "latency_seconds": 0.01,
        "checked_at": 0.0,
        "since": 0.0,
        "last_success_at": None,
        "consecutive_failures": 0,
        "consecutive_successes": 0,
        **fields,
    }
    return ComponentState(**values)


def states_after(
    check: CheckBase, findings: Iterable[Finding], name: str = "c"
) -> list[ComponentState]:
    """Feed findings through the hysteresis one by one, from no history; every state."""
    states: list[ComponentState] = []
    previous = None
    for now, finding in enumerate(findings):
        previous = classify.next_state(
            previous,
            name=name,
            check=check,
            finding=finding,
            observation=Observation(0.01),
            now=float(now),
        )
        states.append(previous)
    return states


def shown_runs(secret: str, text: str, length: int = 4) -> list[str]:
    """The runs of ``length`` characters of ``secret`` that ``text`` shows: a secret that was
    cut, escaped or quoted in part still leaks through them. Empty when none shows."""
    runs = {secret[i : i + length] for i in range(len(secret) - length + 1)}
    return sorted(run for run in runs if run in text)
