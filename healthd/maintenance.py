"""Maintenance windows: when planned work takes a component out of the verdict.

Pure arithmetic, no clock: callers pass ``now`` (Unix seconds). A window is either fixed
(``start``/``end``, from the config or from ``healthd maintenance start``) or weekly
(``"Sun 02:00-03:00"`` in a zoneinfo time zone, which may cross midnight and DST changes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from healthd.model import Maintenance

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKLY = re.compile(
    r"^\s*([A-Za-z]{3})\s+(\d{1,2}):(\d{2})\s*-\s*(?:([A-Za-z]{3})\s+)?(\d{1,2}):(\d{2})\s*$"
)


@dataclass(frozen=True, slots=True)
class Weekly:
    """A weekly window: starts on weekday ``start_day`` (0 = Monday) at ``start`` local time and
    lasts until ``end_day`` at ``end``; an end not after the start is in the next week."""

    start_day: int
    start: time
    end_day: int
    end: time
    timezone: str = "UTC"

    def occurrences(self, now: float) -> Iterator[tuple[float, float]]:
        """``(start, end)`` in Unix seconds of the occurrences around ``now``, in order."""
        zone = ZoneInfo(self.timezone)
        today = datetime.fromtimestamp(now, zone).date()
        days = (self.end_day - self.start_day) % 7
        if days == 0 and self.end <= self.start:
            days = 7
        # The occurrence that started up to two weeks ago may still run; next week's is next.
        first = today - timedelta(days=(today.weekday() - self.start_day) % 7 + 7)
        for week in range(3):
            day: date = first + timedelta(days=7 * week)
            begin = datetime.combine(day, self.start, zone).timestamp()
            finish = datetime.combine(day + timedelta(days=days), self.end, zone).timestamp()
            yield begin, finish


def parse_weekly(text: str, timezone: str = "UTC") -> Weekly:
    """``"Sun 02:00-03:00"`` or ``"Fri 22:00-Mon 06:00"``; ``ValueError`` saying what is wrong."""
    m = _WEEKLY.match(text)
    if m is None:
        raise ValueError(f"weekly {text!r}: expected 'DAY HH:MM-HH:MM', such as 'Sun 02:00-03:00'")
    start_day, sh, sm, end_day, eh, em = m.groups()
    days = []
    for name in (start_day, end_day or start_day):
        if name.lower() not in DAYS:
            raise ValueError(f"weekly {text!r}: unknown day {name!r}; use Mon, Tue, ... Sun")
        days.append(DAYS.index(name.lower()))
    times = []
    for hour, minute in ((sh, sm), (eh, em)):
        if int(hour) > 23 or int(minute) > 59:
            raise ValueError(f"weekly {text!r}: {hour}:{minute} is not a time of day")
        times.append(time(int(hour), int(minute)))
    if end_day is None and times[1] == times[0]:
        raise ValueError(f"weekly {text!r}: the window is empty")
    if end_day is None and times[1] < times[0]:
        days[1] = (days[0] + 1) % 7  # "Sat 23:00-01:00" ends on Sunday
    return Weekly(days[0], times[0], days[1], times[1], timezone)


@dataclass(frozen=True, slots=True)
class Window:
    """Planned maintenance of ``components``: fixed (``start``/``end``) or ``weekly``."""

    components: tuple[str, ...]
    reason: str
    source: str  # "config" or "cli"
    start: float = -math.inf
    end: float = math.inf
    weekly: Weekly | None = None

    def spans(self, now: float) -> Iterator[tuple[float, float]]:
        """The ``(start, end)`` spans of this window that matter around ``now``."""
        if self.weekly is None:
            yield self.start, self.end
        else:
            yield from self.weekly.occurrences(now)


def active(windows: Iterable[Window], now: float) -> tuple[Mapping[str, Maintenance], float]:
    """The maintenance each component is in at ``now`` (the latest-ending window wins), and
    the next instant (Unix seconds, ``inf`` if none) at which that may change."""
    found: dict[str, Maintenance] = {}
    boundary = math.inf
    for window in windows:
        for begin, finish in window.spans(now):
            if begin <= now < finish:
                boundary = min(boundary, finish)
                for name in window.components:
                    held = found.get(name)
                    if held is None or finish > held.until:
                        found[name] = Maintenance(finish, window.reason, window.source)
            elif begin > now:
                boundary = min(boundary, begin)
    return found, boundary


def covers(windows: Iterable[Window], name: str, at: float) -> bool:
    """Whether one of ``windows`` holds ``name`` in maintenance at ``at``."""
    return any(
        begin <= at < finish
        for window in windows
        if name in window.components
        for begin, finish in window.spans(at)
    )
