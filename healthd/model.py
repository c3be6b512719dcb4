"""Frozen value types. Data flows one way: probe -> classify -> state -> snapshot -> exporters."""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

#: JSON-safe, non-secret facts about one component, exported as ``details``.
Details = Mapping[str, Any]

#: Upper bounds of the probe duration histogram, in seconds.
DURATION_BUCKETS_SECONDS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Status(enum.IntEnum):
    """A verdict. The integer is the value of ``healthd_component_status``: higher is worse."""

    HEALTHY = 0
    DEGRADED = 1
    UNHEALTHY = 2

    @property
    def label(self) -> str:
        """The lower-case name used in JSON, logs and metric label values."""
        # One string per member: made afresh, every component's status entry kept its own
        # copy (10,000 at 10,000 components).
        return _LABELS[self]


_LABELS = {status: status.name.lower() for status in Status}


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a probe could not get what it needed from its target.

    ``code`` is a stable machine-readable reason code (``timeout``, ``connection_refused``, ...);
    ``message`` is one human line that never contains a secret.
    """

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Observation:
    """What one probe saw: measurements and facts, no verdict.

    ``failure`` is set when the probe could not complete. ``facts`` are exported as the
    component's ``details``, so they must be JSON-safe and free of secrets. ``payload`` carries
    raw material a judge may need (an HTTP body, say) and is never exported.
    """

    latency_seconds: float
    failure: Failure | None = None
    facts: Details = field(default_factory=dict)
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Finding:
    """The verdict of one check result on its own, before hysteresis is applied."""

    status: Status
    reason_code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations counted into buckets with fixed upper bounds (the last one ``+Inf``).

    ``counts`` holds each bucket's own count; ``buckets`` gives Prometheus's cumulative view.
    Observing is a bisect and a tuple copy, because it happens on every check.
    """

    upper_bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float = 0.0

    @property
    def count(self) -> int:
        """How many observations were made."""
        return sum(self.counts)

    @property
    def buckets(self) -> tuple[int, ...]:
        """Cumulative counts: observations less than or equal to each bound, then ``+Inf``."""
        return tuple(itertools.accumulate(self.counts))

    @classmethod
    def empty(cls, upper_bounds: tuple[float, ...]) -> Histogram:
        """A histogram with no observations."""
        return cls(upper_bounds, (0,) * (len(upper_bounds) + 1), 0.0)

    def observe(self, value: float) -> Histogram:
        """Return a new histogram with ``value`` added."""
        counts = list(self.counts)
        counts[bisect.bisect_left(self.upper_bounds, value)] += 1
        return Histogram(self.upper_bounds, tuple(counts), self.sum + value)


#: The ``durations`` of every state while they are not exported (``check_duration_histogram``
#: off): one shared empty histogram, rendered as zeros if the export is switched on by a reload.
UNTRACKED_DURATIONS = Histogram.empty(DURATION_BUCKETS_SECONDS)


@dataclass(frozen=True, slots=True)
class Maintenance:
    """Planned maintenance a component is in: until when (Unix seconds), why, and who said so
    (``"config"`` for a scheduled window, ``"cli"`` for ``healthd maintenance start``)."""

    until: float
    reason: str
    source: str


def _untracker() -> Callable[[object], None]:
    """CPython's ``PyObject_GC_UnTrack``: takes an object out of the cyclic collector's sight.

    Only for an object that can never be part of a reference cycle. Elsewhere than CPython,
    a no-op: the object stays tracked, which costs time and is never wrong.
    """
    try:
        import ctypes

        untrack = ctypes.pythonapi.PyObject_GC_UnTrack
    except (ImportError, AttributeError):  # pragma: no cover - not CPython
        return lambda _: None
    untrack.argtypes = [ctypes.py_object]
    untrack.restype = None
    return cast(Callable[[object], None], untrack)


_untrack = _untracker()


@dataclass(frozen=True, slots=True)
class ComponentState:
    """Everything healthd knows about one component after its latest check.

    Times ending in ``_at`` are Unix timestamps in seconds (wall clock); ``None`` means never.
    ``checks_total`` counts completed checks by result (``success`` or a reason code), and
    ``durations`` is the histogram of every check's latency.

    ``flap_history`` is the failure window as bits, newest check in bit 0 (a 1 is a failure
    that counts toward flapping), and ``last_failure`` the reason of the latest failed check.
    ``impacted_by`` is set only in a snapshot: the root causes among the component's
    dependencies while it is not healthy (``classify.judge_world``). ``evidence`` names the
    components whose reasons a snapshot appends to this one's while it is not healthy.
    """

    name: str
    kind: str
    critical: bool
    status: Status
    reason_code: str
    reason: str
    latency_seconds: float
    checked_at: float
    since: float
    last_success_at: float | None
    consecutive_failures: int
    consecutive_successes: int
    details: Details = field(default_factory=dict)
    checks_total: Mapping[str, int] = field(default_factory=dict)
    durations: Histogram = field(default_factory=lambda: Histogram.empty(DURATION_BUCKETS_SECONDS))
    depends_on: tuple[str, ...] = ()
    flap_history: int = 0
    last_failure: str = ""
    impacted_by: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    #: Set only in a snapshot, while the component is in maintenance (``classify.judge_world``).
    maintenance: Maintenance | None = None

    def __post_init__(self) -> None:
        # Every check makes a state that lives until the next one, so at 10,000 checks the
        # collector's middle generation filled with them, and walking their twenty references
        # each held the event loop for 10-14 ms every 100 s. A state cannot be in a cycle: it
        # holds strings, numbers, enums, tuples and mappings made before it, none of which can
        # reach it back (docs/performance.md). Fields added here must keep that true.
        _untrack(self)


#: Upper bounds of healthd's own timing histograms (lateness, loop lag, status file writes):
#: fine below 10 ms, where the goals are, coarse above.
DAEMON_BUCKETS_SECONDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip


def _daemon_histogram() -> Histogram:
    return Histogram.empty(DAEMON_BUCKETS_SECONDS)


@dataclass(frozen=True, slots=True)
class DaemonStats:
    """healthd's own health: scheduler progress, event loop lag and collector pauses, status
    file writes and config reloads."""

    started_at: float
    scheduler_last_progress_at: float | None = None
    lateness: Histogram = field(default_factory=_daemon_histogram)
    event_loop_lag: Histogram = field(default_factory=_daemon_histogram)
    #: How long each collection of the cyclic garbage collector took, by generation (0-2).
    gc_pauses: tuple[Histogram, ...] = field(default_factory=lambda: (_daemon_histogram(),) * 3)
    status_file_write_duration: Histogram = field(default_factory=_daemon_histogram)
    status_file_last_write_at: float | None = None
    status_file_write_failures_total: int = 0
    status_file_writes_total: int = 0
    config_last_reload_successful: bool = True
    config_last_reload_success_at: float | None = None
    #: Checks healthd could not run because of a bug in healthd (``reason="probe_error"``).
    probe_errors_total: int = 0
    history_write_failures_total: int = 0
    #: ``slo`` of every component that sets one, for ``healthd_component_slo_objective``.
    slo_objectives: Mapping[str, float] = field(default_factory=dict)
    #: Checks healthd could not run for lack of its own descriptors, memory or buffers
    #: (``reason="resource_exhausted"``); the component's verdict was left as it was.
    probe_resource_errors_total: int = 0
    #: ``sd_notify`` messages dropped because the service manager's queue was full.
    notify_dropped_total: int = 0
    #: ``(i, N)``: this instance checks shard i of N (``(1, 1)``: every component).
    shard: tuple[int, int] = (1, 1)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable picture of the whole world, taken at ``generated_at`` (Unix seconds).

    ``version`` increases with every change, staleness included, so exporters can cache
    whatever they render; a component state that did not change is the very same object as in
    the previous snapshot, so a render can also be cached per state (``is``).
    """

    version: int
    generated_at: float
    overall: Status
    components: Mapping[str, ComponentState]
    daemon: DaemonStats

    def summary(self) -> dict[str, int]:
        """How many components are in each state, every state present."""
        # Counted by identity in C: a loop over 10,000 components with .label took 20 ms.
        statuses = [state.status for state in self.components.values()]
        return {status.label: statuses.count(status) for status in Status}

    def summary_text(self) -> str:
        """``7 healthy, 1 degraded, 0 unhealthy``: for systemd's STATUS=, logs and the CLI."""
        return ", ".join(f"{n} {label}" for label, n in self.summary().items())
