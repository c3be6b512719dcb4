"""The ``redis`` probe: a fresh connection, ``PING``, then ``INFO`` on the same connection.

``PING`` answers while writes fail, so the verdict also reads ``INFO``: the role, the last
background save and AOF write, memory against ``maxmemory``, clients against ``maxclients``
and, on a replica, the link to its master.

Each check keeps one ``redis.asyncio.Connection`` object and opens a new socket with it per
probe: a fresh socket is the honest liveness check, and reusing the object skips the
constructor's cost (docs/performance.md, "Client library costs"). redis-py sets no socket
timeout and retries by default, so both are explicit here. The ``falkordb`` kind builds on
``measure_server`` and ``assess_server``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import redis
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio.connection import AbstractConnection, SSLConnection, parse_url
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    InvalidResponse,
    MasterDownError,
    NoPermissionError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError,
)
from redis.retry import Retry

from healthd.config import RedisCheck, RedisCheckBase
from healthd.findings import OK, above_limit, failed_unless_busy, format_seconds, percent, worst
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes._errors import CLIENT_TIMEOUT_SHARE, network_failure
from healthd.quoting import QUOTE_LIMIT, quote
from healthd.secrets import Redactor

#: Error replies with a meaning of their own, by their first word; the rest are ``error_reply``.
_REPLY_CODES: tuple[tuple[str, str], ...] = (
    ("BUSY", "busy"),
    ("MISCONF", "persistence_failing"),
    ("MASTERDOWN", "master_down"),
    ("READONLY", "wrong_role"),
    ("LOADING", "loading"),
    ("NOAUTH", "auth_failed"),
    ("WRONGPASS", "auth_failed"),
)

#: What ``then`` gets after ``INFO``: the open connection, the parsed ``INFO`` and the facts
#: to add to. It may raise ``RedisError``; that becomes the observation's failure.
Then = Callable[[AbstractConnection, Mapping[str, Any], dict[str, Any]], Awaitable[None]]


#: The first byte of every RESP2 reply line: simple string, error, integer, bulk, array.
_RESP2_TYPES = frozenset(b"+-:$*")
_SERVER_CLOSED = "Connection closed by server."


class NotResp(InvalidResponse):
    """The target answered with bytes that are not RESP, or RESP that no Redis would send;
    ``received`` is what came first, ``what`` says what is wrong with it."""

    def __init__(self, received: bytes, what: str = "the reply is not RESP") -> None:
        super().__init__(what)
        self.received = received
        self.what = what


def _shown_reply(reply: Any) -> bytes:
    """A parsed reply as bytes a reason can quote."""
    return reply if isinstance(reply, bytes) else repr(reply).encode()


class StrictParser(_AsyncRESP2Parser):
    """redis-py's RESP2 parser, made to say "not RESP" at the first byte that is not.

    redis-py reads a whole line before it looks at a reply, so garbage without a line end
    waits for the timeout, and garbage with one can raise ``ValueError`` from ``int()``, which
    would escape as a bug in healthd. Here the type byte of every reply line is checked as it
    arrives, and whatever the parser cannot make sense of is ``NotResp``: ``protocol_error``.
    """

    async def read_response(self, disable_decoding: bool = False) -> Any:
        try:
            return await super().read_response(disable_decoding=disable_decoding)
        except ValueError as exc:
            # int() of a length that is no number, or a line longer than the reader's limit.
            raise NotResp(b"".join(self._chunks) or self._buffer) from exc

    async def _readline(self) -> bytes:
        if self._pos < len(self._buffer):
            return await super()._readline()  # the line is (partly) buffered already
        stream = self._stream
        if stream is None:
            raise ConnectionError(_SERVER_CLOSED)
        first = await stream.read(1)
        if not first:
            raise ConnectionError(_SERVER_CLOSED)
        if first[0] not in _RESP2_TYPES:
            # What else already arrived, without waiting for more (redis-py reads this
            # buffer too, in ``can_read``).
            pending = bytes(getattr(stream, "_buffer", b"")[:QUOTE_LIMIT])
            raise NotResp(first + pending)
        data = first + await stream.readline()
        if not data.endswith(b"\r\n"):
            raise ConnectionError(_SERVER_CLOSED)
        self._chunks.append(data)
        self._pos += len(data)
        return data[:-2]


def build_connection(check: RedisCheckBase) -> AbstractConnection:
    """A connection object for ``check``: explicit timeouts, no retries, RESP2, no HELLO."""
    kwargs: dict[str, Any] = dict(parse_url(check.url.reveal()))
    connection_class = kwargs.pop("connection_class", redis.asyncio.Connection)
    if check.password is not None:
        kwargs["password"] = check.password.reveal()
    if check.username is not None:
        kwargs["username"] = check.username
    if connection_class is SSLConnection:
        kwargs["ssl_cert_reqs"] = "required" if check.tls_verify else "none"
        kwargs["ssl_check_hostname"] = check.tls_verify
        if check.ca_file is not None:
            kwargs["ssl_ca_certs"] = str(check.ca_file)
    client_timeout = check.timeout_seconds * CLIENT_TIMEOUT_SHARE
    kwargs.update(
        socket_timeout=client_timeout,
        socket_connect_timeout=client_timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        # RESP2 authenticates with AUTH alone; RESP3 would add a HELLO round trip.
        protocol=2,
        # No CLIENT SETINFO: redis-py pipelines it before reading anything, and a server at
        # maxclients answers those writes with a reset that hides its own "max number of
        # clients reached". Passing None also skips the per-connection metadata lookup.
        driver_info=None,
        health_check_interval=0,
        parser_class=StrictParser,
    )
    connection: AbstractConnection = connection_class(**kwargs)
    return connection


async def _disconnect(connection: AbstractConnection) -> None:
    await connection.disconnect(nowait=True)


def secrets_of(check: RedisCheckBase) -> tuple[str, ...]:
    """The check's secrets: the URL's password and ``password``."""
    return check.url.secrets + (check.password.secrets if check.password else ())


#: redis-py exceptions with a reason code of their own, in the order they are matched, and
#: what the reason says (``{message}``: the server's words, quoted).
_EXCEPTION_CODES: tuple[tuple[type[RedisError], str, str], ...] = (
    (InvalidResponse, "protocol_error", "the reply is not RESP: {message}"),
    (AuthenticationError, "auth_failed", "authentication failed: {message}"),
    (BusyLoadingError, "loading", "server is loading its dataset into memory"),
    (MasterDownError, "master_down", "replica lost its master and serves no data"),
    (ReadOnlyError, "wrong_role", "server is read-only (a replica): {message}"),
    (NoPermissionError, "permission_denied", "the user may not run this: {message}"),
)


def failure_for(
    exc: RedisError, what: str, redactor: Redactor, timeout_seconds: float | None = None
) -> Failure:
    """Map a redis-py exception to a reason code.

    ``AuthenticationError`` and ``BusyLoadingError`` subclass ``ConnectionError``, so they are
    matched before it; error replies are matched by their prefix. What the server said is
    quoted (redacted, escaped, cut short); timeouts name ``timeout_seconds``, the configured
    timeout.
    """
    message = quote(str(exc), redactor)
    if isinstance(exc, NotResp):
        received = quote(exc.received, redactor)
        return Failure("protocol_error", f"{what}: {exc.what}: '{received}'")
    for exc_type, code, text in _EXCEPTION_CODES:
        if isinstance(exc, exc_type):
            return Failure(code, f"{what}: " + text.format(message=message))
    if isinstance(exc, TimeoutError):
        phase = "connecting" if "connect" in str(exc).lower() else "waiting for a reply"
        limit = "" if timeout_seconds is None else f" (timeout {format_seconds(timeout_seconds)})"
        return Failure("timeout", f"{what}: timed out {phase}{limit}")
    if isinstance(exc, ConnectionError):
        if "max number of clients reached" in message:
            return Failure("saturated", f"{what}: max number of clients reached")
        if str(exc) == _SERVER_CLOSED:
            return Failure("connection_closed", f"{what}: server closed the connection")
        return network_failure(exc, what, timeout_seconds=timeout_seconds)
    if isinstance(exc, ResponseError):
        reply = str(exc)
        status = getattr(exc, "status_code", None) or reply.split(" ", 1)[0]
        for prefix, code in _REPLY_CODES:
            if status == prefix or reply.startswith(prefix):
                return Failure(code, f"{what}: {message}")
        return Failure("error_reply", f"{what}: error reply: {message}")
    return Failure("protocol_error", f"{what}: {type(exc).__name__}: {message}")


def parse_info(raw: bytes | str) -> dict[str, Any]:
    """``INFO`` text as a dict of strings; ``module`` lines become ``modules``, a name->version
    dict, because there is one such line per loaded module."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    info: dict[str, Any] = {}
    modules: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        if key == "module":
            fields = dict(part.partition("=")[::2] for part in value.split(","))
            if "name" in fields:
                modules[fields["name"]] = fields.get("ver", "")
        else:
            info[key] = value
    info["modules"] = modules
    return info


def _int(info: Mapping[str, Any], key: str) -> int | None:
    try:
        return int(info[key])
    except (KeyError, ValueError):
        return None


def _ratio(used: int | None, limit: int | None) -> float | None:
    if used is None or not limit:
        return None
    return round(used / limit, 4)


def server_facts(info: Mapping[str, Any]) -> dict[str, Any]:
    """The facts a verdict needs from ``INFO``; a limit of 0 means none, so no ratio."""
    role = "replica" if info.get("role") == "slave" else info.get("role")
    used_memory, maxmemory = _int(info, "used_memory"), _int(info, "maxmemory")
    clients, maxclients = _int(info, "connected_clients"), _int(info, "maxclients")
    facts: dict[str, Any] = {
        "redis_version": info.get("redis_version"),
        "uptime_seconds": _int(info, "uptime_in_seconds"),
        "role": role,
        "used_memory": used_memory,
        "maxmemory": maxmemory,
        "memory_ratio": _ratio(used_memory, maxmemory),
        "maxmemory_policy": info.get("maxmemory_policy"),
        "connected_clients": clients,
        "maxclients": maxclients,
        "clients_ratio": _ratio(clients, maxclients),
        "blocked_clients": _int(info, "blocked_clients"),
        "rdb_last_bgsave_status": info.get("rdb_last_bgsave_status"),
        "aof_enabled": info.get("aof_enabled") == "1",
        "aof_last_write_status": info.get("aof_last_write_status"),
        "loading": info.get("loading") == "1",
        "modules": sorted(info.get("modules", {})),
    }
    if role == "replica":
        facts["master_link_status"] = info.get("master_link_status")
        facts["master_link_down_since_seconds"] = _int(info, "master_link_down_since_seconds")
        facts["master_sync_in_progress"] = info.get("master_sync_in_progress") == "1"
    else:
        facts["connected_replicas"] = _int(info, "connected_slaves")
    return facts


async def command(connection: AbstractConnection, *args: Any) -> Any:
    """Send one command on ``connection`` and read its reply."""
    await connection.send_command(*args)
    return await connection.read_response()


async def measure_server(
    check: RedisCheckBase, ctx: ProbeContext, *, what: str = "redis", then: Then | None = None
) -> Observation:
    """Connect fresh, ``PING``, ``INFO``, then ``then`` on the same connection; disconnect.

    Failures keep whatever facts were gathered before them.
    """
    connection = ctx.get("connection", lambda: build_connection(check), _disconnect)
    facts: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            facts["connect_seconds"] = round(time.perf_counter() - started, 6)
            if (pong := await command(connection, "PING")) != b"PONG":
                raise NotResp(_shown_reply(pong), "PING was not answered with PONG")
            if not isinstance(raw_info := await command(connection, "INFO"), bytes):
                raise NotResp(_shown_reply(raw_info), "INFO was not answered with text")
            info = parse_info(raw_info)
            if "role" not in info:
                # Every Redis (and Valkey, KeyDB, Dragonfly) names its role in INFO.
                raise NotResp(raw_info[:200], "INFO was answered with text that is no INFO")
            facts.update(server_facts(info))
            if then is not None:
                await then(connection, info, facts)
        finally:
            # Dropping the socket never waits on the server; shielded so that a deadline
            # cannot leave it open to a frozen server.
            with anyio.CancelScope(shield=True):
                await connection.disconnect(nowait=True)
                # asyncio closes the socket on the loop's next turn: let that happen before
                # returning, so a probe that has returned holds no connection.
                await anyio.lowlevel.checkpoint()
    except RedisError as exc:
        failure = failure_for(exc, what, Redactor(secrets_of(check)), check.timeout_seconds)
        return Observation(time.perf_counter() - started, failure=failure, facts=facts)
    return Observation(time.perf_counter() - started, facts=facts)


async def probe(check: RedisCheck, ctx: ProbeContext) -> Observation:
    """``PING`` and ``INFO`` on a fresh connection."""
    return await measure_server(check, ctx)


def assess_server(check: RedisCheckBase, observation: Observation) -> list[Finding]:
    """Findings about the server itself, most important first; empty when all is well.

    A failure of the probe is the only finding when there is one.
    """
    if observation.failure is not None:
        return [failed_unless_busy(observation)]
    facts = observation.facts
    role = facts.get("role")
    if check.expect_role != "any" and role != check.expect_role:
        return [
            Finding(
                Status.UNHEALTHY,
                "wrong_role",
                f"server is a {role}, expected a {check.expect_role}",
            )
        ]
    findings: list[Finding] = []
    if role == "replica" and facts.get("master_link_status") != "up":
        findings.append(_master_link_finding(check, facts))
    failing = [
        name
        for name in ("rdb_last_bgsave_status", "aof_last_write_status")
        if facts.get(name) == "err"
    ]
    if failing:
        what = " and ".join(
            "the last background save" if n.startswith("rdb") else "the last AOF write"
            for n in failing
        )
        findings.append(
            Finding(
                Status.DEGRADED,
                "persistence_failing",
                f"{what} failed: writes may be refused (MISCONF)",
            )
        )
    # Each ratio against its limit; the reason names the counts the ratio was made of.
    for ratio, limit, code, reason in (
        ("memory_ratio", check.degraded_memory, "memory_high",
         "memory at {value} of maxmemory ({used_memory} of {maxmemory} bytes, limit {limit})"),
        ("clients_ratio", check.degraded_clients, "clients_high",
         "{connected_clients} of {maxclients} clients connected ({value}, limit {limit})"),
    ):  # fmt: skip
        if found := above_limit(facts.get(ratio), limit, code, reason, percent, facts=facts):
            findings.append(found)
    return findings


def _master_link_finding(check: RedisCheckBase, facts: Mapping[str, Any]) -> Finding:
    """Degraded while the link is briefly down or syncing; unhealthy once down too long.

    A replica that never reached its master reports ``-1``; its link has then been down
    for as long as it has been up.
    """
    if facts.get("master_sync_in_progress"):
        return Finding(Status.DEGRADED, "replica_syncing", "replica is syncing from its master")
    down = facts.get("master_link_down_since_seconds")
    if down is None or down < 0:
        down = facts.get("uptime_seconds")
    limit = check.unhealthy_master_link_down
    if down is not None and down >= limit:
        return Finding(
            Status.UNHEALTHY,
            "master_link_down",
            f"link to master down for {format_seconds(down)} (limit {format_seconds(limit)})",
        )
    since = f" for {format_seconds(down)}" if down else ""
    return Finding(Status.DEGRADED, "master_link_down", f"link to master down{since}")


def healthy_reason(facts: Mapping[str, Any]) -> str:
    """``PONG from redis 8.2.3 master``."""
    return f"PONG from redis {facts.get('redis_version')} {facts.get('role')}"


def assess(check: RedisCheck, observation: Observation) -> Finding:
    """The worst server finding, or healthy."""
    healthy = Finding(Status.HEALTHY, OK, healthy_reason(observation.facts))
    return worst(assess_server(check, observation), healthy)
