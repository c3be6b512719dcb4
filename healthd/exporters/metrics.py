"""Prometheus exposition, rendered from a ``Snapshot`` on every scrape.

A scrape does no I/O and never triggers a probe. ``exposition()`` writes the text format
straight from the snapshot: prometheus_client's ``generate_latest`` took 200 ms for 1,000
components (27,000 samples) here, and a scrape holds the GIL, so the event loop stood still and
every probe in flight measured that stall as latency. ``SnapshotCollector`` offers the same
samples to a prometheus_client registry, parsed from that one text, so there is a single
source of truth. Each component's lines are cached until its state changes (``Exposition``),
so a scrape renders only what changed. The server runs in its own thread: if the event loop
ever wedges, scrapes still answer, and the stale
``healthd_scheduler_last_progress_timestamp_seconds`` tells Prometheus so.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from healthd.model import ComponentState, Histogram, Snapshot, Status

log = logging.getLogger("healthd.metrics")

#: The classic text format: every name here is a legacy-valid name, and every Prometheus
#: release (Debian's 2.42 included) negotiates it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotCollector(Collector):
    """healthd's metrics for a prometheus_client registry, from the snapshot ``source()``
    returns. Sample output::

        # HELP healthd_component_up 1 if the component is healthy or degraded, 0 if unhealthy.
        # TYPE healthd_component_up gauge
        healthd_component_up{component="api",kind="http"} 1
        # HELP healthd_component_status Component status: 0 healthy, 1 degraded, 2 unhealthy.
        # TYPE healthd_component_status gauge
        healthd_component_status{component="api",kind="http"} 1
        healthd_checks_total{component="api",kind="http",result="timeout"} 2
        healthd_overall_status 1
    """

    def __init__(self, source: Callable[[], Snapshot], version: str) -> None:
        self._source = source
        self._version = version

    def collect(self) -> Iterator[Metric]:
        """Every family, from one snapshot."""
        text = exposition(self._source(), self._version).decode()
        return iter(text_string_to_metric_families(text))


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


#: Per-component families, in the order they are written: (name, type, help, value). Labels
#: are component and kind for the first two, component alone for the gauges after the
#: StateSet; ``None`` leaves a component's sample out.
_KIND_GAUGES: list[tuple[str, str, Callable[[ComponentState], float]]] = [
    ("healthd_component_up", "1 if the component is healthy or degraded, 0 if unhealthy.", _up),
    ("healthd_component_status", "Component status: 0 healthy, 1 degraded, 2 unhealthy.",
     lambda s: float(s.status)),
]  # fmt: skip
_STATE_SET = (
    "healthd_component_state",
    "Component status as a StateSet: 1 for the current state, 0 for the others.",
)
_GAUGES: list[tuple[str, str, Callable[[ComponentState], float | None]]] = [
    ("healthd_component_critical", "1 if an unhealthy component makes the overall status "
     "unhealthy.", lambda s: 1.0 if s.critical else 0.0),
    ("healthd_component_last_check_timestamp_seconds",
     "Unix time the component's last check completed.", lambda s: s.checked_at),
    ("healthd_component_last_success_timestamp_seconds",
     "Unix time of the component's last successful (healthy or degraded) check.",
     lambda s: s.last_success_at),
    ("healthd_component_last_change_timestamp_seconds",
     "Unix time the component's status last changed.", lambda s: s.since),
    ("healthd_component_check_duration_seconds",
     "How long the component's last check took.", lambda s: s.latency_seconds),
    ("healthd_component_consecutive_failures", "Failed checks in a row; 0 after a success.",
     lambda s: float(s.consecutive_failures)),
]  # fmt: skip
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
_CHECKS = (
    "healthd_checks_total",
    "Completed checks by result: 'success' or the failure's reason code.",
)
_DURATIONS = "healthd_check_duration_seconds", "Distribution of check durations."


def _component_headers(histogram: bool) -> list[bytes]:
    headers = [_header(name, "gauge", help_text) for name, help_text, _ in _KIND_GAUGES]
    headers.append(_header(_STATE_SET[0], "gauge", _STATE_SET[1]))
    headers += [_header(name, "gauge", help_text) for name, help_text, _ in _GAUGES]
    headers.append(_header(_REASON[0], "gauge", _REASON[1]))
    headers.append(_header(_IMPACTED[0], "gauge", _IMPACTED[1]))
    headers.append(_header(_CHECKS[0], "counter", _CHECKS[1]))
    if histogram:
        headers.append(_header(_DURATIONS[0], "histogram", _DURATIONS[1]))
    return [header.encode() for header in headers]


def _fragments(name: str, state: ComponentState, histogram: bool) -> tuple[bytes, ...]:
    """One component's samples, one piece per family, in the order of the headers.

    Written out by hand rather than through ``_Writer``: this runs for every changed component
    on every scrape, and the text is pinned byte for byte by the tests."""
    # Each label set is kept open ("{...") so a family can add its own labels and close it.
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
    for family, _, get in _GAUGES:
        # A component that never succeeded has no last-success series, rather than a 0.
        measured = get(state)
        pieces.append("" if measured is None else f"{family}{component}}} {_number(measured)}\n")
    pieces.append(f'{_REASON[0]}{component},reason_code="{_escape(state.reason_code)}"}} 1.0\n')
    pieces.append(
        "".join(
            f'{_IMPACTED[0]}{component},root_cause="{_escape(root_cause)}"}} 1.0\n'
            for root_cause in state.impacted_by
        )
    )
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


class Exposition:
    """Renders snapshots in the text format, re-rendering only the components that changed.

    Each component's samples are kept per family, keyed on its ``ComponentState`` object: the
    store hands out the very same object while a component's judged state is unchanged, so a
    scrape re-renders only what changed since the last one and joins the rest. Families stay
    grouped, as the format requires. Safe to call from several threads.

    :param version: healthd's version, for ``healthd_build_info``.
    :param check_duration_histogram: export ``healthd_check_duration_seconds`` per component.
    """

    def __init__(self, version: str, *, check_duration_histogram: bool = True) -> None:
        self._version = version
        self._histogram = check_duration_histogram
        self._headers = _component_headers(check_duration_histogram)
        self._lock = threading.Lock()
        # Components in name order; each family's pieces in that order, one column per family.
        self._names: list[str] = []
        self._states: list[ComponentState | None] = []
        self._columns: list[list[bytes]] = [[] for _ in self._headers]
        self._rows: dict[str, int] = {}
        #: How many components the last ``render`` had to render afresh.
        self.rendered_components = 0

    def render(self, snapshot: Snapshot) -> bytes:
        """healthd's metrics for ``snapshot`` in the Prometheus text format (0.0.4)."""
        components = snapshot.components
        with self._lock:
            if components.keys() != self._rows.keys():
                self._reorder(components.keys())
            rendered = 0
            states, columns = self._states, self._columns
            for row, name in enumerate(self._names):
                state = components[name]
                if states[row] is not state:
                    states[row] = state
                    for column, piece in zip(
                        columns, _fragments(name, state, self._histogram), strict=True
                    ):
                        column[row] = piece
                    rendered += 1
            self.rendered_components = rendered
            # One join per family, then one of the families: each C call holds the GIL (and so
            # the event loop) for a few megabytes at most, not for every fragment at once.
            parts: list[bytes] = []
            for header, column in zip(self._headers, columns, strict=True):
                parts += (header, b"".join(column))
        out = _Writer()
        _overall(out, snapshot)
        _daemon(out, snapshot, self._version)
        parts.append(out.text())
        return b"".join(parts)

    def _reorder(self, names: Iterable[str]) -> None:
        """Components came or went: lay the rows out again, keeping every cached piece."""
        old = {name: row for row, name in enumerate(self._names)}
        self._names = sorted(names)
        self._rows = {name: row for row, name in enumerate(self._names)}
        states: list[ComponentState | None] = []
        columns: list[list[bytes]] = [[] for _ in self._headers]
        for name in self._names:
            row = old.get(name)
            states.append(None if row is None else self._states[row])
            for column, previous in zip(columns, self._columns, strict=True):
                column.append(b"" if row is None else previous[row])
        self._states, self._columns = states, columns


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
    gauges: list[tuple[str, str, float | None]] = [
        ("healthd_start_time_seconds", "Unix time healthd started.", daemon.started_at),
        ("healthd_scheduler_last_progress_timestamp_seconds",
         "Unix time any check last completed.", daemon.scheduler_last_progress_at),
        ("healthd_status_file_last_write_timestamp_seconds",
         "Unix time the status file was last written successfully.",
         daemon.status_file_last_write_at),
        ("healthd_config_last_reload_successful",
         "1 if the last config (re)load succeeded, 0 if healthd runs on an older config.",
         1.0 if daemon.config_last_reload_successful else 0.0),
        ("healthd_config_last_reload_success_timestamp_seconds",
         "Unix time of the last successful config load.", daemon.config_last_reload_success_at),
    ]  # fmt: skip
    for name, help_text, value in gauges:
        if value is not None:
            out.family(name, "gauge", help_text)
            out.sample(name, "", value)
    out.family(
        "healthd_scheduler_lateness_seconds",
        "histogram",
        "How late checks started compared with their schedule.",
    )
    out.histogram("healthd_scheduler_lateness_seconds", "", daemon.lateness)
    out.family(
        "healthd_event_loop_lag_seconds",
        "histogram",
        "How late the event loop woke a task sleeping a fixed period; every latency it measured "
        "is that much wrong.",
    )
    out.histogram("healthd_event_loop_lag_seconds", "", daemon.event_loop_lag)
    out.family(
        "healthd_status_file_write_duration_seconds",
        "histogram",
        "How long rendering and writing the status file took, in its worker thread.",
    )
    out.histogram(
        "healthd_status_file_write_duration_seconds", "", daemon.status_file_write_duration
    )
    counters: list[tuple[str, str, int]] = [
        ("healthd_status_file_writes_total", "Successful status file writes.",
         daemon.status_file_writes_total),
        ("healthd_status_file_write_failures_total",
         "Status file writes that failed; the previous file was kept.",
         daemon.status_file_write_failures_total),
        ("healthd_probe_errors_total",
         "Checks that could not run because of an unexpected error inside healthd.",
         daemon.probe_errors_total),
        ("healthd_history_write_failures_total",
         "History database writes that failed; checks went on and the rows were kept to retry.",
         daemon.history_write_failures_total),
    ]  # fmt: skip
    for name, help_text, count in counters:
        out.family(name, "counter", help_text)
        out.sample(name, "", count)
    out.family(
        "healthd_component_slo_objective",
        "gauge",
        "The component's availability objective: the share of checks that should succeed.",
    )
    for name, objective in sorted(daemon.slo_objectives.items()):
        out.sample("healthd_component_slo_objective", f'component="{_escape(name)}"', objective)


class MetricsServer:
    """Serves ``/metrics`` from a daemon thread. Binding happens in the constructor, so a busy
    address fails fast, before any check runs."""

    def __init__(
        self,
        host: str,
        port: int,
        source: Callable[[], Snapshot],
        version: str,
        *,
        check_duration_histogram: bool = True,
    ) -> None:
        self._source = source
        self._version = version
        self._renderer = Exposition(version, check_duration_histogram=check_duration_histogram)
        self._process = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._process)
        self._cache_lock = threading.Lock()
        self._cache: tuple[int, bytes] = (-1, b"")
        self._server = _Server((host, port), _handler(self))
        self._thread = threading.Thread(
            # A short poll keeps shutdown quick; ten wake-ups a second cost nothing measurable.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="healthd-metrics",
            daemon=True,
        )

    @property
    def address(self) -> tuple[str, int]:
        """The host and port actually bound (useful when the port was 0)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Start answering scrapes."""
        self._thread.start()

    def stop(self) -> None:
        """Stop answering and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def exposition(self) -> bytes:
        """The text format for the current snapshot, rendered at most once per version."""
        snapshot = self._source()
        with self._cache_lock:
            version, text = self._cache
            if version != snapshot.version:
                text = self._renderer.render(snapshot)
                self._cache = (snapshot.version, text)
        return text + generate_latest(self._process)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body = server.exposition()
                except Exception:
                    log.exception("rendering /metrics failed")
                    self._reply(500, b"rendering metrics failed\n", "text/plain")
                    return
                self._reply(200, body, CONTENT_TYPE)
            elif path == "/":
                self._reply(200, b'<a href="/metrics">metrics</a>\n', "text/html")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Prometheus scrapes every few seconds; an access log line each time is noise.
            pass

    return Handler
