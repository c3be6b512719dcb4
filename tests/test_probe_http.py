"""The http probe and its judge against a real local HTTP(S) server doing what each test says."""

from __future__ import annotations

import functools
import json
import re
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from healthd.config import HttpCheck
from healthd.model import Finding, Observation, Status
from healthd.probes import PROBES, ProbeContext, SharedResources
from healthd.quoting import QUOTE_LIMIT
from tests.http_target import Certificate, HttpTarget, Reply
from tests.probing import make_check, run_check, shown_runs

PATH = "/api/v1/health"
WHAT = f"GET {PATH}"
SECRET = "s3cr3t-t0ken-value"


http_check = functools.partial(make_check, "http")


# --- status codes ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_ok_response_is_healthy_with_status_and_size_in_details(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply(body=b'{"status": "ok"}'))

    observation, finding = await run_check(http_check(url=http_target.url(PATH)), ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"{WHAT} returned 200")
    assert observation.facts == {"http_status": 200, "body_bytes": 16}
    assert [(r.method, r.path) for r in http_target.requests] == [("GET", PATH)]


@pytest.mark.parametrize(
    ("status", "settings", "expected"),
    [
        pytest.param(503, {}, Status.UNHEALTHY, id="503-unhealthy"),
        pytest.param(404, {}, Status.UNHEALTHY, id="404-unhealthy"),
        pytest.param(500, {}, Status.UNHEALTHY, id="500-unhealthy"),
        pytest.param(204, {}, Status.HEALTHY, id="204-in-default-range"),
        pytest.param(399, {}, Status.HEALTHY, id="399-top-of-default-range"),
        pytest.param(400, {}, Status.UNHEALTHY, id="400-just-outside-default-range"),
        pytest.param(503, {"expected_status": [503]}, Status.HEALTHY, id="503-when-expected"),
        pytest.param(204, {"expected_status": "200-203"}, Status.UNHEALTHY, id="outside-range"),
        pytest.param(
            302, {"expected_status": ["2xx"], "follow_redirects": False}, Status.UNHEALTHY, id="3xx"
        ),
        pytest.param(302, {"follow_redirects": False}, Status.HEALTHY, id="unfollowed-redirect"),
    ],
)
@pytest.mark.asyncio
async def test_status_code_decides_against_expected_ranges(
    http_target: HttpTarget,
    ctx: ProbeContext,
    status: int,
    settings: dict[str, Any],
    expected: Status,
) -> None:
    http_target.route(PATH, Reply(status=status, body=b"", headers={"Location": "/elsewhere"}))

    observation, finding = await run_check(http_check(url=http_target.url(PATH), **settings), ctx)

    assert finding.status is expected
    assert finding.reason_code == ("ok" if expected is Status.HEALTHY else "http_status")
    assert finding.reason == f"{WHAT} returned {status}"
    assert observation.facts["http_status"] == status


@pytest.mark.asyncio
async def test_method_body_and_headers_reach_the_server(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    check = http_check(
        url=http_target.url(PATH),
        method="POST",
        body='{"ping": 1}',
        headers={"X-Probe": "healthd", "Content-Type": "application/json"},
    )

    _, finding = await run_check(check, ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"POST {PATH} returned 200")
    (received,) = http_target.requests
    assert received.method == "POST"
    assert received.body == b'{"ping": 1}'
    assert received.headers["x-probe"] == "healthd"
    assert received.headers["content-type"] == "application/json"


@pytest.mark.asyncio
async def test_head_request_is_healthy_without_a_body(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    observation, finding = await run_check(
        http_check(url=http_target.url(PATH), method="HEAD"), ctx
    )

    assert finding == Finding(Status.HEALTHY, "ok", f"HEAD {PATH} returned 200")
    assert observation.facts == {"http_status": 200, "body_bytes": 0}
    assert http_target.requests[0].method == "HEAD"


@pytest.mark.asyncio
async def test_body_is_requested_uncompressed_so_conditions_see_plain_json(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply.json('{"status": "ok"}'))
    check = http_check(url=http_target.url(PATH), conditions=[{"json": "status", "equals": "ok"}])

    _, finding = await run_check(check, ctx)

    assert finding.status is Status.HEALTHY
    assert http_target.requests[0].headers["accept-encoding"] == "identity"


# --- connections: reuse and no retries ------------------------------------------------------


@pytest.mark.asyncio
async def test_repeated_probes_reuse_one_keep_alive_connection(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    check = http_check(url=http_target.url(PATH))
    for _ in range(3):
        _, finding = await run_check(check, ctx)
        assert finding.status is Status.HEALTHY

    assert len(http_target.requests) == 3
    assert http_target.connections == 1


@pytest.mark.asyncio
async def test_connection_dropped_between_probes_is_not_a_failure(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    check = http_check(url=http_target.url(PATH))
    await run_check(check, ctx)
    http_target.reset()  # the server closes the idle kept-alive connection
    assert http_target.wait_until_idle()

    _, finding = await run_check(check, ctx)

    assert finding.status is Status.HEALTHY
    assert http_target.connections == 1  # counted since the reset: a fresh connection


@pytest.mark.asyncio
async def test_closing_the_context_closes_the_kept_alive_connection(
    http_target: HttpTarget,
) -> None:
    ctx = ProbeContext(SharedResources())
    await run_check(http_check(url=http_target.url(PATH)), ctx)
    assert http_target.open_connections == 1  # kept alive between runs

    await ctx.aclose()

    assert http_target.wait_until_idle()


@pytest.mark.asyncio
async def test_failed_request_is_not_retried(http_target: HttpTarget, ctx: ProbeContext) -> None:
    http_target.route(PATH, Reply(action="reset"))

    await run_check(http_check(url=http_target.url(PATH)), ctx)

    assert len(http_target.requests) == 1
    assert http_target.connections == 1


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code", "reason"),
    [
        pytest.param(
            Reply(action="reset"), "connection_reset", "connection reset by peer", id="reset"
        ),
        pytest.param(
            Reply(action="close"),
            "connection_closed",
            "server closed the connection early",
            id="close-without-answer",
        ),
        pytest.param(
            Reply(action="reset_mid_body", body=b"x" * 100_000),
            "connection_reset",
            "connection reset by peer",
            id="reset-mid-body",
        ),
        pytest.param(
            Reply(action="close_mid_body", body=b"x" * 1000),
            "connection_closed",
            "server closed the connection early",
            id="close-mid-body",
        ),
        pytest.param(
            Reply(action="garbage"), "protocol_error", "invalid HTTP response", id="garbage"
        ),
        pytest.param(
            Reply(action="garbage", garbage=b"HTTP/1.1 2OO OK\r\n\r\n"),
            "protocol_error",
            "invalid HTTP response",
            id="bad-status-line",
        ),
        pytest.param(
            Reply(action="garbage", garbage=b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 1_000_000),
            "protocol_error",
            "invalid HTTP response",
            id="endless-header-is-capped",
        ),
        pytest.param(
            Reply(
                action="garbage",
                garbage=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ),
            "protocol_error",
            "invalid HTTP response",
            id="bad-chunk-size",
        ),
    ],
)
@pytest.mark.asyncio
async def test_broken_target_is_unhealthy_with_its_reason_code(
    http_target: HttpTarget, ctx: ProbeContext, reply: Reply, code: str, reason: str
) -> None:
    http_target.route(PATH, reply)

    observation, finding = await run_check(http_check(url=http_target.url(PATH)), ctx)

    assert finding == Finding(Status.UNHEALTHY, code, f"{WHAT}: {reason}")
    assert observation.facts == {}


@pytest.mark.asyncio
async def test_connect_that_gets_no_answer_is_a_timeout(
    unresponsive_port: int, ctx: ProbeContext
) -> None:
    started = time.perf_counter()

    observation, finding = await run_check(
        http_check(url=f"http://127.0.0.1:{unresponsive_port}/ready", timeout=0.5), ctx
    )

    assert time.perf_counter() - started < 0.5
    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "timeout")
    # A fresh client's set-up counts against the deadline, so either limit may fire first;
    # both quote the configured timeout, not the client's share of it.
    assert finding.reason in {
        "GET /ready: timed out connecting (timeout 500 ms)",
        "GET /ready: timed out before the response was complete (timeout 500 ms)",
    }
    assert observation.facts == {}


@pytest.mark.parametrize(
    ("reply", "seconds", "timed_out"),
    [
        # The read timeout (0.85 x timeout) fires before the scheduler's deadline would.
        pytest.param(
            Reply(action="hang"),
            (0.8, 0.95),
            "waiting for the response",
            id="hung-inside-the-probe-before-the-scheduler-deadline",
        ),
        # Each byte arrives well within the read timeout; only a deadline on the whole exchange
        # notices that the response never completes.
        pytest.param(
            Reply(action="trickle", body=b"x" * 100, trickle_interval_seconds=0.05),
            (0.85, 1),
            "before the response was complete",
            id="trickling-on-the-whole-exchange",
        ),
    ],
)
@pytest.mark.asyncio
async def test_target_that_does_not_answer_in_time_times_out(
    http_target: HttpTarget,
    ctx: ProbeContext,
    reply: Reply,
    seconds: tuple[float, float],
    timed_out: str,
) -> None:
    check = http_check(url=http_target.url(PATH), timeout=1)
    await run_check(check, ctx)  # build the client first, so only the request is timed
    http_target.route(PATH, reply)
    started = time.perf_counter()

    observation, finding = await run_check(check, ctx)

    low, high = seconds
    assert low < time.perf_counter() - started < high
    assert finding == Finding(
        Status.UNHEALTHY, "timeout", f"{WHAT}: timed out {timed_out} (timeout 1 s)"
    )
    assert observation.facts == {}


@pytest.mark.asyncio
async def test_probe_cancelled_by_the_scheduler_leaves_the_client_usable(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    check = http_check(url=http_target.url(PATH), timeout=2)
    http_target.route(PATH, Reply(action="hang"))
    with pytest.raises(TimeoutError), anyio.fail_after(0.1):
        await PROBES["http"].probe(check, ctx)

    http_target.route(PATH, Reply())
    _, finding = await run_check(check, ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"{WHAT} returned 200")


@pytest.mark.asyncio
async def test_slow_answer_is_degraded_with_latency_and_limit_in_the_reason(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply(delay_seconds=0.06))

    observation, finding = await run_check(
        http_check(url=http_target.url(PATH), degraded_latency="50ms"), ctx
    )

    assert observation.latency_seconds >= 0.06
    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "slow")
    assert re.fullmatch(
        rf"{WHAT} returned 200, but took \d+(\.\d+)? ms \(limit 50 ms\)", finding.reason
    )


# --- bodies: caps and conditions ------------------------------------------------------------


async def _measured(check: HttpCheck, ctx: ProbeContext) -> tuple[Observation, Finding, float, int]:
    """``run_check``, with the seconds it took and the peak of the memory Python allocated."""
    started = time.perf_counter()
    tracemalloc.start()
    try:
        observation, finding = await run_check(check, ctx)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return observation, finding, time.perf_counter() - started, peak_bytes


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(body_size=50_000_000), id="50MB-content-length"),
        pytest.param(Reply(action="endless"), id="endless-chunked"),
    ],
)
@pytest.mark.asyncio
async def test_huge_body_is_read_only_up_to_the_cap(
    http_target: HttpTarget, ctx: ProbeContext, reply: Reply
) -> None:
    http_target.route(PATH, reply)
    cap = 64 * 1024
    check = http_check(url=http_target.url(PATH), max_body_bytes=cap)
    observation, finding, seconds, peak_bytes = await _measured(check, ctx)

    assert seconds < 0.5
    # Building the client and both ends' buffers take ~3 MB; reading the body would take 50+.
    assert peak_bytes < 8_000_000
    assert finding == Finding(Status.HEALTHY, "ok", f"{WHAT} returned 200")
    assert observation.facts == {"http_status": 200, "body_bytes": cap, "body_truncated": True}
    assert len(observation.payload) == cap
    # The probe hung up instead of draining: the server could not send everything.
    assert http_target.wait_until_idle()
    assert http_target.body_bytes_sent < 20_000_000


@pytest.mark.asyncio
async def test_body_exactly_at_the_cap_is_not_truncated(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply(body=b"y" * 1000))

    observation, _ = await run_check(
        http_check(url=http_target.url(PATH), max_body_bytes=1000), ctx
    )

    assert observation.facts == {"http_status": 200, "body_bytes": 1000}


@pytest.mark.asyncio
async def test_conditions_on_a_truncated_body_are_not_evaluated(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply(action="endless"))
    check = http_check(url=http_target.url(PATH), max_body_bytes=1000, conditions=[{"regex": "x"}])

    _, finding = await run_check(check, ctx)

    assert finding == Finding(
        Status.UNHEALTHY,
        "body_too_large",
        f"{WHAT}: body is larger than 1000 bytes, conditions not evaluated",
    )


HEALTH_JSON = '{"status": "ok", "db": {"lag_seconds": 12.5}, "checks": [{"name": "db"}]}'


def _condition_failed(status: Status, described: str) -> Finding:
    return Finding(status, "condition_failed", f"{WHAT}: condition failed: {described}")


@pytest.mark.parametrize(
    ("body", "conditions", "expected"),
    [
        pytest.param(
            HEALTH_JSON,
            [
                {"json": "status", "equals": "ok"},
                {"json": "db.lag_seconds", "max": 30},
                {"json": "checks.0.name", "present": True},
                {"regex": '"status":\\s*"ok"'},
            ],
            Finding(Status.HEALTHY, "ok", f"{WHAT} returned 200"),
            id="all-hold",
        ),
        pytest.param(
            HEALTH_JSON.replace('"ok"', '"down"'),
            [{"json": "status", "equals": "ok"}],
            _condition_failed(Status.UNHEALTHY, "status == 'ok' (got 'down')"),
            id="equals-fails-unhealthy",
        ),
        pytest.param(
            HEALTH_JSON,
            [{"json": "db.lag_seconds", "max": 10, "severity": "degraded"}],
            _condition_failed(Status.DEGRADED, "db.lag_seconds <= 10 (got 12.5)"),
            id="max-fails-degraded",
        ),
        pytest.param(
            HEALTH_JSON,
            [{"json": "db.lag_seconds", "min": 20, "name": "replication caught up"}],
            _condition_failed(Status.UNHEALTHY, "replication caught up (got 12.5)"),
            id="min-fails-with-name",
        ),
        pytest.param(
            HEALTH_JSON,
            [{"json": "checks.1.name", "present": True}],
            _condition_failed(Status.UNHEALTHY, "checks.1.name present (absent)"),
            id="present-fails",
        ),
        pytest.param(
            "<html>maintenance</html>",
            [{"json": "status", "equals": "ok"}],
            _condition_failed(Status.UNHEALTHY, "status == 'ok' (body is not JSON)"),
            id="not-json",
        ),
        pytest.param(
            "[" * 200_000,
            [{"json": "status", "equals": "ok"}],
            _condition_failed(Status.UNHEALTHY, "status == 'ok' (body is not JSON)"),
            id="nested-too-deep-to-parse",
        ),
        pytest.param(
            "<html>maintenance</html>",
            [{"regex": "^OK$"}],
            _condition_failed(Status.UNHEALTHY, "body matches /^OK$/ (no match)"),
            id="regex-fails",
        ),
        pytest.param(
            HEALTH_JSON.replace('"ok"', '"down"'),
            [
                {"json": "db.lag_seconds", "max": 1, "severity": "degraded"},
                {"json": "status", "equals": "ok"},
            ],
            _condition_failed(Status.UNHEALTHY, "status == 'ok' (got 'down')"),
            id="unhealthy-outranks-degraded",
        ),
    ],
)
@pytest.mark.asyncio
async def test_body_conditions_decide_with_their_severity(
    http_target: HttpTarget,
    ctx: ProbeContext,
    body: str,
    conditions: list[dict[str, Any]],
    expected: Finding,
) -> None:
    http_target.route(PATH, Reply.json(body))

    _, finding = await run_check(http_check(url=http_target.url(PATH), conditions=conditions), ctx)

    assert finding == expected


@pytest.mark.asyncio
async def test_status_failure_wins_over_conditions(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply.json('{"status": "down"}', status=500))
    check = http_check(url=http_target.url(PATH), conditions=[{"json": "status", "equals": "ok"}])

    _, finding = await run_check(check, ctx)

    assert finding == Finding(Status.UNHEALTHY, "http_status", f"{WHAT} returned 500")


# --- redirects ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redirect_is_followed_and_counted(http_target: HttpTarget, ctx: ProbeContext) -> None:
    http_target.route("/old", Reply.redirect(PATH, status=301))

    observation, finding = await run_check(http_check(url=http_target.url("/old")), ctx)

    assert finding == Finding(Status.HEALTHY, "ok", "GET /old returned 200")
    assert observation.facts == {"http_status": 200, "body_bytes": 2, "redirects": 1}
    assert [r.path for r in http_target.requests] == ["/old", PATH]


@pytest.mark.asyncio
@pytest.mark.parametrize("interval", ["10s", "60s"], ids=["kept-request", "request-built-per-run"])
async def test_redirect_is_followed_on_every_run_without_sending_anything_twice(
    http_target: HttpTarget, ctx: ProbeContext, interval: str
) -> None:
    http_target.route("/old", Reply.redirect(PATH, status=301))
    check = http_check(url=http_target.url("/old"), interval=interval)

    for _ in range(3):
        observation, finding = await run_check(check, ctx)
        assert finding == Finding(Status.HEALTHY, "ok", "GET /old returned 200")
        assert observation.facts["redirects"] == 1

    assert [r.path for r in http_target.requests] == ["/old", PATH] * 3


@pytest.mark.asyncio
@pytest.mark.parametrize("interval", ["10s", "60s"], ids=["kept-request", "request-built-per-run"])
async def test_target_that_starts_redirecting_later_is_followed(
    http_target: HttpTarget, ctx: ProbeContext, interval: str
) -> None:
    http_target.route(PATH, Reply(body=b"ok"))
    check = http_check(url=http_target.url(PATH), interval=interval)
    for _ in range(2):
        observation, _ = await run_check(check, ctx)
        assert "redirects" not in observation.facts

    # The request is now known not to redirect and goes the short way; the target changes.
    http_target.route(PATH, Reply.redirect("/moved", status=302))
    http_target.route("/moved", Reply(status=503))
    observation, finding = await run_check(check, ctx)

    assert finding == Finding(Status.UNHEALTHY, "http_status", f"{WHAT} returned 503")
    assert observation.facts["redirects"] == 1
    assert [r.path for r in http_target.requests][-3:] == [PATH, PATH, "/moved"]


@pytest.mark.asyncio
async def test_redirect_not_followed_when_disabled_is_judged_as_it_is(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply.redirect("/elsewhere", status=302))
    check = http_check(url=http_target.url(PATH), follow_redirects=False, expected_status="2xx")

    observation, finding = await run_check(check, ctx)

    assert finding == Finding(Status.UNHEALTHY, "http_status", f"{WHAT} returned 302")
    assert "redirects" not in observation.facts
    assert [r.path for r in http_target.requests] == [PATH]


@pytest.mark.asyncio
async def test_redirect_loop_is_redirect_loop_after_max_redirects(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route("/a", Reply.redirect("/b"))
    http_target.route("/b", Reply.redirect("/a"))

    _, finding = await run_check(http_check(url=http_target.url("/a"), max_redirects=3), ctx)

    assert finding == Finding(Status.UNHEALTHY, "redirect_loop", "GET /a: too many redirects")
    assert [r.path for r in http_target.requests] == ["/a", "/b", "/a", "/b"]


@pytest.mark.parametrize(
    ("landing_host", "kept"),
    [
        pytest.param("127.0.0.1", True, id="same-origin-keeps-headers"),
        pytest.param("localhost", False, id="other-origin-drops-headers"),
    ],
)
@pytest.mark.asyncio
async def test_configured_headers_never_follow_a_redirect_to_another_origin(
    http_target: HttpTarget,
    ctx: ProbeContext,
    monkeypatch: pytest.MonkeyPatch,
    landing_host: str,
    kept: bool,
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_TOKEN", SECRET)
    http_target.route("/old", Reply.redirect(http_target.url("/landing", host=landing_host)))
    check = http_check(
        url=http_target.url("/old"),
        headers={"X-Api-Key": "${env:HEALTHD_TEST_TOKEN}", "Authorization": "Bearer x"},
    )

    _, finding = await run_check(check, ctx)

    assert finding == Finding(Status.HEALTHY, "ok", "GET /old returned 200")
    first, landing = http_target.requests
    assert first.headers["x-api-key"] == SECRET
    assert ("x-api-key" in landing.headers) is kept
    assert ("authorization" in landing.headers) is kept


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "trust"),
    [
        pytest.param(
            "localhost",
            lambda cert: {"ca_file": cert.cert_file},
            id="signed-by-the-configured-ca-file",
        ),
        pytest.param("127.0.0.1", lambda cert: {"tls_verify": False}, id="without-verification"),
    ],
)
@pytest.mark.asyncio
async def test_certificate_that_is_trusted_is_healthy(
    https_target: HttpTarget,
    tls_certificate: Certificate,
    ctx: ProbeContext,
    host: str,
    trust: Callable[[Certificate], dict[str, Any]],
) -> None:
    check = http_check(url=https_target.url(PATH, host=host), **trust(tls_certificate))

    _, finding = await run_check(check, ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"{WHAT} returned 200")


# --- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(), id="healthy"),
        pytest.param(Reply(status=401), id="http-status"),
        pytest.param(Reply(action="reset"), id="reset"),
        pytest.param(Reply.json('{"ok": false}'), id="condition-failed"),
    ],
)
@pytest.mark.asyncio
async def test_secret_header_and_query_reach_the_server_but_never_the_verdict(
    http_target: HttpTarget,
    ctx: ProbeContext,
    monkeypatch: pytest.MonkeyPatch,
    reply: Reply,
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_TOKEN", SECRET)
    http_target.route(PATH, reply)
    check = http_check(
        url=http_target.url(PATH) + "?key=${env:HEALTHD_TEST_TOKEN}",
        headers={"Authorization": "Bearer ${env:HEALTHD_TEST_TOKEN}"},
        conditions=[{"json": "ok", "equals": True}],
    )

    observation, finding = await run_check(check, ctx)

    received = http_target.requests[0]
    assert received.headers["authorization"] == f"Bearer {SECRET}"
    assert received.path == f"{PATH}?key={SECRET}"
    assert SECRET not in finding.reason
    assert SECRET not in repr(observation.facts)
    assert SECRET not in str(check.url)
    assert finding.reason.startswith(WHAT)


@pytest.mark.asyncio
async def test_secret_in_the_url_path_is_named_by_its_template(
    http_target: HttpTarget, ctx: ProbeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_TOKEN", SECRET)
    http_target.route(f"/hooks/{SECRET}/health", Reply(status=503))
    check = http_check(url=http_target.url("/hooks/${env:HEALTHD_TEST_TOKEN}/health"))

    _, finding = await run_check(check, ctx)

    assert http_target.requests[0].path == f"/hooks/{SECRET}/health"
    assert finding == Finding(
        Status.UNHEALTHY, "http_status", "GET /hooks/${env:HEALTHD_TEST_TOKEN}/health returned 503"
    )


# --- compressed bodies ----------------------------------------------------------------------

GZIP_CONDITIONS = [{"json": "status", "equals": "ok"}]


@pytest.mark.parametrize(
    "coding",
    ["gzip", "x-gzip", "deflate", "raw-deflate", "gzip, gzip", "deflate, gzip", "identity"],
)
@pytest.mark.asyncio
async def test_compressed_body_the_server_sent_anyway_is_decoded_for_conditions(
    http_target: HttpTarget, ctx: ProbeContext, coding: str
) -> None:
    text = '{"status": "ok"}'
    reply = Reply.json(text) if coding == "identity" else Reply.encoded(text, coding)
    http_target.route(PATH, reply)
    check = http_check(url=http_target.url(PATH), conditions=GZIP_CONDITIONS)

    observation, finding = await run_check(check, ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"{WHAT} returned 200")
    assert http_target.requests[0].headers["accept-encoding"] == "identity"
    assert observation.payload == text.encode()
    assert observation.facts["body_bytes"] == len(text)
    if coding != "identity":
        assert observation.facts["content_encoding"] == coding.replace("raw-", "")


@pytest.mark.asyncio
async def test_gzip_body_arriving_a_byte_at_a_time_is_decoded(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    encoded = Reply.encoded('{"status": "ok"}', "deflate")
    http_target.route(
        PATH,
        Reply(
            body=encoded.body,
            headers=encoded.headers,
            action="trickle",
            trickle_interval_seconds=0.001,
        ),
    )
    check = http_check(url=http_target.url(PATH), conditions=GZIP_CONDITIONS, timeout=2)

    _, finding = await run_check(check, ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"{WHAT} returned 200")


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "x-Made-Up"])
@pytest.mark.asyncio
async def test_body_in_a_coding_healthd_cannot_decode_is_protocol_error_naming_it(
    http_target: HttpTarget, ctx: ProbeContext, coding: str
) -> None:
    http_target.route(PATH, Reply(body=b"\x8b\x07\x80{}\x03", headers={"Content-Encoding": coding}))

    observation, finding = await run_check(http_check(url=http_target.url(PATH)), ctx)

    assert finding == Finding(
        Status.UNHEALTHY,
        "protocol_error",
        f"{WHAT}: body uses content coding '{coding.lower()}', which healthd cannot decode",
    )
    assert observation.facts == {}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(
            b"\x1f\x8b\x08\x00garbage that is no deflate", "gzip body is corrupt", id="corrupt"
        ),
        pytest.param(
            Reply.encoded('{"status": "ok", "pad": "' + "x" * 500 + '"}', "gzip").body[:-20],
            "gzip body ends before its coded stream does",
            id="cut-short",
        ),
        pytest.param(b"plain text, not gzip", "gzip body is corrupt", id="not-gzip-at-all"),
    ],
)
@pytest.mark.asyncio
async def test_corrupt_gzip_is_protocol_error(
    http_target: HttpTarget, ctx: ProbeContext, body: bytes, reason: str
) -> None:
    http_target.route(PATH, Reply(body=body, headers={"Content-Encoding": "gzip"}))

    _, finding = await run_check(http_check(url=http_target.url(PATH)), ctx)

    assert finding == Finding(Status.UNHEALTHY, "protocol_error", f"{WHAT}: {reason}")


@pytest.mark.asyncio
async def test_more_stacked_codings_than_healthd_undoes_are_refused(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply.encoded('{"status": "ok"}', "gzip, gzip, gzip, gzip"))

    _, finding = await run_check(http_check(url=http_target.url(PATH)), ctx)

    assert finding == Finding(
        Status.UNHEALTHY,
        "protocol_error",
        f"{WHAT}: body has 4 stacked content codings; healthd undoes 3",
    )


@pytest.mark.asyncio
async def test_head_answer_labelled_with_any_coding_has_no_body_to_decode(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply(body=b"\x8b\x07\x80{}\x03", headers={"Content-Encoding": "br"}))

    _, finding = await run_check(http_check(url=http_target.url(PATH), method="HEAD"), ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"HEAD {PATH} returned 200")


@functools.cache
def _gzip_bomb(decoded_bytes: int) -> bytes:
    """``decoded_bytes`` of zeros, gzipped (about 1/1000 of the size), built once."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(decoded_bytes >> 20)]
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("coding", ["gzip", "gzip, gzip"])
@pytest.mark.asyncio
async def test_gzip_bomb_is_body_too_large_with_bounded_memory(
    http_target: HttpTarget, ctx: ProbeContext, coding: str
) -> None:
    bomb = _gzip_bomb(256 << 20)
    if coding == "gzip, gzip":
        bomb = zlib.compress(bomb, wbits=31)
    http_target.route(PATH, Reply(body=bomb, headers={"Content-Encoding": coding}))
    check = http_check(url=http_target.url(PATH), conditions=GZIP_CONDITIONS)
    await run_check(http_check(url=http_target.url("/warm-up")), ctx)  # the client, built once
    observation, finding, seconds, peak_bytes = await _measured(check, ctx)

    assert finding == Finding(
        Status.UNHEALTHY,
        "body_too_large",
        f"{WHAT}: body is larger than {check.max_body_bytes} bytes, conditions not evaluated",
    )
    # 256 MiB decoded would be 256 MiB; the cap (1 MiB) and zlib's window are all it may take.
    assert peak_bytes < 10_000_000, peak_bytes
    assert observation.facts["body_bytes"] == check.max_body_bytes
    assert seconds < 0.5


# --- what reasons quote of the target -------------------------------------------------------

ECHOED_SECRETS = ["Zq7kP2mW9vL4xR8t", 'Ab\\cd"ef\\gh"ij12']


@pytest.mark.parametrize("secret", ECHOED_SECRETS, ids=["plain", "backslash-and-quote"])
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(lambda s: s, id="the-secret-alone"),
        pytest.param(lambda s: "x" * 90 + s + "y" * 20, id="across-the-cut"),
        pytest.param(lambda s: {"token": s, "n": 1}, id="inside-an-object"),
        pytest.param(lambda s: "\x00\n" * 3 + s, id="after-control-characters"),
    ],
)
@pytest.mark.asyncio
async def test_condition_reason_never_quotes_an_echoed_secret(
    http_target: HttpTarget,
    ctx: ProbeContext,
    monkeypatch: pytest.MonkeyPatch,
    secret: str,
    value: Any,
) -> None:
    monkeypatch.setenv("HEALTHD_TEST_TOKEN", secret)
    # The target echoes the key it was sent inside the value a condition looks at.
    http_target.route(PATH, Reply.json(json.dumps({"status": value(secret)})))
    check = http_check(
        url=http_target.url(PATH),
        headers={"X-Api-Key": "${env:HEALTHD_TEST_TOKEN}"},
        conditions=[{"json": "status", "equals": "ok"}],
    )

    _, finding = await run_check(check, ctx)

    assert finding.reason_code == "condition_failed"
    assert shown_runs(secret, finding.reason) == [], finding.reason
    quoted = finding.reason.split("(got ", 1)[1].removesuffix(")")
    assert len(quoted.strip("'")) <= QUOTE_LIMIT, quoted
    assert "<redact" in quoted  # redacted before the cut, which may fall inside the marker
    assert finding.reason.isprintable()


@pytest.mark.asyncio
async def test_condition_reason_quotes_a_long_binary_value_escaped_and_cut(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route(PATH, Reply.json(json.dumps({"status": "\x1b[2J\r\n" + "é" * 300})))
    check = http_check(url=http_target.url(PATH), conditions=[{"json": "status", "equals": "ok"}])

    _, finding = await run_check(check, ctx)

    quoted = finding.reason.split("(got '", 1)[1].removesuffix("')")
    assert quoted.startswith("\\x1b[2J\\r\\néé")
    assert quoted.endswith("...")
    assert len(quoted) == QUOTE_LIMIT
