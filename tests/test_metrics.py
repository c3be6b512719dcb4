"""The /metrics endpoint: exact names, label sets and values, parsed as Prometheus parses them."""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from healthd.exporters._fragments import FragmentCache
from healthd.exporters.metrics import Exposition, MetricsServer, exposition
from healthd.model import (
    DAEMON_BUCKETS_SECONDS,
    ComponentState,
    Histogram,
    Maintenance,
    Status,
)
from healthd.state import StateStore

NOW = 1_800_000_000.0


def _state(name: str, kind: str, status: Status, **fields: object) -> ComponentState:
    values: dict[str, object] = {
        "name": name,
        "kind": kind,
        "critical": False,
        "status": status,
        "reason_code": "ok" if status is Status.HEALTHY else "timeout",
        "reason": "r",
        "latency_seconds": 0.25,
        "checked_at": NOW,
        "since": NOW - 60,
        "last_success_at": NOW if status is not Status.UNHEALTHY else None,
        "consecutive_failures": 0 if status is not Status.UNHEALTHY else 3,
        "consecutive_successes": 0,
        "checks_total": {"success": 7, "timeout": 3},
        "durations": Histogram.empty((0.1, 1.0)).observe(0.25).observe(0.05),
    }
    values.update(fields)
    return ComponentState(**values)  # type: ignore[arg-type]


@pytest.fixture
def store() -> StateStore:
    store = StateStore(clock=lambda: NOW)
    store.record(_state("api", "http", Status.DEGRADED, critical=True), stale_after_seconds=60)
    store.record(_state("db", "tcp", Status.UNHEALTHY), stale_after_seconds=60)
    store.record(_state("cache", "tcp", Status.HEALTHY), stale_after_seconds=60)
    return store


@pytest.fixture
def server(store: StateStore) -> Iterator[MetricsServer]:
    server = MetricsServer("127.0.0.1", 0, store.snapshot, "1.2.3")
    server.start()
    yield server
    server.stop()


def _scrape(server: MetricsServer) -> tuple[str, dict[str, list[Sample]]]:
    host, port = server.address
    response = httpx.get(f"http://{host}:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return response.text, samples


def _value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    matches = [
        s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def test_component_gauges_have_the_contracted_names_labels_and_values(
    server: MetricsServer,
) -> None:
    _, samples = _scrape(server)
    assert _value(samples, "healthd_component_up", component="api", kind="http") == 1
    assert _value(samples, "healthd_component_up", component="db", kind="tcp") == 0
    assert _value(samples, "healthd_component_status", component="api", kind="http") == 1
    assert _value(samples, "healthd_component_status", component="db", kind="tcp") == 2
    assert _value(samples, "healthd_component_status", component="cache", kind="tcp") == 0
    for name in (
        "healthd_component_last_check_timestamp_seconds",
        "healthd_component_last_change_timestamp_seconds",
        "healthd_component_check_duration_seconds",
        "healthd_component_consecutive_failures",
    ):
        assert {frozenset(s.labels.items()) for s in samples[name]} == {
            frozenset({("component", c)}) for c in ("api", "db", "cache")
        }, name
    assert _value(samples, "healthd_component_last_check_timestamp_seconds", component="db") == NOW
    assert _value(samples, "healthd_component_last_change_timestamp_seconds", component="db") == (
        NOW - 60
    )
    assert _value(samples, "healthd_component_check_duration_seconds", component="api") == 0.25
    assert _value(samples, "healthd_component_consecutive_failures", component="db") == 3
    # A component that never succeeded has no last-success series, rather than a fake 0.
    last_success = {s.labels["component"] for s in samples[
        "healthd_component_last_success_timestamp_seconds"
    ]}  # fmt: skip
    assert last_success == {"api", "cache"}
    assert _value(samples, "healthd_component_critical", component="api") == 1
    assert _value(samples, "healthd_component_reason_info", component="db", reason_code="timeout")


def test_state_set_has_all_three_states_for_every_component(server: MetricsServer) -> None:
    _, samples = _scrape(server)
    series = samples["healthd_component_state"]
    assert len(series) == 9
    for component, kind, current in (
        ("api", "http", "degraded"),
        ("db", "tcp", "unhealthy"),
        ("cache", "tcp", "healthy"),
    ):
        for state in ("healthy", "degraded", "unhealthy"):
            value = _value(
                samples,
                "healthd_component_state",
                component=component,
                kind=kind,
                healthd_component_state=state,
            )
            assert value == (1 if state == current else 0)


def test_counters_histograms_and_daemon_metrics(server: MetricsServer) -> None:
    text, samples = _scrape(server)
    assert "# TYPE healthd_checks_total counter" in text
    assert (
        _value(samples, "healthd_checks_total", component="api", kind="http", result="success") == 7
    )
    assert (
        _value(samples, "healthd_checks_total", component="db", kind="tcp", result="timeout") == 3
    )
    assert "# TYPE healthd_check_duration_seconds histogram" in text
    assert _value(samples, "healthd_check_duration_seconds_bucket", component="api", le="0.1") == 1
    assert _value(samples, "healthd_check_duration_seconds_bucket", component="api", le="+Inf") == 2
    assert _value(samples, "healthd_check_duration_seconds_count", component="api") == 2
    assert _value(samples, "healthd_check_duration_seconds_sum", component="api") == 0.3
    # db is unhealthy but not critical: overall degraded, still "up".
    assert _value(samples, "healthd_overall_status") == 1
    assert _value(samples, "healthd_overall_up") == 1
    assert _value(samples, "healthd_components", status="unhealthy") == 1
    assert _value(samples, "healthd_build_info", version="1.2.3") == 1
    assert _value(samples, "healthd_scheduler_last_progress_timestamp_seconds") == NOW
    assert "healthd_scheduler_lateness_seconds_bucket" in samples
    assert _value(samples, "healthd_config_last_reload_successful") == 1
    assert _value(samples, "healthd_status_file_write_failures_total") == 0
    assert "process_cpu_seconds_total" in samples


def test_critical_unhealthy_component_makes_overall_down(store: StateStore) -> None:
    store.record(_state("api", "http", Status.UNHEALTHY, critical=True), stale_after_seconds=60)
    server = MetricsServer("127.0.0.1", 0, store.snapshot, "1.2.3")
    server.start()
    try:
        _, samples = _scrape(server)
    finally:
        server.stop()
    assert _value(samples, "healthd_overall_status") == 2
    assert _value(samples, "healthd_overall_up") == 0


def test_healthd_own_timing_histograms_resolve_the_millisecond_goals(
    server: MetricsServer, store: StateStore
) -> None:
    # Lateness, loop lag and status-file writes have goals of a few milliseconds: without a bound
    # between 1 and 5 ms, histogram_quantile interpolates a p99 near 5 ms across the whole bucket.
    store.check_started(0.004)
    store.loop_lag(0.0007)
    _, samples = _scrape(server)
    bounds = [*(repr(b) for b in DAEMON_BUCKETS_SECONDS), "+Inf"]
    for name in (
        "healthd_scheduler_lateness_seconds",
        "healthd_event_loop_lag_seconds",
        "healthd_status_file_write_duration_seconds",
    ):
        assert [s.labels["le"] for s in samples[f"{name}_bucket"]] == bounds, name
    assert _value(samples, "healthd_scheduler_lateness_seconds_bucket", le="0.0025") == 0
    assert _value(samples, "healthd_scheduler_lateness_seconds_bucket", le="0.005") == 1
    assert _value(samples, "healthd_event_loop_lag_seconds_bucket", le="0.001") == 1
    for generation in "012":
        gc_bounds = [
            s.labels["le"]
            for s in samples["healthd_gc_pause_seconds_bucket"]
            if s.labels["generation"] == generation
        ]
        assert gc_bounds == bounds, generation


def test_collector_pauses_are_a_histogram_by_generation(
    server: MetricsServer, store: StateStore
) -> None:
    store.gc_paused([(0, 0.0004), (1, 0.012), (0, 0.0009)])
    _, samples = _scrape(server)
    counts = {s.labels["generation"]: s.value for s in samples["healthd_gc_pause_seconds_count"]}
    assert counts == {"0": 2, "1": 1, "2": 0}
    assert _value(samples, "healthd_gc_pause_seconds_sum", generation="0") == pytest.approx(0.0013)
    assert _value(samples, "healthd_gc_pause_seconds_bucket", generation="1", le="0.01") == 0
    assert _value(samples, "healthd_gc_pause_seconds_bucket", generation="1", le="0.025") == 1


def test_removed_component_series_disappear(server: MetricsServer, store: StateStore) -> None:
    store.remove("db")
    _, samples = _scrape(server)
    components = {s.labels.get("component") for family in samples.values() for s in family}
    assert "db" not in components
    assert "api" in components


def test_unchanged_snapshot_is_rendered_once(server: MetricsServer, store: StateStore) -> None:
    first = server.exposition()
    calls = 0
    original = store.snapshot

    def counting():  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original()

    server._source = counting
    again = server.exposition()
    # Same version: the cached text is served; only the cheap process metrics are appended.
    assert calls == 1
    assert again.split(b"# HELP process_")[0] == first.split(b"# HELP process_")[0]


def test_unknown_paths_are_404(server: MetricsServer) -> None:
    host, port = server.address
    assert httpx.get(f"http://{host}:{port}/nope").status_code == 404


def test_binding_a_busy_address_fails_at_construction(server: MetricsServer) -> None:
    host, port = server.address
    with pytest.raises(OSError, match="in use"):
        MetricsServer(host, port, lambda: None, "x")  # type: ignore[arg-type,return-value]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by the README")
def test_promtool_check_metrics_reports_no_problems(server: MetricsServer) -> None:
    text, _ = _scrape(server)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


class _Replay(Collector):
    """Offers families parsed from a scrape to a prometheus_client registry."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _sample_set(text: str) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
    return {
        (s.name, frozenset(s.labels.items()), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_client_reads_a_scrape_and_writes_it_again_without_loss(
    server: MetricsServer,
) -> None:
    text, _ = _scrape(server)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Replay(list(text_string_to_metric_families(text))))
    assert _sample_set(generate_latest(registry).decode()) == _sample_set(text)
    assert ("healthd_overall_status", frozenset(), 1.0) in _sample_set(text)


def test_a_scrape_renders_only_the_components_whose_state_changed(store: StateStore) -> None:
    renderer = Exposition("1.2.3")
    first = renderer.render(store.snapshot())
    assert renderer.rendered_components == 3
    assert renderer.render(store.snapshot()) == first
    assert renderer.rendered_components == 0
    store.record(_state("db", "tcp", Status.HEALTHY), stale_after_seconds=60)
    changed = renderer.render(store.snapshot())
    assert renderer.rendered_components == 1
    # The cached text is exactly what a fresh render gives, families still grouped.
    assert changed == exposition(store.snapshot(), "1.2.3")
    names = [line.split(" ")[2] for line in changed.decode().splitlines() if "# TYPE" in line]
    assert len(names) == len(set(names))
    # Components that come and go keep everyone else's cached lines, in name order.
    store.remove("api")
    store.record(_state("backup", "tcp", Status.HEALTHY), stale_after_seconds=60)
    assert renderer.render(store.snapshot()) == exposition(store.snapshot(), "1.2.3")
    assert renderer.rendered_components == 1


@pytest.mark.parametrize("packed", [False, True], ids=["text", "packed"])
def test_cached_columns_are_what_a_fresh_render_gives_through_any_changes(packed: bool) -> None:
    # Fragments of every length, empty ones included, while components change, come and go,
    # and the mapping gives them in any order.
    rng = random.Random(7)
    renders = 0

    def render(name: str, state: ComponentState) -> tuple[bytes, ...]:
        nonlocal renders
        renders += 1
        size = state.consecutive_failures
        return (f"{name}:{size};".encode(), b"x" * size, b"" if size % 3 else name.encode())

    def fresh(world: dict[str, ComponentState]) -> list[bytes]:
        rows = [render(name, world[name]) for name in sorted(world)]
        return [b"".join(column) for column in zip(*rows, strict=True)] if rows else [b""] * 3

    cache = FragmentCache(render, 3, packed=packed)
    world: dict[str, ComponentState] = {}
    for _ in range(300):
        for _ in range(rng.randrange(4)):
            name = f"c{rng.randrange(40):02d}"
            if rng.random() < 0.2:
                world.pop(name, None)
            else:
                size = rng.randrange(6)
                world[name] = dataclasses.replace(
                    _state(name, "tcp", Status.HEALTHY), consecutive_failures=size
                )
        if rng.random() < 0.2:
            # The same components in another order: nothing to render again.
            world = dict(rng.sample(list(world.items()), len(world)))
        renders = 0
        columns = list(cache.update(world))
        assert cache.rendered_components == renders
        assert columns == fresh(world)


@pytest.mark.parametrize("histogram", [False, True], ids=["no_histogram", "histogram"])
def test_a_cached_render_is_a_fresh_one_whatever_field_of_a_state_changes(
    store: StateStore, histogram: bool
) -> None:
    # The settled families are re-rendered only when the fields they read change: a field
    # they read but that test left out would keep an old sample. Change every field at random.
    rng = random.Random(11)
    names = [f"c{i}" for i in range(12)]
    changes = {
        "kind": lambda: rng.choice(["http", "tcp"]),
        "critical": lambda: rng.random() < 0.5,
        "status": lambda: rng.choice(list(Status)),
        "reason_code": lambda: rng.choice(["ok", "timeout", "connection_refused"]),
        "latency_seconds": lambda: rng.choice([0.001, 0.25, 2.5]),
        "checked_at": lambda: NOW + rng.randrange(100),
        "since": lambda: NOW - rng.randrange(100),
        "last_success_at": lambda: rng.choice([None, NOW - rng.randrange(100)]),
        "consecutive_failures": lambda: rng.randrange(4),
        "checks_total": lambda: {"success": rng.randrange(9), "timeout": rng.randrange(3)},
        "durations": lambda: Histogram.empty((0.1, 1.0)).observe(rng.random()),
        "impacted_by": lambda: tuple(rng.sample(names, rng.randrange(3))),
        "maintenance": lambda: rng.choice([None, Maintenance(NOW + 60, "upgrade", "cli")]),
    }
    read = {field.name for field in dataclasses.fields(ComponentState)} - set(changes)
    # What the exports never show, or show in the status file alone.
    assert read == {
        "name", "reason", "consecutive_successes", "details", "depends_on", "flap_history",
        "last_failure", "evidence",
    }  # fmt: skip
    world = {name: _state(name, "http", Status.HEALTHY) for name in names}
    cached = Exposition("1", check_duration_histogram=histogram)
    base = store.snapshot()
    for _ in range(400):
        name, field = rng.choice(names), rng.choice(list(changes))
        world[name] = dataclasses.replace(world[name], **{field: changes[field]()})
        snapshot = dataclasses.replace(base, components=dict(world))
        expected = exposition(snapshot, "1", check_duration_histogram=histogram)
        assert cached.render(snapshot) == expected, field


def test_the_per_component_histogram_is_a_config_choice(store: StateStore) -> None:
    text = exposition(store.snapshot(), "1.2.3", check_duration_histogram=False).decode()
    assert "healthd_check_duration_seconds" not in text
    # Everything else, the last check's duration included, is still there.
    assert 'healthd_component_check_duration_seconds{component="api"} 0.25' in text
    assert text.count("healthd_component_up{") == 3


def test_loop_lag_and_status_file_write_time_are_histograms(store: StateStore) -> None:
    store.loop_lag(0.003)
    store.status_file_written(True, NOW, 0.02)
    store.status_file_written(False, NOW + 1, 0.01)
    samples = {
        s.name: s
        for family in text_string_to_metric_families(exposition(store.snapshot(), "x").decode())
        for s in family.samples
        if not s.labels or "le" not in s.labels
    }
    assert samples["healthd_event_loop_lag_seconds_count"].value == 1
    assert samples["healthd_event_loop_lag_seconds_sum"].value == 0.003
    assert samples["healthd_status_file_write_duration_seconds_count"].value == 2
    assert samples["healthd_status_file_writes_total"].value == 1
    assert samples["healthd_status_file_write_failures_total"].value == 1
    assert samples["healthd_status_file_last_write_timestamp_seconds"].value == NOW
