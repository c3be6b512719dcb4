"""The nginx snippet with a real nginx, while a real healthd rewrites the status file flat out.

Every one of thousands of reads must be a complete JSON document with the snippet's headers:
the atomic rename in the writer and ``open_file_cache off`` in nginx together guarantee it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import REPO, daemon_settings, free_port, running_healthd, write_config
from tests.http_target import TcpTarget

SNIPPET = REPO / "config" / "nginx" / "healthd.conf"
_PUBLISHED_PATH = "/var/lib/healthd/status.json"
_READS = 3000
_REWRITES = 40


def _nginx_binary() -> str | None:
    # /usr/sbin is often missing from a non-root PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return found


pytestmark = pytest.mark.skipif(_nginx_binary() is None, reason="nginx is not installed")


class _Nginx:
    """A test-owned nginx (``-p`` prefix in a tmp dir) serving the snippet on loopback."""

    def __init__(self, prefix: Path, status_file: Path) -> None:
        self.port = free_port()
        self.error_log = prefix / "logs" / "error.log"
        (prefix / "logs").mkdir(parents=True)
        (prefix / "tmp").mkdir()
        snippet = SNIPPET.read_text()
        assert _PUBLISHED_PATH in snippet
        # The only change to the shipped snippet: where the status file lives in this test.
        (prefix / "healthd.conf").write_text(snippet.replace(_PUBLISHED_PATH, str(status_file)))
        user = "user root;" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {prefix}/tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"""
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
{temp}
    server {{
        listen 127.0.0.1:{self.port};
        include {prefix}/healthd.conf;
    }}
}}
"""
        )
        binary = _nginx_binary()
        assert binary is not None
        # -e: even before reading the config, nginx opens an error log; keep it in the prefix.
        command = [binary, "-p", str(prefix), "-e", str(self.error_log)]
        command += ["-c", str(prefix / "nginx.conf")]
        subprocess.run([*command, "-t", "-q"], check=True, capture_output=True)
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.process.poll() is None, self.process.stderr
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.02)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Nginx, Path]]:
    """nginx in front of a healthd that rewrites its status file every millisecond."""
    tmp = tmp_path_factory.mktemp("nginx")
    status_file = tmp / "state" / "status.json"
    target = TcpTarget()
    closed = free_port()
    settings = daemon_settings(
        tmp,
        status_file=str(status_file),
        status_file_refresh="1ms",
        status_details="summary",
        interval="100ms",
        timeout="80ms",
    )
    components = {
        "api": {"kind": "tcp", "address": target.address, "critical": True},
        "db": {"kind": "tcp", "address": f"127.0.0.1:{closed}", "description": "primary"},
    }
    config = write_config(tmp / "healthd.toml", settings, components)
    try:
        with running_healthd(config) as daemon:
            daemon.wait_for("READY", "1")
            nginx = _Nginx(tmp / "nginx", status_file)
            try:
                yield nginx, status_file
            finally:
                nginx.stop()
    finally:
        target.stop()


def test_thousands_of_reads_during_rewrites_are_complete_json_with_the_right_headers(
    served: tuple[_Nginx, Path],
) -> None:
    nginx, _ = served
    conn = nginx.connection()
    seen: set[str] = set()
    reads = 0
    deadline = time.monotonic() + 15
    # Thousands of reads, spread over at least _REWRITES different documents: fsync paces the
    # writer, so on a slow disk the reads go on until the file has really changed under them.
    while reads < _READS or len(seen) < _REWRITES:
        assert time.monotonic() < deadline, (reads, len(seen))
        conn.request("GET", "/status.json")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/json"
        assert response.getheader("Cache-Control") == "no-cache"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.getheader("Access-Control-Allow-Origin") == "*"
        assert response.getheader("ETag") is None
        doc = json.loads(body)  # a torn read would fail here
        assert set(doc["components"]) == {"api", "db"}
        seen.add(doc["generated_at"])
        reads += 1
    conn.close()


def test_summary_details_leave_out_reasons_and_addresses(served: tuple[_Nginx, Path]) -> None:
    nginx, _ = served
    conn = nginx.connection()
    conn.request("GET", "/status.json")
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    doc = json.loads(text)
    db = doc["components"]["db"]
    assert db["status"] == "unhealthy"
    assert db["reason_code"] == "connection_refused"
    assert "reason" not in db
    assert "details" not in db
    assert "127.0.0.1" not in text


def test_conditional_requests_always_get_the_current_document(
    served: tuple[_Nginx, Path],
) -> None:
    nginx, _ = served
    conn = nginx.connection()
    conn.request("GET", "/status.json")
    first = conn.getresponse()
    first.read()
    modified = first.getheader("Last-Modified") or "Thu, 01 Jan 2099 00:00:00 GMT"
    conn.request("GET", "/status.json", headers={"If-Modified-Since": modified})
    again = conn.getresponse()
    assert again.status == 200
    assert json.loads(again.read())["schema_version"] == 1
    conn.close()


def test_metrics_are_not_exposed_and_writes_are_refused(served: tuple[_Nginx, Path]) -> None:
    nginx, _ = served
    conn = nginx.connection()
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 404
    assert b"healthd_" not in response.read()
    conn.request("POST", "/status.json", body=b"{}")
    response = conn.getresponse()
    response.read()
    assert response.status == 403
    conn.close()
