"""The tcp probe against a real listener, a closed port, a stuck peer and a TLS server."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import pytest

from healthd.classify import judge
from healthd.model import Finding, Observation, Status
from healthd.probes import PROBES, ProbeContext
from tests.http_target import Certificate, HttpTarget, TcpListener
from tests.probing import make_check, run_check

tcp_check = functools.partial(make_check, "tcp")


@pytest.mark.asyncio
async def test_listener_is_healthy_after_exactly_one_connection(
    tcp_listener: TcpListener, ctx: ProbeContext
) -> None:
    observation, finding = await run_check(tcp_check(address=tcp_listener.address), ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"connected to {tcp_listener.address}")
    assert observation.failure is None
    assert observation.facts == {}
    assert 0 < observation.latency_seconds < 1
    assert tcp_listener.wait_for_connections(1) == 1


@pytest.mark.asyncio
async def test_each_probe_opens_a_fresh_connection(
    tcp_listener: TcpListener, ctx: ProbeContext
) -> None:
    check = tcp_check(address=tcp_listener.address)
    for _ in range(3):
        _, finding = await run_check(check, ctx)
        assert finding.status is Status.HEALTHY

    assert tcp_listener.wait_for_connections(3) == 3


@pytest.mark.asyncio
async def test_plain_check_does_not_speak_tls_to_a_silent_server(
    tcp_listener: TcpListener, ctx: ProbeContext
) -> None:
    # A server that waits for the client to talk first (redis, postgres) must still pass a
    # plain connect check at once, not wait for a TLS answer until the deadline.
    tcp_listener.silent = True
    started = time.perf_counter()

    _, finding = await run_check(tcp_check(address=tcp_listener.address, timeout=2), ctx)

    assert finding.status is Status.HEALTHY
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "trust",
    [
        pytest.param(lambda cert: {"ca_file": str(cert.cert_file)}, id="signed-by-the-ca-file"),
        pytest.param(lambda cert: {"tls_verify": False}, id="without-verification"),
    ],
)
@pytest.mark.asyncio
async def test_tls_handshake_that_is_trusted_is_healthy(
    https_target: HttpTarget,
    tls_certificate: Certificate,
    ctx: ProbeContext,
    trust: Callable[[Certificate], dict[str, Any]],
) -> None:
    address = f"127.0.0.1:{https_target.port}"
    check = tcp_check(address=address, tls=True, **trust(tls_certificate))

    observation, finding = await run_check(check, ctx)

    assert finding == Finding(Status.HEALTHY, "ok", f"TLS handshake with {address}")
    assert observation.facts == {"tls": True}


@pytest.mark.asyncio
async def test_tls_check_against_a_silent_server_times_out_before_the_scheduler_deadline(
    tcp_listener: TcpListener, ctx: ProbeContext
) -> None:
    tcp_listener.silent = True
    check = tcp_check(address=tcp_listener.address, tls=True, tls_verify=False, timeout=1)
    started = time.perf_counter()

    observation, finding = await run_check(check, ctx)

    elapsed = time.perf_counter() - started
    assert 0.85 < elapsed < 1
    assert finding == Finding(
        Status.UNHEALTHY,
        "timeout",
        f"connect to {tcp_listener.address}: timed out during the TLS handshake (timeout 1 s)",
    )
    assert observation.failure is not None


@pytest.mark.asyncio
async def test_connect_that_gets_no_answer_times_out_before_the_scheduler_deadline(
    unresponsive_port: int, ctx: ProbeContext
) -> None:
    address = f"127.0.0.1:{unresponsive_port}"
    started = time.perf_counter()

    _, finding = await run_check(tcp_check(address=address, timeout=0.5), ctx)

    assert 0.4 < time.perf_counter() - started < 0.5
    assert finding == Finding(
        Status.UNHEALTHY, "timeout", f"connect to {address}: timed out connecting (timeout 500 ms)"
    )


def test_slow_connect_is_degraded_with_the_limit_in_the_reason() -> None:
    check = tcp_check(address="db.internal:5432", degraded_latency="1ms")

    finding = judge(check, Observation(0.0042), PROBES["tcp"].assess)

    assert finding == Finding(
        Status.DEGRADED, "slow", "connected to db.internal:5432, but took 4.2 ms (limit 1 ms)"
    )
