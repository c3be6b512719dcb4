"""The SLO recording rules and alerts, and every query of the Grafana dashboard, evaluated by a
real Prometheus that scrapes a real ``healthd run``.

Prometheus scrapes every second with the shipped scrape snippet and evaluates the shipped,
unmodified healthd.slo.rules.yml every second. One component meets its objective, one fails
every check, one has no objective.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemon import REPO, daemon_settings, free_port, running_healthd, write_config
from tests.http_target import TcpTarget
from tests.prometheus import SLO_RULES, Prometheus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]

DASHBOARD = REPO / "config" / "grafana" / "healthd.json"
_WINDOWS = tuple(f"rate{w}" for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"))


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """api meets its 0.99 objective, db (0.999) fails every check, cache has no objective."""
    tmp = tmp_path_factory.mktemp("slo")
    healthd_port = free_port()
    settings = daemon_settings(tmp, healthd_port, interval="250ms", timeout="200ms")
    with TcpTarget() as target:
        components = {
            "api": {"kind": "tcp", "address": target.address, "critical": True, "slo": 0.99},
            "db": {"kind": "tcp", "address": f"127.0.0.1:{free_port()}", "slo": 0.999},
            "cache": {"kind": "tcp", "address": target.address},
        }
        config = write_config(tmp / "healthd.toml", settings, components)
        with (
            running_healthd(config, ready=True),
            Prometheus(tmp, [healthd_port], SLO_RULES) as server,
        ):
            assert server.shortened == 0  # the SLO rules are evaluated unmodified
            # Enough scrapes for every rate() window to have two samples, plus an evaluation.
            server.wait_until(lambda: server.query("component:healthd_check_errors:ratio_rate3d"))
            yield server


def _by_component(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["component"]: float(r["value"][1]) for r in result}


def test_recording_rules_give_each_component_its_error_ratio_in_every_window(
    prometheus: Prometheus,
) -> None:
    for window in _WINDOWS:

        def every_component(window: str = window) -> dict[str, float]:
            found = _by_component(
                prometheus.query(f"component:healthd_check_errors:ratio_{window}")
            )
            return found if found.keys() == {"api", "cache", "db"} else {}

        ratios = prometheus.wait_until(every_component)
        assert ratios == {"api": 0.0, "cache": 0.0, "db": 1.0}, window
    objectives = _by_component(prometheus.query("healthd_component_slo_objective"))
    assert objectives == {"api": 0.99, "db": 0.999}


def test_only_the_component_burning_its_budget_is_alerted(prometheus: Prometheus) -> None:
    page = prometheus.wait_until(lambda: prometheus.alerts("HealthdErrorBudgetBurn"))
    assert [(a["labels"]["component"], a["labels"]["severity"]) for a in page] == [("db", "page")]
    assert page[0]["state"] == "firing"
    assert "db on 127.0.0.1:" in page[0]["annotations"]["description"]
    assert "failed 100% of its checks" in page[0]["annotations"]["description"]
    ticket = prometheus.wait_until(lambda: prometheus.alerts("HealthdErrorBudgetBurnSlow"))
    assert [a["labels"]["component"] for a in ticket] == ["db"]


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"{panel['title']} {target['refId']}", target["expr"]))
    return found


def _regex(value: str) -> str:
    """A value as Grafana puts it into a PromQL regex: escaped, backslashes doubled."""
    return re.escape(value).replace("\\", "\\\\")


def _substitute(expr: str, instance: str, component: str) -> str:
    # As Grafana does: multi-value variables become a regex alternation.
    expr = expr.replace("$__rate_interval", "5s").replace("$__interval", "1s")
    expr = expr.replace("$instance", _regex(instance)).replace("$component", component)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def test_the_dashboard_variables_list_instances_and_components(prometheus: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    instance_query = variables["instance"]["query"]["query"]
    match = re.fullmatch(r"label_values\((.+), instance\)", instance_query)
    assert match is not None
    instances = prometheus.label_values("instance", match.group(1))
    assert len(instances) == 1
    component_query = variables["component"]["query"]["query"]
    match = re.fullmatch(r"label_values\((.+), component\)", component_query)
    assert match is not None
    selector = match.group(1).replace("$instance", _regex(instances[0]))
    assert prometheus.label_values("component", selector) == ["api", "cache", "db"]


@pytest.mark.parametrize("component", [".*", "(api|db)"], ids=["all", "two"])
def test_every_dashboard_query_returns_series(prometheus: Prometheus, component: str) -> None:
    (instance,) = prometheus.label_values("instance", "healthd_build_info")
    queries = _dashboard_queries()
    assert len(queries) >= 15
    empty = []
    for title, expr in queries:
        if not prometheus.query(_substitute(expr, instance, component)):
            empty.append(title)
    assert empty == []
    # The component variable really filters.
    shown = prometheus.query(_substitute(queries[3][1], instance, component))
    assert queries[3][0].startswith("Status per component")
    expected = {"api", "db"} if component != ".*" else {"api", "cache", "db"}
    assert {r["metric"]["component"] for r in shown} == expected
