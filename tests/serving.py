"""How long a test server lives: ``closed_after`` its fixture, or ``reset_around`` each test.

A fixture body is then one line, ``yield from closed_after(Server())``, and a server says in
its own ``reset``/``close`` what putting it back and shutting it down mean. A server the
session shares gets its per-test fixture from ``reset_per_test``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

import pytest

__all__ = ["closed_after", "reset_around", "reset_per_test", "stop_process"]


class _Closable(Protocol):
    def close(self) -> None: ...


class _Resettable(Protocol):
    def reset(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)
_R = TypeVar("_R", bound=_Resettable)


def closed_after(server: _C) -> Iterator[_C]:
    """``server`` for as long as its fixture lasts, closed at its end."""
    yield server
    server.close()


def reset_around(server: _R) -> Iterator[_R]:
    """A longer-lived ``server``, reset before and after the test."""
    server.reset()
    yield server
    server.reset()


def reset_per_test(session_fixture: str, doc: str) -> Any:
    """A test-scoped fixture, documented by ``doc``: the server of the session fixture named
    ``session_fixture``, ``reset_around`` the test. Bind it to the fixture's name."""

    def per_test(request: pytest.FixtureRequest) -> Iterator[Any]:
        yield from reset_around(request.getfixturevalue(session_fixture))

    per_test.__doc__ = doc  # before decorating: ``pytest --fixtures`` shows the function's
    return pytest.fixture(per_test)


def stop_process(process: subprocess.Popen[bytes], timeout_seconds: float = 10) -> None:
    """SIGTERM ``process`` and reap it; SIGKILL it if it outlives ``timeout_seconds``."""
    process.terminate()
    try:
        process.wait(timeout_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
