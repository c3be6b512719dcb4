"""The vocabulary of findings, and the line it draws: probes assess with it, never with the
judge. Its pieces too: ``worst``, ``format_seconds``, limits and body conditions."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

import healthd.probes
from healthd.config import Condition
from healthd.findings import (
    above_limit,
    failed_unless_busy,
    format_seconds,
    judge_conditions,
    percent,
    worst,
)
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


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0042, "4.2 ms"),
        (0.25, "250 ms"),
        (0.9999, "1 s"),
        (1.0, "1 s"),
        (1.44, "1.44 s"),
        (59.5, "59.5 s"),
        (1200.0, "1200 s"),
    ],
)
def test_format_seconds_is_short_and_human(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_worst_picks_the_most_severe_and_the_first_of_equals() -> None:
    ok = Finding(Status.HEALTHY, "ok", "GET / returned 200")
    fail = Finding(Status.UNHEALTHY, "http_status", "GET / returned 503")
    slow = Finding(Status.DEGRADED, "slow", "GET / returned 200, but took 2 s (limit 1 s)")
    other_failure = Finding(Status.UNHEALTHY, "condition_failed", "x")

    assert worst([ok, fail, slow, other_failure], ok) is fail
    assert worst([], slow) is slow


# --- body conditions ------------------------------------------------------------------------

DOC = (
    b'{"status": "ok", "up": true, "count": 1, "ratio": 0.5, "name": "primary",'
    b' "lag": 12.5, "items": [{"id": "a"}, {"id": "b"}], "nothing": null, "text": "5"}'
)
WHAT = "GET /health"


def cond(**fields: Any) -> Condition:
    """A condition as it would come from the config file (``json`` is the path key)."""
    return Condition.model_validate(fields)


def holds(test_id: str, conditions: list[Condition], *, body: bytes = DOC) -> Any:
    """A row of conditions that all hold on ``body``."""
    return pytest.param(conditions, body, None, id=test_id)


def fails(
    test_id: str,
    conditions: list[Condition],
    described: str,
    *,
    body: bytes = DOC,
    status: Status = U,
) -> Any:
    """A row of conditions of which those ``described`` fail on ``body``, making it ``status``."""
    return pytest.param(conditions, body, (status, described), id=test_id)


@pytest.mark.parametrize(
    ("conditions", "body", "expected"),
    [
        holds("no-conditions", [], body=b"anything"),
        holds("equals-string", [cond(json="status", equals="ok")]),
        holds("equals-true", [cond(json="up", equals=True)]),
        holds("int-equals-float", [cond(json="count", equals=1.0)]),
        fails("true-is-not-1", [cond(json="up", equals=1)], "up == 1 (got true)"),
        fails("1-is-not-true", [cond(json="count", equals=True)], "count == True (got 1)"),
        fails("string-is-not-number", [cond(json="text", equals=5)], "text == 5 (got '5')"),
        holds("list-index", [cond(json="items.1.id", equals="b")]),
        holds("negative-index", [cond(json="items.-1.id", equals="b")]),
        fails(
            "index-out-of-range",
            [cond(json="items.2.id", equals="c")],
            "items.2.id == 'c' (absent)",
        ),
        holds("max-is-inclusive", [cond(json="lag", max=12.5)]),
        holds("min-is-inclusive", [cond(json="lag", min=12.5)]),
        fails("range-exceeded", [cond(json="lag", min=1, max=10)], "lag >= 1 and <= 10 (got 12.5)"),
        fails(
            "string-is-not-a-number-for-bounds",
            [cond(json="text", min=1)],
            "text >= 1 (got '5', not a number)",
        ),
        fails(
            "bool-is-not-a-number-for-bounds",
            [cond(json="up", max=10)],
            "up <= 10 (got true, not a number)",
        ),
        fails("bound-on-absent-field", [cond(json="missing", min=1)], "missing >= 1 (absent)"),
        holds("null-is-present", [cond(json="nothing", present=True)]),
        holds("absent-as-wanted", [cond(json="gone", present=False)]),
        fails(
            "present-when-it-should-not-be",
            [cond(json="status", present=False)],
            "status absent (present)",
        ),
        fails(
            "path-through-a-string",
            [cond(json="status.deep", present=True)],
            "status.deep present (absent)",
        ),
        holds("regex-matches", [cond(regex=r'"name":\s*"primary"')]),
        fails("regex-fails", [cond(regex="^primary$")], "body matches /^primary$/ (no match)"),
        holds("regex-on-binary-body", [cond(regex="ok")], body=b"\xff\xfe ok \x00"),
        fails(
            "not-json",
            [cond(json="status", equals="ok")],
            "status == 'ok' (body is not JSON)",
            body=b"<html>ok</html>",
        ),
        fails(
            "not-utf8",
            [cond(json="status", equals="ok")],
            "status == 'ok' (body is not JSON)",
            body=b"\xff\xfe",
        ),
        fails(
            "degraded-severity",
            [cond(json="lag", max=1, severity="degraded")],
            "lag <= 1 (got 12.5)",
            status=D,
        ),
        fails(
            "worst-severity-lists-all-its-failures",
            [
                cond(json="lag", max=1, severity="degraded"),
                cond(json="status", equals="down"),
                cond(json="count", min=2),
            ],
            "status == 'down' (got 'ok'); count >= 2 (got 1)",
        ),
        fails(
            "several-degraded",
            [cond(json="lag", max=1, severity="degraded"), cond(regex="zzz", severity="degraded")],
            "lag <= 1 (got 12.5); body matches /zzz/ (no match)",
            status=D,
        ),
        fails(
            "named-condition",
            [cond(json="lag", max=1, name="replica lag")],
            "replica lag (got 12.5)",
        ),
        fails(
            "nesting-deeper-than-the-parser-goes",
            [cond(json="status", equals="ok")],
            "status == 'ok' (body is not JSON)",
            body=b"[" * 200_000,
        ),
        fails(
            "nan-is-not-within-bounds",
            [cond(json="lag", max=100)],
            "lag <= 100 (got NaN, not a number)",
            body=b'{"lag": NaN}',
        ),
    ],
)
def test_body_conditions(
    conditions: list[Condition], body: bytes, expected: tuple[Status, str] | None
) -> None:
    finding = judge_conditions(conditions, body, WHAT)

    if expected is None:
        assert finding is None
    else:
        status, described = expected
        assert finding == Finding(
            status, "condition_failed", f"{WHAT}: condition failed: {described}"
        )
