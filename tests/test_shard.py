"""Shards: rendezvous hashing of component names, ``[daemon] shard``, its metric and CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import httpx
import pytest

from healthd import shard
from healthd.config import ConfigError, load
from healthd.exporters.metrics import exposition
from healthd.state import StateStore
from tests.daemon import daemon_settings, free_port, healthd_cli, running_healthd, write_config
from tests.http_target import HttpTarget

NAMES = [f"svc-{n:04d}" for n in range(3000)]


def _config(tmp_path: Path, shard_value: str | None, names: list[str]) -> Path:
    daemon = {"status_file": str(tmp_path / "status.json")}
    if shard_value is not None:
        daemon["shard"] = shard_value
    components = {name: {"kind": "tcp", "address": "127.0.0.1:9"} for name in names}
    return write_config(tmp_path / "healthd.toml", daemon, components)


def test_going_from_3_to_4_shards_moves_about_a_quarter() -> None:
    before, after = shard.assign(NAMES, 3), shard.assign(NAMES, 4)
    moved = [name for name in NAMES if before[name] != after[name]]
    assert 0.22 < len(moved) / len(NAMES) < 0.28
    # Only to the new shard: nothing is shuffled between the shards that stay.
    assert {after[name] for name in moved} == {4}


def test_shards_get_about_the_same_number_of_components() -> None:
    sizes = Counter(shard.assign(NAMES, 3).values())
    assert sorted(sizes) == [1, 2, 3]
    assert all(900 < size < 1100 for size in sizes.values())


def test_assignment_is_pinned_across_processes_and_releases() -> None:
    # A hash that changed between processes (Python's hash()) or releases would reshuffle a
    # running fleet: every instance must compute the same owner from the name alone.
    names = ["api", "db", "redis", "search", "queue", "mail"]
    assert shard.assign(names, 3) == {
        "api": 2,
        "db": 1,
        "redis": 3,
        "search": 3,
        "queue": 1,
        "mail": 1,
    }
    assert set(shard.assign(names, 1).values()) == {1}


@pytest.mark.parametrize(
    ("value", "expected"), [("2/3", (2, 3)), (" 1 / 1 ", (1, 1)), ("1000/1000", (1000, 1000))]
)
def test_shard_parses_i_of_n(value: str, expected: tuple[int, int]) -> None:
    assert shard.parse(value) == expected


@pytest.mark.parametrize("value", ["0/3", "4/3", "3", "1/0", "1/1001", "a/b", "-1/3", "2/3/4"])
def test_bad_shard_is_a_config_error_naming_the_key_and_line(tmp_path: Path, value: str) -> None:
    path = _config(tmp_path, value, ["api"])
    with pytest.raises(ConfigError) as caught:
        load(path)
    (problem,) = caught.value.problems
    assert str(path) in problem
    assert "daemon.shard" in problem
    assert ":3:" in problem or "line 3" in problem


def test_each_shard_checks_only_its_own_components(tmp_path: Path) -> None:
    names = NAMES[:300]
    seen: list[str] = []
    for index in (1, 2, 3):
        config = load(_config(tmp_path, f"{index}/3", names))
        local = list(config.checks())
        assert all(shard.shard_of(name, 3) == index for name in local)
        assert len(config.components) == 300
        seen += local
    assert sorted(seen) == sorted(names)
    assert list(load(_config(tmp_path, None, names)).checks()) == names


def test_a_dependency_on_another_shards_component_validates(tmp_path: Path) -> None:
    names = ["api", "db", "redis", "search", "queue", "mail"]
    db_shard = shard.shard_of("db", 2)
    other = next(name for name in names if shard.shard_of(name, 2) != db_shard)
    path = _config(tmp_path, f"{3 - db_shard}/2", names)
    text = path.read_text().replace(
        f"[components.{other}]\n", f'[components.{other}]\ndepends_on = ["db"]\n'
    )
    path.write_text(text)
    config = load(path)
    assert other in config.checks()
    assert "db" not in config.checks()
    assert config.checks()[other].depends_on == ("db",)


def test_every_instance_exports_its_shard() -> None:
    store = StateStore(clock=lambda: 1.0)
    text = exposition(store.snapshot(), "1.0").decode()
    assert 'healthd_shard_info{shard="1",shards="1"} 1' in text
    assert "healthd_shards 1" in text
    store.config_loaded(True, 1.0, shard=(2, 3))
    text = exposition(store.snapshot(), "1.0").decode()
    assert 'healthd_shard_info{shard="2",shards="3"} 1' in text
    assert "healthd_shards 3" in text


def test_config_show_shards_prints_every_components_shard(tmp_path: Path) -> None:
    names = NAMES[:50]
    path = _config(tmp_path, "2/3", names)
    result = healthd_cli("--config", str(path), "config", "show", "--shards")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert {name: where for where, name in rows} == {
        name: f"{index}/3" for name, index in shard.assign(names, 3).items()
    }
    planned = healthd_cli("--config", str(path), "config", "show", "--shards", "5")
    assert planned.returncode == 0, planned.stderr
    assert {line.split("\t")[0] for line in planned.stdout.splitlines()} == {
        f"{i}/5" for i in range(1, 6)
    }


def test_config_show_shards_refuses_a_bad_n(tmp_path: Path) -> None:
    path = _config(tmp_path, None, ["api"])
    result = healthd_cli("--config", str(path), "config", "show", "--shards", "0")
    assert result.returncode == 2
    assert "N must be a whole number from 1 to 1000" in result.stderr


def test_a_running_instance_neither_probes_nor_exports_another_shards_components(
    tmp_path: Path,
) -> None:
    names = [f"svc{n:02d}" for n in range(12)]
    owner = shard.assign(names, 2)
    target = HttpTarget()
    port = free_port()
    daemon = daemon_settings(tmp_path, port, shard="1/2")
    components = {name: {"kind": "http", "url": target.url(f"/c/{name}")} for name in names}
    config = write_config(tmp_path / "healthd.toml", daemon, components)
    try:
        with running_healthd(config, ready=True):
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            status = json.loads((tmp_path / "status.json").read_text())
        asked = {request.path.removeprefix("/c/") for request in target.requests}
    finally:
        target.close()
    mine = {name for name in names if owner[name] == 1}
    assert 0 < len(mine) < len(names)
    assert asked == mine
    exported = set(re.findall(r'healthd_component_status\{component="([^"]+)"', metrics))
    assert exported == mine
    assert set(status["components"]) == mine
    assert 'healthd_shard_info{shard="1",shards="2"} 1' in metrics
