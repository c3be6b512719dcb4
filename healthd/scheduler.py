"""The scheduler: drift-free, deadline-bound, and blind to protocols.

Each check starts at ``t0 + offset + k * interval``; the offset is a deterministic jitter from
the component's name. The first round is staggered over ``startup_spread`` (1 ms per check,
2 ms beyond 1,000, by default, so first verdicts come quickly); from the second run on, each
check keeps its phase within its whole interval, so that 10,000 checks every minute start
evenly through the minute instead of in a burst each round.
A check's next start is scheduled only when its run ends, so a check can never overlap itself,
and a probe that overruns its interval skips the ticks it missed instead of bunching them up.

One dispatcher task keeps every check's next start in a heap and hands each due check to an
idle worker task, starting a new worker only when none is idle. An idle check holds no task:
at 10,000 checks, a task per check (its coroutine frames, cancel scope and timer) was about a
third of the daemon's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel

from healthd import classify
from healthd.config import CheckBase, Config
from healthd.findings import format_seconds
from healthd.model import ComponentState, Failure, Observation, Status
from healthd.probes import PROBES, ProbeContext, ProbeKind, SharedResources
from healthd.probes._errors import RESOURCE_EXHAUSTED, resource_failure
from healthd.state import STALE_INTERVALS, StateStore

log = logging.getLogger("healthd.scheduler")

#: Start times are rounded up to this grid (finer for very short intervals).
MAX_WAKEUP_GRANULARITY_SECONDS = 0.005

#: A shortage of healthd's own resources is over once checks have run without one this long;
#: until then it is one episode, logged once, however often checks fail and succeed in turn.
RESOURCE_EPISODE_QUIET_SECONDS = 10.0


def phase_offset(name: str, interval_seconds: float, spread_seconds: float) -> float:
    """Where in ``[0, min(spread, interval))`` a component's checks start: stable per name."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    fraction = int.from_bytes(digest, "big") / 2**64
    return fraction * min(spread_seconds, interval_seconds)


def wakeup_granularity(interval_seconds: float) -> float:
    """The grid that start times are rounded up to, so that checks due within a few
    milliseconds of each other share one wake-up of the event loop.

    Each wake-up costs an ``epoll_wait`` and a pass of the loop: 75 us of CPU here, measured
    with 1,000 timers a second; a 10 ms grid cut that to 14 us per check. But the checks of
    one wake-up start one after another, so a coarse grid makes the last of a batch late:
    at 1,000 checks a second a 5 ms grid halved the p99 start lateness of a 10 ms one, for
    about 10% more CPU per probe (docs/performance.md). The rounding never accumulates,
    because the next start is computed from the exact one.
    """
    return min(MAX_WAKEUP_GRANULARITY_SECONDS, interval_seconds / 50)


#: Slots per expected probe in flight, and slots always there: a burst of starts, or hung
#: targets beyond the config's own share, still finds a free slot.
CONCURRENCY_HEADROOM = 2.0
CONCURRENCY_FLOOR = 64
#: The default first round starts this many checks a second for its first thousand checks: a
#: second's burst of short probes is absorbed, and a fleet of 1,000 is ready in under 2 s.
STARTUP_CHECKS_PER_SECOND = 1000.0
#: ... and this many beyond: the rate one core sustains for first runs, which build each
#: check's client and request and so cost about 1 ms of CPU at 10,000 checks. At 1,000 a
#: second the first round of 10,000 kept the loop saturated (10.5 s of CPU in 11.2 s), probes
#: queued by the thousand (2,200-6,700 tasks) and RSS peaked at 134-167 MiB, a high-water mark
#: the heap kept; at 500 a second, 80 tasks and 111-115 MiB (2026-11-30, docs/performance.md).
LARGE_STARTUP_CHECKS_PER_SECOND = 500.0


def concurrency_limit(config: Config) -> int:
    """``max_concurrency`` if set, else enough slots that a hung target never delays another.

    A check never overlaps itself, so it holds a slot for at most ``timeout / interval`` of the
    time even when its target hangs until the timeout: the sum over checks is the most slots
    the config can keep busy on average. Twice that, plus 64, absorbs phase bunching; more than
    one slot per check is never needed, since no check can use a second one.
    """
    if config.daemon.max_concurrency is not None:
        return config.daemon.max_concurrency
    checks = config.checks().values()
    share = sum(c.timeout_seconds / c.interval_seconds for c in checks)
    return max(1, min(len(checks), math.ceil(CONCURRENCY_HEADROOM * share) + CONCURRENCY_FLOOR))


def startup_spread(config: Config) -> float:
    """``startup_spread`` if set, else 1 ms per check for the first 1,000 and 2 ms for each
    beyond: a first round of 10 checks starts within 10 ms, one of 1,000 within a second, one
    of 10,000 within 19 s, and no burst exceeds what one core can probe."""
    if config.daemon.startup_spread is not None:
        return config.daemon.startup_spread
    checks = len(config.checks())
    small = min(checks, int(STARTUP_CHECKS_PER_SECOND))
    return small / STARTUP_CHECKS_PER_SECOND + (checks - small) / LARGE_STARTUP_CHECKS_PER_SECOND


def stale_after(check: CheckBase) -> float:
    """How old a component's last result may get before its verdict is ``stale``."""
    return STALE_INTERVALS * check.interval_seconds + check.timeout_seconds


#: A worker idle for this long ends; a burst of runs leaves no crowd of idle tasks behind.
IDLE_WORKER_SECONDS = 10.0


@dataclass(slots=True, eq=False)
class _Check:
    """One configured check between runs: what to run, and when next."""

    name: str
    check: CheckBase
    kind: ProbeKind
    ctx: ProbeContext
    #: Loop time of the next start, exact (the wake-up is this rounded up to the grid).
    next_start: float
    #: Loop time of the last completed check; the watchdog reads it to judge progress.
    last_completed: float
    #: Added once, after the first run: from the phase within the start-up spread to the
    #: phase within the whole interval (the same fraction of each).
    phase_shift: float = 0.0
    #: The scope of the run in flight, ``None`` between runs.
    scope: anyio.CancelScope | None = None
    #: Removed or replaced by a reload: its pending start is dropped, its run cancelled.
    removed: bool = False


@dataclass(slots=True, eq=False)
class _Worker:
    """A task that runs one check at a time, handed to it by the dispatcher."""

    wake: anyio.Event
    job: _Check | None = None
    #: The job's wake-up time on the grid, from which its lateness is measured.
    scheduled: float = 0.0
    idle_since: float = 0.0


@dataclass
class _Shortage:
    """An episode of healthd running short of its own resources."""

    last_seen: float
    missed_checks: int = 0


class Scheduler:
    """Runs every configured check on its own interval and records the results in ``store``.

    :param store: where states go.
    :param max_concurrency: how many probes may be in flight at once; ``None`` sizes it from
        each config applied (see ``concurrency_limit``).
    :param startup_spread_seconds: the first round is staggered over this much time; ``None``
        takes it from each config applied (see ``startup_spread``).
    :param probes: the kind -> probe table; tests may pass their own.
    :param on_change: called with the old and new state whenever a status changes.
    :param on_result: called with the old and new state after every check (history).
    :param stall_file: a test hook: while this file exists, each check blocks the event loop,
        as a stuck synchronous call would, so tests can prove the watchdog notices.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        max_concurrency: int | None = None,
        startup_spread_seconds: float | None = None,
        probes: Mapping[str, ProbeKind] = PROBES,
        shared: SharedResources | None = None,
        clock: Callable[[], float] = time.time,
        stall_file: Path | None = None,
        on_change: Callable[[ComponentState | None, ComponentState], None] | None = None,
        on_result: Callable[[ComponentState | None, ComponentState], None] | None = None,
    ) -> None:
        self._store = store
        self._max_concurrency = max_concurrency
        self._limiter = anyio.CapacityLimiter(max_concurrency or CONCURRENCY_FLOOR)
        self._spread = startup_spread_seconds
        self._probes = probes
        self._shared = shared or SharedResources()
        self._clock = clock
        self._stall_file = stall_file
        self._on_change = on_change
        self._on_result = on_result
        self._running: dict[str, _Check] = {}
        #: Whether states keep each check's latency histogram: only when it is exported.
        self._track_durations = True
        #: Every check's next start: (wake-up time, sequence number) in a heap, and the check
        #: by its number in ``_pending``. The collector stops tracking a tuple of numbers at
        #: once; one holding the check stayed in its sight until the start (docs/performance.md).
        self._due: list[tuple[float, int]] = []
        self._pending: dict[int, _Check] = {}
        self._sequence = itertools.count()
        self._idle: deque[_Worker] = deque()
        self._dispatch_at = math.inf
        self._dispatch_wake = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._first_round_pending: set[str] = set()
        self.first_round_done = anyio.Event()
        self._shortage: _Shortage | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, config: Config) -> None:
        """Run until cancelled. ``first_round_done`` is set once every check has run once."""
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self._first_round_pending = set(config.checks())
                if not self._first_round_pending:
                    self.first_round_done.set()
                self.apply(config)
                await self._dispatch(tg)
        finally:
            for entry in self._running.values():
                await _close(entry.ctx)

    def apply(self, config: Config) -> None:
        """Bring the running checks in line with ``config``.

        Unchanged checks keep running with their history; changed ones restart with a fresh
        history, new ones start at once, removed ones stop and their state is dropped.
        """
        tg = self._task_group
        assert tg is not None, "apply() needs run() to be running"
        self._follow(config)
        spread = startup_spread(config) if self._spread is None else self._spread
        wanted = config.checks()
        for kind in {check.kind for check in wanted.values()}:
            # Imports the kind's module now, before any probe runs, rather than mid-round.
            self._probes[kind]
        for name, entry in list(self._running.items()):
            if wanted.get(name) != entry.check:
                entry.removed = True
                del self._running[name]
                self._store.remove(name)
                if entry.scope is not None:
                    entry.scope.cancel()  # its worker closes the context when the run ends
                else:
                    tg.start_soon(_close, entry.ctx)
        start = anyio.current_time()
        for name, check in wanted.items():
            if name not in self._running:
                interval = check.interval_seconds
                offset = phase_offset(name, interval, spread)
                entry = _Check(
                    name,
                    check,
                    self._probes[check.kind],
                    ProbeContext(self._shared, name),
                    next_start=start + offset,
                    last_completed=start,
                    phase_shift=phase_offset(name, interval, interval) - offset,
                )
                self._running[name] = entry
                self._schedule(entry)

    def _follow(self, config: Config) -> None:
        """Take the settings that come from each config applied rather than from a check."""
        self._limiter.total_tokens = self._max_concurrency or concurrency_limit(config)
        self._track_durations = config.daemon.check_duration_histogram

    def lagging(self, now: float, grace_seconds: float) -> list[str]:
        """Checks that have not completed within two intervals and a timeout: a stuck loop."""
        return [
            name
            for name, running in self._running.items()
            if now - running.last_completed
            > 2 * running.check.interval_seconds + running.check.timeout_seconds + grace_seconds
        ]

    # --- one check ---------------------------------------------------------------------------

    def _schedule(self, entry: _Check) -> None:
        granularity = wakeup_granularity(entry.check.interval_seconds)
        wake_at = math.ceil(entry.next_start / granularity) * granularity
        sequence = next(self._sequence)
        self._pending[sequence] = entry
        heapq.heappush(self._due, (wake_at, sequence))
        if wake_at < self._dispatch_at:
            self._dispatch_wake.set()

    async def _dispatch(self, tg: anyio.abc.TaskGroup) -> None:
        """Hand every due check to a worker; sleep until the next one is due."""
        due = self._due
        while True:
            now = anyio.current_time()
            while due and due[0][0] <= now:
                wake_at, sequence = heapq.heappop(due)
                entry = self._pending.pop(sequence)
                if entry.removed:
                    continue
                if self._idle:
                    worker = self._idle.pop()
                    worker.job, worker.scheduled = entry, wake_at
                    worker.wake.set()
                else:
                    tg.start_soon(self._work, _Worker(anyio.Event(), entry, wake_at))
            while self._idle and now - self._idle[0].idle_since > IDLE_WORKER_SECONDS:
                self._idle.popleft().wake.set()  # no job: the worker ends
            self._dispatch_at = due[0][0] if due else math.inf
            self._dispatch_wake = anyio.Event()
            with anyio.CancelScope(deadline=self._dispatch_at):
                await self._dispatch_wake.wait()

    async def _work(self, worker: _Worker) -> None:
        """Run checks one at a time as the dispatcher hands them over; end when idle long."""
        while (job := worker.job) is not None:
            await self._run_scheduled(job, worker.scheduled)
            worker.job = None
            worker.wake = anyio.Event()
            worker.idle_since = anyio.current_time()
            self._idle.append(worker)
            await worker.wake.wait()

    async def _run_scheduled(self, entry: _Check, scheduled: float) -> None:
        if entry.removed:
            return  # removed between its hand-over and this worker's turn; already closed
        entry.scope = scope = anyio.CancelScope()
        try:
            with scope:
                await self.run_once(
                    entry.name, entry.check, entry.kind, entry.ctx, scheduled=scheduled
                )
        finally:
            entry.scope = None
            if entry.removed:
                await _close(entry.ctx)
        if entry.removed:
            return
        now = anyio.current_time()
        entry.last_completed = now
        self._first_round_complete(entry.name)
        interval = entry.check.interval_seconds
        # Less than one interval, once: no gap between two runs reaches two intervals.
        next_start = entry.next_start + interval + entry.phase_shift
        entry.phase_shift = 0.0
        if next_start <= now:
            # Overran (or the loop was stalled): keep the phase, skip missed ticks.
            next_start += math.ceil((now - next_start) / interval) * interval
        entry.next_start = next_start
        self._schedule(entry)

    def _first_round_complete(self, name: str) -> None:
        if name in self._first_round_pending:
            self._first_round_pending.discard(name)
            if not self._first_round_pending:
                # An emptied set keeps its table (0.5 MiB for 10,000 names): let it go.
                self._first_round_pending = set()
                self.first_round_done.set()

    async def run_once(
        self,
        name: str,
        check: CheckBase,
        kind: ProbeKind,
        ctx: ProbeContext,
        *,
        scheduled: float | None = None,
    ) -> ComponentState:
        """Probe once under the concurrency limit and the check's deadline; record the result."""
        try:
            # The uncontended case takes a slot without yielding: ``async with limiter`` costs
            # two extra passes of the event loop per check.
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self._limiter.acquire()
        try:
            if self._stall_file is not None:
                self._stall_while_file_exists(self._stall_file)
            if scheduled is not None:
                self._store.check_started(anyio.current_time() - scheduled)
            observation = await self._probe_and_count(name, check, kind, ctx)
        finally:
            self._limiter.release()
        # A check cancelled by a reload while its probe finished must not record a stale result.
        await anyio.lowlevel.checkpoint_if_cancelled()
        previous = self._store.get(name)
        if observation.failure is not None and observation.failure.code == RESOURCE_EXHAUSTED:
            return self._keep_verdict(name, check, previous, observation.failure.message)
        self._shortage_may_be_over()
        finding = classify.judge(check, observation, kind.assess)
        if previous is not None and not previous.checks_total:
            previous = None  # a placeholder for a check that never ran is no history
        state = classify.next_state(
            previous,
            name=name,
            check=check,
            finding=finding,
            observation=observation,
            now=self._clock(),
            track_durations=self._track_durations,
        )
        self._store.record(state, stale_after_seconds=stale_after(check))
        if self._on_result is not None:
            self._on_result(previous, state)
        if previous is None or previous.status is not state.status:
            _log_change(previous, state)
            if self._on_change is not None:
                self._on_change(previous, state)
        return state

    def _keep_verdict(
        self, name: str, check: CheckBase, previous: ComponentState | None, message: str
    ) -> ComponentState:
        """healthd could not run the check for lack of its own resources: that says nothing
        about the target, so its last verdict stands (and goes stale if this lasts)."""
        now = anyio.current_time()
        if self._shortage is None:
            self._shortage = _Shortage(now)
            log.error(
                "healthd is out of its own resources; checks keep their last verdict until "
                "this clears (see healthd_probe_errors_total): %s",
                message,
            )
        self._shortage.last_seen = now
        self._shortage.missed_checks += 1
        if previous is None:
            previous = classify.unchecked_state(name, check, self._clock())
            self._store.record(previous, stale_after_seconds=stale_after(check))
        return previous

    def _shortage_may_be_over(self) -> None:
        if self._shortage is None:
            return
        if anyio.current_time() - self._shortage.last_seen >= RESOURCE_EPISODE_QUIET_SECONDS:
            missed, self._shortage = self._shortage.missed_checks, None
            log.warning("healthd has resources again; %d checks could not run", missed)

    def mark_unchecked(self, now: float) -> list[str]:
        """Give every check that has not completed yet a placeholder state, so that it is
        reported as not checked instead of silently missing. Returns their names."""
        missing = []
        for name, running in self._running.items():
            if self._store.get(name) is None:
                missing.append(name)
                self._store.record(
                    classify.unchecked_state(name, running.check, now),
                    stale_after_seconds=stale_after(running.check),
                )
        return missing

    async def _probe_and_count(
        self, name: str, check: CheckBase, kind: ProbeKind, ctx: ProbeContext
    ) -> Observation:
        """``run_probe``, counting the checks healthd itself could not run."""
        observation = await run_probe(check, kind, ctx, name=name)
        failure = observation.failure
        if failure is not None and failure.code in (PROBE_ERROR, RESOURCE_EXHAUSTED):
            self._store.probe_failed(failure.code)
        return observation

    async def run_round(self, config: Config) -> None:
        """Run every check once, concurrently, as ``healthd check`` does: no loops."""

        async def one(name: str, check: CheckBase) -> None:
            ctx = ProbeContext(self._shared, name)
            try:
                await self.run_once(name, check, self._probes[check.kind], ctx)
            finally:
                await _close(ctx)

        self._follow(config)
        async with anyio.create_task_group() as tg:
            for name, check in config.checks().items():
                tg.start_soon(one, name, check)

    @staticmethod
    def _stall_while_file_exists(path: Path) -> None:
        while path.exists():
            time.sleep(0.05)


#: The reason code of a check that healthd itself failed to run.
PROBE_ERROR = "probe_error"


async def run_probe(
    check: CheckBase, kind: ProbeKind, ctx: ProbeContext, *, name: str = ""
) -> Observation:
    """Probe once under the check's deadline. Every outcome is an observation: a deadline that
    passes is ``timeout``, and a bug in the probe is ``probe_error`` (logged with its
    traceback), never a healthy check; healthd running out of descriptors or memory is
    ``resource_exhausted``, which says nothing about the target. Cancellation from outside
    passes through."""
    timeout = check.timeout_seconds
    started = anyio.current_time()
    timed_out = Observation(
        0.0, failure=Failure("timeout", f"no answer within {format_seconds(timeout)}")
    )
    try:
        with anyio.fail_after(timeout):
            return await kind.probe(check, ctx)
    except TimeoutError:
        return dataclasses.replace(timed_out, latency_seconds=anyio.current_time() - started)
    except anyio.get_cancelled_exc_class():
        # A client's own timeout firing together with a deadline (ours, or the client's total
        # one) can hand this task a cancellation that no scope recognises as its own (one
        # forwarded from a task the client cancelled). Let through, it would end this check's
        # loop for good: a component silently stale. When nothing outside this probe is
        # cancelling us (shutdown, reload), it is a timeout.
        if anyio.current_effective_deadline() == -math.inf:
            raise
        return dataclasses.replace(timed_out, latency_seconds=anyio.current_time() - started)
    except Exception as exc:
        if (own := resource_failure(exc, f"check {name or check.kind}")) is not None:
            await ctx.aclose()
            return Observation(anyio.current_time() - started, failure=own)
        log.exception("probe for component %s failed unexpectedly", name or check.kind)
        # Whatever the probe built may be half-broken: the next run starts from scratch.
        await ctx.aclose()
        return Observation(
            anyio.current_time() - started,
            failure=Failure(PROBE_ERROR, f"healthd could not run the check: {type(exc).__name__}"),
        )


async def _close(ctx: ProbeContext) -> None:
    with anyio.CancelScope(shield=True):
        await ctx.aclose()


def _log_change(previous: ComponentState | None, state: ComponentState) -> None:
    before = previous.status.label if previous else "unknown"
    level = logging.INFO
    if state.status is not Status.HEALTHY and (previous is None or state.status > previous.status):
        level = logging.WARNING
    log.log(
        level,
        "component %s is %s (was %s): %s",
        state.name,
        state.status.label,
        before,
        state.reason,
        extra={
            "component": state.name,
            "status": state.status.label,
            "previous_status": before,
            "reason_code": state.reason_code,
        },
    )
