"""The ``api`` preset: the platform's FastAPI service.

Two requests, concurrently: ``GET /health`` (liveness) and ``GET /api/v1/health``, whose
contract is ``{"status": "healthy", "version": "3.0.0", "database": "connected",
"agents_available": 11}``.

- unhealthy: either request fails or is not 2xx, the report is not JSON, or it says
  ``"status": "unhealthy"``;
- degraded: it says ``"status": "degraded"``, ``database`` is not ``connected``, or
  ``agents_available`` is below ``expected_agents``.

``details`` adds the report's ``version``, ``status``, ``database`` and ``agents_available``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthd.config import ApiCheck
from healthd.findings import OK
from healthd.model import Finding, Observation, Status
from healthd.probes import _preset
from healthd.probes._context import ProbeContext
from healthd.quoting import quote, quote_value
from healthd.secrets import Redactor, collect_secrets

#: Report fields copied into ``details`` when they are plain values.
_REPORTED = {"version": "version", "status": "reported_status", "database": "database"}


async def probe(check: ApiCheck, ctx: ProbeContext) -> Observation:
    """Ask for liveness and for the service's own health report."""
    base = check.url.reveal()
    observation = await _preset.send_all(
        check,
        ctx,
        [
            _preset.Call("liveness", _preset.join(base, check.liveness_path)),
            _preset.Call("health", _preset.join(base, check.health_path)),
        ],
    )
    report = _preset.outcomes_of(observation)["health"].json()
    facts: dict[str, Any] = {}
    if isinstance(report, Mapping):
        for field, key in _REPORTED.items():
            value = report.get(field)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                facts[key] = quote(str(value), _preset.redactor(check, ctx), 80)
        agents = report.get("agents_available")
        if isinstance(agents, int) and not isinstance(agents, bool):
            facts["agents_available"] = agents
    return _preset.with_facts(observation, **facts)


def assess(check: ApiCheck, observation: Observation) -> Finding:
    """Liveness and the report's transport first, then what the report says."""
    if (down := _preset.down(observation, "liveness", "health")) is not None:
        return down
    health = _preset.outcomes_of(observation)["health"]
    report = health.json()
    if not isinstance(report, Mapping):
        return Finding(
            Status.UNHEALTHY, "not_json", f"{health.what} did not return a JSON health report"
        )
    return _judge_report(check, health.what, report) or Finding(
        Status.HEALTHY,
        OK,
        f"{health.what} reports healthy, database connected, "
        f"{report.get('agents_available')} agents available",
    )


def _judge_report(check: ApiCheck, what: str, report: Mapping[str, Any]) -> Finding | None:
    status = report.get("status")
    if status == "unhealthy":
        return Finding(Status.UNHEALTHY, "reported_unhealthy", f"{what} reports unhealthy")
    findings: list[Finding] = []
    database = report.get("database")
    if database != "connected":
        findings.append(
            Finding(
                Status.DEGRADED,
                "database_disconnected",
                f"{what} reports database {_shown(database, check)}",
            )
        )
    agents = report.get("agents_available")
    if not isinstance(agents, int) or isinstance(agents, bool):
        findings.append(
            Finding(
                Status.DEGRADED,
                "unexpected_report",
                f"{what} reports no agents_available count",
            )
        )
    elif agents < check.expected_agents:
        findings.append(
            Finding(
                Status.DEGRADED,
                "agents_missing",
                f"{what} reports {agents} of {check.expected_agents} agents available",
            )
        )
    if status == "degraded":
        findings.append(Finding(Status.DEGRADED, "reported_degraded", f"{what} reports degraded"))
    elif status != "healthy":
        findings.append(
            Finding(
                Status.DEGRADED,
                "unexpected_report",
                f"{what} reports status {_shown(status, check)}, not healthy/degraded/unhealthy",
            )
        )
    if not findings:
        return None
    # Every problem in the reason; the code of the most specific one, which comes first.
    return Finding(Status.DEGRADED, findings[0].reason_code, "; ".join(f.reason for f in findings))


def _shown(value: Any, check: ApiCheck) -> str:
    """A report value as the reason shows it; the secrets are gathered only on this path."""
    if value is None:
        return "missing"
    return quote_value(value, Redactor(collect_secrets(check)), 40)
