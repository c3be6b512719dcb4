"""The JSON status file: its schema, atomic replacement, freshness, and failed writes."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from healthd.exporters import status_file
from healthd.model import ComponentState, Status
from healthd.secrets import Redactor
from healthd.state import StateStore
from tests.daemon import free_port, running_healthd
from tests.http_target import HttpTarget, Reply

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _state(name: str, status: Status, **fields: object) -> ComponentState:
    values: dict[str, object] = {
        "name": name,
        "kind": "http",
        "critical": True,
        "status": status,
        "reason_code": "slow",
        "reason": "GET /api/v1/health took 1.4 s (limit 1 s)",
        "latency_seconds": 1.4032,
        "checked_at": 1_795_000_000.123,
        "since": 1_794_999_000.5,
        "last_success_at": 1_795_000_000.123,
        "consecutive_failures": 0,
        "consecutive_successes": 4,
        "details": {"http_status": 200},
    }
    values.update(fields)
    return ComponentState(**values)  # type: ignore[arg-type]


def test_document_has_the_contracted_shape() -> None:
    store = StateStore(clock=lambda: 1_795_000_001.0)
    store.record(_state("api", Status.DEGRADED), stale_after_seconds=100)
    store.record(
        _state("db", Status.HEALTHY, critical=False, kind="tcp", reason_code="ok", details={}),
        stale_after_seconds=100,
    )
    doc = status_file.document(store.snapshot())
    assert doc["schema_version"] == 1
    assert doc["generated_at"] == "2026-11-18T11:06:41.000Z"
    assert doc["status"] == "degraded"
    assert doc["summary"] == {"healthy": 1, "degraded": 1, "unhealthy": 0}
    api = doc["components"]["api"]
    assert api == {
        "kind": "http",
        "status": "degraded",
        "critical": True,
        "reason_code": "slow",
        "reason": "GET /api/v1/health took 1.4 s (limit 1 s)",
        "latency_ms": 1403.2,
        "checked_at": "2026-11-18T11:06:40.123Z",
        "since": "2026-11-18T10:50:00.500Z",
        "last_success_at": "2026-11-18T11:06:40.123Z",
        "consecutive_failures": 0,
        "details": {"http_status": 200},
    }
    assert all(ISO.match(doc["components"][n]["checked_at"]) for n in ("api", "db"))
    # What goes on disk is that same document, compact and newline-terminated.
    assert json.loads(status_file.render(doc)) == doc
    assert status_file.render(doc).endswith(b"}\n")


def test_a_status_label_is_one_string_however_often_it_is_asked_for() -> None:
    # Every component's cached entry holds its status label: one shared string, not a copy each.
    assert [status.label for status in Status] == ["healthy", "degraded", "unhealthy"]
    assert all(status.label is status.label for status in Status)


def test_document_scrubs_secrets_and_names_the_root_causes_of_an_impacted_component() -> None:
    store = StateStore(clock=lambda: 1_795_000_001.0)
    store.record(
        _state("db", Status.UNHEALTHY, reason="auth as s3cr3t-pw failed"), stale_after_seconds=9
    )
    store.record(
        _state("api", Status.UNHEALTHY, depends_on=("db",), details={"token": "s3cr3t-pw"}),
        stale_after_seconds=9,
    )
    doc = status_file.document(store.snapshot(), Redactor(["s3cr3t-pw"]))
    text = json.dumps(doc)
    assert "s3cr3t-pw" not in text
    assert doc["components"]["db"]["reason"] == "auth as <redacted> failed"
    assert doc["components"]["api"]["impacted_by"] == ["db"]
    assert "impacted_by" not in doc["components"]["db"]


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs where there is one: fsync is then free, so thousands of rewrites
    take a second, and the atomicity under test (rename over a live file) is the same."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(dir=shm, prefix="healthd-test-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_concurrent_reader_never_sees_a_partial_file(fast_dir: Path) -> None:
    tmp_path = fast_dir
    path = tmp_path / "status.json"
    status_file.write_atomic(path, b'{"n": -1}\n')
    rewrites = 2000
    stop = threading.Event()
    reads = 0
    bad: list[str] = []

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            data = path.read_bytes()
            try:
                json.loads(data)
            except ValueError:
                bad.append(data[:80].decode(errors="replace"))
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(rewrites):
            # Sizes vary from tiny to 100 KB, so a torn read could not go unnoticed.
            payload = json.dumps({"n": n, "pad": "x" * ((n * 7919) % 100_000)}).encode()
            status_file.write_atomic(path, payload)
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert reads > 100
    assert json.loads(path.read_bytes())["n"] == rewrites - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "pieces"])
def test_failed_write_keeps_the_last_good_file_and_leaves_no_temp_file(
    tmp_path: Path, pieces: bool
) -> None:
    path = tmp_path / "status.json"
    # In pieces, as the status writer hands them over, the first fits and a later one fails.
    payload: bytes | list[bytes | memoryview] = (
        [b"x" * 512, memoryview(b"y" * 100_000), b"\n"] if pieces else b"x" * 100_000
    )
    status_file.write_atomic(path, b'{"good": true}\n')
    # A real kernel refusal: a file-size limit makes write() fail with EFBIG, as a full disk
    # makes it fail with ENOSPC. SIGXFSZ would kill the process, so ignore it meanwhile.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old_limit[1]))
    try:
        with pytest.raises(OSError, match="too large") as failure:
            status_file.write_atomic(path, payload)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert failure.value.errno == errno.EFBIG
    assert path.read_bytes() == b'{"good": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def _config(
    tmp_path: Path, target: HttpTarget, status_path: Path, refresh: str = "0.2s"
) -> tuple[Path, int]:
    config = tmp_path / "healthd.toml"
    port = free_port()
    config.write_text(
        f"""
[daemon]
metrics_address = "127.0.0.1:{port}"
status_file = "{status_path}"
status_file_refresh = "{refresh}"
interval = "10s"
timeout = "2s"
startup_spread = "10ms"

[components.api]
kind = "http"
url = "{target.url("/health")}"
critical = true
"""
    )
    return config, port


def test_daemon_refreshes_the_file_so_generated_at_shows_freshness(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    http_target.route("/health", Reply(body=b"ok"))
    status_path = tmp_path / "state" / "status.json"
    config, _ = _config(tmp_path, http_target, status_path)
    with running_healthd(config, ready=True) as healthd:
        # READY promises that the first status file is already there, with a real verdict.
        first = json.loads(status_path.read_bytes())
        assert first["components"]["api"]["status"] == "healthy"
        inode = status_path.stat().st_ino
        deadline = 50
        while status_path.stat().st_ino == inode and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        second = json.loads(status_path.read_bytes())
        code = healthd.stop()
    assert code == 0
    assert second["generated_at"] > first["generated_at"]
    assert second["components"]["api"]["checked_at"] == first["components"]["api"]["checked_at"]


def test_daemon_logs_a_failing_status_file_once_counts_it_and_keeps_running(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    http_target.route("/health", Reply(body=b"ok"))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    config, port = _config(tmp_path, http_target, blocker / "status.json", refresh="0.1s")
    counter = re.compile(r"^healthd_status_file_write_failures_total (\S+)$", re.M)
    with running_healthd(config, ready=True) as healthd:
        failures = 0.0
        for _ in range(100):
            found = counter.search(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
            assert found is not None
            failures = float(found.group(1))
            if failures >= 3:
                break
            threading.Event().wait(0.05)
        code = healthd.stop()
        stderr = healthd.log()
    assert code == 0
    assert failures >= 3
    assert stderr.count("cannot write status file") == 1
    assert "Traceback" not in stderr
    assert os.path.isfile(blocker)
