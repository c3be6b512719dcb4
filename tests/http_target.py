"""Real local targets whose behaviour each test controls: an HTTP/1.1 server, TLS, raw TCP.

The servers run on their own asyncio loop in a daemon thread, so one instance serves a whole
session while every test keeps its own event loop. A test tells the server what to do with
``target.route(path, Reply(...))`` (or ``target.default = Reply(...)``) and reads back what
happened from ``target.requests`` and ``target.connections``; the per-test fixture resets both
and releases anything still hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import subprocess
import threading
import zlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.daemon import free_port
from tests.serving import closed_after, reset_per_test

__all__ = [
    "GARBAGE",
    "Certificate",
    "GarbageServer",
    "GarbageVariant",
    "HttpTarget",
    "RecordedRequest",
    "Reply",
    "TcpListener",
    "TcpTarget",
    "closed_port",
    "compress",
    "garbage_server",
    "http_target",
    "http_target_server",
    "https_target",
    "https_target_server",
    "tcp_listener",
    "tcp_listener_server",
    "tcp_target",
    "tls_certificate",
    "unresponsive_port",
]

#: What the server does once it has read a request.
Action = Literal[
    "respond",  # status, headers and body (after ``delay_seconds``)
    "hang",  # read the request, then say nothing until the test ends
    "reset",  # abort with SO_LINGER 0, so the client gets a TCP RST
    "close",  # close cleanly without answering
    "garbage",  # bytes that are not HTTP, then close
    "endless",  # a chunked body that never ends
    "trickle",  # the body one byte per ``trickle_interval_seconds``
    "reset_mid_body",  # headers and half the body, then a TCP RST
    "close_mid_body",  # headers and half the body, then a clean close (short of Content-Length)
    "echo",  # the request (method, path, headers, body) as JSON, its headers also as X-Echo-*
]

_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Reply:
    """What the target answers to one request.

    ``body_size`` streams that many filler bytes instead of ``body`` (with a Content-Length),
    so a test can ask for 50 MB without building it in memory.
    """

    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    action: Action = "respond"
    delay_seconds: float = 0.0
    body_size: int | None = None
    trickle_interval_seconds: float = 0.2
    garbage: bytes = b"\x00\x01\x02 this is not HTTP at all \xff\xfe\r\n\r\n"

    @classmethod
    def json(cls, text: str, status: int = 200) -> Reply:
        """A JSON body with the right content type."""
        return cls(status=status, body=text.encode(), headers={"Content-Type": "application/json"})

    @classmethod
    def encoded(cls, text: str, coding: str, status: int = 200) -> Reply:
        """A JSON body compressed with ``coding`` (``gzip``, ``deflate`` for zlib-wrapped,
        ``raw-deflate`` labelled ``deflate``, or a list such as ``"gzip, gzip"``, applied in
        order), whatever the client asked for: the server ignores ``Accept-Encoding``."""
        body = text.encode()
        labels = []
        for name in (part.strip() for part in coding.split(",")):
            body = compress(body, name)
            labels.append("deflate" if name == "raw-deflate" else name)
        headers = {"Content-Type": "application/json", "Content-Encoding": ", ".join(labels)}
        return cls(status=status, body=body, headers=headers)

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Reply:
        """A redirect to ``location``."""
        return cls(status=status, body=b"", headers={"Location": location})


def compress(data: bytes, coding: str) -> bytes:
    """``data`` in one content coding: ``gzip``/``x-gzip``, ``deflate`` (zlib-wrapped, as the
    RFC says) or ``raw-deflate`` (what some servers send as ``deflate``)."""
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15, "raw-deflate": -15}[coding]
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server read it; header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int


class _LoopThread:
    """An asyncio loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_seconds: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_seconds)

    def stop(self, server: asyncio.Server) -> None:
        """Close ``server`` (on the loop, where it lives), cancel what still runs (handlers of
        hung requests), then stop and close the loop."""

        async def close_server() -> None:
            server.close()

        self.run(close_server())

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class HttpTarget:
    """A real HTTP/1.1 server on 127.0.0.1, port chosen by the kernel, optionally over TLS."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._thread = _LoopThread()
        self._server: asyncio.Server = self._thread.run(self._start())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.default = Reply()
        self._routes: dict[str, Reply] = {}
        self._requests: list[RecordedRequest] = []
        self._connections = 0
        self._open_connections = 0
        self._idle = threading.Condition(self._lock)
        self._body_bytes_sent = 0
        self._release = self._thread.run(self._new_event())
        self._writers: set[asyncio.StreamWriter] = set()

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl_context)

    @staticmethod
    async def _new_event() -> asyncio.Event:
        return asyncio.Event()

    # --- the test's side --------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        """``http`` or ``https``."""
        return "https" if self._ssl_context else "http"

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        """The URL of ``path`` on this server."""
        return f"{self.scheme}://{host}:{self.port}{path}"

    def route(self, path: str, reply: Reply) -> None:
        """Answer requests for ``path`` (query excluded) with ``reply``."""
        with self._lock:
            self._routes[path] = reply

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request read since the last reset."""
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> int:
        """How many connections were accepted since the last reset."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """Connections the server is still serving (kept alive, or mid-request)."""
        with self._lock:
            return self._open_connections

    @property
    def body_bytes_sent(self) -> int:
        """Filler body bytes the server managed to write since the last reset."""
        with self._lock:
            return self._body_bytes_sent

    def wait_until_idle(self, timeout_seconds: float = 2.0) -> bool:
        """Wait until the server has finished with every connection; ``False`` on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._open_connections == 0, timeout_seconds)

    def reset(self) -> None:
        """Forget routes and counts, release hung handlers and drop kept-alive connections."""

        def release() -> None:
            self._release.set()
            self._release = asyncio.Event()
            for writer in list(self._writers):
                writer.transport.abort()

        self._thread.run(self._call(release))
        # Let released handlers finish, so counts start from a quiet server.
        self.wait_until_idle()
        with self._lock:
            self.default = Reply()
            self._routes.clear()
            self._requests.clear()
            self._connections = 0
            self._body_bytes_sent = 0

    @staticmethod
    async def _call(fn: Callable[[], None]) -> None:
        fn()

    def close(self) -> None:
        """Stop serving and end the loop thread."""
        self.reset()
        self._thread.stop(self._server)

    # --- the server's side ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._connections += 1
            self._open_connections += 1
            number = self._connections
        self._writers.add(writer)
        release = self._release
        try:
            while True:
                request = await _read_request(reader, number)
                if request is None:
                    return
                with self._lock:
                    self._requests.append(request)
                    reply = self._routes.get(request.path.split("?", 1)[0], self.default)
                keep_alive = await self._act(reply, request, writer, release)
                if not keep_alive:
                    return
        except _NotHttp:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()
            with self._lock:
                self._open_connections -= 1
                self._idle.notify_all()

    async def _act(
        self,
        reply: Reply,
        request: RecordedRequest,
        writer: asyncio.StreamWriter,
        release: asyncio.Event,
    ) -> bool:
        if reply.delay_seconds and await _wait(release, reply.delay_seconds):
            return False
        if reply.action == "hang":
            await release.wait()
            return False
        if reply.action == "echo":
            reply = _echo(reply, request)
        if reply.action == "reset":
            _abort_with_rst(writer)
            return False
        if reply.action == "close":
            writer.close()
            return False
        if reply.action == "garbage":
            writer.write(reply.garbage)
            await writer.drain()
            writer.close()
            return False
        head = [f"HTTP/1.1 {reply.status} Reason"]
        headers = {k.lower(): v for k, v in reply.headers.items()}
        if reply.action == "endless":
            headers["transfer-encoding"] = "chunked"
        else:
            size = reply.body_size if reply.body_size is not None else len(reply.body)
            headers.setdefault("content-length", str(size))
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if request.method == "HEAD":
            await writer.drain()
            return True
        if reply.action == "endless":
            chunk = b"%x\r\n" % _CHUNK_BYTES + b"x" * _CHUNK_BYTES + b"\r\n"
            while True:
                writer.write(chunk)
                await writer.drain()
                self._count_sent(_CHUNK_BYTES)
        elif reply.action in ("reset_mid_body", "close_mid_body"):
            writer.write(reply.body[: len(reply.body) // 2])
            await writer.drain()
            if reply.action == "reset_mid_body":
                _abort_with_rst(writer)
            else:
                writer.close()
            return False
        elif reply.action == "trickle":
            for byte in reply.body:
                writer.write(bytes([byte]))
                await writer.drain()
                if await _wait(release, reply.trickle_interval_seconds):
                    return False
        elif reply.body_size is not None:
            remaining = reply.body_size
            filler = b"x" * _CHUNK_BYTES
            while remaining > 0:
                piece = filler[: min(remaining, _CHUNK_BYTES)]
                writer.write(piece)
                await writer.drain()
                remaining -= len(piece)
                self._count_sent(len(piece))
        else:
            writer.write(reply.body)
        await writer.drain()
        return request.headers.get("connection", "").lower() != "close"

    def _count_sent(self, size: int) -> None:
        with self._lock:
            self._body_bytes_sent += size


def _echo(reply: Reply, request: RecordedRequest) -> Reply:
    """``reply`` carrying back everything ``request`` sent, as a hostile target would."""
    seen = {
        "method": request.method,
        "path": request.path,
        "headers": request.headers,
        "body": request.body.decode("utf-8", "replace"),
    }
    echoed = {f"X-Echo-{name}": value for name, value in request.headers.items()}
    headers = {"Content-Type": "application/json", **echoed, **reply.headers}
    return Reply(status=reply.status, body=json.dumps(seen).encode(), headers=headers)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; ``True`` if the test released the server meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    # A zero linger time turns close() into an RST instead of a FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _NotHttp(ValueError):
    """The client did not speak HTTP (a TLS hello on the plain port, say)."""


async def _read_request(reader: asyncio.StreamReader, connection: int) -> RecordedRequest | None:
    first = await reader.read(1)
    if not first:
        return None
    if not first.isalpha():
        # Answer at once, as nginx does, instead of waiting for a line end that may never come.
        raise _NotHttp
    line = first + await reader.readline()
    method, path, _version = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if length := int(headers.get("content-length", "0")):
        body = await reader.readexactly(length)
    return RecordedRequest(method, path, headers, body, connection)


# --- TLS material ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for ``localhost`` and ``127.0.0.1``; it is its own CA."""

    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_certificate(directory: Path) -> Certificate:
    """Generate a certificate with the ``openssl`` CLI (EC keys: fast to make)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return Certificate(cert, key)


# --- raw TCP ----------------------------------------------------------------------------------


class TcpListener:
    """A TCP listener on 127.0.0.1 that accepts, counts and (by default) closes at once.

    With ``silent = True`` it keeps connections open and says nothing, like a stuck server.
    """

    def __init__(self) -> None:
        self._thread = _LoopThread()
        self._lock = threading.Lock()
        self._server: asyncio.Server = self._thread.run(self._start())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.silent = False
        self._connections = 0
        self._accepted = threading.Condition(self._lock)
        self._held: list[asyncio.StreamWriter] = []

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._connections += 1
            silent = self.silent
            self._accepted.notify_all()
        if silent:
            self._held.append(writer)
        else:
            writer.close()

    @property
    def connections(self) -> int:
        """Connections accepted since the last reset."""
        with self._lock:
            return self._connections

    def wait_for_connections(self, count: int, timeout_seconds: float = 2.0) -> int:
        """Wait until ``count`` connections were accepted (the client may finish first)."""
        with self._accepted:
            self._accepted.wait_for(lambda: self._connections >= count, timeout_seconds)
            return self._connections

    def reset(self) -> None:
        """Close held connections and zero the count."""

        async def drop() -> None:
            for writer in self._held:
                writer.transport.abort()
            self._held.clear()

        self._thread.run(drop())
        with self._lock:
            self._connections = 0
            self.silent = False

    def close(self) -> None:
        """Stop listening and end the loop thread."""
        self.reset()
        self._thread.stop(self._server)


class TcpTarget:
    """A TCP service on a fixed loopback port that accepts and closes; stop it, start it again.

    Unlike ``TcpListener`` it keeps its port across a stop, so a check's address stays valid
    while the target is down.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Listen (again) on the same port."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._thread.start()

    @staticmethod
    def _accept(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    def stop(self) -> None:
        """Stop listening: connections are refused from now on."""
        if self._sock is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None

    def __enter__(self) -> TcpTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens: bound (so nobody else takes it), not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def unresponsive_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept queue is full, so a new connect hangs (SYN dropped).

    Listening with a backlog of 0 admits one queued connection; this fixture makes it, and
    never accepts. It is how a stuck or overloaded host looks to a client: no refusal, no
    answer.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        yield port
    finally:
        filler.close()
        listener.close()


# --- garbage -----------------------------------------------------------------------------------

#: Bytes that are no protocol at all: not HTTP, not RESP, not PostgreSQL, not TLS. Binary,
#: with a line end and a blank line, so that no parser is left waiting for one.
GARBAGE = b"\x00\x01\x02 this is no protocol \xff\xfe\x1b[31m\r\n\r\n"

#: How a garbage server treats each connection.
GarbageVariant = Literal[
    "close",  # send the garbage at once, then close
    "keep_open",  # send the garbage at once, then keep the connection open and say nothing
    "after_request",  # read what the client sends first, then answer with garbage and close
]


class GarbageServer:
    """A TCP server on 127.0.0.1 that answers every connection with fixed garbage bytes.

    ``variant`` says when it speaks and whether it hangs up (see ``GarbageVariant``). It closes
    with a FIN after the garbage, never a reset, so the client always gets the bytes: the code
    a probe reports must come from what it read, not from a race with the close.
    """

    def __init__(self, garbage: bytes = GARBAGE) -> None:
        self.garbage = garbage
        self.variant: GarbageVariant = "close"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._connections = 0
        self._thread = threading.Thread(target=self._accept_forever, daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Connections accepted since the last reset."""
        with self._lock:
            return self._connections

    def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._connections += 1
                variant = self.variant
            threading.Thread(target=self._answer, args=(conn, variant), daemon=True).start()

    def _answer(self, conn: socket.socket, variant: GarbageVariant) -> None:
        try:
            conn.settimeout(5)
            if variant == "after_request":
                conn.recv(65536)
            conn.sendall(self.garbage)
            if variant == "keep_open":
                with self._lock:
                    self._held.append(conn)
                return
            conn.shutdown(socket.SHUT_WR)
            # Read until the client hangs up: closing with its bytes unread would be a reset.
            while conn.recv(65536):
                pass
        except OSError:
            pass
        if variant != "keep_open":
            conn.close()

    def reset(self) -> None:
        """Close held connections, zero the count, back to ``close``."""
        with self._lock:
            held, self._held = self._held, []
            self._connections = 0
            self.variant = "close"
        for conn in held:
            conn.close()

    def close(self) -> None:
        """Stop listening and close everything."""
        self.reset()
        self._listener.close()


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def garbage_server() -> Iterator[GarbageServer]:
    """A fresh garbage server per test (``GARBAGE``, variant ``close``)."""
    yield from closed_after(GarbageServer())


@pytest.fixture(scope="session")
def http_target_server() -> Iterator[HttpTarget]:
    """One plain HTTP target for the whole session; use ``http_target`` in tests."""
    yield from closed_after(HttpTarget())


http_target = reset_per_test(
    "http_target_server", "The session's HTTP target, reset before and after the test."
)


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for localhost/127.0.0.1, made once per session."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def https_target_server(tls_certificate: Certificate) -> Iterator[HttpTarget]:
    """One HTTPS target presenting ``tls_certificate``; use ``https_target`` in tests."""
    yield from closed_after(HttpTarget(tls_certificate.server_context()))


https_target = reset_per_test(
    "https_target_server", "The session's HTTPS target, reset before and after the test."
)


@pytest.fixture(scope="session")
def tcp_listener_server() -> Iterator[TcpListener]:
    """One TCP listener for the whole session; use ``tcp_listener`` in tests."""
    yield from closed_after(TcpListener())


tcp_listener = reset_per_test(
    "tcp_listener_server", "The session's TCP listener, reset before and after the test."
)


@pytest.fixture
def tcp_target() -> Iterator[TcpTarget]:
    """A fresh ``TcpTarget`` per test (a test stops and starts it), stopped afterwards."""
    target = TcpTarget()
    yield target
    target.stop()
