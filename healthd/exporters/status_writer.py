"""The status file writer: keeps the file current without ever holding the event loop.

Rendering and writing run in a worker thread of their own; only the decision *when* to write
lives on the loop. Status changes are coalesced: however many components change, the file is
rewritten at most once per ``status_file_min_interval``, and at least once per
``status_file_refresh`` so that ``generated_at`` shows freshness.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread

from healthd.config import DaemonConfig
from healthd.exporters import status_file
from healthd.model import Snapshot
from healthd.secrets import Redactor
from healthd.state import StateStore

log = logging.getLogger("healthd")


class StatusFileWriter:
    """Writes the status file from ``store``'s snapshots and counts every attempt there.

    A failed write is logged once per run of failures, counted, and retried at the next
    refresh; the previous file stays as it was. The directory is created by ``prepare()`` at
    start only: one that vanishes later (an unmounted volume, say) fails the writes.

    :param store: where snapshots come from, and where write outcomes are counted.
    :param config: the ``[daemon]`` table: path, refresh, minimum interval and detail level.
    :param redactor: scrubs secrets from every entry.
    :param on_written: called in the worker thread with each snapshot written (or attempted).
    :param clock: the wall clock, for the last-write timestamp.
    """

    def __init__(
        self,
        store: StateStore,
        config: DaemonConfig,
        redactor: Redactor,
        *,
        on_written: Callable[[Snapshot], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._config = config
        self._redactor = redactor
        self._on_written = on_written
        self._clock = clock
        self._document = status_file.StatusDocument(redactor, config.status_details)
        self._changed = anyio.Event()
        # One thread, so writes never overlap and never queue behind other users of the pool.
        self._thread = anyio.CapacityLimiter(1)
        self._last_ok = True
        #: Loop time of the last write attempt; the watchdog judges progress by it.
        self.last_attempt = anyio.current_time()

    @property
    def path(self) -> Path:
        """Where the status file is written."""
        return self._config.status_file

    def prepare(self) -> None:
        """Create the file's directory; at start only. A failure shows in the first write."""
        with contextlib.suppress(OSError):
            self._config.status_file.parent.mkdir(parents=True, exist_ok=True)

    def changed(self) -> None:
        """A component's status changed: write soon, coalesced with other changes."""
        self._changed.set()

    def reconfigure(self, config: DaemonConfig) -> None:
        """Take a reloaded ``[daemon]`` table (and the redactor's new secrets); write soon.

        A moved file is logged once; the old one is left as it was, and its directory is not
        created (see ``prepare``).
        """
        if config.status_file != self._config.status_file:
            log.warning(
                "status_file moved from %s to %s; the old file is no longer updated",
                self._config.status_file, config.status_file,
            )  # fmt: skip
        self._config = config
        # Cached entries were scrubbed with the old secrets and rendered at the old detail level.
        self._document = status_file.StatusDocument(self._redactor, config.status_details)
        self.changed()

    async def run(self) -> None:
        """Write on every change, coalesced, and at least every refresh; until cancelled."""
        while True:
            refresh = self._config.status_file_refresh
            with anyio.move_on_after(self.last_attempt + refresh - anyio.current_time()):
                await self._changed.wait()
            # A refresh shorter than the minimum interval wins: it is the stronger promise.
            gap = min(self._config.status_file_min_interval, refresh)
            await anyio.sleep_until(self.last_attempt + gap)
            await self.write()

    async def write(self) -> None:
        """Write the file once, now, from a fresh snapshot, in the worker thread."""
        self.last_attempt = anyio.current_time()
        # Reset before the snapshot is taken, so a change during this write makes another.
        self._changed = anyio.Event()
        await anyio.to_thread.run_sync(self._write, limiter=self._thread)

    def _write(self) -> None:
        started = time.perf_counter()
        snapshot = self._store.snapshot()
        path = self._config.status_file
        try:
            status_file.write_atomic(path, self._document.render_parts(snapshot))
        except OSError as exc:
            duration = time.perf_counter() - started
            if self._last_ok:
                log.error(
                    "cannot write status file %s: %s; keeping the previous file",
                    path, exc.strerror or exc,
                )  # fmt: skip
            self._last_ok = False
            self._store.status_file_written(False, self._clock(), duration)
        else:
            duration = time.perf_counter() - started
            if not self._last_ok:
                log.info("status file %s is being written again", path)
            self._last_ok = True
            self._store.status_file_written(True, self._clock(), duration)
        if self._on_written is not None:
            self._on_written(snapshot)
