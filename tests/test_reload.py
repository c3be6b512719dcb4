"""Reload: a valid config is applied without losing history; an invalid one changes nothing.

Most tests drive a real ``Daemon`` in-process (its scheduler probes real TCP targets) and call
``reload()`` as SIGHUP would; one runs ``healthd run`` and sends it a real SIGHUP.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from healthd import config as config_module
from healthd.daemon import Daemon
from healthd.model import ComponentState, Status
from healthd.secrets import Redactor
from healthd.watchdog import Notifier
from tests.daemon import daemon_settings, running_healthd, scrape, write_config
from tests.http_target import TcpTarget


def _daemon_settings(tmp_path: Path) -> dict[str, Any]:
    return daemon_settings(
        tmp_path, status_file_refresh="1s", interval="100ms", timeout="80ms", startup_spread="20ms"
    )


class _Running:
    """A daemon running in the test's event loop, with helpers to wait on its state."""

    def __init__(self, daemon: Daemon, path: Path, settings: dict[str, Any]) -> None:
        self.daemon = daemon
        self.path = path
        self.settings = settings

    def state(self, name: str) -> ComponentState | None:
        return self.daemon.store.snapshot().components.get(name)

    async def until(
        self, name: str, predicate: Callable[[ComponentState], bool], seconds: float = 5
    ) -> ComponentState:
        """Wait for ``name`` to reach a state that satisfies ``predicate``."""
        with anyio.fail_after(seconds):
            while True:
                state = self.state(name)
                if state is not None and predicate(state):
                    return state
                await anyio.sleep(0.02)

    def rewrite(self, components: dict[str, dict[str, Any]]) -> None:
        write_config(self.path, self.settings, components)

    def metrics(self) -> str:
        return self.daemon.metrics.exposition().decode()


@contextlib.asynccontextmanager
async def _run_daemon(tmp_path: Path, tcp_target: TcpTarget) -> AsyncIterator[_Running]:
    """A daemon with ``steady`` (a live target, slow to go unhealthy) and ``old``."""
    settings = _daemon_settings(tmp_path)
    components: dict[str, dict[str, Any]] = {
        "steady": {"kind": "tcp", "address": tcp_target.address, "failure_threshold": 1000},
        "old": {"kind": "tcp", "address": tcp_target.address},
    }
    path = write_config(tmp_path / "healthd.toml", settings, components)
    daemon = Daemon(path, config_module.load(path), Redactor(), notifier=Notifier(environ={}))
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        helper = _Running(daemon, path, settings)
        await helper.until("steady", lambda s: s.status is Status.HEALTHY)
        yield helper
        tg.cancel_scope.cancel()


def _components(tcp_target: TcpTarget, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    steady = {"kind": "tcp", "address": tcp_target.address, "failure_threshold": 1000}
    return {"steady": steady, **extra}


async def _reload_keeps_hysteresis_and_since_of_unchanged_components(
    running: _Running, tcp_target: TcpTarget, caplog: pytest.LogCaptureFixture
) -> None:
    # Failing, but held at degraded by a high failure_threshold: "n of 1000 failures".
    tcp_target.stop()
    before = await running.until("steady", lambda s: s.consecutive_failures >= 3)
    assert before.status is Status.DEGRADED

    running.rewrite(_components(tcp_target, added={"kind": "tcp", "address": tcp_target.address}))
    assert running.daemon.reload()

    after = await running.until(
        "steady", lambda s: s.consecutive_failures > before.consecutive_failures
    )
    assert after.status is Status.DEGRADED, after.reason
    assert after.since == before.since
    assert sum(after.checks_total.values()) > sum(before.checks_total.values())
    assert re.search(r"\d+ of 1000", after.reason), after.reason


async def _reload_starts_new_checks_and_drops_removed_ones_with_their_series(
    running: _Running, tcp_target: TcpTarget, caplog: pytest.LogCaptureFixture
) -> None:
    await running.until("old", lambda s: True)
    assert 'component="old"' in running.metrics()

    running.rewrite(_components(tcp_target, added={"kind": "tcp", "address": tcp_target.address}))
    assert running.daemon.reload()

    assert running.state("old") is None
    added = await running.until("added", lambda s: s.status is Status.HEALTHY)
    assert added.reason_code == "ok"
    metrics = running.metrics()
    assert 'component="old"' not in metrics
    assert 'healthd_component_up{component="added",kind="tcp"} 1.0' in metrics
    # The removed check really stopped: it never reappears, however long the loop runs.
    await running.until("added", lambda s: s.checked_at > added.checked_at)
    assert running.state("old") is None


async def _reload_restarts_a_changed_check_with_fresh_history(
    running: _Running, tcp_target: TcpTarget, caplog: pytest.LogCaptureFixture
) -> None:
    before = await running.until("steady", lambda s: sum(s.checks_total.values()) >= 3)
    changed = _components(tcp_target)
    changed["steady"]["critical"] = True
    running.rewrite(changed)
    assert running.daemon.reload()

    after = await running.until("steady", lambda s: s.critical)
    assert sum(after.checks_total.values()) < sum(before.checks_total.values())


async def _invalid_reload_keeps_the_old_config_logs_once_and_sets_the_metric(
    running: _Running, tcp_target: TcpTarget, caplog: pytest.LogCaptureFixture
) -> None:
    good_reload_at = time.time()
    running.rewrite(_components(tcp_target))
    assert running.daemon.reload()
    metrics = running.metrics()
    assert "healthd_config_last_reload_successful 1.0" in metrics
    stamp = re.search(
        r"^healthd_config_last_reload_success_timestamp_seconds (\S+)$", metrics, re.M
    )
    assert stamp is not None
    assert float(stamp.group(1)) >= good_reload_at

    caplog.set_level(logging.ERROR, logger="healthd")
    running.path.write_text(running.path.read_text() + "\n[components.broken]\nkind = 'tcp'\n")
    assert not running.daemon.reload()

    metrics = running.metrics()
    assert "healthd_config_last_reload_successful 0.0" in metrics
    assert f"healthd_config_last_reload_success_timestamp_seconds {stamp.group(1)}" in metrics
    # The running config goes on: steady keeps being checked, and the broken one never runs.
    checked = running.state("steady")
    assert checked is not None
    await running.until("steady", lambda s: s.checked_at > checked.checked_at)
    await running.until("steady", lambda s: s.checked_at > checked.checked_at + 0.3)
    assert running.state("broken") is None
    errors = [r for r in caplog.records if "reload failed" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "components.broken.address" in errors[0].getMessage()

    running.rewrite(_components(tcp_target))
    assert running.daemon.reload()
    assert "healthd_config_last_reload_successful 1.0" in running.metrics()


async def _reload_to_a_config_without_components_is_refused_and_keeps_the_old_one(
    running: _Running, tcp_target: TcpTarget, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = running.path.parent / "elsewhere.json"
    status_file = running.settings["status_file"]
    caplog.set_level(logging.ERROR, logger="healthd")
    for text in ("", f'[daemon]\nstatus_file = "{elsewhere}"\n'):
        running.path.write_text(text)

        assert not running.daemon.reload()

        assert "healthd_config_last_reload_successful 0.0" in running.metrics()
        checked = running.state("steady")
        assert checked is not None
        before = checked.checked_at
        await running.until("steady", lambda s, before=before: s.checked_at > before)
        assert running.state("old") is not None
    errors = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
    assert len(errors) == 2, errors
    assert all("components: no components" in e for e in errors)
    # The status file is still written where it was, not at the refused file's path.
    written = Path(status_file).stat().st_mtime_ns
    with anyio.fail_after(5):
        while Path(status_file).stat().st_mtime_ns == written:
            await anyio.sleep(0.05)
    assert not elsewhere.exists()


@pytest.mark.parametrize(
    "scenario",
    [
        _reload_keeps_hysteresis_and_since_of_unchanged_components,
        _reload_starts_new_checks_and_drops_removed_ones_with_their_series,
        _reload_restarts_a_changed_check_with_fresh_history,
        _invalid_reload_keeps_the_old_config_logs_once_and_sets_the_metric,
        _reload_to_a_config_without_components_is_refused_and_keeps_the_old_one,
    ],
    ids=lambda scenario: scenario.__name__.lstrip("_"),
)
@pytest.mark.asyncio
async def test_reload(
    tmp_path: Path,
    tcp_target: TcpTarget,
    caplog: pytest.LogCaptureFixture,
    scenario: Callable[[_Running, TcpTarget, pytest.LogCaptureFixture], Awaitable[None]],
) -> None:
    """Each scenario against a daemon of its own, reloaded in-process as SIGHUP would."""
    async with _run_daemon(tmp_path, tcp_target) as running:
        await scenario(running, tcp_target, caplog)


def test_sighup_sends_reloading_with_monotonic_usec_then_ready_and_applies_the_config(
    tmp_path: Path, tcp_target: TcpTarget
) -> None:
    settings = _daemon_settings(tmp_path)
    port = int(settings["metrics_address"].rsplit(":", 1)[1])
    components = {"old": {"kind": "tcp", "address": tcp_target.address}}
    path = write_config(tmp_path / "healthd.toml", settings, components)
    with running_healthd(path) as daemon:
        ready = daemon.notify.wait_for(lambda m: "READY" in m, 15)
        write_config(path, settings, {"added": {"kind": "tcp", "address": tcp_target.address}})
        sent_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.signal(signal.SIGHUP)

        reloading = daemon.notify.wait_for(lambda m: "RELOADING" in m, 5, after=ready.at)
        assert reloading.fields["RELOADING"] == "1"
        assert int(reloading.fields["MONOTONIC_USEC"]) >= sent_usec
        again = daemon.notify.wait_for(lambda m: "READY" in m, 5, after=reloading.at)
        assert again.fields["READY"] == "1"

        deadline = time.monotonic() + 5
        while 'component="added"' not in (text := scrape(port)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 'healthd_component_up{component="added",kind="tcp"} 1.0' in text
        assert 'component="old"' not in text
        assert "healthd_config_last_reload_successful 1.0" in text

        # An invalid file: RELOADING=1 and READY=1 all the same, the metric says 0.
        path.write_text("[daemon\n")
        daemon.signal(signal.SIGHUP)
        failed = daemon.notify.wait_for(lambda m: "RELOADING" in m, 5, after=again.at)
        daemon.notify.wait_for(lambda m: "READY" in m, 5, after=failed.at)
        assert "healthd_config_last_reload_successful 0.0" in scrape(port)
        assert 'healthd_component_up{component="added",kind="tcp"} 1.0' in scrape(port)
        assert daemon.stop() == 0
        assert daemon.log().count("reload failed") == 1
