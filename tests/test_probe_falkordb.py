"""The falkordb probe against real FalkorDB (Redis 8 with the graph module), and its verdicts."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from healthd.config import FalkorDbCheck
from healthd.model import Failure, Observation, Status
from healthd.probes.falkordb import assess, module_version
from tests.daemon import credentials_env, run_daemon_once
from tests.datastores import (
    FALKORDB_PASSWORD,
    REDIS_PASSWORD,
    RedisServer,
    wait_until,
)
from tests.probing import make_check, probe_once

_check = functools.partial(make_check, "falkordb", timeout=2.0)


@pytest.fixture
def check_of(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FalkorDbCheck]:
    """A falkordb check of a server, its password referenced from the environment as a config
    does, with ``overrides``."""
    monkeypatch.setenv("HEALTHD_TEST_FALKORDB_PASSWORD", FALKORDB_PASSWORD)

    def check(server: RedisServer, **overrides: Any) -> FalkorDbCheck:
        password = "${env:HEALTHD_TEST_FALKORDB_PASSWORD}"
        built: FalkorDbCheck = _check(url=server.url(), password=password, **overrides)
        return built

    return check


def _probe_nodes(server: RedisServer, graph: str = "healthd_probe") -> int:
    with server.client() as client:
        if not client.exists(graph):
            return 0
        reply = client.execute_command("GRAPH.RO_QUERY", graph, "MATCH (n) RETURN count(n)")
        return int(reply[1][0][0])


@pytest.mark.asyncio
async def test_healthy_falkordb_answers_a_graph_query(
    falkordb: RedisServer, check_of: Callable[..., FalkorDbCheck]
) -> None:
    check = check_of(falkordb)

    observation, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.HEALTHY, "ok"), finding
    facts = observation.facts
    assert facts["graph_module_version"].count(".") == 2
    assert "graph" in facts["modules"]
    assert facts["role"] == "master"
    assert facts["query_seconds"] >= 0
    assert facts["waiting_queries"] == 0
    assert "FalkorDB" in finding.reason
    assert FALKORDB_PASSWORD not in repr(observation) + repr(finding) + str(check)


@pytest.mark.asyncio
async def test_probe_graph_is_created_once_however_often_and_concurrently_probed(
    falkordb: RedisServer, check_of: Callable[..., FalkorDbCheck]
) -> None:
    check = check_of(falkordb)
    first, _ = await probe_once(check)
    assert first.facts["probe_graph"] == "created"

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(probe_once, check)
    again, finding = await probe_once(check)

    assert again.facts["probe_graph"] == "exists"
    assert finding.status is Status.HEALTHY
    assert _probe_nodes(falkordb) == 1


@pytest.mark.asyncio
async def test_plain_redis_configured_as_falkordb_is_module_missing(
    redis_main: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_REDIS_PASSWORD", REDIS_PASSWORD)
    check = _check(url=redis_main.url(), password="${env:HEALTHD_TEST_REDIS_PASSWORD}")

    observation, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "module_missing")
    assert observation.facts["graph_module_version"] is None
    with redis_main.client() as client:
        assert client.exists("healthd_probe") == 0  # nothing was written to it


@pytest.mark.asyncio
async def test_broken_query_is_graph_query_failed(
    falkordb: RedisServer, check_of: Callable[..., FalkorDbCheck]
) -> None:
    check = check_of(falkordb)
    await probe_once(check)  # creates the probe graph
    broken = check_of(falkordb, query="THIS IS NOT CYPHER")

    observation, finding = await probe_once(broken)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "graph_query_failed")
    assert "graph_error" in observation.facts


@pytest.mark.asyncio
async def test_slow_graph_query_is_stopped_by_falkordb_at_the_check_timeout(
    falkordb: RedisServer, check_of: Callable[..., FalkorDbCheck]
) -> None:
    await probe_once(check_of(falkordb))  # creates the probe graph
    slow = check_of(
        falkordb,
        timeout=0.4,
        # Ten billion rows streamed from two small lists: endless in CPU, tiny in memory.
        query="UNWIND range(1, 100000) AS a UNWIND range(1, 100000) AS b RETURN count(b)",
    )

    observation, finding = await probe_once(slow)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "timeout")
    assert observation.facts.get("graph_error") == "Query timed out", (observation, finding)

    def running_queries() -> list[Any]:
        with falkordb.client() as client:
            return list(client.execute_command("GRAPH.INFO")[1])

    # FalkorDB gave up by itself: nothing of the query is left running on the server.
    wait_until(lambda: running_queries() == [], timeout_seconds=2, what="no running query")


@pytest.mark.asyncio
async def test_replica_is_never_written_to_and_reports_a_missing_probe_graph(
    falkordb: RedisServer, falkordb_replica: RedisServer, check_of: Callable[..., FalkorDbCheck]
) -> None:
    on_replica = check_of(falkordb_replica, expect_role="replica")

    observation, finding = await probe_once(on_replica)

    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "probe_graph_missing")
    assert observation.facts["probe_graph"] == "missing"
    assert _probe_nodes(falkordb_replica) == 0

    # Once the master has created it, the replica serves the probe graph read-only.
    _, on_master = await probe_once(check_of(falkordb))
    assert on_master.status is Status.HEALTHY
    wait_until(lambda: _probe_nodes(falkordb_replica) == 1, what="the graph to replicate")
    _, finding = await probe_once(on_replica)
    assert (finding.status, finding.reason_code) == (Status.HEALTHY, "ok")


@pytest.mark.asyncio
async def test_wrong_password_is_auth_failed(falkordb: RedisServer) -> None:
    check = _check(url=falkordb.url("wrong-Password-999"))

    observation, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "auth_failed")
    exported = repr(observation) + repr(finding)
    assert "wrong-Password-999" not in exported
    assert FALKORDB_PASSWORD not in exported


# --- pure judgement ---------------------------------------------------------------------------


def _observed(**overrides: Any) -> Observation:
    """A successful probe's observation: a healthy server's facts, changed by ``overrides``."""
    facts: dict[str, Any] = {
        "redis_version": "8.2.3",
        "uptime_seconds": 100,
        "role": "master",
        "memory_ratio": None,
        "clients_ratio": 0.001,
        "rdb_last_bgsave_status": "ok",
        "aof_last_write_status": "ok",
        "modules": ["graph"],
        "graph_module_version": "4.16.3",
        "probe_graph": "exists",
        "query_seconds": 0.0004,
        "waiting_queries": 0,
        "waiting_queries_previous": 0,
    }
    facts.update(overrides)
    return Observation(0.01, facts=facts)


@pytest.mark.parametrize(
    ("settings", "observation", "status", "code"),
    [
        ({}, _observed(), Status.HEALTHY, "ok"),
        ({}, _observed(modules=[], graph_module_version=None), Status.UNHEALTHY, "module_missing"),
        (
            {},
            _observed(graph_error="errMsg: Invalid input"),
            Status.UNHEALTHY,
            "graph_query_failed",
        ),
        ({}, _observed(graph_error="Query timed out"), Status.UNHEALTHY, "timeout"),
        (
            {"expect_role": "replica"},
            _observed(role="replica", master_link_status="up"),
            Status.HEALTHY,
            "ok",
        ),
        (
            {"expect_role": "replica"},
            _observed(role="replica", master_link_status="up", probe_graph="missing"),
            Status.DEGRADED,
            "probe_graph_missing",
        ),
        (
            {"degraded_waiting_queries": 5},
            _observed(waiting_queries=6, waiting_queries_previous=2),
            Status.DEGRADED,
            "queries_waiting",
        ),
        (
            # A long queue that is draining is not degraded.
            {"degraded_waiting_queries": 5},
            _observed(waiting_queries=6, waiting_queries_previous=9),
            Status.HEALTHY,
            "ok",
        ),
        (
            # Growing, but still short.
            {"degraded_waiting_queries": 5},
            _observed(waiting_queries=3, waiting_queries_previous=1),
            Status.HEALTHY,
            "ok",
        ),
        (
            # The first probe has no previous count: a long queue counts as grown from zero.
            {"degraded_waiting_queries": 5},
            _observed(waiting_queries=7, waiting_queries_previous=None),
            Status.DEGRADED,
            "queries_waiting",
        ),
        (
            # Redis findings carry over: a failing save is degraded here too.
            {},
            _observed(rdb_last_bgsave_status="err"),
            Status.DEGRADED,
            "persistence_failing",
        ),
        (
            # An unhealthy graph outranks a degraded server.
            {},
            _observed(rdb_last_bgsave_status="err", graph_module_version=None, modules=[]),
            Status.UNHEALTHY,
            "module_missing",
        ),
        ({}, _observed(role="replica"), Status.UNHEALTHY, "wrong_role"),
        ({}, Observation(0.01, failure=Failure("busy", "BUSY")), Status.UNHEALTHY, "busy"),
    ],
)
def test_assess_table(
    settings: dict[str, Any], observation: Observation, status: Status, code: str
) -> None:
    finding = assess(_check(url="redis://graph:6379", **settings), observation)
    assert (finding.status, finding.reason_code) == (status, code)


@pytest.mark.parametrize(
    ("encoded", "version"),
    [("41603", "4.16.3"), ("20811", "2.8.11"), (None, None), ("dev", "dev")],
)
def test_module_version_is_decoded(encoded: str | None, version: str | None) -> None:
    assert module_version(encoded) == version


# --- end to end ---------------------------------------------------------------------------------


def test_daemon_reports_falkordb_verdicts_without_showing_any_password(
    falkordb: RedisServer, redis_main: RedisServer, tmp_path: Path
) -> None:
    env = credentials_env(
        tmp_path, falkordb_password=FALKORDB_PASSWORD, redis_password=REDIS_PASSWORD
    )
    components = f"""
[components.graph]
kind = "falkordb"
url = "{falkordb.url()}"
password = "${{credential:falkordb_password}}"

[components.not_a_graph]
kind = "falkordb"
url = "{redis_main.url()}"
password = "${{credential:redis_password}}"
"""

    out = run_daemon_once(tmp_path, components, env)

    assert out.verdicts() == {
        "graph": ("healthy", "ok"),
        "not_a_graph": ("unhealthy", "module_missing"),
    }
    assert out.status["components"]["graph"]["details"]["graph_module_version"]
    assert 'healthd_component_status{component="graph",kind="falkordb"} 0.0' in out.metrics
    assert out.shows_any(FALKORDB_PASSWORD, REDIS_PASSWORD) == []
