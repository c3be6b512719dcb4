"""Table tests for the judge: hysteresis, flapping, staleness, impact, aggregation and the
latency limit (the findings it reads are tests/test_findings.py's)."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from healthd.classify import (
    World,
    check_latency,
    judge,
    judge_world,
    next_state,
    overall,
    root_causes,
)
from healthd.exporters.metrics import exposition
from healthd.findings import failed
from healthd.maintenance import Window
from healthd.model import (
    DURATION_BUCKETS_SECONDS,
    UNTRACKED_DURATIONS,
    ComponentState,
    Failure,
    Finding,
    Observation,
    Status,
)
from healthd.probes import PROBES, ProbeContext
from healthd.scheduler import Scheduler
from healthd.state import StateStore
from tests.http_target import HttpTarget, Reply
from tests.probing import make_check, make_state

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY

OK = Finding(H, "ok", "GET / returned 200")
FAIL = Finding(U, "http_status", "GET / returned 503")
TIMEOUT = Finding(U, "timeout", "GET /: timed out waiting for the response (limit 0.85 s)")
SLOW = Finding(D, "slow", "GET / returned 200, but took 2 s (limit 1 s)")


#: A fully resolved check (as ``Config`` would hand it over); tests give it a policy.
check = functools.partial(make_check, "tcp", address="db.internal:5432")


def replay(
    findings: Sequence[Finding],
    *,
    latencies: Sequence[float] | None = None,
    start: float = 1000.0,
    tracked: Sequence[bool] | None = None,
    previous: ComponentState | None = None,
    **policy: Any,
) -> list[ComponentState]:
    """Feed findings one by one, 10 s apart, and return every state along the way."""
    the_check = check(**policy)
    states: list[ComponentState] = []
    for i, finding in enumerate(findings):
        latency = latencies[i] if latencies else 0.01
        previous = next_state(
            previous,
            name="db",
            check=the_check,
            finding=finding,
            observation=Observation(latency, facts={"step": i}),
            now=start + 10 * i,
            track_durations=tracked[i] if tracked else True,
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


def test_durations_not_exported_are_one_shared_empty_histogram() -> None:
    # Off (check_duration_histogram = false, the default), then switched on by a reload.
    states = replay(
        [OK, FAIL, OK, OK], latencies=[0.003, 7.0, 0.25, 20.0], tracked=[False, False, True, True]
    )
    assert states[0].durations is states[1].durations is UNTRACKED_DURATIONS
    assert UNTRACKED_DURATIONS.count == 0
    assert UNTRACKED_DURATIONS.upper_bounds == DURATION_BUCKETS_SECONDS
    # Tracking starts from empty: the two observations made while on.
    assert states[-1].durations.count == 2
    assert states[-1].durations.sum == pytest.approx(20.25)
    # And stops again without keeping a copy per state.
    off = replay([OK], tracked=[False], previous=states[-1])
    assert off[0].durations is UNTRACKED_DURATIONS


def test_states_with_the_same_details_share_one_read_only_mapping() -> None:
    def details(facts: dict[str, Any]) -> Mapping[str, Any]:
        state = next_state(
            None, name="db", check=check(), finding=OK, observation=Observation(0.01, facts=facts),
            now=5.0,
        )  # fmt: skip
        return state.details

    shared = details({"http_status": 200, "body_bytes": 2})
    assert details({"http_status": 200, "body_bytes": 2}) is shared
    assert dict(shared) == {"http_status": 200, "body_bytes": 2, "failure_share": 0.0}
    with pytest.raises(TypeError):
        shared["http_status"] = 500  # type: ignore[index]
    # Values that compare equal but show differently are never shared.
    alike = [{"x": 1}, {"x": 1.0}, {"x": True}, {"x": 0.0}, {"x": -0.0}, {"x": "1"}]
    shown = [details(facts)["x"] for facts in alike]
    assert [(type(value), repr(value)) for value in shown] == [
        (type(facts["x"]), repr(facts["x"])) for facts in alike
    ]
    # Nor are details that hold more than plain values.
    assert details({"paths": ["/"]}) is not details({"paths": ["/"]})


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
    assert dict(state.details) == {"tls": True, "failure_share": 0.0}
    with pytest.raises(TypeError):
        state.details["tls"] = False  # type: ignore[index]


# --- flapping -------------------------------------------------------------------------------


def _flapping(failed: int, window: int, finding: Finding) -> tuple[Status, str, str]:
    return (U, "flapping", f"{failed} of the last {window} checks failed: {finding.reason}")


def test_alternating_failures_become_flapping_and_stay_so() -> None:
    states = replay([OK, FAIL] * 6)

    assert [(s.status, s.reason_code, s.reason) for s in states] == [
        *[_as_is(OK), _debounced(1, 3, FAIL)] * 4,
        _as_is(OK),
        _flapping(5, 10, FAIL),  # the 10th check: 5 of the last 10 failed
        _flapping(5, 10, FAIL),  # a success does not end it while the share holds
        _flapping(5, 10, FAIL),
    ]


@pytest.mark.parametrize("window", [2, 3, 4, 5, 10, 11, 50, 1000])
@pytest.mark.parametrize("first", [OK, FAIL], ids=["success-first", "failure-first"])
def test_alternating_failures_are_flapping_within_flap_window_checks(
    window: int, first: Finding
) -> None:
    other = FAIL if first is OK else OK
    findings = [first, other] * (window + 2)

    states = replay(findings, flap_window=window)

    first_failure = findings.index(FAIL)
    flapping = next(i for i, s in enumerate(states) if s.reason_code == "flapping")
    assert flapping - first_failure < window
    # Never healthy again. With an odd window the share of an alternation swings around one
    # half, so a success below it starts the normal recovery, and the next failure ends it.
    assert {s.reason_code for s in states[flapping:]} <= {"flapping", "recovering"}
    if window % 2 == 0:
        assert {s.reason_code for s in states[flapping:]} == {"flapping"}


def test_flapping_ends_by_the_recovery_rule_once_the_share_is_below_the_threshold() -> None:
    states = replay([OK, FAIL] * 5 + [OK] * 4, recovery_threshold=3)

    assert [(s.status, s.reason_code, s.reason) for s in states[9:]] == [
        _flapping(5, 10, FAIL),
        _flapping(5, 10, FAIL),  # the check that left the window was a success
        _recovering(2, 3, OK),  # 4 of 10: the successes in a row count, as ever
        _as_is(OK),
        _as_is(OK),
    ]


def test_a_target_that_was_down_and_came_back_is_recovering_not_flapping() -> None:
    findings = [OK] * 3 + [FAIL] * 12 + [OK] * 3

    with_window = replay(findings)
    without = replay(findings, flap_window=0)

    assert [(s.status, s.reason_code) for s in with_window] == [
        (s.status, s.reason_code) for s in without
    ]
    assert [s.reason_code for s in with_window[-3:]] == ["recovering", "ok", "ok"]
    assert [s.details["failure_share"] for s in with_window[-3:]] == [0.0, 0.0, 0.0]


def test_short_runs_of_failures_count_toward_the_window_and_a_long_one_leaves_it() -> None:
    # Runs of two never reach failure_threshold = 3, so each failure counts.
    states = replay([OK, FAIL, FAIL] * 3 + [OK])
    assert [s.reason_code for s in states].index("flapping") == 7  # 5 of 10 at the 8th check
    # The third failure in a row makes it an outage: the whole run leaves the window.
    outage = replay([OK, FAIL, FAIL, OK, FAIL, FAIL, FAIL])
    assert [s.details["failure_share"] for s in outage] == [0, 0.1, 0.2, 0.2, 0.3, 0.4, 0.2]
    assert (outage[-1].status, outage[-1].reason_code) == (U, "http_status")


def test_failures_while_recovering_from_an_outage_count_toward_the_window() -> None:
    # Down, then one success and one failure in turn: no verdict ever reaches healthy, and the
    # reason says why instead of repeating whichever failure came last.
    states = replay([FAIL] * 4 + [OK, FAIL] * 5)

    assert states[-1].status is U
    assert states[-1].reason == "5 of the last 10 checks failed: GET / returned 503"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "policy",
    [{}, {"flap_window": 20, "flap_threshold": 0.3}, {"flap_window": 100, "flap_threshold": 0.1}],
    ids=["defaults", "20-at-30-percent", "100-at-10-percent"],
)
def test_one_percent_of_isolated_failures_is_never_unhealthy(
    seed: int, policy: dict[str, Any]
) -> None:
    rng = random.Random(seed)
    findings: list[Finding] = []
    for _ in range(10_000):
        after_failure = bool(findings) and findings[-1] is FAIL
        findings.append(FAIL if not after_failure and rng.random() < 0.01 else OK)

    states = replay(findings, **policy)

    assert findings.count(FAIL) > 50  # the test means something
    assert [s for s in states if s.status is U] == []


def test_the_window_forgets_checks_older_than_flap_window() -> None:
    states = replay([FAIL, OK] + [OK] * 9, flap_window=10)

    assert [s.details["failure_share"] for s in states[-3:]] == [0.1, 0.1, 0.0]
    assert all(s.flap_history < 2**10 for s in states)


def test_flap_window_zero_turns_flapping_off() -> None:
    states = replay([OK, FAIL] * 20, flap_window=0)

    assert {s.status for s in states} == {H, D}
    assert all("failure_share" not in s.details for s in states)


def test_failure_threshold_of_one_makes_every_failure_an_outage_never_flapping() -> None:
    states = replay([OK, FAIL] * 10, failure_threshold=1)

    assert {s.reason_code for s in states} == {"ok", "http_status", "recovering"}


async def _checks_against(
    http_target: HttpTarget, ctx: ProbeContext, failing: Sequence[bool]
) -> list[ComponentState]:
    """One check per entry through the scheduler's own path, the target answering 500 where
    the entry is true and 200 elsewhere."""
    the_check = make_check("http", url=http_target.url("/health"), timeout=2)
    scheduler = Scheduler(StateStore())
    states = []
    for fails in failing:
        http_target.route("/health", Reply(status=500 if fails else 200))
        states.append(await scheduler.run_once("api", the_check, PROBES["http"], ctx))
    return states


@pytest.mark.asyncio
async def test_a_real_target_alternating_500_and_200_is_flapping_within_flap_window_checks(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    states = await _checks_against(http_target, ctx, [False, True] * 5)

    assert [s.status for s in states[:-1]] == [H, D] * 4 + [H]
    assert (states[-1].status, states[-1].reason_code) == (U, "flapping")
    assert states[-1].reason == "5 of the last 10 checks failed: GET /health returned 500"
    assert states[-1].details["failure_share"] == 0.5
    store = StateStore()
    store.record(states[-1], stale_after_seconds=60)
    text = exposition(store.snapshot(), "test").decode()
    assert 'healthd_component_reason_info{component="api",reason_code="flapping"} 1.0' in text


@pytest.mark.asyncio
async def test_a_real_target_failing_one_percent_of_checks_is_never_unhealthy(
    http_target: HttpTarget, ctx: ProbeContext
) -> None:
    # 600 checks keep it to a few seconds; the 10,000-check property is the table test above.
    rng = random.Random(0)
    failing: list[bool] = []
    for _ in range(600):
        failing.append(not (failing and failing[-1]) and rng.random() < 0.01)

    states = await _checks_against(http_target, ctx, failing)

    assert sum(failing) == 10  # 1.7%, isolated: the test means something
    assert {s.status for s in states} == {H, D}
    assert states[-1].checks_total["http_status"] == 10


# --- aggregation ----------------------------------------------------------------------------


def component(status: Status, *, critical: bool, name: str = "c") -> ComponentState:
    """A state with just enough filled in to aggregate."""
    return make_state(
        name, status, critical=critical, reason_code="x", reason="x", latency_seconds=0.0
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


# --- the whole: staleness, impact and the overall verdict ------------------------------------

LIMIT = 35.0


def member(
    name: str,
    status: Status = H,
    *,
    depends_on: tuple[str, ...] = (),
    critical: bool = False,
    checked_at: float = 1000.0,
) -> ComponentState:
    """A measured state as the store holds it."""
    return replace(
        component(status, critical=critical, name=name),
        reason=f"{name} said so",
        checked_at=checked_at,
        since=900.0,
        depends_on=depends_on,
    )


def world(*states: ComponentState, now: float = 1000.0, previous: World | None = None) -> World:
    """Judge ``states``, each with the same stale bound."""
    return judge_world({s.name: s for s in states}, {s.name: LIMIT for s in states}, now, previous)


def test_fresh_states_are_judged_as_the_very_objects_measured() -> None:
    api, db = member("api", D), member("db")

    judged = world(api, db)

    assert judged.components["api"] is api
    assert judged.components["db"] is db
    assert judged.overall is D


@pytest.mark.parametrize(
    ("age", "stale"),
    [(0.0, False), (LIMIT, False), (LIMIT + 0.001, True), (10 * LIMIT, True)],
    ids=["just-checked", "exactly-at-the-bound", "just-past-the-bound", "long-past"],
)
def test_a_component_is_stale_only_past_its_bound(age: float, stale: bool) -> None:
    api = member("api", critical=True)

    judged = world(api, now=1000.0 + age).components["api"]

    assert (judged.status, judged.reason_code) == ((U, "stale") if stale else (H, "x"))


@pytest.mark.parametrize(
    ("measured", "since"),
    [(H, 1000.0 + LIMIT), (D, 1000.0 + LIMIT), (U, 900.0)],
    ids=["healthy-since-the-bound", "degraded-since-the-bound", "unhealthy-keeps-its-since"],
)
def test_stale_state_names_its_bound_and_the_last_result(measured: Status, since: float) -> None:
    judged = world(member("api", measured), now=2000.0).components["api"]

    assert judged.status is U
    assert judged.reason == "no check completed for more than 35 s; last result: api said so"
    assert judged.since == since
    assert judged.checked_at == 1000.0  # the last real check, as measured


def test_a_stale_critical_component_makes_the_overall_verdict_unhealthy() -> None:
    judged = world(member("api", critical=True), member("db"), now=1000.0 + LIMIT + 1)

    assert judged.overall is U


def test_next_change_is_the_earliest_bound_among_fresh_components() -> None:
    states = (member("a", checked_at=1000.0), member("b", checked_at=990.0))

    assert world(*states, now=1000.0).next_change_at == 990.0 + LIMIT
    # b is stale already; a crosses next.
    assert world(*states, now=1030.0).next_change_at == 1000.0 + LIMIT
    assert world(*states, now=2000.0).next_change_at == math.inf
    assert world().next_change_at == math.inf


_CHAIN = {"api": ("supabase", "db"), "supabase": ("db",)}


@pytest.mark.parametrize(
    ("statuses", "dependencies", "expected"),
    [
        pytest.param(
            {"db": U, "supabase": U, "api": U},
            _CHAIN,
            {"api": ("db",), "supabase": ("db",)},
            id="database-down-takes-the-api-and-supabase-down",
        ),
        pytest.param(
            {"db": U, "supabase": H, "api": D},
            _CHAIN,
            {"api": ("db",)},
            id="healthy-dependent-is-not-impacted-degraded-one-is",
        ),
        pytest.param(
            {"db": D, "supabase": U, "api": U},
            _CHAIN,
            {"api": ("supabase",)},
            id="degraded-dependency-impacts-nobody",
        ),
        pytest.param(
            {"db": H, "supabase": H, "api": U},
            _CHAIN,
            {},
            id="lone-failure-is-its-own-root-cause",
        ),
        pytest.param(
            {"db": U, "redis": U, "api": U},
            {"api": ("redis", "db")},
            {"api": ("db", "redis")},
            id="two-root-causes-sorted",
        ),
        pytest.param(
            {"db": U, "kong": H, "api": U},
            {"api": ("kong",), "kong": ("db",)},
            {"api": ("db",)},
            id="transitively-through-a-healthy-middle",
        ),
    ],
)
def test_impact_names_the_root_causes_and_keeps_the_measured_status(
    statuses: dict[str, Status],
    dependencies: dict[str, tuple[str, ...]],
    expected: dict[str, tuple[str, ...]],
) -> None:
    states = [member(n, s, depends_on=dependencies.get(n, ())) for n, s in statuses.items()]

    judged = world(*states).components

    assert {n: s.impacted_by for n, s in judged.items() if s.impacted_by} == expected
    assert {n: s.status for n, s in judged.items()} == statuses


def test_a_stale_dependency_is_a_root_cause() -> None:
    db = member("db", checked_at=900.0)
    api = member("api", U, depends_on=("db",))

    judged = world(db, api, now=1000.0).components

    assert judged["db"].reason_code == "stale"
    assert judged["api"].impacted_by == ("db",)


@pytest.mark.parametrize(
    ("dependencies", "unhealthy", "expected"),
    [
        pytest.param({}, {"db"}, {}, id="no-dependencies"),
        pytest.param(
            {"api": ("supabase",), "supabase": ("db",)},
            {"api", "supabase", "db"},
            {"api": {"db"}, "supabase": {"db"}},
            id="chain-the-deepest-only",
        ),
        pytest.param(
            {"api": ("a", "b"), "a": ("db",), "b": ("db",)},
            {"api", "a", "b", "db"},
            {"api": {"db"}, "a": {"db"}, "b": {"db"}},
            id="diamond-names-the-shared-failure-once",
        ),
        pytest.param(
            {"api": ("a", "b"), "a": ("x",), "b": ("y",)},
            {"x", "y"},
            {"api": {"x", "y"}, "a": {"x"}, "b": {"y"}},
            id="diamond-with-two-failures",
        ),
        pytest.param(
            {"api": ("a", "b"), "a": ("b",)},
            {"a", "b"},
            {"api": {"b"}, "a": {"b"}},
            id="an-impacted-dependency-is-no-root-cause",
        ),
        pytest.param(
            {"api": ("a",), "a": ("b",)},
            {"a"},
            {"api": {"a"}},
            id="the-deepest-unhealthy-even-if-it-has-healthy-dependencies",
        ),
        pytest.param(
            {"api": ("gone",)},
            {"gone"},
            {"api": {"gone"}},
            id="a-dependency-without-dependencies-of-its-own",
        ),
        pytest.param({"api": ("db",)}, set(), {}, id="nothing-unhealthy"),
        pytest.param({"api": ("db",)}, {"api"}, {}, id="an-unhealthy-dependent-is-no-cause"),
    ],
)
def test_root_causes_are_the_deepest_unhealthy_components_of_the_closure(
    dependencies: dict[str, tuple[str, ...]], unhealthy: set[str], expected: dict[str, set[str]]
) -> None:
    assert root_causes(dependencies, unhealthy) == expected


def test_root_causes_survive_a_cycle_and_a_chain_deeper_than_the_recursion_limit() -> None:
    assert root_causes({"a": ("b",), "b": ("a",)}, {"a", "b"}) == {}
    assert root_causes({"a": ("b",), "b": ("a", "c")}, {"a", "c"}) == {"a": {"c"}, "b": {"c"}}

    chain = {f"c{i}": (f"c{i + 1}",) for i in range(5000)}
    assert root_causes(chain, {"c5000"})["c0"] == {"c5000"}


def test_judging_again_hands_out_the_same_objects_for_what_did_not_change() -> None:
    db = member("db", U, checked_at=900.0)  # stale at 1000
    api = member("api", D, depends_on=("db",))  # impacted
    cache = member("cache")
    first = world(db, api, cache, now=1000.0)

    again = world(db, api, cache, now=1001.0, previous=first)

    assert not again.changed
    assert all(again.components[n] is first.components[n] for n in ("db", "api", "cache"))
    assert again.components["api"].impacted_by == ("db",)
    # A new measured state changes that component's object only.
    fresh_cache = member("cache", checked_at=1001.0)
    third = world(db, api, fresh_cache, now=1001.0, previous=again)
    assert third.changed
    assert third.components["cache"] is fresh_cache
    assert third.components["api"] is first.components["api"]


def test_a_dependent_that_turns_unhealthy_is_impacted_by_failures_it_did_not_see_start() -> None:
    db = member("db", U)
    first = world(db, member("api", depends_on=("db",)))
    assert first.components["api"].impacted_by == ()

    second = world(db, member("api", D, depends_on=("db",)), previous=first)

    assert second.changed
    assert second.components["api"].impacted_by == ("db",)


def test_crossing_a_stale_bound_is_a_change_and_the_stale_variant_is_kept() -> None:
    api = member("api", critical=True)
    before = world(api, now=1000.0 + LIMIT)
    crossed = world(api, now=1000.0 + LIMIT + 0.5, previous=before)
    later = world(api, now=1000.0 + LIMIT + 60, previous=crossed)

    assert crossed.changed
    assert crossed.overall is U
    assert not later.changed
    assert later.components["api"] is crossed.components["api"]


class _CountingStates(dict[str, ComponentState]):
    """Measured states that count how many of them a judgement looks at."""

    looked_at = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.looked_at += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> ComponentState:
        self.looked_at += 1
        return super().__getitem__(key)

    def items(self) -> Any:
        self.looked_at += len(self)
        return super().items()


def test_a_judgement_of_one_change_among_ten_thousand_looks_at_that_change_only() -> None:
    states = {f"c{i:05d}": member(f"c{i:05d}", critical=i % 10 == 0) for i in range(10_000)}
    limits = dict.fromkeys(states, LIMIT)
    before = judge_world(states, limits, 1000.0)
    changed = _CountingStates(states)
    changed["c00042"] = member("c00042", U, checked_at=1001.0)

    after = judge_world(changed, limits, 1001.0, before, changed={"c00042"})

    assert changed.looked_at <= 5
    assert after.overall is D  # a non-critical failure
    assert after.components["c00042"] is changed["c00042"]
    assert after.components["c00041"] is before.components["c00041"]
    assert after.changed


def test_judging_only_the_changes_gives_what_judging_everything_gives() -> None:
    """Random worlds (dependency chains, critical components, maintenance, staleness), each
    judged after a few changes both ways: the same states, root causes and verdict."""
    rng = random.Random(7)
    names = [f"n{i:02d}" for i in range(30)]
    window = Window(("n03", "n07", "n11"), "upgrade", "config", 900.0, 5000.0)
    for _ in range(200):
        windows = (window,) if rng.random() < 0.3 else ()
        now = 1000.0
        states = {
            name: member(
                name,
                rng.choice((H, H, H, D, U)),
                critical=rng.random() < 0.3,
                depends_on=tuple(rng.sample(names[i + 1 :], min(2, len(names) - i - 1))),
            )
            for i, name in enumerate(names)
        }
        limits = dict.fromkeys(names, LIMIT)
        previous = judge_world(states, limits, now, None, windows)
        for _ in range(5):
            now += 1.0
            states = dict(states)
            changed = set(rng.sample(names, rng.randint(1, 4)))
            for name in changed:
                if rng.random() < 0.1:
                    states.pop(name, None)
                    continue
                old = states.get(name) or member(name)
                states[name] = replace(old, status=rng.choice((H, D, U)), checked_at=now)
            for name in changed - states.keys():
                limits.pop(name, None)
            limits.update(dict.fromkeys(states, LIMIT))
            fast = judge_world(states, limits, now, previous, windows, changed)
            full = judge_world(states, limits, now, previous, windows)
            assert dict(fast.components) == dict(full.components)
            assert (fast.overall, fast.changed) == (full.overall, full.changed)
            assert (fast.unhealthy, dict(fast.root_causes)) == (
                full.unhealthy,
                dict(full.root_causes),
            )
            assert fast.next_change_at <= full.next_change_at
            for name, state in full.components.items():
                if state is previous.components.get(name):
                    assert fast.components[name] is state
            previous = fast


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
        pytest.param(
            Finding(H, "ok", 'GET / returned {"up": 1}'),
            2.0,
            "1s",
            Finding(D, "slow", 'GET / returned {"up": 1}, but took 2 s (limit 1 s)'),
            id="braces-in-the-reason-are-text",
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
