"""The ``opik`` preset: Opik's backend (``:8080``) and, optionally, its UI (``:5173``).

Built from Opik's documented behaviour and its backend source (``IsAliveResource``, and
Dropwizard's health bundle); Opik itself cannot run here, so the tests serve these shapes:

- ``GET /is-alive/ping`` runs the backend's critical health checks (MySQL, ClickHouse, Redis):
  ``200 {"message": "Healthy Server", "healthy": true}``, or
  ``500 {"message": "Not Healthy", "healthy": false}``.
- ``GET /is-alive/ver`` answers ``{"version": "..."}``, which goes into ``details``.
- ``GET /health-check?name=all`` lists every sub-check, critical or not:
  ``[{"name": "mysql", "healthy": true, "critical": true, "type": "ready"}, ...]`` (503 when a
  critical one fails). Failing ones are named in the reason and in ``details["failing_checks"]``.
- With ``ui_url``: ``GET /`` on the UI, and the backend through the UI's proxy,
  ``GET /api/is-alive/ping``.

Verdicts: the backend unreachable or unhealthy is unhealthy; a failing non-critical sub-check,
or the UI or its proxy failing while the backend is fine, is degraded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from healthd.config import OpikCheck
from healthd.findings import OK, failed
from healthd.model import Finding, Observation, Status
from healthd.probes import _preset
from healthd.probes._context import ProbeContext
from healthd.quoting import quote, shorten
from healthd.secrets import Redactor


async def probe(check: OpikCheck, ctx: ProbeContext) -> Observation:
    """The backend's ping, version and sub-checks; the UI and its proxy when configured."""
    backend = check.url.reveal()
    calls = [
        _preset.Call("ping", _preset.join(backend, check.ping_path)),
        _preset.Call("version", _preset.join(backend, check.version_path)),
        _preset.Call("health_check", _preset.join(backend, check.health_check_path)),
    ]
    if check.ui_url is not None:
        ui = check.ui_url.reveal()
        calls.append(_preset.Call("ui", _preset.join(ui, check.ui_path)))
        calls.append(_preset.Call("ui_ping", _preset.join(ui, check.ui_ping_path)))
    observation = await _preset.send_all(check, ctx, calls)
    recorded = _preset.outcomes_of(observation)
    version_doc = recorded["version"].json() if recorded["version"].ok else None
    version = version_doc.get("version") if isinstance(version_doc, Mapping) else None
    redactor = _preset.redactor(check, ctx)
    shown = quote(str(version), redactor, 40) if isinstance(version, str | int | float) else None
    return _preset.with_facts(
        observation,
        version=shown,
        failing_checks=_failing_checks(recorded["health_check"].json(), redactor),
    )


def _failing_checks(document: Any, redactor: Redactor) -> list[str] | None:
    """Names of the sub-checks that report ``healthy: false``; ``None`` without a list."""
    if isinstance(document, Mapping):
        # Dropwizard's older admin format: {"mysql": {"healthy": false, ...}, ...}
        document = [{"name": name, **v} for name, v in document.items() if isinstance(v, Mapping)]
    if not isinstance(document, list):
        return None
    return sorted(
        quote(str(item.get("name", "?")), redactor, 60)
        for item in document
        if isinstance(item, Mapping) and item.get("healthy") is False
    )


def assess(check: OpikCheck, observation: Observation) -> Finding:
    """The backend decides unhealthy; its non-critical sub-checks and the UI decide degraded."""
    if observation.failure is not None:
        return failed(observation)
    recorded = _preset.outcomes_of(observation)
    ping = recorded["ping"]
    failing: list[str] = list(observation.facts.get("failing_checks") or [])
    names = shorten(", ".join(failing))  # each name is quoted already
    named = f" (failing: {names})" if failing else ""
    if ping.http_status == 500 or (ping.ok and _healthy(ping) is False):
        return Finding(
            Status.UNHEALTHY,
            "backend_unhealthy",
            f"{ping.what}: the backend reports unhealthy{named}",
        )
    if (down := _preset.problem(ping, Status.UNHEALTHY)) is not None:
        return replace(down, reason=f"backend: {down.reason}")
    if failing:
        return Finding(
            Status.DEGRADED,
            "subcheck_failed",
            f"backend is alive, but non-critical checks fail: {names}",
        )
    if check.ui_url is not None:
        ui_finding = _preset.first(
            _preset.problem(recorded["ui"], Status.DEGRADED, "ui_down"),
            _preset.problem(recorded["ui_ping"], Status.DEGRADED, "ui_proxy_failed"),
        )
        if ui_finding is None and _healthy(recorded["ui_ping"]) is False:
            ui_finding = Finding(
                Status.DEGRADED,
                "ui_proxy_failed",
                f"{recorded['ui_ping'].what} through the UI reports unhealthy",
            )
        if ui_finding is not None:
            return replace(
                ui_finding, reason=f"backend is healthy, but the UI fails: {ui_finding.reason}"
            )
    name = " ".join(("Opik", observation.facts.get("version", ""))).strip()
    parts = "backend and UI" if check.ui_url is not None else "backend"
    return Finding(Status.HEALTHY, OK, f"{name} {parts} healthy")


def _healthy(outcome: _preset.Outcome) -> bool | None:
    document = outcome.json()
    if isinstance(document, Mapping) and isinstance(document.get("healthy"), bool):
        healthy: bool = document["healthy"]
        return healthy
    return None
