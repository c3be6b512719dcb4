"""The metrics server under hostile and careless clients: no thread per connection, a cap on
connections, idle and slowloris connections closed, gzip for Prometheus, and nothing on stderr
when a client hangs up mid-scrape."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import os
import re
import resource
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from healthd.exporters.metrics import MetricsServer
from healthd.listener import ListenerLimits
from healthd.model import ComponentState
from healthd.state import StateStore
from tests.daemon import daemon_settings, free_port, running_healthd, write_config
from tests.http_target import TcpTarget
from tests.probing import make_state

NOW = 1_800_000_000.0


def _state(name: str) -> ComponentState:
    return make_state(
        name,
        reason="connected",
        latency_seconds=0.001,
        checked_at=NOW,
        since=NOW,
        last_success_at=NOW,
        consecutive_successes=1,
        checks_total={"success": 1},
    )


@pytest.fixture
def store() -> StateStore:
    store = StateStore(clock=lambda: NOW)
    for i in range(300):  # about 0.7 MB of text: more than a socket buffer takes at once
        store.record(_state(f"component-{i:03d}"), stale_after_seconds=60)
    return store


@pytest.fixture
def server(store: StateStore) -> Iterator[MetricsServer]:
    server = MetricsServer(
        "127.0.0.1",
        0,
        store.snapshot,
        "1.2.3",
        limits=ListenerLimits(max_connections=8, idle_timeout_seconds=0.5),
    )
    server.start()
    yield server
    server.stop()


def _get(
    server: MetricsServer, path: str = "/metrics", method: str = "GET", **headers: str
) -> http.client.HTTPResponse:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def _connect(server: MetricsServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=5)
    return sock


def _closed_by_server(sock: socket.socket, within_seconds: float) -> bool:
    """Whether the server closes ``sock`` within the time (anything it sends is skipped)."""
    sock.settimeout(within_seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


# --- HTTP --------------------------------------------------------------------------------------


def test_metrics_are_gzipped_for_a_scraper_that_accepts_gzip(server: MetricsServer) -> None:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Vary"] == "Accept-Encoding"
    text = gzip.decompress(body)
    assert len(body) < len(text) / 5
    # One gzip member with the process metrics after the snapshot's text.
    assert text.startswith(server.exposition().split(b"# HELP process_")[0])
    assert b"# HELP process_open_fds" in text
    assert text.endswith(b"\n")


def test_gzip_of_an_unchanged_snapshot_is_compressed_once(server: MetricsServer) -> None:
    first = server.exposition_gzip()
    cached = server._gzip_cache
    again = server.exposition_gzip()
    assert server._gzip_cache is cached
    assert (
        gzip.decompress(first).split(b"# HELP process_")[0]
        == (gzip.decompress(again).split(b"# HELP process_")[0])
    )


@pytest.mark.parametrize("accept", ["", "identity", "gzip;q=0", "br, deflate"])
def test_metrics_are_plain_when_gzip_is_not_accepted(server: MetricsServer, accept: str) -> None:
    response = _get(server, **({"Accept-Encoding": accept} if accept else {}))
    assert response.status == 200
    assert response.headers["Content-Encoding"] is None


def test_head_root_404_and_405(server: MetricsServer) -> None:
    head = _get(server, method="HEAD")
    assert head.status == 200
    assert int(head.headers["Content-Length"]) > 100_000
    assert _get(server, "/").status == 200
    assert _get(server, "/nope").status == 404
    post = _get(server, method="POST")
    assert post.status == 405
    assert post.headers["Allow"] == "GET, HEAD"


def test_http11_connections_are_kept_alive_and_http10_ones_closed(server: MetricsServer) -> None:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    assert conn.sock is not None  # still the first connection
    conn.close()
    sock = _connect(server)
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert _closed_by_server(sock, 2)
    sock.close()


def test_an_oversized_request_head_is_refused(server: MetricsServer) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * 20_000 + b"\r\n\r\n")
    sock.settimeout(2)
    # 431, or 400 when the whole head arrived at once: h11 says which.
    assert re.match(rb"HTTP/1.1 4(31|00) ", sock.recv(100))
    assert _closed_by_server(sock, 2)
    sock.close()


# --- limits ------------------------------------------------------------------------------------


def test_idle_and_slowloris_connections_are_closed_after_the_idle_timeout(
    server: MetricsServer,
) -> None:
    idle = _connect(server)
    slow = _connect(server)
    started = time.monotonic()
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")
    # A byte every 0.1 s keeps the connection busy, but its head never completes.
    for _ in range(12):
        time.sleep(0.1)
        try:
            slow.sendall(b"X")
        except OSError:
            break
    assert _closed_by_server(slow, 1)
    assert _closed_by_server(idle, 1)
    assert time.monotonic() - started < 2.0
    idle.close()
    slow.close()
    assert server.connections == 0


def test_connections_beyond_the_cap_evict_the_longest_waiting(server: MetricsServer) -> None:
    hogs = [_connect(server) for _ in range(30)]
    try:
        # The newest connections hold the 8 slots; the first ones were closed to make room.
        assert all(_closed_by_server(sock, 1) for sock in hogs[:20])
        assert server.connections <= 8
        response = _get(server, "/")
        assert response.status == 200
    finally:
        for sock in hogs:
            sock.close()


def test_a_client_hanging_up_mid_scrape_leaves_no_trace(
    server: MetricsServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    for _ in range(50):
        sock = _connect(server)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(10)  # the answer has begun
        # Reset, not a polite close: the server's next send fails with ECONNRESET or EPIPE.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert _get(server, "/").status == 200
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_ipv6_addresses_bind(store: StateStore) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = MetricsServer("[::1]", 0, store.snapshot, "1.2.3")
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    server.start()
    try:
        host, port = server.address
        assert host == "::1"
        conn = http.client.HTTPConnection("::1", port, timeout=5)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.stop()


# --- against a real daemon ---------------------------------------------------------------------


class _Abuse:
    """Idle connections that never send a byte, and slowloris ones that send a header byte
    every second and reconnect when closed, all driven by one thread with a selector."""

    def __init__(self, port: int, idle: int, slowloris: int) -> None:
        self._port = port
        self._selector = selectors.DefaultSelector()
        self.idle = [self._open() for _ in range(idle)]
        self._slow = [self._open() for _ in range(slowloris)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dribble, daemon=True)
        self._thread.start()

    def _open(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        # Non-blocking: a full accept queue must not stall the test, only the daemon's peers.
        sock.connect_ex(("127.0.0.1", self._port))
        return sock

    def _dribble(self) -> None:
        sent = dict.fromkeys(self._slow, 0)
        while not self._stop.wait(1.0):
            for sock in list(sent):
                data = b"GET /metrics HTTP/1.1\r\n" if sent[sock] == 0 else b"X"
                try:
                    sock.send(data)
                    sent[sock] += 1
                except OSError:
                    sock.close()
                    del sent[sock]
                    sent[self._open()] = 0
        for sock in sent:
            sock.close()

    def closed_by_server(self) -> int:
        """How many idle connections the server has closed."""
        count = 0
        for sock in self.idle:
            try:
                count += sock.recv(1) == b""
            except ConnectionResetError:
                count += 1
            except OSError:
                continue
        return count

    def stop_dribbling(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def close(self) -> None:
        self.stop_dribbling()
        for sock in self.idle:
            sock.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Threads:\s+(\d+)", status, re.M)
    assert match is not None
    return int(match.group(1))


def _scrape(port: int) -> tuple[float, str]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    response = conn.getresponse()
    body = gzip.decompress(response.read()).decode()
    conn.close()
    assert response.status == 200
    return time.monotonic() - started, body


def _sum(body: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _raise_own_descriptor_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"this test needs {wanted} descriptors; the hard limit is {hard}")


def test_a_real_daemon_shrugs_off_idle_slowloris_and_hang_ups(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    _raise_own_descriptor_limit(3000)
    port = free_port()
    config = write_config(
        tmp_path / "healthd.toml",
        daemon_settings(tmp_path, port, interval="500ms", timeout="300ms", startup_spread="100ms"),
        {f"c{i:02d}": {"kind": "tcp", "address": tcp_target.address} for i in range(40)},
    )
    with running_healthd(config, args=("--log-format", "json")) as daemon:
        abuse: _Abuse | None = None
        try:
            daemon.wait_for("READY", "1")
            pid = daemon.pid
            _, body = _scrape(port)
            fds_before, threads_before = _fds(pid), _threads(pid)
            checks_before = _sum(body, "healthd_checks_total")
            late_before = _sum(body, "healthd_scheduler_lateness_seconds_bucket")

            abuse = _Abuse(port, idle=2000, slowloris=200)
            # The flood is in: the daemon accepted it and closed all but the newest 64 or so.
            deadline = time.monotonic() + 10
            while abuse.closed_by_server() < 1900:
                assert time.monotonic() < deadline, abuse.closed_by_server()
                time.sleep(0.05)
            abused_at = time.monotonic()
            latencies, fds, threads = [], [], []
            while time.monotonic() - abused_at < 6:
                latency, body = _scrape(port)
                latencies.append(latency)
                fds.append(_fds(pid))
                threads.append(_threads(pid))
                time.sleep(0.2)
            # Hang-ups mid-scrape, with a reset: the daemon's writes fail.
            for _ in range(50):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(10)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            _, body = _scrape(port)
            elapsed = time.monotonic() - abused_at
            latencies.sort()
            # Every scrape answered at once (a SYN dropped by a full queue would be 1 s); the
            # median is what a quiet daemon gives on this shared machine.
            assert latencies[len(latencies) // 2] < 0.1, [round(x * 1000) for x in latencies]
            assert latencies[-1] < 1.0, [round(x * 1000) for x in latencies]
            # 64 metrics connections at most, 40 probes' sockets, never 2,200 connections' worth.
            assert max(fds) <= fds_before + 64 + 40 + 10, (fds_before, fds)
            assert max(threads) <= threads_before + 2, (threads_before, threads)
            # 40 checks every 0.5 s kept their schedule: none started half a second late.
            checks = _sum(body, "healthd_checks_total") - checks_before
            assert checks >= 0.8 * 40 * elapsed / 0.5, (checks, elapsed)
            late = body.split('healthd_scheduler_lateness_seconds_bucket{le="0.5"} ')[1]
            on_time = float(late.split("\n", 1)[0])
            total = _sum(body, "healthd_scheduler_lateness_seconds_count")
            assert total - on_time == 0, body
            assert late_before >= 0

            # The slowloris stop; every connection the daemon still holds is idle, and is closed
            # 5 s after it was accepted. (Connections the kernel never queued cost it nothing.)
            abuse.stop_dribbling()
            deadline = time.monotonic() + 15
            while _fds(pid) > fds_before + 40:
                assert time.monotonic() < deadline, (fds_before, _fds(pid))
                time.sleep(0.2)
            assert abuse.closed_by_server() > 64
        finally:
            if abuse is not None:
                abuse.close()
            code = daemon.stop()
    assert code == 0
    lines = daemon.log().splitlines()
    assert lines
    for line in lines:
        json.loads(line)  # every line went through the JSON formatter


def test_a_failing_render_is_a_500_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> StateStore:
        raise RuntimeError("render bug")

    server = MetricsServer("127.0.0.1", 0, broken, "1.2.3")  # type: ignore[arg-type]
    server.start()
    try:
        assert [_get(server).status for _ in range(3)] == [500, 500, 500]
        assert _get(server, "/").status == 200
    finally:
        server.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["rendering /metrics failed (logged once)"]
