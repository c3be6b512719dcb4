"""The status file writer: coalesced rewrites, off the loop, failures counted and logged."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import threading
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest

from healthd.config import DaemonConfig, DetailLevel
from healthd.exporters import status_file
from healthd.exporters.status_writer import StatusFileWriter
from healthd.model import ComponentState, Maintenance, Snapshot, Status
from healthd.secrets import Redactor
from healthd.state import StateStore
from tests.daemon import free_port, running_healthd
from tests.http_target import HttpTarget, Reply
from tests.probing import make_state


def _state(name: str, status: Status = Status.HEALTHY, **fields: object) -> ComponentState:
    now = time.time()
    values: dict[str, object] = {
        "reason": "connected",
        "latency_seconds": 0.001,
        "checked_at": now,
        "since": now,
        "last_success_at": now,
        "consecutive_successes": 1,
    }
    return make_state(name, status, **{**values, **fields})


def _store(count: int) -> StateStore:
    at = time.time()
    store = StateStore(clock=lambda: at)  # one generated_at, so documents compare whole
    for i in range(count):
        store.record(_state(f"c{i:03d}"), stale_after_seconds=3600)
    return store


class _Writes:
    """Counts writes as the worker thread finishes them, and lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []
        self._cond = threading.Condition()

    def __call__(self, snapshot: Snapshot) -> None:
        with self._cond:
            self.snapshots.append(snapshot)
            self._cond.notify_all()

    async def wait_for(self, count: int, timeout_seconds: float = 5.0) -> None:
        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.snapshots) >= count, timeout_seconds)

        assert await anyio.to_thread.run_sync(wait), (count, len(self.snapshots))


@pytest.mark.asyncio
async def test_a_hundred_changes_within_the_minimum_interval_give_at_most_two_writes(
    tmp_path: Path,
) -> None:
    store = _store(100)
    writes = _Writes()
    config = DaemonConfig(
        status_file=tmp_path / "status.json",
        # Long enough that recording the hundred changes fits inside it on a busy machine.
        status_file_min_interval=1.0,
        status_file_refresh=60,
    )
    writer = StatusFileWriter(store, config, Redactor(), on_written=writes)
    writer.prepare()
    async with anyio.create_task_group() as tg:
        # The minimum interval runs from the start of a write, not from its end.
        first_at = anyio.current_time()
        await writer.write()
        tg.start_soon(writer.run)
        for i in range(100):
            store.record(_state(f"c{i:03d}", Status.DEGRADED), stale_after_seconds=3600)
            writer.changed()
            await anyio.lowlevel.checkpoint()
        await writes.wait_for(2)
        second_at = anyio.current_time()
        # Proving that no third write comes needs a window to pass: one more minimum interval.
        await anyio.sleep(1.1)
        tg.cancel_scope.cancel()
    assert len(writes.snapshots) == 2
    assert second_at - first_at >= 1.0
    doc = json.loads((tmp_path / "status.json").read_bytes())
    assert doc["summary"] == {"healthy": 0, "degraded": 100, "unhealthy": 0}
    assert store.daemon().status_file_writes_total == 2
    assert store.daemon().status_file_write_duration.count == 2


def test_only_changed_entries_are_rendered_again() -> None:
    store = _store(50)
    document = status_file.StatusDocument(Redactor(["s3cr3t-value"]))
    first = document.render(store.snapshot())
    assert document.rendered_components == 50
    assert document.render(store.snapshot()) == first
    assert document.rendered_components == 0
    store.record(
        _state("c007", Status.UNHEALTHY, reason="login s3cr3t-value refused"),
        stale_after_seconds=3600,
    )
    snapshot = store.snapshot()
    changed = document.render(snapshot)
    assert document.rendered_components == 1
    # The assembled bytes are exactly the whole document rendered at once, secrets scrubbed.
    redactor = Redactor(["s3cr3t-value"])
    assert changed == status_file.render(status_file.document(snapshot, redactor))
    assert b"s3cr3t-value" not in changed
    # Components that come and go keep everyone else's cached entry, in name order.
    store.remove("c001")
    store.record(_state("a-new-one"), stale_after_seconds=3600)
    snapshot = store.snapshot()
    assert document.render(snapshot) == status_file.render(status_file.document(snapshot, redactor))
    assert document.rendered_components == 1


@pytest.mark.parametrize("details", ["full", "summary"])
def test_an_entry_refreshed_after_a_check_is_the_whole_entry_rendered_afresh(
    details: DetailLevel,
) -> None:
    # A check that keeps the status rewrites only the entry's end (``_check_fields``): change
    # every field at random, secrets and their quoted forms included, and compare the file
    # with one rendered whole.
    rng = random.Random(5)
    secret = "s3cr3t-value"
    names = [f"c{i}" for i in range(8)]
    now = time.time()
    texts = ["connected", f"login {secret} refused", 'said "no" \\ twice', "caf\u00e9 \u2603"]
    changes = {
        "kind": lambda: rng.choice(["http", "tcp"]),
        "critical": lambda: rng.random() < 0.5,
        "status": lambda: rng.choice(list(Status)),
        "reason_code": lambda: rng.choice(["ok", "timeout"]),
        "reason": lambda: rng.choice(texts),
        "latency_seconds": lambda: rng.choice([0.001, 0.25, 2.5, 1 / 3]),
        "checked_at": lambda: now + rng.random() * 100,
        "since": lambda: now - rng.randrange(100),
        "last_success_at": lambda: rng.choice([None, now - rng.randrange(100)]),
        "consecutive_failures": lambda: rng.randrange(4),
        "details": lambda: rng.choice([{}, {"http_status": 200}, {"body": rng.choice(texts)}]),
        "impacted_by": lambda: tuple(rng.sample(names, rng.randrange(3))),
        "maintenance": lambda: rng.choice([None, Maintenance(now + 60, secret, "cli")]),
    }
    world = {name: _state(name) for name in names}
    redactor = Redactor([secret])
    document = status_file.StatusDocument(redactor, details)
    base = StateStore(clock=lambda: now).snapshot()
    refreshed = 0
    for _ in range(400):
        name = rng.choice(names)
        # Mostly what a check changes while the status holds; now and then anything at all.
        if rng.random() < 0.7:
            fields = {
                "checked_at": now + rng.random() * 100,
                "latency_seconds": rng.random(),
                "consecutive_failures": rng.randrange(4),
            }
            refreshed += 1
        else:
            field = rng.choice(list(changes))
            fields = {field: changes[field]()}
        world[name] = dataclasses.replace(world[name], **fields)
        snapshot = dataclasses.replace(base, components=dict(world))
        rendered = document.render(snapshot)
        assert rendered == status_file.render(status_file.document(snapshot, redactor, details))
        assert secret.encode() not in rendered
    assert refreshed > 200


@pytest.mark.parametrize("secrets", [("reason", "latency_ms"), ("source", "latency_ms")])
def test_secrets_that_redact_keys_alike_leave_entries_rendered_whole(
    secrets: tuple[str, str],
) -> None:
    # Both keys read "<redacted>": merged into one when both are the entry's, or met first
    # inside "maintenance". Either way the end of an entry cannot be found by its first
    # per-check key, and the file must still be the whole document.
    store = StateStore(clock=lambda: 1_764_000_000.0)
    planned = Maintenance(1_764_003_600.0, "upgrade", "cli")
    state = _state("c001", maintenance=planned)
    store.record(state, stale_after_seconds=3600)
    redactor = Redactor(secrets)
    document = status_file.StatusDocument(redactor)
    document.render(store.snapshot())
    # What a check changes while the status holds, and nothing else.
    checked = dataclasses.replace(state, latency_seconds=0.5, checked_at=state.checked_at + 1)
    store.record(checked, stale_after_seconds=3600)
    snapshot = store.snapshot()
    rendered = document.render(snapshot)
    assert rendered == status_file.render(status_file.document(snapshot, redactor))
    assert b"latency_ms" not in rendered


def test_a_dependency_turning_unhealthy_re_renders_its_dependents() -> None:
    store = StateStore()
    store.record(_state("db"), stale_after_seconds=3600)
    store.record(_state("api", Status.UNHEALTHY, depends_on=("db",)), stale_after_seconds=3600)
    document = status_file.StatusDocument()
    document.render(store.snapshot())
    # Only db is checked again, yet api's entry changes: db is now its root cause.
    store.record(_state("db", Status.UNHEALTHY), stale_after_seconds=3600)
    doc = json.loads(document.render(store.snapshot()))
    assert document.rendered_components == 2
    assert doc["components"]["api"]["impacted_by"] == ["db"]


@pytest.mark.asyncio
async def test_a_directory_missing_at_run_time_is_a_counted_logged_failure_never_recreated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "mnt" / "state"
    path = directory / "status.json"
    store = _store(3)
    writer = StatusFileWriter(store, DaemonConfig(status_file=path), Redactor())
    writer.prepare()  # at start, the directory is created
    await writer.write()
    assert json.loads(path.read_bytes())["summary"]["healthy"] == 3
    shutil.rmtree(directory)  # a volume unmounted under a running healthd
    with caplog.at_level(logging.INFO, logger="healthd"):
        await writer.write()
        await writer.write()
        assert not directory.exists()
        failures = store.daemon().status_file_write_failures_total
        assert failures == 2
        assert [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()] == [
            f"cannot write status file {path}: No such file or directory; keeping the previous file"
        ]
        directory.mkdir()  # the volume is back
        await writer.write()
    assert path.is_file()
    assert store.daemon().status_file_writes_total == 2
    assert any("is being written again" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_a_reload_that_moves_the_file_logs_both_paths_once_and_keeps_the_old_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = tmp_path / "old" / "status.json", tmp_path / "new" / "status.json"
    store = _store(2)
    writer = StatusFileWriter(store, DaemonConfig(status_file=old), Redactor())
    writer.prepare()
    await writer.write()
    before = old.read_bytes()
    new.parent.mkdir()
    with caplog.at_level(logging.INFO, logger="healthd"):
        writer.reconfigure(DaemonConfig(status_file=new))
        writer.reconfigure(DaemonConfig(status_file=new))  # a second reload moves nothing
        await writer.write()
    moves = [r.getMessage() for r in caplog.records if "moved" in r.getMessage()]
    assert moves == [f"status_file moved from {old} to {new}; the old file is no longer updated"]
    assert old.read_bytes() == before
    assert json.loads(new.read_bytes())["summary"]["healthy"] == 2


def test_a_running_daemon_exports_its_loop_lag_and_status_file_write_time(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    http_target.route("/health", Reply(body=b"ok"))
    port = free_port()
    config = tmp_path / "healthd.toml"
    config.write_text(
        f"""
[daemon]
metrics_address = "127.0.0.1:{port}"
status_file = "{tmp_path / "state" / "status.json"}"
interval = "10s"

[components.api]
kind = "http"
url = "{http_target.url("/health")}"
"""
    )
    count = re.compile(r"^(healthd_\w+_seconds)_count (\S+)$", re.M)
    with running_healthd(config, ready=True) as healthd:
        counts: dict[str, float] = {}
        # The lag sampler wakes ten times a second; wait for a few of its observations.
        for _ in range(100):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            counts = {name: float(value) for name, value in count.findall(text)}
            if counts.get("healthd_event_loop_lag_seconds", 0) >= 3:
                break
            threading.Event().wait(0.05)
        code = healthd.stop()
    assert code == 0
    assert counts["healthd_event_loop_lag_seconds"] >= 3
    # READY promises the first status file, written and timed in the writer's thread.
    assert counts["healthd_status_file_write_duration_seconds"] >= 1
    # The histogram per component is off by default.
    assert "healthd_check_duration_seconds_bucket" not in text
