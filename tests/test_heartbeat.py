"""Job heartbeats: the pure judge, the pings store, and real pushes over HTTP to a real
``healthd run``, through the push listener and ``healthd ping``."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from healthd.config import HeartbeatCheck
from healthd.heartbeats import Pings, PingStore, PushServer
from healthd.model import Observation, Status
from healthd.probes.heartbeat import HeartbeatFacts, assess, human_seconds
from tests.daemon import Healthd, free_port, healthd_cli, running_healthd

TOKEN = "hb-T0ken/with+plus%and"
NOW = 1_800_000_000.0


def _check(**fields: Any) -> HeartbeatCheck:
    values: dict[str, Any] = {"period": "5m", "grace": "1m"}
    values.update(fields)
    return HeartbeatCheck(**values)


def _judge(pings: Pings, **fields: Any) -> tuple[Status, str, str]:
    finding = assess(_check(**fields), Observation(0.0, payload=HeartbeatFacts(NOW, pings)))
    return finding.status, finding.reason_code, finding.reason


# --- the judge -----------------------------------------------------------------------------

JUDGEMENTS: dict[str, tuple[Pings, dict[str, Any], Status, str, str]] = {
    "a recent ping is ok": (
        Pings(NOW - 3600, success_at=NOW - 120),
        {},
        Status.HEALTHY,
        "ok",
        "last ping 2 min ago",
    ),
    "a ping older than period and grace is missed, saying what was expected": (
        Pings(NOW - 3600, success_at=NOW - 420),
        {},
        Status.UNHEALTHY,
        "missed",
        "last ping 7 min ago; expected every 5 min + 1 min grace",
    ),
    "no ping yet within the first period is waiting, not missed": (
        Pings(NOW - 200),
        {},
        Status.HEALTHY,
        "waiting",
        "waiting for the first ping; expected every 5 min + 1 min grace",
    ),
    "no ping for longer than period and grace since watching began is missed": (
        Pings(NOW - 400),
        {},
        Status.UNHEALTHY,
        "missed",
        "no ping since healthd began watching 6.7 min ago",
    ),
    "a failure names its exit code": (
        Pings(NOW - 3600, success_at=NOW - 600, fail_at=NOW - 30, exit_code=3),
        {},
        Status.UNHEALTHY,
        "failed",
        "job failed (exit code 3) 30 s ago",
    ),
    "a failure without an exit code says so": (
        Pings(NOW - 3600, fail_at=NOW - 30),
        {},
        Status.UNHEALTHY,
        "failed",
        "no exit code",
    ),
    "a success after a failure is ok again": (
        Pings(NOW - 3600, success_at=NOW - 10, fail_at=NOW - 300, exit_code=1),
        {},
        Status.HEALTHY,
        "ok",
        "last ping 10 s ago",
    ),
    "a run started longer ago than max_runtime is running too long": (
        Pings(NOW - 3600, success_at=NOW - 200, start_at=NOW - 130),
        {"max_runtime": "2m"},
        Status.UNHEALTHY,
        "running_too_long",
        "started 2.2 min ago and not finished; max_runtime 2 min",
    ),
    "a run within max_runtime is ok and says it is running": (
        Pings(NOW - 3600, success_at=NOW - 200, start_at=NOW - 60),
        {"max_runtime": "2m"},
        Status.HEALTHY,
        "ok",
        "running for 1 min",
    ),
    "a run started after a failure and over max_runtime is running too long": (
        Pings(NOW - 3600, fail_at=NOW - 300, exit_code=1, start_at=NOW - 200),
        {"max_runtime": "2m"},
        Status.UNHEALTHY,
        "running_too_long",
        "started 3.3 min ago",
    ),
    "a start before the last success is no run in progress": (
        Pings(NOW - 3600, success_at=NOW - 100, start_at=NOW - 1000),
        {"max_runtime": "2m"},
        Status.HEALTHY,
        "ok",
        "last ping 1.7 min ago",
    ),
}


@pytest.mark.parametrize("case", JUDGEMENTS, ids=list(JUDGEMENTS))
def test_assess_judges_pings_against_period_grace_and_max_runtime(case: str) -> None:
    pings, fields, status, code, reason = JUDGEMENTS[case]
    got_status, got_code, got_reason = _judge(pings, **fields)
    assert (got_status, got_code) == (status, code)
    assert reason in got_reason


def test_human_seconds_speaks_in_the_units_of_a_job_schedule() -> None:
    assert [human_seconds(s) for s in (2.5, 45, 300, 90, 5400, 172800)] == [
        "2.5 s",
        "45 s",
        "5 min",
        "1.5 min",
        "1.5 h",
        "2 d",
    ]


# --- the store -----------------------------------------------------------------------------


def test_pings_survive_in_the_file_and_a_damaged_file_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "heartbeats.json"
    store = PingStore(path, clock=lambda: NOW)
    store.watch(["job"])
    assert store.record("job", "fail", 7)
    assert not store.record("other", "success")
    store.save()
    again = PingStore(path, clock=lambda: NOW + 100)
    again.load()
    again.watch(["job", "new"])
    assert again.get("job") == Pings(NOW, fail_at=NOW, exit_code=7)
    assert again.get("new") == Pings(NOW + 100)
    path.write_text('{"heartbeats": {"job": {"watching_since": "soon"}}}')
    damaged = PingStore(path)
    damaged.load()
    assert damaged.get("job") is None


# --- config --------------------------------------------------------------------------------


def _config(tmp_path: Path, body: str, daemon: str = "") -> Path:
    path = tmp_path / "healthd.toml"
    path.write_text(
        f'[daemon]\nstatus_file = "{tmp_path}/status.json"\n{daemon}\n'
        f'[components.job]\nkind = "heartbeat"\n{body}\n'
    )
    return path


BAD_CONFIGS = {
    "period zero": ('period = "0s"', "", "components.job.period"),
    "period negative": ("period = -5", "", "components.job.period"),
    "period missing": ('grace = "1m"', "", "components.job.period: required key is missing"),
    "token with a space": ('period = "5m"\ntoken = "a b"', "", "components.job.token"),
    "push_address without a port": ('period = "5m"', 'push_address = "127.0.0.1"', "push_address"),
    "push_address not this machine's": (
        'period = "5m"',
        'push_address = "192.0.2.1:9470"',
        "daemon.push_address",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_bad_heartbeat_config_exits_78_with_one_line(tmp_path: Path, case: str) -> None:
    body, daemon, expected = BAD_CONFIGS[case]
    result = healthd_cli("config", "validate", "--config", str(_config(tmp_path, body, daemon)))
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_grace_may_be_left_out_and_defaults_to_a_minute(tmp_path: Path) -> None:
    path = _config(tmp_path, 'period = "5m"')
    result = healthd_cli("config", "show", "--config", str(path))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["components"]["job"]["grace"] == 60.0
    assert shown["daemon"]["push_address"] == "127.0.0.1:9470"


# --- a real daemon -------------------------------------------------------------------------


class _Daemon:
    """A running healthd with heartbeats, its push port and its status file."""

    def __init__(
        self, healthd: Healthd, config: Path, push_port: int, metrics_port: int, status: Path
    ) -> None:
        self.healthd = healthd
        self.config = config
        self.base = f"http://127.0.0.1:{push_port}"
        self.status_path = status
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def post(self, path: str, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.base + path, headers=headers, timeout=5, **kwargs)

    def component(self, name: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.status_path.read_text())
        return document["components"][name]  # type: ignore[no-any-return]

    def wait_for(
        self, name: str, test: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """The component's entry once ``test`` holds (the status file is rewritten as soon
        as a verdict changes, and every 0.2 s here)."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.component(name)
            if test(entry) or time.monotonic() > deadline:
                return entry
            time.sleep(0.05)

    def ping(self, *args: str) -> Any:
        return healthd_cli("ping", "--config", str(self.config), *args)


def _daemon_config(tmp_path: Path, push_port: int, metrics_port: int) -> Path:
    path = tmp_path / "healthd.toml"
    path.write_text(
        f"""
[daemon]
metrics_address = "127.0.0.1:{metrics_port}"
push_address = "127.0.0.1:{push_port}"
status_file = "{tmp_path}/status.json"
status_file_refresh = "0.2s"
status_file_min_interval = "0.1s"

[components.cleanup]
kind = "heartbeat"
period = "1h"
grace = "1m"
max_runtime = "2s"
token = "{TOKEN}"

[components.monitor]
kind = "heartbeat"
period = "3s"
grace = "1s"
"""
    )
    return path


@contextmanager
def _running(tmp_path: Path, push_port: int | None = None) -> Iterator[_Daemon]:
    port = push_port or free_port()
    metrics_port = free_port()
    config = _daemon_config(tmp_path, port, metrics_port)
    with running_healthd(config, ready=True) as healthd:
        yield _Daemon(healthd, config, port, metrics_port, tmp_path / "status.json")


def _code(expected: str) -> Callable[[dict[str, Any]], bool]:
    return lambda entry: entry["reason_code"] == expected


def test_pings_over_http_make_ok_failed_and_running_too_long(tmp_path: Path) -> None:
    with _running(tmp_path) as daemon:
        assert daemon.component("cleanup")["reason_code"] == "waiting"
        assert daemon.post("/ping/cleanup").status_code == 200
        assert daemon.wait_for("cleanup", _code("ok"))["reason_code"] == "ok"
        assert daemon.post("/ping/cleanup/fail?exit_code=3").status_code == 200
        failed = daemon.wait_for("cleanup", _code("failed"))
        assert (failed["status"], failed["reason_code"]) == ("unhealthy", "failed")
        assert "exit code 3" in failed["reason"]
        assert daemon.post("/ping/cleanup/start").status_code == 200
        too_long = daemon.wait_for("cleanup", _code("running_too_long"))
        assert too_long["status"] == "unhealthy"
        assert "max_runtime 2.0 s" in too_long["reason"]
        assert daemon.post("/ping/cleanup").status_code == 200
        assert daemon.wait_for("cleanup", _code("ok"))["status"] == "healthy"


def test_a_ping_changes_the_verdict_within_two_seconds(tmp_path: Path) -> None:
    with _running(tmp_path) as daemon:
        daemon.post("/ping/cleanup/fail?exit_code=9")
        sent = time.monotonic()
        entry = daemon.wait_for("cleanup", _code("failed"), timeout=5)
        assert entry["reason_code"] == "failed"
        assert time.monotonic() - sent < 2.0


def test_a_silent_job_is_missed_after_period_and_grace(tmp_path: Path) -> None:
    with _running(tmp_path) as daemon:
        assert daemon.post("/ping/monitor").status_code == 200
        assert daemon.wait_for("monitor", _code("ok"))["reason_code"] == "ok"
        missed = daemon.wait_for("monitor", _code("missed"), timeout=10)
        assert missed["status"] == "unhealthy"
        assert "expected every 3.0 s + 1.0 s grace" in missed["reason"]
        assert missed["reason"].startswith("last ping 4")


BAD_REQUESTS: dict[str, tuple[Callable[[_Daemon], httpx.Response], int]] = {
    "no token": (lambda d: d.post("/ping/cleanup", token=None), 401),
    "wrong token": (lambda d: d.post("/ping/cleanup", token="guess"), 403),
    "token in the wrong scheme": (
        lambda d: httpx.post(d.base + "/ping/cleanup", headers={"Authorization": f"Basic {TOKEN}"}),
        403,
    ),
    "unknown name": (lambda d: d.post("/ping/nosuchjob"), 404),
    "unknown event": (lambda d: d.post("/ping/cleanup/finish"), 404),
    "wrong method": (lambda d: httpx.get(d.base + "/ping/cleanup"), 405),
    "bad exit code": (lambda d: d.post("/ping/cleanup/fail?exit_code=three"), 400),
    "oversized body": (lambda d: d.post("/ping/cleanup", content=b"x" * 20_000), 413),
    "oversized chunked body": (
        lambda d: d.post("/ping/cleanup", content=iter([b"y" * 6000] * 4)),
        413,
    ),
}


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return sock.recv(4096)


def test_bad_requests_get_4xx_and_change_no_verdict(tmp_path: Path) -> None:
    with _running(tmp_path) as daemon:
        for case, (send, code) in BAD_REQUESTS.items():
            assert send(daemon).status_code == code, case
        port = int(daemon.base.rsplit(":", 1)[1])
        assert _raw(port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        # A job's output (under the cap) rides along and is discarded.
        assert daemon.post("/ping/monitor", content=b"log line\n" * 100).status_code == 200
        # Nothing above touched cleanup: still waiting for its first ping.
        time.sleep(1.5)  # longer than the heartbeat interval: the checks ran meanwhile
        assert daemon.component("cleanup")["reason_code"] == "waiting"
        pings = json.loads((tmp_path / "heartbeats.json").read_text())["heartbeats"]
        assert pings["cleanup"]["success_at"] is None
        assert pings["cleanup"]["fail_at"] is None
        code = daemon.healthd.stop()
        log = daemon.healthd.log()
    assert code == 0
    assert "Traceback" not in log


def test_the_last_ping_survives_a_restart_and_missed_is_not_declared_early(
    tmp_path: Path,
) -> None:
    port = free_port()
    with _running(tmp_path, port) as daemon:
        assert daemon.post("/ping/monitor").status_code == 200
        daemon.wait_for("monitor", _code("ok"))
        pinged = json.loads((tmp_path / "heartbeats.json").read_text())
        daemon.healthd.stop()
    with _running(tmp_path, port) as daemon:
        # Right after the restart the old ping counts: ok, not waiting, not missed.
        entry = daemon.component("monitor")
        assert entry["reason_code"] == "ok", entry
        assert entry["details"]["last_ping_at"] == pinged["heartbeats"]["monitor"]["success_at"]
        missed = daemon.wait_for("monitor", _code("missed"), timeout=10)
        assert missed["reason_code"] == "missed"
        # Missed only once period and grace since the persisted ping had passed.
        last = pinged["heartbeats"]["monitor"]["success_at"]
        assert time.time() - last >= 4.0


def test_healthd_ping_reports_and_exits_non_zero_when_refused_or_unreachable(
    tmp_path: Path,
) -> None:
    with _running(tmp_path) as daemon:
        sent = daemon.ping("cleanup", "--fail", "--exit-code", "5")
        assert sent.returncode == 0, sent.stderr
        assert "exit code 5" in daemon.wait_for("cleanup", _code("failed"))["reason"]
        assert daemon.ping("cleanup", "--start").returncode == 0
        assert daemon.ping("cleanup").returncode == 0
        assert daemon.wait_for("cleanup", _code("ok"))["reason_code"] == "ok"
        unknown = daemon.ping("nosuchjob")
        assert unknown.returncode == 64
        assert len(unknown.stderr.strip().splitlines()) == 1
        daemon.healthd.stop()
        unreachable = daemon.ping("monitor")
    assert unreachable.returncode == 69
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1, unreachable.stderr
    assert "cannot reach healthd" in lines[0]


def test_healthd_ping_wraps_a_command_and_exits_with_its_code(tmp_path: Path) -> None:
    with _running(tmp_path) as daemon:
        ok = daemon.ping("cleanup", "--", sys.executable, "-c", "print('cleaned')")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == "cleaned\n"
        assert "job cleanup succeeded in" in ok.stderr
        entry = daemon.wait_for("cleanup", _code("ok"))
        assert entry["reason_code"] == "ok"
        assert "last_start_at" in entry["details"]
        bad = daemon.ping("cleanup", "--", sys.executable, "-c", "raise SystemExit(4)")
        assert bad.returncode == 4
        assert "job cleanup failed with exit code 4 after" in bad.stderr
        assert "exit code 4" in daemon.wait_for("cleanup", _code("failed"))["reason"]
        missing = daemon.ping("cleanup", "--", str(tmp_path / "no-such-program"))
        assert missing.returncode == 127
        assert (
            "exit code 127" in daemon.wait_for("cleanup", lambda e: "127" in e["reason"])["reason"]
        )
        daemon.healthd.stop()
        # healthd down: the job still runs, and its exit code is still the command's.
        alone = daemon.ping("cleanup", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert alone.returncode == 3
    assert "running the job anyway" in alone.stderr


def test_the_token_never_appears_in_logs_status_metrics_or_config_show(tmp_path: Path) -> None:
    with _running(tmp_path) as daemon:
        daemon.post("/ping/cleanup", token="wrong")
        daemon.post("/ping/cleanup")
        daemon.wait_for("cleanup", _code("ok"))
        metrics = httpx.get(daemon.metrics_url).text
        status = daemon.status_path.read_text()
        pings = (tmp_path / "heartbeats.json").read_text()
        daemon.healthd.stop()
        log = daemon.healthd.log()
    shown = healthd_cli("config", "show", "--config", str(daemon.config))
    check = healthd_cli("check", "--json", "--config", str(daemon.config))
    assert "healthd_component_status" in metrics
    for where, text in {
        "log": log,
        "metrics": metrics,
        "status file": status,
        "pings file": pings,
        "config show": shown.stdout + shown.stderr,
        "check": check.stdout + check.stderr,
    }.items():
        assert TOKEN not in text, where
        assert TOKEN.replace("/", "%2F") not in text, where


def test_healthd_ping_needs_only_its_own_part_of_the_config(tmp_path: Path) -> None:
    """A cron job cannot resolve the service's ${credential:} secrets; ping never tries."""
    path = tmp_path / "healthd.toml"
    port = free_port()
    path.write_text(
        f'[daemon]\npush_address = "127.0.0.1:{port}"\n'
        '[components.web]\nkind = "http"\nurl = "http://127.0.0.1:1/"\n'
        'headers = { Authorization = "${credential:web_token}" }\n'
        '[components.job]\nkind = "heartbeat"\nperiod = "5m"\n'
    )
    result = healthd_cli("ping", "--config", str(path), "job", env={"CREDENTIALS_DIRECTORY": ""})
    # Not 78: the config was good enough; healthd just is not running.
    assert result.returncode == 69, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr


def test_a_busy_push_address_fails_fast_with_exit_75(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _daemon_config(tmp_path, port, free_port())
        result = healthd_cli("run", "--config", str(config), timeout=20)
    assert result.returncode == 75, result.stderr
    assert f"cannot listen on push_address 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_reload_takes_the_new_token_at_once(tmp_path: Path) -> None:
    with _running(tmp_path) as daemon:
        text = daemon.config.read_text()
        daemon.config.write_text(text.replace(TOKEN, "rotated-token-2"))
        daemon.healthd.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while daemon.post("/ping/cleanup", token="rotated-token-2").status_code != 200:
            assert time.monotonic() < deadline, "the new token was never accepted"
            time.sleep(0.05)
        assert daemon.post("/ping/cleanup").status_code == 403


def _reloaded(healthd: Healthd, timeout: float = 15) -> None:
    """Send SIGHUP and wait for the reload's own READY=1 (the first was the start's)."""
    healthd.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while sum(m.get("READY") == "1" for m in healthd.messages) < 2:
        assert time.monotonic() < deadline, "the reload never finished"
        time.sleep(0.05)


def _without_heartbeats(tmp_path: Path, push_port: int, metrics_port: int) -> tuple[Path, str]:
    """A config with no heartbeat, and the text of the same with one added."""
    config = _daemon_config(tmp_path, push_port, metrics_port)
    daemon = config.read_text().split("[components.cleanup]")[0]
    config.write_text(daemon + '[components.up]\nkind = "tcp"\naddress = "127.0.0.1:1"\n')
    return config, config.read_text() + '[components.added]\nkind = "heartbeat"\nperiod = "1h"\n'


def test_a_reload_that_adds_the_first_heartbeat_opens_the_push_port(tmp_path: Path) -> None:
    push_port = free_port()
    config, with_heartbeat = _without_heartbeats(tmp_path, push_port, free_port())
    with running_healthd(config, ready=True) as healthd:
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"http://127.0.0.1:{push_port}/ping/added", timeout=5)
        config.write_text(with_heartbeat)
        _reloaded(healthd)
        assert httpx.post(f"http://127.0.0.1:{push_port}/ping/added", timeout=5).status_code == 200
        assert f"heartbeat pings on http://127.0.0.1:{push_port}/ping/NAME" in healthd.log()


def test_a_reload_whose_push_port_is_busy_keeps_the_running_config(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        push_port = taken.getsockname()[1]
        metrics_port = free_port()
        config, with_heartbeat = _without_heartbeats(tmp_path, push_port, metrics_port)
        with running_healthd(config, ready=True) as healthd:
            config.write_text(with_heartbeat)
            _reloaded(healthd)
            log = healthd.log()
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            assert healthd.popen.poll() is None
    assert (
        "reload failed, keeping the running config: "
        f"cannot listen on push_address 127.0.0.1:{push_port}"
    ) in log
    assert "healthd_config_last_reload_successful 0.0" in metrics
    assert 'component="added"' not in metrics
    assert 'component="up"' in metrics
    assert "Traceback" not in log


def _closed_without_answer(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_a_slow_client_is_dropped_and_its_ping_not_counted() -> None:
    store = PingStore(None)
    store.watch(["job"])
    server = PushServer("127.0.0.1", 0, store, {"job": None}, idle_timeout_seconds=0.3)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5) as head_only:
            head_only.sendall(b"POST /ping/job HTTP/1.1\r\nHost: x\r\n")
            with socket.create_connection(server.address, timeout=5) as short_body:
                short_body.sendall(
                    b"POST /ping/job HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
                )
                assert _closed_without_answer(head_only)
                assert _closed_without_answer(short_body)
        pings = store.get("job")
        assert pings is not None
        assert pings.success_at is None
    finally:
        server.stop()


def test_a_ping_for_another_shards_heartbeat_is_told_where_to_go(tmp_path: Path) -> None:
    # shard_of("monitor", 2) is 1 and shard_of("backup", 2) is 2 (rendezvous hashing).
    push_port, metrics_port = free_port(), free_port()
    config = tmp_path / "healthd.toml"
    config.write_text(
        f"""
[daemon]
shard = "1/2"
metrics_address = "127.0.0.1:{metrics_port}"
push_address = "127.0.0.1:{push_port}"
status_file = "{tmp_path}/status.json"

[components.monitor]
kind = "heartbeat"
period = "1h"

[components.backup]
kind = "heartbeat"
period = "1h"
"""
    )
    with running_healthd(config, logs=tmp_path, ready=True) as healthd:
        base = f"http://127.0.0.1:{push_port}"
        assert httpx.post(f"{base}/ping/monitor", timeout=5).status_code == 200
        misdirected = httpx.post(f"{base}/ping/backup", timeout=5)
        assert misdirected.status_code == 421
        assert "shard 2/2" in misdirected.text
        assert httpx.post(f"{base}/ping/nosuchjob", timeout=5).status_code == 404
        sent = healthd_cli("ping", "--config", str(config), "backup")
        assert sent.returncode == 69
        assert "421" in sent.stderr
        assert "shard 2/2" in sent.stderr
        pings = json.loads((tmp_path / "heartbeats.json").read_text())["heartbeats"]
        assert "backup" not in pings
        assert pings["monitor"]["success_at"] is not None
        assert healthd.stop() == 0
        assert "Traceback" not in healthd.log()
