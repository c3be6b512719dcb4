"""What the service presets (``api``, ``mlflow``, ``bentoml``, ``opik``, ``supabase``) share.

A preset is the ``http`` probe, several times over: it sends a few documented requests
concurrently through ONE long-lived client per check (``http.check_client``; every request in
flight has its own connection), measures each with ``http.request``, and leaves the judging to
its pure ``assess``.

Every preset exports the same ``details`` shape, so the status file shows which part failed::

    {
      "requests": {
        "health": {"http_status": 200, "latency_ms": 1.2},
        "search": {"error": "connection_refused", "latency_ms": 0.4}
      },
      "version": "3.17.2"            # plus the preset's own facts, flat
    }

``requests`` has one entry per request, keyed by the request's name, in the order sent. An
answered request has ``http_status``; an unanswered one has ``error``, the same reason code the
``http`` probe would give (``timeout``, ``connection_refused``, ...). Neither ever holds a
secret: URLs, queries and headers stay out of facts and reasons.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from healthd.config import ServiceCheckBase
from healthd.findings import failed, parse_json
from healthd.model import Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes.http import check_client, request, status_finding, target
from healthd.quoting import quote
from healthd.secrets import Redactor, collect_secrets

#: 2xx: what every documented endpoint of the presets answers when it is fine.
SUCCESS_STATUS: tuple[tuple[int, int], ...] = ((200, 299),)


@dataclass(frozen=True, slots=True)
class Call:
    """One request of a preset. ``name`` keys its outcome in ``details["requests"]``."""

    name: str
    url: str
    method: str = "GET"
    json: Any = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one call got: ``what`` names it in reasons (``GET /health``, no host or query)."""

    what: str
    observation: Observation

    @property
    def answered(self) -> bool:
        """The target sent a complete response, whatever its status."""
        return self.observation.failure is None

    @property
    def http_status(self) -> int | None:
        """The response status, ``None`` when there was no response."""
        status: int | None = self.observation.facts.get("http_status")
        return status

    @property
    def ok(self) -> bool:
        """Answered with a 2xx status."""
        status = self.http_status
        return status is not None and 200 <= status <= 299

    @property
    def body(self) -> bytes:
        """The (capped) response body; empty when there was no response."""
        body: bytes = self.observation.payload or b""
        return body

    def json(self) -> Any:
        """The parsed JSON body, or ``None`` when there is no JSON body."""
        if not self.answered:
            return None
        document, error = parse_json(self.body)
        return None if error is not None else document

    def text(self, redactor: Redactor | None = None, limit: int = 80) -> str:
        """The body as short text for facts such as a version string: redacted whole, then
        escaped and cut (``quote``), since a target may echo what it was sent."""
        return quote(self.body.strip(), redactor, limit)


def join(base: str, path: str) -> str:
    """``base`` (scheme, host, optional prefix) followed by an absolute ``path``."""
    return base.rstrip("/") + path


def basic_auth(username: str, password: str) -> str:
    """The value of an ``Authorization`` header for HTTP basic authentication."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


async def send_all(
    check: ServiceCheckBase,
    ctx: ProbeContext,
    calls: Sequence[Call],
    *,
    headers: Mapping[str, str] | None = None,
) -> Observation:
    """Send every call concurrently with the check's long-lived client and observe them all.

    ``headers`` go with every request, after the check's own ``headers``. The observation's
    ``latency_seconds`` is the wall time of all the calls together (what ``degraded_latency``
    judges), its ``facts`` are ``{"requests": ...}`` and its ``payload`` every call's
    ``Outcome`` by name (``outcomes_of``). Request failures are data; only bugs raise.
    """
    client = check_client(ctx, check, extra_headers=headers)
    results: dict[str, Outcome] = {}

    async def send(call: Call) -> None:
        observation = await request(
            client,
            call.method,
            call.url,
            headers=dict(call.headers) if call.headers else None,
            json=call.json,
            max_body_bytes=check.max_body_bytes,
            timeout_seconds=check.timeout_seconds,
        )
        results[call.name] = Outcome(target(call.method, call.url), observation)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for call in calls:
            group.start_soon(send, call)
    latency = time.perf_counter() - started
    ordered = {call.name: results[call.name] for call in calls}
    facts = {"requests": {name: _request_facts(outcome) for name, outcome in ordered.items()}}
    return Observation(latency, facts=facts, payload=ordered)


def redactor(check: ServiceCheckBase, ctx: ProbeContext) -> Redactor:
    """The check's own redactor, for target text that goes into facts; built once per check,
    since collecting a check's secrets costs about 200 us."""
    return ctx.get("redactor", lambda: Redactor(collect_secrets(check)))


def _request_facts(outcome: Outcome) -> dict[str, Any]:
    observation = outcome.observation
    facts: dict[str, Any] = {}
    if observation.failure is not None:
        facts["error"] = observation.failure.code
    else:
        facts["http_status"] = observation.facts["http_status"]
        if observation.facts.get("body_truncated"):
            facts["body_truncated"] = True
    facts["latency_ms"] = round(observation.latency_seconds * 1000, 1)
    return facts


def with_facts(observation: Observation, **facts: Any) -> Observation:
    """The observation with the preset's own facts added; ``None`` values are left out."""
    merged = dict(observation.facts)
    merged.update({key: value for key, value in facts.items() if value is not None})
    return dataclasses.replace(observation, facts=merged)


def outcomes_of(observation: Observation) -> Mapping[str, Outcome]:
    """What each call of a preset's probe got, by the call's name, in the order sent."""
    recorded: Mapping[str, Outcome] = observation.payload
    return recorded


def down(observation: Observation, *names: str) -> Finding | None:
    """Unhealthy when the probe could not complete, or when one of the calls ``names`` (the
    liveness requests) got no answer or a non-2xx one; ``None`` when all of them are live."""
    if observation.failure is not None:
        return failed(observation)
    recorded = outcomes_of(observation)
    return first(*(problem(recorded[name], Status.UNHEALTHY) for name in names))


def problem(outcome: Outcome, status: Status, code: str | None = None) -> Finding | None:
    """A finding of ``status`` when the request got no answer or a non-2xx one, else ``None``.

    The reason code is the transport's (``timeout``, ``connection_refused``) or ``http_status``,
    unless ``code`` names the failing part (``not_ready``, ``search_failed``).
    """
    if outcome.observation.failure is not None:
        failure = outcome.observation.failure
        return Finding(status, code or failure.code, failure.message)
    finding = status_finding(outcome.what, outcome.observation, SUCCESS_STATUS)
    if finding is None:
        return None
    return Finding(status, code or finding.reason_code, finding.reason)


def auth_problem(outcome: Outcome, what_failed: str) -> Finding | None:
    """Degraded ``auth_failed`` for a 401 or 403: the credentials are wrong, which is a config
    problem for an operator, not an outage for users."""
    if outcome.http_status in (401, 403):
        return Finding(
            Status.DEGRADED,
            "auth_failed",
            f"{outcome.what} returned {outcome.http_status}: {what_failed}",
        )
    return None


def slow(outcome: Outcome, limit_seconds: float | None) -> Finding | None:
    """Degraded ``slow`` when an answered request took longer than ``limit_seconds``."""
    latency = outcome.observation.latency_seconds
    if limit_seconds is None or not outcome.answered or latency <= limit_seconds:
        return None
    return Finding(
        Status.DEGRADED,
        "slow",
        f"{outcome.what} took {latency * 1000:.0f} ms (limit {limit_seconds * 1000:.0f} ms)",
    )


def first(*findings: Finding | None) -> Finding | None:
    """The first finding that is not ``None``: findings in order of importance."""
    return next((f for f in findings if f is not None), None)
