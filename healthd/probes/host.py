"""The ``host`` kind: this machine's disks, memory and pressure stalls.

- **Disk usage** of each of ``disk_paths``, as ``df`` computes it: used blocks over the blocks
  an unprivileged user could ever have, ``(f_blocks - f_bfree) / (f_blocks - f_bfree +
  f_bavail)``. The blocks reserved for root count neither as used nor as available, so a
  disk that says 100% is full for every service healthd watches.
- **Available memory**: ``MemAvailable / MemTotal`` from ``/proc/meminfo``.
- **Pressure stalls**: ``some avg60`` of ``/proc/pressure/{memory,io,cpu}``, the percent of
  the last minute in which some task waited for the resource. A kernel without PSI has no
  such files: that is said in ``details``, not judged.

``statvfs`` runs in a worker thread, since on a hung network mount it never returns; the proc
files are read on the loop, as they are generated in memory and answer at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import anyio.to_thread

from healthd.config import HostCheck
from healthd.findings import OK, failed, format_seconds, worst
from healthd.model import Failure, Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes._errors import CLIENT_TIMEOUT_SHARE

#: The resources whose pressure is judged, in the order a reason names them.
PRESSURE_RESOURCES = ("memory", "io", "cpu")

_PROC = Path("/proc")


async def probe(check: HostCheck, ctx: ProbeContext) -> Observation:
    """Measure every disk path (concurrently, each in a thread), then memory and pressure."""
    started = time.perf_counter()
    disks: dict[str, dict[str, float | int]] = {}
    errors: dict[str, str] = {}

    async def measure(path: str) -> None:
        try:
            stat = await anyio.to_thread.run_sync(os.statvfs, path, abandon_on_cancel=True)
        except OSError as exc:
            errors[path] = exc.strerror or type(exc).__name__
            return
        disks[path] = _disk_usage(stat)

    with anyio.move_on_after(check.timeout_seconds * CLIENT_TIMEOUT_SHARE):
        async with anyio.create_task_group() as group:
            for path in check.disk_paths:
                group.start_soon(measure, path)
    latency = time.perf_counter() - started
    hung = [path for path in check.disk_paths if path not in disks and path not in errors]
    if hung:
        limit = format_seconds(check.timeout_seconds)
        return Observation(
            latency,
            failure=Failure("timeout", f"statvfs {', '.join(hung)}: no answer (timeout {limit})"),
        )
    if errors:
        message = "; ".join(f"statvfs {path}: {reason}" for path, reason in errors.items())
        return Observation(latency, failure=Failure("disk_unreadable", message))
    try:
        memory = _memory(_read(_PROC / "meminfo"))
    except (OSError, ValueError, KeyError) as exc:
        return Observation(
            latency, failure=Failure("memory_unreadable", f"/proc/meminfo: {exc!s:.120}")
        )
    pressure: dict[str, float] = {}
    for resource in PRESSURE_RESOURCES:
        try:
            text = _read(_PROC / "pressure" / resource)
        except OSError:
            # No PSI in this kernel (or it is off, psi=0): nothing to judge, not an error.
            continue
        if (value := _some_avg60(text)) is not None:
            pressure[resource] = value
    facts: dict[str, object] = {
        "disks": {path: disks[path] for path in check.disk_paths},
        "memory_total_bytes": memory[0],
        "memory_available_bytes": memory[1],
        "memory_available": memory[1] / memory[0] if memory[0] else 0.0,
        "pressure_some_avg60": pressure,
    }
    if not pressure:
        facts["pressure_note"] = "this kernel reports no pressure stall information"
    return Observation(time.perf_counter() - started, facts=facts)


def _read(path: Path) -> str:
    # Proc files are small and generated on read; 64 KiB is more than any of them.
    with path.open("rb") as file:
        return file.read(65536).decode("ascii", "replace")


def _disk_usage(stat: os.statvfs_result) -> dict[str, float | int]:
    used = stat.f_blocks - stat.f_bfree
    usable = used + stat.f_bavail
    return {
        "usage": used / usable if usable > 0 else 0.0,
        "size_bytes": usable * stat.f_frsize,
        "available_bytes": stat.f_bavail * stat.f_frsize,
    }


def _memory(meminfo: str) -> tuple[int, int]:
    """``(MemTotal, MemAvailable)`` in bytes."""
    fields: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            fields[key] = int(rest.split()[0]) * 1024  # the kernel writes kB, meaning KiB
    return fields["MemTotal"], fields["MemAvailable"]


def _some_avg60(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("some "):
            for part in line.split()[1:]:
                key, _, value = part.partition("=")
                if key == "avg60":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def assess(check: HostCheck, observation: Observation) -> Finding:
    """The worst of disk, memory and pressure; each names what and how much."""
    if observation.failure is not None:
        return failed(observation)
    facts = observation.facts
    findings: list[Finding] = []
    for path, disk in facts["disks"].items():
        usage = disk["usage"]
        status = _status(usage >= check.unhealthy_disk_usage, usage >= check.degraded_disk_usage)
        if status is not None:
            free = _format_bytes(disk["available_bytes"])
            findings.append(
                Finding(status, "disk_full", f"{path} is {usage:.0%} full ({free} free)")
            )
    available = facts["memory_available"]
    status = _status(
        available <= check.unhealthy_memory_available,
        available <= check.degraded_memory_available,
    )
    if status is not None:
        total = _format_bytes(facts["memory_total_bytes"])
        findings.append(
            Finding(status, "memory_low", f"memory: {available:.0%} available of {total}")
        )
    for resource, percent in facts["pressure_some_avg60"].items():
        status = _status(percent >= check.unhealthy_pressure, percent >= check.degraded_pressure)
        if status is not None:
            findings.append(
                Finding(
                    status, "pressure", f"{resource} pressure: some avg60 {percent:.1f}% stalled"
                )
            )
    if findings:
        # Unhealthy first, then in the order measured; the rest join the reason.
        chosen = worst(findings, findings[0])
        others = [f.reason for f in findings if f is not chosen]
        reason = "; ".join([chosen.reason, *others])
        return Finding(chosen.status, chosen.reason_code, reason)
    disks = ", ".join(f"{path} {disk['usage']:.0%}" for path, disk in facts["disks"].items())
    memory = f"memory {available:.0%} available"
    return Finding(Status.HEALTHY, OK, f"disks {disks} used; {memory}" if disks else memory)


def _status(unhealthy: bool, degraded: bool) -> Status | None:
    if unhealthy:
        return Status.UNHEALTHY
    return Status.DEGRADED if degraded else None


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} TiB"
