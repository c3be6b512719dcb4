"""The ``api`` preset against a local server speaking the platform API's documented contract."""

from __future__ import annotations

import functools

import pytest

from healthd.model import Status
from tests.http_target import HttpTarget, Reply
from tests.probing import check_once, component, make_check, shown_runs
from tests.services import serve_api

_check = functools.partial(make_check, "api", timeout=2)


@pytest.mark.asyncio
async def test_healthy_report_is_healthy_with_version_and_both_requests_in_details(
    http_target: HttpTarget,
) -> None:
    serve_api(http_target)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.HEALTHY, "ok")
    assert state.details["version"] == "3.0.0"
    assert state.details["database"] == "connected"
    assert state.details["agents_available"] == 11
    requests = state.details["requests"]
    assert list(requests) == ["liveness", "health"]
    assert requests["liveness"]["http_status"] == 200
    assert requests["health"]["http_status"] == 200
    assert {r.path for r in http_target.requests} == {"/health", "/api/v1/health"}


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.asyncio
async def test_report_compressed_by_a_server_that_ignores_accept_encoding_is_read(
    http_target: HttpTarget, coding: str
) -> None:
    serve_api(http_target, content_encoding=coding)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.HEALTHY, "ok")
    assert state.details["version"] == "3.0.0"
    assert state.details["agents_available"] == 11
    assert {r.headers["accept-encoding"] for r in http_target.requests} == {"identity"}


@pytest.mark.asyncio
async def test_report_in_a_coding_healthd_cannot_decode_is_protocol_error(
    http_target: HttpTarget,
) -> None:
    serve_api(http_target)
    http_target.route("/api/v1/health", Reply(body=b"\x1b\x0f", headers={"Content-Encoding": "br"}))
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.UNHEALTHY, "protocol_error")
    assert "'br'" in state.reason


@pytest.mark.asyncio
async def test_disconnected_database_is_degraded_then_recovers(http_target: HttpTarget) -> None:
    serve_api(http_target, status="degraded", database="disconnected")
    async with component(_check(url=http_target.url())) as api:
        state = await api.check_once()
        assert (state.status, state.reason_code) == (Status.DEGRADED, "database_disconnected")
        assert "database 'disconnected'" in state.reason
        assert "reports degraded" in state.reason
        assert state.details["database"] == "disconnected"

        serve_api(http_target)
        state = await api.check_once()
    assert state.status is Status.HEALTHY
    assert state.details["database"] == "connected"


@pytest.mark.asyncio
async def test_fewer_agents_than_expected_is_degraded(http_target: HttpTarget) -> None:
    serve_api(http_target, agents=9)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.DEGRADED, "agents_missing")
    assert "9 of 11 agents" in state.reason


@pytest.mark.asyncio
async def test_expected_agent_count_is_configurable(http_target: HttpTarget) -> None:
    serve_api(http_target, agents=4)
    state = await check_once(_check(url=http_target.url(), expected_agents=4))
    assert state.status is Status.HEALTHY


@pytest.mark.asyncio
async def test_reported_unhealthy_is_unhealthy(http_target: HttpTarget) -> None:
    serve_api(http_target, status="unhealthy", database="disconnected", agents=0)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.UNHEALTHY, "reported_unhealthy")


@pytest.mark.asyncio
async def test_report_that_is_not_json_is_unhealthy(http_target: HttpTarget) -> None:
    serve_api(http_target)
    http_target.route("/api/v1/health", Reply(body=b"<html>maintenance</html>"))
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.UNHEALTHY, "not_json")


@pytest.mark.asyncio
async def test_report_error_status_is_unhealthy_even_with_a_json_body(
    http_target: HttpTarget,
) -> None:
    serve_api(http_target, status="unhealthy", http_status=503)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.UNHEALTHY, "http_status")
    assert state.reason == "GET /api/v1/health returned 503"
    assert state.details["requests"]["health"]["http_status"] == 503


@pytest.mark.asyncio
async def test_liveness_failing_is_unhealthy_and_named(http_target: HttpTarget) -> None:
    serve_api(http_target)
    http_target.route("/health", Reply(action="reset"))
    state = await check_once(_check(url=http_target.url()))
    assert state.status is Status.UNHEALTHY
    assert state.reason_code in {"connection_reset", "connection_closed"}
    assert state.reason.startswith("GET /health:")
    assert "error" in state.details["requests"]["liveness"]
    assert state.details["requests"]["health"]["http_status"] == 200


@pytest.mark.asyncio
async def test_paths_can_be_overridden(http_target: HttpTarget) -> None:
    http_target.route("/livez", Reply.json('{"status": "ok"}'))
    http_target.route(
        "/v2/health",
        Reply.json(
            '{"status": "healthy", "version": "4.0.0", "database": "connected", '
            '"agents_available": 11}'
        ),
    )
    check = _check(url=http_target.url(), liveness_path="/livez", health_path="/v2/health")
    state = await check_once(check)
    assert state.status is Status.HEALTHY
    assert state.details["version"] == "4.0.0"


@pytest.mark.asyncio
async def test_one_kept_alive_client_serves_every_check(http_target: HttpTarget) -> None:
    serve_api(http_target)
    async with component(_check(url=http_target.url())) as api:
        for _ in range(3):
            assert (await api.check_once()).status is Status.HEALTHY
    # Two requests in flight per check: two connections, reused by every later check.
    assert len(http_target.requests) == 6
    assert http_target.connections == 2


@pytest.mark.asyncio
async def test_report_echoing_a_secret_is_quoted_redacted_and_short(
    http_target: HttpTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = 'k3y\\with"quotes!'
    monkeypatch.setenv("HEALTHD_TEST_API_KEY", secret)
    serve_api(http_target, database=f"\x1b[31m{secret}\n" + "x" * 300, version=secret * 3)
    check = _check(url=http_target.url(), headers={"X-Api-Key": "${env:HEALTHD_TEST_API_KEY}"})
    state = await check_once(check)
    assert state.reason_code == "database_disconnected"
    shown = f"{state.reason} {state.details}"
    assert shown_runs(secret, shown) == [], shown
    assert "database '\\x1b[31m<redacted>\\nxxx" in state.reason
    assert state.reason.isprintable()
    assert state.details["version"] == "<redacted>" * 3
