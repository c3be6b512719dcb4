"""The command line as operators and systemd meet it: exit codes, one-line errors, no leaks."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from healthd import __version__, cli
from healthd.cli import CHECK_UNKNOWN
from healthd.config import bind_address
from tests.daemon import free_port, healthd_cli, running_healthd
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
    assert result.stdout.strip() == f"{PLATFORM_CONFIG}: OK, 13 components"


def test_platform_config_without_its_credentials_is_a_config_error() -> None:
    result = healthd_cli(
        "--config", str(PLATFORM_CONFIG), "config", "validate", env={"CREDENTIALS_DIRECTORY": ""}
    )
    assert result.returncode == EX_CONFIG
    assert "needs $CREDENTIALS_DIRECTORY" in result.stderr
    assert "Traceback" not in result.stderr


#: Kinds of the shipped config that read this machine rather than a platform service.
EVIDENCE_KINDS = ("systemd", "host")


def test_platform_layout_runs_where_nothing_runs_and_says_why(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **EXAMPLE_CREDENTIALS,
        "HEALTHD_DAEMON__METRICS_ADDRESS": f"127.0.0.1:{port}",
        "HEALTHD_DAEMON__PUSH_ADDRESS": f"127.0.0.1:{free_port()}",
        "HEALTHD_DAEMON__STATUS_FILE": str(tmp_path / "status.json"),
        "HEALTHD_DAEMON__STARTUP_SPREAD": "10ms",
    }
    with running_healthd(PLATFORM_CONFIG, logs=tmp_path, env=env) as healthd:
        ready = healthd.wait_for("READY", "1")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        code = healthd.stop()
        stderr = healthd.log()
    assert code == 0, stderr
    doc = json.loads((tmp_path / "status.json").read_bytes())
    assert len(doc["components"]) == 13
    # The host is this machine, judged as it is; the units' systemd may not run here at all.
    evidence = {name: c for name, c in doc["components"].items() if c["kind"] in EVIDENCE_KINDS}
    assert sorted(evidence) == ["e2i-api.service", "e2i-bentoml.service", "host"]
    host_healthy = int(evidence["host"]["status"] == "healthy")
    host_degraded = int(evidence["host"]["status"] == "degraded")
    # The two job heartbeats wait for their first ping: healthy.
    heartbeats = {n: c for n, c in doc["components"].items() if c["kind"] == "heartbeat"}
    assert {c["reason_code"] for c in heartbeats.values()} == {"waiting"}
    assert ready["STATUS"] == (
        f"{host_healthy + 2} healthy, {host_degraded} degraded, "
        f"{11 - host_healthy - host_degraded} unhealthy; overall unhealthy"
    )
    for name in ("e2i-api.service", "e2i-bentoml.service"):
        assert evidence[name]["status"] == "unhealthy", evidence[name]
    for name, component in doc["components"].items():
        if name in evidence or name in heartbeats:
            continue
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
    with running_healthd(path, ready=True) as healthd:
        # The hung check is now waiting on its next tick or a hanging request; stop anyway.
        started = time.monotonic()
        code = healthd.stop(sig)
        stderr = healthd.log()
        elapsed = time.monotonic() - started
        assert any(m.get("STOPPING") == "1" for m in healthd.messages) or healthd.wait_for(
            "STOPPING", "1", timeout=1
        )
    assert code == 0, stderr
    assert elapsed < 3
    doc = json.loads((tmp_path / "status.json").read_bytes())
    assert doc["components"]["hung"]["reason_code"] == "timeout"
    assert "Traceback" not in stderr


# --- the malformed-input corpus -------------------------------------------------------------

_TCP = '[components.api]\nkind = "tcp"\naddress = "127.0.0.1:1"\n'
_HTTP = '[components.api]\nkind = "http"\nurl = "http://127.0.0.1:1/"\n'


def _api(kind: str, extra: str) -> str:
    """A component ``api`` of ``kind`` with its required keys, then ``extra`` (line 4 on)."""
    required = {
        "tcp": 'address = "127.0.0.1:1"',
        "http": 'url = "http://127.0.0.1:1/"',
        "postgres": 'dsn = "host=127.0.0.1 port=1"',
        "supabase": 'url = "http://127.0.0.1:1/"\napi_key = "k-0123456789"',
        "bentoml": 'url = "http://127.0.0.1:1/"',
    }[kind]
    return f'[components.api]\nkind = "{kind}"\n{required}\n{extra}\n'


def _daemon_key(line: str) -> str:
    return f"[daemon]\n{line}\n" + _TCP


#: id -> (file text, environment, what the one line must contain). ``{tmp}`` is the test's
#: directory; the line is checked for the shape ``file[:line][: $VARIABLE]: key: message``.
CORPUS: dict[str, tuple[str, dict[str, str], str]] = {
    # durations: finite, ASCII digits, 1 ms to 1 day, intervals at least 100 ms
    "interval_inf": (_api("tcp", "interval = inf"), {}, ":4: components.api.interval: "),
    "interval_nan": (_api("tcp", "interval = nan"), {}, ":4: components.api.interval: "),
    "interval_minus_inf": (_daemon_key("interval = -inf"), {}, ":2: daemon.interval: "),
    "timeout_inf": (_api("tcp", "timeout = inf"), {}, ":4: components.api.timeout: "),
    "daemon_timeout_nan": (_daemon_key("timeout = nan"), {}, ":2: daemon.timeout: "),
    "startup_spread_inf": (_daemon_key("startup_spread = inf"), {}, ":2: daemon.startup_spread"),
    "status_file_refresh_nan": (
        _daemon_key("status_file_refresh = nan"),
        {},
        ":2: daemon.status_file_refresh: ",
    ),
    "degraded_latency_inf": (
        _api("http", "degraded_latency = inf"),
        {},
        ":4: components.api.degraded_latency: ",
    ),
    "replay_lag_nan": (
        _api("postgres", "degraded_replay_lag = nan"),
        {},
        "components.api.degraded_replay_lag",
    ),
    "interval_one_nanosecond": (
        _api("tcp", 'interval = "0.000000001s"'),
        {},
        "components.api.interval: ",
    ),
    "interval_ns_unit": (_api("tcp", 'interval = "1ns"'), {}, "components.api.interval: bad"),
    "timeout_half_millisecond": (_api("tcp", 'timeout = "0.5ms"'), {}, "components.api.timeout"),
    "interval_50ms": (_api("tcp", 'interval = "50ms"'), {}, ":4: components.api.interval: "),
    "daemon_interval_10ms": (_daemon_key("interval = 0.01"), {}, ":2: daemon.interval: "),
    "interval_1e300": (_api("tcp", "interval = 1e300"), {}, "components.api.interval: "),
    "interval_huge_int": (
        _api("tcp", "interval = 9223372036854775807"),
        {},
        "components.api.interval: ",
    ),
    "interval_100000h": (_api("tcp", 'interval = "100000h"'), {}, "components.api.interval: "),
    "interval_arabic_digits": (
        _api("tcp", 'interval = "\u0661\u0665s"'),
        {},
        "components.api.interval",
    ),
    "interval_fullwidth_digits": (
        _api("tcp", 'interval = "\uff11\uff15"'),
        {},
        "components.api.interval",
    ),
    "interval_devanagari_digits": (
        _api("tcp", 'interval = "\u096bs"'),
        {},
        "components.api.interval",
    ),
    "interval_superscript": (_api("tcp", 'interval = "\u00b2s"'), {}, "components.api.interval"),
    "interval_exponent_text": (_api("tcp", 'interval = "1e3"'), {}, "components.api.interval"),
    "interval_empty": (_api("tcp", 'interval = ""'), {}, "components.api.interval: "),
    "interval_bool": (_api("tcp", "interval = true"), {}, "components.api.interval: "),
    "interval_list": (_api("tcp", "interval = [1]"), {}, "components.api.interval: "),
    # strict booleans
    "critical_yes": (_api("tcp", 'critical = "yes"'), {}, ":4: components.api.critical: "),
    "critical_quoted_true": (_api("tcp", 'critical = "true"'), {}, "components.api.critical"),
    "critical_one": (_api("tcp", "critical = 1"), {}, ":4: components.api.critical: "),
    "tls_verify_no": (_api("http", 'tls_verify = "no"'), {}, "components.api.tls_verify: "),
    "follow_redirects_off": (
        _api("http", 'follow_redirects = "off"'),
        {},
        "components.api.follow_redirects: ",
    ),
    "tcp_tls_zero": (_api("tcp", "tls = 0"), {}, ":4: components.api.tls: "),
    "condition_present_yes": (
        _api("http", '[[components.api.conditions]]\njson = "a"\npresent = "yes"'),
        {},
        ":6: components.api.conditions.0.present: ",
    ),
    "legacy_key_text": (
        _api("supabase", 'legacy_key = "false"'),
        {},
        "components.api.legacy_key: ",
    ),
    "bentoml_metrics_one": (_api("bentoml", 'metrics = "1"'), {}, "components.api.metrics: "),
    # max_concurrency
    "max_concurrency_huge": (
        _daemon_key("max_concurrency = 9223372036854775807"),
        {},
        ":2: daemon.max_concurrency: ",
    ),
    "max_concurrency_10001": (
        _daemon_key("max_concurrency = 10001"),
        {},
        ":2: daemon.max_concurrency: ",
    ),
    "max_concurrency_zero": (_daemon_key("max_concurrency = 0"), {}, "daemon.max_concurrency"),
    "max_concurrency_negative": (_daemon_key("max_concurrency = -1"), {}, "daemon.max_concurrency"),
    # status_file
    "status_file_empty": (_daemon_key('status_file = ""'), {}, ":2: daemon.status_file: "),
    "status_file_nul": (
        _daemon_key('status_file = "/tmp/st\\u0000atus.json"'),
        {},
        ":2: daemon.status_file: ",
    ),
    "status_file_root": (_daemon_key('status_file = "/"'), {}, ":2: daemon.status_file: "),
    "status_file_dot": (_daemon_key('status_file = "."'), {}, ":2: daemon.status_file: "),
    "status_file_relative": (
        _daemon_key('status_file = "status.json"'),
        {},
        ":2: daemon.status_file: ",
    ),
    "status_file_trailing_slash": (
        _daemon_key('status_file = "/tmp/status/"'),
        {},
        ":2: daemon.status_file: ",
    ),
    "status_file_name_too_long": (
        _daemon_key(f'status_file = "/tmp/{"s" * 300}.json"'),
        {},
        ":2: daemon.status_file: status_file is longer than a path may be",
    ),
    "condition_bound_nan": (
        _api("http", '[[components.api.conditions]]\njson = "a"\nmin = nan'),
        {},
        ":6: components.api.conditions.0.min: ",
    ),
    "history_file_nul": (
        _daemon_key('history_file = "/tmp/hi\\u0000story.db"'),
        {},
        ":2: daemon.history_file: history_file contains a NUL byte",
    ),
    "history_file_relative": (
        _daemon_key('history_file = "history.db"'),
        {},
        ":2: daemon.history_file: ",
    ),
    "history_retention_inf": (
        _daemon_key("history_retention = inf"),
        {},
        ":2: daemon.history_retention: ",
    ),
    "history_retention_eleven_years": (
        _daemon_key('history_retention = "100000h"'),
        {},
        ":2: daemon.history_retention: ",
    ),
    "status_file_is_a_directory": (
        _daemon_key('status_file = "{tmp}"'),
        {},
        ":2: daemon.status_file: ",
    ),
    # metrics_address
    "metrics_host_unresolvable": (
        _daemon_key('metrics_address = "no-such-host.invalid:9469"'),
        {},
        ":2: daemon.metrics_address: host 'no-such-host.invalid' does not resolve",
    ),
    "metrics_v6_without_brackets": (
        _daemon_key('metrics_address = "::1:9469"'),
        {},
        ":2: daemon.metrics_address: ",
    ),
    "metrics_v6_without_port": (
        _daemon_key('metrics_address = "[::1]"'),
        {},
        ":2: daemon.metrics_address: ",
    ),
    "metrics_v6_unclosed": (
        _daemon_key('metrics_address = "[::1:9469"'),
        {},
        ":2: daemon.metrics_address: ",
    ),
    "metrics_port_out_of_range": (
        _daemon_key('metrics_address = "127.0.0.1:99999"'),
        {},
        ":2: daemon.metrics_address: ",
    ),
    "metrics_port_fullwidth": (
        _daemon_key('metrics_address = "127.0.0.1:\uff19\uff14\uff16\uff19"'),
        {},
        ":2: daemon.metrics_address",
    ),
    "metrics_address_not_this_machine": (
        _daemon_key('metrics_address = "192.0.2.1:9469"'),
        {},
        ":2: daemon.metrics_address: ",
    ),
    "tcp_port_fullwidth": (
        '[components.api]\nkind = "tcp"\naddress = "db:\uff15\uff14\uff13\uff12"\n',
        {},
        "components.api.address",
    ),
    "tcp_host_label_too_long": (
        f'[components.api]\nkind = "tcp"\naddress = "{"a" * 64}.example:1"\n',
        {},
        ":3: components.api.address: ",
    ),
    "http_host_label_too_long": (
        f'[components.api]\nkind = "http"\nurl = "http://{"a" * 64}.example/"\n',
        {},
        ":3: components.api.url: ",
    ),
    "dsn_unknown_keyword": (
        '[components.api]\nkind = "postgres"\ndsn = "hots=db port=5432"\n',
        {},
        ":3: components.api.dsn: dsn 'hots=db port=5432' is not valid: invalid connection",
    ),
    "dsn_unterminated_quote": (
        '[components.api]\nkind = "postgres"\ndsn = "host=db password=\'x"\n',
        {},
        ":3: components.api.dsn: ",
    ),
    "dsn_port_out_of_range": (
        '[components.api]\nkind = "postgres"\ndsn = "postgresql://db:99999/app"\n',
        {},
        ":3: components.api.dsn: ",
    ),
    "redis_port_out_of_range": (
        '[components.api]\nkind = "redis"\nurl = "redis://db:99999/0"\n',
        {},
        ":3: components.api.url: ",
    ),
    # secret files
    "secret_dev_zero": (
        _api("http", 'headers = { A = "${file:/dev/zero}" }'),
        {},
        ":4: components.api.headers.A",
    ),
    "secret_fifo": (
        _api("http", 'headers = { A = "${file:{tmp}/fifo}" }'),
        {},
        ":4: components.api.headers.A",
    ),
    "secret_larger_than_64k": (
        _api("http", 'headers = { A = "${file:{tmp}/big}" }'),
        {},
        "larger than 65536 bytes",
    ),
    "secret_directory": (
        _api("http", 'headers = { A = "${file:{tmp}}" }'),
        {},
        ":4: components.api.headers.A",
    ),
    "secret_not_utf8": (
        _api("http", 'headers = { A = "${file:{tmp}/latin1}" }'),
        {},
        ": not UTF-8",
    ),
    "credential_without_directory": (
        _api("http", 'headers = { A = "${credential:token}" }'),
        {},
        "CREDENTIALS_DIRECTORY",
    ),
    "env_reference_unset": (
        _api("http", 'headers = { A = "${env:HEALTHD_TEST_UNSET}" }'),
        {},
        "is not set",
    ),
    # nothing to check
    "empty_file": ("", {}, ": components: no components"),
    "only_daemon": ('[daemon]\ninterval = "30s"\n', {}, "components: no components"),
    "empty_components_table": ("[components]\n", {}, ":1: components: no components"),
    # HEALTHD_* overrides
    "env_components_garbage": (_TCP, {"HEALTHD_COMPONENTS": "garbage"}, ": $HEALTHD_COMPONENTS:"),
    "env_headers_truncated_json": (
        _HTTP,
        {"HEALTHD_COMPONENTS__API__HEADERS": '{"a":'},
        "$HEALTHD_COMPONENTS__API__HEADERS",
    ),
    "env_daemon_truncated_json": (_TCP, {"HEALTHD_DAEMON": "{"}, ": $HEALTHD_DAEMON: daemon: "),
    "env_conditions_truncated": (
        _HTTP,
        {"HEALTHD_COMPONENTS__API__CONDITIONS": "[1"},
        "$HEALTHD_COMPONENTS__API__CONDITIONS",
    ),
    "env_critical_yes": (
        _TCP,
        {"HEALTHD_COMPONENTS__API__CRITICAL": "yes"},
        "$HEALTHD_COMPONENTS__API__CRITICAL",
    ),
    "env_interval_inf": (
        _TCP,
        {"HEALTHD_DAEMON__INTERVAL": "inf"},
        ": $HEALTHD_DAEMON__INTERVAL: daemon.interval",
    ),
    "env_interval_10ms": (
        _TCP,
        {"HEALTHD_DAEMON__INTERVAL": "10ms"},
        ": $HEALTHD_DAEMON__INTERVAL: daemon.interval",
    ),
    "env_interval_arabic_digits": (
        _TCP,
        {"HEALTHD_COMPONENTS__API__INTERVAL": "\u0661\u0665s"},
        "$HEALTHD_COMPONENTS__API__INTERVAL",
    ),
    "env_max_concurrency_huge": (
        _TCP,
        {"HEALTHD_DAEMON__MAX_CONCURRENCY": "100000000000000000000"},
        "max_concurrency",
    ),
    "env_status_file_empty": (
        _TCP,
        {"HEALTHD_DAEMON__STATUS_FILE": ""},
        "$HEALTHD_DAEMON__STATUS_FILE",
    ),
    "env_metrics_host_unresolvable": (
        _TCP,
        {"HEALTHD_DAEMON__METRICS_ADDRESS": "no-such-host.invalid:1"},
        "$HEALTHD_DAEMON__METRICS_ADDRESS: daemon.metrics_address",
    ),
    # the file itself
    "malformed_toml": ('[daemon\ninterval = "15s"\n', {}, ":1: malformed TOML"),
    "nul_byte_in_file": ('[daemon]\ninterval = "1\x00s"\n', {}, ":2: malformed TOML"),
    "deeply_nested_array": ("a = " + "[" * 5000 + "]" * 5000 + "\n", {}, "malformed TOML"),
    "bom_then_an_unknown_key": ("\ufeff" + _api("tcp", "colour = 1"), {}, ":4: components.api"),
}

_LINE = re.compile(r"^healthd: (?P<file>/[^:]+)(:\d+)?(: \$HEALTHD_\w+)?: \S.*$")


@pytest.fixture
def in_process(no_healthd_environment: None) -> Iterator[None]:
    """``cli.main`` in this process, with no HEALTHD_* of the developer's and logging restored."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    # main() pointed faulthandler at the captured stderr, which is gone now.
    faulthandler.enable(sys.__stderr__)


def _corpus_file(tmp_path: Path, case: str) -> tuple[Path, dict[str, str], str]:
    text, env, expected = CORPUS[case]
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * (64 * 1024 + 1))
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    path = tmp_path / "healthd.toml"
    path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    return path, env, expected


def test_corpus_has_at_least_sixty_malformed_inputs() -> None:
    assert len(CORPUS) >= 60


@pytest.mark.usefixtures("in_process")
@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_input_is_one_line_naming_file_and_key_and_exit_78_at_validate(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    path, env, expected = _corpus_file(tmp_path, case)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    code = cli.main(["--config", str(path), "config", "validate"])

    out, err = capfd.readouterr()
    assert code == EX_CONFIG, out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert _LINE.match(lines[0]), lines[0]
    assert lines[0].startswith(f"healthd: {path}")
    assert expected.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Traceback" not in out + err
    # ``check`` refuses the same input with its own "could not check" code.
    assert cli.main(["--config", str(path), "check"]) == CHECK_UNKNOWN
    assert "Traceback" not in "".join(capfd.readouterr())


#: A sample of the corpus, one per family, run as a real ``healthd run``.
RUN_SAMPLE = [
    "interval_inf",
    "status_file_refresh_nan",
    "interval_arabic_digits",
    "critical_yes",
    "max_concurrency_huge",
    "status_file_nul",
    "metrics_host_unresolvable",
    "secret_fifo",
    "secret_dev_zero",
    "empty_file",
    "env_components_garbage",
    "env_headers_truncated_json",
]


@pytest.mark.parametrize("case", RUN_SAMPLE)
def test_malformed_input_stops_run_before_it_starts(tmp_path: Path, case: str) -> None:
    path, env, expected = _corpus_file(tmp_path, case)

    result = healthd_cli("--config", str(path), "run", env=env, timeout=20)

    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert expected.replace("{tmp}", str(tmp_path)) in lines[0]
    # It stopped at the config: nothing was written, nothing was bound.
    assert not (tmp_path / "status.json").exists()


@pytest.mark.usefixtures("in_process")
def test_byte_order_mark_is_accepted(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "healthd.toml"
    path.write_bytes("\ufeff".encode() + _TCP.encode())

    assert cli.main(["--config", str(path), "config", "validate"]) == 0
    assert capfd.readouterr().out.strip() == f"{path}: OK, 1 components"


@pytest.mark.usefixtures("in_process")
@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("false", False), ("1", True), ("0", False)]
)
def test_environment_booleans_are_true_false_1_or_0(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    value: str,
    expected: bool,
) -> None:
    path = _write(tmp_path, _TCP)
    monkeypatch.setenv("HEALTHD_COMPONENTS__API__CRITICAL", value)

    assert cli.main(["--config", str(path), "config", "show"]) == 0
    assert json.loads(capfd.readouterr().out)["components"]["api"]["critical"] is expected


@pytest.mark.usefixtures("in_process")
def test_ipv6_metrics_address_is_accepted_and_resolved_to_its_family(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    path = _write(tmp_path, '[daemon]\nmetrics_address = "[::1]:9469"\n' + _TCP)

    assert cli.main(["--config", str(path), "config", "validate"]) == 0
    assert bind_address("[::1]:9469") == (socket.AF_INET6, "::1", 9469)
    assert bind_address("localhost:9469")[0] in (socket.AF_INET, socket.AF_INET6)


def test_config_errors_under_json_logs_are_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "healthd.toml"
    path.write_text(
        '[daemon]\ninterval = "fast"\n\n[components.a]\nkind = "tcp"\naddress = "127.0.0.1:9"\n'
    )
    for command in (["config", "validate"], ["run"], ["check"]):
        result = healthd_cli("--config", str(path), "--log-format", "json", *command)
        assert result.returncode == (3 if command == ["check"] else 78)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        entry = json.loads(lines[0])
        assert entry["level"] == "error"
        assert f"{path}:2: daemon.interval:" in entry["message"]
