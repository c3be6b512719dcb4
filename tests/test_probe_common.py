"""What every kind that has it does the same way: a refused connection, a name that does not
resolve, TLS that fails, a replica where a primary is expected, a server killed and started
again, a server frozen beside a healthy one, a setting the config rejects. One table per shape,
a row per kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from healthd.model import Status
from tests.datastores import FALKORDB_PASSWORD, PG_PROBE_USER, REDIS_PASSWORD
from tests.http_target import HttpTarget
from tests.probing import make_check, probe_concurrently, probe_once, states_after
from tests.services import serve_opik_ui


def _no_setup(ui_target: HttpTarget) -> dict[str, Any]:
    return {}


def _opik_ui_without_upstream(ui_target: HttpTarget) -> dict[str, Any]:
    # Its UI answers, but its proxy to the refused backend cannot: the backend is the verdict.
    serve_opik_ui(ui_target, proxy="no_upstream")
    return {"ui_url": ui_target.url()}


@dataclass(frozen=True)
class Unreachable:
    """A ``kind`` check of ``url`` (``{address}`` filled in), with the fields ``setup`` adds;
    its reason is ``reason`` exactly, or starts with it when ``exact`` is false, and its facts
    pass ``facts``."""

    kind: str
    fields: Mapping[str, Any]
    reason: str
    exact: bool = False
    setup: Callable[[HttpTarget], dict[str, Any]] = _no_setup
    facts: Callable[[Mapping[str, Any]], bool] = field(default=lambda facts: True)


_REFUSED = [
    Unreachable(
        "http", {"url": "http://{address}/ready"}, "GET /ready: connection refused", exact=True
    ),
    Unreachable(
        "tcp",
        {"address": "{address}"},
        "connect to {address}: connection refused",
        exact=True,
        facts=lambda facts: facts == {},
    ),
    Unreachable(
        "api",
        {"url": "http://{address}"},
        "",
        facts=lambda facts: facts["requests"]["health"]["error"] == "connection_refused",
    ),
    Unreachable("mlflow", {"url": "http://{address}"}, "GET /health"),
    Unreachable("bentoml", {"url": "http://{address}"}, "GET /livez"),
    Unreachable(
        "supabase", {"url": "http://{address}", "api_key": "k" * 10}, "gateway unreachable"
    ),
    Unreachable(
        "opik",
        {"url": "http://{address}"},
        "backend: GET /is-alive/ping",
        setup=_opik_ui_without_upstream,
    ),
]

_UNRESOLVABLE = [
    Unreachable(
        "http",
        {"url": "http://no-such-host.invalid/health"},
        "GET /health: name resolution failed",
    ),
    Unreachable(
        "tcp",
        {"address": "no-such-host.invalid:5432"},
        "connect to no-such-host.invalid:5432: name resolution failed",
    ),
]


async def _assert_unreachable(
    case: Unreachable, address: str, code: str, ui_target: HttpTarget
) -> None:
    fields = {
        key: value.format(address=address) if isinstance(value, str) else value
        for key, value in case.fields.items()
    }
    check = make_check(case.kind, timeout=2, **fields, **case.setup(ui_target))

    observation, finding = await probe_once(check)

    reason = case.reason.format(address=address)
    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, code)
    assert finding.reason == reason if case.exact else finding.reason.startswith(reason), finding
    assert case.facts(observation.facts), observation.facts


@pytest.mark.parametrize("case", _REFUSED, ids=lambda case: case.kind)
@pytest.mark.asyncio
async def test_closed_port_is_connection_refused(
    case: Unreachable, closed_port: int, ui_target: HttpTarget
) -> None:
    await _assert_unreachable(case, f"127.0.0.1:{closed_port}", "connection_refused", ui_target)


@pytest.mark.parametrize("case", _UNRESOLVABLE, ids=lambda case: case.kind)
@pytest.mark.asyncio
async def test_unresolvable_host_is_dns_error(case: Unreachable, ui_target: HttpTarget) -> None:
    await _assert_unreachable(case, "", "dns_error", ui_target)


@pytest.mark.parametrize(
    ("server", "case"),
    [
        pytest.param(
            "https_target",
            Unreachable(
                "http", {"url": "https://{address}/health"}, "GET /health: TLS certificate rejected"
            ),
            id="http-untrusted-certificate",
        ),
        pytest.param(
            "https_target",
            Unreachable(
                "tcp",
                {"address": "{address}", "tls": True},
                "connect to {address}: TLS certificate rejected",
            ),
            id="tcp-untrusted-certificate",
        ),
        pytest.param(
            "http_target",
            Unreachable(
                "http", {"url": "https://{address}/health", "tls_verify": False}, "GET /health: "
            ),
            id="http-https-on-a-plain-http-port",
        ),
        pytest.param(
            # The listener closes every connection at once, in the middle of the TLS hello.
            "tcp_listener",
            Unreachable(
                "tcp",
                {"address": "{address}", "tls": True, "tls_verify": False},
                "connect to {address}: TLS error",
            ),
            id="tcp-server-hangs-up-in-the-hello",
        ),
    ],
)
@pytest.mark.asyncio
async def test_failed_tls_is_tls_error(
    server: str, case: Unreachable, request: pytest.FixtureRequest, ui_target: HttpTarget
) -> None:
    target = request.getfixturevalue(server)
    await _assert_unreachable(case, f"127.0.0.1:{target.port}", "tls_error", ui_target)
    # Nothing reached an HTTP server as a request.
    assert getattr(target, "requests", []) == []


@pytest.mark.parametrize(
    ("kind", "fields", "problem"),
    [
        (
            "api",
            {"url": "http://127.0.0.1:8000", "health_path": "api/v1/health"},
            "must start with '/'",
        ),
        (
            "mlflow",
            {"url": "http://127.0.0.1:5000", "username": "healthd"},
            "both 'username' and 'password'",
        ),
        (
            "opik",
            {"url": "http://127.0.0.1:8080", "ui_url": "127.0.0.1:5173"},
            "must start with http",
        ),
        ("postgres", {"dsn": "mysql://u:p@h/db"}, "postgresql://"),
        ("postgres", {"dsn": "just-a-host"}, "key=value"),
        (
            "supabase",
            {"url": "http://127.0.0.1:54321", "api_key": "k" * 10, "table": "todos?select=*"},
            "table",
        ),
    ],
)
def test_a_setting_the_kind_cannot_use_is_rejected_naming_it(
    kind: str, fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        make_check(kind, **fields)


@pytest.mark.parametrize(
    ("kind", "replica", "target", "facts", "accepted_as"),
    [
        pytest.param(
            "postgres",
            "pg_standby",
            lambda standby: {"dsn": standby.dsn(), "expect_role": "primary"},
            {"in_recovery": True, "role": "standby"},
            ("standby", "any"),
            id="postgres-standby",
        ),
        pytest.param(
            "redis",
            "redis_replication",
            lambda pair: {"url": pair[1].url(), "password": "${env:HEALTHD_TEST_REDIS_PASSWORD}"},
            {"role": "replica"},
            ("replica", "any"),
            id="redis-replica",
        ),
        pytest.param(
            "falkordb",
            "falkordb_replica",
            lambda replica: {
                "url": replica.url(),
                "password": "${env:HEALTHD_TEST_FALKORDB_PASSWORD}",
            },
            {"role": "replica"},
            (),
            id="falkordb-replica",
        ),
    ],
)
@pytest.mark.asyncio
async def test_replica_where_a_primary_is_expected_is_wrong_role(
    kind: str,
    replica: str,
    target: Callable[[Any], dict[str, Any]],
    facts: dict[str, Any],
    accepted_as: tuple[str, ...],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_REDIS_PASSWORD", REDIS_PASSWORD)
    monkeypatch.setenv("HEALTHD_TEST_FALKORDB_PASSWORD", FALKORDB_PASSWORD)
    fields = target(request.getfixturevalue(replica))

    observation, finding = await probe_once(make_check(kind, timeout=2, **fields))

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "wrong_role")
    assert {key: observation.facts[key] for key in facts} == facts
    for role in accepted_as:
        _, as_role = await probe_once(
            make_check(kind, timeout=2, **{**fields, "expect_role": role})
        )
        assert as_role.status is Status.HEALTHY, (role, as_role)


@pytest.mark.parametrize(
    ("kind", "victim", "target"),
    [
        ("postgres", "pg_victim", lambda server: {"dsn": server.dsn()}),
        ("redis", "redis_victim", lambda server: {"url": server.url()}),
    ],
)
@pytest.mark.asyncio
async def test_killed_server_is_refused_then_recovers_through_hysteresis(
    kind: str,
    victim: str,
    target: Callable[[Any], dict[str, Any]],
    request: pytest.FixtureRequest,
) -> None:
    server = request.getfixturevalue(victim)
    check = make_check(kind, timeout=2, failure_threshold=3, recovery_threshold=2, **target(server))
    findings = [(await probe_once(check))[1]]
    server.kill()
    for _ in range(3):
        findings.append((await probe_once(check))[1])
    server.start()
    for _ in range(2):
        findings.append((await probe_once(check))[1])

    assert [f.reason_code for f in findings[1:4]] == ["connection_refused"] * 3
    states = states_after(check, findings, name=kind)
    assert [s.status for s in states] == [
        Status.HEALTHY,
        Status.DEGRADED,  # 1 of 3 failures
        Status.DEGRADED,  # 2 of 3
        Status.UNHEALTHY,
        Status.DEGRADED,  # recovering 1 of 2
        Status.HEALTHY,
    ]
    assert states[3].reason_code == "connection_refused"
    assert states[4].reason_code == "recovering"


@dataclass(frozen=True)
class Frozen:
    """A ``kind`` check of the frozen ``victim`` fixture's server under a 0.5 s timeout, probed
    beside one of the ``healthy`` fixture's: the frozen one says ``reason`` within
    ``frozen_seconds`` (low, high), the healthy one answers within ``healthy_seconds``."""

    kind: str
    victim: str
    healthy: str
    target: Callable[[Any], dict[str, Any]]
    healthy_target: Callable[[Any], dict[str, Any]]
    reason: str
    frozen_seconds: tuple[float, float]
    healthy_seconds: float
    thawed: Callable[[Any], None] = field(default=lambda server: None)


_FROZEN = [
    Frozen(
        "postgres",
        "pg_victim",
        "pg_primary",
        lambda server: {"dsn": server.dsn()},
        lambda server: {"dsn": server.dsn(user=PG_PROBE_USER)},
        # The configured timeout, where psycopg's own would say 2 s.
        "postgres connect: timed out (timeout 500 ms)",
        # psycopg would wait at least 2 s (its connect_timeout floor); the deadline holds.
        (0.4, 0.9),
        0.5,
        thawed=lambda server: server.wait_ready(),
    ),
    Frozen(
        "redis",
        "redis_victim",
        "redis_main",
        lambda server: {"url": server.url()},
        lambda server: {"url": server.url(), "password": "${env:HEALTHD_TEST_REDIS_PASSWORD}"},
        # The configured timeout, not redis-py's socket timeout (a share of it).
        "redis: timed out waiting for a reply (timeout 500 ms)",
        (0.0, 0.5 + 0.3),
        0.3,
    ),
]


@pytest.mark.parametrize("case", _FROZEN, ids=lambda case: case.kind)
@pytest.mark.asyncio
async def test_frozen_server_times_out_within_deadline_without_delaying_others(
    case: Frozen, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_REDIS_PASSWORD", REDIS_PASSWORD)
    victim = request.getfixturevalue(case.victim)
    healthy_server = request.getfixturevalue(case.healthy)
    frozen_check = make_check(case.kind, timeout=0.5, **case.target(victim))
    healthy_check = make_check(case.kind, timeout=2.0, **case.healthy_target(healthy_server))
    victim.freeze()
    try:
        (_, frozen, frozen_seconds), (_, healthy, healthy_seconds) = await probe_concurrently(
            frozen_check, healthy_check
        )
    finally:
        victim.thaw()

    assert (frozen.status, frozen.reason_code) == (Status.UNHEALTHY, "timeout")
    assert frozen.reason == case.reason
    low, high = case.frozen_seconds
    assert low <= frozen_seconds < high
    assert healthy.status is Status.HEALTHY
    assert healthy_seconds < case.healthy_seconds

    case.thawed(victim)
    _, finding = await probe_once(frozen_check)
    assert finding.status is Status.HEALTHY
