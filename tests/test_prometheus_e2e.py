"""End to end with a real Prometheus: it scrapes a real ``healthd run`` and evaluates the rules.

Prometheus runs on loopback with a tmp storage dir, 1 s scrape and evaluation intervals, the
shipped scrape snippet (target and intervals substituted) and a copy of the shipped rules in
which only the ``for:`` durations are shortened to 2 s: the expressions, labels and annotations
are the real ones. Stopping the target of a critical component must take its alert through
pending to firing in ``/api/v1/alerts``; starting it again must resolve it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.healthd_process import (
    REPO,
    HealthdProcess,
    NotifySocket,
    TcpTarget,
    free_port,
    write_config,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]

_RULES = REPO / "config" / "prometheus" / "healthd.rules.yml"
_SCRAPE = REPO / "config" / "prometheus" / "scrape.yml"
_ALERT = "HealthdCriticalComponentUnhealthy"
_API_HEALTHY = 'healthd_component_status{component="api"} == 0'


class _Prometheus:
    """Prometheus scraping the healthd on ``healthd_port`` (or each of several ports)."""

    def __init__(self, directory: Path, healthd_port: int | Sequence[int]) -> None:
        ports = [healthd_port] if isinstance(healthd_port, int) else list(healthd_port)
        self.port = free_port()
        rules = re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 2s", _RULES.read_text())
        assert rules.count("for: 2s") == 11
        (directory / "rules.yml").write_text(rules)
        scrape = _SCRAPE.read_text()
        targets = '", "'.join(f"127.0.0.1:{port}" for port in ports)
        scrape = scrape.replace("127.0.0.1:9469", targets)
        scrape = scrape.replace("scrape_interval: 15s", "scrape_interval: 1s")
        scrape = scrape.replace("scrape_timeout: 5s", "scrape_timeout: 1s")
        assert f'["{targets}"]' in scrape
        (directory / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {directory / 'rules.yml'}\n{scrape}"
        )
        self._log = (directory / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_until(lambda: self._get("/-/ready", raw=True) == b"Prometheus Server is Ready.\n")

    def _get(self, path: str, raw: bool = False) -> Any:
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        return [] if answer is None else list(answer["data"]["result"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        answer = self._get("/api/v1/alerts")
        alerts = [] if answer is None else answer["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == name]

    def wait_until(self, condition: Callable[[], Any], timeout_seconds: float = 20) -> Any:
        deadline = time.monotonic() + timeout_seconds
        while not (result := condition()):
            assert self.process.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, f"condition not met in {timeout_seconds} s"
            time.sleep(0.1)
        return result

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Prometheus, TcpTarget]]:
    """A healthd watching one critical TCP target, scraped by a Prometheus."""
    tmp = tmp_path_factory.mktemp("prometheus")
    target = TcpTarget()
    healthd_port = free_port()
    settings = {
        "metrics_address": f"127.0.0.1:{healthd_port}",
        "status_file": str(tmp / "status.json"),
        "interval": "500ms",
        "timeout": "300ms",
        "startup_spread": "10ms",
    }
    components = {
        "api": {"kind": "tcp", "address": target.address, "critical": True},
        "cache": {"kind": "tcp", "address": target.address},
    }
    config = write_config(tmp / "healthd.toml", settings, components)
    notify = NotifySocket()
    daemon = HealthdProcess(config, env={"NOTIFY_SOCKET": notify.address})
    prometheus: _Prometheus | None = None
    try:
        notify.wait_for(lambda m: "READY" in m, 15)
        prometheus = _Prometheus(tmp, healthd_port)
        yield prometheus, target
    finally:
        if prometheus is not None:
            prometheus.stop()
        daemon.stop()
        notify.close()
        target.stop()


def test_stopping_a_critical_target_takes_its_alert_through_pending_to_firing_and_back(
    stack: tuple[_Prometheus, TcpTarget],
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
