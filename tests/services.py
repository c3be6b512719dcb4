"""Targets for the service presets: real MLflow and BentoML servers, and documented fakes.

MLflow and BentoML come from PyPI (the ``services`` extra) and run for real, each started once
per session on a free port, with no network access and no telemetry, and broken for real by
the tests (a corrupted backend store, a service that says it is not ready, a stopped process).

Opik, Supabase's Kong gateway and the platform API cannot run here. Their documented answers,
failure shapes included, are served by the session's ``HttpTarget`` (see ``http_target``)
through the ``serve_*`` helpers below; each helper's docstring says where the shape comes from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon import free_port
from tests.http_target import HttpTarget, Reply
from tests.serving import closed_after, reset_per_test

__all__ = [
    "BentoServer",
    "MlflowServer",
    "bentoml_server",
    "bentoml_service",
    "mlflow_server",
    "mlflow_service",
    "serve_api",
    "serve_opik_backend",
    "serve_opik_ui",
    "serve_supabase",
    "ui_target",
    "ui_target_server",
]

_BIN = Path(sys.executable).parent
_BENTO_SERVICE_DIR = Path(__file__).parent / "bento_service"
#: Bounds on server start-up: MLflow imports a lot and migrates its store (about 15 s here).
_START_TIMEOUT_SECONDS = 120.0
#: What both servers get: no telemetry, no usage tracking, no proxies, no stray bytecode.
_QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "PYTHONDONTWRITEBYTECODE": "1",
    "NO_PROXY": "*",
}


# --- real servers --------------------------------------------------------------------------


def _start(
    args: list[str], *, cwd: Path, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env={**os.environ, **_QUIET_ENV, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            # A process group of its own: stop, continue and terminate reach every worker.
            start_new_session=True,
        )


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the server dies or stalls."""
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    _stop(process)
    pytest.fail(f"server behind {url} did not become ready:\n{tail}")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``: servers such as BentoML's put workers in sessions of their
    own, out of reach of a signal to the server's process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal_all(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the server and every process below it."""
    for pid in [process.pid, *_descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    workers = _descendants(process.pid)
    _signal_all(process, signal.SIGCONT)  # a stopped process would never see SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    for pid in workers:  # whatever the server did not take down with it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _require(module: str) -> None:
    # Only a guard for a bare dev install: CI installs the services extra, so these tests run.
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: pip install -e '.[dev,services]'")


class MlflowServer:
    """``mlflow server`` with a SQLite backend store, on a free port, one worker.

    It only accepts the ``Host`` header ``mlflow.test`` (``--allowed-hosts``), as an MLflow
    deployed behind a name would, so a check must send its configured host.
    """

    HOST = "mlflow.test"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = directory / "mlflow.db"
        self.log = directory / "mlflow.log"
        self._saved_store: bytes | None = None
        self.process = _start(
            [
                str(_BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.store}",
                "--default-artifact-root",
                str(directory / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--allowed-hosts",
                f"{self.HOST},{self.HOST}:*",
            ],
            cwd=directory,
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{self.store}"},
            log=self.log,
        )
        _wait_ready(self.process, f"{self.url}/health", self.log)
        # The first search imports and connects lazily (about a second, more on a busy machine):
        # pay that here, so no test's latency verdict depends on being first.
        with httpx.Client(timeout=60.0, trust_env=False) as client:
            client.post(
                f"{self.url}/api/2.0/mlflow/experiments/search",
                json={"max_results": 1},
                headers={"Host": self.HOST},
            ).raise_for_status()

    def break_store(self) -> None:
        """Overwrite the SQLite header in place: every query now fails, ``/health`` stays 200."""
        data = self.store.read_bytes()
        self._saved_store = data
        with self.store.open("r+b") as f:
            f.write(b"\0" * 4096)

    def repair_store(self) -> None:
        """Put the store's original bytes back."""
        if self._saved_store is not None:
            with self.store.open("r+b") as f:
                f.write(self._saved_store)
            self._saved_store = None

    def reset(self) -> None:
        """Undo a test's faults: the store repaired."""
        self.repair_store()

    def close(self) -> None:
        """Stop the server."""
        self.repair_store()
        _stop(self.process)


class BentoServer:
    """``bentoml serve`` of ``tests/bento_service`` on a free port.

    ``set_ready(False)`` makes the service's ``__is_ready__`` return false; ``pause()`` stops
    the server and its workers (SIGSTOP), as a hung server would look; ``resume()`` continues.
    """

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.not_ready_file = directory / "not-ready"
        self.log = directory / "bentoml.log"
        self.process = _start(
            [
                str(_BIN / "bentoml"),
                "serve",
                "service:Echo",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=_BENTO_SERVICE_DIR,
            env={
                "BENTOML_HOME": str(directory / "home"),
                "HEALTHD_TEST_NOT_READY_FILE": str(self.not_ready_file),
            },
            log=self.log,
        )
        _wait_ready(self.process, f"{self.url}/readyz", self.log)

    def set_ready(self, ready: bool) -> None:
        """Flip what ``__is_ready__`` answers."""
        if ready:
            self.not_ready_file.unlink(missing_ok=True)
        else:
            self.not_ready_file.touch()

    def echo(self, text: str) -> int:
        """Call the service's API; ``"fail"`` gets a 500. Returns the status."""
        with httpx.Client(timeout=10.0, trust_env=False) as client:
            return client.post(f"{self.url}/echo", json={"text": text}).status_code

    def pause(self) -> None:
        """SIGSTOP the server and its workers."""
        _signal_all(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the server and its workers."""
        _signal_all(self.process, signal.SIGCONT)

    def reset(self) -> None:
        """Undo a test's faults: running and ready."""
        self.resume()
        self.set_ready(True)

    def close(self) -> None:
        """Stop the server."""
        _stop(self.process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow server for the session; use ``mlflow_service`` in tests."""
    _require("mlflow")
    yield from closed_after(MlflowServer(tmp_path_factory.mktemp("mlflow")))


mlflow_service = reset_per_test(
    "mlflow_server", "The session's MLflow server, its store repaired around the test."
)


@pytest.fixture(scope="session")
def bentoml_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    """One real BentoML server for the session; use ``bentoml_service`` in tests."""
    _require("bentoml")
    yield from closed_after(BentoServer(tmp_path_factory.mktemp("bentoml")))


bentoml_service = reset_per_test(
    "bentoml_server", "The session's BentoML server, running and ready before and after the test."
)


@pytest.fixture(scope="session")
def ui_target_server() -> Iterator[HttpTarget]:
    """A second HTTP target, for a UI on another port than its backend."""
    yield from closed_after(HttpTarget())


ui_target = reset_per_test(
    "ui_target_server", "The session's second HTTP target, reset before and after the test."
)


# --- documented answers --------------------------------------------------------------------


def _json(document: Any, status: int = 200) -> Reply:
    return Reply.json(json.dumps(document), status)


def serve_api(
    target: HttpTarget,
    *,
    status: str = "healthy",
    database: str = "connected",
    agents: int = 11,
    version: str = "3.0.0",
    http_status: int = 200,
    content_encoding: str | None = None,
) -> None:
    """The platform API: ``/health`` and the ``/api/v1/health`` contract from the issue,
    ``{"status", "version", "database", "agents_available"}``; compressed with
    ``content_encoding`` whatever the client asks for, like a framework's gzip middleware."""
    report = {
        "status": status,
        "version": version,
        "database": database,
        "agents_available": agents,
    }
    if content_encoding is None:
        target.route("/health", _json({"status": "ok"}))
        target.route("/api/v1/health", _json(report, http_status))
        return
    target.route("/health", Reply.encoded(json.dumps({"status": "ok"}), content_encoding))
    target.route("/api/v1/health", Reply.encoded(json.dumps(report), content_encoding, http_status))


#: Opik's backend health checks, in Dropwizard's ``/health-check`` list format.
_OPIK_CHECKS = ("mysql", "clickhouse", "redis")


def serve_opik_backend(
    target: HttpTarget,
    *,
    failing: tuple[str, ...] = (),
    critical: bool = True,
    version: str = "1.9.5",
) -> None:
    """Opik's backend (``IsAliveResource`` and Dropwizard's health bundle).

    ``/is-alive/ping`` is ``200 {"message": "Healthy Server", "healthy": true}``, or
    ``500 {"message": "Not Healthy", "healthy": false}`` when a critical check fails;
    ``/health-check?name=all`` lists ``{"name", "healthy", "critical", "type"}`` per check and
    answers 503 when a critical one fails.
    """
    checks = [{"name": n, "healthy": True, "critical": True, "type": "ready"} for n in _OPIK_CHECKS]
    checks += [
        {"name": n, "healthy": False, "critical": critical, "type": "ready"} for n in failing
    ]
    checks = [c for c in checks if not (c["healthy"] and c["name"] in failing)]
    down = bool(failing) and critical
    if down:
        ping = _json({"message": "Not Healthy", "healthy": False}, 500)
    else:
        ping = _json({"message": "Healthy Server", "healthy": True})
    target.route("/is-alive/ping", ping)
    target.route("/is-alive/ver", _json({"version": version}))
    target.route("/health-check", _json(checks, 503 if down else 200))


def serve_opik_ui(target: HttpTarget, *, proxy: str = "healthy") -> None:
    """Opik's UI (nginx): the single-page app at ``/`` and ``/api/`` proxied to the backend.

    ``proxy`` is what ``/api/is-alive/ping`` answers: the backend's ``healthy`` or
    ``unhealthy`` ping, or ``no_upstream``, nginx's ``502 Bad Gateway`` when the proxy cannot
    reach the backend.
    """
    target.route(
        "/",
        Reply(
            body=b"<!doctype html><html><head><title>Opik</title></head></html>",
            headers={"Content-Type": "text/html"},
        ),
    )
    answers = {
        "healthy": _json({"message": "Healthy Server", "healthy": True}),
        "unhealthy": _json({"message": "Not Healthy", "healthy": False}, 500),
        "no_upstream": Reply(status=502, body=b"<html><body>502 Bad Gateway</body></html>"),
    }
    target.route("/api/is-alive/ping", answers[proxy])


def serve_supabase(
    target: HttpTarget,
    *,
    auth: str = "up",
    rest: str = "up",
    storage: str = "up",
    table: str = "up",
) -> None:
    """Supabase's Kong gateway (``kong.yml``) and the services behind it.

    Each part is ``up``; ``down`` (Kong's 502 when the upstream does not answer); or
    ``rejected`` (Kong's key-auth 401 for a key it does not know: a rotated key).
    ``table`` ``missing`` is PostgREST's 404 for an unknown table.
    """
    kong_502 = _json({"message": "An invalid response was received from the upstream server"}, 502)
    kong_401 = _json({"message": "Invalid authentication credentials"}, 401)
    answers = {
        "/auth/v1/health": _json(
            {
                "version": "v2.177.0",
                "name": "GoTrue",
                "description": "GoTrue is a user registration and authentication API",
            }
        ),
        "/rest/v1/": _json({"swagger": "2.0", "info": {"title": "standard public schema"}}),
        "/storage/v1/status": Reply(body=b""),
        "/rest/v1/todos": _json([{"id": 1}]),
    }
    states = {
        "/auth/v1/health": auth,
        "/rest/v1/": rest,
        "/storage/v1/status": storage,
        "/rest/v1/todos": table,
    }
    for path, state in states.items():
        if state == "down":
            answers[path] = kong_502
        elif state == "rejected":
            answers[path] = kong_401
        elif state == "missing":
            answers[path] = _json(
                {
                    "code": "PGRST205",
                    "message": "Could not find the table 'public.todos' in the schema cache",
                },
                404,
            )
        target.route(path, answers[path])
