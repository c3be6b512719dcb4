"""The shipped unit under a real systemd 252, booted in a systemd-nspawn container.

One container serves the module (booting it and installing healthd takes about 10 s); each test
installs the unit afresh, with its own config, credentials and drop-ins, and stops it after. The
unit file is installed exactly as shipped: the venv sits at the path ``ExecStart=`` names. The
container shares the host's network, so targets are the tests' own servers on 127.0.0.1.

Not proven here: cgroup memory limits and ``IPAddressDeny=``, which the container's systemd does
not enforce.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.http_target import TcpListener
from tests.nspawn import REPO, Container, NspawnUnavailable, prepare
from tests.serving import closed_after

pytestmark = pytest.mark.systemd

UNIT = "healthd.service"
STATUS_FILE = "/var/lib/healthd/status.json"
CREDENTIALS = ("supabase_anon_key", "postgres_password", "redis_password", "falkordb_password")
DROP_IN_DIR = "/etc/systemd/system/healthd.service.d"
STALL_FILE = "/run/healthd-test-stall"


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container with healthd installed in /opt/healthd/venv; killed after the module."""
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    try:
        rootfs, venv = prepare()
        booted = Container(rootfs, venv, tmp_path_factory.mktemp("nspawn"))
    except NspawnUnavailable as exc:
        pytest.skip(f"cannot boot systemd in systemd-nspawn here: {exc}")
    try:
        booted.write(f"/etc/systemd/system/{UNIT}", (REPO / "systemd/healthd.service").read_text())
        booted.write(
            "/usr/lib/sysusers.d/healthd.conf", (REPO / "systemd/healthd.sysusers").read_text()
        )
        booted.run("systemd-sysusers")
        yield booted
    finally:
        booted.close()


class Healthd:
    """The unit inside the container, with this test's config, secrets and drop-ins."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.metrics_port = _free_port()
        self.secrets = {name: f"{name}-{secrets.token_hex(12)}" for name in CREDENTIALS}
        self.cursor = container.journal_cursor()

    def configure(self, components: str, *, interval: str = "1s", timeout: str = "1s") -> None:
        """Write /etc/healthd/healthd.toml: these components under a fixed [daemon] table.

        The timeout is generous: on a busy machine a first probe that overran would make a
        healthy target unhealthy from the first round on.
        """
        daemon = f"""\
[daemon]
metrics_address = "127.0.0.1:{self.metrics_port}"
interval = "{interval}"
timeout = "{timeout}"
startup_spread = "100ms"
status_file_refresh = "1s"
"""
        self.container.write("/etc/healthd/healthd.toml", daemon + components)

    def drop_in(self, text: str) -> None:
        """Add ``[Service]`` settings in a drop-in and reload systemd."""
        self.container.write(f"{DROP_IN_DIR}/test.conf", "[Service]\n" + text)
        self.container.systemctl("daemon-reload")

    def start(self, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl start``, which returns once healthd has sent READY=1 (or failed)."""
        return self.container.run("systemctl", "start", UNIT, check=check, timeout=90)

    def show(self, *properties: str) -> dict[str, str]:
        """Unit properties from systemd."""
        return self.container.show(UNIT, *properties)

    def status(self) -> dict[str, Any]:
        """The status file, parsed."""
        data: dict[str, Any] = json.loads(self.container.path(STATUS_FILE).read_text())
        return data

    def journal(self) -> str:
        """What the unit logged during this test."""
        return self.container.journal(UNIT, after=self.cursor)

    def metrics(self) -> str:
        """A scrape of healthd's /metrics (the container shares the host's network)."""
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def main_pid(self) -> int:
        """The service's main PID, as the container sees it."""
        return int(self.show("MainPID")["MainPID"])


@pytest.fixture
def healthd(container: Container) -> Iterator[Healthd]:
    """A stopped, reset unit with this test's credentials in /etc/healthd/credentials/."""
    _reset(container)
    unit = Healthd(container)
    container.path("/etc/healthd/credentials").mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, value in unit.secrets.items():
        container.write(f"/etc/healthd/credentials/{name}", value + "\n", mode=0o600)
    yield unit
    _reset(container)


def _reset(container: Container) -> None:
    container.systemctl("stop", UNIT)
    container.systemctl("reset-failed", UNIT, check=False)
    container.run("rm", "-rf", DROP_IN_DIR, "/var/lib/healthd", "/etc/healthd", STALL_FILE)
    container.systemctl("daemon-reload")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(what: str, predicate: Callable[[], bool], timeout_seconds: float = 15) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds}s waiting for {what}")
        time.sleep(0.05)


def _component_status(unit: Healthd, name: str) -> str | None:
    try:
        component: dict[str, Any] | None = unit.status()["components"].get(name)
    except (OSError, ValueError):  # not written yet
        return None
    return None if component is None else str(component["status"])


class _Target:
    """An HTTP server on 127.0.0.1 that answers 200 to requests carrying every ``required``
    header value and 401 to others, and holds each answer while ``gate`` is clear."""

    def __init__(self) -> None:
        self.required: dict[str, str] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.arrived = threading.Event()
        self.answers: list[int] = []
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                target.arrived.set()
                target.gate.wait(60)
                ok = all(self.headers.get(k) == v for k, v in target.required.items())
                target.answers.append(200 if ok else 401)
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def target() -> Iterator[_Target]:
    """A fresh gated HTTP target for one test."""
    yield from closed_after(_Target())


# --- READY=1 --------------------------------------------------------------------------------


def test_start_returns_only_after_the_first_round_has_completed(
    healthd: Healthd, target: _Target
) -> None:
    target.gate.clear()
    healthd.configure(
        f'[components.held]\nkind = "http"\nurl = "{target.url}"\n', interval="30s", timeout="20s"
    )
    start = healthd.container.popen("systemctl", "start", UNIT)
    try:
        assert target.arrived.wait(30), "the first probe never reached the target"
        # The target holds its answer, so the first round is not over: no READY=1 yet.
        assert healthd.show("ActiveState", "SubState") == {
            "ActiveState": "activating",
            "SubState": "start",
        }
        assert not healthd.container.path(STATUS_FILE).exists()
        with pytest.raises(subprocess.TimeoutExpired):
            start.wait(1.0)
        target.gate.set()
        out, _ = start.communicate(timeout=60)
    finally:
        start.kill()
        start.wait()
    assert start.returncode == 0, out
    assert healthd.show("ActiveState")["ActiveState"] == "active"
    # READY=1 came with a status file that already holds the first round's verdict.
    assert _component_status(healthd, "held") == "healthy"
    assert target.answers == [200]


# --- reload ---------------------------------------------------------------------------------


def test_reload_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one(
    healthd: Healthd, tcp_listener: TcpListener
) -> None:
    first = f'[components.first]\nkind = "tcp"\naddress = "{tcp_listener.address}"\n'
    healthd.configure(first)
    healthd.start()
    pid = healthd.main_pid()
    assert _component_status(healthd, "second") is None

    second = f'[components.second]\nkind = "tcp"\naddress = "{tcp_listener.address}"\n'
    healthd.configure(first + second)
    healthd.container.systemctl("reload", UNIT)
    _wait_for(
        "the new component in the status file",
        lambda: _component_status(healthd, "second") == "healthy",
    )
    assert healthd.main_pid() == pid

    healthd.configure(first + second + '[components.third]\nkind = "tcp"\naddress = "nowhere"\n')
    healthd.container.systemctl("reload", UNIT)
    _wait_for(
        "healthd_config_last_reload_successful 0",
        lambda: "healthd_config_last_reload_successful 0.0" in healthd.metrics(),
    )
    state = healthd.show("ActiveState", "SubState", "MainPID", "NRestarts")
    assert state == {
        "ActiveState": "active",
        "SubState": "running",
        "MainPID": str(pid),
        "NRestarts": "0",
    }
    journal = healthd.journal()
    assert re.search(
        r"reload failed, keeping the running config: .*components\.third\.address", journal
    ), journal
    # The running config is the previous good one: both components, and nothing of the third.
    components = healthd.status()["components"]
    assert sorted(components) == ["first", "second"]


# --- credentials ----------------------------------------------------------------------------


def test_load_credential_secrets_reach_the_probe_and_nothing_else(
    healthd: Healthd, target: _Target
) -> None:
    target.required = {
        "Authorization": f"Bearer {healthd.secrets['supabase_anon_key']}",
        "X-Postgres": healthd.secrets["postgres_password"],
        "X-Redis": healthd.secrets["redis_password"],
        "X-Falkordb": healthd.secrets["falkordb_password"],
    }
    healthd.configure(
        f"""\
[components.guarded]
kind = "http"
url = "{target.url}"
expected_status = [200]
[components.guarded.headers]
Authorization = "Bearer ${{credential:supabase_anon_key}}"
X-Postgres = "${{credential:postgres_password}}"
X-Redis = "${{credential:redis_password}}"
X-Falkordb = "${{credential:falkordb_password}}"
"""
    )
    healthd.start()
    _wait_for("a healthy verdict", lambda: _component_status(healthd, "guarded") == "healthy")
    _wait_for("a second probe", lambda: len(target.answers) >= 2)
    assert set(target.answers) == {200}
    outputs = {
        "journal": healthd.journal(),
        "status file": healthd.container.path(STATUS_FILE).read_text(),
        "metrics": healthd.metrics(),
        "systemctl status": healthd.container.systemctl("status", UNIT, check=False),
    }
    for where, text in outputs.items():
        for name, value in healthd.secrets.items():
            assert value not in text, f"{name} leaked into the {where}"


# --- watchdog -------------------------------------------------------------------------------


def test_watchdog_kills_a_stalled_loop_with_stacks_in_the_journal_and_restarts_it(
    healthd: Healthd, tcp_listener: TcpListener
) -> None:
    # The shipped WatchdogSec=30s would make this test wait 30 s: 3 s proves the same path.
    healthd.drop_in(f"WatchdogSec=3s\nEnvironment=HEALTHD_TEST_STALL_FILE={STALL_FILE}\n")
    healthd.configure(f'[components.tcp]\nkind = "tcp"\naddress = "{tcp_listener.address}"\n')
    healthd.start()
    before = healthd.show("NRestarts", "MainPID")
    assert before["NRestarts"] == "0"

    healthd.container.write(STALL_FILE, "")
    _wait_for("the watchdog to fire", lambda: healthd.show("Result")["Result"] == "watchdog", 20)
    # The stall file would stall the restarted healthd too: it has RestartSec=5s to disappear.
    healthd.container.path(STALL_FILE).unlink()
    _wait_for(
        "the restart",
        lambda: (
            healthd.show("ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "1"}
        ),
        30,
    )
    assert healthd.main_pid() != int(before["MainPID"])
    journal = healthd.journal()
    assert "Watchdog timeout" in journal
    assert "Fatal Python error: Aborted" in journal
    assert re.search(r"Current thread 0x[0-9a-f]+ \(most recent call first\)", journal)
    assert "in _stall_while_file_exists" in journal
    assert "Main process exited, code=killed, status=6/ABRT" in journal


# --- exit codes -----------------------------------------------------------------------------


def test_a_bad_config_at_start_exits_78_and_is_not_restarted(healthd: Healthd) -> None:
    healthd.configure('[components.broken]\nkind = "tcp"\naddress = "127.0.0.1:1"\nbogus = 1\n')
    assert healthd.start(check=False).returncode != 0
    state = healthd.show("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    # A restart would show as activating/auto-restart here, straight after the failure.
    assert state == {
        "ActiveState": "failed",
        "SubState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }
    # Wait out RestartSec=: still failed, still never restarted.
    restart_seconds = int(healthd.show("RestartUSec")["RestartUSec"].removesuffix("s"))
    time.sleep(restart_seconds + 1)
    assert healthd.show("ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}
    journal = healthd.journal()
    assert re.search(r"healthd\.toml:\d+: components\.broken\.bogus", journal), journal
    assert "Scheduled restart job" not in journal


# --- sandbox --------------------------------------------------------------------------------


def test_sandboxed_healthd_probes_tcp_and_writes_a_status_file_others_can_read(
    healthd: Healthd, tcp_listener: TcpListener, closed_port: int
) -> None:
    healthd.configure(
        f'[components.up]\nkind = "tcp"\naddress = "{tcp_listener.address}"\n'
        f'[components.down]\nkind = "tcp"\naddress = "127.0.0.1:{closed_port}"\n'
        "failure_threshold = 1\n"
    )
    healthd.start()
    assert tcp_listener.connections >= 1

    def read_as_nobody() -> dict[str, Any]:
        as_nobody = healthd.container.run(
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat", STATUS_FILE
        )
        components: dict[str, Any] = json.loads(as_nobody.stdout)["components"]
        return components

    _wait_for("a healthy verdict", lambda: read_as_nobody()["up"]["status"] == "healthy")
    components = read_as_nobody()
    assert components["down"]["status"] == "unhealthy"
    assert components["down"]["reason_code"] == "connection_refused"
    listing = healthd.container.run("stat", "-c", "%a %U", "/var/lib/healthd", STATUS_FILE)
    assert listing.stdout.split("\n")[:2] == ["755 healthd", "644 healthd"]
    # The sandbox leaves /proc readable enough for the standard process metrics.
    metrics = healthd.metrics()
    for name in ("process_open_fds", "process_resident_memory_bytes", "process_start_time_seconds"):
        assert re.search(rf"^{name} \d", metrics, re.MULTILINE), f"{name} missing"


def test_service_gets_the_descriptor_limit_the_unit_sets(
    healthd: Healthd, tcp_listener: TcpListener
) -> None:
    unit = (REPO / "systemd/healthd.service").read_text()
    setting = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert setting is not None
    wanted = int(setting[1])
    healthd.configure(f'[components.tcp]\nkind = "tcp"\naddress = "{tcp_listener.address}"\n')
    healthd.start()
    # systemd sets the closest limit it may: where the host caps the hard limit below the unit's
    # (systemd in the container lacks CAP_SYS_RESOURCE), the service gets that cap.
    cap = _descriptor_limits(healthd.container.run("cat", "/proc/1/limits").stdout)[1]
    limits = _descriptor_limits(
        healthd.container.run("cat", f"/proc/{healthd.main_pid()}/limits").stdout
    )
    assert limits == (min(wanted, cap), min(wanted, cap)), f"unit {wanted}, host cap {cap}"


def _descriptor_limits(proc_limits: str) -> tuple[int, int]:
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", proc_limits, re.MULTILINE)
    assert match is not None, proc_limits
    return int(match[1]), int(match[2])


def test_systemd_analyze_security_rates_the_unit_at_most_2_0(healthd: Healthd) -> None:
    out = healthd.container.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for healthd\.service: (\d+\.\d+)", out)
    assert match is not None, out
    assert float(match[1]) <= 2.0, out


# --- kind = "systemd": units watched from inside the sandbox --------------------------------

_WATCHED_UNITS = {
    # Exits 1 at once, restarted every 300 ms for ever (no start limit): a restart loop.
    "ev-crash.service": "[Unit]\nStartLimitIntervalSec=0\n[Service]\n"
    "ExecStart=/bin/sh -c 'exit 1'\nRestart=always\nRestartSec=300ms\n",
    # Killed with SIGKILL, as the OOM killer would (cgroup memory limits are not enforced in
    # the container); the restart is an hour away, so it waits in auto-restart.
    "ev-killed.service": "[Service]\nExecStart=/bin/sleep infinity\nRestart=on-failure\n"
    "RestartSec=1h\n",
    "ev-up.service": "[Service]\nExecStart=/bin/sleep infinity\n",
}


@pytest.fixture
def watched_units(container: Container) -> Iterator[None]:
    """Three units for healthd's systemd checks to watch; stopped and removed after."""
    for name, text in _WATCHED_UNITS.items():
        container.write(f"/etc/systemd/system/{name}", text)
    container.systemctl("daemon-reload")
    yield
    for name in _WATCHED_UNITS:
        container.systemctl("stop", name, check=False)
        container.systemctl("reset-failed", name, check=False)
        container.run("rm", "-f", f"/etc/systemd/system/{name}")
    container.systemctl("daemon-reload")


def _component(unit: Healthd, name: str) -> dict[str, Any]:
    try:
        component: dict[str, Any] = unit.status()["components"].get(name) or {}
    except (OSError, ValueError):  # not written yet
        return {}
    return component


def test_sandboxed_healthd_tells_a_crash_loop_a_killed_unit_and_a_unit_that_stays_up(
    healthd: Healthd, watched_units: None
) -> None:
    container = healthd.container
    container.systemctl("start", "ev-up.service", "ev-killed.service")
    container.systemctl("start", "--no-block", "ev-crash.service")
    healthd.configure(
        "".join(
            f'[components.{name.removesuffix(".service")}]\nkind = "systemd"\n'
            f'unit = "{name}"\nfailure_threshold = 1\n'
            for name in _WATCHED_UNITS
        ),
        timeout="3s",
    )
    healthd.start()
    killed_pid = container.show("ev-killed.service", "MainPID")["MainPID"]
    container.run("kill", "-9", killed_pid)

    _wait_for(
        "a restart loop",
        lambda: _component(healthd, "ev-crash").get("reason_code") == "restart_loop",
        timeout_seconds=30,
    )
    _wait_for(
        "the killed unit judged",
        lambda: _component(healthd, "ev-killed").get("reason_code") == "unit_failed",
    )
    crash = _component(healthd, "ev-crash")
    assert crash["status"] == "unhealthy"
    assert re.search(r"\d+ restarts in 10 min, last result exit-code \(status 1\)", crash["reason"])
    killed = _component(healthd, "ev-killed")
    assert killed["status"] == "unhealthy"
    assert killed["reason"] == "auto-restart, last result signal (SIGKILL)"
    up = _component(healthd, "ev-up")
    assert up["status"] == "healthy"
    assert up["reason"] == "running, no restarts in 10 min"


def test_one_shot_check_json_in_the_container_sees_a_restart_loop_from_its_first_look(
    healthd: Healthd, watched_units: None
) -> None:
    container = healthd.container
    container.systemctl("start", "--no-block", "ev-crash.service", "ev-up.service")
    _wait_for(
        "3 restarts",
        lambda: int(container.show("ev-crash.service", "NRestarts")["NRestarts"] or 0) >= 3,
    )
    container.write(
        "/etc/healthd/check.toml",
        '[components.crash]\nkind = "systemd"\nunit = "ev-crash.service"\n'
        '[components.up]\nkind = "systemd"\nunit = "ev-up.service"\n'
        '[components.missing]\nkind = "systemd"\nunit = "ev-missing.service"\n',
    )

    done = container.run(
        "/opt/healthd/venv/bin/healthd", "--config", "/etc/healthd/check.toml", "check", "--json",
        check=False,
    )  # fmt: skip

    components = json.loads(done.stdout)["components"]
    assert components["crash"]["reason_code"] == "restart_loop", components["crash"]
    assert re.fullmatch(
        r"(auto-restart|activating \(start\)|running), \d+ restarts in 10 min(, last result "
        r"exit-code \(status 1\))?",
        components["crash"]["reason"],
    ), components["crash"]["reason"]
    assert components["up"]["reason_code"] == "ok"
    assert components["missing"]["reason_code"] == "unit_not_found"
    assert components["missing"]["reason"] == "ev-missing.service is not-found"
    assert done.returncode == 1  # none is critical: the overall verdict is degraded
