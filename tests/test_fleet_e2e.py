"""Several healthd instances under one real Prometheus: an HA pair and three shards.

The machinery is tests/prometheus.py's: Prometheus on loopback, 1 s scrape and
evaluation intervals, the shipped scrape snippet (one target per instance) and a copy of the
shipped rules whose ``for:`` durations alone are replaced by 2 s, mechanically. Each healthd is a
real ``healthd run`` checking every 500 ms.
"""

from __future__ import annotations

import shutil
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from healthd import shard
from tests.daemon import daemon_settings, free_port, running_healthd, write_config
from tests.http_target import HttpTarget
from tests.prometheus import ALERT_RULES, Prometheus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]

PAGE = "HealthdCriticalComponentUnhealthy"
_STOP: dict[int, Callable[[], int]] = {}
DISAGREE = "HealthdProbersDisagree"


def _start(
    stack: ExitStack, tmp: Path, name: str, components: Mapping[str, Any], **daemon: str
) -> int:
    """A running healthd named ``name``; returns its metrics port. It stops with ``stack``, or
    when the test calls ``_STOP[port]``."""
    port = free_port()
    settings = daemon_settings(
        tmp, port, status_file=str(tmp / f"{name}.json"), interval="500ms", timeout="300ms"
    )
    settings.update(daemon)
    config = write_config(tmp / f"{name}.toml", settings, components)
    healthd = stack.enter_context(running_healthd(config))
    _STOP[port] = healthd.stop
    healthd.wait_for("READY", "1")
    return port


def _all_alerts(prometheus: Prometheus) -> list[dict[str, Any]]:
    return [
        a for name in (PAGE, DISAGREE, "HealthdComponentUnhealthy") for a in prometheus.alerts(name)
    ]


def _api(url: str) -> dict[str, Any]:
    return {"api": {"kind": "http", "url": url, "critical": True}}


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL whose port refuses connections: bound but never listening, so that no other
    server (Prometheus, picking a free port) can take it during the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/health"


def test_a_target_refused_from_one_prober_only_is_one_ticket_and_no_page(
    tmp_path: Path, http_target: HttpTarget, refused_url: str
) -> None:
    with ExitStack() as stack:
        seeing = _start(stack, tmp_path, "a", _api(http_target.url("/health")))
        refused = _start(stack, tmp_path, "b", _api(refused_url))
        prometheus = stack.enter_context(Prometheus(tmp_path, [seeing, refused], ALERT_RULES))
        # Until Prometheus has scraped both, the one it has is every prober there is, and its
        # page may go pending; from the first evaluation that sees both, it must never again.
        prometheus.wait_until(
            lambda: len(prometheus.query('healthd_component_status{component="api"}')) == 2
        )
        prometheus.wait_until(
            lambda: (
                not prometheus.alerts(PAGE) and not prometheus.alerts("HealthdComponentUnhealthy")
            )
        )
        both_seen = time.time()
        firing = prometheus.wait_until(
            lambda: [a for a in prometheus.alerts(DISAGREE) if a["state"] == "firing"]
        )
        assert [a["labels"]["instance"] for a in firing] == [f"127.0.0.1:{refused}"]
        assert firing[0]["annotations"]["summary"] == (
            f"Component api is unhealthy (connection_refused) from prober 127.0.0.1:{refused} only"
        )
        assert prometheus.query(f'ALERTS{{alertname="{PAGE}"}}') == []
        # Not even pending at any time since, though long enough for a page to have fired.
        window = max(1, int(time.time() - both_seen))
        ever = prometheus.query(
            f'count by (alertname) (count_over_time(ALERTS{{component!=""}}[{window}s]))'
        )
        assert [v["metric"]["alertname"] for v in ever] == [DISAGREE]
        assert prometheus.query('ALERTS{severity="critical"}') == []
        assert [a["labels"]["alertname"] for a in _all_alerts(prometheus)] == [DISAGREE]


def test_a_target_refused_from_both_probers_is_one_page(tmp_path: Path, refused_url: str) -> None:
    with ExitStack() as stack:
        ports = [_start(stack, tmp_path, name, _api(refused_url)) for name in ("a", "b")]
        prometheus = stack.enter_context(Prometheus(tmp_path, ports, ALERT_RULES))
        prometheus.wait_until(
            lambda: len(prometheus.query('healthd_component_status{component="api"} == 2')) == 2
        )
        firing = prometheus.wait_until(
            lambda: [a for a in prometheus.alerts(PAGE) if a["state"] == "firing"]
        )
        assert len(firing) == 1
        assert firing[0]["labels"] == {
            "alertname": PAGE,
            "job": "healthd",
            "component": "api",
            "kind": "http",
            "severity": "critical",
        }
        assert firing[0]["annotations"]["summary"] == (
            "Critical component api is unhealthy (connection_refused)"
        )
        assert prometheus.alerts(DISAGREE) == []


def test_three_shards_check_every_component_exactly_once(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    names = [f"svc{n:02d}" for n in range(15)]
    owner = shard.assign(names, 3)
    with ExitStack() as stack:
        ports: dict[int, int] = {}
        for index in (1, 2, 3):
            # The same components in every config; `via` tells the target who asked.
            components = {
                name: {"kind": "http", "url": http_target.url(f"/c/{name}?via={index}")}
                for name in names
            }
            ports[index] = _start(stack, tmp_path, f"s{index}", components, shard=f"{index}/3")
        prometheus = stack.enter_context(Prometheus(tmp_path, list(ports.values()), ALERT_RULES))
        prometheus.wait_until(
            lambda: len(prometheus.query('healthd_component_status{job="healthd"} == 0')) == 15
        )

        # Each component was requested by its own shard's instance and by no other.
        asked: dict[str, set[int]] = {}
        for request in http_target.requests:
            url = urllib.parse.urlsplit(request.path)
            via = int(urllib.parse.parse_qs(url.query)["via"][0])
            asked.setdefault(url.path.removeprefix("/c/"), set()).add(via)
        assert asked == {name: {owner[name]} for name in names}

        # The union of the exports is the configured set, each with exactly one verdict.
        verdicts = prometheus.query(
            'count by (component) (healthd_component_status{job="healthd"})'
        )
        assert {v["metric"]["component"]: v["value"][1] for v in verdicts} == dict.fromkeys(
            names, "1"
        )
        exported = prometheus.query('healthd_component_status{job="healthd"}')
        instance_shard = {f"127.0.0.1:{port}": index for index, port in ports.items()}
        assert {
            v["metric"]["component"]: instance_shard[v["metric"]["instance"]] for v in exported
        } == owner
        shards = prometheus.query('healthd_shard_info{job="healthd"}')
        assert sorted((v["metric"]["shard"], v["metric"]["shards"]) for v in shards) == [
            ("1", "3"),
            ("2", "3"),
            ("3", "3"),
        ]
        # Pending at most while the first scrapes of the three came in at different times.
        prometheus.wait_until(lambda: prometheus.alerts("HealthdShardMissing") == [])

        # Shard 3's instance goes away: its components have no verdict, and that is an alert.
        _STOP[ports[3]]()
        missing = prometheus.wait_until(
            lambda: [a for a in prometheus.alerts("HealthdShardMissing") if a["state"] == "firing"]
        )
        assert missing[0]["annotations"]["summary"] == "Only 2 of 3 healthd shards are reporting"
