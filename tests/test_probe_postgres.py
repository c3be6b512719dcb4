"""The postgres probe against real PostgreSQL servers, and its pure verdicts in tables."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from healthd.config import PostgresCheck
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes import ProbeContext, SharedResources
from healthd.probes import postgres as postgres_probe
from healthd.probes.postgres import assess, connect_timeout_seconds, failure_code
from tests.daemon import credentials_env, run_daemon_once
from tests.datastores import (
    PG_PASSWORD,
    PG_PASSWORD_USER,
    PG_PROBE_USER,
    PostgresServer,
    wait_until,
)
from tests.probing import make_check, probe_once, run_check, states_after

_check = functools.partial(make_check, "postgres", timeout=2.0)


# --- real servers ---------------------------------------------------------------------------


@pytest.fixture
def primary_check(pg_primary: PostgresServer) -> Callable[..., PostgresCheck]:
    """A postgres check of the session's primary as the monitoring role, with ``overrides``."""

    def check(**overrides: Any) -> PostgresCheck:
        built: PostgresCheck = _check(dsn=pg_primary.dsn(user=PG_PROBE_USER), **overrides)
        return built

    return check


@pytest.mark.asyncio
async def test_healthy_primary_reports_role_connections_and_version(
    primary_check: Callable[..., PostgresCheck],
) -> None:
    observation, finding = await probe_once(primary_check())

    assert (finding.status, finding.reason_code) == (Status.HEALTHY, "ok")
    facts = observation.facts
    assert facts["role"] == "primary"
    assert facts["in_recovery"] is False
    assert facts["server_version"].split(".")[0].isdigit()
    assert facts["max_connections"] == 20
    assert facts["connections_usable"] == 17  # 20 minus 3 reserved for superusers
    assert facts["connections_used"] >= 1  # the probe itself
    assert facts["replay_lag_seconds"] is None
    assert "primary" in finding.reason


@pytest.mark.asyncio
async def test_probe_connects_fresh_and_leaves_no_connection_behind(
    pg_primary: PostgresServer,
    primary_check: Callable[..., PostgresCheck],
) -> None:
    check = primary_check()
    ctx = ProbeContext(SharedResources())
    for _ in range(3):
        _, finding = await run_check(check, ctx)
        assert finding.status is Status.HEALTHY
    await ctx.aclose()

    # Closing sends Terminate; the backend exits a moment later, so poll without blocking.
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'healthd'"
    with anyio.fail_after(2):
        while pg_primary.execute(sessions) != [(0,)]:
            await anyio.sleep(0.01)


@pytest.mark.asyncio
async def test_password_from_environment_authenticates(
    pg_primary: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_PG_PASSWORD", PG_PASSWORD)
    check = _check(
        dsn=pg_primary.dsn(user=PG_PASSWORD_USER), password="${env:HEALTHD_TEST_PG_PASSWORD}"
    )

    observation, finding = await probe_once(check)

    assert finding.status is Status.HEALTHY, finding
    assert PG_PASSWORD not in repr(observation) + repr(finding) + str(check)


@pytest.mark.asyncio
async def test_password_from_file_inside_the_url_authenticates(
    pg_primary: PostgresServer, tmp_path: Path
) -> None:
    secret = tmp_path / "pg-password"
    secret.write_text(PG_PASSWORD + "\n")
    check = _check(dsn=pg_primary.url(PG_PASSWORD_USER, password=f"${{file:{secret}}}"))

    observation, finding = await probe_once(check)

    assert finding.status is Status.HEALTHY, finding
    assert PG_PASSWORD not in repr(observation) + repr(finding) + str(check)


@pytest.mark.asyncio
async def test_wrong_password_is_auth_failed_without_showing_the_password(
    pg_primary: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-Password-77"
    caplog.set_level("DEBUG")
    check = _check(dsn=pg_primary.url(PG_PASSWORD_USER, password=wrong))

    observation, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "auth_failed")
    assert "password authentication failed" in finding.reason
    exported = repr(observation) + repr(finding) + str(check) + caplog.text
    assert wrong not in exported
    assert PG_PASSWORD not in exported


@pytest.mark.asyncio
async def test_missing_database_is_unhealthy(pg_primary: PostgresServer) -> None:
    check = _check(dsn=pg_primary.dsn(user=PG_PROBE_USER, dbname="no_such_db"))

    _, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "database_missing")
    assert "no_such_db" in finding.reason


@pytest.mark.asyncio
async def test_exhausted_connection_slots_are_saturated_until_released(
    pg_primary: PostgresServer,
    primary_check: Callable[..., PostgresCheck],
) -> None:
    check = primary_check()
    held: list[psycopg.Connection[Any]] = []
    try:
        # Fill every slot a non-superuser may take; the next connection is refused with 53300.
        refusal = ""
        for _ in range(30):
            try:
                held.append(psycopg.connect(pg_primary.dsn(user=PG_PROBE_USER)))
            except psycopg.OperationalError as exc:
                refusal = str(exc)
                break
        assert "reserved" in refusal
        _, finding = await probe_once(check)
        assert (finding.status, finding.reason_code) == (Status.DEGRADED, "saturated")
    finally:
        for conn in held:
            conn.close()

    _, finding = await probe_once(check)
    assert finding.status is Status.HEALTHY


@pytest.mark.asyncio
async def test_saturation_above_threshold_is_degraded(
    pg_primary: PostgresServer, primary_check: Callable[..., PostgresCheck]
) -> None:
    check = primary_check(degraded_saturation=0.8)
    # 15 held plus the probe make 16 of 17 usable slots: 94 %.
    with pg_primary.held_connections(15):
        observation, finding = await probe_once(check)

    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "saturated")
    assert observation.facts["connections_used"] >= 16
    assert observation.facts["saturation"] > 0.8
    _, finding = await probe_once(check)
    assert finding.status is Status.HEALTHY


@pytest.mark.asyncio
async def test_long_transaction_is_degraded_until_it_ends(
    pg_primary: PostgresServer, primary_check: Callable[..., PostgresCheck]
) -> None:
    check = primary_check(degraded_transaction_age="1ms")
    with psycopg.connect(pg_primary.dsn()) as conn:  # not autocommit: a transaction stays open
        conn.execute("SELECT txid_current()")
        observation, finding = await probe_once(check)
        assert (finding.status, finding.reason_code) == (Status.DEGRADED, "long_transaction")
        assert observation.facts["longest_transaction_seconds"] > 0.001
        conn.rollback()
        _, finding = await probe_once(check)
        assert finding.status is Status.HEALTHY


def _replayed_everything(standby: PostgresServer) -> bool:
    rows = standby.execute(
        "SELECT pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() "
        "AND pg_last_xact_replay_timestamp() IS NOT NULL"
    )
    return bool(rows[0][0])


def _received_ahead_of_replay(standby: PostgresServer) -> bool:
    rows = standby.execute("SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()")
    return bool(rows[0][0])


@pytest.mark.asyncio
async def test_replay_lag_above_threshold_is_degraded_until_caught_up(
    pg_primary: PostgresServer, pg_standby: PostgresServer
) -> None:
    check = _check(dsn=pg_standby.dsn(), expect_role="standby", degraded_replay_lag="1ms")
    pg_primary.execute("CREATE TABLE IF NOT EXISTS lag_probe (n int)")
    pg_primary.execute("INSERT INTO lag_probe VALUES (1)")
    wait_until(lambda: _replayed_everything(pg_standby), what="the standby to catch up")
    observation, finding = await probe_once(check)
    assert observation.facts["replay_lag_seconds"] == 0.0
    assert finding.status is Status.HEALTHY

    pg_standby.execute("SELECT pg_wal_replay_pause()")
    pg_primary.execute("INSERT INTO lag_probe VALUES (2)")
    wait_until(lambda: _received_ahead_of_replay(pg_standby), what="WAL the standby holds back")
    observation, finding = await probe_once(check)
    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "replication_lag")
    assert observation.facts["replay_lag_seconds"] > 0.001

    pg_standby.execute("SELECT pg_wal_replay_resume()")
    wait_until(lambda: _replayed_everything(pg_standby), what="the standby to catch up")
    _, finding = await probe_once(check)
    assert finding.status is Status.HEALTHY


@pytest.mark.asyncio
async def test_standby_not_accepting_connections_is_not_ready_until_hot(
    pg_standby: PostgresServer,
) -> None:
    check = _check(dsn=pg_standby.dsn(), expect_role="standby")
    pg_standby.stop()
    # A standby without hot_standby is up and replaying, but rejects sessions with 57P03.
    pg_standby.start(wait=False, hot_standby="off")
    pg_standby.wait_for(
        lambda error: error is not None and "not accepting connections" in str(error),
        "rejecting connections as a cold standby",
    )

    _, finding = await probe_once(check)
    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "not_ready")

    pg_standby.stop()
    pg_standby.start()
    _, finding = await probe_once(check)
    assert finding.status is Status.HEALTHY


@pytest.mark.asyncio
async def test_query_that_hangs_is_cut_at_the_deadline_and_its_session_ends(
    pg_primary: PostgresServer,
    primary_check: Callable[..., PostgresCheck],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server that accepts the session but never answers the query: psycopg, cancelled, would
    # spend up to 10 s asking the server to cancel; the deadline must still hold.
    monkeypatch.setattr(postgres_probe, "_STATE_QUERY", "SELECT pg_sleep(30)")
    check = primary_check(timeout=0.5)

    started = time.perf_counter()
    _, finding = await probe_once(check)
    elapsed = time.perf_counter() - started

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "timeout")
    assert finding.reason == "postgres query: timed out (timeout 500 ms)"
    assert elapsed < 0.5 + 0.3
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
    with anyio.fail_after(5):
        while pg_primary.execute(sleeping + " AND state = 'active'") != [(0,)]:
            await anyio.sleep(0.01)


# --- pure judgement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sqlstate", "message", "code"),
    [
        ("57P03", "the database system is starting up", "not_ready"),
        ("53300", "sorry, too many clients already", "saturated"),
        ("28P01", "password authentication failed", "auth_failed"),
        ("28000", "no pg_hba.conf entry", "auth_failed"),
        ("3D000", 'database "x" does not exist', "database_missing"),
        ("57P01", "terminating connection due to administrator command", "admin_shutdown"),
        ("57P02", "terminating connection because of crash", "crash_shutdown"),
        ("57014", "canceling statement due to statement timeout", "timeout"),
        ("42601", "syntax error", "query_error"),
        # A SQLSTATE wins over the message: this is no missing database.
        ("42P01", 'relation "x" does not exist', "query_error"),
        (None, "FATAL:  the database system is starting up", "not_ready"),
        (None, "FATAL:  the database system is shutting down", "not_ready"),
        (None, "FATAL:  the database system is not accepting connections", "not_ready"),
        (None, "FATAL:  sorry, too many clients already", "saturated"),
        (None, "FATAL:  remaining connection slots are reserved for roles with ...", "saturated"),
        (None, 'FATAL:  password authentication failed for user "u"', "auth_failed"),
        (None, 'FATAL:  no pg_hba.conf entry for host "1.2.3.4"', "auth_failed"),
        (None, 'FATAL:  role "ghost" does not exist', "auth_failed"),
        (None, 'FATAL:  database "ghost" does not exist', "database_missing"),
        (None, "FATAL:  terminating connection due to administrator command", "admin_shutdown"),
        (None, "failed: Connection refused\n\tIs the server running", "connection_refused"),
        (None, "connection timeout expired", "timeout"),
        (None, 'could not translate host name "nowhere" to address', "dns_error"),
        (None, "server closed the connection unexpectedly", "connection_reset"),
        (None, "something nobody has seen before", "connection_error"),
    ],
)
def test_failure_codes_by_sqlstate_then_message(
    sqlstate: str | None, message: str, code: str
) -> None:
    assert failure_code(sqlstate, message) == code


def _observed(**overrides: Any) -> Observation:
    """A successful probe's observation: a healthy server's facts, changed by ``overrides``."""
    facts: dict[str, Any] = {
        "server_version": "18.1",
        "in_recovery": False,
        "role": "primary",
        "max_connections": 100,
        "connections_used": 10,
        "connections_usable": 97,
        "saturation": 0.1031,
        "replay_lag_seconds": None,
        "longest_transaction_seconds": None,
    }
    facts.update(overrides)
    return Observation(0.01, facts=facts)


_STANDBY = {"in_recovery": True, "role": "standby", "replay_lag_seconds": 0.0}


@pytest.mark.parametrize(
    ("settings", "observation", "status", "code"),
    [
        ({}, _observed(), Status.HEALTHY, "ok"),
        ({"expect_role": "standby"}, _observed(), Status.UNHEALTHY, "wrong_role"),
        ({}, _observed(**_STANDBY), Status.UNHEALTHY, "wrong_role"),
        ({"expect_role": "any"}, _observed(**_STANDBY), Status.HEALTHY, "ok"),
        (
            {"expect_role": "standby", "degraded_replay_lag": 30},
            _observed(**{**_STANDBY, "replay_lag_seconds": 31.0}),
            Status.DEGRADED,
            "replication_lag",
        ),
        (
            {"expect_role": "standby", "degraded_replay_lag": 30},
            _observed(**{**_STANDBY, "replay_lag_seconds": 29.0}),
            Status.HEALTHY,
            "ok",
        ),
        (
            {"expect_role": "standby", "degraded_replay_lag": None},
            _observed(**{**_STANDBY, "replay_lag_seconds": 9999.0}),
            Status.HEALTHY,
            "ok",
        ),
        ({}, _observed(connections_used=80, saturation=0.8247), Status.DEGRADED, "saturated"),
        (
            {"degraded_saturation": 0.9},
            _observed(connections_used=80, saturation=0.8247),
            Status.HEALTHY,
            "ok",
        ),
        (
            {"degraded_transaction_age": 300},
            _observed(longest_transaction_seconds=301.0),
            Status.DEGRADED,
            "long_transaction",
        ),
        (
            {"degraded_transaction_age": None},
            _observed(longest_transaction_seconds=99999.0),
            Status.HEALTHY,
            "ok",
        ),
        (
            # A wrong role outranks every degraded finding.
            {"expect_role": "standby"},
            _observed(saturation=0.99, longest_transaction_seconds=1e6),
            Status.UNHEALTHY,
            "wrong_role",
        ),
        (
            {},
            Observation(0.01, failure=Failure("saturated", "too many clients")),
            Status.DEGRADED,
            "saturated",
        ),
        *[
            (
                {},
                Observation(0.01, failure=Failure(code, "x")),
                Status.UNHEALTHY,
                code,
            )
            for code in (
                "not_ready",
                "auth_failed",
                "database_missing",
                "admin_shutdown",
                "crash_shutdown",
                "connection_refused",
                "timeout",
            )
        ],
    ],
)
def test_assess_table(
    settings: dict[str, Any], observation: Observation, status: Status, code: str
) -> None:
    finding = assess(_check(dsn="host=db", **settings), observation)
    assert (finding.status, finding.reason_code) == (status, code)


def _failure(code: str) -> Finding:
    return assess(_check(dsn="host=db"), Observation(0.01, failure=Failure(code, code)))


def test_not_ready_is_degraded_at_first_then_unhealthy_at_the_failure_threshold() -> None:
    check = _check(dsn="host=db", failure_threshold=3)
    healthy = assess(check, _observed())
    states = states_after(check, [healthy, *[_failure("not_ready")] * 3], name="db")
    assert [s.status for s in states] == [
        Status.HEALTHY,
        Status.DEGRADED,
        Status.DEGRADED,
        Status.UNHEALTHY,
    ]
    assert states[1].reason.endswith("(1 of 3 failures)")
    assert states[3].reason_code == "not_ready"


def test_too_many_connections_stays_degraded_however_long_it_lasts() -> None:
    check = _check(dsn="host=db", failure_threshold=2)
    states = states_after(check, [_failure("saturated")] * 5, name="db")
    assert {s.status for s in states} == {Status.DEGRADED}
    assert {s.reason_code for s in states} == {"saturated"}


def test_connect_timeout_never_goes_below_psycopgs_two_second_floor() -> None:
    assert connect_timeout_seconds(_check(dsn="host=db", timeout=0.5)) == 2
    assert connect_timeout_seconds(_check(dsn="host=db", timeout=10.0)) == 9


# --- end to end ---------------------------------------------------------------------------------


def test_daemon_reports_postgres_verdicts_without_showing_any_password(
    pg_primary: PostgresServer, tmp_path: Path
) -> None:
    wrong = "Wrong-pg-Password-4242"
    components = f"""
[components.db]
kind = "postgres"
dsn = "{pg_primary.dsn(user=PG_PASSWORD_USER)}"
password = "${{credential:postgres_password}}"

[components.db_wrong_password]
kind = "postgres"
dsn = "{pg_primary.url(PG_PASSWORD_USER, password="${env:HEALTHD_TEST_WRONG}")}"

[components.db_missing]
kind = "postgres"
dsn = "{pg_primary.dsn(user=PG_PROBE_USER, dbname="nowhere")}"
"""
    env = {**credentials_env(tmp_path, postgres_password=PG_PASSWORD), "HEALTHD_TEST_WRONG": wrong}

    out = run_daemon_once(tmp_path, components, env)

    assert out.verdicts() == {
        "db": ("healthy", "ok"),
        "db_wrong_password": ("unhealthy", "auth_failed"),
        "db_missing": ("unhealthy", "database_missing"),
    }
    assert out.status["components"]["db"]["details"]["role"] == "primary"
    assert 'healthd_component_status{component="db",kind="postgres"} 0.0' in out.metrics
    assert out.shows_any(PG_PASSWORD, wrong) == []


@pytest.mark.asyncio
async def test_healthd_out_of_descriptors_is_its_own_trouble_not_the_databases(
    primary_check: Callable[..., PostgresCheck],
) -> None:
    # libpq reports EMFILE as a message ("could not create socket: Too many open files"), not
    # as an OSError: it must still read as healthd's trouble, which keeps the last verdict.
    check = primary_check()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        # Fill every descriptor below a lowered limit, so the next socket() fails.
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        observation, _ = await probe_once(check)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert observation.failure is not None
    assert observation.failure.code == "resource_exhausted", observation.failure
    # And with descriptors back, the same check is healthy.
    _, finding = await probe_once(check)
    assert finding.reason_code == "ok"
