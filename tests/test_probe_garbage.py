"""Garbage on a target's port is ``protocol_error``, every time, for every kind.

A server that answers with bytes of no protocol at all is a fault of its own: not a closed
connection, not a TLS problem, not a bug in healthd. Each kind is run again and again against
each way of sending the garbage, so a race between the garbage and the close would show as a
second reason code.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import pytest

from healthd.config import (
    CheckBase,
)
from healthd.model import Status
from healthd.probes import ProbeContext
from healthd.quoting import QUOTE_LIMIT
from tests.http_target import GarbageServer, GarbageVariant
from tests.probing import make_check, run_check

RUNS = 30
VARIANTS: list[GarbageVariant] = ["close", "keep_open", "after_request"]


#: Each kind, and how to point it at a port.
KINDS: dict[str, Callable[[int], CheckBase]] = {
    "http": lambda port: make_check("http", url=f"http://127.0.0.1:{port}/health"),
    "api": lambda port: make_check("api", url=f"http://127.0.0.1:{port}"),
    "mlflow": lambda port: make_check("mlflow", url=f"http://127.0.0.1:{port}"),
    "bentoml": lambda port: make_check("bentoml", url=f"http://127.0.0.1:{port}"),
    "opik": lambda port: make_check("opik", url=f"http://127.0.0.1:{port}"),
    "supabase": lambda port: make_check(
        "supabase", url=f"http://127.0.0.1:{port}", api_key="sb_publishable_x"
    ),
    "postgres": lambda port: make_check(
        "postgres", dsn=f"postgresql://probe@127.0.0.1:{port}/postgres", timeout=3
    ),
    "redis": lambda port: make_check("redis", url=f"redis://127.0.0.1:{port}"),
    "falkordb": lambda port: make_check("falkordb", url=f"redis://127.0.0.1:{port}"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.asyncio
async def test_garbage_is_protocol_error_every_time(
    garbage_server: GarbageServer,
    ctx: ProbeContext,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    variant: GarbageVariant,
) -> None:
    garbage_server.variant = variant
    check = KINDS[kind](garbage_server.port)
    codes: collections.Counter[str] = collections.Counter()
    reasons: set[str] = set()

    with caplog.at_level(logging.ERROR):
        for _ in range(RUNS):
            _, finding = await run_check(check, ctx)
            codes[finding.reason_code] += 1
            reasons.add(finding.reason)
            assert finding.status is Status.UNHEALTHY

    assert codes == {"protocol_error": RUNS}, reasons
    # Nothing escaped as a bug in healthd: no traceback in the log.
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert garbage_server.connections >= RUNS


#: Garbage with no line end, and another server's greeting (a mail server on the wrong port
#: speaks first and waits): a parser that waits for a whole line before it looks would hang on
#: these, or call the close a closed connection. (Not a greeting that starts with "S": to
#: PostgreSQL's client that is the server's yes to TLS, and what follows is judged as TLS.)
NO_LINE_END = b"\x00\x01 garbage without a line end"
SMTP_GREETING = b"220 mail.example.com ESMTP Postfix\r\n"


@pytest.mark.parametrize(
    "garbage", [NO_LINE_END, SMTP_GREETING], ids=["no-line-end", "smtp-greeting"]
)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.asyncio
async def test_garbage_without_a_line_end_is_known_by_its_first_bytes(
    ctx: ProbeContext, kind: str, variant: GarbageVariant, garbage: bytes
) -> None:
    server = GarbageServer(garbage)
    server.variant = variant
    check = KINDS[kind](server.port)
    codes: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(RUNS):
            _, finding = await run_check(check, ctx)
            codes[finding.reason_code] += 1
    finally:
        server.close()

    assert codes == {"protocol_error": RUNS}


@pytest.mark.parametrize("kind", ["redis", "postgres", "http"])
@pytest.mark.asyncio
async def test_reason_quotes_garbage_short_and_escaped(ctx: ProbeContext, kind: str) -> None:
    # 1.5 KB of binary: the reason shows at most 100 characters of it, none raw.
    server = GarbageServer(bytes(range(256)) * 6)
    try:
        _, finding = await run_check(KINDS[kind](server.port), ctx)
    finally:
        server.close()

    assert finding.reason_code == "protocol_error", finding
    assert len(finding.reason) <= QUOTE_LIMIT + 60
    assert finding.reason.isprintable()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.asyncio
async def test_plain_text_answer_to_a_tls_hello_is_tls_error(
    garbage_server: GarbageServer, ctx: ProbeContext, variant: GarbageVariant
) -> None:
    # For a tcp check with tls = true, TLS is the only protocol spoken: bytes that are not TLS
    # fail the handshake, and tls_error (what an https URL on a plain port gives too) names
    # the layer that broke. It is stable, like protocol_error for the other kinds.
    garbage_server.variant = variant
    check = make_check("tcp", address=garbage_server.address, tls=True, tls_verify=False)

    codes: collections.Counter[str] = collections.Counter()
    for _ in range(RUNS):
        _, finding = await run_check(check, ctx)
        codes[finding.reason_code] += 1

    assert codes == {"tls_error": RUNS}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        pytest.param(b"+OK\r\n", "PING was not answered with PONG: 'OK'", id="ping-ok"),
        pytest.param(
            b"+PONG\r\n*2\r\n$1\r\na\r\n+b\r\n",
            "INFO was not answered with text: '[b'a', b'b']'",
            id="info-array",
        ),
        pytest.param(b"$abc\r\n", "the reply is not RESP: '$abc\\r\\n'", id="length-no-number"),
        pytest.param(
            b"+PONG\r\n$3\r\n\xff\xfe\xfd\r\n",
            "INFO was answered with text that is no INFO: '\\xff\\xfe\\xfd'",
            id="info-no-info",
        ),
    ],
)
@pytest.mark.parametrize("kind", ["redis", "falkordb"])
@pytest.mark.asyncio
async def test_resp_that_no_redis_would_send_is_protocol_error(
    ctx: ProbeContext, caplog: pytest.LogCaptureFixture, kind: str, answer: bytes, reason: str
) -> None:
    server = GarbageServer(answer)
    try:
        with caplog.at_level(logging.ERROR):
            _, finding = await run_check(KINDS[kind](server.port), ctx)
    finally:
        server.close()

    assert (finding.reason_code, finding.reason) == ("protocol_error", f"{kind}: {reason}")
    assert not [r for r in caplog.records if r.exc_info]
