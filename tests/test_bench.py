"""The bench, scaled down: its in-process rows run and report cached renders, not timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def test_bench_renders_only_changed_components_and_prints_the_table() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--only",
            "metrics,status",
            "--scale",
            "0.02",
            "--rounds",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = result.stdout.splitlines()
    assert "| measure | result | goal |" in lines
    rows = [line for line in lines if line.startswith("| /metrics") or line.startswith("| status")]
    assert len(rows) == 3, result.stdout
    # 5% of 200 components change between scrapes and writes: 10 are rendered again, not 200.
    assert all(re.search(r"re-rendered 10 (of 200 components|entries)", row) for row in rows), rows


def test_bench_history_row_exports_at_both_sizes() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--only", "history", "--scale", "0.01", "--rounds", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| history.json")]
    # Healthy components checked between exports keep their entries: none is rendered again.
    assert [re.search(r"at (\d+) components", row).group(1) for row in rows] == ["10", "100"]  # type: ignore[union-attr]
    assert all("rendered 0 entries in the last" in row for row in rows), rows


def test_bench_rejects_an_unknown_row() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--only", "nope"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "unknown rows: nope" in result.stderr


def test_the_gil_convoy_bench_runs_each_mode_and_prints_a_row_for_each() -> None:
    convoy = BENCH.with_name("gil_convoy.py")
    result = subprocess.run(
        [sys.executable, str(convoy), "--seconds", "0.3", "--runs", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows = [line.split(" | ")[1] for line in result.stdout.splitlines() if line.startswith("| 1 ")]
    assert rows == ["no thread", "unpaced thread", "paced thread"], result.stdout
