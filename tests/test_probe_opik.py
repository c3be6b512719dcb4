"""The ``opik`` preset against local servers answering as Opik's backend and UI document.

Opik needs MySQL, ClickHouse and Redis and cannot run here; ``serve_opik_backend`` and
``serve_opik_ui`` reproduce its ``IsAliveResource``, Dropwizard ``/health-check`` and nginx
answers, failure shapes included.
"""

from __future__ import annotations

import functools

import pytest

from healthd.model import Status
from tests.http_target import HttpTarget, Reply
from tests.probing import check_once, component, make_check
from tests.services import serve_opik_backend, serve_opik_ui

_check = functools.partial(make_check, "opik", timeout=2)


@pytest.mark.asyncio
async def test_healthy_backend_and_ui_are_healthy_with_version(
    http_target: HttpTarget, ui_target: HttpTarget
) -> None:
    serve_opik_backend(http_target)
    serve_opik_ui(ui_target)
    state = await check_once(_check(url=http_target.url(), ui_url=ui_target.url()))
    assert (state.status, state.reason_code) == (Status.HEALTHY, "ok")
    assert state.reason == "Opik 1.9.5 backend and UI healthy"
    assert state.details["version"] == "1.9.5"
    assert state.details["failing_checks"] == []
    assert list(state.details["requests"]) == ["ping", "version", "health_check", "ui", "ui_ping"]
    assert {r.path for r in ui_target.requests} == {"/", "/api/is-alive/ping"}
    assert "/health-check?name=all" in {r.path for r in http_target.requests}


@pytest.mark.asyncio
async def test_backend_500_is_unhealthy_naming_the_failing_checks_then_recovers(
    http_target: HttpTarget, ui_target: HttpTarget
) -> None:
    serve_opik_backend(http_target, failing=("clickhouse", "redis"))
    serve_opik_ui(ui_target, proxy="unhealthy")
    async with component(
        _check(url=http_target.url(), ui_url=ui_target.url(), recovery_threshold=1)
    ) as opik:
        state = await opik.check_once()
        assert (state.status, state.reason_code) == (Status.UNHEALTHY, "backend_unhealthy")
        assert "failing: clickhouse, redis" in state.reason
        assert state.details["failing_checks"] == ["clickhouse", "redis"]
        assert state.details["requests"]["ping"]["http_status"] == 500

        serve_opik_backend(http_target)
        serve_opik_ui(ui_target)
        state = await opik.check_once()
    assert state.status is Status.HEALTHY
    assert state.details["failing_checks"] == []


@pytest.mark.asyncio
async def test_failing_non_critical_check_is_degraded_and_named(http_target: HttpTarget) -> None:
    serve_opik_backend(http_target, failing=("clickhouse-readonly-freeform-sql",), critical=False)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.DEGRADED, "subcheck_failed")
    assert "clickhouse-readonly-freeform-sql" in state.reason


@pytest.mark.asyncio
async def test_ui_proxy_failing_while_backend_is_fine_is_degraded(
    http_target: HttpTarget, ui_target: HttpTarget
) -> None:
    serve_opik_backend(http_target)
    serve_opik_ui(ui_target, proxy="no_upstream")
    state = await check_once(_check(url=http_target.url(), ui_url=ui_target.url()))
    assert (state.status, state.reason_code) == (Status.DEGRADED, "ui_proxy_failed")
    assert "GET /api/is-alive/ping returned 502" in state.reason
    assert state.details["requests"]["ui_ping"]["http_status"] == 502
    assert state.details["requests"]["ping"]["http_status"] == 200


@pytest.mark.asyncio
async def test_ui_down_while_backend_is_fine_is_degraded(
    http_target: HttpTarget, closed_port: int
) -> None:
    serve_opik_backend(http_target)
    check = _check(url=http_target.url(), ui_url=f"http://127.0.0.1:{closed_port}")
    state = await check_once(check)
    assert (state.status, state.reason_code) == (Status.DEGRADED, "ui_down")
    assert state.details["requests"]["ui"]["error"] == "connection_refused"


@pytest.mark.asyncio
async def test_backend_that_hangs_is_unhealthy_timeout(http_target: HttpTarget) -> None:
    serve_opik_backend(http_target)
    http_target.route("/is-alive/ping", Reply(action="hang"))
    state = await check_once(_check(url=http_target.url(), timeout="300ms"))
    assert (state.status, state.reason_code) == (Status.UNHEALTHY, "timeout")
