"""Worker threads that hand the GIL back to the event loop between short slices of work.

Only one thread runs Python at a time. The event loop lets the GIL go at every ``epoll_wait``
and socket call, and while an export thread renders, each of those costs the loop up to the
switch interval (1 ms) to get it back: dozens of waits in one render, a GIL convoy. At 1,000
checks a second, the status file's and history's renders made the p99 start lateness 9-22 ms
on a machine whose bare wake-ups were never more than 4 ms late; with a pause of 0.2 ms after
every 0.5 ms of work, 4.8-8.4 ms in the same hour (docs/performance.md). A pause is a real
sleep, not a bare release: a thread that lets the GIL go and asks again at once nearly always
wins it back before the waiting loop thread has woken.

A render's CPU time is unchanged; its wall time grows by at most ``REST_SECONDS`` for every
``SLICE_SECONDS`` of work. Nothing is paced until the daemon has finished its first round
(``enable``), and the loop's own thread never is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: How long a worker thread runs Python before it pauses for the loop: half the GIL switch
#: interval, so a loop thread waiting for the GIL waits at most this long. A slice of 1 ms
#: left the p99 start lateness at 9-17 ms; of 0.25 ms, no better than 0.5 ms.
SLICE_SECONDS = 0.0005
#: The pause after each slice: long enough for the loop thread to wake and take the GIL.
REST_SECONDS = 0.0002

_loop_thread: int | None = None


def enable() -> None:
    """Pace every worker thread's renders from now on; the calling thread runs the loop."""
    global _loop_thread
    _loop_thread = threading.get_ident()


def disable() -> None:
    """Stop pacing: there is no event loop left to make room for."""
    global _loop_thread
    _loop_thread = None


def pacer() -> Callable[[], None]:
    """A ``pace()`` for one long job in the calling thread: call it between small pieces of
    the work (one component, one family), and it pauses once a slice's time has run. A no-op
    on the loop's thread and when pacing is off."""
    loop = _loop_thread
    if loop is None or threading.get_ident() == loop:
        return _unpaced
    return _Pacer().pace


def _unpaced() -> None:
    pass


class _Pacer:
    """One job's slice clock."""

    __slots__ = ("_slice_started",)

    def __init__(self) -> None:
        self._slice_started = time.perf_counter()

    def pace(self) -> None:
        if time.perf_counter() - self._slice_started >= SLICE_SECONDS:
            time.sleep(REST_SECONDS)
            self._slice_started = time.perf_counter()
