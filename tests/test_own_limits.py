"""healthd's own limits are never a target's trouble: running out of descriptors keeps the
last verdict, the descriptor limit is raised at start, and nothing reaches stderr except
through the log formatter."""

from __future__ import annotations

import dataclasses
import errno
import gc
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from healthd.classify import next_state, stale_state, unchecked_state
from healthd.daemon import CollectorPauses
from healthd.model import ComponentState, Finding, Observation, Snapshot, Status
from healthd.probes._errors import network_failure
from healthd.scheduler import Scheduler
from healthd.state import StateStore
from tests.daemon import (
    daemon_settings,
    free_port,
    in_process_daemon,
    running_healthd,
    until_ready,
    write_config,
)
from tests.http_target import TcpTarget
from tests.probing import make_check

# --- mapping, in-process -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS])
def test_healthd_out_of_resources_is_never_a_network_failure(code: int) -> None:
    # As httpx wraps it: ConnectError from the OSError of socket().
    try:
        try:
            raise OSError(code, os.strerror(code))
        except OSError as exc:
            raise httpx.ConnectError("connect failed") from exc
    except httpx.ConnectError as wrapped:
        failure = network_failure(wrapped, "connect to x")
    assert failure.code == "resource_exhausted"
    assert os.strerror(code) in failure.message


def test_memory_error_is_resource_exhausted() -> None:
    assert network_failure(MemoryError(), "GET /").code == "resource_exhausted"


@pytest.mark.asyncio
async def test_a_check_failing_for_healthd_s_own_lack_keeps_the_last_verdict(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.test_scheduler import _config, _named, _Recorder

    exhausted = False

    async def body(name: str) -> None:
        if exhausted:
            raise OSError(errno.EMFILE, "Too many open files")

    store = StateStore()
    scheduler = Scheduler(store, probes=_Recorder(body).table)
    config = _config({"a": _named(5, 1, "a")})
    await scheduler.run_round(config)
    before = store.get("a")
    assert before is not None
    assert before.reason_code == "ok"
    exhausted = True
    for _ in range(5):
        await scheduler.run_round(config)
    assert store.get("a") == before  # not judged: the same state, not even re-timed
    daemon = store.daemon()
    assert (daemon.probe_resource_errors_total, daemon.probe_errors_total) == (5, 0)
    lines = [r.getMessage() for r in caplog.records if "out of its own resources" in r.getMessage()]
    assert len(lines) == 1, lines


# --- a real daemon -----------------------------------------------------------------------------


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _samples(body: str, name: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    }


def test_a_daemon_out_of_descriptors_never_blames_its_healthy_targets(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    port = free_port()
    components = {f"c{i}": {"kind": "tcp", "address": tcp_target.address} for i in range(4)}
    config = write_config(
        tmp_path / "healthd.toml",
        daemon_settings(
            tmp_path,
            port,
            status_file_refresh="500ms",
            interval="500ms",
            timeout="300ms",
            startup_spread="100ms",
        ),
        components,
    )
    with running_healthd(config, args=("--log-format", "json")) as daemon:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            daemon.wait_for("READY", "1")
            # One kept-alive scrape connection, opened while descriptors were plentiful.
            scrape = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

            def metrics() -> str:
                scrape.request("GET", "/metrics")
                response = scrape.getresponse()
                assert response.status == 200
                return response.read().decode()

            metrics()
            # The kernel's own limit: with a soft limit of 3 every new descriptor (a probe's
            # socket, the status file's temporary file) fails with EMFILE.
            resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (3, hard))
            exhausted_at = time.monotonic()
            cpu_before = _cpu_seconds(daemon.pid)
            # A new scraper meanwhile: the daemon cannot accept it (EMFILE) and must not spin
            # on that; it is answered once descriptors are back.
            late = socket.create_connection(("127.0.0.1", port), timeout=10)
            late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            seen: list[str] = []
            while True:
                body = metrics()
                seen.append(body)
                errors = _samples(body, "healthd_probe_errors_total")
                if errors['healthd_probe_errors_total{reason="resource_exhausted"}'] >= 8:
                    break
                assert time.monotonic() - exhausted_at < 10, errors
                time.sleep(0.1)
            cpu = _cpu_seconds(daemon.pid) - cpu_before
            assert cpu < 0.6 * (time.monotonic() - exhausted_at), cpu
            resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (hard, hard))
            assert late.recv(100).startswith(b"HTTP/1.1 200 ")
            late.close()
            assert errors['healthd_probe_errors_total{reason="probe_error"}'] == 0
            for body in seen:
                # The last verdict stands: every component healthy, only successes counted.
                assert set(_samples(body, "healthd_component_status").values()) == {0.0}
                results = _samples(body, "healthd_checks_total")
                assert all('result="success"' in key for key in results), results
            # Descriptors again: checks complete and are counted.
            checks = sum(_samples(seen[-1], "healthd_checks_total").values())
            deadline = time.monotonic() + 5
            while sum(_samples(metrics(), "healthd_checks_total").values()) < checks + 4:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            scrape.close()
        finally:
            code = daemon.stop()
    assert code == 0
    entries = [json.loads(line) for line in daemon.log().splitlines()]
    messages = [e["message"] for e in entries]
    assert len([m for m in messages if "out of its own resources" in m]) == 1, messages
    assert len([m for m in messages if "cannot accept" in m]) == 1, messages
    assert not [m for m in messages if "is unhealthy" in m or "is degraded" in m], messages


def test_the_daemon_raises_its_descriptor_limit_and_says_so(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    config = write_config(
        tmp_path / "healthd.toml",
        daemon_settings(tmp_path),
        {"db": {"kind": "tcp", "address": tcp_target.address}},
    )

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with running_healthd(config, before_exec=low_soft_limit, ready=True) as daemon:
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
        daemon.stop()
    logged = daemon.log()
    assert f"raised the open-descriptor limit from 256 to {hard}" in logged


# --- nothing on stderr but the formatter's lines -----------------------------------------------

_STRAY = """
import asyncio, gc, threading, warnings
import anyio
from healthd.cli import _setup_logging
from healthd.log_routing import OncePerKind, route_asyncio_to_logging
from healthd.secrets import Redactor

_setup_logging(Redactor(), "json", "info")

def fail():
    raise RuntimeError("boom")

for _ in range(3):
    thread = threading.Thread(target=fail, name="worker")
    thread.start()
    thread.join()

warnings.warn("careful", UserWarning, stacklevel=1)

class Finalizer:
    def __del__(self):
        raise OSError("in a finalizer")

Finalizer()
gc.collect()

async def orphan():
    raise ValueError("never retrieved")

async def main():
    route_asyncio_to_logging(OncePerKind())
    asyncio.get_running_loop().create_task(orphan())
    await asyncio.sleep(0.01)

anyio.run(main)
gc.collect()
"""


def test_thread_exceptions_warnings_and_asyncio_reports_go_through_the_formatter() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _STRAY], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    messages = [e["message"] for e in entries]
    assert messages.count("thread worker failed (logged once)") == 1, messages
    assert any("careful" in m for m in messages), messages
    assert any("in a finalizer" in e.get("exception", "") for e in entries), entries
    assert any("Task exception was never retrieved" in m for m in messages), messages


_SCRAPES = """
import re, sys
from healthd.daemon import return_large_buffers

def rss_mib():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

print(return_large_buffers())
kept = []
before = rss_mib()
for i in range(20):
    text = bytes(10 * 1024 * 1024)  # a scrape's text at 10,000 components
    kept.append(bytes(1000 + i))  # something small that outlives it
    del text
print(rss_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_scrape_text_goes_back_to_the_system() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    fixed, grown = subprocess.run(
        [sys.executable, "-c", _SCRAPES], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert fixed == "True"
    # Without the fixed threshold glibc keeps one such buffer in the heap (10 MiB here).
    assert int(grown) < 5, f"{grown} MiB kept after 20 freed 10 MiB buffers"
    # An operator's own MALLOC_MMAP_THRESHOLD_ is left as it is.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    kept = subprocess.run(
        [sys.executable, "-c", _SCRAPES], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert kept[0] == "False"


def test_httpx_s_command_line_is_never_imported() -> None:
    # rich and click are installed here (MLflow brings them), so httpx would import its CLI.
    script = "import healthd.cli, healthd.probes.http, httpx, sys; print(sorted(m for m in "
    script += "('rich', 'click', 'pygments', 'httpx._main') if sys.modules.get(m)), httpx.main)"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("[] <function main"), out


@pytest.mark.asyncio
async def test_the_running_daemon_keeps_no_snapshot_of_its_start(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    # The run frame lives as long as the daemon: a snapshot kept there pinned every
    # first-round state, 7 MiB at 10,000 checks once every check had run again.
    daemon = in_process_daemon(tmp_path, tcp_target.address)
    run = daemon.run()

    async def running() -> None:
        await run

    async with anyio.create_task_group() as tg:
        tg.start_soon(running)
        await until_ready(daemon)
        assert run.cr_frame is not None
        kept = {
            name: type(value).__name__
            for name, value in run.cr_frame.f_locals.items()
            if isinstance(value, Snapshot | ComponentState)
        }
        tg.cancel_scope.cancel()
    assert kept == {}


# --- what each check leaves behind, and the collector ------------------------------------------

#: ``ComponentState``'s fields, by annotation. States are out of the collector's sight
#: (``model._untrack``), which is only sound while no field can hold an object that reaches the
#: state back: a new field is a decision about that, not an edit.
_STATE_FIELDS = {
    "name": "str", "kind": "str", "critical": "bool", "status": "Status",
    "reason_code": "str", "reason": "str", "latency_seconds": "float",
    "checked_at": "float", "since": "float", "last_success_at": "float | None",
    "consecutive_failures": "int", "consecutive_successes": "int", "details": "Details",
    "checks_total": "Mapping[str, int]", "durations": "Histogram",
    "depends_on": "tuple[str, ...]", "flap_history": "int", "last_failure": "str",
    "impacted_by": "tuple[str, ...]", "evidence": "tuple[str, ...]",
    "maintenance": "Maintenance | None",
}  # fmt: skip


def test_a_state_holds_only_what_cannot_reach_it_back() -> None:
    fields = {field.name: field.type for field in dataclasses.fields(ComponentState)}
    assert fields == _STATE_FIELDS


def test_every_way_of_making_a_state_leaves_it_out_of_the_collector_s_sight() -> None:
    check = make_check("tcp", address="127.0.0.1:1")
    first = unchecked_state("db", check, now=100.0)
    finding = Finding(Status.UNHEALTHY, "refused", "connect refused")
    measured = next_state(
        first, name="db", check=check, finding=finding,
        observation=Observation(0.002, {"address": "127.0.0.1:1"}), now=110.0,
    )  # fmt: skip
    made = [first, measured, stale_state(measured, 90.0), dataclasses.replace(measured)]
    assert [gc.is_tracked(state) for state in made] == [False] * 4
    # What it holds is as it was: nothing is lost by the collector not looking.
    assert measured.checks_total == {"refused": 1}
    assert gc.get_referents(measured)


@pytest.mark.asyncio
async def test_what_each_check_keeps_until_its_next_run_is_out_of_the_collector_s_sight(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    # At 10,000 checks, each run's state, the mapping proxy of its counts and its place in the
    # scheduler's heap filled the collector's middle generation (with history.json's entries,
    # test_history.py): one collection walked 35,000 objects and held the loop for 10-14 ms.
    callbacks = list(gc.callbacks)
    daemon = in_process_daemon(tmp_path, tcp_target.address)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await until_ready(daemon)
        timed = [c for c in gc.callbacks if isinstance(c, CollectorPauses)]
        # Both full collections of start-up, before the first round and after it, are counted
        # by READY, not at the sampler's next tick, after it.
        full_at_ready = daemon.store.daemon().gc_pauses[2].count
        gc.collect()
        kept = [
            daemon.store.get("db"),
            *daemon.store.snapshot().components.values(),
            *daemon.scheduler._due,
        ]
        tg.cancel_scope.cancel()
    assert len(kept) == 3
    assert [type(o).__name__ for o in kept if gc.is_tracked(o)] == []
    # While it ran, every collection was timed; once it stopped, none is.
    assert len(timed) == 1
    assert full_at_ready >= 2
    assert gc.callbacks == callbacks


def test_every_collection_is_timed_by_its_generation() -> None:
    pauses = CollectorPauses()
    gc.callbacks.append(pauses)
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(pauses)
    drained = pauses.drain()
    # The two asked for, and any the allocations between them set off.
    assert [generation for generation, _ in drained][-2:] == [0, 2]
    assert all(0 <= seconds < 5 for _, seconds in drained)
    assert pauses.drain() == []
    store = StateStore()
    store.gc_paused(drained)
    counts = [histogram.count for histogram in store.daemon().gc_pauses]
    assert counts[0] >= 1
    assert counts[2] >= 1
    assert sum(counts) == len(drained)
