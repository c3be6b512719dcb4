"""What every kind that has it does the same way: a refused connection, a name that does not
resolve, a setting the config rejects. One table per shape, a row per kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from healthd.model import Status
from tests.http_target import HttpTarget
from tests.probing import make_check, probe_once
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
    fields = {key: value.format(address=address) for key, value in case.fields.items()}
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
