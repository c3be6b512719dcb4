"""healthd's own HTTP transport under httpx, and how checks share clients and connections.

The wire-level cases run against a scripted server in the test's own loop that records every
request's bytes and answers exactly the bytes a test gives it; the probe-level ones against
the shared ``http_target`` server.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import re
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
import pytest_asyncio

from healthd.model import Status
from healthd.probes import ProbeContext, SharedResources
from healthd.probes._transport import ProbeTransport
from healthd.probes.http import build_client
from tests.daemon import daemon_settings, running_healthd, write_config
from tests.http_target import HttpTarget, Reply
from tests.probing import make_check, run_check

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass(frozen=True)
class Say:
    """Bytes the scripted server sends for one request; ``close`` hangs up afterwards."""

    data: bytes = OK
    close: bool = False


class ScriptedServer:
    """An HTTP server that answers each request with the next scripted ``Say``."""

    def __init__(self, *replies: Say) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0
        self.open_connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    def url(self, path: str = "/") -> str:
        """The URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                if match := re.search(rb"(?i)\r\ncontent-length: *(\d+)", head):
                    body = await reader.readexactly(int(match.group(1)))
                elif re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
                    body = await reader.readuntil(b"0\r\n\r\n")
                self.requests.append(head + body)
                reply = self.replies.pop(0) if self.replies else Say()
                writer.write(reply.data)
                await writer.drain()
                if reply.close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            self.open_connections -= 1


@pytest_asyncio.fixture
async def transport() -> AsyncIterator[ProbeTransport]:
    probe_transport = ProbeTransport(ssl.create_default_context)
    yield probe_transport
    await probe_transport.aclose()


def client(transport: ProbeTransport, **settings: object) -> httpx.AsyncClient:
    """An httpx client over ``transport``, as ``build_client`` makes them."""
    return httpx.AsyncClient(transport=transport, timeout=2, trust_env=False, **settings)  # type: ignore[arg-type]


# --- framing of responses -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_informational_responses_are_skipped_for_the_final_one(
    transport: ProbeTransport,
) -> None:
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with ScriptedServer(Say(early + OK)) as server:
        response = await client(transport).get(server.url())

    assert response.status_code == 200
    assert response.content == b"ok"


@pytest.mark.asyncio
async def test_body_without_length_is_read_until_the_server_closes(
    transport: ProbeTransport,
) -> None:
    async with ScriptedServer(
        Say(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close=True), Say()
    ) as server:
        first = await client(transport).get(server.url("/a"))
        second = await client(transport).get(server.url("/b"))

        assert first.content == b"until the end"
        assert second.content == b"ok"
        assert server.connections == 2  # a body ended by the close ends the connection too


@pytest.mark.parametrize(
    ("method", "response", "content"),
    [
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
            id="chunked-body-is-joined",
        ),
        pytest.param(
            "HEAD",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
            b"",
            id="head-response-ends-at-its-head",
        ),
    ],
)
@pytest.mark.asyncio
async def test_a_response_read_to_its_end_keeps_the_connection(
    transport: ProbeTransport, method: str, response: bytes, content: bytes
) -> None:
    async with ScriptedServer(Say(response), Say()) as server:
        first = await client(transport).request(method, server.url())
        second = await client(transport).get(server.url())

        assert (first.status_code, first.content) == (200, content)
        assert second.content == b"ok"
        assert server.connections == 1


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            id="connection-close-is-honoured",
        ),
        # "timeout=1" leaves no time at all once our one-second margin is taken off.
        pytest.param(
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok",
            id="keep-alive-timeout-is-respected",
        ),
    ],
)
@pytest.mark.asyncio
async def test_a_response_that_ends_its_connection_is_not_reused(
    transport: ProbeTransport, response: bytes
) -> None:
    async with ScriptedServer(Say(response), Say()) as server:
        await client(transport).get(server.url())
        await client(transport).get(server.url())

        assert server.connections == 2


# --- framing of requests --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_bodiless_requests_and_redirected_gets_are_never_chunked(
    transport: ProbeTransport,
) -> None:
    see_other = b"HTTP/1.1 303 See Other\r\nLocation: /landing\r\nContent-Length: 0\r\n\r\n"
    async with ScriptedServer(Say(), Say(see_other), Say()) as server:
        http = client(transport, follow_redirects=True)
        await http.get(server.url("/plain"))
        response = await http.post(server.url("/form"), content=b"a=1")

        assert response.status_code == 200
        get, post, redirected = server.requests
        assert post.startswith(b"POST /form HTTP/1.1\r\n")
        assert post.endswith(b"\r\n\r\na=1")
        assert b"content-length: 3" in post.lower()
        assert redirected.startswith(b"GET /landing HTTP/1.1\r\n")
        for bodiless in (get, redirected):
            assert b"transfer-encoding" not in bodiless.lower()
            assert b"content-length" not in bodiless.lower()


@pytest.mark.asyncio
async def test_streamed_request_body_is_sent_chunked(transport: ProbeTransport) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    async with ScriptedServer(Say()) as server:
        await client(transport).post(server.url(), content=parts())

        (sent,) = server.requests
        assert b"transfer-encoding: chunked" in sent.lower()
        assert sent.endswith(b"\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")


# --- failures and reuse ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_failure_on_a_reused_connection_is_reported_not_resent(
    transport: ProbeTransport,
) -> None:
    async with ScriptedServer(Say(), Say(b"", close=True)) as server:
        http = client(transport)
        await http.get(server.url("/one"))

        with pytest.raises(httpx.RemoteProtocolError, match="without sending"):
            await http.get(server.url("/two"))

        assert [r.split(b" ")[1] for r in server.requests] == [b"/one", b"/two"]
        assert server.connections == 1


@pytest.mark.asyncio
async def test_target_that_closes_idle_connections_gets_a_fresh_one_per_request(
    transport: ProbeTransport,
) -> None:
    # The server hangs up right after each answer, without saying "Connection: close".
    async with ScriptedServer(Say(close=True), Say(close=True), Say(close=True)) as server:
        http = client(transport)
        await http.get(server.url())
        await anyio.wait_all_tasks_blocked()
        await http.get(server.url())  # finds the kept connection closed: learns
        after_learning = transport.open_connections

        assert after_learning == 0  # not kept for the next request any more
        assert server.connections == 2


@pytest.mark.asyncio
async def test_refused_and_timed_out_connects_are_httpx_errors_with_the_os_error_chained(
    transport: ProbeTransport, closed_port: int, unresponsive_port: int
) -> None:
    with pytest.raises(httpx.ConnectError) as refused:
        await client(transport).get(f"http://127.0.0.1:{closed_port}/")
    with pytest.raises(httpx.ConnectTimeout):
        await httpx.AsyncClient(transport=transport, timeout=0.2).get(
            f"http://127.0.0.1:{unresponsive_port}/"
        )

    assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    assert transport.open_connections == 0


@pytest.mark.asyncio
async def test_cancelled_request_closes_its_connection(http_target: HttpTarget) -> None:
    http_target.route("/hang", Reply(action="hang"))
    transport = ProbeTransport(ssl.create_default_context)
    http = client(transport)
    await http.get(http_target.url("/"))  # a kept connection, which the hung request reuses
    descriptors = _open_descriptors()
    try:
        with anyio.move_on_after(0.1):
            await http.get(http_target.url("/hang"))
        await anyio.sleep(0)  # the loop closes an aborted socket on its next pass

        assert transport.open_connections == 0
        assert _open_descriptors() == descriptors - 1
    finally:
        await transport.aclose()


@pytest.mark.asyncio
async def test_timed_out_connections_are_freed_without_the_garbage_collector(
    http_target: HttpTarget,
) -> None:
    # 100 timeouts a second used to leave as many connection cycles (parser callbacks and
    # transport pointing back at the connection) for the collector, whose passes held the loop.
    http_target.route("/hang", Reply(action="hang"))
    transport = ProbeTransport(ssl.create_default_context)
    http = client(transport)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            with anyio.move_on_after(0.05):
                await http.get(http_target.url("/hang"))
        await anyio.sleep(0.01)  # the loop closes the aborted sockets on its next passes
        gc.collect()
        cycles = [type(o).__name__ for o in gc.garbage if type(o).__name__ == "_Connection"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await transport.aclose()
    assert cycles == []


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- keep-alive policy and shared clients ---------------------------------------------------


http_check = functools.partial(make_check, "http")


@pytest.mark.asyncio
async def test_check_that_runs_less_often_than_the_idle_time_connects_per_probe(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    check = http_check(url=http_target.url("/health"), interval=60, timeout=5)

    for _ in range(2):
        _, finding = await run_check(check, ctx)
        assert finding.status is Status.HEALTHY
        assert await anyio.to_thread.run_sync(http_target.wait_until_idle)

    assert http_target.connections == 2


@pytest.mark.asyncio
async def test_check_that_builds_its_request_per_run_still_keeps_headers_home(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    http_target.route("/old", Reply.redirect(http_target.url("/landing", host="localhost")))
    check = http_check(url=http_target.url("/old"), interval=60, headers={"X-Api-Key": "k"})

    for _ in range(2):
        observation, finding = await run_check(check, ctx)
        assert finding.status is Status.HEALTHY
        assert observation.facts["redirects"] == 1

    first, landing, again, landing_again = http_target.requests
    assert first.headers["x-api-key"] == again.headers["x-api-key"] == "k"
    assert "x-api-key" not in landing.headers
    assert "x-api-key" not in landing_again.headers


@pytest.mark.asyncio
async def test_checks_with_identical_settings_share_one_client(http_target: HttpTarget) -> None:
    shared = SharedResources()
    first, second, other = ProbeContext(shared), ProbeContext(shared), ProbeContext(shared)
    a = build_client(first, timeout_seconds=1, interval_seconds=10)
    b = build_client(second, timeout_seconds=1, interval_seconds=10)
    c = build_client(other, timeout_seconds=1, interval_seconds=10, headers={"X-Key": "k"})

    assert a.client is b.client
    assert c.client is not a.client
    assert shared.leases == 2

    await a.aclose()
    response = await b.client.get(http_target.url("/"))  # still open for the other holder
    assert response.status_code == 200
    await b.aclose()
    await c.aclose()
    assert shared.leases == 0
    assert b.client.is_closed


@pytest.mark.asyncio
async def test_hung_request_does_not_delay_another_check_to_the_same_host(
    http_target: HttpTarget,
) -> None:
    http_target.route("/hung", Reply(action="hang"))
    shared = SharedResources()
    hung_ctx, healthy_ctx = ProbeContext(shared), ProbeContext(shared)
    hung = http_check(url=http_target.url("/hung"), timeout=2)
    healthy = http_check(url=http_target.url("/ok"), timeout=2)
    healthy_done = anyio.Event()
    hung_finished_first = False

    async def probe_hung() -> None:
        nonlocal hung_finished_first
        await run_check(hung, hung_ctx)
        hung_finished_first = not healthy_done.is_set()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(probe_hung)
            # The hung request is on the wire, waiting for its answer, before the healthy
            # check starts.
            await anyio.wait_all_tasks_blocked()
            observation, finding = await run_check(healthy, healthy_ctx)
            healthy_done.set()
            paths = [r.path for r in http_target.requests]
            http_target.reset()  # release the hung one
    finally:
        await hung_ctx.aclose()
        await healthy_ctx.aclose()

    assert finding.status is Status.HEALTHY
    assert observation.latency_seconds < 0.5
    assert not hung_finished_first
    assert paths == ["/hung", "/ok"]
    assert shared.leases == 0


# --- the event loop -------------------------------------------------------------------------


@pytest.mark.parametrize("uvloop_wanted", [True, False], ids=["uvloop", "asyncio-loop"])
def test_daemon_runs_with_and_without_uvloop(
    http_target: HttpTarget, tmp_path: Path, uvloop_wanted: bool
) -> None:
    pytest.importorskip("uvloop")
    config = write_config(
        tmp_path / "healthd.toml",
        daemon_settings(tmp_path, startup_spread=0.1),
        {"web": {"kind": "http", "url": http_target.url("/health"), "interval": 1}},
    )
    env = {"HEALTHD_NO_UVLOOP": "0" if uvloop_wanted else "1"}
    with running_healthd(config, env=env, ready=True) as daemon:
        maps = Path(f"/proc/{daemon.pid}/maps").read_text()
        code = daemon.stop(signal.SIGTERM)
        log = daemon.log()

    assert ("uvloop" in maps) is uvloop_wanted
    assert code == 0, log
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "healthy"
    assert any(r.path == "/health" for r in http_target.requests)
