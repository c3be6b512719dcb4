"""healthd as the tests run it: ``healthd_cli`` for one-shot commands, ``running_healthd`` for
the daemon, and the configs they read (``daemon_settings``, ``write_config``, ``write_toml``).

``running_healthd`` is the one way a test starts ``healthd run``: a real subprocess with its
own environment, its log in a file, and a real ``$NOTIFY_SOCKET`` (``NotifySocket``) that
records every ``sd_notify`` message, so tests wait on ``READY=1`` and friends, not on sleeps.
``run_daemon_once`` is the common case built on it: one round, and everything it exported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from healthd import config as config_module
from healthd.daemon import Daemon
from healthd.secrets import Redactor
from healthd.watchdog import Notifier
from tests.serving import closed_after

__all__ = [
    "REPO",
    "DaemonOutput",
    "Healthd",
    "Message",
    "NotifySocket",
    "credentials_env",
    "daemon_settings",
    "free_port",
    "healthd_cli",
    "no_healthd_environment",
    "notify_socket",
    "run_daemon_once",
    "running_healthd",
    "scrape",
    "until_ready",
    "write_config",
    "write_toml",
]

REPO = Path(__file__).resolve().parent.parent
#: Bound here: inside ``Healthd`` the name ``signal`` is its method.
_SIGTERM = signal.SIGTERM


def free_port() -> int:
    """A TCP port nothing listens on right now (bound to 0 and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int, timeout_seconds: float = 5) -> str:
    """One scrape of ``/metrics`` on the loopback ``port``."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_seconds) as reply:
        return str(reply.read().decode())


# --- configs -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


@pytest.fixture
def no_healthd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the overrides they mean; the developer's own ``HEALTHD_*`` and
    ``CREDENTIALS_DIRECTORY`` must not leak into a config loaded in this process."""
    for name in list(os.environ):
        if name.upper().startswith("HEALTHD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def write_toml(directory: Path, text: str, name: str = "healthd.toml") -> Path:
    """Write a config file from indented text, dedented, and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def daemon_settings(
    directory: Path, metrics_port: int | None = None, **settings: Any
) -> dict[str, Any]:
    """A test daemon's ``[daemon]`` table: metrics on loopback (``metrics_port``, or a free
    port), ``status.json`` in ``directory``, the first round spread over 10 ms; ``settings``
    add to that or override it."""
    return {
        "metrics_address": f"127.0.0.1:{metrics_port or free_port()}",
        "status_file": str(directory / "status.json"),
        "startup_spread": "10ms",
        **settings,
    }


def write_config(path: Path, daemon: Mapping[str, Any], components: Mapping[str, Any]) -> Path:
    """Write a healthd TOML config (flat tables only) and return its path."""
    lines = ["[daemon]", *(f"{k} = {_toml_value(v)}" for k, v in daemon.items())]
    for name, settings in components.items():
        lines.append(f"\n[components.{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in settings.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def in_process_daemon(directory: Path, address: str) -> Daemon:
    """A ``Daemon`` for the test's own event loop: one ``tcp`` check of ``address``, its
    config and files in ``directory``, and no service manager to notify."""
    components = {"db": {"kind": "tcp", "address": address}}
    path = write_config(directory / "healthd.toml", daemon_settings(directory), components)
    return Daemon(path, config_module.load(path), Redactor(), notifier=Notifier(environ={}))


async def until_ready(daemon: Daemon, timeout_seconds: float = 15) -> None:
    """Return once an ``in_process_daemon`` running in this loop has become ready (its first
    round done, its status file written, READY sent); fail after ``timeout_seconds``."""
    with anyio.fail_after(timeout_seconds):
        while not daemon._ready:
            await anyio.sleep(0.01)


# --- the service manager's side ----------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One ``sd_notify`` datagram: when it arrived (monotonic seconds) and its fields."""

    at: float
    fields: dict[str, str]

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """What systemd's side of ``$NOTIFY_SOCKET`` sees, recorded in order.

    ``abstract=True`` binds a Linux abstract socket and gives its ``@name`` form as ``address``.
    """

    def __init__(self, *, abstract: bool = False) -> None:
        # sun_path holds 108 bytes, and pytest's tmp_path can be longer than that.
        self._dir = tempfile.mkdtemp(prefix="hdn", dir="/tmp")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"healthd-test-{os.getpid()}-{id(self)}"
            self._sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self._dir, "notify.sock")
            self._sock.bind(self.address)
        self._sock.settimeout(0.1)
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._cond:
                self._messages.append(Message(at, fields))
                self._cond.notify_all()

    @property
    def messages(self) -> list[Message]:
        """Every message so far, oldest first."""
        with self._cond:
            return list(self._messages)

    def wait_for(
        self, predicate: Callable[[Message], bool], timeout_seconds: float, after: float = 0.0
    ) -> Message:
        """The first message that arrived after ``after`` and satisfies ``predicate``."""

        def found() -> Message | None:
            return next((m for m in self._messages if m.at > after and predicate(m)), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout_seconds):
                raise AssertionError(
                    f"no matching notify message within {timeout_seconds} s; got "
                    f"{[m.fields for m in self._messages]}"
                )
            message = found()
            assert message is not None
            return message

    def pings(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Arrival times of ``WATCHDOG=1`` between ``start`` and ``end``."""
        return [m.at for m in self.messages if "WATCHDOG" in m and start < m.at <= end]

    def close(self) -> None:
        """Stop listening and remove the socket."""
        self._closed = True
        self._thread.join(2)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A fresh ``NotifySocket``, closed after the test."""
    yield from closed_after(NotifySocket())


# --- commands ----------------------------------------------------------------------------------


def healthd_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one ``healthd`` command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "healthd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


class Healthd:
    """A running ``healthd run``: its process, its log, and what it told its service manager."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, notify: NotifySocket):
        self.popen = popen
        self.log_path = log_path
        self.notify = notify

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.popen.pid

    @property
    def messages(self) -> list[dict[str, str]]:
        """The fields of every notification so far, oldest first."""
        return [m.fields for m in self.notify.messages]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15) -> dict[str, str]:
        """Block until a notification has ``key`` (with ``value``); return its fields."""
        message = self.notify.wait_for(
            lambda m: key in m and (value is None or m.fields[key] == value), timeout
        )
        return message.fields

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the daemon."""
        self.popen.send_signal(signum)

    def stop(self, signum: int = _SIGTERM, timeout_seconds: float = 10.0) -> int:
        """Send ``signum``, wait, and return the exit code; SIGKILL if it does not stop in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
            try:
                self.popen.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@contextmanager
def running_healthd(
    config: Path,
    *,
    logs: Path | None = None,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    watchdog_pid: str | None = None,
    before_exec: Callable[[], None] | None = None,
    ready: bool = False,
) -> Iterator[Healthd]:
    """Start ``python -m healthd --config CONFIG ARGS run``; kill it if the test left it running.

    The environment is the test's minus every ``HEALTHD_`` and systemd variable, plus
    ``NOTIFY_SOCKET`` (the ``Healthd``'s own ``NotifySocket``) and ``env``, which wins. The log
    goes to ``logs`` (the config's directory by default: pass one when the config is the
    repository's). ``watchdog_pid="self"`` sets ``WATCHDOG_PID`` to the daemon's own pid, as
    systemd does. ``before_exec`` runs in the child before ``exec`` (to lower a limit, say).
    With ``ready`` it yields once the daemon sent ``READY=1`` (its first round done, its
    metrics served, its status file written); without, at once.
    """
    notify = NotifySocket()
    directory = logs or config.parent
    log_path = directory / f"{config.stem}.{len(list(directory.glob(f'{config.stem}.*.log')))}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHD_")}
    for systemd in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        environ.pop(systemd, None)
    environ.update({"NOTIFY_SOCKET": notify.address, **(env or {})})
    command = [sys.executable, "-m", "healthd", "--config", str(config), *args, "run"]
    if watchdog_pid == "self":
        # exec keeps the shell's pid, so $$ is the daemon's pid, known before it starts.
        command = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *command]
    elif watchdog_pid is not None:
        environ["WATCHDOG_PID"] = watchdog_pid
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            command,
            cwd=REPO,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=before_exec,
        )
    healthd = Healthd(popen, log_path, notify)
    try:
        if ready:
            healthd.wait_for("READY", "1")
        yield healthd
    finally:
        healthd.stop(signal.SIGKILL, timeout_seconds=5)
        notify.close()


# --- one round, every output ---------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonOutput:
    """Everything a real ``healthd run`` exported after its first round of checks."""

    status: dict[str, Any]
    status_text: str
    metrics: str
    logs: str
    check_json: str

    def everything(self) -> str:
        """All output in one string, for "this secret appears nowhere" assertions."""
        return "\n".join((self.status_text, self.metrics, self.logs, self.check_json))

    def verdicts(self) -> dict[str, tuple[str, str]]:
        """Each component's status and reason code, as the status file says them."""
        return {
            name: (state["status"], state["reason_code"])
            for name, state in self.status["components"].items()
        }

    def shows_any(self, *secrets: str) -> list[str]:
        """Those of ``secrets`` that appear anywhere in the output."""
        everything = self.everything()
        return [secret for secret in secrets if secret in everything]


def credentials_env(tmp_path: Path, **credentials: str) -> dict[str, str]:
    """A systemd credentials directory in ``tmp_path`` holding ``credentials`` (file name to
    content); the environment that points healthd at it."""
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700)
    for name, value in credentials.items():
        (directory / name).write_text(value)
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def run_daemon_once(
    tmp_path: Path, components_toml: str, env: dict[str, str] | None = None
) -> DaemonOutput:
    """Run ``healthd check --json``, then ``healthd run`` until READY (first round done); return
    the status file, a metrics scrape and the debug logs of both."""
    port = free_port()
    status_path = tmp_path / "status.json"
    config = tmp_path / "healthd.toml"
    config.write_text(
        "[daemon]\n"
        f'metrics_address = "127.0.0.1:{port}"\n'
        f'status_file = "{status_path}"\n'
        'startup_spread = "10ms"\n'
        'interval = "2s"\n'
        'timeout = "1s"\n\n' + components_toml
    )
    # Both at once: each spends most of its time importing.
    argv = [sys.executable, "-m", "healthd", "--config", str(config), "check", "--json"]
    check = subprocess.Popen(
        [*argv, "--log-level", "debug"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        with running_healthd(config, env=env, args=("--log-level", "debug"), ready=True) as daemon:
            metrics = scrape(port)
            status_text = status_path.read_text()
            daemon.stop()
            logs = daemon.log()
        check_json, check_logs = check.communicate(timeout=30)
    finally:
        if check.poll() is None:
            check.kill()
            check.communicate()
    assert check.returncode in (0, 1, 2), check_logs
    return DaemonOutput(
        status=json.loads(status_text),
        status_text=status_text,
        metrics=metrics,
        logs=logs + check_logs,
        check_json=check_json,
    )
