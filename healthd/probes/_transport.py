"""healthd's own HTTP/1.1 transport under httpx: asyncio protocols and llhttp, nothing more.

httpx's ``AsyncClient`` keeps building requests, following redirects and running event hooks;
this module only moves bytes. Under it httpcore, h11 and anyio spent about 290 us of CPU per
probe; here one asyncio ``Protocol`` per connection feeds ``httptools`` (llhttp) and wakes the
waiting request with one future per wait, and a timer per wait is the only deadline.

What it promises, and the http probe's tests pin down:

- Failures are httpx's exceptions, with the ``OSError`` or ``ssl.SSLError`` behind them as
  ``__cause__``: ``ConnectError``, ``ReadError``, ``WriteError``, the ``*Timeout`` of the phase,
  ``RemoteProtocolError`` for a response that is not HTTP ("invalid HTTP response") or that ends
  early ("Server disconnected without sending ...").
- A request is sent once. A reused connection is checked before it is used (closed by the
  peer, or holding bytes nobody asked for: then a fresh one); a failure after the request was
  written is reported, never resent, since the target may have acted on it. The one case
  this reports falsely, a target closing an idle connection in the instant the request goes
  out, is rare (connections idle at most 30 s, and the ``Keep-Alive`` timeout less a second),
  and the host is then probed on fresh connections (see below), so it does not repeat.
- The body streams with backpressure: reading from the socket pauses while more than
  ``_HIGH_WATER_BYTES`` wait to be consumed, so a capped read of an endless body stays small.
  A body closed before its end closes the connection; cancellation closes it too.
- Requests are framed as httpx built them: ``Transfer-Encoding: chunked`` only where the
  request says so, never on a bodiless request.
- No queue: every request in flight has its own connection, so a hung request never delays
  another check's request to the same host. Only idle connections are limited, per host.
- A connection is kept for reuse only when the transport was built with ``keep_alive`` (the
  check runs more often than ``KEEPALIVE_IDLE_SECONDS``), the response allows it, and for at
  most ``KEEPALIVE_IDLE_SECONDS`` or the ``timeout`` of the target's ``Keep-Alive`` header
  less a second. A target found to have closed an idle connection gets a fresh connection
  per request for the next ten minutes: keeping one only costs a descriptor there.

It runs on asyncio (the backend healthd runs anyio with), with or without uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import httptools
import httpx

#: How long a connection may sit idle and still be reused. Servers close idle connections
#: after 5 s (uvicorn, gunicorn, Node), 60 s (load balancers) or 75 s (nginx); past that time a
#: kept socket is only a descriptor held for nothing. Checks that run less often than this
#: connect per probe.
KEEPALIVE_IDLE_SECONDS = 30.0
#: Idle connections kept per host and port; more in flight at once are closed after use. The
#: scheduler's concurrency bounds how many are in flight; with 8, 300 checks a second to one
#: host still opened 20 connections a second after bursts.
MAX_IDLE_PER_HOST = 64
#: A response head larger than this is not HTTP we accept: no target makes us buffer without end.
MAX_HEAD_BYTES = 64 * 1024
#: How long a target seen closing idle connections gets a connection per request; then
#: keep-alive is tried again.
_RELEARN_SECONDS = 600.0
#: Body bytes waiting for the reader before reading from the socket pauses.
_HIGH_WATER_BYTES = 256 * 1024

_Key = tuple[str, str, int]

_DISCONNECTED = "Server disconnected without sending a response."
_DISCONNECTED_EARLY = "Server disconnected without sending a complete response."
_INVALID = "invalid HTTP response"


class _HeadOnly(Exception):
    """Raised from the parser's callback to stop at the head of a response without a body."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the one exchange on it at a time."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_drain",
        "_framed",
        "_head_bytes",
        "_head_only",
        "_informational",
        "_parser",
        "_waiter",
        "complete",
        "error",
        "expires_at",
        "failed",
        "head_done",
        "headers",
        "idle_since",
        "keep_alive",
        "keep_alive_seconds",
        "key",
        "lost",
        "paused",
        "peer_closed",
        "spoke_first",
        "status",
        "transport",
        "until_close",
        "write_paused",
    )

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.peer_closed = False
        #: The peer sent bytes before any request on this connection: whatever it is (garbage,
        #: an SSH or SMTP greeting), it is not HTTP, and the exchange says protocol_error.
        self.spoke_first = False
        #: The OSError (or SSLError) that ended the connection, if one did.
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self.expires_at = math.inf
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._start(head_only=False)
        self._parser = None

    def _start(self, *, head_only: bool) -> None:
        """Make ready for the next response."""
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._informational = False
        self._head_bytes = 0
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.paused = False
        self.head_done = False
        self.complete = False
        self.until_close = False
        self._framed = False
        self.keep_alive = True
        #: The ``timeout`` of the response's ``Keep-Alive`` header.
        self.keep_alive_seconds = math.inf
        #: The parser's error, or a head too large.
        self.failed: BaseException | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    # --- asyncio's side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete or self.failed is not None:
            # Bytes nobody asked for: the connection is out of step and never reused.
            self.spoke_first = self.spoke_first or parser is None
            self.keep_alive = False
            self.peer_closed = True
            self.abort()
            return
        if not self.head_done:
            self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _HeadOnly):
                self.failed = exc
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.failed = exc
        if not self.head_done and self._head_bytes > MAX_HEAD_BYTES and self.failed is None:
            self.failed = httpx.RemoteProtocolError("response head too large")
        self._wake()

    def eof_received(self) -> bool:
        self.peer_closed = True
        self._end_of_stream()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.peer_closed = True
        if exc is not None and self.error is None:
            self.error = exc
        self._end_of_stream()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _end_of_stream(self) -> None:
        if self.head_done and self.until_close and self.error is None and not self.complete:
            # A body without length or chunks ends where the connection does.
            self.complete = True
            self.keep_alive = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # --- llhttp's callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        # Only three names matter here; their lengths spare lowering every other name.
        size = len(name)
        if size == 14 or size == 17:  # content-length, transfer-encoding
            lowered = name.lower()
            if lowered == b"content-length" or lowered == b"transfer-encoding":
                self._framed = True
        elif size == 10 and name.lower() == b"keep-alive":
            self.keep_alive_seconds = _keep_alive_timeout(value)

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Informational (100 Continue, 103 Early Hints): the response proper follows.
            self._informational = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_only or status == 101:
            self.complete = True
            self.keep_alive = self.keep_alive and status != 101
            raise _HeadOnly
        if status not in (204, 304):
            self.until_close = not self._framed

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        assert self._parser is not None
        self.keep_alive = self.keep_alive and self._parser.should_keep_alive()

    # --- the exchange's side -----------------------------------------------------------------

    async def wait(self, limit_seconds: float | None) -> bool:
        """Wait for news from the peer; ``False`` when ``limit_seconds`` passed first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = None if limit_seconds is None else loop.call_later(limit_seconds, _expire, waiter)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def drain(self, limit_seconds: float | None) -> bool:
        """Wait until the kernel takes more bytes; ``False`` when ``limit_seconds`` passed."""
        if not self.write_paused or self.lost:
            return True
        loop = asyncio.get_running_loop()
        drain: asyncio.Future[None] = loop.create_future()
        self._drain = drain
        timer = None if limit_seconds is None else loop.call_later(limit_seconds, drain.cancel)
        requests = _cancel_requests()
        try:
            await drain
        except asyncio.CancelledError:
            if not drain.cancelled() or _cancel_requests() > requests:
                raise
            return False
        finally:
            self._drain = None
            if timer is not None:
                timer.cancel()
        return True

    def take(self) -> bytes:
        """The body bytes received so far; reading resumes when they were many."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()
        return data

    @property
    def has_body_bytes(self) -> bool:
        """Body bytes wait to be taken."""
        return bool(self._chunks)

    def begin(self, *, head_only: bool) -> None:
        """Start an exchange: the next bytes from the peer are its response."""
        self._start(head_only=head_only)

    def idle(self, now: float) -> None:
        """The exchange is over and the connection waits for the next."""
        self._parser = None
        self._chunks = []
        self.headers = []
        self.idle_since = now

    def readable_while_idle(self) -> bool:
        """The peer closed or sent something since the last exchange (not yet seen by the
        event loop, which may not have polled since)."""
        if self.lost or self.peer_closed or self.transport is None:
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def abort(self) -> None:
        """Close at once, without waiting to send anything more."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def unlink(self) -> None:
        """Drop the references back to this connection (the parser's callbacks, the
        transport's protocol) once it is discarded: left linked, every discarded connection
        was cyclic garbage, and at 100 timeouts a second the garbage collector's passes over
        it held the event loop for milliseconds."""
        self._parser = None
        self.transport = None


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _cancel_requests() -> int:
    """How many cancellations of the current task are pending, to compare before and after a
    wait: only a rise means someone else cancels us too. (A count left over from an earlier
    race must not make every later timeout look like a cancellation.)"""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


class ProbeTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio for ``httpx.AsyncClient``: one connection per request in flight,
    idle ones kept per host (see the module's docstring for what is promised).

    ``ssl_context`` (called on the first https request: building a context costs about 21 ms of CPU)
    serves every https URL, with the URL's host as SNI and as the name verified (as the
    context says). ``keep_alive`` keeps connections between requests.
    """

    def __init__(
        self,
        ssl_context: Callable[[], ssl.SSLContext],
        *,
        keep_alive: bool = True,
        keepalive_idle_seconds: float = KEEPALIVE_IDLE_SECONDS,
        max_idle_per_host: int = MAX_IDLE_PER_HOST,
    ) -> None:
        self._ssl_context = ssl_context
        self._keep_alive = keep_alive
        self._idle_seconds = keepalive_idle_seconds
        self._max_idle = max_idle_per_host
        self._idle: dict[_Key, list[_Connection]] = {}
        #: Every open connection, idle or busy, so that closing the transport closes them all.
        self._open: set[_Connection] = set()
        #: Hosts seen closing idle connections before we reused them, and until when to
        #: believe it (a restart of the target closes them too, and should not last forever).
        self._closes_idle: dict[_Key, float] = {}
        self._literal: dict[str, bool] = {}
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or busy."""
        return len(self._open)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once and return its response, whose body streams."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        timeouts: dict[str, float | None] = request.extensions.get("timeout") or {}
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        key: _Key = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        loop = asyncio.get_running_loop()
        conn = self._checkout(key, loop.time())
        if conn is None:
            conn = await self._connect(key, request, timeouts.get("connect"))
        try:
            await self._send(conn, request, timeouts.get("write"))
            read_timeout = timeouts.get("read")
            while not conn.head_done:
                if conn.failed is not None or conn.lost or conn.peer_closed:
                    raise _failure(conn, request, _DISCONNECTED)
                if not await conn.wait(read_timeout):
                    raise httpx.ReadTimeout("timed out waiting for the response", request=request)
        except BaseException:
            self._discard(conn)
            raise
        http_version = b"HTTP/1.1"
        if conn._parser is not None and conn._parser.get_http_version() == "1.0":
            http_version = b"HTTP/1.0"
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn, request, read_timeout),
            extensions={"http_version": http_version},
            request=request,
        )

    def _checkout(self, key: _Key, now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if now < conn.expires_at and not conn.readable_while_idle():
                return conn
            if now < conn.expires_at and now - conn.idle_since < self._idle_seconds:
                # Closed by the target before our own limit: it keeps connections for a
                # shorter time than this transport waits between requests.
                self._closes_idle[key] = now + _RELEARN_SECONDS
            self._discard(conn)
        return None

    async def _connect(
        self, key: _Key, request: httpx.Request, limit_seconds: float | None
    ) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        conn = _Connection(key)
        task = loop.create_task(self._open_connection(loop, conn, scheme, host, port))
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel()

        timer = None if limit_seconds is None else loop.call_later(limit_seconds, expire)
        requests = _cancel_requests()
        try:
            await task
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                conn.abort()  # connected just as we were cancelled
            if timed_out and _cancel_requests() == requests:
                raise httpx.ConnectTimeout("timed out connecting", request=request) from None
            raise
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise httpx.ConnectError(_describe(exc), request=request) from exc
        finally:
            if timer is not None:
                timer.cancel()
            if not task.done():
                task.cancel()
        self._open.add(conn)
        return conn

    async def _open_connection(
        self, loop: asyncio.AbstractEventLoop, conn: _Connection, scheme: str, host: str, port: int
    ) -> None:
        tls = self._ssl_context() if scheme == "https" else None
        server_hostname = host if tls is not None else None
        if self._is_literal(host):
            await loop.create_connection(
                lambda: conn, host, port, ssl=tls, server_hostname=server_hostname
            )
            return
        # Resolved here, each address tried in turn: asyncio (before 3.12) folds the errors of
        # several addresses into one bare OSError, and the reason code would be lost.
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        errors: list[OSError] = []
        for family, _, proto, _, address in infos:
            try:
                await loop.create_connection(
                    lambda: conn,
                    str(address[0]),
                    int(address[1]),
                    family=family,
                    proto=proto,
                    ssl=tls,
                    server_hostname=server_hostname,
                )
            except ssl.SSLError:
                raise  # the address answered: the handshake is what failed
            except OSError as exc:
                errors.append(exc)
            else:
                return
        if len(errors) == 1:
            raise errors[0]
        raise OSError("all connection attempts failed") from ExceptionGroup("connect", errors)

    def _is_literal(self, host: str) -> bool:
        literal = self._literal.get(host)
        if literal is None:
            try:
                ipaddress.ip_address(host)
                literal = True
            except ValueError:
                literal = False
            if len(self._literal) < 1024:
                self._literal[host] = literal
        return literal

    async def _send(
        self, conn: _Connection, request: httpx.Request, write_seconds: float | None
    ) -> None:
        transport = conn.transport
        assert transport is not None
        method = request.method
        conn.begin(head_only=method == "HEAD")
        url = request.url
        raw = request.headers.raw
        parts = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), url.raw_path)]
        parts.extend(b"%s: %s\r\n" % pair for pair in raw)
        parts.append(b"\r\n")
        # A cheap look first: almost no request is chunked.
        chunked = any(
            len(name) == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
            for name, value in raw
        )
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            body = b"".join(stream)
            if chunked and body:
                parts.append(b"%x\r\n%s\r\n" % (len(body), body))
            elif body:
                parts.append(body)
            if chunked:
                parts.append(b"0\r\n\r\n")
            await self._write(conn, b"".join(parts), request, write_seconds)
            return
        await self._write(conn, b"".join(parts), request, write_seconds)
        assert isinstance(stream, httpx.AsyncByteStream)
        async for chunk in stream:
            if chunk:
                data = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                await self._write(conn, data, request, write_seconds)
        if chunked:
            await self._write(conn, b"0\r\n\r\n", request, write_seconds)

    @staticmethod
    async def _write(
        conn: _Connection, data: bytes, request: httpx.Request, write_seconds: float | None
    ) -> None:
        transport = conn.transport
        if conn.lost or transport is None or transport.is_closing():
            raise _failure(conn, request, _DISCONNECTED)
        transport.write(data)
        if conn.write_paused and not await conn.drain(write_seconds):
            raise httpx.WriteTimeout("timed out sending the request", request=request)

    def release(self, conn: _Connection) -> None:
        """The response was read to its end: keep the connection for the next, or close it."""
        key = conn.key
        if (
            not self._keep_alive
            or self._closed
            or not conn.keep_alive
            or conn.lost
            or conn.peer_closed
        ):
            self._discard(conn)
            return
        now = asyncio.get_running_loop().time()
        if self._closes_idle and now < self._closes_idle.get(key, 0.0):
            self._discard(conn)
            return
        conn.expires_at = now + min(self._idle_seconds, conn.keep_alive_seconds - 1)
        conn.idle(now)
        idle = self._idle.setdefault(key, [])
        # Oldest first: drop the ones past their time, and the oldest beyond the limit.
        while idle and (idle[0].expires_at <= now or len(idle) >= self._max_idle):
            self._discard(idle.pop(0))
        idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.abort()
        conn.unlink()
        self._open.discard(conn)

    async def aclose(self) -> None:
        """Close every connection, idle or busy."""
        self._closed = True
        conns, self._open = self._open, set()
        self._idle.clear()
        for conn in conns:
            conn.abort()
        if conns:
            # asyncio closes the socket on its next pass: let it, so none outlives the call.
            await asyncio.sleep(0)


def _keep_alive_timeout(value: bytes) -> float:
    for part in value.split(b","):
        name, _, number = part.strip().partition(b"=")
        if name.strip().lower() == b"timeout":
            with contextlib.suppress(ValueError):
                return float(number.strip())
    return math.inf


def _describe(exc: OSError) -> str:
    return str(exc) or type(exc).__name__


def _failure(conn: _Connection, request: httpx.Request, disconnected: str) -> httpx.HTTPError:
    """The httpx exception for an exchange that cannot go on, its cause chained."""
    if conn.failed is not None or conn.spoke_first:
        error: httpx.HTTPError = httpx.RemoteProtocolError(_INVALID, request=request)
        error.__cause__ = conn.failed
        return error
    if conn.error is not None:
        error = httpx.ReadError(str(conn.error) or type(conn.error).__name__, request=request)
        error.__cause__ = conn.error
        return error
    return httpx.RemoteProtocolError(disconnected, request=request)


@dataclass(slots=True, eq=False)
class _Body(httpx.AsyncByteStream):
    """A response's body as it arrives; closing it early closes the connection."""

    _transport: ProbeTransport
    _conn: _Connection
    _request: httpx.Request
    _timeout: float | None
    _done: bool = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        try:
            while True:
                if conn.has_body_bytes:
                    return conn.take()
                if conn.complete:
                    raise StopAsyncIteration
                if self._done:
                    raise httpx.StreamClosed()
                if conn.failed is not None or conn.lost or conn.peer_closed:
                    raise _failure(conn, self._request, _DISCONNECTED_EARLY)
                if not await conn.wait(self._timeout):
                    raise httpx.ReadTimeout("timed out reading the response", request=self._request)
        except StopAsyncIteration:
            raise
        except BaseException:
            self._close_now()
            raise

    def _close_now(self) -> None:
        if not self._done:
            self._done = True
            self._transport._discard(self._conn)

    async def aclose(self) -> None:
        if self._done:
            return
        conn = self._conn
        self._done = True
        if conn.complete and not conn.has_body_bytes:
            self._transport.release(conn)
            return
        # Closed before the end (a capped read): the rest is never read, the connection goes.
        self._transport._discard(conn)
        await asyncio.sleep(0)  # asyncio closes the socket on its next pass
