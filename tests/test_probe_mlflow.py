"""The ``mlflow`` preset against a real MLflow server, and auth failures from a local target."""

from __future__ import annotations

import base64
import functools

import pytest

from healthd.model import Status
from tests.http_target import HttpTarget, Reply
from tests.probing import check_once, component, make_check, shown_runs
from tests.services import MlflowServer

#: Generous limits: these tests are about answers, not speed, and CI machines are busy.
_check = functools.partial(
    make_check, "mlflow", interval=30, timeout=20, degraded_search_latency=15
)


@pytest.mark.asyncio
@pytest.mark.slow
async def test_working_server_is_healthy_with_its_version(mlflow_service: MlflowServer) -> None:
    state = await check_once(_check(url=mlflow_service.url, host=MlflowServer.HOST))
    assert state.status is Status.HEALTHY, state.reason
    assert state.reason_code == "ok"
    assert state.details["version"].startswith("3.")
    requests = state.details["requests"]
    assert [requests[name]["http_status"] for name in ("health", "version", "search")] == [
        200,
        200,
        200,
    ]


@pytest.mark.asyncio
@pytest.mark.slow
async def test_broken_backend_store_degrades_while_health_stays_up_then_recovers(
    mlflow_service: MlflowServer,
) -> None:
    async with component(_check(url=mlflow_service.url, host=MlflowServer.HOST)) as mlflow:
        assert (await mlflow.check_once()).status is Status.HEALTHY
        mlflow_service.break_store()
        state = await mlflow.check_once()
        assert (state.status, state.reason_code) == (Status.DEGRADED, "search_failed")
        assert state.reason.startswith("backend store: POST /api/2.0/mlflow/experiments/search")
        assert state.details["requests"]["health"]["http_status"] == 200
        assert state.details["requests"]["search"]["http_status"] >= 400

        mlflow_service.repair_store()
        state = await mlflow.check_once()
    assert (state.status, state.reason_code) == (Status.HEALTHY, "ok")


@pytest.mark.asyncio
@pytest.mark.slow
async def test_unknown_host_header_is_degraded_host_rejected(mlflow_service: MlflowServer) -> None:
    # Without ``host``, the client sends 127.0.0.1:port, which the server does not allow.
    state = await check_once(_check(url=mlflow_service.url))
    assert (state.status, state.reason_code) == (Status.DEGRADED, "host_rejected")
    assert "--allowed-hosts" in state.reason
    assert state.details["requests"]["search"]["http_status"] == 403
    assert state.details["requests"]["health"]["http_status"] == 200


@pytest.mark.asyncio
@pytest.mark.slow
async def test_slow_search_is_degraded(mlflow_service: MlflowServer) -> None:
    check = _check(url=mlflow_service.url, host=MlflowServer.HOST, degraded_search_latency="1ms")
    state = await check_once(check)
    assert (state.status, state.reason_code) == (Status.DEGRADED, "slow")
    assert "limit 1 ms" in state.reason


@pytest.mark.asyncio
async def test_rejected_credentials_are_degraded_auth_failed_and_never_shown(
    http_target: HttpTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TEST_PASSWORD", "hunter2-secret-pw")
    http_target.route("/health", Reply(body=b"OK"))
    http_target.route("/version", Reply(body=b"3.17.2"))
    http_target.route(
        "/api/2.0/mlflow/experiments/search",
        Reply(
            status=401, body=b"You are not authenticated.", headers={"WWW-Authenticate": "Basic"}
        ),
    )
    check = _check(
        url=http_target.url(), username="healthd", password="${env:MLFLOW_TEST_PASSWORD}"
    )
    state = await check_once(check)
    assert (state.status, state.reason_code) == (Status.DEGRADED, "auth_failed")
    assert state.details["version"] == "3.17.2"
    search = next(r for r in http_target.requests if r.path.endswith("/search"))
    expected = base64.b64encode(b"healthd:hunter2-secret-pw").decode()
    assert search.headers["authorization"] == f"Basic {expected}"
    assert search.body == b'{"max_results":1}'
    shown = f"{state.reason} {state.details}"
    assert "hunter2" not in shown
    assert expected not in shown


@pytest.mark.asyncio
async def test_forbidden_search_is_degraded_auth_failed(http_target: HttpTarget) -> None:
    http_target.route("/health", Reply(body=b"OK"))
    http_target.route("/api/2.0/mlflow/experiments/search", Reply(status=403, body=b"denied"))
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.DEGRADED, "auth_failed")


@pytest.mark.asyncio
async def test_configured_host_header_is_sent(http_target: HttpTarget) -> None:
    http_target.default = Reply(body=b"OK")
    async with component(_check(url=http_target.url(), host="mlflow.internal:5000")) as mlflow:
        await mlflow.check_once()
    assert {r.headers["host"] for r in http_target.requests} == {"mlflow.internal:5000"}


@pytest.mark.asyncio
async def test_version_echoing_the_password_is_redacted_then_cut(
    http_target: HttpTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "mlflow-Secret-7d2c9a"
    monkeypatch.setenv("HEALTHD_TEST_MLFLOW_PASSWORD", password)
    http_target.route("/health", Reply(body=b"OK"))
    # A proxy in front that answers /version with whatever it was sent, and more.
    http_target.route("/version", Reply(body=f"3.1.0 {password}\x00{'z' * 200}".encode()))
    http_target.route("/api/2.0/mlflow/experiments/search", Reply.json('{"experiments": []}'))
    check = _check(
        url=http_target.url(), username="probe", password="${env:HEALTHD_TEST_MLFLOW_PASSWORD}"
    )
    state = await check_once(check)
    version = state.details["version"]
    assert version.startswith("3.1.0 <redacted>\\x00zzz")
    assert len(version) == 40
    assert version.endswith("...")
    assert shown_runs(password, str(state.details)) == []
