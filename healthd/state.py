"""The state store: the latest state of every component, handed out as immutable snapshots.

The event loop writes measured states; the metrics thread and the status file writer read
snapshots. A lock guards the few dict operations, and every reader gets its own frozen
``Snapshot``, so a scrape never sees a half-updated world. What a snapshot says is judged by
``classify.judge_world`` (staleness, impact, the overall verdict), on read, so a stale verdict
shows even while the event loop is blocked and no check completes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from healthd.classify import World, judge_world
from healthd.maintenance import Window, covers
from healthd.model import ComponentState, DaemonStats, Snapshot

#: A component whose last check is older than this many intervals (plus its timeout) is
#: reported unhealthy as ``stale``: a verdict nobody refreshed is no verdict.
STALE_INTERVALS = 3


class StateStore:
    """Component states and healthd's own statistics, versioned on every change.

    A snapshot's ``version`` changes whenever what it says changes: a new state, healthd's own
    statistics, or a component crossing its stale bound with no check completing. A judged
    state that did not change is handed out as the same object as in the previous snapshot.
    Between changes a snapshot judges nothing again, so every scrape can ask for one.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._components: dict[str, ComponentState] = {}
        self._stale_after: dict[str, float] = {}
        self._windows: tuple[Window, ...] = ()
        self._daemon = DaemonStats(started_at=clock())
        # Updated on every check (or tick), so kept as plain fields and folded in on read.
        self._progress_at: float | None = None
        self._lateness = self._daemon.lateness
        self._lag = self._daemon.event_loop_lag
        self._gc_pauses = list(self._daemon.gc_pauses)
        #: Bumped under the lock on every change; ``_measured_version`` on component changes.
        self._version = 0
        self._measured_version = 0
        #: Components recorded or removed since the last judgement; when ``_rejudge`` is set
        #: (at first, and when the windows change) every component is judged again.
        self._changed: set[str] = set()
        self._rejudge = True
        # The last judgement, and the versions it saw; only touched under ``_judge_lock``, which
        # serialises snapshots (the metrics thread and the event loop both take them).
        self._judge_lock = threading.Lock()
        self._world: World | None = None
        self._limits: dict[str, float] = {}
        self._seen_version = -1
        self._seen_measured_version = -1
        self._published_version = 0

    def get(self, name: str) -> ComponentState | None:
        """The latest state of ``name``, if it has one."""
        return self._components.get(name)

    def record(self, state: ComponentState, *, stale_after_seconds: float) -> None:
        """Store a component's new state and note the scheduler's progress."""
        with self._lock:
            self._components[state.name] = state
            self._stale_after[state.name] = stale_after_seconds
            self._changed.add(state.name)
            self._progress_at = state.checked_at
            self._version += 1
            self._measured_version += 1

    def set_windows(self, windows: tuple[Window, ...]) -> None:
        """Replace the maintenance windows (the config's and the CLI's together)."""
        with self._lock:
            self._windows = windows
            self._rejudge = True
            self._version += 1
            self._measured_version += 1

    def in_maintenance(self, name: str, at: float) -> bool:
        """Whether a window covers ``name`` at ``at`` (Unix seconds)."""
        return covers(self._windows, name, at)

    def windows(self) -> tuple[Window, ...]:
        """The maintenance windows as last set."""
        return self._windows

    def check_started(self, lateness_seconds: float) -> None:
        """Count a check that started ``lateness_seconds`` after its schedule said."""
        with self._lock:
            self._lateness = self._lateness.observe(lateness_seconds)

    def remove(self, name: str) -> None:
        """Forget a component that the config no longer has; its series disappear with it."""
        with self._lock:
            self._components.pop(name, None)
            self._stale_after.pop(name, None)
            self._changed.add(name)
            self._version += 1
            self._measured_version += 1

    def loop_lag(self, seconds: float) -> None:
        """Count how late the event loop woke a sleeper: every latency it measured is that
        much wrong."""
        with self._lock:
            self._lag = self._lag.observe(seconds)

    def gc_paused(self, pauses: Iterable[tuple[int, float]]) -> None:
        """Count collections of the cyclic garbage collector: (generation, seconds) each."""
        with self._lock:
            for generation, seconds in pauses:
                self._gc_pauses[generation] = self._gc_pauses[generation].observe(seconds)

    def probe_failed(self, reason: str) -> None:
        """Count a check healthd could not run: ``probe_error`` (a bug in healthd) or
        ``resource_exhausted`` (healthd's own descriptors, memory or buffers ran out)."""
        field = {
            "probe_error": "probe_errors_total",
            "resource_exhausted": "probe_resource_errors_total",
        }[reason]
        with self._lock:
            count = getattr(self._daemon, field) + 1
            self._daemon = dataclasses.replace(self._daemon, **{field: count})
            self._version += 1

    def notify_dropped(self) -> None:
        """Count an ``sd_notify`` message that could not be sent."""
        with self._lock:
            self._daemon = dataclasses.replace(
                self._daemon, notify_dropped_total=self._daemon.notify_dropped_total + 1
            )
            self._version += 1

    def status_file_written(self, ok: bool, at: float, duration_seconds: float) -> None:
        """Count one attempt to write the status file, which took ``duration_seconds``."""
        with self._lock:
            daemon = self._daemon
            duration = daemon.status_file_write_duration.observe(duration_seconds)
            if ok:
                self._daemon = dataclasses.replace(
                    daemon,
                    status_file_writes_total=daemon.status_file_writes_total + 1,
                    status_file_last_write_at=at,
                    status_file_write_duration=duration,
                )
            else:
                self._daemon = dataclasses.replace(
                    daemon,
                    status_file_write_failures_total=daemon.status_file_write_failures_total + 1,
                    status_file_write_duration=duration,
                )
            self._version += 1

    def config_loaded(
        self,
        ok: bool,
        at: float,
        *,
        slo_objectives: Mapping[str, float] | None = None,
        shard: tuple[int, int] = (1, 1),
    ) -> None:
        """Note a config (re)load; a failed one leaves healthd on its older config. A loaded one
        brings its components' ``slo`` objectives."""
        with self._lock:
            if ok:
                self._daemon = dataclasses.replace(
                    self._daemon,
                    config_last_reload_successful=True,
                    config_last_reload_success_at=at,
                    slo_objectives=dict(slo_objectives or {}),
                    shard=shard,
                )
            else:
                self._daemon = dataclasses.replace(
                    self._daemon, config_last_reload_successful=False
                )
            self._version += 1

    def history_write_failed(self) -> None:
        """Count a history database write that failed (the rows are kept to retry)."""
        with self._lock:
            self._daemon = dataclasses.replace(
                self._daemon,
                history_write_failures_total=self._daemon.history_write_failures_total + 1,
            )
            self._version += 1

    def daemon(self) -> DaemonStats:
        """healthd's own statistics as they are now."""
        with self._lock:
            return self._daemon_stats()

    def _daemon_stats(self) -> DaemonStats:
        return dataclasses.replace(
            self._daemon,
            scheduler_last_progress_at=self._progress_at,
            lateness=self._lateness,
            event_loop_lag=self._lag,
            gc_pauses=tuple(self._gc_pauses),
        )

    def snapshot(self) -> Snapshot:
        """A frozen picture of everything, as ``classify.judge_world`` judges it now.

        Between stale bounds, only the components recorded since the last snapshot are judged
        again, and the lock is held for as long as it takes to collect them: a scrape of
        10,000 components after one change costs that change, not 10,000 judgements.
        """
        with self._judge_lock:
            now = self._clock()
            previous = self._world
            changes: dict[str, tuple[ComponentState | None, float | None]] | None = None
            with self._lock:
                version = self._version
                measured_version = self._measured_version
                daemon = self._daemon_stats()
                measured: dict[str, ComponentState] | None = None
                if previous is None or self._rejudge:
                    measured = dict(self._components)
                    self._limits = dict(self._stale_after)
                elif measured_version != self._seen_measured_version:
                    changes = {
                        name: (self._components.get(name), self._stale_after.get(name))
                        for name in self._changed
                    }
                self._changed = set()
                self._rejudge = False
                windows = self._windows
            world = previous
            if measured is not None:
                world = judge_world(measured, self._limits, now, previous, windows)
            elif changes is not None and previous is not None:
                measured = dict(previous.measured)
                for name, (state, limit) in changes.items():
                    if state is None or limit is None:
                        measured.pop(name, None)
                        self._limits.pop(name, None)
                    else:
                        measured[name] = state
                        self._limits[name] = limit
                world = judge_world(measured, self._limits, now, previous, windows, set(changes))
            elif previous is not None and now >= previous.next_change_at:
                world = judge_world(previous.measured, self._limits, now, previous, windows)
            assert world is not None
            if (world is not previous and world.changed) or version != self._seen_version:
                self._published_version += 1
            self._world = world
            self._seen_version, self._seen_measured_version = version, measured_version
            return Snapshot(self._published_version, now, world.overall, world.components, daemon)
