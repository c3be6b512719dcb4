"""Pure judgement: observations -> findings -> component states -> the overall verdict.

Nothing here does I/O or reads a clock; callers pass ``now``. Every function is table-tested.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from healthd.config import CheckBase, Condition
from healthd.model import (
    DURATION_BUCKETS_SECONDS,
    ComponentState,
    Finding,
    Histogram,
    Observation,
    Status,
)

OK = "ok"
RECOVERING = "recovering"
#: ``checks_total{result=...}`` for a check whose finding was healthy or degraded.
SUCCESS = "success"


def failed(observation: Observation, status: Status = Status.UNHEALTHY) -> Finding:
    """The finding for an observation whose probe could not complete."""
    assert observation.failure is not None
    return Finding(status, observation.failure.code, observation.failure.message)


def worst(findings: Iterable[Finding], default: Finding) -> Finding:
    """The most severe finding; the first of equals wins, so order findings by importance."""
    chosen = default
    for finding in findings:
        if finding.status > chosen.status:
            chosen = finding
    return chosen


def judge(
    check: CheckBase, observation: Observation, assess: Callable[[Any, Observation], Finding]
) -> Finding:
    """The kind's own assessment, then the latency limit every kind shares."""
    return check_latency(check, observation, assess(check, observation))


def check_latency(check: CheckBase, observation: Observation, finding: Finding) -> Finding:
    """Turn a healthy finding degraded when the check took longer than ``degraded_latency``."""
    limit = check.degraded_latency
    if finding.status is not Status.HEALTHY or limit is None:
        return finding
    if observation.latency_seconds <= limit:
        return finding
    return Finding(
        Status.DEGRADED,
        "slow",
        f"{finding.reason}, but took {format_seconds(observation.latency_seconds)} "
        f"(limit {format_seconds(limit)})",
    )


def format_seconds(seconds: float) -> str:
    """``1.4 s``, ``250 ms``, ``1200 s``: short and human."""
    # ``.3g`` turns 1000 and more into exponent notation: 999.9 ms is "1 s", 1200 s stays so.
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 0.9995:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms"


# --- body conditions ------------------------------------------------------------------------


_MISSING = object()


def json_lookup(document: Any, path: str) -> Any:
    """Follow a dotted path (``a.b.0.c``) into parsed JSON; ``_MISSING`` where it leads nowhere."""
    node = document
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif (
            isinstance(node, list)
            and part.lstrip("-").isdigit()
            and -len(node) <= int(part) < len(node)
        ):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def parse_json(body: bytes) -> tuple[Any, str | None]:
    """The parsed body, or ``(None, why it is not JSON)``."""
    try:
        return json.loads(body), None
    # A target can nest arrays deeper than the parser's recursion limit: garbage, not a crash.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"body is not JSON ({type(exc).__name__})"


def condition_failure(condition: Condition, body: bytes, document: Any) -> str | None:
    """Why ``condition`` fails on this body, or ``None`` when it holds.

    ``document`` is the parsed JSON body, or ``_MISSING`` when the body is not JSON.
    """
    if condition.regex is not None:
        text = body.decode("utf-8", errors="replace")
        return None if re.search(condition.regex, text) else "no match"
    assert condition.json_path is not None
    if document is _MISSING:
        return "body is not JSON"
    value = json_lookup(document, condition.json_path)
    if condition.present is not None:
        if (value is not _MISSING) == condition.present:
            return None
        return "absent" if condition.present else "present"
    if value is _MISSING:
        return "absent"
    if condition.equals is not None:
        return None if _same(value, condition.equals) else f"got {_short(value)}"
    # NaN (which Python's JSON parser accepts) compares false with every bound: reject it.
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return f"got {_short(value)}, not a number"
    if condition.min is not None and value < condition.min:
        return f"got {value:g}"
    if condition.max is not None and value > condition.max:
        return f"got {value:g}"
    return None


def judge_conditions(conditions: Sequence[Condition], body: bytes, context: str) -> Finding | None:
    """The worst failing condition as a finding, or ``None`` when all hold.

    ``context`` starts the reason, for example ``"GET /api/v1/health"``.
    """
    if not conditions:
        return None
    document: Any = _MISSING
    if any(c.json_path is not None for c in conditions):
        parsed, error = parse_json(body)
        if error is None:
            document = parsed
    failures = []
    for condition in conditions:
        why = condition_failure(condition, body, document)
        if why is not None:
            status = Status.DEGRADED if condition.severity == "degraded" else Status.UNHEALTHY
            failures.append((status, f"{condition.label} ({why})"))
    if not failures:
        return None
    status = max(s for s, _ in failures)
    described = "; ".join(text for s, text in failures if s == status)
    return Finding(status, "condition_failed", f"{context}: condition failed: {described}")


def _same(value: Any, expected: Any) -> bool:
    """JSON equality without Python's ``True == 1``: ``true`` matches only ``true``."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    return bool(value == expected)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- hysteresis ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """How many results it takes to change a verdict."""

    failure_threshold: int = 3
    recovery_threshold: int = 2

    @classmethod
    def of(cls, check: CheckBase) -> Policy:
        """The policy a check's config asks for."""
        return cls(check.failure_threshold, check.recovery_threshold)


def next_state(
    previous: ComponentState | None,
    *,
    name: str,
    check: CheckBase,
    finding: Finding,
    observation: Observation,
    now: float,
) -> ComponentState:
    """Apply one finding to a component's history.

    - An unhealthy finding is a failure. Without history it counts at once; after a healthy
      or degraded state, fewer than ``failure_threshold`` failures in a row are degraded.
    - A healthy or degraded finding is a success. Leaving unhealthy takes
      ``recovery_threshold`` successes in a row; until then the component is degraded.
    """
    policy = Policy.of(check)
    failing = finding.status is Status.UNHEALTHY
    failures = (previous.consecutive_failures + 1 if previous else 1) if failing else 0
    successes = 0 if failing else (previous.consecutive_successes + 1 if previous else 1)

    status, reason_code, reason = finding.status, finding.reason_code, finding.reason
    # A component still recovering has not left unhealthy: one failure sends it straight back.
    was_unhealthy = previous is not None and (
        previous.status is Status.UNHEALTHY or previous.reason_code == RECOVERING
    )
    if previous is None:
        pass  # no history to debounce against: the first result is taken as it is
    elif failing and not was_unhealthy and failures < policy.failure_threshold:
        status = Status.DEGRADED
        reason = f"{reason} ({failures} of {policy.failure_threshold} failures)"
    elif not failing and was_unhealthy and successes < policy.recovery_threshold:
        status = Status.DEGRADED
        reason_code = RECOVERING
        reason = f"recovering {successes} of {policy.recovery_threshold}: {reason}"

    result = SUCCESS if not failing else finding.reason_code
    checks_total = dict(previous.checks_total) if previous else {}
    checks_total[result] = checks_total.get(result, 0) + 1
    latency = observation.latency_seconds
    durations = previous.durations if previous else Histogram.empty(DURATION_BUCKETS_SECONDS)
    changed = previous is None or previous.status is not status
    return ComponentState(
        name=name,
        kind=check.kind,
        critical=check.critical,
        status=status,
        reason_code=reason_code,
        reason=reason,
        latency_seconds=latency,
        checked_at=now,
        since=now if changed or previous is None else previous.since,
        last_success_at=now if not failing else (previous.last_success_at if previous else None),
        consecutive_failures=failures,
        consecutive_successes=successes,
        details=MappingProxyType(dict(observation.facts)),
        checks_total=MappingProxyType(checks_total),
        durations=durations.observe(latency),
        depends_on=check.depends_on,
    )


def unchecked_state(name: str, check: CheckBase, now: float) -> ComponentState:
    """A placeholder for a component whose first check has not completed: not fine, and
    saying why. It carries no history, so the first real result is taken as it is."""
    return ComponentState(
        name=name,
        kind=check.kind,
        critical=check.critical,
        status=Status.UNHEALTHY,
        reason_code="not_checked",
        reason="the first check has not completed yet",
        latency_seconds=0.0,
        checked_at=now,
        since=now,
        last_success_at=None,
        consecutive_failures=0,
        consecutive_successes=0,
        depends_on=check.depends_on,
    )


# --- aggregation ---------------------------------------------------------------------------


def overall(states: Iterable[ComponentState]) -> Status:
    """Unhealthy if a critical component is; degraded if any is degraded, or a non-critical one
    is unhealthy; healthy otherwise (including when there are no components)."""
    verdict = Status.HEALTHY
    for state in states:
        if state.status is Status.UNHEALTHY and state.critical:
            return Status.UNHEALTHY
        if state.status is not Status.HEALTHY:
            verdict = Status.DEGRADED
    return verdict


def unhealthy_dependencies(
    state: ComponentState, states: Mapping[str, ComponentState]
) -> tuple[str, ...]:
    """The component's direct dependencies that are unhealthy: a hint at the root cause."""
    return tuple(
        name
        for name in state.depends_on
        if (dep := states.get(name)) is not None and dep.status is Status.UNHEALTHY
    )
