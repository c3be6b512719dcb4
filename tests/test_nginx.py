"""The nginx snippet with a real nginx, while a real healthd rewrites the status file flat out.

Every one of thousands of reads must be a complete JSON document with the snippet's headers:
the atomic rename in the writer and ``open_file_cache off`` in nginx together guarantee it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import daemon_settings, free_port, running_healthd, write_config
from tests.http_target import TcpTarget
from tests.nginx import Nginx, nginx_binary

_READS = 3000
_REWRITES = 40


pytestmark = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, Path]]:
    """nginx in front of a healthd that rewrites its status file every millisecond."""
    tmp = tmp_path_factory.mktemp("nginx")
    status_file = tmp / "state" / "status.json"
    settings = daemon_settings(
        tmp,
        status_file=str(status_file),
        status_file_refresh="1ms",
        status_details="summary",
        interval="100ms",
        timeout="80ms",
    )
    with TcpTarget() as target:
        components = {
            "api": {"kind": "tcp", "address": target.address, "critical": True},
            "db": {"kind": "tcp", "address": f"127.0.0.1:{free_port()}", "description": "primary"},
        }
        config = write_config(tmp / "healthd.toml", settings, components)
        with (
            running_healthd(config, ready=True),
            contextlib.closing(Nginx(tmp / "nginx", status_file.parent)) as nginx,
        ):
            yield nginx, status_file


def test_thousands_of_reads_during_rewrites_are_complete_json_with_the_right_headers(
    served: tuple[Nginx, Path],
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


def test_summary_details_leave_out_reasons_and_addresses(served: tuple[Nginx, Path]) -> None:
    nginx, _ = served
    _, _, body = nginx.get("/status.json")
    text = body.decode()
    doc = json.loads(text)
    db = doc["components"]["db"]
    assert db["status"] == "unhealthy"
    assert db["reason_code"] == "connection_refused"
    assert "reason" not in db
    assert "details" not in db
    assert "127.0.0.1" not in text


def test_conditional_requests_always_get_the_current_document(
    served: tuple[Nginx, Path],
) -> None:
    nginx, _ = served
    _, headers, _ = nginx.get("/status.json")
    modified = headers.get("Last-Modified") or "Thu, 01 Jan 2099 00:00:00 GMT"
    status, _, body = nginx.get("/status.json", headers={"If-Modified-Since": modified})
    assert status == 200
    assert json.loads(body)["schema_version"] == 1


def test_metrics_are_not_exposed_and_writes_are_refused(served: tuple[Nginx, Path]) -> None:
    nginx, _ = served
    status, _, body = nginx.get("/metrics")
    assert status == 404
    assert b"healthd_" not in body
    assert nginx.get("/status.json", method="POST", body=b"{}")[0] == 403
