"""The ``http`` probe: one request, its status, latency and (capped) body.

Each check holds one ``ProbeClient``: its requests, built once, and an ``httpx.AsyncClient``
shared with every check of the same settings, over healthd's own transport
(``_transport.ProbeTransport``: asyncio and llhttp, one connection per request in flight).
Clients are built once, with a shared ``SSLContext``, because building one costs about 21 ms
of CPU (docs/performance.md, "Client library costs").
"""

from __future__ import annotations

import json as jsonlib
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from healthd.config import HttpCheck, ServiceCheckBase
from healthd.findings import OK, failed, format_seconds, judge_conditions
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes._context import Lease, ProbeContext
from healthd.probes._errors import CLIENT_TIMEOUT_SHARE, network_failure
from healthd.probes._transport import KEEPALIVE_IDLE_SECONDS, ProbeTransport
from healthd.quoting import quote
from healthd.secrets import Redactor, collect_secrets

#: httpx's per-phase timeouts (connect, each read, ...) are this share of the check's timeout,
#: so that the library reports which phase timed out before any deadline cancels the probe.
PHASE_TIMEOUT_SHARE = 0.85
#: httpx's timeouts bound each read, not the whole exchange, so a target trickling one byte at
#: a time would never time out. One deadline for the whole request (``CLIENT_TIMEOUT_SHARE`` of
#: the check's timeout, as every kind's own deadline), between the per-phase deadlines and the
#: scheduler's, catches that and still names it as a timeout. The gap to the scheduler's
#: deadline leaves room for building the client (SSL context) on the first run.
TOTAL_TIMEOUT_SHARE = CLIENT_TIMEOUT_SHARE


def build_client(
    ctx: ProbeContext,
    *,
    timeout_seconds: float,
    interval_seconds: float | None = None,
    tls_verify: bool = True,
    ca_file: Any = None,
    follow_redirects: bool = True,
    max_redirects: int = 5,
    headers: dict[str, str] | None = None,
) -> ProbeClient:
    """A client for one check: explicit timeouts, no proxies from the environment.

    Checks with the same settings share one ``httpx.AsyncClient`` over healthd's own transport
    (``SharedResources.lease``); each check keeps its own prepared requests. A check whose
    ``interval_seconds`` is shorter than ``KEEPALIVE_IDLE_SECONDS`` keeps its connection alive
    between runs; the others connect per probe, so that 10,000 checks at 60 s do not hold
    10,000 idle sockets.
    """
    keep_alive = interval_seconds is None or interval_seconds < KEEPALIVE_IDLE_SECONDS
    header_items = tuple(sorted((headers or {}).items()))
    key = (
        "http-client",
        tls_verify,
        ca_file,
        timeout_seconds,
        follow_redirects,
        max_redirects,
        header_items,
        keep_alive,
    )

    def create() -> tuple[httpx.AsyncClient, ProbeTransport]:
        transport = ProbeTransport(
            lambda: ctx.shared.ssl_context(verify=tls_verify, ca_file=ca_file),
            keep_alive=keep_alive,
        )
        client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_seconds * PHASE_TIMEOUT_SHARE),
            follow_redirects=follow_redirects,
            max_redirects=max_redirects,
            # Ask for the body as is: we cap and judge raw bytes, and a compressed body would
            # both fail every condition and let a small read expand into a huge one.
            headers={"Accept-Encoding": "identity", **(headers or {})},
            # A health check must see the target itself, not a proxy named by the environment.
            trust_env=False,
            event_hooks={"request": [_keep_headers_home(list(headers or {}))]},
        )
        return client, transport

    (client, transport), lease = ctx.shared.lease(key, create, _close_client)
    return ProbeClient(client, transport, lease, keep_requests=keep_alive)


async def _close_client(pair: tuple[httpx.AsyncClient, ProbeTransport]) -> None:
    await pair[0].aclose()


def check_client(
    ctx: ProbeContext,
    check: HttpCheck | ServiceCheckBase,
    *,
    extra_headers: Mapping[str, str] | None = None,
    follow_redirects: bool = True,
    max_redirects: int = 5,
) -> ProbeClient:
    """The check's long-lived client, kept in ``ctx``: built on the first run with the check's
    timeouts, TLS settings and ``headers`` (then ``extra_headers``), closed with the check."""

    def create() -> ProbeClient:
        headers = {name: value.reveal() for name, value in check.headers.items()}
        headers.update(extra_headers or {})
        return build_client(
            ctx,
            timeout_seconds=check.timeout_seconds,
            interval_seconds=check.interval_seconds,
            tls_verify=check.tls_verify,
            ca_file=check.ca_file,
            follow_redirects=follow_redirects,
            max_redirects=max_redirects,
            headers=headers,
        )

    return ctx.get("client", create, ProbeClient.aclose)


class ProbeClient:
    """One check's view of a shared ``httpx.AsyncClient``, and the requests it sends again and
    again.

    A check that runs often sends the same few requests on every run, so each is built once
    and, once it is known not to redirect, handed straight to the client's transport. Measured
    here with 100 checks in flight against nginx, when httpcore was the transport:
    ``client.stream()`` cost 626 us of CPU per request, the same request prebuilt and sent
    through the transport 437 us. Redirects, and the hook that keeps configured headers home,
    stay with the client: a request goes through ``client.send`` until it is known not to
    redirect, and again if it ever starts to. A check that runs rarely (``keep_requests``
    false) builds its request per run: a kept one costs ~2.7 KB, 26 MB at 10,000 checks.
    """

    #: Prepared requests kept per check; a preset sends at most a handful.
    _MAX_PREPARED = 32

    # One per check: slotted, it costs 0.1 KiB rather than 0.4 with an instance dict.
    __slots__ = ("_lease", "_plain_key", "_prepared", "_transport", "client")

    def __init__(
        self,
        client: httpx.AsyncClient,
        transport: httpx.AsyncBaseTransport,
        lease: Lease | None = None,
        *,
        keep_requests: bool = True,
    ) -> None:
        self.client = client
        self._transport = transport
        self._lease = lease
        # Only for a check that keeps its requests: most of a large fleet does not.
        self._prepared: dict[tuple[Any, ...], _Prepared] | None = {} if keep_requests else None
        #: Without kept requests: the last request known not to redirect, so that it goes
        #: straight to the transport too. Through ``client.send`` a response and its stream
        #: point at each other, about 35 objects per probe left to the garbage collector.
        self._plain_key: tuple[Any, ...] | None = None

    @property
    def timeout(self) -> httpx.Timeout:
        """The per-phase timeouts every request carries."""
        return self.client.timeout

    def prepare(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> _Prepared:
        """The request for these arguments, built on first use (or every time, for a check
        that does not keep its requests)."""
        key = (method, url, tuple(headers.items()) if headers else (), content, _json_key(json))
        kept = self._prepared
        if kept is None:
            request = self._build(method, url, headers, content, json)
            return _Prepared(request, False if key == self._plain_key else None, key)
        prepared = kept.get(key)
        if prepared is None:
            if len(kept) >= self._MAX_PREPARED:
                kept.clear()
            request = self._build(method, url, headers, content, json)
            prepared = kept[key] = _Prepared(request)
        return prepared

    def _build(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None,
        content: bytes | str | None,
        json: Any,
    ) -> httpx.Request:
        request = self.client.build_request(
            method, url, headers=headers, content=content, json=json
        )
        # Where the probe meant to go is the request's own URL: no second parsed copy.
        request.extensions[_HOME] = (request.url, list(headers or {}))
        return request

    async def send(self, prepared: _Prepared) -> httpx.Response:
        """Send a prepared request; the response streams and must be closed."""
        follow = self.client.follow_redirects
        if prepared.redirects is False or not follow:
            response = await self._transport.handle_async_request(prepared.request)
            if not (follow and response.has_redirect_location):
                return response
            # The target has started to redirect: let the client follow, from the start.
            await response.aclose()
        response = await self.client.send(prepared.request, stream=True)
        prepared.redirects = bool(response.history)
        if prepared.key is not None:
            self._plain_key = None if prepared.redirects else prepared.key
        return response

    async def aclose(self) -> None:
        """Give the shared client back; the last check to hold it closes it."""
        self._prepared = None if self._prepared is None else {}
        if self._lease is None:
            await self.client.aclose()
        else:
            await self._lease.give_back()


@dataclass(slots=True)
class _Prepared:
    request: httpx.Request
    #: Unknown until the request has been sent through the client once.
    redirects: bool | None = None
    #: For a request built per run: what identifies it to the next run.
    key: tuple[Any, ...] | None = None


def _json_key(value: Any) -> str | None:
    return None if value is None else jsonlib.dumps(value, sort_keys=True)


#: A request extension holding where the probe meant to go, and the names of its own headers.
_HOME = "healthd_home"


def _same_site(home: httpx.URL, url: httpx.URL) -> bool:
    # As httpx does for Authorization: same origin, or the same host upgraded to https.
    if home.host != url.host:
        return False
    if home.scheme == url.scheme:
        return home.port == url.port
    return home.scheme == "http" and url.scheme == "https" and url.port in (None, 443)


def _keep_headers_home(client_headers: list[str]) -> Callable[[httpx.Request], Awaitable[None]]:
    """A hook that drops configured headers from a redirect to another site.

    httpx only strips ``Authorization``; an API key in any other header would follow a
    redirect anywhere. Configured headers are meant for the configured target alone.
    """

    async def hook(request: httpx.Request) -> None:
        home = request.extensions.get(_HOME)
        if home is None or _same_site(home[0], request.url):
            return
        for name in (*client_headers, *home[1]):
            request.headers.pop(name, None)

    return hook


def target(method: str, url: str) -> str:
    """``GET /api/v1/health``: how reasons name a request, without host, query or secrets."""
    return f"{method} {urlsplit(url).path or '/'}"


async def request(
    client: ProbeClient,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    content: bytes | str | None = None,
    json: Any = None,
    max_body_bytes: int = 1 << 20,
    timeout_seconds: float | None = None,
    total_timeout_seconds: float | None = None,
    spent_seconds: float = 0.0,
    what: str | None = None,
) -> Observation:
    """Send one request and observe the answer.

    ``facts`` get ``http_status`` and ``body_bytes``; ``payload`` is the body, decoded (gzip,
    deflate) and at most ``max_body_bytes`` long, with ``facts["body_truncated"]`` set when
    there was more; ``facts["content_encoding"]`` names the codings that were undone.
    ``timeout_seconds`` is the check's configured timeout, which timeout reasons quote (by
    default derived from the client's). ``total_timeout_seconds`` bounds the whole exchange; by
    default it is derived from the client's timeout. ``spent_seconds`` is how much of it the
    caller already used (building the client, say). ``what`` names the request in reasons
    (default: ``target(method, url)``).
    """
    what = what or target(method, url)
    client_timeout = client.timeout.read or client.timeout.connect
    if timeout_seconds is None and client_timeout is not None:
        timeout_seconds = client_timeout / PHASE_TIMEOUT_SHARE
    limit_seconds = total_timeout_seconds
    if limit_seconds is None and timeout_seconds is not None:
        limit_seconds = timeout_seconds * TOTAL_TIMEOUT_SHARE
    started = time.perf_counter()
    remaining = None if limit_seconds is None else limit_seconds - spent_seconds
    with anyio.move_on_after(remaining) as deadline:
        prepared = client.prepare(method, url, headers=headers, content=content, json=json)
        try:
            response = await client.send(prepared)
            try:
                codings = _content_codings(response)
                body, truncated = await _read_capped(response, max_body_bytes, codings)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            failure = _failure(exc, what, timeout_seconds)
            return Observation(time.perf_counter() - started, failure=failure)
        except _BodyError as exc:
            failure = Failure("protocol_error", f"{what}: {exc}")
            return Observation(time.perf_counter() - started, failure=failure)
    latency = time.perf_counter() - started
    if deadline.cancelled_caught and limit_seconds is not None:
        message = f"{what}: timed out before the response was complete{_limit(timeout_seconds)}"
        return Observation(latency, failure=Failure("timeout", message))
    facts: dict[str, Any] = {"http_status": response.status_code, "body_bytes": len(body)}
    if truncated:
        facts["body_truncated"] = True
    if codings:
        facts["content_encoding"] = ", ".join(codings)
    if response.history:
        facts["redirects"] = len(response.history)
    return Observation(latency, facts=facts, payload=body)


def _limit(timeout_seconds: float | None) -> str:
    """`` (timeout 500 ms)``: the check's configured timeout, as reasons quote it."""
    return "" if timeout_seconds is None else f" (timeout {format_seconds(timeout_seconds)})"


# --- content codings ------------------------------------------------------------------------

#: Codings stacked deeper than this are refused: no server needs more, and each costs a window.
MAX_CONTENT_CODINGS = 3
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


class _BodyError(Exception):
    """The body is not what its headers say it is: ``protocol_error``, with this message."""


def _content_codings(response: httpx.Response) -> list[str]:
    """The response's content codings in the order they were applied; ``identity`` left out.

    healthd asks for ``identity``, but servers and proxies that ignore it answer with gzip
    anyway; a body judged as raw bytes would then fail every condition.
    """
    codings = [
        coding.strip().lower()
        for coding in response.headers.get_list("content-encoding", split_commas=True)
    ]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if len(codings) > MAX_CONTENT_CODINGS:
        raise _BodyError(f"body has {len(codings)} stacked content codings; healthd undoes 3")
    return codings


class _Decoder:
    """Undoes one content coding, incrementally, never producing more than it is asked for.

    ``gzip`` (and ``x-gzip``) may hold several members; ``deflate`` is zlib-wrapped as the RFC
    says, or raw as some servers send it, told apart by the zlib header. Any other coding has
    no decoder: its first byte is a ``_BodyError`` naming it.
    """

    __slots__ = ("_head", "_zlib", "coding", "started")

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.started = False
        self._head = b""
        self._zlib: Any = None
        if coding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(_GZIP_WBITS)

    def decode(self, data: bytes, max_length: int) -> bytes:
        """At most ``max_length`` (at least 1) bytes of output for ``data``; reaching it means
        the caller's cap was passed, and the rest of the input is never wanted."""
        if not data:
            return b""
        self.started = True
        if self._zlib is None:
            if self.coding != "deflate":
                raise _BodyError(
                    f"body uses content coding '{quote(self.coding, limit=40)}', "
                    "which healthd cannot decode"
                )
            self._head += data
            if len(self._head) < 2:
                return b""  # too little to tell zlib-wrapped from raw deflate
            data, self._head = self._head, b""
            cmf, flg = data[0], data[1]
            zlib_wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
            self._zlib = zlib.decompressobj(_ZLIB_WBITS if zlib_wrapped else _RAW_DEFLATE_WBITS)
        out: bytes = b""
        try:
            while True:
                out += self._zlib.decompress(data, max_length - len(out))
                if len(out) >= max_length or not self._zlib.eof:
                    return out
                data = self._zlib.unused_data
                if not data:
                    return out
                if self.coding == "deflate":
                    raise _BodyError("deflate body has data after its end")
                self._zlib = zlib.decompressobj(_GZIP_WBITS)  # the next gzip member
        except zlib.error:
            raise _BodyError(f"{self.coding} body is corrupt") from None

    def finish(self) -> None:
        """The body ended: it must have ended where the coded stream does."""
        if self.started and (self._zlib is None or not self._zlib.eof):
            raise _BodyError(f"{self.coding} body ends before its coded stream does")


async def _read_capped(
    response: httpx.Response, limit: int, codings: list[str]
) -> tuple[bytes, bool]:
    """The body, decoded, and whether it was cut at ``limit`` bytes.

    ``limit`` caps the raw bytes read and the output of every decoding stage, so a small gzip
    bomb costs no more memory than a plain body of ``limit`` bytes. Closing the stream early
    drops the connection: reading on would be an unbounded read.
    """
    decoders = [_Decoder(coding) for coding in reversed(codings)]
    produced = [0] * len(decoders)
    chunks: list[bytes] = []
    raw_size = 0
    async for chunk in response.aiter_raw():
        raw_size += len(chunk)
        over = raw_size > limit
        if over:
            chunk = chunk[: len(chunk) - (raw_size - limit)]
        for index, decoder in enumerate(decoders):
            chunk = decoder.decode(chunk, limit - produced[index] + 1)
            produced[index] += len(chunk)
            if produced[index] > limit:
                over = True
                chunk = chunk[: len(chunk) - (produced[index] - limit)]
                if index < len(decoders) - 1:
                    chunk = b""  # an inner stage past the cap: what follows is not wanted
                break
        chunks.append(chunk)
        if over:
            return b"".join(chunks)[:limit], True
    for decoder in decoders:
        decoder.finish()
    return b"".join(chunks), False


def _failure(exc: httpx.HTTPError, what: str, timeout_seconds: float | None) -> Failure:
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for the response",
            httpx.WriteTimeout: "sending the request",
            httpx.PoolTimeout: "waiting for a connection",
        }.get(type(exc), "")
        message = f"{what}: timed out {phase}".rstrip()
        return Failure("timeout", f"{message}{_limit(timeout_seconds)}")
    if isinstance(exc, httpx.TooManyRedirects):
        return Failure("redirect_loop", f"{what}: too many redirects")
    if isinstance(exc, httpx.RemoteProtocolError):
        if "without sending" in str(exc):
            return Failure("connection_closed", f"{what}: server closed the connection early")
        return Failure("protocol_error", f"{what}: invalid HTTP response")
    if isinstance(exc, httpx.LocalProtocolError):
        # h11 quotes the offending header value, which may be a secret: never pass it on.
        return Failure("invalid_request", f"{what}: request is not valid HTTP (check headers)")
    if isinstance(exc, httpx.DecodingError):
        return Failure("protocol_error", f"{what}: response could not be decoded")
    if isinstance(exc, httpx.TransportError):
        return network_failure(exc, what, timeout_seconds=timeout_seconds)
    return Failure("http_error", f"{what}: {type(exc).__name__}")


def status_finding(
    what: str, observation: Observation, expected: tuple[tuple[int, int], ...]
) -> Finding | None:
    """Unhealthy when the status is not one of ``expected``; ``None`` when it is."""
    status = observation.facts["http_status"]
    if any(low <= status <= high for low, high in expected):
        return None
    return Finding(Status.UNHEALTHY, "http_status", f"{what} returned {status}")


async def probe(check: HttpCheck, ctx: ProbeContext) -> Observation:
    """Send the configured request with this check's long-lived client."""
    # The scheduler's deadline runs from here: building the client on the first run counts.
    started = time.perf_counter()
    client = check_client(
        ctx, check, follow_redirects=check.follow_redirects, max_redirects=check.max_redirects
    )
    return await request(
        client,
        check.method,
        check.url.reveal(),
        content=check.body.reveal() if check.body is not None else None,
        max_body_bytes=check.max_body_bytes,
        timeout_seconds=check.timeout_seconds,
        total_timeout_seconds=check.timeout_seconds * TOTAL_TIMEOUT_SHARE,
        spent_seconds=time.perf_counter() - started,
        what=_safe_target(check),
    )


#: ``_safe_target`` by method and URL: parsing the URL twice a run (probe and judge) cost ~4%
#: of the daemon's CPU at 300 probes/s.
_TARGETS: dict[tuple[str, str], str] = {}
_MAX_TARGETS = 16_384


def _safe_target(check: HttpCheck) -> str:
    """``target`` of the check's URL, from its template when a secret sits in the path."""
    key = (check.method, check.url.reveal())
    what = _TARGETS.get(key)
    if what is None:
        what = target(*key)
        if any(secret in what for secret in check.url.secrets):
            what = target(check.method, str(check.url))
        if len(_TARGETS) >= _MAX_TARGETS:
            _TARGETS.clear()
        _TARGETS[key] = what
    return what


def assess(check: HttpCheck, observation: Observation) -> Finding:
    """Status code first, then the body's conditions."""
    if observation.failure is not None:
        return failed(observation)
    what = _safe_target(check)
    if (bad_status := status_finding(what, observation, check.expected_status)) is not None:
        return bad_status
    body: bytes = observation.payload or b""
    if check.conditions and observation.facts.get("body_truncated"):
        return Finding(
            Status.UNHEALTHY,
            "body_too_large",
            f"{what}: body is larger than {check.max_body_bytes} bytes, conditions not evaluated",
        )
    condition = judge_conditions(
        check.conditions, body, what, redactor=lambda: Redactor(collect_secrets(check))
    )
    if condition is not None:
        return condition
    return Finding(Status.HEALTHY, OK, f"{what} returned {observation.facts['http_status']}")
