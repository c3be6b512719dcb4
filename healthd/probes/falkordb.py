"""The ``falkordb`` probe: everything the ``redis`` probe checks, plus a working graph module.

On the same connection, after ``PING`` and ``INFO``: the ``graph`` module must be loaded, and
``GRAPH.RO_QUERY`` of the configured query on a dedicated probe graph must answer. The probe
graph is created with an idempotent ``MERGE``, and only on a master: a replica or read-only
server is never written to. ``GRAPH.INFO``'s waiting queries are recorded, with the count
from the previous probe, so that ``assess`` can tell a growing queue from a draining one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from healthd.config import FalkorDbCheck
from healthd.findings import OK, format_seconds, worst
from healthd.model import Finding, Observation, Status
from healthd.probes._context import ProbeContext
from healthd.probes.redis import (
    assess_server,
    command,
    healthy_reason,
    measure_server,
    secrets_of,
)
from healthd.quoting import quote
from healthd.secrets import Redactor

#: The name FalkorDB registers its module under, in ``INFO modules`` and ``MODULE LIST``.
GRAPH_MODULE = "graph"
#: Idempotent: running it twice, or from two healthd instances at once, leaves one node.
_CREATE_PROBE_GRAPH = "MERGE (:HealthdProbe {id: 1})"
#: The graph query's server-side ``TIMEOUT`` is this share of the check's timeout.
QUERY_TIMEOUT_SHARE = 0.5
#: The error FalkorDB replies when a graph key does not exist.
_EMPTY_KEY = "empty key"


@dataclass(slots=True)
class _QueueMemory:
    """The waiting-query count of the previous probe, kept in the check's context."""

    waiting_queries: int | None = None


def module_version(encoded: str | None) -> str | None:
    """``41603`` -> ``4.16.3``; FalkorDB encodes its version as ``major*10000+minor*100+patch``."""
    if encoded is None or not encoded.isdigit():
        return encoded
    number = int(encoded)
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def _waiting_queries(reply: Any) -> int | None:
    """The length of the list after ``# Waiting queries`` in a ``GRAPH.INFO`` reply."""
    if not isinstance(reply, list):
        return None
    for label, value in itertools.pairwise(reply):
        text = label.decode(errors="replace") if isinstance(label, bytes) else str(label)
        if "waiting queries" in text.lower():
            return len(value) if isinstance(value, list) else None
    return None


async def probe(check: FalkorDbCheck, ctx: ProbeContext) -> Observation:
    """``PING``, ``INFO``, then a read-only query on the probe graph and ``GRAPH.INFO``."""
    memory = ctx.get("queue", _QueueMemory)

    async def graph(
        connection: AbstractConnection, info: Mapping[str, Any], facts: dict[str, Any]
    ) -> None:
        encoded = info.get("modules", {}).get(GRAPH_MODULE)
        facts["graph_module_version"] = module_version(encoded)
        if encoded is None:
            return  # a plain Redis: assess says module_missing
        # FalkorDB's own limit, so that a query the deadline abandons stops on the server too.
        query = ("GRAPH.RO_QUERY", check.graph, check.query, "TIMEOUT", _timeout_ms(check))
        started = time.perf_counter()
        try:
            await command(connection, *query)
            facts["probe_graph"] = "exists"
        except ResponseError as exc:
            if _EMPTY_KEY not in str(exc):
                if type(exc) is not ResponseError or not _is_query_error(exc):
                    raise
                # FalkorDB's words, which may echo the query: redacted, escaped, cut short.
                facts["graph_error"] = quote(str(exc), Redactor(secrets_of(check)))
                return
            if facts.get("role") != "master":
                facts["probe_graph"] = "missing"
                return
            await command(connection, "GRAPH.QUERY", check.graph, _CREATE_PROBE_GRAPH)
            facts["probe_graph"] = "created"
            started = time.perf_counter()
            await command(connection, *query)
        facts["query_seconds"] = round(time.perf_counter() - started, 6)
        try:
            waiting = _waiting_queries(await command(connection, "GRAPH.INFO"))
        except ResponseError:
            waiting = None  # older FalkorDB has no GRAPH.INFO: nothing to judge
        facts["waiting_queries"] = waiting
        facts["waiting_queries_previous"] = memory.waiting_queries
        memory.waiting_queries = waiting

    return await measure_server(check, ctx, what="falkordb", then=graph)


def _timeout_ms(check: FalkorDbCheck) -> int:
    """Below the socket timeout, so FalkorDB's own "Query timed out" arrives first."""
    return max(1, round(check.timeout_seconds * QUERY_TIMEOUT_SHARE * 1000))


def _is_query_error(exc: ResponseError) -> bool:
    """A reply about the query itself (syntax, semantics), not about the server's state.

    Server-state replies (``BUSY``, ``LOADING``, ...) keep their own reason codes.
    """
    return str(exc).split(" ", 1)[0] not in {"BUSY", "MISCONF", "MASTERDOWN", "OOM"}


def assess(check: FalkorDbCheck, observation: Observation) -> Finding:
    """The redis findings, then: graph module loaded, query answered, queue not growing."""
    findings = assess_server(check, observation)
    facts = observation.facts
    if observation.failure is None:
        findings.extend(_graph_findings(check, facts))
    version = facts.get("graph_module_version")
    query = facts.get("query_seconds")
    took = f" in {format_seconds(query)}" if query is not None else ""
    healthy = Finding(
        Status.HEALTHY,
        OK,
        f"graph query answered{took} by FalkorDB {version} ({healthy_reason(facts)})",
    )
    return worst(findings, healthy)


def _graph_findings(check: FalkorDbCheck, facts: Mapping[str, Any]) -> list[Finding]:
    if facts.get("graph_module_version") is None:
        modules = ", ".join(facts.get("modules") or []) or "none"
        return [
            Finding(
                Status.UNHEALTHY,
                "module_missing",
                f"the FalkorDB graph module is not loaded (modules: {modules})",
            )
        ]
    if (error := facts.get("graph_error")) is not None:
        if "timed out" in str(error):
            # FalkorDB's own TIMEOUT is a share of the check's: name the configured one.
            limit = format_seconds(check.timeout_seconds)
            return [
                Finding(Status.UNHEALTHY, "timeout", f"graph query timed out (timeout {limit})")
            ]
        return [Finding(Status.UNHEALTHY, "graph_query_failed", f"graph query failed: {error}")]
    if facts.get("probe_graph") == "missing":
        return [
            Finding(
                Status.DEGRADED,
                "probe_graph_missing",
                f"probe graph {check.graph!r} does not exist on this read-only server; "
                "healthd creates it only on a master",
            )
        ]
    waiting = facts.get("waiting_queries")
    previous = facts.get("waiting_queries_previous") or 0
    if waiting is not None and waiting >= check.degraded_waiting_queries and waiting > previous:
        return [
            Finding(
                Status.DEGRADED,
                "queries_waiting",
                f"{waiting} graph queries waiting, up from {previous} "
                f"(limit {check.degraded_waiting_queries})",
            )
        ]
    return []
