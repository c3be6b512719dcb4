"""The host probe against this machine's real /proc and statvfs, and its judge in tables."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from healthd.config import ConfigError, load
from healthd.model import Finding, Observation, Status
from healthd.probes import ProbeContext
from healthd.probes.host import assess
from tests.probing import make_check, run_check

host_check = functools.partial(make_check, "host", timeout=2)


@pytest.mark.asyncio
async def test_real_disk_usage_matches_df_arithmetic(ctx: ProbeContext) -> None:
    observation, finding = await run_check(host_check(disk_paths=("/",)), ctx)

    assert observation.failure is None
    stat = os.statvfs("/")
    used = stat.f_blocks - stat.f_bfree
    disk = observation.facts["disks"]["/"]
    assert disk["usage"] == pytest.approx(used / (used + stat.f_bavail), abs=0.01)
    assert 0 < observation.facts["memory_available"] <= 1
    assert observation.facts["memory_total_bytes"] > 0
    if Path("/proc/pressure/memory").exists():
        assert set(observation.facts["pressure_some_avg60"]) <= {"memory", "io", "cpu"}
        assert observation.facts["pressure_some_avg60"]
    else:
        assert "pressure_note" in observation.facts
    assert finding.status in (Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY)


@pytest.mark.asyncio
async def test_tiny_disk_threshold_trips_on_a_real_disk(ctx: ProbeContext) -> None:
    check = host_check(
        disk_paths=("/", "/tmp"), degraded_disk_usage=0.00001, unhealthy_disk_usage=0.0001
    )

    _, finding = await run_check(check, ctx)

    assert (finding.status, finding.reason_code) == (Status.UNHEALTHY, "disk_full")
    assert finding.reason.startswith("/ is ")
    assert "/tmp is " in finding.reason
    assert "free)" in finding.reason


@pytest.mark.asyncio
async def test_high_memory_threshold_trips_on_real_memory(ctx: ProbeContext) -> None:
    check = host_check(unhealthy_memory_available=1.0, degraded_memory_available=1.0)

    _, finding = await run_check(check, ctx)

    assert finding == Finding(Status.UNHEALTHY, "memory_low", finding.reason)
    assert finding.reason.startswith("memory: ")
    assert "available of" in finding.reason


@pytest.mark.asyncio
async def test_zero_pressure_threshold_trips_where_the_kernel_has_psi(ctx: ProbeContext) -> None:
    if not Path("/proc/pressure/cpu").exists():
        pytest.skip("this kernel has no pressure stall information")
    check = host_check(degraded_pressure=0.0, unhealthy_pressure=100.0)

    _, finding = await run_check(check, ctx)

    assert (finding.status, finding.reason_code) == (Status.DEGRADED, "pressure")
    assert "memory pressure: some avg60" in finding.reason


@pytest.mark.asyncio
async def test_missing_disk_path_is_unhealthy_naming_it(ctx: ProbeContext) -> None:
    _, finding = await run_check(host_check(disk_paths=("/no/such/mount",)), ctx)

    assert finding == Finding(
        Status.UNHEALTHY, "disk_unreadable", "statvfs /no/such/mount: No such file or directory"
    )


def facts(
    usage: float = 0.5, available: float = 0.5, pressure: dict[str, float] | None = None
) -> Observation:
    """An observation as the probe makes it, with one disk at ``/``."""
    return Observation(
        0.001,
        facts={
            "disks": {"/": {"usage": usage, "size_bytes": 10 << 30, "available_bytes": 5 << 30}},
            "memory_total_bytes": 2 << 30,
            "memory_available_bytes": int(available * (2 << 30)),
            "memory_available": available,
            "pressure_some_avg60": pressure if pressure is not None else {"memory": 1.0},
        },
    )


@pytest.mark.parametrize(
    ("observation", "status", "code"),
    [
        (facts(), Status.HEALTHY, "ok"),
        (facts(usage=0.85), Status.DEGRADED, "disk_full"),
        (facts(usage=0.96), Status.UNHEALTHY, "disk_full"),
        (facts(available=0.15), Status.DEGRADED, "memory_low"),
        (facts(available=0.04), Status.UNHEALTHY, "memory_low"),
        (facts(pressure={"io": 20.0}), Status.DEGRADED, "pressure"),
        (facts(pressure={"cpu": 75.0}), Status.UNHEALTHY, "pressure"),
        (facts(pressure={}), Status.HEALTHY, "ok"),
        # The unhealthy finding leads, whatever was measured first.
        (facts(usage=0.9, available=0.01), Status.UNHEALTHY, "memory_low"),
    ],
)
def test_assess_thresholds(observation: Observation, status: Status, code: str) -> None:
    finding = assess(host_check(), observation)

    assert (finding.status, finding.reason_code) == (status, code)


def test_assess_names_every_problem_worst_first() -> None:
    finding = assess(host_check(), facts(usage=0.9, available=0.01, pressure={"io": 30.0}))

    assert finding.reason == (
        "memory: 1% available of 2 GiB; / is 90% full (5 GiB free); "
        "io pressure: some avg60 30.0% stalled"
    )


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            "degraded_disk_usage = 0.9\nunhealthy_disk_usage = 0.8",
            ":4: components.host.unhealthy_disk_usage: must not be below degraded_disk_usage (0.9)",
        ),
        (
            "unhealthy_memory_available = 0.5",
            ":3: components.host.unhealthy_memory_available: must not be above "
            "degraded_memory_available (0.15)",
        ),
        (
            "degraded_pressure = 60",
            ":1: components.host.unhealthy_pressure: must not be below degraded_pressure (60)",
        ),
        (
            'disk_paths = ["var"]',
            ":3: components.host.disk_paths: disk path 'var' must be an absolute path",
        ),
        ("degraded_disk_usage = 1.5", ":3: components.host.degraded_disk_usage: Input should be"),
    ],
)
def test_bad_thresholds_name_file_key_and_line(tmp_path: Path, settings: str, problem: str) -> None:
    path = tmp_path / "healthd.toml"
    path.write_text(f'[components.host]\nkind = "host"\n{settings}\n')

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}{problem}")


@pytest.mark.asyncio
async def test_memory_and_pressure_alone_need_no_disk_path(ctx: ProbeContext) -> None:
    check = host_check(disk_paths=(), degraded_pressure=100.0, unhealthy_pressure=100.0)

    observation, finding = await run_check(check, ctx)

    assert observation.facts["disks"] == {}
    assert finding.status is Status.HEALTHY or finding.reason_code == "memory_low"
    assert finding.reason.startswith("memory")  # no disk named
