"""A small HTTP/1.1 server on its own thread and asyncio loop, hardened against its clients.

The metrics server and the heartbeat push listener are both one of these: a subclass names
itself and answers requests (``_answer``); the connection handling lives here once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11

from healthd.log_routing import OncePerKind

#: accept() errors that mean healthd is out of descriptors or memory.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long accepting pauses after such an error, instead of spinning on it.
_ACCEPT_PAUSE_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: its status, body and type, extra headers; ``head`` leaves the body out
    (an answer to HEAD keeps the length of the body it does not send)."""

    code: int
    body: bytes
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    head: bool = False


@dataclass(frozen=True)
class ListenerLimits:
    """What one client may cost a listener: connections held, time to send a request or read
    an answer, and the size of a request's head and body (0: a body is never read)."""

    max_connections: int = 64
    idle_timeout_seconds: float = 5.0
    write_timeout_seconds: float = 10.0
    max_head_bytes: int = 8192
    max_body_bytes: int = 0


DEFAULT_LIMITS = ListenerLimits()


class HttpListener:
    """Answers HTTP requests from one thread running its own asyncio event loop.

    Binding happens in the constructor, so a busy address fails fast, before any check runs.
    A hostile or careless client can cost healthd little (``ListenerLimits``): at most
    ``max_connections`` are held (a new one evicts the one that has waited longest for a
    request, or is closed at once when every slot is busy answering), a connection that has
    not sent a complete request (head, and body where bodies are read) within
    ``idle_timeout_seconds`` of opening or of its previous answer is closed (idle keep-alive
    and slowloris alike), a head longer than ``max_head_bytes`` is refused, and an answer not
    read within ``write_timeout_seconds`` is dropped. HTTP/1.1 connections are kept alive
    between requests; HTTP/1.0 ones are closed after the answer.

    With ``max_body_bytes`` 0, a request body is never read: the request is answered, then the
    connection closed. Otherwise bodies up to that size are read and handed to ``_answer``; a
    larger one is refused with 413 and the connection closed. A subclass answers in
    ``_answer``, which returns a ``Reply``.

    :param host: an IPv4 or IPv6 address or a name; ``[::1]`` is accepted too.
    :param port: the port; 0 picks a free one (see ``address``).
    :param name: names the thread (``healthd-NAME``) and the log lines.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        name: str,
        logger: logging.Logger,
        limits: ListenerLimits = DEFAULT_LIMITS,
    ) -> None:
        self._name = name
        self._log = logger
        self._limits = limits
        self._connections: dict[int, _Connection] = {}
        # Those waiting for a request head, longest-waiting first: the next to evict.
        self._waiting: dict[int, _Connection] = {}
        self._once = OncePerKind(logger)
        self._socket = _listen(host, port)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_exception)
        self._thread = threading.Thread(target=self._serve, name=f"healthd-{name}", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The host and port actually bound (useful when the port was 0)."""
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def connections(self) -> int:
        """How many client connections are open right now."""
        return len(self._connections)

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def stop(self) -> None:
        """Stop answering, close every connection and the listening socket."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()
        self._socket.close()

    def _answer(self, request: h11.Request, body: bytes) -> Reply:
        """The answer to one request; runs on the server's thread, never on healthd's loop."""
        raise NotImplementedError

    # --- the event loop of the server thread ---------------------------------------------------

    def _serve(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.add_reader(self._socket, self._accept)
            loop.run_forever()
            loop.remove_reader(self._socket)
            for connection in list(self._connections.values()):
                self._drop(connection)
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        except Exception:
            self._log.exception("the %s server stopped on an unexpected error", self._name)
        finally:
            loop.close()

    def _accept(self) -> None:
        """Accept what is queued, cheaply: a flood of thousands must drain in milliseconds,
        because a scrape queued behind it waits for that. A connection that has sent nothing
        yet is only watched for data (no transport, no task); one whose whole request head has
        already arrived is marked busy at once, so the rest of the batch cannot evict it."""
        loop = self._loop
        for _ in range(self._limits.max_connections):
            try:
                sock, _ = self._socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    self._log_once("accept", f"{self._name} server cannot accept: %s", exc.strerror)
                    loop.remove_reader(self._socket)
                    loop.call_later(_ACCEPT_PAUSE_SECONDS, self._resume_accepting)
                    return
                continue  # the client gave up while queued (ECONNABORTED and the like)
            sock.setblocking(False)
            try:
                first = sock.recv(self._limits.max_head_bytes + 1)
            except BlockingIOError:
                first = b""
            except OSError:
                sock.close()
                continue
            if len(self._connections) >= self._limits.max_connections and not self._evict_one():
                sock.close()
                continue
            connection = _Connection(sock, loop.time())
            self._connections[connection.key] = connection
            if b"\r\n\r\n" not in first:
                self._waiting[connection.key] = connection
            if first:
                self._activate(connection, first)
            else:
                # By descriptor number: given the socket, asyncio formats its repr each time.
                loop.add_reader(connection.key, self._readable, connection)
                connection.timer = loop.call_at(
                    connection.waiting_since + self._limits.idle_timeout_seconds,
                    self._drop,
                    connection,
                )

    def _readable(self, connection: _Connection) -> None:
        """The first bytes of a connection accepted before it sent any."""
        self._loop.remove_reader(connection.key)
        if connection.timer is not None:
            connection.timer.cancel()
        try:
            data = connection.sock.recv(self._limits.max_head_bytes + 1)
        except OSError:
            data = b""
        if not data:
            self._drop(connection)
            return
        if b"\r\n\r\n" in data:
            self._unwait(connection)
        self._activate(connection, data)

    def _activate(self, connection: _Connection, first: bytes) -> None:
        connection.task = self._loop.create_task(self._connection(connection, first))

    def _unwait(self, connection: _Connection) -> None:
        # By identity: a closed connection's descriptor number may already be another's.
        if self._waiting.get(connection.key) is connection:
            del self._waiting[connection.key]

    def _drop(self, connection: _Connection) -> None:
        connection.close(self._loop)
        self._unwait(connection)
        if self._connections.get(connection.key) is connection:
            del self._connections[connection.key]

    def _resume_accepting(self) -> None:
        if self._socket.fileno() != -1:
            self._loop.add_reader(self._socket, self._accept)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio's own reports (an accept that failed for lack of descriptors, say): once each.
        exc = context.get("exception")
        kind = type(exc).__name__ if exc is not None else str(context.get("message"))
        self._log_once(kind, f"{self._name} server: %s", context.get("message", "error"), exc=exc)

    def _log_once(
        self, kind: str, message: str, *args: object, exc: BaseException | None = None
    ) -> None:
        exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        self._once.error(kind, message, *args, exc_info=exc_info)

    async def _connection(self, connection: _Connection, first: bytes) -> None:
        try:
            if connection.closed:
                return
            reader, writer = await asyncio.open_connection(sock=connection.sock, limit=2**16)
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            connection.transport = transport
            if connection.closed:  # evicted while the transport was made
                return
            await self._converse(connection, first, reader, writer)
            # Flush what is buffered, within the write timeout.
            writer.close()
            async with asyncio.timeout(self._limits.write_timeout_seconds):
                await writer.wait_closed()
        except (OSError, TimeoutError, h11.ProtocolError):
            # Hang-ups, resets, timeouts and garbage are the client's business: it is closed.
            pass
        except Exception as exc:
            self._log_once(type(exc).__name__, f"{self._name} connection failed", exc=exc)
        finally:
            self._drop(connection)
            # Evicted while the transport was made, the drop found no transport to abort.
            if connection.transport is not None:
                connection.transport.abort()
            else:
                connection.sock.close()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        if not self._waiting:
            return False
        # Its reader, if it has one, sees end-of-file, so its task ends at once.
        self._drop(next(iter(self._waiting.values())))
        return True

    async def _converse(
        self,
        connection: _Connection,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_head_bytes)
        if first:  # (an empty one would tell h11 the client has closed)
            http.receive_data(first)
        while True:
            try:
                request = await self._request(http, reader, connection.waiting_since)
                self._unwait(connection)
                if request is None:
                    return
                if self._limits.max_body_bytes:
                    body = await self._body(http, request, reader, connection.waiting_since)
                else:
                    body = b""
            except h11.RemoteProtocolError as exc:
                self._unwait(connection)
                # A head too long, or not HTTP: say so (400), then close.
                if http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    code = exc.error_status_hint
                    await self._send(http, writer, code, b"bad request\n", "text/plain")
                return
            if body is None:
                # Too large: refused unread, and the connection closed after the answer.
                await self._send(
                    http, writer, 413, b"request body too large\n", "text/plain",
                    [("Connection", "close")],
                )  # fmt: skip
                return
            # Where bodies are not read, a request with one is answered, then closed.
            close = not self._limits.max_body_bytes and not isinstance(
                http.next_event(), h11.EndOfMessage
            )
            reply = self._answer(request, body)
            headers = [*reply.headers, ("Connection", "close")] if close else list(reply.headers)
            await self._send(
                http, writer, reply.code, reply.body, reply.content_type, headers, head=reply.head
            )
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return
            http.start_next_cycle()
            connection.waiting_since = asyncio.get_running_loop().time()
            self._waiting[connection.key] = connection

    async def _request(
        self, http: h11.Connection, reader: asyncio.StreamReader, since: float
    ) -> h11.Request | None:
        """The next request head, or ``None`` when the client closed; it must be complete
        within the idle timeout from ``since`` (loop time): idle and slowloris alike."""
        async with asyncio.timeout_at(since + self._limits.idle_timeout_seconds):
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await reader.read(2**16))
                    continue
                if isinstance(event, h11.Request):
                    return event
                return None  # ConnectionClosed, or the peer's half of a pipelined close

    async def _body(
        self, http: h11.Connection, request: h11.Request, reader: asyncio.StreamReader, since: float
    ) -> bytes | None:
        """The request's body, complete within the idle timeout from ``since``; ``None`` when
        it is larger than ``max_body_bytes`` (a declared length too large is not read)."""
        declared = request_header(request, b"content-length")
        if (
            declared.isascii()
            and declared.isdigit()
            and int(declared) > self._limits.max_body_bytes
        ):
            return None
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout_at(since + self._limits.idle_timeout_seconds):
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await reader.read(2**16))
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self._limits.max_body_bytes:
                        return None
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                else:
                    raise h11.RemoteProtocolError("the client closed mid-body")

    async def _send(
        self,
        http: h11.Connection,
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        content_type: str,
        extra: list[tuple[str, str]] | None = None,
        *,
        head: bool = False,
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        response = h11.Response(
            status_code=code,
            headers=[*headers, *(extra or [])],
            reason=HTTPStatus(code).phrase.encode(),
        )
        writer.write(http.send(response) or b"")
        if not head:
            # Passed through, not joined: no copy of a large exposition.
            writer.writelines(http.send_with_data_passthrough(h11.Data(data=body)) or [])
        writer.write(http.send(h11.EndOfMessage()) or b"")
        async with asyncio.timeout(self._limits.write_timeout_seconds):
            await writer.drain()


class _Connection:
    """One client connection: its socket, then its task and transport once it has sent
    something, and whether it waits for a request and since when (loop time)."""

    __slots__ = ("closed", "key", "sock", "task", "timer", "transport", "waiting_since")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.key = sock.fileno()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.waiting_since = now
        self.closed = False

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop the connection at once (a task that has no transport yet closes the socket)."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.abort()
        elif self.task is None:
            loop.remove_reader(self.key)
            self.sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (IPv4, IPv6 or a name) and ``port``."""
    host = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # A long queue costs no descriptors, and a flood that fills a short one makes the
        # kernel drop a scraper's SYN: a retry one second later.
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def request_header(request: h11.Request, name: bytes) -> str:
    """Every value of header ``name`` (lower case), joined by commas."""
    return ",".join(v.decode("latin-1") for k, v in request.headers if k == name)
