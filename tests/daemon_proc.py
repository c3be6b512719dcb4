"""Run ``healthd`` as a real subprocess, and wait on its systemd notifications, not on sleeps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Healthd", "free_port", "healthd_cli", "running_healthd"]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """A running ``healthd run`` whose ``sd_notify`` messages arrive on a socket we own."""

    def __init__(self, process: subprocess.Popen[str], notify: socket.socket) -> None:
        self.process = process
        self._notify = notify
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15) -> dict[str, str]:
        """Block until a notification has ``key`` (with ``value``); return that message."""
        for message in self.messages:
            if key in message and (value is None or message[key] == value):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self._notify.settimeout(left)
            try:
                data = self._notify.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            message["_at"] = repr(time.monotonic())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message
            if self.process.poll() is not None:
                break
        raise AssertionError(f"no {key}={value} from healthd; got {self.messages}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> tuple[int, str]:
        """Send ``sig``, wait for the exit; return the exit code and stderr."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, stderr


@contextmanager
def running_healthd(
    config: Path, tmp_path: Path, env: Mapping[str, str] | None = None, *args: str
) -> Iterator[Healthd]:
    """Start ``healthd run`` and wait for READY=1; stop it (SIGKILL if need be) on exit."""
    address = str(tmp_path / f"notify-{time.monotonic_ns()}.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(address)
    process = subprocess.Popen(
        [sys.executable, "-m", "healthd", "--config", str(config), *args, "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NOTIFY_SOCKET": address, **(env or {})},
    )
    healthd = Healthd(process, notify)
    try:
        yield healthd
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
        notify.close()
