"""The ``bentoml`` preset: a BentoML (1.2+) service.

Requests, concurrently, as BentoML's server defines them (``_bentoml_impl/server/app.py``):

- ``GET /livez``: the server process answers. Failing (503, or unreachable) is unhealthy.
- ``GET /readyz``: the service's ``__is_ready__()`` and its dependencies (runners, remote
  services) are ready. 503 while ``/livez`` is 200 is degraded ``not_ready``: still loading, or
  something it needs is down.
- ``GET /metrics`` (when ``metrics`` is on): the ``*_request_total`` counters. Between two
  probes, the share of 5xx responses becomes ``details["error_rate"]``; above
  ``degraded_error_rate`` (with at least ``min_requests`` requests) it is degraded
  ``error_rate``. BentoML counts its probe endpoints too (a ``/readyz`` 503 is a 5xx), so
  requests to ``/livez``, ``/readyz``, ``/healthz`` and ``/metrics`` are left out: the rate is
  about the service's own APIs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from healthd.config import BentomlCheck
from healthd.findings import OK
from healthd.model import Finding, Observation, Status
from healthd.probes import _preset
from healthd.probes._context import ProbeContext


@dataclass(slots=True)
class _Counts:
    """The request counters at the previous probe: the start of the next window."""

    requests: float | None = None
    errors: float | None = None


async def probe(check: BentomlCheck, ctx: ProbeContext) -> Observation:
    """Liveness and readiness, and the request counters when ``metrics`` is on."""
    base = check.url.reveal()
    calls = [
        _preset.Call("livez", _preset.join(base, check.livez_path)),
        _preset.Call("readyz", _preset.join(base, check.readyz_path)),
    ]
    if check.metrics:
        calls.append(_preset.Call("metrics", _preset.join(base, check.metrics_path)))
    observation = await _preset.send_all(check, ctx, calls)
    if not check.metrics:
        return observation
    metrics = _preset.outcomes_of(observation)["metrics"]
    probes = {check.livez_path, check.readyz_path, check.metrics_path, "/healthz"}
    counts = _request_counts(metrics.body, probes) if metrics.ok else None
    if counts is None:
        return observation
    previous = ctx.get("counts", _Counts)
    facts = _window(previous, *counts)
    previous.requests, previous.errors = counts
    return _preset.with_facts(observation, **facts)


def _request_counts(text: bytes, excluded: set[str]) -> tuple[float, float] | None:
    """All API requests and 5xx responses so far, from the ``*_request_total`` counters,
    leaving out the ``excluded`` endpoints."""
    requests = errors = 0.0
    found = False
    try:
        for family in text_string_to_metric_families(text.decode("utf-8", errors="replace")):
            if not family.name.endswith("_request") or "runner" in family.name:
                continue
            for sample in family.samples:
                code = sample.labels.get("http_response_code")
                if not sample.name.endswith("_total") or code is None:
                    continue
                found = True
                if sample.labels.get("endpoint") in excluded:
                    continue
                requests += sample.value
                if code.startswith("5"):
                    errors += sample.value
    except ValueError:
        return None  # not the exposition format: no counts, and no verdict from them
    return (requests, errors) if found else None


def _window(previous: _Counts, requests: float, errors: float) -> dict[str, Any]:
    """Requests and errors since the previous probe (since start, the first time or after a
    restart reset the counters)."""
    if (
        previous.requests is None
        or previous.errors is None
        or requests < previous.requests
        or errors < previous.errors
    ):
        window_requests, window_errors = requests, errors
    else:
        window_requests, window_errors = requests - previous.requests, errors - previous.errors
    facts: dict[str, Any] = {
        "window_requests": int(window_requests),
        "window_errors": int(window_errors),
    }
    if window_requests > 0:
        facts["error_rate"] = round(window_errors / window_requests, 4)
    return facts


def assess(check: BentomlCheck, observation: Observation) -> Finding:
    """Liveness decides unhealthy; readiness and the error rate decide degraded."""
    if (down := _preset.down(observation, "livez")) is not None:
        return down
    recorded = _preset.outcomes_of(observation)
    livez, readyz = recorded["livez"], recorded["readyz"]
    if (not_ready := _preset.problem(readyz, Status.DEGRADED, "not_ready")) is not None:
        reason = (
            f"live but not ready: {not_ready.reason} (loading, or a runner or dependency is down)"
        )
        return replace(not_ready, reason=reason)
    rate = observation.facts.get("error_rate")
    window = observation.facts.get("window_requests", 0)
    if rate is not None and window >= check.min_requests and rate > check.degraded_error_rate:
        return Finding(
            Status.DEGRADED,
            "error_rate",
            f"{rate:.1%} of {window} requests failed with 5xx since the last check "
            f"(limit {check.degraded_error_rate:.1%})",
        )
    return Finding(Status.HEALTHY, OK, f"{livez.what} and {readyz.what} returned 200")
