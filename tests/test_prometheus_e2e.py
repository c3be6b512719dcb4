"""End to end with a real Prometheus: it scrapes a real ``healthd run`` and evaluates the rules.

Prometheus runs on loopback with a tmp storage dir, 1 s scrape and evaluation intervals, the
shipped scrape snippet (target and intervals substituted) and a copy of the shipped rules in
which only the ``for:`` durations are shortened to 2 s: the expressions, labels and annotations
are the real ones. Stopping the target of a critical component must take its alert through
pending to firing in ``/api/v1/alerts``; starting it again must resolve it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.daemon import daemon_settings, free_port, running_healthd, write_config
from tests.http_target import TcpTarget
from tests.prometheus import ALERT_RULES, Prometheus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]

_ALERT = "HealthdCriticalComponentUnhealthy"
_API_HEALTHY = 'healthd_component_status{component="api"} == 0'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, TcpTarget]]:
    """A healthd watching one critical TCP target, scraped by a Prometheus."""
    tmp = tmp_path_factory.mktemp("prometheus")
    healthd_port = free_port()
    settings = daemon_settings(tmp, healthd_port, interval="500ms", timeout="300ms")
    with TcpTarget() as target:
        components = {
            "api": {"kind": "tcp", "address": target.address, "critical": True},
            "cache": {"kind": "tcp", "address": target.address},
        }
        config = write_config(tmp / "healthd.toml", settings, components)
        with (
            running_healthd(config, ready=True),
            Prometheus(tmp, [healthd_port], ALERT_RULES) as prometheus,
        ):
            assert prometheus.shortened == 11
            yield prometheus, target


def test_stopping_a_critical_target_takes_its_alert_through_pending_to_firing_and_back(
    stack: tuple[Prometheus, TcpTarget],
) -> None:
    prometheus, target = stack
    prometheus.wait_until(lambda: prometheus.query('up{job="healthd"} == 1'))
    prometheus.wait_until(
        lambda: prometheus.query('healthd_component_status{component="api"} == 0')
    )
    assert prometheus.alerts(_ALERT) == []

    target.stop()
    pending = prometheus.wait_until(
        lambda: [a for a in prometheus.alerts(_ALERT) if a["state"] == "pending"]
    )
    assert pending[0]["labels"]["component"] == "api"
    assert pending[0]["labels"]["severity"] == "critical"
    # healthd's hysteresis came first: unhealthy only after failure_threshold (3) failures.
    assert prometheus.query('healthd_component_consecutive_failures{component="api"} >= 3')

    firing = prometheus.wait_until(
        lambda: [a for a in prometheus.alerts(_ALERT) if a["state"] == "firing"]
    )
    assert firing[0]["labels"]["component"] == "api"
    assert firing[0]["annotations"]["summary"] == (
        "Critical component api is unhealthy (connection_refused)"
    )
    # The non-critical component is down too, but it never pages.
    assert {a["labels"]["component"] for a in prometheus.alerts(_ALERT)} == {"api"}

    target.start()
    prometheus.wait_until(lambda: prometheus.alerts(_ALERT) == [])
    # Recovery has its own hysteresis (recovering, then healthy); the alert does not wait for it.
    prometheus.wait_until(lambda: prometheus.query(_API_HEALTHY))
    assert prometheus.alerts(_ALERT) == []
