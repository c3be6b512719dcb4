"""The ``tcp`` probe: a connect, and optionally a TLS handshake, to ``address``."""

from __future__ import annotations

import time

import anyio

from healthd.classify import OK, failed
from healthd.config import TcpCheck, parse_address
from healthd.model import Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes._errors import network_failure


async def probe(check: TcpCheck, ctx: ProbeContext) -> Observation:
    """Open a fresh connection (a pooled one would hide a dead listener) and close it."""
    host, port = parse_address(check.address)
    what = f"connect to {check.address}"
    ssl_context = ctx.shared.ssl_context(verify=check.tls_verify) if check.tls else None
    started = time.perf_counter()
    try:
        stream = await anyio.connect_tcp(
            host,
            port,
            tls=check.tls,
            ssl_context=ssl_context,
            tls_hostname=check.server_name or host,
        )
    except OSError as exc:
        return Observation(time.perf_counter() - started, failure=network_failure(exc, what))
    latency = time.perf_counter() - started
    await stream.aclose()
    return Observation(latency, facts={"tls": check.tls} if check.tls else {})


def assess(check: TcpCheck, observation: Observation) -> Finding:
    """A connection is all a TCP check asks for."""
    if observation.failure is not None:
        return failed(observation)
    handshake = "TLS handshake with" if check.tls else "connected to"
    return Finding(Status.HEALTHY, OK, f"{handshake} {check.address}")
