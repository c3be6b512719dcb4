"""Prometheus exposition: a collector that renders a ``Snapshot`` on every scrape.

A scrape does no I/O and never triggers a probe. The text for a snapshot version is cached, so
repeated scrapes of an unchanged world cost a dictionary lookup. The server runs in its own
thread: if the event loop ever wedges, scrapes still answer, and the stale
``healthd_scheduler_last_progress_timestamp_seconds`` tells Prometheus so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from healthd.model import Histogram, Snapshot, Status

log = logging.getLogger("healthd.metrics")

#: The classic text format: every name here is a legacy-valid name, and every Prometheus
#: release (Debian's 2.42 included) negotiates it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COMPONENT_KIND = ["component", "kind"]
_COMPONENT = ["component"]


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    bounds = [*(f"{b:g}" for b in histogram.upper_bounds), "+Inf"]
    return list(zip(bounds, map(float, histogram.buckets), strict=True))


class SnapshotCollector(Collector):
    """Renders healthd's metrics from the snapshot ``source()`` returns. Sample output::

    # HELP healthd_component_up 1 if the component is healthy or degraded, 0 if unhealthy.
    # TYPE healthd_component_up gauge
    healthd_component_up{component="api",kind="http"} 1.0
    # HELP healthd_component_status Component status: 0 healthy, 1 degraded, 2 unhealthy.
    # TYPE healthd_component_status gauge
    healthd_component_status{component="api",kind="http"} 1.0
    healthd_checks_total{component="api",kind="http",result="timeout"} 2.0
    healthd_overall_status 1.0
    """

    def __init__(self, source: Callable[[], Snapshot], version: str) -> None:
        self._source = source
        self._version = version

    def collect(self) -> Iterator[Metric]:
        """Build every family from one snapshot."""
        return iter(render(self._source(), self._version))


def render(snapshot: Snapshot, version: str) -> list[Metric]:
    """All of healthd's metric families for one snapshot."""
    up = GaugeMetricFamily(
        "healthd_component_up",
        "1 if the component is healthy or degraded, 0 if unhealthy.",
        labels=_COMPONENT_KIND,
    )
    status = GaugeMetricFamily(
        "healthd_component_status",
        "Component status: 0 healthy, 1 degraded, 2 unhealthy.",
        labels=_COMPONENT_KIND,
    )
    state_set = StateSetMetricFamily(
        "healthd_component_state",
        "Component status as a StateSet: 1 for the current state, 0 for the others.",
        labels=_COMPONENT_KIND,
    )
    critical = GaugeMetricFamily(
        "healthd_component_critical",
        "1 if an unhealthy component makes the overall status unhealthy.",
        labels=_COMPONENT,
    )
    reason = InfoMetricFamily(
        "healthd_component_reason",
        "The component's current reason code (a bounded set; the text is in the status file).",
        labels=_COMPONENT,
    )
    last_check = GaugeMetricFamily(
        "healthd_component_last_check_timestamp_seconds",
        "Unix time the component's last check completed.",
        labels=_COMPONENT,
    )
    last_success = GaugeMetricFamily(
        "healthd_component_last_success_timestamp_seconds",
        "Unix time of the component's last successful (healthy or degraded) check.",
        labels=_COMPONENT,
    )
    last_change = GaugeMetricFamily(
        "healthd_component_last_change_timestamp_seconds",
        "Unix time the component's status last changed.",
        labels=_COMPONENT,
    )
    duration = GaugeMetricFamily(
        "healthd_component_check_duration_seconds",
        "How long the component's last check took.",
        labels=_COMPONENT,
    )
    failures = GaugeMetricFamily(
        "healthd_component_consecutive_failures",
        "Failed checks in a row; 0 after a success.",
        labels=_COMPONENT,
    )
    checks = CounterMetricFamily(
        "healthd_checks",
        "Completed checks by result: 'success' or the failure's reason code.",
        labels=["component", "kind", "result"],
    )
    durations = HistogramMetricFamily(
        "healthd_check_duration_seconds",
        "Distribution of check durations.",
        labels=_COMPONENT,
    )
    for name, state in snapshot.components.items():
        kind = [name, state.kind]
        up.add_metric(kind, 0.0 if state.status is Status.UNHEALTHY else 1.0)
        status.add_metric(kind, float(state.status))
        state_set.add_metric(kind, {s.label: s is state.status for s in Status})
        critical.add_metric([name], 1.0 if state.critical else 0.0)
        reason.add_metric([name], {"reason_code": state.reason_code})
        last_check.add_metric([name], state.checked_at)
        if state.last_success_at is not None:
            last_success.add_metric([name], state.last_success_at)
        last_change.add_metric([name], state.since)
        duration.add_metric([name], state.latency_seconds)
        failures.add_metric([name], float(state.consecutive_failures))
        for result, count in sorted(state.checks_total.items()):
            checks.add_metric([*kind, result], float(count))
        durations.add_metric([name], _buckets(state.durations), sum_value=state.durations.sum)
    families: list[Metric] = [
        up, status, state_set, critical, reason, last_check, last_success, last_change,
        duration, failures, checks, durations,
    ]  # fmt: skip
    families.extend(_overall(snapshot))
    families.extend(_daemon(snapshot, version))
    return families


def _overall(snapshot: Snapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "healthd_overall_status",
        "Overall status: 0 healthy, 1 degraded, 2 unhealthy.",
        value=float(snapshot.overall),
    )
    yield GaugeMetricFamily(
        "healthd_overall_up",
        "1 unless the overall status is unhealthy.",
        value=0.0 if snapshot.overall is Status.UNHEALTHY else 1.0,
    )
    by_status = GaugeMetricFamily(
        "healthd_components", "Number of components in each status.", labels=["status"]
    )
    for label, count in snapshot.summary().items():
        by_status.add_metric([label], float(count))
    yield by_status


def _daemon(snapshot: Snapshot, version: str) -> Iterator[Metric]:
    daemon = snapshot.daemon
    yield InfoMetricFamily("healthd_build", "healthd's version.", value={"version": version})
    yield GaugeMetricFamily(
        "healthd_start_time_seconds", "Unix time healthd started.", value=daemon.started_at
    )
    if daemon.scheduler_last_progress_at is not None:
        yield GaugeMetricFamily(
            "healthd_scheduler_last_progress_timestamp_seconds",
            "Unix time any check last completed.",
            value=daemon.scheduler_last_progress_at,
        )
    lateness = HistogramMetricFamily(
        "healthd_scheduler_lateness_seconds",
        "How late checks started compared with their schedule.",
    )
    lateness.add_metric([], _buckets(daemon.lateness), sum_value=daemon.lateness.sum)
    yield lateness
    if daemon.status_file_last_write_at is not None:
        yield GaugeMetricFamily(
            "healthd_status_file_last_write_timestamp_seconds",
            "Unix time the status file was last written successfully.",
            value=daemon.status_file_last_write_at,
        )
    yield CounterMetricFamily(
        "healthd_status_file_writes",
        "Successful status file writes.",
        value=float(daemon.status_file_writes_total),
    )
    yield CounterMetricFamily(
        "healthd_status_file_write_failures",
        "Status file writes that failed; the previous file was kept.",
        value=float(daemon.status_file_write_failures_total),
    )
    yield GaugeMetricFamily(
        "healthd_config_last_reload_successful",
        "1 if the last config (re)load succeeded, 0 if healthd runs on an older config.",
        value=1.0 if daemon.config_last_reload_successful else 0.0,
    )
    if daemon.config_last_reload_success_at is not None:
        yield GaugeMetricFamily(
            "healthd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
            value=daemon.config_last_reload_success_at,
        )
    yield CounterMetricFamily(
        "healthd_probe_errors",
        "Checks that could not run because of an unexpected error inside healthd.",
        value=float(daemon.probe_errors_total),
    )


class MetricsServer:
    """Serves ``/metrics`` from a daemon thread. Binding happens in the constructor, so a busy
    address fails fast, before any check runs."""

    def __init__(self, host: str, port: int, source: Callable[[], Snapshot], version: str) -> None:
        self._source = source
        self._version = version
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
                registry = CollectorRegistry(auto_describe=False)
                registry.register(SnapshotCollector(lambda: snapshot, self._version))
                text = generate_latest(registry)
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
