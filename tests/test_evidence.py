"""``evidence``: the reasons of a component's evidence appended to its own while it is not
healthy, as ``classify.judge_world`` and the state store's snapshots hand them out."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from healthd.classify import World, judge_world
from healthd.config import ConfigError, load
from healthd.model import ComponentState, Status
from healthd.state import StateStore
from tests.daemon import healthd_cli

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY
LIMIT = 35.0


def member(
    name: str,
    status: Status = H,
    reason: str = "",
    *,
    evidence: tuple[str, ...] = (),
    depends_on: tuple[str, ...] = (),
    checked_at: float = 1000.0,
) -> ComponentState:
    """A measured state as the store holds it."""
    return ComponentState(
        name=name,
        kind="http",
        critical=True,
        status=status,
        reason_code="ok" if status is H else "x",
        reason=reason or f"{name} said so",
        latency_seconds=0.01,
        checked_at=checked_at,
        since=900.0,
        last_success_at=None,
        consecutive_failures=0,
        consecutive_successes=0,
        depends_on=depends_on,
        evidence=evidence,
    )


def world(*states: ComponentState, now: float = 1000.0, previous: World | None = None) -> World:
    """Judge ``states``, each with the same stale bound."""
    return judge_world({s.name: s for s in states}, {s.name: LIMIT for s in states}, now, previous)


UNIT_REASON = "auto-restart, 4 restarts in 10 min, last result oom-kill"


def test_unhealthy_component_carries_its_evidence_reasons_in_order() -> None:
    api = member("api", U, "GET /health: connection refused", evidence=("e2i-api.service", "host"))
    unit = member("e2i-api.service", U, UNIT_REASON)
    host = member("host", H, "disks / 41% used; memory 62% available")

    judged = world(api, unit, host).components

    assert judged["api"].reason == (
        "GET /health: connection refused; e2i-api.service: " + UNIT_REASON + "; "
        "host: disks / 41% used; memory 62% available"
    )
    assert judged["api"].status is U
    assert judged["e2i-api.service"] is unit
    assert judged["host"] is host


def test_healthy_component_gets_no_evidence() -> None:
    api = member("api", H, "GET /health: 200", evidence=("unit",))

    judged = world(api, member("unit", U, UNIT_REASON)).components

    assert judged["api"] is api


def test_degraded_and_stale_components_get_evidence_too() -> None:
    api = member("api", D, "slow", evidence=("unit",))
    bento = member("bento", H, "ok", evidence=("unit",), checked_at=900.0)

    judged = world(api, bento, member("unit", U, UNIT_REASON), now=1000.0).components

    assert judged["api"].reason == f"slow; unit: {UNIT_REASON}"
    assert judged["bento"].reason_code == "stale"
    assert judged["bento"].reason.endswith(f"; unit: {UNIT_REASON}")


def test_each_evidence_reason_is_cut_to_120_characters() -> None:
    long_reason = "x" * 500
    api = member("api", U, "down", evidence=("host",))

    judged = world(api, member("host", U, long_reason)).components["api"]

    assert judged.reason == "down; host: " + "x" * 117 + "..."


def test_evidence_of_evidence_is_not_followed() -> None:
    api = member("api", U, "down", evidence=("bento",))
    bento = member("bento", U, "bento down", evidence=("host",))

    judged = world(api, bento, member("host", U, "full")).components

    assert judged["api"].reason == "down; bento: bento down"
    assert judged["bento"].reason == "bento down; host: full"


def test_impacted_component_keeps_its_impact_and_gets_evidence_once() -> None:
    api = member("api", U, "down", evidence=("unit",), depends_on=("db",))
    states = (api, member("db", U, "db down"), member("unit", U, UNIT_REASON))

    first = world(*states)
    again = world(*states, previous=first)

    judged = again.components["api"]
    assert judged.impacted_by == ("db",)
    assert judged.reason == f"down; unit: {UNIT_REASON}"
    assert judged is first.components["api"]
    assert not again.changed


def test_unchanged_evidence_keeps_the_object_and_changed_evidence_replaces_it() -> None:
    api = member("api", U, "down", evidence=("unit",))
    unit = member("unit", U, UNIT_REASON)
    first = world(api, unit)

    same = world(api, unit, previous=first)
    assert same.components["api"] is first.components["api"]
    assert not same.changed

    worse = replace(unit, reason="auto-restart, 5 restarts in 10 min, last result oom-kill")
    changed = world(api, worse, previous=same)
    assert changed.changed
    assert changed.components["api"] is not first.components["api"]
    assert changed.components["api"].reason.endswith("5 restarts in 10 min, last result oom-kill")


def test_snapshot_version_moves_when_only_the_evidence_text_changes() -> None:
    clock = [1000.0]
    store = StateStore(clock=lambda: clock[0])
    store.record(member("api", U, "down", evidence=("unit",)), stale_after_seconds=LIMIT)
    store.record(member("unit", U, UNIT_REASON), stale_after_seconds=LIMIT)
    before = store.snapshot()
    assert store.snapshot().version == before.version

    store.record(member("unit", U, "failed (failed)"), stale_after_seconds=LIMIT)
    after = store.snapshot()

    assert after.version > before.version
    assert after.components["api"].reason == "down; unit: failed (failed)"


@pytest.mark.parametrize(
    ("evidence", "problem"),
    [
        ('["api"]', "components.api.evidence: a component cannot be its own evidence"),
        ('["nope"]', "components.api.evidence: no component named 'nope'"),
    ],
)
def test_bad_evidence_names_file_key_and_line(tmp_path: Path, evidence: str, problem: str) -> None:
    path = tmp_path / "healthd.toml"
    path.write_text(
        f'[components.api]\nkind = "http"\nurl = "http://api/"\nevidence = {evidence}\n'
        '[components.host]\nkind = "host"\n'
    )

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert caught.value.problems == [f"{path}:4: {problem}"]


def test_check_json_shows_the_service_reason_followed_by_the_host_evidence(
    tmp_path: Path, closed_port: int
) -> None:
    config = tmp_path / "healthd.toml"
    config.write_text(
        f'[components.api]\nkind = "tcp"\naddress = "127.0.0.1:{closed_port}"\n'
        'critical = true\nevidence = ["host"]\n'
        '[components.host]\nkind = "host"\ndisk_paths = ["/"]\n'
        "degraded_disk_usage = 0.0001\nunhealthy_disk_usage = 0.0001\n"
    )

    done = healthd_cli("--config", str(config), "check", "--json")

    assert done.returncode == 2, done.stderr
    components = json.loads(done.stdout)["components"]
    host, api = components["host"], components["api"]
    assert host["reason_code"] == "disk_full"
    assert api["reason_code"] == "connection_refused"
    assert api["reason"].endswith(f"; host: {host['reason']}")
    assert api["reason"].startswith(f"connect to 127.0.0.1:{closed_port}: ")
