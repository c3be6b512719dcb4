"""Run one probe the way the scheduler does, for tests of a single kind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import pytest_asyncio

from healthd import classify
from healthd.config import CheckBase
from healthd.model import ComponentState, Finding, Observation
from healthd.probes import PROBES, ProbeContext, SharedResources
from healthd.scheduler import run_probe

__all__ = ["ctx", "probe_once", "run_check", "states_after"]

#: Shared as the daemon shares them: an SSL context costs about 21 ms of CPU to build.
_SHARED = SharedResources()


@pytest_asyncio.fixture
async def ctx() -> AsyncIterator[ProbeContext]:
    """A fresh probe context per test, closed afterwards like the scheduler does."""
    context = ProbeContext(_SHARED)
    yield context
    await context.aclose()


async def run_check(check: CheckBase, ctx: ProbeContext) -> tuple[Observation, Finding]:
    """Probe under the check's deadline with the scheduler's own code, then judge."""
    kind = PROBES[check.kind]
    observation = await run_probe(check, kind, ctx)
    return observation, classify.judge(check, observation, kind.assess)


async def probe_once(check: CheckBase) -> tuple[Observation, Finding]:
    """``run_check`` with a context of its own, closed afterwards."""
    context = ProbeContext(_SHARED)
    try:
        return await run_check(check, context)
    finally:
        await context.aclose()


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
