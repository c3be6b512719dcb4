"""The one lookup table from a check's ``kind`` to the code that measures and judges it.

Every kind module exposes the same two functions:

- ``async def probe(check, ctx) -> Observation`` measures. It maps every failure of the target
  into ``Observation.failure`` and raises only for bugs. It never retries, and it never swallows
  cancellation: the scheduler owns the deadline.
- ``def assess(check, observation) -> Finding`` judges the observation alone: pure, no I/O,
  in the words of ``healthd.findings``. No kind imports ``classify``: hysteresis, staleness
  and the overall verdict are the judge's, applied to every kind alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from healthd.model import Finding, Observation
from healthd.probes._context import ProbeContext, SharedResources


@dataclass(frozen=True, slots=True)
class ProbeKind:
    """The measuring and the judging half of one check kind."""

    probe: Callable[[Any, ProbeContext], Awaitable[Observation]]
    assess: Callable[[Any, Observation], Finding]


class _KindTable(Mapping[str, ProbeKind]):
    """Every kind is a key from the start; its module is imported on first lookup.

    psycopg and redis-py took about 0.3 s of healthd's start-up here, and a config with no
    datastore never needs them.
    """

    def __init__(self, modules: Mapping[str, str]) -> None:
        self._modules = dict(modules)
        self._loaded: dict[str, ProbeKind] = {}

    def __getitem__(self, kind: str) -> ProbeKind:
        try:
            return self._loaded[kind]
        except KeyError:
            module = importlib.import_module(f"healthd.probes.{self._modules[kind]}")
            loaded = self._loaded[kind] = ProbeKind(module.probe, module.assess)
            return loaded

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


#: kind -> module in this package; each module has ``probe`` and ``assess``.
PROBES: Mapping[str, ProbeKind] = _KindTable(
    {
        "http": "http",
        "tcp": "tcp",
        "postgres": "postgres",
        "redis": "redis",
        "falkordb": "falkordb",
        "api": "api",
        "mlflow": "mlflow",
        "bentoml": "bentoml",
        "opik": "opik",
        "supabase": "supabase",
        "systemd": "systemd",
        "host": "host",
        "heartbeat": "heartbeat",
    }
)

__all__ = ["PROBES", "ProbeContext", "ProbeKind", "SharedResources"]
