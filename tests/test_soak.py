"""A one-minute soak (``bench/soak.py``): a real daemon probing refused, frozen, resetting and
garbage-speaking targets keeps its descriptors flat and its memory bounded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow


def _soak_module() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("bench_soak", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_minute_against_failing_targets_leaks_no_descriptors_and_little_memory() -> None:
    soak = _soak_module()
    checks = 40
    # Sixty seconds at most; the probe count is whatever this machine manages in that time.
    result = soak.soak(10**9, checks=checks, interval=0.25, warmup=0.3, max_seconds=60)
    assert result.probes > 2_000, result.table()
    fds = [s.fds for s in result.steady]
    half = len(fds) // 2
    # Flat: no more in the second half than in the first, beyond the checks' own sockets in
    # flight; never anywhere near one per probe.
    assert max(fds[half:]) <= max(fds[:half]) + checks // 4, (fds, result.table())
    assert max(fds) < 64 + 2 * checks, (fds, result.table())
    assert result.rss_growth < 0.10, result.table()
    assert "Traceback" not in result.log
