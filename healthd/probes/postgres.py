"""The ``postgres`` probe: a fresh connection, ``SELECT 1``, then the server's own account.

A pooled connection that survived a dead server proves nothing, so every probe connects
anew, in autocommit, as ``application_name=healthd``. One more round trip runs ``SELECT 1`` and
reads the role (``pg_is_in_recovery()``), connection saturation, standby replay lag and the
age of the oldest open transaction. ``assess`` turns those facts into a verdict.

Deadlines: psycopg raises any ``connect_timeout`` under 2 s to 2 s (and waits 130 s when it is
unset), so the client gets an explicit timeout, and the scheduler's ``fail_after`` enforces
anything shorter. Cancelling an async connect abandons the half-open ``PGconn``, which closes
its socket when it is collected.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg

from healthd.config import PostgresCheck
from healthd.findings import (
    OK,
    above_limit,
    failed_unless_busy,
    format_seconds,
    percent,
    worst,
)
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes._errors import (
    CLIENT_TIMEOUT_SHARE,
    RESOURCE_EXHAUSTED,
    descriptors_exhausted,
)
from healthd.quoting import quote
from healthd.secrets import Redactor

#: psycopg raises any ``connect_timeout`` under 2 s to 2 s.
_CONNECT_TIMEOUT_FLOOR_SECONDS = 2

#: One round trip for everything the verdict needs. ``reserved_connections`` exists from
#: PostgreSQL 16 on; ``current_setting(..., true)`` gives NULL before that. Replay lag is zero
#: when everything received has been replayed: ``now() - pg_last_xact_replay_timestamp()``
#: alone grows without bound on a standby of an idle primary.
_STATE_QUERY = """
SELECT
    pg_is_in_recovery(),
    current_setting('server_version'),
    current_database(),
    current_setting('max_connections')::int,
    current_setting('superuser_reserved_connections')::int
        + coalesce(current_setting('reserved_connections', true), '0')::int,
    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
    CASE WHEN pg_is_in_recovery() THEN
        CASE WHEN pg_last_wal_receive_lsn() IS NOT NULL
                  AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0.0
             ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
        END
    END,
    (SELECT extract(epoch FROM now() - min(xact_start))::float8
       FROM pg_stat_activity
      WHERE state <> 'idle' AND backend_type = 'client backend' AND pid <> pg_backend_pid())
"""

#: SQLSTATEs with a meaning of their own. Everything else is ``query_error``.
SQLSTATE_CODES: dict[str, str] = {
    "57P03": "not_ready",  # cannot_connect_now: starting up, shutting down, recovery
    "53300": "saturated",  # too_many_connections
    "28P01": "auth_failed",  # invalid_password
    "28000": "auth_failed",  # invalid_authorization_specification (pg_hba, unknown role)
    "3D000": "database_missing",  # invalid_catalog_name
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57014": "timeout",  # query_canceled, e.g. by statement_timeout
}

#: At connect time libpq gives no SQLSTATE, only the server's (English) message, so these
#: fragments are matched in order. The first group mirrors ``SQLSTATE_CODES``.
MESSAGE_CODES: tuple[tuple[str, str], ...] = (
    ("the database system is starting up", "not_ready"),
    ("the database system is shutting down", "not_ready"),
    ("the database system is not yet accepting connections", "not_ready"),
    ("the database system is not accepting connections", "not_ready"),
    ("the database system is in recovery mode", "not_ready"),
    ("too many clients already", "saturated"),
    ("remaining connection slots are reserved", "saturated"),
    ("too many connections for", "saturated"),
    ("password authentication failed", "auth_failed"),
    ("no pg_hba.conf entry", "auth_failed"),
    ("pg_hba.conf rejects connection", "auth_failed"),
    ("no password supplied", "auth_failed"),
    ("authentication failed", "auth_failed"),
    ('role "', "auth_failed"),  # role "x" does not exist: 28000
    ("does not exist", "database_missing"),  # database "x" does not exist: 3D000
    ("terminating connection due to administrator command", "admin_shutdown"),
    ("crash of another server process", "crash_shutdown"),
    ("connection refused", "connection_refused"),
    ("timeout expired", "timeout"),
    ("could not translate host name", "dns_error"),
    ("name or service not known", "dns_error"),
    ("no route to host", "unreachable"),
    ("network is unreachable", "unreachable"),
    ("server closed the connection unexpectedly", "connection_reset"),
    ("connection reset", "connection_reset"),
    # libpq's words for bytes that are not PostgreSQL's protocol. Before "ssl": libpq first
    # asks for TLS, and an answer that is neither 'S' (yes) nor 'N' (no) is not a TLS failure
    # but garbage from something that is not PostgreSQL. (An answer that starts with 'S' does
    # begin a TLS handshake, and what follows fails as TLS, as for a ``tcp`` check with TLS.)
    ("invalid response to ssl negotiation", "protocol_error"),
    ("error response during ssl exchange", "protocol_error"),
    ("unencrypted data after ssl request", "protocol_error"),
    ("invalid response to gssapi negotiation", "protocol_error"),
    ("expected authentication request from server", "protocol_error"),
    ("unexpected message from server", "protocol_error"),
    ("unexpected response from server", "protocol_error"),
    ("lost synchronization with server", "protocol_error"),
    ("invalid message length", "protocol_error"),
    ("message contents do not agree with length", "protocol_error"),
    ("insufficient data left in message", "protocol_error"),
    ("arrived from server while idle", "protocol_error"),
    ("ssl", "tls_error"),
)


def failure_code(sqlstate: str | None, message: str) -> str:
    """The reason code for a psycopg error: by SQLSTATE where there is one, else by message."""
    if sqlstate:
        return SQLSTATE_CODES.get(sqlstate, "query_error")
    text = message.lower()
    for fragment, code in MESSAGE_CODES:
        if fragment in text:
            return code
    return "connection_error"


def _server_message(text: str) -> str:
    """The useful line of an error's text: the server's ``FATAL:`` text if there is one."""
    text = text.strip()
    if "FATAL:" in text:
        text = text.rsplit("FATAL:", 1)[1]
    elif "failed:" in text:
        text = text.rsplit("failed:", 1)[1]
    return " ".join(text.split("\n", 1)[0].split())


#: libpq's own words (strerror) when healthd, not the server, ran out of descriptors, memory or
#: buffers: it reports EMFILE as a message, never as an ``OSError``.
_OWN_RESOURCES = (
    "too many open files",
    "cannot allocate memory",
    "no buffer space available",
    "out of memory",
)


def _failure(exc: psycopg.Error, what: str, check: PostgresCheck) -> Failure:
    text = str(exc).lower()
    if exc.sqlstate is None and (
        any(words in text for words in _OWN_RESOURCES) or descriptors_exhausted()
    ):
        # healthd's trouble, not the database's: the scheduler keeps the last verdict.
        return Failure(RESOURCE_EXHAUSTED, f"{what}: healthd is out of its own resources")
    code = failure_code(exc.sqlstate, str(exc))
    if code == "timeout":
        # libpq's "timeout expired" and the server's statement_timeout both enforce the
        # configured timeout (or a share of it): name that, not libpq's own number.
        return Failure("timeout", f"{what}: timed out{_limit(check)}")
    # Redacted whole, before the message is cut to its useful line and quoted: libpq never
    # echoes a password, but a DSN fragment, or a server that is not PostgreSQL, could.
    secrets = check.dsn.secrets + (check.password.secrets if check.password else ())
    message = quote(_server_message(Redactor(secrets).scrub(str(exc))))
    return Failure(code, f"{what}: {message}")


def _limit(check: PostgresCheck) -> str:
    return f" (timeout {format_seconds(check.timeout_seconds)})"


def _script(check: PostgresCheck) -> str:
    """``SELECT 1`` and the state query in one round trip (the simple protocol runs several
    statements per message), in a read-only transaction whose ``statement_timeout`` makes the
    server itself give up when the check's deadline passes.

    Without it, a query the deadline abandoned would keep its backend busy on the server: psycopg
    closes the connection, but the server only notices once the query ends. ``SET LOCAL`` dies
    with the transaction, so nothing leaks into a pooled server connection (pgbouncer,
    Supavisor).
    """
    timeout_ms = max(1, round(check.timeout_seconds * 1000))
    return (
        f"BEGIN READ ONLY; SET LOCAL statement_timeout = {timeout_ms}; "
        f"SELECT 1; {_STATE_QUERY.strip()}; COMMIT"
    )


def connect_timeout_seconds(check: PostgresCheck) -> int:
    """libpq's whole-second ``connect_timeout`` for this check, never under psycopg's floor."""
    share = int(check.timeout_seconds * CLIENT_TIMEOUT_SHARE)
    return max(_CONNECT_TIMEOUT_FLOOR_SECONDS, share)


async def probe(check: PostgresCheck, ctx: ProbeContext) -> Observation:
    """Connect fresh; ``SELECT 1`` and read the server's state in one round trip; close."""
    what = "postgres"
    params: dict[str, Any] = {
        "autocommit": True,
        "application_name": "healthd",
        "connect_timeout": connect_timeout_seconds(check),
        # One script per connection: preparing statements would be waste.
        "prepare_threshold": None,
    }
    if check.password is not None:
        params["password"] = check.password.reveal()
    facts: dict[str, Any] = {}
    started = time.perf_counter()
    # Our own deadline, a little before the scheduler's, so the reason can name the phase
    # (psycopg's own connect_timeout cannot go under 2 s).
    deadline = anyio.current_time() + check.timeout_seconds * CLIENT_TIMEOUT_SHARE
    with anyio.CancelScope(deadline=deadline) as scope:
        try:
            conn = await psycopg.AsyncConnection.connect(check.dsn.reveal(), **params)
        except psycopg.Error as exc:
            return Observation(
                time.perf_counter() - started, failure=_failure(exc, f"{what} connect", check)
            )
    if scope.cancelled_caught:
        failure = Failure("timeout", f"{what} connect: timed out{_limit(check)}")
        return Observation(time.perf_counter() - started, failure=failure)
    facts["connect_seconds"] = round(time.perf_counter() - started, 6)
    rows: list[Any] = []
    with anyio.CancelScope(deadline=deadline) as scope:
        try:
            cursor = await conn.execute(_script(check))
            while True:
                if cursor.description is not None:
                    rows.append(await cursor.fetchone())
                if not cursor.nextset():
                    break
        except psycopg.Error as exc:
            return Observation(
                time.perf_counter() - started,
                failure=_failure(exc, f"{what} query", check),
                facts=facts,
            )
        finally:
            # Closing only sends a Terminate and drops the socket; it must happen even when
            # a deadline has cancelled us, or a frozen server would keep the connection.
            with anyio.CancelScope(shield=True):
                await conn.close()
    if scope.cancelled_caught:
        failure = Failure("timeout", f"{what} query: timed out{_limit(check)}")
        return Observation(time.perf_counter() - started, failure=failure, facts=facts)
    if len(rows) != 2:
        failure = Failure(
            "protocol_error", f"{what}: the query returned {len(rows)} results, not 2"
        )
        return Observation(time.perf_counter() - started, failure=failure, facts=facts)
    liveness, row = rows
    latency = time.perf_counter() - started
    if liveness != (1,) or row is None:
        # Something between us and PostgreSQL answers, but not as PostgreSQL would.
        failure = Failure("protocol_error", f"{what}: SELECT 1 returned {quote(repr(liveness))}")
        return Observation(latency, failure=failure, facts=facts)
    facts.update(state_facts(row))
    return Observation(latency, facts=facts)


def state_facts(row: tuple[Any, ...]) -> dict[str, Any]:
    """Name the columns of ``_STATE_QUERY`` and derive saturation."""
    in_recovery, version, database, max_connections, reserved, used, lag, oldest = row
    usable = max(int(max_connections) - int(reserved), 1)
    return {
        "server_version": str(version),
        "database": str(database),
        "in_recovery": bool(in_recovery),
        "role": "standby" if in_recovery else "primary",
        "max_connections": int(max_connections),
        "connections_used": int(used),
        "connections_usable": usable,
        "saturation": round(int(used) / usable, 4),
        "replay_lag_seconds": None if lag is None else round(max(float(lag), 0.0), 3),
        "longest_transaction_seconds": None if oldest is None else round(float(oldest), 3),
    }


def assess(check: PostgresCheck, observation: Observation) -> Finding:
    """Role first (a wrong role is unhealthy), then saturation, replay lag, long transactions."""
    if observation.failure is not None:
        return failed_unless_busy(observation)
    facts = observation.facts
    role = facts["role"]
    if check.expect_role != "any" and role != check.expect_role:
        return Finding(
            Status.UNHEALTHY,
            "wrong_role",
            f"server is a {role}, expected a {check.expect_role}",
        )
    used, usable = facts["connections_used"], facts["connections_usable"]
    connections = f"{used} of {usable} connections"
    findings = (
        above_limit(
            facts["saturation"],
            check.degraded_saturation,
            "saturated",
            "{connections} in use ({value}, limit {limit})",
            percent,
            facts={"connections": connections},
        ),
        above_limit(
            facts.get("replay_lag_seconds"),
            check.degraded_replay_lag,
            "replication_lag",
            "standby replay is {value} behind (limit {limit})",
        ),
        above_limit(
            facts.get("longest_transaction_seconds"),
            check.degraded_transaction_age,
            "long_transaction",
            "a transaction has been open for {value} (limit {limit})",
        ),
    )
    healthy = Finding(
        Status.HEALTHY,
        OK,
        f"SELECT 1 ok on PostgreSQL {facts['server_version']} {role}, {connections}",
    )
    return worst(findings, healthy)
