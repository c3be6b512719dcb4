"""The one lookup table from a check's ``kind`` to the code that measures and judges it.

Every kind module exposes the same two functions:

- ``async def probe(check, ctx) -> Observation`` measures. It maps every failure of the target
  into ``Observation.failure`` and raises only for bugs. It never retries, and it never swallows
  cancellation: the scheduler owns the deadline.
- ``def assess(check, observation) -> Finding`` judges the observation alone: pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from healthd.model import Finding, Observation
from healthd.probes import (
    api,
    bentoml,
    falkordb,
    http,
    mlflow,
    opik,
    postgres,
    redis,
    supabase,
    tcp,
)
from healthd.probes._context import ProbeContext, SharedResources


@dataclass(frozen=True, slots=True)
class ProbeKind:
    """The measuring and the judging half of one check kind."""

    probe: Callable[[Any, ProbeContext], Awaitable[Observation]]
    assess: Callable[[Any, Observation], Finding]


PROBES: dict[str, ProbeKind] = {
    "http": ProbeKind(http.probe, http.assess),
    "tcp": ProbeKind(tcp.probe, tcp.assess),
    "postgres": ProbeKind(postgres.probe, postgres.assess),
    "redis": ProbeKind(redis.probe, redis.assess),
    "falkordb": ProbeKind(falkordb.probe, falkordb.assess),
    "api": ProbeKind(api.probe, api.assess),
    "mlflow": ProbeKind(mlflow.probe, mlflow.assess),
    "bentoml": ProbeKind(bentoml.probe, bentoml.assess),
    "opik": ProbeKind(opik.probe, opik.assess),
    "supabase": ProbeKind(supabase.probe, supabase.assess),
}

__all__ = ["PROBES", "ProbeContext", "ProbeKind", "SharedResources"]
