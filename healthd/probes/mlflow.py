"""The ``mlflow`` preset: an MLflow tracking server.

Three requests, concurrently, as MLflow's own server code defines them
(``mlflow/server/__init__.py``, ``mlflow/server/handlers.py``):

- ``GET /health`` answers ``200 OK`` without touching the backend store: liveness only.
- ``GET /version`` answers the version as plain text; it goes into ``details["version"]``.
- ``POST /api/2.0/mlflow/experiments/search`` with ``{"max_results": 1}`` reads the backend
  store, so it proves that MLflow can actually serve its users.

Verdicts: liveness failing is unhealthy. A failing or slow search (past
``degraded_search_latency``) is degraded: MLflow is up but its store is not. A 401/403 on the
search is degraded ``auth_failed`` (wrong credentials, a config problem); a 403 from MLflow 3's
Host-header check is degraded ``host_rejected`` (set ``host`` to a name in its
``--allowed-hosts``). ``/health`` and ``/version`` are exempt from both checks in MLflow itself.
"""

from __future__ import annotations

from dataclasses import replace

from healthd.config import MlflowCheck
from healthd.findings import OK
from healthd.model import Finding, Observation, Status
from healthd.probes import _preset
from healthd.probes._context import ProbeContext

#: What MLflow 3's Host-header check answers (``mlflow/server/security_utils.py``).
_INVALID_HOST = b"Invalid Host header"


async def probe(check: MlflowCheck, ctx: ProbeContext) -> Observation:
    """Liveness, version and one experiment search, with basic auth and ``Host`` if set."""
    base = check.url.reveal()
    headers: dict[str, str] = {}
    if check.username is not None and check.password is not None:
        headers["Authorization"] = _preset.basic_auth(
            check.username.reveal(), check.password.reveal()
        )
    if check.host is not None:
        headers["Host"] = check.host
    observation = await _preset.send_all(
        check,
        ctx,
        [
            _preset.Call("health", _preset.join(base, check.health_path)),
            _preset.Call("version", _preset.join(base, check.version_path)),
            _preset.Call(
                "search",
                _preset.join(base, check.search_path),
                method="POST",
                json={"max_results": 1},
            ),
        ],
        headers=headers,
    )
    version = _preset.outcomes_of(observation)["version"]
    text = version.text(_preset.redactor(check, ctx), 40) if version.ok else None
    return _preset.with_facts(observation, version=text)


def assess(check: MlflowCheck, observation: Observation) -> Finding:
    """Liveness decides unhealthy; the search decides degraded."""
    if (down := _preset.down(observation, "health")) is not None:
        return down
    search = _preset.outcomes_of(observation)["search"]
    if search.http_status == 403 and search.body.startswith(_INVALID_HOST):
        return Finding(
            Status.DEGRADED,
            "host_rejected",
            f"{search.what} returned 403: MLflow rejects the Host header; set 'host' to a name "
            "in its --allowed-hosts",
        )
    finding = _preset.first(
        _preset.auth_problem(search, "MLflow rejected the credentials"),
        _preset.problem(search, Status.DEGRADED, "search_failed"),
        _preset.slow(search, check.degraded_search_latency),
    )
    if finding is not None:
        if finding.reason_code == "search_failed":
            return replace(finding, reason=f"backend store: {finding.reason}")
        return finding
    version = observation.facts.get("version")
    return Finding(
        Status.HEALTHY,
        OK,
        f"MLflow {version or '(version unknown)'} is live and its backend store answers searches",
    )
