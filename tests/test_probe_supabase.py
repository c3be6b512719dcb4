"""The ``supabase`` preset against a local server answering as Supabase's Kong gateway does.

The Supabase stack cannot run here; ``serve_supabase`` reproduces the gateway's documented
answers (GoTrue's health, PostgREST's root, Kong's 502 for a dead upstream and its key-auth
401). The end-to-end tests run ``healthd`` itself with the key in its environment and prove the
key appears in no log line, metric or status file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from healthd.config import SupabaseCheck
from healthd.model import Failure, Observation, Status
from healthd.probes._preset import Outcome
from healthd.probes.supabase import assess, is_legacy_key
from tests.daemon import healthd_cli, run_daemon_once
from tests.http_target import HttpTarget, Reply
from tests.probing import check_once, component, make_check
from tests.services import serve_supabase

#: Shaped like a legacy anon key (a JWT), and unique enough to search every output for it.
LEGACY_KEY = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.c2VjcmV0LXNpZ25hdHVyZS0xMjM0NQ"
NEW_KEY = "sb_publishable_Zx9SecretPublishableKey42"


_check = functools.partial(make_check, "supabase", api_key=LEGACY_KEY, timeout=2)


def _assert_no_key(text: str, *keys: str) -> None:
    for key in keys:
        assert key not in text
        # Not even the signature part of a JWT, nor a long piece of any key.
        assert key[-20:] not in text


@pytest.mark.asyncio
async def test_auth_and_rest_up_is_healthy_with_gotrue_version(http_target: HttpTarget) -> None:
    serve_supabase(http_target)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == (Status.HEALTHY, "ok")
    assert state.details["auth_version"] == "v2.177.0"
    assert list(state.details["requests"]) == ["auth", "rest"]
    _assert_no_key(f"{state.reason} {json.dumps(dict(state.details))}", LEGACY_KEY)


@pytest.mark.asyncio
async def test_legacy_key_goes_as_apikey_and_bearer(http_target: HttpTarget) -> None:
    serve_supabase(http_target)
    async with component(_check(url=http_target.url())) as supabase:
        await supabase.check_once()
    for recorded in http_target.requests:
        assert recorded.headers["apikey"] == LEGACY_KEY
        assert recorded.headers["authorization"] == f"Bearer {LEGACY_KEY}"


@pytest.mark.asyncio
async def test_new_style_key_goes_as_apikey_only(http_target: HttpTarget) -> None:
    serve_supabase(http_target)
    async with component(_check(url=http_target.url(), api_key=NEW_KEY)) as supabase:
        assert (await supabase.check_once()).status is Status.HEALTHY
    for recorded in http_target.requests:
        assert recorded.headers["apikey"] == NEW_KEY
        assert "authorization" not in recorded.headers


@pytest.mark.asyncio
async def test_gotrue_down_behind_live_kong_is_degraded_then_recovers(
    http_target: HttpTarget,
) -> None:
    serve_supabase(http_target, auth="down")
    async with component(_check(url=http_target.url())) as supabase:
        state = await supabase.check_once()
        assert (state.status, state.reason_code) == (Status.DEGRADED, "auth_down")
        assert state.reason == "auth (GoTrue): GET /auth/v1/health returned 502"
        assert state.details["requests"]["auth"]["http_status"] == 502
        assert state.details["requests"]["rest"]["http_status"] == 200

        serve_supabase(http_target)
        state = await supabase.check_once()
    assert state.status is Status.HEALTHY


@pytest.mark.parametrize(
    ("answer", "expected", "reasons"),
    [
        pytest.param(
            "down",
            (Status.UNHEALTHY, "services_down"),
            ["/auth/v1/health returned 502", "/rest/v1/ returned 502"],
            id="both-down-is-unhealthy",
        ),
        pytest.param(
            "rejected",
            (Status.DEGRADED, "auth_failed"),
            ["401 on auth, rest"],
            id="rotated-key-is-degraded-auth-failed",
        ),
    ],
)
@pytest.mark.asyncio
async def test_auth_and_rest_failing_alike(
    http_target: HttpTarget, answer: str, expected: tuple[Status, str], reasons: list[str]
) -> None:
    serve_supabase(http_target, auth=answer, rest=answer)
    state = await check_once(_check(url=http_target.url()))
    assert (state.status, state.reason_code) == expected
    for reason in reasons:
        assert reason in state.reason
    _assert_no_key(f"{state.reason} {json.dumps(dict(state.details))}", LEGACY_KEY)


@pytest.mark.asyncio
async def test_storage_and_table_read_are_checked_when_configured(
    http_target: HttpTarget,
) -> None:
    serve_supabase(http_target, table="missing")
    check = _check(url=http_target.url(), storage=True, table="todos", select="id")
    state = await check_once(check)
    assert (state.status, state.reason_code) == (Status.DEGRADED, "table_read_failed")
    assert state.reason == "table todos: GET /rest/v1/todos returned 404"
    assert state.details["requests"]["storage"]["http_status"] == 200
    assert "/rest/v1/todos?select=id&limit=1" in {r.path for r in http_target.requests}


@pytest.mark.asyncio
async def test_storage_down_is_degraded(http_target: HttpTarget) -> None:
    serve_supabase(http_target, storage="down")
    state = await check_once(_check(url=http_target.url(), storage=True))
    assert (state.status, state.reason_code) == (Status.DEGRADED, "storage_down")


def test_legacy_keys_are_recognised_as_jwts() -> None:
    assert is_legacy_key(LEGACY_KEY)
    assert not is_legacy_key(NEW_KEY)


# --- end to end: healthd itself, with secrets in its environment ------------------------------


def _components(target: HttpTarget) -> str:
    return f"""
[components.supabase]
kind = "supabase"
url = "{target.url()}"
api_key = "${{env:SUPABASE_ANON_KEY}}"

[components.mlflow]
kind = "mlflow"
url = "{target.url()}"
username = "healthd"
password = "${{env:MLFLOW_PASSWORD}}"
"""


_MLFLOW_PASSWORD = "mlflow-Pa55word-nobody-may-see"
_SECRET_ENV = {"SUPABASE_ANON_KEY": LEGACY_KEY, "MLFLOW_PASSWORD": _MLFLOW_PASSWORD}


def _serve_rotated_key_and_wrong_password(target: HttpTarget) -> None:
    serve_supabase(target, auth="rejected", rest="rejected")
    target.route("/health", Reply(body=b"OK"))
    target.route("/version", Reply(body=b"3.17.2"))
    target.route("/api/2.0/mlflow/experiments/search", Reply(status=401, body=b"Unauthorized"))


def test_check_json_reports_rejected_credentials_without_showing_them(
    http_target: HttpTarget, tmp_path: Path
) -> None:
    _serve_rotated_key_and_wrong_password(http_target)
    config = tmp_path / "healthd.toml"
    config.write_text(_components(http_target))
    result = healthd_cli(
        "--config",
        str(config),
        "--log-level",
        "debug",
        "check",
        "--json",
        env=_SECRET_ENV,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr  # degraded
    document = json.loads(result.stdout)
    supabase = document["components"]["supabase"]
    assert supabase["status"] == "degraded"
    assert supabase["reason_code"] == "auth_failed"
    assert supabase["details"]["requests"]["auth"]["http_status"] == 401
    assert document["components"]["mlflow"]["reason_code"] == "auth_failed"
    _assert_no_key(result.stdout + result.stderr, LEGACY_KEY, _MLFLOW_PASSWORD)


@pytest.mark.slow
def test_daemon_keeps_keys_out_of_logs_metrics_and_status_file(
    http_target: HttpTarget, tmp_path: Path
) -> None:
    _serve_rotated_key_and_wrong_password(http_target)
    out = run_daemon_once(tmp_path, _components(http_target), _SECRET_ENV)
    assert 'healthd_component_status{component="supabase"' in out.metrics
    assert out.status["components"]["supabase"]["reason_code"] == "auth_failed"
    assert "supabase" in out.logs
    _assert_no_key(out.everything(), LEGACY_KEY, _MLFLOW_PASSWORD)


# --- the verdict table, judged purely ----------------------------------------------------------


def _observed(**statuses: int | str) -> Observation:
    """An observation whose requests got these statuses, or (a string) failed with that code."""
    recorded = {}
    for name, status in statuses.items():
        if isinstance(status, str):
            outcome = Observation(0.01, failure=Failure(status, f"GET /{name}: {status}"))
        else:
            outcome = Observation(0.01, facts={"http_status": status}, payload=b"{}")
        recorded[name] = Outcome(f"GET /{name}", outcome)
    return Observation(0.01, facts={"requests": {}}, payload=recorded)


@pytest.mark.parametrize(
    ("statuses", "expected_status", "expected_code"),
    [
        ({"auth": 200, "rest": 200}, Status.HEALTHY, "ok"),
        ({"auth": 502, "rest": 200}, Status.DEGRADED, "auth_down"),
        ({"auth": 200, "rest": 503}, Status.DEGRADED, "rest_down"),
        ({"auth": 502, "rest": 502}, Status.UNHEALTHY, "services_down"),
        ({"auth": "timeout", "rest": 502}, Status.UNHEALTHY, "services_down"),
        ({"auth": "timeout", "rest": "connection_refused"}, Status.UNHEALTHY, "timeout"),
        ({"auth": 401, "rest": 401}, Status.DEGRADED, "auth_failed"),
        ({"auth": 401, "rest": 502}, Status.DEGRADED, "auth_failed"),
        ({"auth": 200, "rest": 200, "storage": 500}, Status.DEGRADED, "storage_down"),
        ({"auth": 200, "rest": 200, "table": 404}, Status.DEGRADED, "table_read_failed"),
    ],
)
def test_verdict_table(
    statuses: dict[str, int | str], expected_status: Status, expected_code: str
) -> None:
    check = SupabaseCheck(url="http://127.0.0.1:54321", api_key=NEW_KEY, table="todos")
    finding = assess(check, _observed(**statuses))
    assert (finding.status, finding.reason_code) == (expected_status, expected_code)
