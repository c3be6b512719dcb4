"""The state store: the latest state of every component, handed out as immutable snapshots.

The event loop writes; the metrics thread and the status file writer read. A lock guards the
few dict operations, and every reader gets its own frozen ``Snapshot``, so a scrape never sees a
half-updated world.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from healthd.classify import format_seconds, overall
from healthd.model import ComponentState, DaemonStats, Snapshot, Status

#: A component whose last check is older than this many intervals (plus its timeout) is
#: reported unhealthy as ``stale``: a verdict nobody refreshed is no verdict.
STALE_INTERVALS = 3


class StateStore:
    """Component states and healthd's own statistics, versioned on every change."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._components: dict[str, ComponentState] = {}
        self._stale_after: dict[str, float] = {}
        self._daemon = DaemonStats(started_at=clock())
        # Updated on every check, so kept as plain fields and folded into DaemonStats on read.
        self._progress_at: float | None = None
        self._lateness = self._daemon.lateness
        self._version = 0

    def get(self, name: str) -> ComponentState | None:
        """The latest state of ``name``, if it has one."""
        return self._components.get(name)

    def record(self, state: ComponentState, *, stale_after_seconds: float) -> None:
        """Store a component's new state and note the scheduler's progress."""
        with self._lock:
            self._components[state.name] = state
            self._stale_after[state.name] = stale_after_seconds
            self._progress_at = state.checked_at
            self._version += 1

    def observe_lateness(self, seconds: float) -> None:
        """Count how late a check started compared with its schedule."""
        with self._lock:
            self._lateness = self._lateness.observe(seconds)

    def remove(self, name: str) -> None:
        """Forget a component that the config no longer has; its series disappear with it."""
        with self._lock:
            self._components.pop(name, None)
            self._stale_after.pop(name, None)
            self._version += 1

    def update_daemon(self, **changes: Any) -> None:
        """Replace fields of ``DaemonStats``."""
        with self._lock:
            self._daemon = dataclasses.replace(self._daemon, **changes)
            self._version += 1

    def daemon(self) -> DaemonStats:
        """healthd's own statistics as they are now."""
        with self._lock:
            return self._daemon_stats()

    def _daemon_stats(self) -> DaemonStats:
        return dataclasses.replace(
            self._daemon, scheduler_last_progress_at=self._progress_at, lateness=self._lateness
        )

    def snapshot(self) -> Snapshot:
        """A frozen picture of everything, with stale components marked unhealthy."""
        now = self._clock()
        with self._lock:
            components = dict(self._components)
            stale_after = dict(self._stale_after)
            daemon = self._daemon_stats()
            version = self._version
        for name, state in components.items():
            limit = stale_after[name]
            if now - state.checked_at > limit:
                components[name] = mark_stale(state, now, limit)
        view: Mapping[str, ComponentState] = MappingProxyType(components)
        return Snapshot(version, now, overall(view.values()), view, daemon)


def mark_stale(state: ComponentState, now: float, limit_seconds: float) -> ComponentState:
    """The state of a component whose checks stopped completing: unhealthy, saying since when."""
    if state.reason_code == "stale":
        return state
    return dataclasses.replace(
        state,
        status=Status.UNHEALTHY,
        reason_code="stale",
        reason=(
            f"no check completed for {format_seconds(now - state.checked_at)} "
            f"(limit {format_seconds(limit_seconds)}); last result: {state.reason}"
        ),
        since=state.since if state.status is Status.UNHEALTHY else state.checked_at + limit_seconds,
    )
