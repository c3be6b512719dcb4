"""The ``supabase`` preset: Supabase's services through its Kong gateway (``:54321``).

Built from Supabase's documented gateway routes (Kong's ``kong.yml`` in the self-hosted and
CLI stacks); the stack cannot run here, so the tests serve these shapes:

- ``GET /auth/v1/health``: GoTrue answers ``{"version": ..., "name": "GoTrue", ...}``; Kong
  answers 502/503 when GoTrue is down behind it, and 401 when the key is wrong.
- ``GET /rest/v1/``: PostgREST's root (its OpenAPI description).
- Optionally ``GET /storage/v1/status`` (``storage = true``) and a one-row read of a configured
  table, ``GET /rest/v1/<table>?select=<select>&limit=1``.

Every request carries the ``apikey`` header; a legacy JWT key also goes as
``Authorization: Bearer`` (the new ``sb_publishable_``/``sb_secret_`` keys must not).

Verdicts: the gateway unreachable, or auth and rest both failing, is unhealthy; one of them
failing, storage or the table read failing, or a 401 (the key was rotated), is degraded. The
database itself is the ``postgres`` kind's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from healthd.config import SupabaseCheck
from healthd.findings import OK, failed
from healthd.model import Finding, Observation, Status
from healthd.probes import _preset
from healthd.probes._context import ProbeContext
from healthd.quoting import quote

#: The parts every check has, then the optional ones; each part's code when it fails.
_DOWN_CODES = {
    "auth": "auth_down",
    "rest": "rest_down",
    "storage": "storage_down",
    "table": "table_read_failed",
}
_LABELS = {"auth": "auth (GoTrue)", "rest": "rest (PostgREST)", "storage": "storage"}


def is_legacy_key(key: str) -> bool:
    """A legacy anon/service_role key is a JWT: three dot-separated base64url parts."""
    return key.startswith("eyJ") and key.count(".") == 2


async def probe(check: SupabaseCheck, ctx: ProbeContext) -> Observation:
    """Every configured part through the gateway, with the key in the headers."""
    base = check.url.reveal()
    key = check.api_key.reveal()
    headers = {"apikey": key}
    legacy = check.legacy_key if check.legacy_key is not None else is_legacy_key(key)
    if legacy:
        headers["Authorization"] = f"Bearer {key}"
    calls = [
        _preset.Call("auth", _preset.join(base, check.auth_path)),
        _preset.Call("rest", _preset.join(base, check.rest_path)),
    ]
    if check.storage:
        calls.append(_preset.Call("storage", _preset.join(base, check.storage_path)))
    if check.table is not None:
        query = f"/rest/v1/{check.table}?select={check.select}&limit=1"
        calls.append(_preset.Call("table", _preset.join(base, query)))
    observation = await _preset.send_all(check, ctx, calls, headers=headers)
    auth = _preset.outcomes_of(observation)["auth"]
    document = auth.json() if auth.ok else None
    version = document.get("version") if isinstance(document, Mapping) else None
    shown = quote(version, _preset.redactor(check, ctx), 40) if isinstance(version, str) else None
    return _preset.with_facts(observation, auth_version=shown)


def assess(check: SupabaseCheck, observation: Observation) -> Finding:
    """Unreachable or both core services down: unhealthy; anything less: degraded."""
    if observation.failure is not None:
        return failed(observation)
    recorded = _preset.outcomes_of(observation)
    if not any(outcome.answered for outcome in recorded.values()):
        first = recorded["auth"].observation
        assert first.failure is not None
        return Finding(
            Status.UNHEALTHY, first.failure.code, f"gateway unreachable: {first.failure.message}"
        )
    rejected = [name for name, outcome in recorded.items() if outcome.http_status == 401]
    down = {
        name: finding
        for name, outcome in recorded.items()
        if name not in rejected
        and (finding := _preset.problem(outcome, Status.DEGRADED, _DOWN_CODES[name])) is not None
    }
    if "auth" in down and "rest" in down:
        return Finding(
            Status.UNHEALTHY,
            "services_down",
            f"auth and rest both fail: {down['auth'].reason}; {down['rest'].reason}",
        )
    if rejected:
        return Finding(
            Status.DEGRADED,
            "auth_failed",
            f"the gateway rejects the API key (401 on {', '.join(rejected)}): was it rotated?",
        )
    if down:
        name, finding = next(iter(down.items()))
        label = _LABELS.get(name, f"table {check.table}")
        return replace(finding, reason=f"{label}: {finding.reason}")
    version = observation.facts.get("auth_version")
    return Finding(
        Status.HEALTHY,
        OK,
        f"gateway answers: {', '.join(recorded)} OK" + (f" (GoTrue {version})" if version else ""),
    )
