"""Map low-level exceptions, once, to the stable reason codes of ``Failure``."""

from __future__ import annotations

import errno
import os
import resource
import socket
import ssl
from collections.abc import Iterator

from healthd.findings import format_seconds
from healthd.model import Failure
from healthd.quoting import quote

#: A probe's own deadline (or its client's timeouts) is this share of the check's timeout, a
#: little before the scheduler's, so that the probe can still name the phase that hung
#: ("timed out connecting") instead of being cancelled with nothing to say.
CLIENT_TIMEOUT_SHARE = 0.9

#: The reason code of a check that failed for lack of healthd's own resources, not the
#: target's: the scheduler keeps the last verdict instead of judging this one.
RESOURCE_EXHAUSTED = "resource_exhausted"

#: errno values that mean healthd itself ran out of descriptors, memory or buffers.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def resource_failure(exc: BaseException, what: str) -> Failure | None:
    """``resource_exhausted`` when ``exc`` or anything it wraps is healthd running out of its
    own descriptors, memory or buffers; ``None`` otherwise."""
    for item in _chain(exc):
        if isinstance(item, MemoryError):
            return Failure(RESOURCE_EXHAUSTED, f"{what}: healthd is out of memory")
        if isinstance(item, OSError) and item.errno in _RESOURCE_ERRNOS:
            return Failure(
                RESOURCE_EXHAUSTED, f"{what}: healthd is out of resources: {item.strerror}"
            )
    return None


def descriptors_exhausted(margin: int = 4) -> bool:
    """Whether this process has (nearly) no file descriptors left, so that a connection failure
    right now may be healthd's own: some clients (libpq) report EMFILE only as "connection is
    bad", with no errno to map."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return False
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        return exc.errno in _RESOURCE_ERRNOS
    return used >= soft - margin


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, and the members of exception groups."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, BaseExceptionGroup):
            stack.extend(item.exceptions)
        for linked in (item.__cause__, item.__context__):
            if linked is not None:
                stack.append(linked)


def network_failure(
    exc: BaseException, what: str, *, timeout_seconds: float | None = None
) -> Failure:
    """The failure for a network-level exception; ``what`` names the attempt ("connect to x").

    ``timeout_seconds`` is the check's configured timeout, which a timeout's reason names.
    """
    # healthd's own trouble first: a wrapped EMFILE must never become the target's failure.
    if (own := resource_failure(exc, what)) is not None:
        return own
    for item in _chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError):
            reason = item.verify_message or item.reason or "verification failed"
            return Failure("tls_error", f"{what}: TLS certificate rejected: {reason}")
        if isinstance(item, ssl.SSLError):
            return Failure("tls_error", f"{what}: TLS error: {item.reason or item}")
        if isinstance(item, socket.gaierror):
            return Failure("dns_error", f"{what}: name resolution failed: {item.strerror}")
        if isinstance(item, ConnectionRefusedError):
            return Failure("connection_refused", f"{what}: connection refused")
        if isinstance(item, ConnectionResetError | BrokenPipeError):
            return Failure("connection_reset", f"{what}: connection reset by peer")
        if isinstance(item, TimeoutError):
            if timeout_seconds is None:
                return Failure("timeout", f"{what}: timed out")
            return Failure(
                "timeout", f"{what}: timed out (timeout {format_seconds(timeout_seconds)})"
            )
        if isinstance(item, OSError) and item.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return Failure("unreachable", f"{what}: {item.strerror}")
    return Failure("connection_error", f"{what}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    # A library's message may carry what the target sent: quoted like any target text.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {quote(text[0])}" if text else type(exc).__name__
