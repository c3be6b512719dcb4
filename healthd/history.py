"""History that survives restarts: status transitions and hourly counts in SQLite.

The event loop only appends to in-memory aggregates (``check_completed``, a locked dict update);
a worker thread flushes them in one transaction every few seconds, prunes old rows and writes
``history.json`` beside the status file. A corrupt, locked, read-only or full database is logged
once and counted in ``healthd_history_write_failures_total``; the pending aggregates are kept
for the next attempt (up to a bound), and checks go on. History never blocks the loop.

Time in a status is the time between two consecutive checks of a running daemon, credited to
the status reported during it and capped at the component's staleness limit: the time before a
first check, while healthd is down, or while checks stall is not checked time, and counts
neither for nor against uptime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from healthd.config import Config, DetailLevel
from healthd.exporters.status_file import (
    compact_json,
    iso_timestamp,
    render_with_components,
    write_atomic,
)
from healthd.model import ComponentState, Status
from healthd.pacing import pacer
from healthd.secrets import Redactor
from healthd.state import STALE_INTERVALS, StateStore

log = logging.getLogger("healthd.history")

SCHEMA_VERSION = 1
#: How often pending aggregates reach the database.
FLUSH_SECONDS = 5.0
#: How often ``history.json`` is rewritten (also after a flush that recorded a transition).
EXPORT_SECONDS = 60.0
#: A change is exported at once, but not more often than this, nor than 5 times the last
#: export took: a 1,000-component export costs about a second, and flapping must not make the
#: writer spend more than a fifth of a core on it.
_EXPORT_MIN_SECONDS = 2.0
_EXPORT_MAX_SHARE = 0.2
#: How often rows past the retention (or past the per-component bound) are deleted.
PRUNE_SECONDS = 3600.0
#: Transitions kept per component, whatever the retention: a flapping component stays bounded.
MAX_TRANSITIONS_PER_COMPONENT = 500
#: Pending rows kept in memory while the database cannot be written; beyond this they are
#: dropped (and said so once), so a long outage of the disk cannot grow the daemon.
MAX_PENDING_ROWS = 100_000
#: Days of daily uptime in ``history.json``, and incidents per component.
EXPORT_DAYS = 90
EXPORT_INCIDENTS = 50
#: How long a write waits for a lock held by another connection before it counts as failed.
_BUSY_TIMEOUT_MS = 1000

_HOUR = 3600
_DAY = 86400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS components (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
-- One row per status change. `maintenance` is 1 for a change during planned maintenance: it
-- opens no incident.
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    component_id INTEGER NOT NULL REFERENCES components(id),
    at REAL NOT NULL,
    status TEXT NOT NULL,
    previous_status TEXT,
    reason_code TEXT NOT NULL,
    reason TEXT NOT NULL,
    maintenance INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS transitions_by_component ON transitions (component_id, at);
-- Per hour (Unix seconds of its start) and component: checks by status and milliseconds
-- spent in each status; time in maintenance counts as `maintenance_ms` only. Keyed by hour
-- first: every reader asks for a time range.
CREATE TABLE IF NOT EXISTS hours (
    hour INTEGER NOT NULL,
    component_id INTEGER NOT NULL,
    checks_healthy INTEGER NOT NULL DEFAULT 0,
    checks_degraded INTEGER NOT NULL DEFAULT 0,
    checks_unhealthy INTEGER NOT NULL DEFAULT 0,
    healthy_ms INTEGER NOT NULL DEFAULT 0,
    degraded_ms INTEGER NOT NULL DEFAULT 0,
    unhealthy_ms INTEGER NOT NULL DEFAULT 0,
    maintenance_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, component_id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
"""

_UPSERT_HOUR = """
INSERT INTO hours (component_id, hour, checks_healthy, checks_degraded, checks_unhealthy,
                   healthy_ms, degraded_ms, unhealthy_ms, maintenance_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (hour, component_id) DO UPDATE SET
    checks_healthy = checks_healthy + excluded.checks_healthy,
    checks_degraded = checks_degraded + excluded.checks_degraded,
    checks_unhealthy = checks_unhealthy + excluded.checks_unhealthy,
    healthy_ms = healthy_ms + excluded.healthy_ms,
    degraded_ms = degraded_ms + excluded.degraded_ms,
    unhealthy_ms = unhealthy_ms + excluded.unhealthy_ms,
    maintenance_ms = maintenance_ms + excluded.maintenance_ms
"""


@dataclass(frozen=True, slots=True)
class Transition:
    """A status change of one component, as recorded."""

    component: str
    at: float
    status: str
    previous_status: str | None
    reason_code: str
    reason: str
    maintenance: bool = False


#: The column of ``_Pending.hours`` rows that collects seconds in maintenance.
_MAINTENANCE_COLUMN = 6


@dataclass
class _Pending:
    """What the loop handed over since the last flush."""

    #: (component, hour) -> [checks by status..., seconds by status..., seconds in maintenance]
    hours: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hours) + len(self.transitions)

    def merge_older(self, older: _Pending) -> None:
        """Put back what a failed flush could not write, before what came since."""
        for key, row in older.hours.items():
            mine = self.hours.setdefault(key, [0.0] * 7)
            for i, value in enumerate(row):
                mine[i] += value
        self.transitions[:0] = older.transitions


class History:
    """Records every check into SQLite from a worker thread, and exports ``history.json``.

    :param path: the database file (created with its directory).
    :param store: where ``history_write_failures_total`` is counted.
    :param redactor: scrubs every reason before it is stored or exported.
    """

    def __init__(
        self,
        path: Path,
        store: StateStore,
        redactor: Redactor,
        *,
        retention_seconds: float,
        export_path: Path | None = None,
        details: DetailLevel = "full",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._store = store
        self._redactor = redactor
        self._retention = retention_seconds
        self._export_path = export_path
        self._details = details
        self._clock = clock
        self._components: tuple[str, ...] = ()
        self._max_gap: dict[str, float] = {}
        self._lock = threading.Lock()
        self._secrets_changed = False
        self._pending = _Pending()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Worker-thread state.
        self._db: sqlite3.Connection | None = None
        self._ids: dict[str, int] = {}
        self._last_status: dict[str, str] = {}
        self._failing = False
        self._next_export = 0.0
        self._last_export = float("-inf")
        self._export_due = False
        self._export_seconds = 0.0
        self._export = HistoryExport(redactor)
        self._cache = self._export.cache
        self._next_prune = 0.0

    @classmethod
    def for_config(
        cls, config: Config, store: StateStore, redactor: Redactor, **kwargs: Any
    ) -> History:
        """The history a daemon with ``config`` keeps."""
        history = cls(
            history_path(config),
            store,
            redactor,
            retention_seconds=config.daemon.history_retention,
            export_path=config.daemon.status_file.parent / "history.json",
            **kwargs,
        )
        history.configure(config)
        return history

    def configure(self, config: Config) -> None:
        """Take the components (and their staleness limits) of a new or reloaded config."""
        checks = config.checks()
        with self._lock:
            self._components = tuple(sorted(checks))
            self._max_gap = {
                name: STALE_INTERVALS * c.interval_seconds + c.timeout_seconds
                for name, c in checks.items()
            }
            self._details = config.daemon.status_details
            self._retention = config.daemon.history_retention
            # Entries were scrubbed with the secrets before the reload: render them afresh.
            self._secrets_changed = True

    # --- the event loop's side ---------------------------------------------------------------

    def check_completed(self, previous: ComponentState | None, state: ComponentState) -> None:
        """Count one completed check. Cheap and non-blocking: called on the event loop."""
        status = int(state.status)
        with self._lock:
            hours = self._pending.hours
            row = hours.get((state.name, _hour(state.checked_at)))
            if row is None:
                row = hours[(state.name, _hour(state.checked_at))] = [0.0] * 7
            row[status] += 1
            if previous is not None:
                start = previous.checked_at
                gap = min(state.checked_at - start, self._max_gap.get(state.name, _HOUR))
                if gap > 0:
                    # Planned work counts against nobody: the span goes to maintenance only.
                    planned = self._store.in_maintenance(state.name, start)
                    column = _MAINTENANCE_COLUMN if planned else 3 + int(previous.status)
                    _credit(hours, state.name, start, gap, column)
            if previous is None or previous.status is not state.status:
                self._pending.transitions.append(
                    Transition(
                        state.name,
                        state.checked_at,
                        state.status.label,
                        previous.status.label if previous is not None else None,
                        state.reason_code,
                        state.reason,
                        self._store.in_maintenance(state.name, state.checked_at),
                    )
                )
                # Transitions are rare (hysteresis): write them, and history.json, promptly.
                self._wake.set()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._work, name="healthd-history", daemon=True)
        self._thread.start()

    def close(self, timeout_seconds: float = 10.0) -> None:
        """Flush what is pending, export once more and stop the worker. Blocks: call it from a
        thread (``anyio.to_thread.run_sync``), never on the loop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
        else:
            self._cycle(force_export=True)
        if self._db is not None and (self._thread is None or not self._thread.is_alive()):
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def flush(self) -> None:
        """Write what is pending now, in the caller's thread (tests, ``close``)."""
        self._cycle(force_export=True)

    # --- the worker's side -------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            try:
                self._cycle(force_export=self._stopping)
            except Exception:
                # A bug here must not end history for the rest of the daemon's life.
                log.exception("history: unexpected error; retrying in %g s", FLUSH_SECONDS)
                self._failed_count()

    def _failed_count(self) -> None:
        self._store.history_write_failed()

    def _cycle(self, *, force_export: bool = False) -> None:
        with self._lock:
            pending, self._pending = self._pending, _Pending()
            components, details = self._components, self._details
            secrets_changed, self._secrets_changed = self._secrets_changed, False
        if secrets_changed:
            self._export.forget_entries()
        now = self._clock()
        try:
            db = self._open()
            changed = self._write(db, pending)
            if now >= self._next_prune:
                self._prune(db, now)
                self._next_prune = now + PRUNE_SECONDS
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc, pending)
            return
        if self._failing:
            log.info("history database %s is being written again", self._path)
            self._failing = False
        self._export_due |= changed
        gap = max(_EXPORT_MIN_SECONDS, self._export_seconds / _EXPORT_MAX_SHARE)
        due = self._export_due and now >= self._last_export + gap
        if self._export_path is not None and (due or force_export or now >= self._next_export):
            self._next_export = now + EXPORT_SECONDS
            self._last_export, self._export_due = now, False
            started = time.monotonic()
            try:
                data = self._export.render(db, components, now, details=details, ids=self._ids)
                write_atomic(self._export_path, data)
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc, _Pending())
            self._export_seconds = time.monotonic() - started

    def _failed(self, exc: Exception, pending: _Pending) -> None:
        self._failed_count()
        if not self._failing:
            log.error(
                "cannot write history %s: %s; checks go on, history is retried every %g s",
                self._path, exc, FLUSH_SECONDS,
            )  # fmt: skip
            self._failing = True
        # A broken connection (a corrupt file, say) is reopened next time.
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        with self._lock:
            self._pending.merge_older(pending)
            if len(self._pending) > MAX_PENDING_ROWS:
                log.warning(
                    "history: dropped %d pending rows while the database cannot be written",
                    len(self._pending),
                )
                self._pending = _Pending()

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._ids = dict(db.execute("SELECT name, id FROM components").fetchall())
            self._last_status = {
                name: status
                for name, status in db.execute(
                    "SELECT c.name, t.status FROM transitions t JOIN components c"
                    " ON c.id = t.component_id WHERE t.id IN"
                    " (SELECT MAX(id) FROM transitions GROUP BY component_id)"
                )
            }
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _component_id(self, db: sqlite3.Connection, name: str) -> int:
        if (known := self._ids.get(name)) is not None:
            return known
        db.execute("INSERT OR IGNORE INTO components (name) VALUES (?)", (name,))
        (found,) = db.execute("SELECT id FROM components WHERE name = ?", (name,)).fetchone()
        self._ids[name] = int(found)
        return int(found)

    def _write(self, db: sqlite3.Connection, pending: _Pending) -> bool:
        """One transaction for everything pending. Returns whether a transition was recorded."""
        recorded = False
        last_status = dict(self._last_status)
        ids = dict(self._ids)
        try:
            with db:
                for t in pending.transitions:
                    # After a restart the first result repeats the last recorded status: no change.
                    if last_status.get(t.component) == t.status:
                        continue
                    db.execute(
                        "INSERT INTO transitions (component_id, at, status, previous_status,"
                        " reason_code, reason, maintenance) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            self._component_id(db, t.component),
                            t.at,
                            t.status,
                            last_status.get(t.component, t.previous_status),
                            t.reason_code,
                            self._redactor.scrub(t.reason),
                            int(t.maintenance),
                        ),
                    )
                    last_status[t.component] = t.status
                    self._cache.incidents.pop(self._ids[t.component], None)
                    recorded = True
                pace, rows = pacer(), []
                for (name, hour), row in pending.hours.items():
                    pace()
                    rows.append((self._component_id(db, name), hour, *map(int, row[:3]),
                                 *(round(s * 1000) for s in row[3:])))  # fmt: skip
                db.executemany(_UPSERT_HOUR, rows)
        except BaseException:
            self._ids = ids  # ids inserted by the rolled-back transaction do not exist
            raise
        self._last_status = last_status
        self._export.written(rows)
        return recorded

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        self._cache.incidents.clear()  # old transitions go; settled days stay as they were
        self._export.forget_recent()  # a short retention may cut into the last two days
        cutoff = now - self._retention
        with db:
            db.execute("DELETE FROM hours WHERE hour < ?", (_hour(cutoff),))
            db.execute("DELETE FROM transitions WHERE at < ?", (cutoff,))
            db.execute(
                "DELETE FROM transitions WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER()"
                " OVER (PARTITION BY component_id ORDER BY at DESC) AS n FROM transitions)"
                " WHERE n > ?)",
                (MAX_TRANSITIONS_PER_COMPONENT,),
            )
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _hour(at: float) -> int:
    return int(at // _HOUR) * _HOUR


def _credit(
    hours: dict[tuple[str, int], list[float]], name: str, start: float, span: float, column: int
) -> None:
    """Add ``span`` seconds from ``start`` to ``column``, split at hour boundaries."""
    end = start + span
    while start < end:
        hour = _hour(start)
        piece = min(end, hour + _HOUR) - start
        row = hours.get((name, hour))
        if row is None:
            row = hours[(name, hour)] = [0.0] * 7
        row[column] += piece
        start += piece


def history_path(config: Config) -> Path:
    """``[daemon] history_file``, by default ``history.db`` beside the status file."""
    configured = config.daemon.history_file
    return configured if configured is not None else config.daemon.status_file.parent / "history.db"


# --- reading -------------------------------------------------------------------------------


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that never creates or changes the file (the CLI's)."""
    if not path.exists():
        raise FileNotFoundError(f"no history database at {path}")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)


def uptime_share(seconds: Mapping[str, float]) -> float | None:
    """Healthy or degraded time over checked time (maintenance excluded); None if unchecked."""
    checked = seconds["healthy"] + seconds["degraded"] + seconds["unhealthy"]
    if checked <= 0:
        return None
    return (seconds["healthy"] + seconds["degraded"]) / checked


def report(
    db: sqlite3.Connection, since: float, until: float, component: str | None = None
) -> dict[str, Any]:
    """Per component: checks and time by status, uptime share, and transitions in the window.

    Counts come from whole hours: the hour that contains ``since`` is included.
    """
    out: dict[str, Any] = {}
    rows = db.execute(
        "SELECT c.name, SUM(checks_healthy), SUM(checks_degraded), SUM(checks_unhealthy),"
        " SUM(healthy_ms), SUM(degraded_ms), SUM(unhealthy_ms), SUM(maintenance_ms)"
        " FROM hours h JOIN components c ON c.id = h.component_id"
        " WHERE h.hour >= ? AND h.hour < ? AND (? IS NULL OR c.name = ?)"
        " GROUP BY h.component_id ORDER BY c.name",
        (_hour(since), until, component, component),
    )
    for name, ch, cd, cu, hm, dm, um, mm in rows:
        seconds = {"healthy": hm / 1000, "degraded": dm / 1000, "unhealthy": um / 1000}
        out[name] = {
            "uptime": uptime_share(seconds),
            "checks": {"healthy": ch, "degraded": cd, "unhealthy": cu},
            "seconds": {**seconds, "maintenance": mm / 1000},
            "transitions": [],
        }
    for t in transitions(db, since, until, component):
        entry = out.setdefault(
            t.component, {"uptime": None, "checks": {}, "seconds": {}, "transitions": []}
        )
        entry["transitions"].append(
            {
                "at": iso_timestamp(t.at),
                "status": t.status,
                "previous_status": t.previous_status,
                "reason_code": t.reason_code,
                "reason": t.reason,
            }
        )
    return dict(sorted(out.items()))


def transitions(
    db: sqlite3.Connection, since: float, until: float, component: str | None = None
) -> list[Transition]:
    """Recorded transitions in ``[since, until)``, oldest first."""
    rows = db.execute(
        "SELECT c.name, at, status, previous_status, reason_code, reason FROM transitions t"
        " JOIN components c ON c.id = t.component_id"
        " WHERE at >= ? AND at < ? AND (? IS NULL OR c.name = ?) ORDER BY at, t.id",
        (since, until, component, component),
    )
    return [Transition(*row) for row in rows]


def incidents(
    db: sqlite3.Connection, component_id: int, now: float, limit: int = EXPORT_INCIDENTS
) -> list[dict[str, Any]]:
    """The last ``limit`` periods a component was not healthy, newest first.

    An incident starts when the component leaves healthy and ends when it is healthy again;
    its status is the worst it reached, with that status's first reason.
    """
    return _format_incidents(_incident_periods(db, component_id, limit), now)


def _incident_periods(db: sqlite3.Connection, component_id: int, limit: int) -> tuple[_Period, ...]:
    rows = db.execute(
        "SELECT at, status, reason_code, reason FROM transitions WHERE component_id = ?"
        " AND maintenance = 0 ORDER BY at DESC, id DESC LIMIT ?",
        (component_id, limit * 4),
    ).fetchall()
    found: list[dict[str, Any]] = []
    open_: dict[str, Any] | None = None
    for at, status, reason_code, reason in reversed(rows):  # oldest first
        if status == "healthy":
            if open_ is not None:
                open_["end"] = at
                found.append(open_)
                open_ = None
            continue
        if open_ is None:
            open_ = {"start": at, "end": None, "rank": -1}
        if Status[status.upper()] > open_["rank"]:
            open_.update(rank=Status[status.upper()], status=status)
            open_.update(reason_code=reason_code, reason=reason)
    if open_ is not None:
        found.append(open_)
    # A tuple: most components have no incident, and every empty tuple is the same object
    # (an empty list each took 0.5 MiB at 10,000 components).
    return tuple(reversed(found[-limit:]))


def _format_incidents(periods: Sequence[_Period], now: float) -> list[dict[str, Any]]:
    result = []
    for entry in periods:
        start, finish = entry["start"], entry["end"]
        result.append(
            {
                "start": iso_timestamp(start),
                "end": iso_timestamp(finish),
                "duration_seconds": round((finish if finish is not None else now) - start, 3),
                "status": entry["status"],
                "reason_code": entry["reason_code"],
                "reason": entry["reason"],
            }
        )
    return result


#: An incident as read from the transitions: start, end (None while open), worst status,
#: its reason code and reason.
_Period = dict[str, Any]


@dataclass
class ExportCache:
    """What an export can reuse from the last one: settled days, and the incidents of every
    component that recorded no transition since (the writer drops those that did)."""

    daily: DailyCache = field(default_factory=dict)
    incidents: dict[int, tuple[_Period, ...]] = field(default_factory=dict)


#: Uptime shares of whole days by day number (Unix days) and component id, kept between
#: exports: a day more than a day old no longer changes, so each export reads two days of rows
#: instead of ninety.
DailyCache = dict[int, dict[int, float]]


def daily_uptime(
    db: sqlite3.Connection, now: float, days: int = EXPORT_DAYS, cache: DailyCache | None = None
) -> tuple[float, dict[int, list[float | None]]]:
    """Per component id, the uptime share of each of the last ``days`` UTC days, oldest
    first (``None`` for a day without checked time). Returns the first day's start too."""
    cache = {} if cache is None else cache
    today = int(now // _DAY)
    first = today - days + 1
    settled = today - 1  # days before this one are final
    for day in [d for d in cache if d < first]:
        del cache[day]
    missing = [d for d in range(first, settled) if d not in cache]
    if missing:
        cache.update(_day_shares(db, min(missing), settled))
    recent = _day_shares(db, settled, today + 1)
    shares: dict[int, list[float | None]] = {}
    for day in range(first, today + 1):
        for component_id, share in (cache.get(day) or recent.get(day, {})).items():
            shares.setdefault(component_id, [None] * days)[day - first] = share
    return first * _DAY, shares


def _day_shares(db: sqlite3.Connection, first_day: int, end_day: int) -> DailyCache:
    """Shares for days ``[first_day, end_day)``; every day in the range gets an entry."""
    return {
        day: {cid: share for cid, sums in found.items() if (share := _share(sums)) is not None}
        for day, found in _day_sums(db, first_day, end_day).items()
    }


def _day_sums(
    db: sqlite3.Connection, first_day: int, end_day: int
) -> dict[int, dict[int, list[int]]]:
    """Milliseconds up and checked for days ``[first_day, end_day)``, by day and component id;
    every day in the range gets an entry."""
    found: dict[int, dict[int, list[int]]] = {day: {} for day in range(first_day, end_day)}
    rows = db.execute(
        "SELECT hour / 86400, component_id, SUM(healthy_ms + degraded_ms),"
        " SUM(healthy_ms + degraded_ms + unhealthy_ms) FROM hours WHERE hour >= ? AND hour < ?"
        " GROUP BY hour / 86400, component_id",
        (first_day * _DAY, end_day * _DAY),
    )
    for day, component_id, up_ms, checked_ms in rows:
        found[int(day)][component_id] = [up_ms, checked_ms]
    return found


def _share(sums: list[int] | None) -> float | None:
    """A day's uptime share from its milliseconds up and checked, as ``_day_shares`` rounds it."""
    if sums is None or sums[1] <= 0:
        return None
    return round(sums[0] / sums[1], 6)


def export_document(
    db: sqlite3.Connection,
    components: Iterable[str],
    now: float,
    *,
    details: DetailLevel = "full",
    cache: ExportCache | None = None,
) -> dict[str, Any]:
    """``history.json``: per component, 90 daily uptime shares and the last 50 incidents."""
    cache = ExportCache() if cache is None else cache
    ids = dict(db.execute("SELECT name, id FROM components").fetchall())
    first, shares = daily_uptime(db, now, cache=cache.daily)
    out: dict[str, Any] = {}
    for name in components:
        component_id = ids.get(name)
        daily = shares.get(component_id, [None] * EXPORT_DAYS) if component_id else None
        found = []
        if component_id is not None:
            periods = cache.incidents.get(component_id)
            if periods is None:
                periods = _incident_periods(db, component_id, EXPORT_INCIDENTS)
                cache.incidents[component_id] = periods
            found = _format_incidents(periods, now)
        if details != "full":
            for incident in found:
                del incident["reason"]
        out[name] = {"daily_uptime": daily or [None] * EXPORT_DAYS, "incidents": found}
    return {**_head(now, first), "components": out}


def _head(now: float, first_day_at: float) -> dict[str, Any]:
    """Everything in ``history.json`` before its components."""
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": iso_timestamp(now),
        "days": EXPORT_DAYS,
        "first_day": datetime.fromtimestamp(first_day_at, UTC).strftime("%Y-%m-%d"),
    }


class HistoryExport:
    """``history.json``, keeping each component's scrubbed entry until its uptime or its
    incidents change, so an export renders only what changed.

    Building, scrubbing and encoding the whole document took 0.8 s of CPU for 10,000
    components, 50 ms of it in one ``json.dumps`` call that holds the GIL (and so the event
    loop) throughout. Here an export reads the two days that still change, compares each
    component's inputs with its last entry's and joins the entries. Once a day the window moves
    and every entry is rendered again. The bytes equal
    ``status_file.render(redactor.scrub_tree(export_document(...)))``. Used from one thread at
    a time.

    :param redactor: scrubs every entry; call ``forget_entries`` when its secrets change.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        #: Settled days and incident periods; the writer drops a component's periods when it
        #: records a transition, which renders that component afresh.
        self.cache = ExportCache()
        # Without secrets a redactor scrubs nothing and costs one check.
        self._scrub = (redactor if redactor is not None else Redactor()).scrub_tree
        self._first_day = -1
        self._details = ""
        #: Uptime shares of every day but the last two (which still change), by component id.
        self._settled: dict[int, tuple[float | None, ...]] = {}
        #: The last two days' milliseconds up and checked, by day and component id: read once
        #: a day, then kept up to date from the rows the writer commits (``written``).
        self._recent: dict[int, dict[int, list[int]]] | None = None
        #: Per component, one flat tuple: the fields its entry was rendered from (none without
        #: an id), then the entry as a comma, its JSON key and a colon, then its JSON value. Flat,
        #: because a tuple holding the key's tuple stayed in the collector's sight for minutes.
        self._entries: dict[str, tuple[Any, ...]] = {}
        #: Every distinct entry value, once: components with the same days and incidents (a
        #: healthy fleet, mostly) share one, where each kept a 0.5 KiB copy.
        self._values: dict[bytes, bytes] = {}
        #: Component ids with hourly rows committed since the last ``render``: only theirs
        #: (and open incidents, and those with a new transition) can have changed.
        self._touched: set[int] = set()
        #: Incident-free values by their days: see ``_entry``.
        self._plain: dict[tuple[tuple[Any, ...], tuple[Any, ...]], bytes] = {}
        #: How many components the last ``render`` had to render afresh.
        self.rendered_components = 0

    def forget_entries(self) -> None:
        """Render every entry afresh next time (the redactor's secrets changed)."""
        self._entries.clear()
        self._values.clear()
        self._plain.clear()

    def forget_recent(self) -> None:
        """Read the last two days from the database again next time (rows were deleted)."""
        self._recent = None

    def written(self, rows: Iterable[tuple[int, ...]]) -> None:
        """Count hourly rows just committed (``_UPSERT_HOUR``'s parameters) into the last two
        days, as the database sums them."""
        self._touched.update(row[0] for row in rows)
        if self._recent is None:
            return
        recent = self._recent
        for component_id, hour, _, _, _, healthy_ms, degraded_ms, unhealthy_ms, _ in rows:
            day = recent.get(hour // _DAY)
            if day is not None:
                sums = day.setdefault(component_id, [0, 0])
                sums[0] += healthy_ms + degraded_ms
                sums[1] += healthy_ms + degraded_ms + unhealthy_ms

    def render(
        self,
        db: sqlite3.Connection,
        components: Iterable[str],
        now: float,
        *,
        details: str,
        ids: Mapping[str, int],
    ) -> bytes:
        """``history.json`` for ``components`` at ``now``, compact UTF-8 JSON.

        :param ids: the components table, name to id, as the writer keeps it.
        """
        today = int(now // _DAY)
        first = today - EXPORT_DAYS + 1
        if first != self._first_day or details != self._details:
            # A new day: yesterday settled and the oldest day left the window.
            _, shares = daily_uptime(db, now, cache=self.cache.daily)
            self._settled = {cid: tuple(daily[:-2]) for cid, daily in shares.items()}
            self._first_day, self._details = first, details
            self._entries.clear()
            self._plain.clear()
            self._recent = None
        # With the last two days read afresh, every share may have moved.
        touched: set[int] | None = self._touched if self._recent is not None else None
        self._touched = set()
        if self._recent is None:
            self._recent = _day_sums(db, today - 1, today + 1)
        yesterday, latest = self._recent[today - 1], self._recent[today]
        incidents = self.cache.incidents
        previous, entries = self._entries, {}
        fragments: list[bytes] = []
        self.rendered_components = 0
        pace = pacer()
        for name in components:
            pace()
            cached = previous.get(name)
            if cached is not None and touched is not None and self._unchanged(cached, touched):
                # No rows, no transition and no open incident since: its inputs are as they
                # were (looking at every key instead took 45 ms at 10,000 components).
                entries[name] = cached
                fragments += cached[-2:]
                continue
            cid = ids.get(name)
            periods: tuple[_Period, ...] = ()
            key: tuple[Any, ...] = ()
            if cid is not None:
                found = incidents.get(cid)
                if found is None:
                    found = incidents[cid] = _incident_periods(db, cid, EXPORT_INCIDENTS)
                periods = found
                # An incident still open lasts until now: its duration changes every export.
                until = now if periods and periods[0]["end"] is None else None
                key = (cid, _share(yesterday.get(cid)), _share(latest.get(cid)), periods, until)
            if cached is None or cached[:-2] != key:
                cached = (*key, *self._entry(name, cid, key[1:3], periods, now))
                self.rendered_components += 1
            entries[name] = cached
            fragments += cached[-2:]
        self._entries = entries
        if len(self._values) > 2 * len(entries) + 64:
            self._values = {entry[-1]: entry[-1] for entry in entries.values()}
        if fragments:
            fragments[0] = fragments[0][1:]  # no comma before the first entry
        return render_with_components(self._scrub(_head(now, first * _DAY)), fragments)

    def _unchanged(self, entry: tuple[Any, ...], touched: set[int]) -> bool:
        """Whether a cached entry still stands: the component had an id, no rows since, no
        open incident (whose duration grows), and the same incidents."""
        if len(entry) == 2:
            return False  # rendered without an id: no key before its fragments
        cid, periods, until = entry[0], entry[3], entry[4]
        return until is None and cid not in touched and self.cache.incidents.get(cid) is periods

    def _entry(
        self,
        name: str,
        cid: int | None,
        recent: tuple[Any, ...],
        periods: tuple[_Period, ...],
        now: float,
    ) -> tuple[bytes, bytes]:
        """One component's entry: a comma, its JSON key and a colon; its (shared) JSON value."""
        settled: tuple[float | None, ...] = (None,) * (EXPORT_DAYS - 2)
        if cid is not None:
            settled = self._settled.get(cid) or settled
        else:
            recent = (None, None)
        name_key = self._scrub(name)
        if periods:
            value = self._value(settled, recent, periods, now)
        else:
            # Without incidents, components with the same days share one value: rendered once
            # (a healthy fleet's first export, 10,000 values scrubbed and encoded, otherwise).
            plain = self._plain.get((settled, recent))
            if plain is None:
                if len(self._plain) >= _PLAIN_VALUES:
                    self._plain.clear()
                plain = self._plain[settled, recent] = self._value(settled, recent, (), now)
            value = plain
        return b"," + compact_json(name_key) + b":", value

    def _value(
        self,
        settled: tuple[float | None, ...],
        recent: tuple[Any, ...],
        periods: tuple[_Period, ...],
        now: float,
    ) -> bytes:
        found = _format_incidents(periods, now)
        if self._details != "full":
            for incident in found:
                del incident["reason"]
        rendered = compact_json(
            self._scrub({"daily_uptime": [*settled, *recent], "incidents": found})
        )
        return self._values.setdefault(rendered, rendered)


#: At most this many incident-free values are remembered by their days (a cache: when full,
#: it starts again).
_PLAIN_VALUES = 4096


# --- ``healthd history`` -------------------------------------------------------------------

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|h|d|w)\s*$")
_SINCE_SECONDS = {"m": 60, "h": _HOUR, "d": _DAY, "w": 7 * _DAY}


def parse_since(value: str) -> float:
    """Seconds from ``30m``, ``24h``, ``7d`` or ``2w``."""
    match = _SINCE.match(value)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"bad --since {value!r}: use 30m, 24h, 7d or 2w")
    return float(match.group(1)) * _SINCE_SECONDS[match.group(2)]


def command(
    path: Path,
    redactor: Redactor,
    *,
    component: str | None,
    since_seconds: float,
    as_json: bool,
    now: float | None = None,
) -> str:
    """What ``healthd history`` prints. Raises ``OSError`` or ``sqlite3.Error``."""
    until = time.time() if now is None else now
    since = until - since_seconds
    db = open_read_only(path)
    try:
        found = report(db, since, until + 1, component)
    finally:
        db.close()
    doc = redactor.scrub_tree(
        {"since": iso_timestamp(since), "until": iso_timestamp(until), "components": found}
    )
    if as_json:
        return json.dumps(doc, indent=2, ensure_ascii=False)
    return _table(doc)


def _table(doc: dict[str, Any]) -> str:
    rows = [("COMPONENT", "UPTIME", "CHECKED", "HEALTHY", "DEGRADED", "UNHEALTHY")]
    for name, entry in doc["components"].items():
        uptime = entry["uptime"]
        seconds = entry["seconds"]
        checked = sum(seconds.get(s, 0.0) for s in ("healthy", "degraded", "unhealthy"))
        rows.append(
            (
                name,
                "-" if uptime is None else f"{uptime * 100:.3f}%",
                _duration(checked),
                *(str(entry["checks"].get(s, 0)) for s in ("healthy", "degraded", "unhealthy")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"history from {doc['since']} to {doc['until']} (uptime over checked time)", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]  # fmt: skip
    changes = sorted(
        ((name, t) for name, entry in doc["components"].items() for t in entry["transitions"]),
        key=lambda change: change[1]["at"],
    )
    count = f"{len(changes)} transition{'' if len(changes) == 1 else 's'}"
    lines += ["", f"{count}:" if changes else "no transitions"]
    for name, t in changes:
        at = t["at"]
        before = t["previous_status"] or "unknown"
        lines.append(f"{at}  {name}  {before} -> {t['status']}  {t['reason_code']}: {t['reason']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 2 * _HOUR:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * _DAY:
        return f"{seconds / _HOUR:.1f}h"
    return f"{seconds / _DAY:.1f}d"
