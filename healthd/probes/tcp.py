"""The ``tcp`` probe: a connect, and optionally a TLS handshake, to ``address``."""

from __future__ import annotations

import ssl
import time

import anyio
import anyio.abc

from healthd.config import TcpCheck, parse_address
from healthd.findings import OK, failed, format_seconds
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes._errors import CLIENT_TIMEOUT_SHARE, network_failure


async def probe(check: TcpCheck, ctx: ProbeContext) -> Observation:
    """Open a fresh connection (a pooled one would hide a dead listener) and close it."""
    host, port = parse_address(check.address)
    what = f"connect to {check.address}"
    ssl_context = None
    if check.tls:
        ssl_context = ctx.shared.ssl_context(verify=check.tls_verify, ca_file=check.ca_file)
    started = time.perf_counter()
    # Our own deadline, a little shorter than the scheduler's, so the reason can say which
    # phase stalled (a listener that accepts but never answers a TLS hello, say).
    phase = "during the TLS handshake" if check.tls else "connecting"
    with anyio.move_on_after(check.timeout_seconds * CLIENT_TIMEOUT_SHARE) as deadline:
        try:
            stream = await _connect(check, host, port, ssl_context)
        except (OSError, anyio.BrokenResourceError) as exc:
            # A peer that closes during the TLS handshake surfaces as BrokenResourceError.
            # A peer that answers the hello with plain text (garbage, or HTTP) is tls_error,
            # not protocol_error: TLS is the only protocol a tcp check speaks, and the code
            # names the layer that broke, as for an https URL on a plain port.
            failure = network_failure(exc, what, timeout_seconds=check.timeout_seconds)
            return Observation(time.perf_counter() - started, failure=failure)
    latency = time.perf_counter() - started
    if deadline.cancelled_caught:
        # The configured timeout, not our share of it: that is the number an operator set.
        limit = format_seconds(check.timeout_seconds)
        return Observation(
            latency, failure=Failure("timeout", f"{what}: timed out {phase} (timeout {limit})")
        )
    # Forcefully: a graceful TLS close waits for the peer's close_notify, which a stuck peer
    # never sends, and a peer that already left would make it raise.
    await anyio.aclose_forcefully(stream)
    return Observation(latency, facts={"tls": check.tls} if check.tls else {})


async def _connect(
    check: TcpCheck, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> anyio.abc.ByteStream:
    if not check.tls:
        # No TLS arguments at all: anyio starts a TLS handshake whenever it is given a host
        # name or a context, and a plain check must not speak TLS to a plain port.
        return await anyio.connect_tcp(host, port)
    return await anyio.connect_tcp(
        host, port, tls=True, ssl_context=ssl_context, tls_hostname=check.server_name or host
    )


def assess(check: TcpCheck, observation: Observation) -> Finding:
    """A connection is all a TCP check asks for."""
    if observation.failure is not None:
        return failed(observation)
    handshake = "TLS handshake with" if check.tls else "connected to"
    return Finding(Status.HEALTHY, OK, f"{handshake} {check.address}")
