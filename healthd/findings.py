"""The vocabulary of findings: what a kind's ``assess`` builds its verdict from.

Every kind's ``assess`` and ``classify`` import this module; neither imports the other, so a
probe never reaches into the judge's hysteresis and aggregation. Everything here is pure.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from healthd.config import Condition
from healthd.model import Finding, Observation, Status
from healthd.quoting import quote_value
from healthd.secrets import Redactor

#: The reason code of a healthy finding.
OK = "ok"

#: Failure codes that mean "too busy", not "down": the server answered, and will again.
BUSY_FAILURES = frozenset({"saturated"})


def failed(observation: Observation, status: Status = Status.UNHEALTHY) -> Finding:
    """The finding for an observation whose probe could not complete."""
    assert observation.failure is not None
    return Finding(status, observation.failure.code, observation.failure.message)


def failed_unless_busy(observation: Observation) -> Finding:
    """``failed``, but degraded when the server only said it is too busy (``BUSY_FAILURES``)."""
    assert observation.failure is not None
    busy = observation.failure.code in BUSY_FAILURES
    return failed(observation, Status.DEGRADED if busy else Status.UNHEALTHY)


def worst(findings: Iterable[Finding | None], default: Finding) -> Finding:
    """The most severe finding (``None`` is none); the first of equals wins, so order findings
    by importance."""
    chosen = default
    for finding in findings:
        if finding is not None and finding.status > chosen.status:
            chosen = finding
    return chosen


def format_seconds(seconds: float) -> str:
    """``1.4 s``, ``250 ms``, ``1200 s``: short and human."""
    # ``.3g`` turns 1000 and more into exponent notation: 999.9 ms is "1 s", 1200 s stays so.
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 0.9995:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms"


def above_limit(
    value: float | None,
    limit: float | None,
    reason_code: str,
    reason: str,
    shown: Callable[[float], str] = format_seconds,
    *,
    facts: Mapping[str, Any] | None = None,
) -> Finding | None:
    """Degraded ``reason_code`` when ``value`` is above ``limit``; ``None`` when it is not, or
    when either is ``None`` (not measured, or no limit set).

    ``reason`` is a template, filled in only for a finding: ``{value}`` and ``{limit}`` as
    ``shown`` writes them, and any of ``facts`` by name, as they are.
    """
    if value is None or limit is None or value <= limit:
        return None
    fields = dict(facts or {}, value=shown(value), limit=shown(limit))
    return Finding(Status.DEGRADED, reason_code, reason.format_map(fields))


def percent(share: float) -> str:
    """``0.93`` -> ``93%``."""
    return f"{share:.0%}"


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


def condition_failure(
    condition: Condition, body: bytes, document: Any, redactor: Redactor | None = None
) -> str | None:
    """Why ``condition`` fails on this body, or ``None`` when it holds.

    ``document`` is the parsed JSON body, or ``_MISSING`` when the body is not JSON. A value
    the reason shows goes through ``quote`` with ``redactor``: the target may echo a secret.
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
        return None if _same(value, condition.equals) else f"got {quote_value(value, redactor)}"
    # NaN (which Python's JSON parser accepts) compares false with every bound: reject it.
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return f"got {quote_value(value, redactor)}, not a number"
    if condition.min is not None and value < condition.min:
        return f"got {value:g}"
    if condition.max is not None and value > condition.max:
        return f"got {value:g}"
    return None


def judge_conditions(
    conditions: Sequence[Condition],
    body: bytes,
    context: str,
    *,
    redactor: Callable[[], Redactor] | None = None,
) -> Finding | None:
    """The worst failing condition as a finding, or ``None`` when all hold.

    ``context`` starts the reason, for example ``"GET /api/v1/health"``. ``redactor`` makes
    the check's redactor; it is called only when a condition fails (collecting a check's
    secrets costs more than judging it).
    """
    if not conditions:
        return None
    document: Any = _MISSING
    if any(c.json_path is not None for c in conditions):
        parsed, error = parse_json(body)
        if error is None:
            document = parsed
    failures = []
    scrubber: Redactor | None = None
    for condition in conditions:
        why = condition_failure(condition, body, document)
        if why is not None and redactor is not None:
            # Judged again with the secrets, which are gathered only now that it failed.
            scrubber = scrubber or redactor()
            why = condition_failure(condition, body, document, scrubber)
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
