"""Prometheus exposition, rendered from a ``Snapshot`` on every scrape.

A scrape does no I/O and never triggers a probe. ``exposition()`` writes the text format
straight from the snapshot: prometheus_client's ``generate_latest`` took 200 ms for 1,000
components (27,000 samples) here, and a scrape holds the GIL, so the event loop stood still and
every probe in flight measured that stall as latency. Each component's lines are cached until
its state changes (``Exposition``), so a scrape renders only what changed. The server runs in
its own thread: if the event loop ever wedges, scrapes still answer, and the stale
``healthd_scheduler_last_progress_timestamp_seconds`` tells Prometheus so.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import zlib
from collections.abc import Callable
from typing import Any

import h11
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from healthd.exporters._fragments import FragmentCache
from healthd.listener import DEFAULT_LIMITS, HttpListener, ListenerLimits, Reply, request_header
from healthd.model import ComponentState, Histogram, Snapshot, Status
from healthd.pacing import pacer

log = logging.getLogger("healthd.metrics")

#: The classic text format: every name here is a legacy-valid name, and every Prometheus
#: release (Debian's 2.42 included) negotiates it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    # Exactly as prometheus_client writes numbers ("1.0", "+Inf", "1.7e+09"), so that a
    # switch between the two renderers never changes a byte. Counts are most samples, and
    # below a million Go and Python agree on them: the fast path is the same text.
    if type(value) is int and 0 <= value < 1_000_000:
        return f"{value}.0"
    if type(value) is float and 0.0 <= value < 1_000_000.0:
        return repr(value)
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


@functools.cache
def _bucket_labels(upper_bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(f'le="{_number(b)}"}} ' for b in upper_bounds), 'le="+Inf"} ')


class _Writer:
    """Appends families in the text format: HELP and TYPE once, then the samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(_header(name, kind, help_text))

    def sample(self, name: str, labels: str, value: float) -> None:
        braces = f"{{{labels}}}" if labels else ""
        self.lines.append(f"{name}{braces} {_number(value)}\n")

    def histogram(self, name: str, labels: str, histogram: Histogram) -> None:
        start = f"{name}_bucket{{{labels}," if labels else f"{name}_bucket{{"
        bounds = _bucket_labels(histogram.upper_bounds)
        for bound, count in zip(bounds, histogram.buckets, strict=True):
            self.lines.append(f"{start}{bound}{_number(count)}\n")
        self.sample(f"{name}_count", labels, histogram.count)
        self.sample(f"{name}_sum", labels, histogram.sum)

    def take(self) -> str:
        """What was written since the last ``take``."""
        text = "".join(self.lines)
        self.lines.clear()
        return text

    def text(self) -> bytes:
        return "".join(self.lines).encode()


def _header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _up(s: ComponentState) -> float:
    return 0.0 if s.status is Status.UNHEALTHY else 1.0


#: Per-component families, in the order they are written: (name, help, value); labels are
#: component and kind for the first two, component alone for the gauges after the StateSet.
#: A value of ``None`` leaves a component's sample out. A family is *settled* when its samples
#: change only with the verdict (status, reason, impact), not with every check: settled
#: families are kept packed (``Exposition``).
_KIND_GAUGES: list[tuple[str, str, Callable[[ComponentState], float]]] = [
    ("healthd_component_up", "1 if the component is healthy or degraded, 0 if unhealthy.", _up),
    ("healthd_component_status", "Component status: 0 healthy, 1 degraded, 2 unhealthy.",
     lambda s: float(s.status)),
]  # fmt: skip
_STATE_SET = (
    "healthd_component_state",
    "Component status as a StateSet: 1 for the current state, 0 for the others.",
)
#: (name, help, value, settled)
_GAUGES: list[tuple[str, str, Callable[[ComponentState], float | None], bool]] = [
    ("healthd_component_critical", "1 if an unhealthy component makes the overall status "
     "unhealthy.", lambda s: 1.0 if s.critical else 0.0, True),
    ("healthd_component_last_check_timestamp_seconds",
     "Unix time the component's last check completed.", lambda s: s.checked_at, False),
    ("healthd_component_last_success_timestamp_seconds",
     "Unix time of the component's last successful (healthy or degraded) check.",
     lambda s: s.last_success_at, False),
    ("healthd_component_last_change_timestamp_seconds",
     "Unix time the component's status last changed.", lambda s: s.since, True),
    ("healthd_component_check_duration_seconds",
     "How long the component's last check took.", lambda s: s.latency_seconds, False),
    ("healthd_component_consecutive_failures", "Failed checks in a row; 0 after a success.",
     lambda s: float(s.consecutive_failures), True),
]  # fmt: skip
_SETTLED_GAUGES = [(name, get) for name, _, get, settled in _GAUGES if settled]
_FRESH_GAUGES = [(name, get) for name, _, get, settled in _GAUGES if not settled]
_STATUS_LABELS = [(status, status.label) for status in Status]
_REASON = (
    "healthd_component_reason_info",
    "The component's current reason code (a bounded set; the text is in the status file).",
)
_IMPACTED = (
    "healthd_component_impacted",
    "1 for each unhealthy root cause among the dependencies of a component that is not "
    "healthy; absent otherwise.",
)
_MAINTENANCE = (
    "healthd_component_maintenance",
    "1 while the component is in planned maintenance (left out of the verdict); absent otherwise.",
)
_CHECKS = (
    "healthd_checks_total",
    "Completed checks by result: 'success' or the failure's reason code.",
)
_DURATIONS = "healthd_check_duration_seconds", "Distribution of check durations."


def _component_families(histogram: bool) -> list[tuple[bytes, bool, int]]:
    """Each per-component family in the order written: its HELP and TYPE lines, whether it
    is settled, and its column among the settled or the fresh fragments."""
    families = [(name, "gauge", help_text, True) for name, help_text, _ in _KIND_GAUGES]
    families.append((_STATE_SET[0], "gauge", _STATE_SET[1], True))
    families += [(name, "gauge", help_text, settled) for name, help_text, _, settled in _GAUGES]
    families.append((_REASON[0], "gauge", _REASON[1], True))
    families.append((_IMPACTED[0], "gauge", _IMPACTED[1], True))
    families.append((_MAINTENANCE[0], "gauge", _MAINTENANCE[1], True))
    families.append((_CHECKS[0], "counter", _CHECKS[1], False))
    if histogram:
        families.append((_DURATIONS[0], "histogram", _DURATIONS[1], False))
    columns = {True: itertools.count(), False: itertools.count()}
    return [
        (_header(name, kind, help_text).encode(), settled, next(columns[settled]))
        for name, kind, help_text, settled in families
    ]


# The two renders below are written out by hand rather than through ``_Writer``: they run for
# every changed component on every scrape, and the text is pinned byte for byte by the tests.
# Each label set is kept open ("{...") so a family can add its own labels and close it.


def _settled_inputs(state: ComponentState) -> tuple[Any, ...]:
    """Everything ``_settled_fragments`` reads of a state besides its name."""
    return (
        state.kind,
        state.status,
        state.critical,
        state.since,
        state.consecutive_failures,
        state.reason_code,
        state.impacted_by,
        state.maintenance is None,
    )


def _renders_settled_alike(old: ComponentState, new: ComponentState) -> bool:
    return _settled_inputs(old) == _settled_inputs(new)


def _settled_fragments(name: str, state: ComponentState) -> tuple[bytes, ...]:
    """One component's samples of the settled families, one piece per family, in order."""
    component = f'{{component="{_escape(name)}"'
    component_kind = f'{component},kind="{_escape(state.kind)}"'
    status = state.status
    pieces = [
        f"{family}{component_kind}}} {_number(value(state))}\n" for family, _, value in _KIND_GAUGES
    ]
    pieces.append(
        "".join(
            f'{_STATE_SET[0]}{component_kind},healthd_component_state="{label}"}} '
            f"{'1.0' if member is status else '0.0'}\n"
            for member, label in _STATUS_LABELS
        )
    )
    pieces += _gauge_samples(component, state, _SETTLED_GAUGES)
    pieces.append(f'{_REASON[0]}{component},reason_code="{_escape(state.reason_code)}"}} 1.0\n')
    pieces.append(
        "".join(
            f'{_IMPACTED[0]}{component},root_cause="{_escape(root_cause)}"}} 1.0\n'
            for root_cause in state.impacted_by
        )
    )
    pieces.append("" if state.maintenance is None else f"{_MAINTENANCE[0]}{component}}} 1.0\n")
    return tuple(piece.encode() for piece in pieces)


def _fresh_fragments(name: str, state: ComponentState, histogram: bool) -> tuple[bytes, ...]:
    """One component's samples of the families every check changes, one piece per family."""
    component = f'{{component="{_escape(name)}"'
    component_kind = f'{component},kind="{_escape(state.kind)}"'
    pieces = _gauge_samples(component, state, _FRESH_GAUGES)
    pieces.append(
        "".join(
            f'{_CHECKS[0]}{component_kind},result="{_escape(result)}"}} {_number(count)}\n'
            for result, count in sorted(state.checks_total.items())
        )
    )
    if histogram:
        out = _Writer()
        out.histogram(_DURATIONS[0], component[1:], state.durations)
        pieces.append(out.take())
    return tuple(piece.encode() for piece in pieces)


def _gauge_samples(
    component: str,
    state: ComponentState,
    gauges: list[tuple[str, Callable[[ComponentState], float | None]]],
) -> list[str]:
    # A component that never succeeded has no last-success series, rather than a 0.
    return [
        "" if (measured := get(state)) is None else f"{family}{component}}} {_number(measured)}\n"
        for family, get in gauges
    ]


class Exposition:
    """Renders snapshots in the text format, re-rendering only the components that changed.

    Each component's samples are kept per family, keyed on its ``ComponentState`` object: the
    store hands out the very same object while a component's judged state is unchanged, so a
    scrape re-renders only what changed since the last one and joins the rest. The settled
    families (status, reason, impact: ``_settled_inputs``) are kept compressed and rendered
    again only when what they show changes. Families stay grouped, as the format requires.
    Safe to call from several threads.

    :param version: healthd's version, for ``healthd_build_info``.
    :param check_duration_histogram: export ``healthd_check_duration_seconds`` per component.
    """

    def __init__(self, version: str, *, check_duration_histogram: bool = True) -> None:
        self._version = version
        self._families = _component_families(check_duration_histogram)
        self._lock = threading.Lock()
        # One column per family: every component's samples of it, in name order. The settled
        # families, 63% of the text, are kept packed: at 10,000 components they hold 0.26 MB
        # instead of 6.8, and change only when a verdict does. The fresh ones change on every
        # check, so packing them costs each scrape an unpack and a pack: without the latency
        # histogram, 4 MB of text, RSS 90.9 against 94.7 MiB for render p99 38 against 24 ms;
        # with it, twice the text and p99 112 ms, over the 100 ms goal (docs/performance.md).
        settled = sum(1 for _, is_settled, _ in self._families if is_settled)
        self._settled = FragmentCache(
            _settled_fragments, settled, same=_renders_settled_alike, packed=True
        )
        self._fresh = FragmentCache(
            functools.partial(_fresh_fragments, histogram=check_duration_histogram),
            len(self._families) - settled,
            packed=not check_duration_histogram,
        )

    @property
    def rendered_components(self) -> int:
        """How many components the last ``render`` had to render afresh."""
        return self._fresh.rendered_components

    def render(self, snapshot: Snapshot) -> bytes:
        """healthd's metrics for ``snapshot`` in the Prometheus text format (0.0.4)."""
        parts: list[bytes | bytearray] = []
        self.write(snapshot, parts.append)
        return b"".join(parts)

    def write(self, snapshot: Snapshot, out: Callable[[bytes | bytearray], object]) -> None:
        """Hand ``render``'s text to ``out`` in pieces of at most one family each, so that a
        compressor never needs the whole text at once."""
        with self._lock:
            # Each column is one family's samples for every component, kept whole: a family
            # is one C call, holding the GIL (and so the event loop) for a megabyte at most.
            columns = {
                True: self._settled.update(snapshot.components),
                False: self._fresh.update(snapshot.components),
            }
            pace = pacer()
            for header, settled, column in self._families:
                pace()
                out(header)
                out(columns[settled][column])
        tail = _Writer()
        _overall(tail, snapshot)
        _daemon(tail, snapshot, self._version)
        out(tail.text())


def exposition(snapshot: Snapshot, version: str, *, check_duration_histogram: bool = True) -> bytes:
    """healthd's metrics for ``snapshot`` in the Prometheus text format (0.0.4), uncached."""
    renderer = Exposition(version, check_duration_histogram=check_duration_histogram)
    return renderer.render(snapshot)


def _overall(out: _Writer, snapshot: Snapshot) -> None:
    out.family(
        "healthd_overall_status", "gauge", "Overall status: 0 healthy, 1 degraded, 2 unhealthy."
    )
    out.sample("healthd_overall_status", "", float(snapshot.overall))
    out.family("healthd_overall_up", "gauge", "1 unless the overall status is unhealthy.")
    out.sample("healthd_overall_up", "", 0.0 if snapshot.overall is Status.UNHEALTHY else 1.0)
    out.family("healthd_components", "gauge", "Number of components in each status.")
    for label, count in snapshot.summary().items():
        out.sample("healthd_components", f'status="{label}"', count)


def _daemon(out: _Writer, snapshot: Snapshot, version: str) -> None:
    daemon = snapshot.daemon
    out.family("healthd_build_info", "gauge", "healthd's version.")
    out.sample("healthd_build_info", f'version="{_escape(version)}"', 1.0)
    # The daemon's unlabelled families, in the order written: (name, type, help, value); a
    # value of ``None`` leaves the family out.
    families: list[tuple[str, str, str, float | Histogram | None]] = [
        ("healthd_start_time_seconds", "gauge", "Unix time healthd started.", daemon.started_at),
        ("healthd_scheduler_last_progress_timestamp_seconds", "gauge",
         "Unix time any check last completed.", daemon.scheduler_last_progress_at),
        ("healthd_status_file_last_write_timestamp_seconds", "gauge",
         "Unix time the status file was last written successfully.",
         daemon.status_file_last_write_at),
        ("healthd_config_last_reload_successful", "gauge",
         "1 if the last config (re)load succeeded, 0 if healthd runs on an older config.",
         1.0 if daemon.config_last_reload_successful else 0.0),
        ("healthd_config_last_reload_success_timestamp_seconds", "gauge",
         "Unix time of the last successful config load.", daemon.config_last_reload_success_at),
        ("healthd_scheduler_lateness_seconds", "histogram",
         "How late checks started compared with their schedule.", daemon.lateness),
        ("healthd_event_loop_lag_seconds", "histogram",
         "How late the event loop woke a task sleeping a fixed period; every latency it "
         "measured is that much wrong.", daemon.event_loop_lag),
        ("healthd_status_file_write_duration_seconds", "histogram",
         "How long rendering and writing the status file took, in its worker thread.",
         daemon.status_file_write_duration),
        ("healthd_status_file_writes_total", "counter", "Successful status file writes.",
         daemon.status_file_writes_total),
        ("healthd_status_file_write_failures_total", "counter",
         "Status file writes that failed; the previous file was kept.",
         daemon.status_file_write_failures_total),
        ("healthd_history_write_failures_total", "counter",
         "History database writes that failed; checks went on and the rows were kept to retry.",
         daemon.history_write_failures_total),
        ("healthd_notify_dropped_total", "counter",
         "sd_notify messages dropped because the service manager's queue was full.",
         daemon.notify_dropped_total),
    ]  # fmt: skip
    for name, kind, help_text, value in families:
        if value is None:
            continue
        out.family(name, kind, help_text)
        if isinstance(value, Histogram):
            out.histogram(name, "", value)
        else:
            out.sample(name, "", value)
    out.family(
        "healthd_gc_pause_seconds",
        "histogram",
        "How long each collection of Python's cyclic garbage collector took, by generation; "
        "in whichever thread, it held the event loop as long.",
    )
    for generation, pauses in enumerate(daemon.gc_pauses):
        out.histogram("healthd_gc_pause_seconds", f'generation="{generation}"', pauses)
    out.family(
        "healthd_component_slo_objective",
        "gauge",
        "The component's availability objective: the share of checks that should succeed.",
    )
    for name, objective in sorted(daemon.slo_objectives.items()):
        out.sample("healthd_component_slo_objective", f'component="{_escape(name)}"', objective)
    out.family(
        "healthd_probe_errors_total",
        "counter",
        "Checks healthd could not run: probe_error is a bug in healthd, resource_exhausted "
        "its own descriptors, memory or buffers ran out (the verdict was left as it was).",
    )
    out.sample("healthd_probe_errors_total", 'reason="probe_error"', daemon.probe_errors_total)
    out.sample(
        "healthd_probe_errors_total",
        'reason="resource_exhausted"',
        daemon.probe_resource_errors_total,
    )
    _shard(out, daemon.shard)


def _shard(out: _Writer, shard: tuple[int, int]) -> None:
    # Every instance exports both, (1, 1) when unsharded, so that a rule can count the shards
    # present against the number configured (healthd.rules.yml, HealthdShardMissing).
    index, shards = shard
    out.family("healthd_shard_info", "gauge", "The shard of the components this instance checks.")
    out.sample("healthd_shard_info", f'shard="{index}",shards="{shards}"', 1.0)
    out.family("healthd_shards", "gauge", "Number of shards the components are split into.")
    out.sample("healthd_shards", "", float(shards))


# --- the server ------------------------------------------------------------------------------

#: What the root page says; Prometheus only ever asks for /metrics.
_INDEX = b'<a href="/metrics">metrics</a>\n'


class MetricsServer(HttpListener):
    """Serves ``/metrics`` from one thread running its own asyncio event loop.

    The connection limits and timeouts are ``HttpListener``'s; request bodies are never read.
    ``/metrics`` is gzip-compressed when the client accepts it (Prometheus does).

    :param host: an IPv4 or IPv6 address or a name; ``[::1]`` is accepted too.
    :param port: the port; 0 picks a free one (see ``address``).
    :param source: returns the snapshot to render.
    :param version: healthd's version, for ``healthd_build_info``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        source: Callable[[], Snapshot],
        version: str,
        *,
        limits: ListenerLimits = DEFAULT_LIMITS,
        gzip_level: int = 1,
        check_duration_histogram: bool = True,
    ) -> None:
        # Scrapes carry no body: one is never read.
        limits = dataclasses.replace(limits, max_body_bytes=0)
        super().__init__(host, port, name="metrics", logger=log, limits=limits)
        self._source = source
        self._version = version
        self._renderer = Exposition(version, check_duration_histogram=check_duration_histogram)
        self._process = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._process)
        self._gzip_lock = threading.Lock()
        self._gzip_level = gzip_level
        self._gzip_cache: tuple[int, bytes, Any] | None = None

    def exposition(self) -> bytes:
        """The text format for the current snapshot. Not kept: Prometheus asks for gzip, and
        the text of 10,000 components is 10 MB that would sit in memory between scrapes."""
        # Joined once: the snapshot's text and then the process metrics added to it was a
        # second 10 MB copy, each holding the GIL, and so the event loop, for milliseconds.
        parts: list[bytes | bytearray] = []
        self._renderer.write(self._source(), parts.append)
        parts.append(generate_latest(self._process))
        return b"".join(parts)

    def exposition_gzip(self) -> bytes:
        """``exposition()``, gzip-compressed. The snapshot's part is compressed once per
        snapshot version, family by family; each scrape compresses only the few process
        metrics after it."""
        snapshot = self._source()
        with self._gzip_lock:
            cached = self._gzip_cache
            if cached is None or cached[0] != snapshot.version:
                compressor = zlib.compressobj(self._gzip_level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                parts: list[bytes] = []
                self._renderer.write(snapshot, lambda text: parts.append(compressor.compress(text)))
                cached = (snapshot.version, b"".join(parts), compressor)
                self._gzip_cache = cached
        _, prefix, compressor = cached
        # A copy of the compressor holds the state after the snapshot's text, so the result
        # is one gzip member (some clients read only the first) with the right CRC and length.
        tail = compressor.copy()
        return prefix + tail.compress(generate_latest(self._process)) + tail.flush()

    def _answer(self, request: h11.Request, body: bytes) -> Reply:
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return Reply(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
        if path == "/":
            return Reply(200, _INDEX, "text/html", head=head)
        if path != "/metrics":
            return Reply(404, b"not found\n", head=head)
        gzip = _accepts_gzip(request_header(request, b"accept-encoding"))
        try:
            text = self.exposition_gzip() if gzip else self.exposition()
        except Exception as exc:
            self._log_once(f"render {type(exc).__name__}", "rendering /metrics failed", exc=exc)
            return Reply(500, b"rendering metrics failed\n", head=head)
        headers = [("Vary", "Accept-Encoding")]
        if gzip:
            headers.append(("Content-Encoding", "gzip"))
        return Reply(200, text, CONTENT_TYPE, tuple(headers), head=head)


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (``gzip``, ``gzip;q=0.5``; not ``gzip;q=0``)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() != "gzip":
            continue
        name, _, value = params.strip().partition("=")
        if name.strip().lower() != "q":
            return True
        try:
            return float(value) > 0
        except ValueError:
            return False
    return False
