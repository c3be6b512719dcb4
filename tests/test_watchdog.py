"""sd_notify and the watchdog, end to end: a real datagram socket, a real ``healthd run``.

The daemon runs with ``WATCHDOG_USEC=1 s`` and checks every 0.3 s, so half-interval pings
arrive every 0.5 s and a stall shows within a second.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from healthd import config as config_module
from healthd import daemon as daemon_module
from healthd.daemon import Daemon
from healthd.exporters import status_file
from healthd.secrets import Redactor
from healthd.watchdog import Notifier
from tests.daemon import (
    NotifySocket,
    daemon_settings,
    free_port,
    running_healthd,
    scrape,
    write_config,
)
from tests.http_target import TcpTarget

_WATCHDOG_USEC = 1_000_000
_STATUS = re.compile(r"^\d+ healthy, \d+ degraded, \d+ unhealthy; overall \w+$")


def _config(tmp_path: Path, tcp_target: TcpTarget, **daemon: object) -> tuple[Path, int]:
    port = free_port()
    settings = daemon_settings(
        tmp_path,
        port,
        status_file=str(tmp_path / "state" / "status.json"),
        status_file_refresh="1s",
        # STATUS= goes out with each status file write: a short minimum shows every verdict.
        status_file_min_interval="50ms",
        interval="300ms",
        timeout="200ms",
        startup_spread="50ms",
    )
    settings.update(daemon)
    components = {"db": {"kind": "tcp", "address": tcp_target.address, "critical": True}}
    return write_config(tmp_path / "healthd.toml", settings, components), port


# --- the protocol, in-process ----------------------------------------------------------------


def test_notifier_does_nothing_without_notify_socket() -> None:
    notifier = Notifier(environ={})
    assert notifier.send(READY=1) is False
    assert notifier.watchdog_seconds is None


def test_notifier_reaches_an_abstract_socket() -> None:
    sock = NotifySocket(abstract=True)
    try:
        notifier = Notifier(environ={"NOTIFY_SOCKET": sock.address})
        assert notifier.send(READY=1, STATUS="all fine")
        message = sock.wait_for(lambda m: "READY" in m, 2)
        assert message.fields == {"READY": "1", "STATUS": "all fine"}
        notifier.close()
    finally:
        sock.close()


def test_watchdog_interval_is_ignored_when_meant_for_another_pid() -> None:
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    assert Notifier(environ=other).watchdog_seconds is None
    assert Notifier(environ={"WATCHDOG_USEC": "2000000"}).watchdog_seconds == 2.0
    assert Notifier(environ={"WATCHDOG_USEC": "0"}).watchdog_seconds is None


def test_reloading_carries_the_monotonic_clock(notify_socket: NotifySocket) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": notify_socket.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = notify_socket.wait_for(lambda m: "RELOADING" in m, 2)
    assert message.fields["RELOADING"] == "1"
    assert before <= int(message.fields["MONOTONIC_USEC"]) <= after
    notifier.close()


# --- end to end ------------------------------------------------------------------------------


def test_ready_only_after_first_round_metrics_and_status_file_then_pings_at_half_interval(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    config, port = _config(tmp_path, tcp_target)
    status_file = tmp_path / "state" / "status.json"
    env = {"WATCHDOG_USEC": str(_WATCHDOG_USEC)}
    with running_healthd(config, env=env, watchdog_pid="self") as daemon:
        ready = daemon.notify.wait_for(lambda m: "READY" in m, 15)
        # The promises behind READY=1: a written status file with a checked component, and a
        # metrics server that answers.
        assert status_file.stat().st_mtime <= time.time()
        assert '"db":{"kind":"tcp","status":"healthy"' in status_file.read_text()
        assert 'healthd_component_up{component="db",kind="tcp"} 1.0' in scrape(port)
        assert _STATUS.match(ready.fields["STATUS"]), ready.fields
        before_ready = [m for m in daemon.notify.messages if m.at < ready.at]
        assert not [m for m in before_ready if "WATCHDOG" in m or "READY" in m]

        daemon.notify.wait_for(lambda m: "WATCHDOG" in m, 4, after=ready.at + 2.0)
        pings = daemon.notify.pings(ready.at - 0.01, ready.at + 2.0)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 4, pings
        assert 0.4 <= statistics.median(gaps) <= 0.6, gaps
        assert max(gaps) < 0.9, gaps

        # A change of verdict is announced in STATUS= (the first failure is only degraded).
        tcp_target.stop()
        changed = daemon.notify.wait_for(
            lambda m: "STATUS" in m and "1 degraded" in m.fields["STATUS"], 5, after=ready.at
        )
        assert _STATUS.match(changed.fields["STATUS"])

        stop_sent = time.monotonic()
        assert daemon.stop() == 0
        stopping = daemon.notify.wait_for(lambda m: "STOPPING" in m, 2, after=stop_sent)
        assert stopping.fields["STOPPING"] == "1"


def test_watchdog_pings_stop_while_the_loop_is_stalled_and_resume_after(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    stall = tmp_path / "stall"
    config, _ = _config(tmp_path, tcp_target)
    env = {
        "WATCHDOG_USEC": str(_WATCHDOG_USEC),
        "HEALTHD_TEST_STALL_FILE": str(stall),
    }
    with running_healthd(config, env=env, watchdog_pid="self") as daemon:
        try:
            ready = daemon.notify.wait_for(lambda m: "READY" in m, 15)
            daemon.notify.wait_for(lambda m: "WATCHDOG" in m, 3, after=ready.at + 1.0)

            stall.touch()
            stalled_at = time.monotonic()
            # The next check (within one 0.3 s interval) blocks the loop; allow one ping in flight.
            time.sleep(2.0)
            silent_from = stalled_at + 0.9
            stall.unlink()
            recovered_at = time.monotonic()
            assert daemon.notify.pings(silent_from, recovered_at) == []

            first = daemon.notify.wait_for(lambda m: "WATCHDOG" in m, 2, after=recovered_at)
            assert first.at - recovered_at < 0.8
            daemon.notify.wait_for(lambda m: "WATCHDOG" in m, 3, after=recovered_at + 1.2)
            after = daemon.notify.pings(recovered_at, recovered_at + 1.2)
            assert len(after) >= 2, after
            assert daemon.popen.poll() is None
        finally:
            stall.unlink(missing_ok=True)


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    config, _ = _config(tmp_path, tcp_target)
    env = {"WATCHDOG_USEC": str(_WATCHDOG_USEC)}
    with running_healthd(config, env=env, watchdog_pid="1") as daemon:
        ready = daemon.notify.wait_for(lambda m: "READY" in m, 15)
        # Wait for something that happens well after the first ping would have been sent.
        tcp_target.stop()
        daemon.notify.wait_for(lambda m: "degraded" in m.fields.get("STATUS", ""), 5, ready.at)
        daemon.signal(signal.SIGTERM)
        daemon.notify.wait_for(lambda m: "STOPPING" in m, 5, after=ready.at)
        assert daemon.notify.pings() == []


@pytest.mark.asyncio
async def test_watchdog_pings_stop_while_the_status_writer_is_stuck_though_the_loop_runs(
    tmp_path: Path,
    notify_socket: NotifySocket,
    tcp_target: TcpTarget,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Progress means more than a live loop: a status writer stuck in a hung filesystem write
    # must stop the pings too, while checks keep completing.
    monkeypatch.setattr(daemon_module, "_GRACE_SECONDS", 0.2)
    hang, release = threading.Event(), threading.Event()
    real_write = status_file.write_atomic

    def write(path: Path, data: bytes, mode: int = 0o644) -> None:
        if hang.is_set():
            release.wait(10)
        real_write(path, data, mode)

    monkeypatch.setattr(status_file, "write_atomic", write)
    config, _ = _config(tmp_path, tcp_target, status_file_refresh="100ms")
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    daemon = Daemon(config, config_module.load(config), Redactor(), notifier=Notifier(env))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            ready = await anyio.to_thread.run_sync(
                lambda: notify_socket.wait_for(lambda m: "READY" in m, 10)
            )
            await anyio.to_thread.run_sync(
                lambda: notify_socket.wait_for(lambda m: "WATCHDOG" in m, 2, ready.at + 0.5)
            )
            hang.set()
            hung_at = time.monotonic()
            checks_before = _checks(daemon)
            await anyio.sleep(1.5)
            assert notify_socket.pings(hung_at + 0.8, time.monotonic()) == []
            assert _checks(daemon) > checks_before + 3  # the loop and the checks went on
            assert daemon.stuck() == ["status file writer"]

            release.set()
            released_at = time.monotonic()
            first = await anyio.to_thread.run_sync(
                lambda: notify_socket.wait_for(lambda m: "WATCHDOG" in m, 2, released_at)
            )
            assert first.at - released_at < 0.5
            tg.cancel_scope.cancel()
        messages = [r.getMessage() for r in caplog.records if r.name == "healthd.watchdog"]
        assert messages == [
            "not feeding the watchdog: no progress in status file writer",
            "progress again; feeding the watchdog",
        ]
    finally:
        release.set()


def _checks(daemon: Daemon) -> int:
    state = daemon.store.get("db")
    assert state is not None
    return sum(state.checks_total.values())


def test_a_watchdog_abort_leaves_python_stacks_in_the_log(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    # systemd's watchdog kills with SIGABRT; faulthandler must turn that into stacks.
    config, _ = _config(tmp_path, tcp_target)
    with running_healthd(config) as daemon:
        daemon.notify.wait_for(lambda m: "READY" in m, 15)
        daemon.signal(signal.SIGABRT)
        assert daemon.popen.wait(10) == -signal.SIGABRT
        log = daemon.log()
        assert "Fatal Python error: Aborted" in log
        assert "Current thread" in log
        assert 'File "' in log


# --- a service manager that does not read ------------------------------------------------------


class _DeafNotifySocket:
    """A notify socket whose owner never reads: its receive queue is filled up front, so
    every further datagram meets a full queue (EAGAIN), as when systemd is wedged."""

    def __init__(self, directory: Path) -> None:
        self.address = str(directory / "deaf.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._sock.bind(self.address)
        self._filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.queued = 0
        while True:
            try:
                self._filler.sendto(b"X=1", self.address)
            except BlockingIOError:
                break
            self.queued += 1

    def drain(self) -> int:
        """Read everything queued; returns how many datagrams there were."""
        self._sock.setblocking(False)
        count = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv(65536)
                count += 1
        return count

    def close(self) -> None:
        self._sock.close()
        self._filler.close()


def test_a_full_notify_queue_drops_messages_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deaf = _DeafNotifySocket(tmp_path)
    dropped = 0

    def count() -> None:
        nonlocal dropped
        dropped += 1

    notifier = Notifier(environ={"NOTIFY_SOCKET": deaf.address}, on_dropped=count)
    try:
        started = time.monotonic()
        for _ in range(100):
            assert notifier.send(WATCHDOG=1) is False
        assert time.monotonic() - started < 0.5  # a blocking sendto would never return
        assert dropped == 100
        warnings = [r for r in caplog.records if r.name == "healthd.watchdog"]
        assert len(warnings) == 1
        assert "queue is full" in warnings[0].getMessage()
        deaf.drain()
        assert notifier.send(WATCHDOG=1) is True
    finally:
        notifier.close()
        deaf.close()


def test_a_daemon_keeps_checking_on_schedule_while_systemd_does_not_read(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    deaf = _DeafNotifySocket(tmp_path)
    assert deaf.queued > 0
    config, port = _config(tmp_path, tcp_target)
    env = {"NOTIFY_SOCKET": deaf.address, "WATCHDOG_USEC": "200000"}
    with running_healthd(config, env=env, watchdog_pid="self") as daemon:
        try:
            # READY=1 itself is dropped: the metrics endpoint is how we know the daemon is up.
            deadline = time.monotonic() + 15
            while True:
                try:
                    body = scrape(port)
                    break
                except OSError:
                    assert daemon.popen.poll() is None, daemon.log()
                    assert time.monotonic() < deadline, daemon.log()
                    time.sleep(0.1)
            first = _counter(body, "healthd_checks_total")
            dropped = _counter(body, "healthd_notify_dropped_total")
            assert dropped >= 1  # STATUS= at least (READY=1 follows the metrics server's start)
            started = time.monotonic()
            time.sleep(2.0)  # a window to count checks in
            body = scrape(port)
            elapsed = time.monotonic() - started
            # One check every 0.3 s went on, and the watchdog pings every 0.1 s were dropped.
            assert _counter(body, "healthd_checks_total") - first >= 0.8 * elapsed / 0.3
            assert _counter(body, "healthd_notify_dropped_total") >= dropped + 10
            late = body.split('healthd_scheduler_lateness_seconds_bucket{le="0.5"} ')[1]
            on_time = float(late.split("\n", 1)[0])
            assert _counter(body, "healthd_scheduler_lateness_seconds_count") == on_time
            assert daemon.stop() == 0
            assert daemon.log().count("notify queue is full") == 1
        finally:
            deaf.close()


def _counter(body: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )
