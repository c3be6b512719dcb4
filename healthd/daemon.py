"""``healthd run``: wires config, scheduler, exporters, signals and systemd together.

Start-up order matters, because systemd's ``READY=1`` is a promise: bind the metrics address
(fail fast if it is taken), run the first round of checks, write the first status file, start
answering scrapes, and only then say ready.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from healthd import __version__, pacing
from healthd import config as config_module
from healthd.config import Config, ConfigError, parse_address
from healthd.control import WINDOWS_FILE_NAME, AdHocWindows, answer, serve
from healthd.exporters.metrics import MetricsServer
from healthd.exporters.status_writer import StatusFileWriter
from healthd.heartbeats import (
    PingStore,
    PushServer,
    heartbeat_shards,
    heartbeat_tokens,
    pings_path,
)
from healthd.history import History
from healthd.model import ComponentState, Snapshot
from healthd.probes import SharedResources
from healthd.scheduler import Scheduler, startup_spread
from healthd.secrets import Redactor
from healthd.state import StateStore
from healthd.watchdog import Notifier, feed_watchdog

log = logging.getLogger("healthd")

#: Slack added to the first round's bound and the writer's progress check.
_GRACE_SECONDS = 5.0
#: How often the loop-lag sampler wakes: ten wake-ups a second cost nothing measurable.
LOOP_LAG_PERIOD_SECONDS = 0.1
#: How long a thread rendering an export may keep the GIL while the event loop waits for it.
#: The loop gives the GIL up on every socket call and waits up to this long to get it back:
#: at Python's default of 5 ms, scraping 2,000 components once a second held the loop for up
#: to 5 s (lag p99 0.3-3 s); at 1 ms, lag p99 was 9 ms and the maximum under 25 ms, the same
#: as with no scrapes at all (2026-11-29, 2 vCPUs shared, load average 4-6).
GIL_SWITCH_INTERVAL_SECONDS = 0.001
#: The collector's thresholds once started (Python's are 700, 10, 10). With no cyclic garbage
#: on the probe path, a collection of the older generations finds nothing and only holds the
#: loop: at 1,000 checks a second, one of up to 8 ms every second (CPU time, measured
#: 2026-11-29). Ten times rarer, such holds delay about 0.1% of starts, out of the p99.
GC_THRESHOLDS = (700, 100, 10)


class MetricsAddressInUse(Exception):
    """The metrics address cannot be bound. Often transient, so not a config error."""


class PushAddressInUse(MetricsAddressInUse):
    """The push address cannot be bound: a listener address in use, like the metrics one."""


def summary_line(snapshot: Snapshot) -> str:
    """``7 healthy, 1 degraded, 0 unhealthy; overall degraded``: for STATUS= and logs."""
    return f"{snapshot.summary_text()}; overall {snapshot.overall.label}"


class Daemon:
    """One running healthd. ``run()`` returns when a SIGTERM or SIGINT has been handled."""

    def __init__(
        self,
        path: Path,
        config: Config,
        redactor: Redactor,
        *,
        notifier: Notifier | None = None,
        stall_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._config = config
        self._redactor = redactor
        self._notifier = notifier or Notifier()
        self._clock = clock
        self.store = StateStore(clock)
        self._notifier.on_dropped = self.store.notify_dropped
        self.store.config_loaded(
            True,
            clock(),
            slo_objectives=_slo_objectives(config),
            shard=config.daemon.shard_numbers(),
        )
        self.history = History.for_config(config, self.store, redactor, clock=clock)
        self._last_status_line = ""
        self.status_writer = StatusFileWriter(
            self.store, config.daemon, redactor, on_written=self._announce, clock=clock
        )
        # READY=1 is a promise; a SIGHUP before it is kept for later, so that a reload's
        # READY=1 can never announce a daemon whose first round has not finished.
        self._ready = False
        self._reload_requested = False
        # The last pings of job heartbeats: pushed in by the listener's thread, read by the
        # heartbeat probes on the loop.
        self.pings = PingStore(pings_path(config), clock)
        # Ad hoc maintenance from the CLI, kept beside the status file across restarts.
        self.adhoc = AdHocWindows(config.daemon.status_file.with_name(WINDOWS_FILE_NAME), clock)
        self.adhoc.load()
        self._apply_windows()
        self.pings.load()
        tokens = heartbeat_tokens(config)
        self.pings.watch(tokens)
        shared = SharedResources()
        shared.heartbeats = self.pings
        # Concurrency and spread come from each config applied, so a reload resizes them.
        self.scheduler = Scheduler(
            self.store,
            shared=shared,
            clock=clock,
            stall_file=stall_file,
            on_change=self._status_changed,
            on_result=self.history.check_completed,
        )
        host, port = parse_address(config.daemon.metrics_address)
        try:
            self.metrics = MetricsServer(
                host,
                port,
                self.store.snapshot,
                __version__,
                check_duration_histogram=config.daemon.check_duration_histogram,
            )
        except OSError as exc:
            raise MetricsAddressInUse(
                f"cannot listen on metrics_address {config.daemon.metrics_address}: "
                f"{exc.strerror or exc}"
            ) from None
        self.push: PushServer | None = None
        try:
            self.push = self._push_server(config)
        except PushAddressInUse:
            self.metrics.stop()
            raise

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT; then cancel probes and write the last status."""
        previous_switch_interval = sys.getswitchinterval()
        previous_gc_thresholds = gc.get_threshold()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
        self.history.start()
        pauses = CollectorPauses()
        gc.callbacks.append(pauses)
        # Modules, the config and every check's settings live as long as the daemon: out of
        # the collector's sight before the first round, whose full collections walked them
        # all, 24-54 ms each at 10,000 checks (docs/performance.md).
        _freeze_startup_objects()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._handle_signals, tg.cancel_scope)
                tg.start_soon(measure_loop_lag, self.store, LOOP_LAG_PERIOD_SECONDS, pauses)
                self.status_writer.prepare()
                if self.push is not None:
                    # At once: a job that finishes while the first round runs is heard.
                    self.push.start()
                    self.push.persist_soon()
                    log.info("heartbeat pings on http://%s:%d/ping/NAME", *self.push.address)
                tg.start_soon(self.scheduler.run, self._config)
                tg.start_soon(self._serve_control)
                await self._first_round()
                await self.status_writer.write()
                _freeze_startup_objects()
                # Counted now, before READY: a collection is timed when the sampler next wakes.
                self.store.gc_paused(pauses.drain())
                # From here a late check is an untrue one: renders beside the loop make room
                # for it. Before READY, the first round and the first write want to finish.
                pacing.enable()
                self.metrics.start()
                host, port = self.metrics.address
                # Not a local of this frame, which lives as long as the daemon: a snapshot kept
                # there held every first-round state, 7 MiB at 10,000 checks once all had run
                # again (docs/performance.md).
                summary = summary_line(self.store.snapshot())
                log.info(
                    "ready: %s; metrics on http://%s:%d/metrics, status file %s",
                    summary, host, port, self.status_writer.path,
                )  # fmt: skip
                self._notifier.ready(summary)
                self._ready = True
                if self._reload_requested:
                    self.reload()
                tg.start_soon(self.status_writer.run)
                if self._notifier.watchdog_seconds:
                    tg.start_soon(
                        feed_watchdog,
                        self._notifier,
                        self._notifier.watchdog_seconds / 2,
                        self.stuck,
                    )
        finally:
            with anyio.CancelScope(shield=True):
                await self.status_writer.write()
                await anyio.to_thread.run_sync(self.history.close)
            self.metrics.stop()
            if self.push is not None:
                self.push.stop()
            self._notifier.close()
            pacing.disable()
            sys.setswitchinterval(previous_switch_interval)
            gc.set_threshold(*previous_gc_thresholds)
            gc.callbacks.remove(pauses)

    async def _first_round(self) -> None:
        checks = self._config.checks().values()
        bound = startup_spread(self._config) + _GRACE_SECONDS
        bound += max((c.timeout_seconds for c in checks), default=0.0)
        with anyio.move_on_after(bound):
            await self.scheduler.first_round_done.wait()
        if missing := self.scheduler.mark_unchecked(self._clock()):
            log.warning(
                "first round took longer than %.1f s; not checked yet: %s",
                bound,
                ", ".join(missing),
            )

    def _apply_windows(self) -> None:
        self.store.set_windows(self._config.windows() + self.adhoc.windows())

    def _control(self, line: bytes) -> dict[str, Any]:
        reply = answer(line, self.adhoc, self._config.checks(), self.store.windows, self._clock())
        self._apply_windows()
        self.status_writer.changed()
        return reply

    async def _serve_control(self) -> None:
        path = self._config.daemon.control_socket
        try:
            await serve(path, self._control)
        except FileNotFoundError:
            # Outside systemd (no RuntimeDirectory=) the default directory is usually absent.
            log.warning(
                "no directory for control_socket %s; `healthd maintenance` will not reach this "
                "daemon", path,
            )  # fmt: skip
        except OSError as exc:
            log.error(
                "cannot listen on control_socket %s: %s; `healthd maintenance` will not reach "
                "this daemon", path, exc.strerror or exc,
            )  # fmt: skip

    def stuck(self) -> list[str]:
        """What is not making progress: lagging checks, or a status writer that stopped.

        The writer counts as alive while it keeps *attempting* writes: a full disk is reported
        through metrics and the log, because a restart by the watchdog would not empty it.
        """
        now = anyio.current_time()
        problems = self.scheduler.lagging(now, _GRACE_SECONDS)
        if (
            now - self.status_writer.last_attempt
            > 2 * self._config.daemon.status_file_refresh + _GRACE_SECONDS
        ):
            problems.append("status file writer")
        return problems

    # --- status file -------------------------------------------------------------------------

    def _status_changed(self, previous: ComponentState | None, state: ComponentState) -> None:
        self.status_writer.changed()

    def _announce(self, snapshot: Snapshot) -> None:
        # In the writer's thread: the summary walks every component, so it stays off the loop.
        line = summary_line(snapshot)
        if line != self._last_status_line:
            self._notifier.status(line)
            self._last_status_line = line

    # --- signals and reload -------------------------------------------------------------------

    async def _handle_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if self._ready:
                        self.reload()
                    else:
                        log.info("received SIGHUP while starting; reloading once ready")
                        self._reload_requested = True
                    continue
                log.info("received %s; stopping", signal.Signals(signum).name)
                self._notifier.stopping()
                scope.cancel()
                return

    def reload(self) -> bool:
        """Re-read the config; apply it if valid, else keep the running one. Returns success.

        Unchanged components keep their state (hysteresis counters, ``since``); new ones
        start at once; removed ones stop and their metric series go with them. systemd hears
        ``RELOADING=1`` with ``MONOTONIC_USEC=`` first and ``READY=1`` when it is over, whatever
        the outcome, as ``Type=notify-reload`` expects.
        """
        self._reload_requested = False
        self._notifier.reloading()
        try:
            try:
                new = config_module.load(self._path)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload failed, keeping the running config: %s", problem)
                self.store.config_loaded(False, self._clock())
                return False
            if new.daemon.metrics_address != self._config.daemon.metrics_address:
                log.warning("metrics_address changed; it takes effect at the next restart")
            try:
                # Bound before anything changes: a busy port keeps the running config whole.
                opened = None if self.push is not None else self._push_server(new)
            except PushAddressInUse as exc:
                log.error("reload failed, keeping the running config: %s", exc)
                self.store.config_loaded(False, self._clock())
                return False
            self._redactor.replace(new.secrets())
            self._reload_heartbeats(new)
            if opened is not None:
                self.push = opened
                opened.start()
                opened.persist_soon()
                log.info("heartbeat pings on http://%s:%d/ping/NAME", *opened.address)
            self._config = new
            self.scheduler.apply(new)
            self.history.configure(new)
            self.adhoc.forget(new.components)
            self._apply_windows()
            self.status_writer.reconfigure(new.daemon)
            self.store.config_loaded(
                True,
                self._clock(),
                slo_objectives=_slo_objectives(new),
                shard=new.daemon.shard_numbers(),
            )
            log.info("reloaded %s: %d components", self._path, len(new.components))
            return True
        finally:
            self._notifier.ready(self._last_status_line or "reloaded")

    def _reload_heartbeats(self, new: Config) -> None:
        tokens = heartbeat_tokens(new)
        self.pings.watch(tokens)
        if self.push is not None:
            if new.daemon.push_address != self._config.daemon.push_address:
                log.warning("push_address changed; it takes effect at the next restart")
            self.push.configure(tokens, heartbeat_shards(new))
            self.push.persist_soon()

    def _push_server(self, config: Config) -> PushServer | None:
        """The push listener, bound, if ``config`` has a heartbeat to receive or to send on
        to its shard: no port is opened for nothing."""
        tokens, elsewhere = heartbeat_tokens(config), heartbeat_shards(config)
        if not (tokens or elsewhere):
            return None
        address = config.daemon.push_address
        try:
            return PushServer(*parse_address(address), self.pings, tokens, elsewhere)
        except OSError as exc:
            reason = exc.strerror or exc
            raise PushAddressInUse(f"cannot listen on push_address {address}: {reason}") from None


def _slo_objectives(config: Config) -> dict[str, float]:
    return {name: c.slo for name, c in config.checks().items() if c.slo is not None}


class CollectorPauses:
    """Times every collection of the cyclic garbage collector, as a ``gc.callbacks`` entry.

    A collection holds the GIL, so in whichever thread it runs the event loop waits as long;
    the lag sampler sees a hold of H ms only with a chance of H over its period, this sees
    them all. The callback runs inside the collection, where the collecting thread may hold
    the store's lock, so it only queues each pause; ``drain`` hands them over from the loop.
    Collections never overlap (one thread at a time holds the GIL), hence one start time.
    """

    def __init__(self) -> None:
        self._started = 0.0
        # A deque appends under the GIL alone; bounded, in case nobody drains it.
        self._pauses: deque[tuple[int, float]] = deque(maxlen=4096)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))

    def drain(self) -> list[tuple[int, float]]:
        """The pauses since the last call, oldest first."""
        pauses = []
        while self._pauses:
            pauses.append(self._pauses.popleft())
        return pauses


async def measure_loop_lag(
    store: StateStore, period_seconds: float, pauses: CollectorPauses
) -> None:
    """Sleep ``period_seconds`` at a time and count how late each wake-up came: anything that
    holds the event loop (a long synchronous call, a collection, a render) shows here. Each
    wake-up also hands the collector's ``pauses`` to the store.

    Timed by ``perf_counter``, not the loop's clock: uvloop's counts whole milliseconds, so a
    lag read 0, 1, 2 ms..., and one of 5 ms, a hair over by float rounding, fell in the 10 ms
    bucket. The loop's own timer rounding now shows as the fraction of a millisecond it is.
    """
    expected = time.perf_counter() + period_seconds
    while True:
        await anyio.sleep(max(0.0, expected - time.perf_counter()))
        now = time.perf_counter()
        store.loop_lag(max(0.0, now - expected))
        store.gc_paused(pauses.drain())
        expected = now + period_seconds


def _freeze_startup_objects() -> None:
    """Move everything alive now out of the garbage collector's sight: before the first round
    (modules, the config) and after it (one HTTP client per check, the first states).

    They make a large heap that never becomes garbage, yet every full collection walked it:
    with 1,000 checks a second, 17 full collections in 25 s paused the event loop for up to
    185 ms each (1.8 s in all), and every probe in flight counted the pause as latency. What
    is created later is collected less often than Python's default (see ``GC_THRESHOLDS``).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: Buffers at least this large are mapped on their own and go back to the system when freed
#: (glibc's ``M_MMAP_THRESHOLD``, whose default this is). Left alone, glibc raises the
#: threshold after the first large buffer is freed, so the text of every later scrape (10.8 MB
#: at 10,000 components) came from the heap and stayed there: fixed, RSS 198 -> 148 MiB (the
#: bench's memory row, docs/performance.md).
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold (see ``MMAP_THRESHOLD_BYTES``); whether it was set.

    An operator's ``MALLOC_MMAP_THRESHOLD_`` wins. Elsewhere than glibc, nothing is done.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open descriptors to the hard limit, and log the result.

    Every probe, scrape and status-file write needs a descriptor, and running out is
    healthd's own trouble, never the target's: systemd's default soft limit (1,024) was
    exhausted by a thousand idle metrics connections. The unit's ``LimitNOFILE=`` sets the
    hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
            return
        log.info("raised the open-descriptor limit from %d to %d", soft, hard)
    else:
        log.info("open-descriptor limit: %d", soft)


def stall_file_from_env() -> Path | None:
    """The test hook that makes each check block the loop while a file exists."""
    value = os.environ.get("HEALTHD_TEST_STALL_FILE")
    return Path(value) if value else None
