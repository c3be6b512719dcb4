"""Run a real ``healthd run`` as a subprocess and listen to it the way systemd and ops do.

``NotifySocket`` is a real ``AF_UNIX`` datagram socket that records every ``sd_notify``
message with its arrival time; ``TcpTarget`` is a target that can be stopped and started again
on the same port; ``HealthdProcess`` writes a config, starts the daemon and stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Bound here: inside ``HealthdProcess`` the name ``signal`` is its method.
_SIGTERM = signal.SIGTERM


def free_port() -> int:
    """A TCP port nothing listens on right now (bound to 0 and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class TcpTarget:
    """A TCP service on a fixed loopback port that accepts and closes; stop it, start it again."""

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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_config(path: Path, daemon: Mapping[str, Any], components: Mapping[str, Any]) -> Path:
    """Write a healthd TOML config (flat tables only) and return its path."""
    lines = ["[daemon]", *(f"{k} = {_toml_value(v)}" for k, v in daemon.items())]
    for name, settings in components.items():
        lines.append(f"\n[components.{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in settings.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class HealthdProcess:
    """``python -m healthd --config PATH run`` with its own environment; stderr goes to a file.

    ``watchdog_pid="self"`` sets ``WATCHDOG_PID`` to the daemon's own pid, as systemd does.
    """

    def __init__(
        self,
        config: Path,
        *,
        env: Mapping[str, str] | None = None,
        watchdog_pid: str | None = None,
        args: tuple[str, ...] = (),
        log_path: Path | None = None,
    ) -> None:
        self.log_path = log_path or config.with_suffix(".log")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHD_")}
        environ.pop("NOTIFY_SOCKET", None)
        environ.pop("WATCHDOG_USEC", None)
        environ.pop("WATCHDOG_PID", None)
        environ.update(env or {})
        command = [sys.executable, "-m", "healthd", "--config", str(config), *args, "run"]
        if watchdog_pid == "self":
            # exec keeps the shell's pid, so $$ is the daemon's pid, known before it starts.
            command = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *command]
        elif watchdog_pid is not None:
            environ["WATCHDOG_PID"] = watchdog_pid
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=REPO, env=environ, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.process.pid

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the daemon."""
        self.process.send_signal(signum)

    def stop(self, timeout_seconds: float = 10.0, signum: int = _SIGTERM) -> int:
        """Send ``signum``, wait, and return the exit code; SIGKILL if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
