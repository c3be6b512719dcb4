"""The redis probe against real Redis 8 servers, and its pure verdicts in tables."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis._parsers.base import BaseParser

from healthd.model import Failure, Finding, Observation, Status
from healthd.probes import ProbeContext, SharedResources
from healthd.probes.redis import assess, failure_for, parse_info, server_facts
from healthd.secrets import Redactor
from tests.daemon import run_daemon_once
from tests.datastores import (
    REDIS_PASSWORD,
    RedisServer,
    wait_until,
)
from tests.probing import make_check, probe_once, run_check, shown_runs, states_after

_check = functools.partial(make_check, "redis")


@pytest.fixture
def password_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """The main server's password in the environment, as a config references it."""
    monkeypatch.setenv("HEALTHD_TEST_REDIS_PASSWORD", REDIS_PASSWORD)
    return "${env:HEALTHD_TEST_REDIS_PASSWORD}"


# --- real servers ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_healthy_master_reports_info_facts(
    redis_main: RedisServer, password_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    check = _check(url=redis_main.url(), password=password_env)

    observation, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.HEALTHY, "ok")
    facts = observation.facts
    assert facts["role"] == "master"
    assert facts["redis_version"].startswith("8.")
    assert facts["maxclients"] == 10000
    assert facts["connected_clients"] >= 1
    assert facts["used_memory"] > 0
    assert facts["maxmemory"] == 0
    assert facts["memory_ratio"] is None  # no limit, nothing to compare against
    assert facts["rdb_last_bgsave_status"] == "ok"
    assert facts["modules"] == [] or "graph" not in facts["modules"]
    assert REDIS_PASSWORD not in repr(observation) + repr(finding) + str(check) + caplog.text


@pytest.mark.asyncio
async def test_password_inside_the_url_from_the_environment_authenticates(
    redis_main: RedisServer, password_env: str
) -> None:
    check = _check(url=f"redis://:{password_env}@127.0.0.1:{redis_main.port}/0")

    observation, finding = await probe_once(check)

    assert finding.status is Status.HEALTHY, finding
    assert REDIS_PASSWORD not in repr(observation) + repr(finding) + str(check)


@pytest.mark.asyncio
async def test_probe_closes_its_connection_every_time(
    redis_main: RedisServer, password_env: str
) -> None:
    check = _check(url=redis_main.url(), password=password_env)
    ctx = ProbeContext(SharedResources())
    for _ in range(3):
        _, finding = await run_check(check, ctx)
        assert finding.status is Status.HEALTHY
    await ctx.aclose()

    def healthd_clients() -> int:
        with redis_main.client() as client:
            return len(client.client_list()) - 1  # all but this control client

    # asyncio closes a socket on the loop's next turn, and the server notices on its own next
    # turn: so poll without blocking the loop.
    with anyio.fail_after(2):
        while healthd_clients():
            await anyio.sleep(0.01)


@pytest.mark.parametrize(
    ("password", "reply"),
    [("wrong-Password-123", "WRONGPASS"), (None, "NOAUTH")],
)
@pytest.mark.asyncio
async def test_wrong_or_missing_password_is_auth_failed(
    redis_main: RedisServer,
    caplog: pytest.LogCaptureFixture,
    password: str | None,
    reply: str,
) -> None:
    caplog.set_level("DEBUG")
    check = _check(url=redis_main.url(password))

    observation, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "auth_failed")
    exported = repr(observation) + repr(finding) + str(check) + caplog.text
    assert REDIS_PASSWORD not in exported
    if password is not None:
        assert password not in exported


@pytest.fixture
def busy_script(redis_victim: RedisServer) -> Iterator[RedisServer]:
    """A Lua script that never ends, sent without waiting for its reply; killed afterwards."""
    with redis_victim.client() as control:
        control.config_set("busy-reply-threshold", 20)
    runner = redis_victim.client()
    connection = runner.connection_pool.get_connection()
    connection.send_command("EVAL", "while true do end", 0)

    def busy() -> bool:
        try:
            with redis_victim.client() as probe:
                probe.ping()
        except redis.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    wait_until(busy, what="the script to make the server BUSY")
    yield redis_victim
    with redis_victim.client() as control, contextlib.suppress(redis.ResponseError):
        control.script_kill()  # NOTBUSY when the test killed it already
    connection.disconnect()
    runner.close()


@pytest.mark.asyncio
async def test_busy_script_is_degraded_then_unhealthy_by_threshold_then_recovers(
    busy_script: RedisServer,
) -> None:
    check = _check(url=busy_script.url(), failure_threshold=2, recovery_threshold=1)
    healthy = Finding(Status.HEALTHY, "ok", "PONG")
    busy = [(await probe_once(check))[1] for _ in range(2)]
    with busy_script.client() as control:
        control.script_kill()
    wait_until(lambda: _pings(busy_script), what="the script to be killed")
    _, recovered = await probe_once(check)

    assert {(f.status, f.reason_code) for f in busy} == {(Status.UNHEALTHY, "busy")}
    assert recovered.status is Status.HEALTHY
    states = states_after(check, [healthy, *busy, recovered], name="cache")
    assert [s.status for s in states] == [
        Status.HEALTHY,
        Status.DEGRADED,  # 1 of 2 failures
        Status.UNHEALTHY,
        Status.HEALTHY,
    ]


def _pings(server: RedisServer) -> bool:
    try:
        with server.client() as client:
            return bool(client.ping())
    except redis.ResponseError:
        return False


def _bgsave_finished(server: RedisServer, status: str) -> bool:
    with server.client() as client:
        info = client.info("persistence")
    return bool(info["rdb_bgsave_in_progress"] == 0 and info["rdb_last_bgsave_status"] == status)


@pytest.mark.asyncio
async def test_failing_background_save_is_degraded_until_a_save_succeeds(
    redis_main: RedisServer, password_env: str
) -> None:
    check = _check(url=redis_main.url(), password=password_env)
    unwritable = redis_main.data_dir / "unwritable"
    unwritable.mkdir()
    redis_main.user.own(unwritable)
    os.chmod(unwritable, 0o555)  # noqa: S103 - read-only is the point
    with redis_main.client() as client:
        client.config_set("dir", str(unwritable))
        client.bgsave()
    wait_until(lambda: _bgsave_finished(redis_main, "err"), what="the background save to fail")

    observation, finding = await probe_once(check)
    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "persistence_failing")
    assert observation.facts["rdb_last_bgsave_status"] == "err"
    assert "MISCONF" in finding.reason

    with redis_main.client() as client:
        client.config_set("dir", str(redis_main.data_dir))
        client.bgsave()
    wait_until(lambda: _bgsave_finished(redis_main, "ok"), what="the background save to succeed")
    _, finding = await probe_once(check)
    assert finding.status is Status.HEALTHY


@pytest.mark.asyncio
async def test_memory_near_maxmemory_is_degraded(
    redis_main: RedisServer, password_env: str
) -> None:
    check = _check(url=redis_main.url(), password=password_env, degraded_memory=0.9)
    with redis_main.client() as client:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", int(used / 0.95))

    observation, finding = await probe_once(check)
    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "memory_high")
    assert observation.facts["memory_ratio"] > 0.9

    with redis_main.client() as client:
        client.config_set("maxmemory", 0)
    _, finding = await probe_once(check)
    assert finding.status is Status.HEALTHY


async def _client_when_a_slot_is_free(server: RedisServer) -> redis.Redis:
    """A connected control client, once the server has noticed closed sockets."""
    with anyio.fail_after(5):
        while True:
            client = server.client()
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                client.close()
                await anyio.sleep(0.01)  # let the server's event loop turn


@pytest.mark.asyncio
async def test_clients_at_maxclients_are_degraded_and_refused_clients_saturated(
    redis_victim: RedisServer,
) -> None:
    check = _check(url=redis_victim.url(), degraded_clients=0.8)
    with redis_victim.client() as client:
        client.config_set("maxclients", 1)

    observation, finding = await probe_once(check)
    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "clients_high")
    assert observation.facts["clients_ratio"] == 1.0

    holder = await _client_when_a_slot_is_free(redis_victim)  # takes the only slot
    try:
        _, refused = await probe_once(check)
    finally:
        holder.close()
    assert (refused.status, refused.reason_code) == (Status.DEGRADED, "saturated")

    with await _client_when_a_slot_is_free(redis_victim) as client:
        client.config_set("maxclients", 10000)
    _, finding = await probe_once(check)
    assert finding.status is Status.HEALTHY


def _link_status(replica: RedisServer) -> str:
    with replica.client() as client:
        return str(client.info("replication")["master_link_status"])


@pytest.mark.parametrize(
    ("serve_stale_data", "expected", "facts"),
    [
        pytest.param(
            "yes",
            (Status.DEGRADED, "master_link_down"),
            {"master_link_status": "down"},
            id="serving-stale-data-is-degraded",
        ),
        pytest.param(
            "no", (Status.UNHEALTHY, "master_down"), {}, id="serving-no-stale-data-is-master-down"
        ),
    ],
)
@pytest.mark.asyncio
async def test_replica_whose_master_is_gone_is_judged_by_what_it_serves_until_the_master_returns(
    redis_replication: tuple[RedisServer, RedisServer],
    password_env: str,
    serve_stale_data: str,
    expected: tuple[Status, str],
    facts: dict[str, Any],
) -> None:
    master, replica = redis_replication
    check = _check(url=replica.url(), password=password_env, expect_role="replica")
    with replica.client() as client:
        client.config_set("replica-serve-stale-data", serve_stale_data)
    try:
        observation, finding = await probe_once(check)
        assert finding.status is Status.HEALTHY
        assert observation.facts["master_link_status"] == "up"

        master.kill()
        wait_until(lambda: _link_status(replica) == "down", what="the replica to notice")
        observation, finding = await probe_once(check)
        assert (finding.status, finding.reason_code) == expected
        assert {key: observation.facts[key] for key in facts} == facts

        master.start()
        wait_until(lambda: _link_status(replica) == "up", what="the replica to reconnect")
        _, finding = await probe_once(check)
        assert finding.status is Status.HEALTHY
    finally:
        with replica.client() as client:
            client.config_set("replica-serve-stale-data", "yes")


# --- pure judgement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ("LOADING Redis is loading the dataset in memory", "loading"),
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL", "busy"),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is no", "master_down"),
        ("NOAUTH Authentication required.", "auth_failed"),
        ("WRONGPASS invalid username-password pair or user is disabled.", "auth_failed"),
        ("READONLY You can't write against a read only replica.", "wrong_role"),
        (
            "MISCONF Redis is configured to save RDB snapshots, but it's not able",
            "persistence_failing",
        ),
        ("NOPERM User probe has no permissions to run the 'info' command", "permission_denied"),
        ("ERR max number of clients reached", "saturated"),
        ("ERR unknown command 'FOO'", "error_reply"),
    ],
)
def test_error_replies_map_to_reason_codes(reply: str, code: str) -> None:
    exc = BaseParser.parse_error(reply)
    assert failure_for(exc, "redis", Redactor()).code == code


def test_connection_errors_map_through_their_cause() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1.") from None
    except redis.ConnectionError as exc:
        error = exc
    assert failure_for(error, "redis", Redactor()).code == "connection_refused"
    assert failure_for(redis.TimeoutError("Timeout"), "redis", Redactor()).code == "timeout"


def test_secrets_are_scrubbed_from_failure_messages() -> None:
    exc = redis.ResponseError("ERR weird reply mentioning hunter2-secret")
    failure = failure_for(exc, "redis", Redactor(["hunter2-secret"]))
    assert "hunter2-secret" not in failure.message


def test_long_reply_is_redacted_before_it_is_cut_and_escaped() -> None:
    secret = "hunter2-secret-value"
    exc = redis.ResponseError("ERR " + "x" * 90 + secret + "\r\n\x00" * 500)
    failure = failure_for(exc, "redis", Redactor([secret]))
    quoted = failure.message.removeprefix("redis: error reply: ")
    assert len(quoted) == 100
    assert quoted == "ERR " + "x" * 90 + "<re..."
    assert shown_runs(secret, failure.message) == []
    assert failure.message.isprintable()


_INFO = """# Server\r
redis_version:8.2.3\r
uptime_in_seconds:120\r
# Clients\r
connected_clients:5\r
maxclients:100\r
blocked_clients:0\r
# Memory\r
used_memory:900\r
maxmemory:1000\r
maxmemory_policy:noeviction\r
# Persistence\r
loading:0\r
rdb_last_bgsave_status:ok\r
aof_enabled:0\r
aof_last_write_status:ok\r
# Replication\r
role:slave\r
master_link_status:down\r
master_link_down_since_seconds:7\r
master_sync_in_progress:0\r
# Modules\r
module:name=graph,ver=41603,api=1,filters=0,usedby=[],using=[],options=[]\r
"""


def test_info_is_parsed_into_facts() -> None:
    facts = server_facts(parse_info(_INFO.encode()))
    assert facts["redis_version"] == "8.2.3"
    assert facts["role"] == "replica"
    assert facts["memory_ratio"] == 0.9
    assert facts["clients_ratio"] == 0.05
    assert facts["master_link_status"] == "down"
    assert facts["master_link_down_since_seconds"] == 7
    assert facts["modules"] == ["graph"]


def _facts(**overrides: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "redis_version": "8.2.3",
        "uptime_seconds": 1000,
        "role": "master",
        "used_memory": 100,
        "maxmemory": 0,
        "memory_ratio": None,
        "connected_clients": 3,
        "maxclients": 10000,
        "clients_ratio": 0.0003,
        "rdb_last_bgsave_status": "ok",
        "aof_last_write_status": "ok",
    }
    facts.update(overrides)
    return facts


_REPLICA = {"role": "replica", "master_link_status": "up", "master_link_down_since_seconds": -1}
_LINK_DOWN = {**_REPLICA, "master_link_status": "down"}


@pytest.mark.parametrize(
    ("settings", "facts", "status", "code"),
    [
        ({}, _facts(), Status.HEALTHY, "ok"),
        ({}, _facts(role="replica"), Status.UNHEALTHY, "wrong_role"),
        ({"expect_role": "replica"}, _facts(), Status.UNHEALTHY, "wrong_role"),
        ({"expect_role": "any"}, _facts(**_REPLICA), Status.HEALTHY, "ok"),
        ({}, _facts(rdb_last_bgsave_status="err"), Status.DEGRADED, "persistence_failing"),
        ({}, _facts(aof_last_write_status="err"), Status.DEGRADED, "persistence_failing"),
        ({}, _facts(memory_ratio=0.95), Status.DEGRADED, "memory_high"),
        ({"degraded_memory": 0.99}, _facts(memory_ratio=0.95), Status.HEALTHY, "ok"),
        ({}, _facts(clients_ratio=0.85), Status.DEGRADED, "clients_high"),
        (
            {"expect_role": "replica", "unhealthy_master_link_down": 60},
            _facts(**{**_LINK_DOWN, "master_link_down_since_seconds": 5}),
            Status.DEGRADED,
            "master_link_down",
        ),
        (
            {"expect_role": "replica", "unhealthy_master_link_down": 60},
            _facts(**{**_LINK_DOWN, "master_link_down_since_seconds": 60}),
            Status.UNHEALTHY,
            "master_link_down",
        ),
        (
            # Never connected: down for as long as the replica has been up.
            {"expect_role": "replica", "unhealthy_master_link_down": 60},
            _facts(**_LINK_DOWN, uptime_seconds=61),
            Status.UNHEALTHY,
            "master_link_down",
        ),
        (
            {"expect_role": "replica"},
            _facts(**_LINK_DOWN, master_sync_in_progress=True),
            Status.DEGRADED,
            "replica_syncing",
        ),
    ],
)
def test_assess_table(
    settings: dict[str, Any], facts: dict[str, Any], status: Status, code: str
) -> None:
    finding = assess(_check(url="redis://cache:6379", **settings), Observation(0.01, facts=facts))
    assert (finding.status, finding.reason_code) == (status, code)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("loading", Status.UNHEALTHY),
        ("busy", Status.UNHEALTHY),
        ("master_down", Status.UNHEALTHY),
        ("auth_failed", Status.UNHEALTHY),
        ("wrong_role", Status.UNHEALTHY),
        ("timeout", Status.UNHEALTHY),
        ("saturated", Status.DEGRADED),
    ],
)
def test_assess_failures(code: str, status: Status) -> None:
    finding = assess(_check(url="redis://cache"), Observation(0.01, failure=Failure(code, code)))
    assert (finding.status, finding.reason_code) == (status, code)


def test_loading_is_degraded_then_unhealthy_at_the_failure_threshold() -> None:
    check = _check(url="redis://cache", failure_threshold=3)
    healthy = assess(check, Observation(0.01, facts=_facts()))
    loading = assess(check, Observation(0.01, failure=Failure("loading", "loading")))
    states = states_after(check, [healthy, loading, loading, loading], name="cache")
    assert [s.status for s in states] == [
        Status.HEALTHY,
        Status.DEGRADED,
        Status.DEGRADED,
        Status.UNHEALTHY,
    ]


# --- end to end ---------------------------------------------------------------------------------


def test_daemon_reports_redis_verdicts_without_showing_any_password(
    redis_main: RedisServer, tmp_path: Path
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(REDIS_PASSWORD + "\n")
    wrong = "Wrong-redis-Password-77"
    components = f"""
[components.cache]
kind = "redis"
url = "{redis_main.url()}"
password = "${{file:{secret}}}"

[components.cache_wrong_password]
kind = "redis"
url = "redis://:${{env:HEALTHD_TEST_WRONG}}@127.0.0.1:{redis_main.port}/0"
"""

    out = run_daemon_once(tmp_path, components, {"HEALTHD_TEST_WRONG": wrong})

    assert out.verdicts() == {
        "cache": ("healthy", "ok"),
        "cache_wrong_password": ("unhealthy", "auth_failed"),
    }
    assert out.status["components"]["cache"]["details"]["role"] == "master"
    assert 'healthd_component_status{component="cache",kind="redis"} 0.0' in out.metrics
    assert out.shows_any(REDIS_PASSWORD, wrong) == []
