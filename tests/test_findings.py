"""The vocabulary of findings, and the line it draws: probes assess with it, never with the
judge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import healthd.probes
from healthd.findings import above_limit, failed_unless_busy, percent, worst
from healthd.model import Failure, Finding, Observation, Status

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY
PROBES_DIR = Path(healthd.probes.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports too)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module)
            # ``from healthd import classify`` names the module as an alias.
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_no_probe_module_imports_the_judge() -> None:
    sources = sorted(PROBES_DIR.glob("*.py"))
    assert len(sources) > 10, sources  # every kind, the presets' helpers and the table
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.startswith("healthd.classify"))
        for path in sources
    }
    assert {name: found for name, found in offenders.items() if found} == {}


@pytest.mark.parametrize(
    "source",
    [
        "from healthd import classify\n",
        "import healthd.classify as judge\n",
        "def assess():\n    from healthd.classify import worst\n",
    ],
)
def test_the_import_check_sees_every_way_of_importing_the_judge(
    tmp_path: Path, source: str
) -> None:
    path = tmp_path / "kind.py"
    path.write_text(source)
    assert "healthd.classify" in _imported_modules(path)


BUSY = Observation(0.01, failure=Failure("saturated", "too many clients already"))
DOWN = Observation(0.01, failure=Failure("connection_refused", "connection refused"))


@pytest.mark.parametrize(
    ("observation", "status", "code"),
    [(BUSY, D, "saturated"), (DOWN, U, "connection_refused")],
)
def test_a_busy_server_is_degraded_and_any_other_failure_unhealthy(
    observation: Observation, status: Status, code: str
) -> None:
    assert observation.failure is not None
    assert failed_unless_busy(observation) == Finding(status, code, observation.failure.message)


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        (2.0, 1.0, "lag is 2 s (limit 1 s)"),
        (1.0, 1.0, None),  # at the limit is within it
        (0.5, 1.0, None),
        (None, 1.0, None),  # not measured
        (2.0, None, None),  # no limit configured
    ],
)
def test_above_limit_is_degraded_only_past_a_configured_limit(
    value: float | None, limit: float | None, expected: str | None
) -> None:
    finding = above_limit(value, limit, "lagging", "lag is {value} (limit {limit})")
    if expected is None:
        assert finding is None
    else:
        assert finding == Finding(D, "lagging", expected)


def test_above_limit_shows_value_and_limit_its_way_and_facts_as_they_are() -> None:
    finding = above_limit(
        0.93, 0.9, "clients_high", "{n} clients ({value}, limit {limit})", percent, facts={"n": 93}
    )
    assert finding == Finding(D, "clients_high", "93 clients (93%, limit 90%)")


def test_worst_passes_over_findings_that_are_none() -> None:
    healthy = Finding(H, "ok", "fine")
    slow = Finding(D, "slow", "slow")
    assert worst([None, slow, None], healthy) is slow
    assert worst([None, None], healthy) is healthy
