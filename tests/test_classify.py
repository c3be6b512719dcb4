"""Table tests for the pure judges: hysteresis, aggregation, body conditions and latency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from healthd.classify import (
    check_latency,
    failed,
    format_seconds,
    judge,
    judge_conditions,
    next_state,
    overall,
    unhealthy_dependencies,
    worst,
)
from healthd.config import Condition, TcpCheck
from healthd.model import ComponentState, Failure, Finding, Observation, Status

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY

OK = Finding(H, "ok", "GET / returned 200")
FAIL = Finding(U, "http_status", "GET / returned 503")
TIMEOUT = Finding(U, "timeout", "GET /: timed out waiting for the response (limit 0.85 s)")
SLOW = Finding(D, "slow", "GET / returned 200, but took 2 s (limit 1 s)")


def check(**settings: Any) -> TcpCheck:
    """A fully resolved check (as ``Config`` would hand it over) with the given policy."""
    settings.setdefault("interval", 10)
    settings.setdefault("timeout", 1)
    return TcpCheck(address="db.internal:5432", **settings)


def replay(
    findings: Sequence[Finding],
    *,
    latencies: Sequence[float] | None = None,
    start: float = 1000.0,
    **policy: Any,
) -> list[ComponentState]:
    """Feed findings one by one, 10 s apart, and return every state along the way."""
    the_check = check(**policy)
    states: list[ComponentState] = []
    previous = None
    for i, finding in enumerate(findings):
        latency = latencies[i] if latencies else 0.01
        previous = next_state(
            previous,
            name="db",
            check=the_check,
            finding=finding,
            observation=Observation(latency, facts={"step": i}),
            now=start + 10 * i,
        )
        states.append(previous)
    return states


# --- hysteresis -----------------------------------------------------------------------------


def _recovering(step: int, of: int, finding: Finding) -> tuple[Status, str, str]:
    return (D, "recovering", f"recovering {step} of {of}: {finding.reason}")


def _debounced(step: int, of: int, finding: Finding) -> tuple[Status, str, str]:
    return (D, finding.reason_code, f"{finding.reason} ({step} of {of} failures)")


def _as_is(finding: Finding) -> tuple[Status, str, str]:
    return (finding.status, finding.reason_code, finding.reason)


@pytest.mark.parametrize(
    ("findings", "policy", "expected"),
    [
        pytest.param(
            [OK, FAIL, FAIL, FAIL, OK, OK],
            {"failure_threshold": 3, "recovery_threshold": 2},
            [
                _as_is(OK),
                _debounced(1, 3, FAIL),
                _debounced(2, 3, FAIL),
                _as_is(FAIL),
                _recovering(1, 2, OK),
                _as_is(OK),
            ],
            id="fail-three-times-then-recover-in-two",
        ),
        pytest.param(
            [FAIL, OK, OK],
            {},
            [_as_is(FAIL), _recovering(1, 2, OK), _as_is(OK)],
            id="first-result-failing-is-unhealthy-at-once",
        ),
        pytest.param([OK], {}, [_as_is(OK)], id="first-result-healthy"),
        pytest.param([SLOW], {}, [_as_is(SLOW)], id="first-result-degraded"),
        pytest.param(
            [OK, FAIL, OK, FAIL, FAIL],
            {},
            [
                _as_is(OK),
                _debounced(1, 3, FAIL),
                _as_is(OK),
                _debounced(1, 3, FAIL),
                _debounced(2, 3, FAIL),
            ],
            id="a-success-restarts-the-failure-count",
        ),
        pytest.param(
            [FAIL, SLOW, SLOW],
            {},
            [_as_is(FAIL), _recovering(1, 2, SLOW), _as_is(SLOW)],
            id="degraded-findings-count-as-successes",
        ),
        pytest.param(
            [FAIL, OK, FAIL, OK],
            {},
            [_as_is(FAIL), _recovering(1, 2, OK), _as_is(FAIL), _recovering(1, 2, OK)],
            id="a-failure-while-recovering-goes-straight-back-to-unhealthy",
        ),
        pytest.param(
            [OK, SLOW, FAIL, FAIL, FAIL],
            {},
            [
                _as_is(OK),
                _as_is(SLOW),
                _debounced(1, 3, FAIL),
                _debounced(2, 3, FAIL),
                _as_is(FAIL),
            ],
            id="failures-after-degraded-are-debounced-too",
        ),
        pytest.param(
            [OK, FAIL, OK],
            {"failure_threshold": 1, "recovery_threshold": 1},
            [_as_is(OK), _as_is(FAIL), _as_is(OK)],
            id="thresholds-of-one-switch-at-once",
        ),
        pytest.param(
            [FAIL, TIMEOUT],
            {},
            [_as_is(FAIL), _as_is(TIMEOUT)],
            id="unhealthy-reports-the-latest-failure",
        ),
        pytest.param(
            [OK, TIMEOUT, FAIL],
            {},
            [_as_is(OK), _debounced(1, 3, TIMEOUT), _debounced(2, 3, FAIL)],
            id="different-failures-count-towards-one-streak",
        ),
        pytest.param(
            [FAIL, OK, OK, OK],
            {"recovery_threshold": 3},
            [_as_is(FAIL), _recovering(1, 3, OK), _recovering(2, 3, OK), _as_is(OK)],
            id="recovery-threshold-of-three",
        ),
    ],
)
def test_hysteresis_sequence(
    findings: list[Finding], policy: dict[str, int], expected: list[tuple[Status, str, str]]
) -> None:
    states = replay(findings, **policy)

    assert [(s.status, s.reason_code, s.reason) for s in states] == expected


def test_consecutive_counts_follow_the_streaks() -> None:
    states = replay([OK, SLOW, FAIL, FAIL, OK])

    assert [s.consecutive_successes for s in states] == [1, 2, 0, 0, 1]
    assert [s.consecutive_failures for s in states] == [0, 0, 1, 2, 0]


def test_checks_total_counts_successes_and_failures_by_reason_code() -> None:
    states = replay([OK, SLOW, FAIL, TIMEOUT, FAIL, OK])

    assert dict(states[-1].checks_total) == {"success": 3, "http_status": 2, "timeout": 1}
    # Earlier states are not changed by later ones.
    assert dict(states[0].checks_total) == {"success": 1}


def test_since_changes_only_when_the_status_changes() -> None:
    states = replay([OK, OK, FAIL, FAIL, FAIL, FAIL, OK], start=100)

    assert [s.status for s in states] == [H, H, D, D, U, U, D]
    assert [s.since for s in states] == [100, 100, 120, 120, 140, 140, 160]
    assert [s.checked_at for s in states] == [100, 110, 120, 130, 140, 150, 160]


def test_last_success_is_kept_through_failures_and_none_without_one() -> None:
    assert [s.last_success_at for s in replay([OK, FAIL, FAIL], start=0)] == [0, 0, 0]
    assert [s.last_success_at for s in replay([FAIL, FAIL, SLOW], start=0)] == [None, None, 20]


def test_every_latency_lands_in_the_histogram() -> None:
    states = replay([OK, OK, FAIL, OK], latencies=[0.003, 0.25, 7.0, 20.0])

    durations = states[-1].durations
    bounds = dict(zip(durations.upper_bounds, durations.buckets, strict=False))
    assert durations.count == 4
    assert durations.sum == pytest.approx(27.253)
    assert bounds[0.005] == 1
    assert bounds[0.25] == 2  # an observation on a bound counts in that bucket
    assert bounds[5.0] == 2
    assert bounds[10.0] == 3
    assert durations.buckets[-1] == 4  # +Inf
    assert states[-1].latency_seconds == 20.0


def test_state_carries_identity_and_details_of_the_latest_observation() -> None:
    the_check = check(critical=True, depends_on=("network",))
    state = next_state(
        None,
        name="db",
        check=the_check,
        finding=OK,
        observation=Observation(0.02, facts={"tls": True}),
        now=5.0,
    )

    assert (state.name, state.kind, state.critical, state.depends_on) == (
        "db",
        "tcp",
        True,
        ("network",),
    )
    assert dict(state.details) == {"tls": True}
    with pytest.raises(TypeError):
        state.details["tls"] = False  # type: ignore[index]


# --- aggregation ----------------------------------------------------------------------------


def component(status: Status, *, critical: bool, name: str = "c") -> ComponentState:
    """A state with just enough filled in to aggregate."""
    return ComponentState(
        name=name,
        kind="tcp",
        critical=critical,
        status=status,
        reason_code="x",
        reason="x",
        latency_seconds=0.0,
        checked_at=0.0,
        since=0.0,
        last_success_at=None,
        consecutive_failures=0,
        consecutive_successes=0,
    )


@pytest.mark.parametrize(
    ("components", "expected"),
    [
        pytest.param([], H, id="no-components-is-healthy"),
        pytest.param([(H, True), (H, False)], H, id="all-healthy"),
        pytest.param([(H, True), (D, False)], D, id="non-critical-degraded"),
        pytest.param([(D, True), (H, False)], D, id="critical-degraded"),
        pytest.param([(H, True), (U, False)], D, id="non-critical-unhealthy-is-only-degraded"),
        pytest.param([(U, True), (H, False)], U, id="critical-unhealthy"),
        pytest.param([(H, False), (D, False), (U, True)], U, id="critical-unhealthy-wins-last"),
        pytest.param([(U, False), (U, False)], D, id="all-non-critical-unhealthy"),
        pytest.param([(U, True), (U, True)], U, id="all-critical-unhealthy"),
    ],
)
def test_overall_verdict(components: list[tuple[Status, bool]], expected: Status) -> None:
    states = [component(status, critical=critical) for status, critical in components]

    assert overall(states) is expected


def test_unhealthy_dependencies_names_only_unhealthy_direct_dependencies() -> None:
    states = {
        "db": component(U, critical=True, name="db"),
        "cache": component(D, critical=False, name="cache"),
        "queue": component(U, critical=False, name="queue"),
    }
    api = replace(component(U, critical=True, name="api"), depends_on=("db", "cache", "missing"))

    assert unhealthy_dependencies(api, states) == ("db",)


# --- latency --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finding", "latency", "limit", "expected"),
    [
        pytest.param(OK, 0.5, "1s", OK, id="under-limit"),
        pytest.param(OK, 1.0, "1s", OK, id="exactly-at-limit"),
        pytest.param(
            OK,
            1.4,
            "1s",
            Finding(D, "slow", "GET / returned 200, but took 1.4 s (limit 1 s)"),
            id="over-limit-is-slow",
        ),
        pytest.param(
            OK,
            0.3,
            "250ms",
            Finding(D, "slow", "GET / returned 200, but took 300 ms (limit 250 ms)"),
            id="milliseconds",
        ),
        pytest.param(OK, 99.0, None, OK, id="no-limit"),
        pytest.param(FAIL, 5.0, "1s", FAIL, id="failure-keeps-its-reason"),
        pytest.param(SLOW, 5.0, "1s", SLOW, id="degraded-keeps-its-reason"),
    ],
)
def test_degraded_latency(
    finding: Finding, latency: float, limit: str | None, expected: Finding
) -> None:
    the_check = check(degraded_latency=limit)

    assert check_latency(the_check, Observation(latency), finding) == expected


def test_judge_applies_the_latency_limit_after_the_kinds_assessment() -> None:
    the_check = check(degraded_latency="10ms")

    finding = judge(the_check, Observation(0.02), lambda _c, _o: OK)

    assert finding == Finding(D, "slow", "GET / returned 200, but took 20 ms (limit 10 ms)")


def test_judge_passes_failures_through() -> None:
    observation = Observation(3.0, failure=Failure("timeout", "connect to x: timed out"))

    finding = judge(check(degraded_latency="1s"), observation, lambda _c, o: failed(o))

    assert finding == Finding(U, "timeout", "connect to x: timed out")


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
    other_failure = Finding(U, "condition_failed", "x")

    assert worst([OK, FAIL, SLOW, other_failure], OK) is FAIL
    assert worst([], SLOW) is SLOW


# --- body conditions ------------------------------------------------------------------------

DOC = (
    b'{"status": "ok", "up": true, "count": 1, "ratio": 0.5, "name": "primary",'
    b' "lag": 12.5, "items": [{"id": "a"}, {"id": "b"}], "nothing": null, "text": "5"}'
)
WHAT = "GET /health"


def cond(**fields: Any) -> Condition:
    """A condition as it would come from the config file (``json`` is the path key)."""
    return Condition.model_validate(fields)


@pytest.mark.parametrize(
    ("conditions", "body", "expected"),
    [
        pytest.param([], b"anything", None, id="no-conditions"),
        pytest.param([cond(json="status", equals="ok")], DOC, None, id="equals-string"),
        pytest.param([cond(json="up", equals=True)], DOC, None, id="equals-true"),
        pytest.param([cond(json="count", equals=1.0)], DOC, None, id="int-equals-float"),
        pytest.param(
            [cond(json="up", equals=1)],
            DOC,
            (U, "up == 1 (got true)"),
            id="true-is-not-1",
        ),
        pytest.param(
            [cond(json="count", equals=True)],
            DOC,
            (U, "count == True (got 1)"),
            id="1-is-not-true",
        ),
        pytest.param(
            [cond(json="text", equals=5)],
            DOC,
            (U, "text == 5 (got '5')"),
            id="string-is-not-number",
        ),
        pytest.param([cond(json="items.1.id", equals="b")], DOC, None, id="list-index"),
        pytest.param([cond(json="items.-1.id", equals="b")], DOC, None, id="negative-index"),
        pytest.param(
            [cond(json="items.2.id", equals="c")],
            DOC,
            (U, "items.2.id == 'c' (absent)"),
            id="index-out-of-range",
        ),
        pytest.param([cond(json="lag", max=12.5)], DOC, None, id="max-is-inclusive"),
        pytest.param([cond(json="lag", min=12.5)], DOC, None, id="min-is-inclusive"),
        pytest.param(
            [cond(json="lag", min=1, max=10)],
            DOC,
            (U, "lag >= 1 and <= 10 (got 12.5)"),
            id="range-exceeded",
        ),
        pytest.param(
            [cond(json="text", min=1)],
            DOC,
            (U, "text >= 1 (got '5', not a number)"),
            id="string-is-not-a-number-for-bounds",
        ),
        pytest.param(
            [cond(json="up", max=10)],
            DOC,
            (U, "up <= 10 (got true, not a number)"),
            id="bool-is-not-a-number-for-bounds",
        ),
        pytest.param(
            [cond(json="missing", min=1)],
            DOC,
            (U, "missing >= 1 (absent)"),
            id="bound-on-absent-field",
        ),
        pytest.param([cond(json="nothing", present=True)], DOC, None, id="null-is-present"),
        pytest.param([cond(json="gone", present=False)], DOC, None, id="absent-as-wanted"),
        pytest.param(
            [cond(json="status", present=False)],
            DOC,
            (U, "status absent (present)"),
            id="present-when-it-should-not-be",
        ),
        pytest.param(
            [cond(json="status.deep", present=True)],
            DOC,
            (U, "status.deep present (absent)"),
            id="path-through-a-string",
        ),
        pytest.param([cond(regex=r'"name":\s*"primary"')], DOC, None, id="regex-matches"),
        pytest.param(
            [cond(regex="^primary$")],
            DOC,
            (U, "body matches /^primary$/ (no match)"),
            id="regex-fails",
        ),
        pytest.param([cond(regex="ok")], b"\xff\xfe ok \x00", None, id="regex-on-binary-body"),
        pytest.param(
            [cond(json="status", equals="ok")],
            b"<html>ok</html>",
            (U, "status == 'ok' (body is not JSON)"),
            id="not-json",
        ),
        pytest.param(
            [cond(json="status", equals="ok")],
            b"\xff\xfe",
            (U, "status == 'ok' (body is not JSON)"),
            id="not-utf8",
        ),
        pytest.param(
            [cond(json="lag", max=1, severity="degraded")],
            DOC,
            (D, "lag <= 1 (got 12.5)"),
            id="degraded-severity",
        ),
        pytest.param(
            [
                cond(json="lag", max=1, severity="degraded"),
                cond(json="status", equals="down"),
                cond(json="count", min=2),
            ],
            DOC,
            (U, "status == 'down' (got 'ok'); count >= 2 (got 1)"),
            id="worst-severity-lists-all-its-failures",
        ),
        pytest.param(
            [cond(json="lag", max=1, severity="degraded"), cond(regex="zzz", severity="degraded")],
            DOC,
            (D, "lag <= 1 (got 12.5); body matches /zzz/ (no match)"),
            id="several-degraded",
        ),
        pytest.param(
            [cond(json="lag", max=1, name="replica lag")],
            DOC,
            (U, "replica lag (got 12.5)"),
            id="named-condition",
        ),
        pytest.param(
            [cond(json="status", equals="ok")],
            b"[" * 200_000,
            (U, "status == 'ok' (body is not JSON)"),
            id="nesting-deeper-than-the-parser-goes",
        ),
        pytest.param(
            [cond(json="lag", max=100)],
            b'{"lag": NaN}',
            (U, "lag <= 100 (got NaN, not a number)"),
            id="nan-is-not-within-bounds",
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
