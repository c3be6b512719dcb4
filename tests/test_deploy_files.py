"""The deployment files, checked by the real tools: systemd-analyze, promtool, hadolint.

These are the checks of ``.ci/checks.sh``, one test each, plus the container ``HEALTHCHECK``
command run for real against a live and a stalled ``healthd run``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from healthd.exporters import status_file
from tests.daemon import REPO, daemon_settings, running_healthd, write_config
from tests.http_target import TcpTarget

UNIT = REPO / "systemd" / "healthd.service"
RULES = REPO / "config" / "prometheus"
_PRODUCTION_BINARY = "/opt/healthd/venv/bin/healthd"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at this venv's healthd, which verify needs to exist."""
    text = UNIT.read_text()
    assert f"ExecStart={_PRODUCTION_BINARY} " in text
    copy = tmp_path / "healthd.service"
    copy.write_text(
        text.replace(f"ExecStart={_PRODUCTION_BINARY} ", f"ExecStart={_venv_healthd()} ")
    )
    return copy


def _venv_healthd() -> str:
    return str(Path(sys.executable).parent / "healthd")


# --- systemd -------------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = _run(_tool("systemd-analyze"), "verify", str(_unit_for_verify(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_unit_exposure_is_rated_ok_below_2(tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    result = _run(
        _tool("systemd-analyze"), "security", "--offline=yes", "--threshold=19", str(unit)
    )
    assert result.returncode == 0, result.stdout[-2000:]
    match = re.search(r"Overall exposure level for healthd.service: (\d+\.\d) (\w+)", result.stdout)
    assert match is not None, result.stdout[-500:]
    assert float(match.group(1)) < 2.0
    assert match.group(2) in {"OK", "SAFE"}


def test_unit_declares_what_the_issue_asks_for() -> None:
    settings = [line.split("=", 1)[0] for line in UNIT.read_text().splitlines() if "=" in line]
    settings = [s for s in settings if not s.startswith("#")]
    required = {
        "Type", "WatchdogSec", "Restart", "RestartPreventExitStatus", "ExecReload",
        "StateDirectory", "ConfigurationDirectory", "User", "ProtectSystem", "ProtectHome",
        "PrivateTmp", "PrivateDevices", "NoNewPrivileges", "RestrictAddressFamilies",
        "SystemCallFilter", "CapabilityBoundingSet", "UMask",
    }  # fmt: skip
    assert required <= set(settings), required - set(settings)
    text = UNIT.read_text()
    assert "Type=notify\n" in text
    assert "RestartPreventExitStatus=78\n" in text
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n" in text
    # The probes need the network.
    assert "\nPrivateNetwork=" not in text


def test_unit_loads_every_credential_the_shipped_config_refers_to() -> None:
    config = (REPO / "config" / "healthd.toml").read_text()
    active = "\n".join(line for line in config.splitlines() if not line.lstrip().startswith("#"))
    wanted = set(re.findall(r"\$\{credential:([^}]+)\}", active))
    loaded = dict(re.findall(r"^LoadCredential=([^:\n]+):(\S+)$", UNIT.read_text(), re.M))
    assert wanted
    assert wanted <= set(loaded), wanted - set(loaded)
    for name in wanted:
        assert loaded[name] == f"/etc/healthd/credentials/{name}"


# --- Prometheus ----------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = _run(_tool("promtool"), "check", "rules", str(RULES / "healthd.rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 17 rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = _run(_tool("promtool"), "test", "rules", "healthd.rules.test.yml", cwd=RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_severity_a_summary_and_a_unit_test() -> None:
    blocks = (RULES / "healthd.rules.yml").read_text().split("- alert: ")[1:]
    tested = (RULES / "healthd.rules.test.yml").read_text()
    assert len(blocks) == 11
    for block in blocks:
        name = block.split("\n", 1)[0].strip()
        assert re.search(r"^\s+severity: (critical|warning)$", block, re.M), name
        assert re.search(r"^\s+summary: \S", block, re.M), name
        assert re.search(r"^\s+for: \d+m$", block, re.M), name
        assert f"alertname: {name}\n" in tested, name


def test_scrape_snippet_is_a_valid_prometheus_config() -> None:
    path = str(RULES / "scrape.yml")
    result = _run(_tool("promtool"), "check", "config", "--syntax-only", path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Docker --------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = _run(_tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def _healthcheck_command(status_path: Path, max_age_seconds: float) -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD, pointed at a test status file and python."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])\s*$", text, re.M)
    assert match is not None
    command: list[str] = json.loads(match.group(1))
    assert command[0] == "python"
    assert command[-1] == "/var/lib/healthd/status.json"
    max_age = command.index("--max-age") + 1
    command[max_age] = str(max_age_seconds)
    return [sys.executable, *command[1:-1], str(status_path)]


def _refused_address() -> str:
    """An address that refuses connections: the component it backs is unhealthy."""
    target = TcpTarget()
    target.stop()
    return target.address


def test_healthcheck_passes_while_healthd_reports_an_outage_and_fails_when_it_is_stuck(
    tmp_path: Path,
) -> None:
    state = tmp_path / "status.json"
    stall = tmp_path / "stall"
    settings = daemon_settings(
        tmp_path, status_file_refresh="100ms", interval="200ms", timeout="100ms"
    )
    components = {"db": {"kind": "tcp", "address": _refused_address(), "critical": True}}
    config = write_config(tmp_path / "healthd.toml", settings, components)
    healthcheck = _healthcheck_command(state, max_age_seconds=1.0)
    with running_healthd(config, env={"HEALTHD_TEST_STALL_FILE": str(stall)}) as daemon:
        try:
            daemon.wait_for("READY", "1")
            assert json.loads(state.read_text())["status"] == "unhealthy"
            # An unhealthy platform is healthd doing its job: the container stays healthy.
            result = _run(*healthcheck)
            assert result.returncode == 0, result.stdout + result.stderr

            stall.touch()
            deadline = time.monotonic() + 10
            while (result := _run(*healthcheck)).returncode == 0:
                assert time.monotonic() < deadline, "HEALTHCHECK never noticed the stall"
                time.sleep(0.2)
            assert result.returncode == 1
            assert "old" in result.stdout
            assert status_file.age_seconds(state, time.time()) > 1.0

            stall.unlink()
            deadline = time.monotonic() + 10
            while (result := _run(*healthcheck)).returncode != 0:
                assert time.monotonic() < deadline, "HEALTHCHECK never recovered"
                time.sleep(0.1)
        finally:
            stall.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file"),
        (b"{not json", "not usable"),
        (b'{"status": "healthy"}', "no generated_at"),
    ],
)
def test_healthcheck_fails_without_a_usable_status_file(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    state = tmp_path / "status.json"
    if content is not None:
        state.write_bytes(content)
    result = _run(*_healthcheck_command(state, max_age_seconds=60))
    assert result.returncode == 1
    assert reason in result.stderr


def test_ci_script_runs_every_check() -> None:
    for tool in ("systemd-analyze", "promtool"):
        _tool(tool)
    result = _run("bash", str(REPO / ".ci" / "checks.sh"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all deployment checks passed" in result.stdout
