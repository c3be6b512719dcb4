"""``healthd`` commands as subprocesses: one-shot runs, and a daemon waited on by its
``sd_notify`` messages (from ``tests.healthd_process``), not by sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.healthd_process import HealthdProcess, NotifySocket, free_port

__all__ = ["Healthd", "free_port", "healthd_cli", "running_healthd"]


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
    """A running ``healthd run`` and what it told its service manager."""

    def __init__(self, process: HealthdProcess, notify: NotifySocket) -> None:
        self.process = process
        self._notify = notify

    @property
    def messages(self) -> list[dict[str, str]]:
        """Every notification so far, oldest first."""
        return [m.fields for m in self._notify.messages]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15) -> dict[str, str]:
        """Block until a notification has ``key`` (with ``value``); return its fields."""
        message = self._notify.wait_for(
            lambda m: key in m and (value is None or m.fields[key] == value), timeout
        )
        return message.fields

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> tuple[int, str]:
        """Send ``sig``, wait for the exit; return the exit code and what it logged."""
        code = self.process.stop(timeout, sig)
        return code, self.process.log()


@contextmanager
def running_healthd(
    config: Path, tmp_path: Path, env: Mapping[str, str] | None = None, *args: str
) -> Iterator[Healthd]:
    """Start ``healthd run`` (call ``wait_for("READY", "1")``); kill it if a test left it."""
    notify = NotifySocket()
    environ = {"NOTIFY_SOCKET": notify.address, **(env or {})}
    # The log goes to the test's own directory: the config may be the repository's.
    log_path = tmp_path / f"healthd-{len(list(tmp_path.glob('healthd-*.log')))}.log"
    process = HealthdProcess(config, env=environ, args=args, log_path=log_path)
    try:
        yield Healthd(process, notify)
    finally:
        process.stop(timeout_seconds=5, signum=signal.SIGKILL)
        notify.close()
