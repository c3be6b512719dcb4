"""The command line as operators and systemd meet it: exit codes, one-line errors, no leaks."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from healthd import __version__
from tests.daemon_proc import free_port, healthd_cli, running_healthd
from tests.http_target import HttpTarget, Reply, TcpListener

EX_CONFIG = 78
EX_TEMPFAIL = 75


def _write(tmp_path: Path, text: str, name: str = "healthd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _daemon(tmp_path: Path, port: int | None = None) -> str:
    return f"""
[daemon]
metrics_address = "127.0.0.1:{port or free_port()}"
status_file = "{tmp_path / "status.json"}"
startup_spread = "10ms"
"""


def test_version_prints_the_package_version() -> None:
    result = healthd_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"healthd {__version__}"


REPO = Path(__file__).parent.parent
PLATFORM_CONFIG = REPO / "config" / "healthd.toml"
EXAMPLE_CREDENTIALS = {"CREDENTIALS_DIRECTORY": str(REPO / "config" / "credentials.example")}


def test_platform_config_validates_with_its_credentials() -> None:
    result = healthd_cli(
        "--config", str(PLATFORM_CONFIG), "config", "validate", env=EXAMPLE_CREDENTIALS
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{PLATFORM_CONFIG}: OK, 8 components"


def test_platform_config_without_its_credentials_is_a_config_error() -> None:
    result = healthd_cli(
        "--config", str(PLATFORM_CONFIG), "config", "validate", env={"CREDENTIALS_DIRECTORY": ""}
    )
    assert result.returncode == EX_CONFIG
    assert "needs $CREDENTIALS_DIRECTORY" in result.stderr
    assert "Traceback" not in result.stderr


def test_platform_layout_runs_where_nothing_runs_and_says_why(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **EXAMPLE_CREDENTIALS,
        "HEALTHD_DAEMON__METRICS_ADDRESS": f"127.0.0.1:{port}",
        "HEALTHD_DAEMON__STATUS_FILE": str(tmp_path / "status.json"),
        "HEALTHD_DAEMON__STARTUP_SPREAD": "10ms",
    }
    with running_healthd(PLATFORM_CONFIG, tmp_path, env) as healthd:
        ready = healthd.wait_for("READY", "1")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        code, stderr = healthd.stop()
    assert code == 0, stderr
    assert ready["STATUS"] == "0 healthy, 0 degraded, 8 unhealthy; overall unhealthy"
    doc = json.loads((tmp_path / "status.json").read_bytes())
    assert len(doc["components"]) == 8
    for name, component in doc["components"].items():
        # Nothing of the platform listens here: each says so in its own words, not "ok".
        assert component["status"] == "unhealthy", name
        assert component["reason_code"] == "connection_refused", (name, component)
        assert (
            f'healthd_component_up{{component="{name}",kind="{component["kind"]}"}} 0.0' in metrics
        )
    assert "placeholder-" not in stderr + metrics + json.dumps(doc)


BAD_CONFIGS = {
    "malformed_toml": (
        '[daemon\ninterval = "15s"\n',
        "malformed TOML",
    ),
    "unknown_key": (
        '[components.api]\nkind = "tcp"\naddress = "127.0.0.1:1"\ncolour = "red"\n',
        ":4: components.api.colour: unknown key",
    ),
    "unknown_kind": (
        '[components.api]\nkind = "smtp"\naddress = "127.0.0.1:1"\n',
        ":1: components.api: unknown kind 'smtp'",
    ),
    "negative_interval": (
        '[components.api]\nkind = "tcp"\naddress = "127.0.0.1:1"\ninterval = "-5s"\n',
        ":4: components.api.interval: bad duration '-5s'",
    ),
    "zero_interval": (
        "[daemon]\ninterval = 0\n",
        ":2: daemon.interval: duration 0 must be greater than zero",
    ),
    "bad_duration": (
        '[daemon]\ntimeout = "5 parsecs"\n',
        ":2: daemon.timeout: bad duration '5 parsecs'",
    ),
    "timeout_longer_than_interval": (
        '[components.api]\nkind = "tcp"\naddress = "127.0.0.1:1"\n'
        'interval = "5s"\ntimeout = "10s"\n',
        ":5: components.api.timeout: timeout 10s is longer than interval 5s",
    ),
    "missing_target": (
        '[components.api]\nkind = "http"\ncritical = true\n',
        ":1: components.api.url: required key is missing",
    ),
    "unknown_dependency": (
        '[components.api]\nkind = "tcp"\naddress = "127.0.0.1:1"\ndepends_on = ["db"]\n',
        ":4: components.api.depends_on: no component named 'db'",
    ),
    "dependency_cycle": (
        '[components.a]\nkind = "tcp"\naddress = "127.0.0.1:1"\ndepends_on = ["b"]\n'
        '[components.b]\nkind = "tcp"\naddress = "127.0.0.1:1"\ndepends_on = ["a"]\n',
        "depends_on: dependencies form a cycle: a -> b -> a",
    ),
    "unreadable_secret_file": (
        '[components.api]\nkind = "http"\nurl = "http://127.0.0.1:1/"\n'
        'headers = { Authorization = "Bearer ${file:/nonexistent/token}" }\n',
        ":4: components.api.headers.Authorization: cannot read secret file '/nonexistent/token'",
    ),
    "unset_secret_variable": (
        '[components.api]\nkind = "http"\nurl = "http://u:${env:HEALTHD_TEST_UNSET_PW}@127.0.0.1:1/"\n',
        ":3: components.api.url: environment variable HEALTHD_TEST_UNSET_PW is not set",
    ),
}


@pytest.mark.parametrize("command", [["config", "validate"], ["run"]], ids=["validate", "run"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_clear_line_and_exit_78(
    tmp_path: Path, case: str, command: list[str]
) -> None:
    text, expected = BAD_CONFIGS[case]
    path = _write(tmp_path, text)
    result = healthd_cli("--config", str(path), *command)
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"healthd: {path}")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = healthd_cli("config", "validate", env={"HEALTHD_CONFIG": str(tmp_path / "nope.toml")})
    assert result.returncode == EX_CONFIG
    assert result.stderr.strip() == (
        f"healthd: {tmp_path / 'nope.toml'}: cannot read config: No such file or directory"
    )


def test_environment_overrides_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, '[components.api]\nkind = "tcp"\naddress = "127.0.0.1:1"\n')
    result = healthd_cli(
        "--config",
        str(path),
        "config",
        "show",
        env={"HEALTHD_DAEMON__INTERVAL": "7s", "HEALTHD_COMPONENTS__API__TIMEOUT": "500ms"},
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["daemon"]["interval"] == 7.0
    assert shown["components"]["api"]["timeout"] == 0.5
    assert shown["components"]["api"]["interval"] == 7.0


def test_config_show_redacts_secrets(tmp_path: Path) -> None:
    secret_file = _write(tmp_path, "file-secret-value\n", "token")
    path = _write(
        tmp_path,
        '[components.api]\nkind = "http"\n'
        'url = "https://svc:${env:HEALTHD_TEST_PW}@api.internal/health"\n'
        f'headers = {{ "X-Token" = "${{file:{secret_file}}}", Other = "literal" }}\n'
        '[components.lit]\nkind = "http"\nurl = "http://admin:hunter22@db.internal/"\n',
    )
    result = healthd_cli(
        "--config", str(path), "config", "show", env={"HEALTHD_TEST_PW": "env-secret-value"}
    )
    assert result.returncode == 0, result.stderr
    for secret in ("env-secret-value", "file-secret-value", "hunter22"):
        assert secret not in result.stdout + result.stderr
    shown = json.loads(result.stdout)
    api = shown["components"]["api"]
    assert api["url"] == "https://svc:${env:HEALTHD_TEST_PW}@api.internal/health"
    assert api["headers"] == {"X-Token": f"${{file:{secret_file}}}", "Other": "literal"}
    assert shown["components"]["lit"]["url"] == "http://admin:<redacted>@db.internal/"


def test_metrics_address_in_use_is_one_line_and_not_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        component = '[components.db]\nkind = "tcp"\naddress = "127.0.0.1:1"\n'
        path = _write(tmp_path, _daemon(tmp_path, port) + component)
        result = healthd_cli("--config", str(path), "run")
    assert result.returncode == EX_TEMPFAIL
    assert result.returncode != EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on metrics_address 127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in result.stderr


def _check_config(tmp_path: Path, components: str) -> Path:
    return _write(tmp_path, _daemon(tmp_path) + components)


def test_check_exits_0_when_everything_is_healthy(
    tmp_path: Path, tcp_listener: TcpListener, http_target: HttpTarget
) -> None:
    http_target.route("/health", Reply.json('{"status": "healthy"}'))
    path = _check_config(
        tmp_path,
        f'[components.gw]\nkind = "tcp"\naddress = "127.0.0.1:{tcp_listener.port}"\n'
        f'[components.api]\nkind = "http"\nurl = "{http_target.url("/health")}"\n'
        '[[components.api.conditions]]\njson = "status"\nequals = "healthy"\n',
    )
    result = healthd_cli("--config", str(path), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "overall: healthy (2 healthy, 0 degraded, 0 unhealthy)" in result.stdout
    assert "GET /health returned 200" in result.stdout


def test_check_exits_1_when_degraded(tmp_path: Path, http_target: HttpTarget) -> None:
    http_target.route("/health", Reply.json('{"status": "healthy", "agents_available": 9}'))
    path = _check_config(
        tmp_path,
        f'[components.api]\nkind = "http"\nurl = "{http_target.url("/health")}"\n'
        'critical = true\n[[components.api.conditions]]\njson = "agents_available"\n'
        'min = 11\nseverity = "degraded"\n',
    )
    result = healthd_cli("--config", str(path), "check", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    api = doc["components"]["api"]
    assert (doc["status"], api["status"], api["reason_code"]) == (
        "degraded",
        "degraded",
        "condition_failed",
    )
    assert api["reason"] == "GET /health: condition failed: agents_available >= 11 (got 9)"


def test_check_exits_2_when_a_critical_component_is_unhealthy(
    tmp_path: Path, closed_port: int
) -> None:
    path = _check_config(
        tmp_path,
        f'[components.db]\nkind = "tcp"\naddress = "127.0.0.1:{closed_port}"\ncritical = true\n',
    )
    result = healthd_cli("--config", str(path), "check", "--json")
    assert result.returncode == 2
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    # No history to debounce against: the first failure counts at once.
    assert doc["components"]["db"]["status"] == "unhealthy"
    assert doc["components"]["db"]["reason_code"] == "connection_refused"


def test_check_exits_3_when_healthd_cannot_run(tmp_path: Path) -> None:
    path = _write(tmp_path, "[daemon]\nbogus = 1\n")
    result = healthd_cli("--config", str(path), "check")
    assert result.returncode == 3
    assert "daemon.bogus: unknown key" in result.stderr


def test_json_logs_are_one_object_per_line_without_secrets(
    tmp_path: Path, http_target: HttpTarget
) -> None:
    http_target.route("/health", Reply(status=503))
    path = _check_config(
        tmp_path,
        f'[components.api]\nkind = "http"\nurl = "{http_target.url("/health")}"\n'
        'headers = { Authorization = "Bearer ${env:HEALTHD_TEST_TOKEN}" }\n',
    )
    result = healthd_cli(
        "--config",
        str(path),
        "--log-format",
        "json",
        "check",
        env={"HEALTHD_TEST_TOKEN": "tok-0123456789"},
    )
    # A non-critical component that is unhealthy makes the whole degraded, not unhealthy.
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records, "a state change is logged"
    change = next(r for r in records if r.get("component") == "api")
    assert change["level"] == "warning"
    assert change["status"] == "unhealthy"
    assert change["reason_code"] == "http_status"
    assert http_target.requests[0].headers["authorization"] == "Bearer tok-0123456789"
    assert "tok-0123456789" not in result.stderr + result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_stops_cleanly_on_signal_with_probes_in_flight(
    tmp_path: Path, http_target: HttpTarget, sig: signal.Signals
) -> None:
    http_target.route("/hang", Reply(action="hang"))
    http_target.route("/ok", Reply())
    path = _check_config(
        tmp_path,
        f'[components.ok]\nkind = "http"\nurl = "{http_target.url("/ok")}"\ninterval = "200ms"\n'
        f'[components.hung]\nkind = "http"\nurl = "{http_target.url("/hang")}"\n'
        'interval = "30s"\ntimeout = "200ms"\n',
    )
    with running_healthd(path, tmp_path) as healthd:
        healthd.wait_for("READY", "1")
        # The hung check is now waiting on its next tick or a hanging request; stop anyway.
        started = time.monotonic()
        code, stderr = healthd.stop(sig)
        elapsed = time.monotonic() - started
        assert any(m.get("STOPPING") == "1" for m in healthd.messages) or healthd.wait_for(
            "STOPPING", "1", timeout=1
        )
    assert code == 0, stderr
    assert elapsed < 3
    doc = json.loads((tmp_path / "status.json").read_bytes())
    assert doc["components"]["hung"]["reason_code"] == "timeout"
    assert "Traceback" not in stderr
