"""The ``bentoml`` preset against a real BentoML server serving ``tests/bento_service``."""

from __future__ import annotations

import functools

import pytest

from healthd.model import Status
from healthd.probes.bentoml import _request_counts
from tests.probing import check_once, component, make_check
from tests.services import BentoServer

_check = functools.partial(make_check, "bentoml", timeout=3)


@pytest.mark.asyncio
@pytest.mark.slow
async def test_live_and_ready_service_is_healthy(bentoml_service: BentoServer) -> None:
    state = await check_once(_check(url=bentoml_service.url))
    assert (state.status, state.reason_code) == (Status.HEALTHY, "ok")
    assert state.details["requests"]["livez"]["http_status"] == 200
    assert state.details["requests"]["readyz"]["http_status"] == 200
    assert "metrics" not in state.details["requests"]


@pytest.mark.asyncio
@pytest.mark.slow
async def test_not_ready_while_live_is_degraded_not_ready_then_recovers(
    bentoml_service: BentoServer,
) -> None:
    async with component(_check(url=bentoml_service.url)) as bento:
        bentoml_service.set_ready(False)
        state = await bento.check_once()
        assert (state.status, state.reason_code) == (Status.DEGRADED, "not_ready")
        assert "GET /readyz returned 503" in state.reason
        assert state.details["requests"]["readyz"]["http_status"] == 503
        assert state.details["requests"]["livez"]["http_status"] == 200

        bentoml_service.set_ready(True)
        state = await bento.check_once()
    assert state.status is Status.HEALTHY


@pytest.mark.asyncio
@pytest.mark.slow
async def test_hung_server_is_unhealthy_timeout_and_recovers_after_two_successes(
    bentoml_service: BentoServer,
) -> None:
    check = _check(url=bentoml_service.url, timeout="1s", failure_threshold=2)
    async with component(check) as bento:
        assert (await bento.check_once()).status is Status.HEALTHY
        bentoml_service.pause()
        try:
            states = [await bento.check_once() for _ in range(2)]
        finally:
            bentoml_service.resume()
        # Hysteresis from classify: the first failure is degraded, the second unhealthy.
        assert [s.status for s in states] == [Status.DEGRADED, Status.UNHEALTHY]
        assert states[-1].reason_code == "timeout"
        assert states[-1].details["requests"]["livez"]["error"] == "timeout"

        recovering = await bento.check_once()
        healthy = await bento.check_once()
    assert (recovering.status, recovering.reason_code) == (Status.DEGRADED, "recovering")
    assert healthy.status is Status.HEALTHY


@pytest.mark.asyncio
@pytest.mark.slow
async def test_error_rate_between_checks_is_read_from_metrics(
    bentoml_service: BentoServer,
) -> None:
    check = _check(url=bentoml_service.url, metrics=True, min_requests=4, degraded_error_rate=0.25)
    async with component(check) as bento:
        first = await bento.check_once()
        assert first.status is Status.HEALTHY
        assert first.details["requests"]["metrics"]["http_status"] == 200

        statuses = [bentoml_service.echo(text) for text in ("a", "fail", "b", "fail", "fail")]
        assert statuses.count(500) == 3
        failing = await bento.check_once()
        assert (failing.status, failing.reason_code) == (Status.DEGRADED, "error_rate")
        # Only the API's requests count: healthd's own /livez and /readyz are left out.
        assert failing.details["window_requests"] == 5
        assert failing.details["window_errors"] == 3
        assert failing.details["error_rate"] == 0.6

        for text in ("c", "d", "e", "f"):
            assert bentoml_service.echo(text) == 200
        recovered = await bento.check_once()
    assert recovered.status is Status.HEALTHY
    assert recovered.details["window_requests"] == 4
    assert recovered.details["error_rate"] == 0.0


@pytest.mark.asyncio
@pytest.mark.slow
async def test_not_ready_service_does_not_count_its_own_readyz_503_as_errors(
    bentoml_service: BentoServer,
) -> None:
    check = _check(url=bentoml_service.url, metrics=True, min_requests=1)
    async with component(check) as bento:
        await bento.check_once()
        bentoml_service.set_ready(False)
        await bento.check_once()
        bentoml_service.set_ready(True)
        state = await bento.check_once()
    assert state.status is Status.HEALTHY
    assert state.details["window_errors"] == 0


def test_counts_ignore_runner_families_and_probe_endpoints() -> None:
    text = b"""\
# TYPE bentoml_service_request_total counter
bentoml_service_request_total{endpoint="/predict",http_response_code="200"} 8.0
bentoml_service_request_total{endpoint="/predict",http_response_code="503"} 2.0
bentoml_service_request_total{endpoint="/readyz",http_response_code="503"} 7.0
# TYPE bentoml_runner_request_total counter
bentoml_runner_request_total{endpoint="/",http_response_code="500"} 5.0
"""
    assert _request_counts(text, {"/readyz", "/livez"}) == (10.0, 2.0)
    assert _request_counts(b"not { the exposition format", set()) is None
