"""The configuration contract: a TOML file, overridden by ``HEALTHD_*`` environment variables.

This module holds the root of the schema (``[daemon]``, ``[components.*]``, ``[[maintenance]]``),
the checks that span tables, and ``load``. A config either loads whole and typed, or fails with
errors that name the file, the key and the line (``config_errors`` words them). The check
kinds are in ``config_checks``, the value types they share in ``config_values``; both are
re-exported here, so that ``healthd.config`` stays the one name to import from.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from healthd import shard as shard_module
from healthd.config_checks import (
    ApiCheck,
    BentomlCheck,
    CheckBase,
    CheckConfig,
    Condition,
    FalkorDbCheck,
    HeartbeatCheck,
    HostCheck,
    HttpCheck,
    MlflowCheck,
    OpikCheck,
    PostgresCheck,
    RedisCheck,
    RedisCheckBase,
    ServiceCheckBase,
    Strict,
    SupabaseCheck,
    SystemdCheck,
    TcpCheck,
)
from healthd.config_errors import ConfigError, bad_variables, describe, locate
from healthd.config_values import (
    AbsoluteFile,
    BindAddress,
    Duration,
    EnvText,
    Retention,
    bind_address,
    parse_address,
    parse_duration,
    same_port,
)
from healthd.maintenance import Window, parse_weekly
from healthd.secrets import UnreadableFile, collect_secrets, read_capped

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_CONFIG_BYTES",
    "MIN_INTERVAL_SECONDS",
    "ApiCheck",
    "BentomlCheck",
    "CheckBase",
    "CheckConfig",
    "Condition",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "DetailLevel",
    "FalkorDbCheck",
    "HeartbeatCheck",
    "HostCheck",
    "HttpCheck",
    "MaintenanceConfig",
    "MlflowCheck",
    "OpikCheck",
    "PostgresCheck",
    "RedisCheck",
    "RedisCheckBase",
    "ServiceCheckBase",
    "SupabaseCheck",
    "SystemdCheck",
    "TcpCheck",
    "bind_address",
    "load",
    "parse_address",
    "parse_duration",
    "resolve_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/healthd/healthd.toml")
#: A config file larger than this is refused rather than read (``/dev/zero`` would never end).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
#: A check interval shorter than this would burn a core; enforced by ``load`` (see there).
MIN_INTERVAL_SECONDS = 0.1


#: How much the status file shows (``status_details``).
DetailLevel = Literal["full", "summary"]


def _shard(value: str) -> str:
    # Spelled one way ("1/3", not " 01 / 3"), as the shard metric shows it.
    index, shards = shard_module.parse(value)
    return f"{index}/{shards}"


class DaemonConfig(Strict):
    """The ``[daemon]`` table: where healthd exports, and defaults for every component."""

    metrics_address: BindAddress = "127.0.0.1:9469"
    #: Where jobs ping their heartbeats; listened on only when a heartbeat is configured.
    push_address: BindAddress = "127.0.0.1:9470"
    status_file: AbsoluteFile = Path("/var/lib/healthd/status.json")
    #: The Unix socket ``healthd maintenance`` talks to (mode 0660; never a network port).
    control_socket: AbsoluteFile = Path("/run/healthd/control.sock")
    status_file_refresh: Duration = 5.0
    interval: Duration = 15.0
    timeout: Duration = 5.0
    #: ``None``: sized from the checks (``scheduler.concurrency_limit``).
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000)
    #: ``None``: 1 ms per check, 2 ms beyond 1,000 (``scheduler.startup_spread``).
    startup_spread: Duration | None = None
    #: At least this long between two status file writes, however many components change.
    status_file_min_interval: Duration = 1.0
    #: Export ``healthd_check_duration_seconds``, a histogram per component: half of the bytes
    #: and of the series, and no shipped rule or dashboard reads it.
    check_duration_histogram: bool = False
    #: ``full`` writes reasons and details; ``summary`` leaves out everything that could reveal
    #: internal addresses (reasons, details, latencies), for a status file served to the public.
    status_details: DetailLevel = "full"
    #: The history database; by default ``history.db`` beside the status file.
    history_file: AbsoluteFile | None = None
    history_retention: Retention = 90 * 86400.0
    #: ``"i/N"``: check only the components that rendezvous hashing gives shard i of N
    #: (``healthd.shard``); ``None`` checks them all.
    shard: Annotated[str, AfterValidator(_shard)] | None = None

    def shard_numbers(self) -> tuple[int, int]:
        """``(i, N)`` of ``shard``; ``(1, 1)`` when the instance checks everything."""
        return shard_module.parse(self.shard) if self.shard is not None else (1, 1)


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}; use a zoneinfo name") from None
    return value


def _aware(value: datetime, info: ValidationInfo) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"{info.field_name} needs a UTC offset (RFC 3339), such as 'Z'")
    start = info.data.get("start")
    if info.field_name == "end" and start is not None and value <= start:
        raise ValueError("end must be after start")
    return value


def _weekly(value: str, info: ValidationInfo) -> str:
    parse_weekly(value, info.data.get("timezone", "UTC"))
    return value


#: An RFC 3339 time with its offset; an ``end`` must also come after the ``start`` before it.
_AwareTime = Annotated[datetime, AfterValidator(_aware)]


class MaintenanceConfig(Strict):
    """A ``[[maintenance]]`` table: planned work on ``components``, once (``start``/``end``,
    RFC 3339 with an offset) or every week (``weekly = "Sun 02:00-03:00"`` in ``timezone``)."""

    components: tuple[str, ...] = Field(min_length=1)
    reason: str = Field(min_length=1, max_length=500)
    timezone: Annotated[str, AfterValidator(_zone)] = "UTC"
    start: _AwareTime | None = None
    end: _AwareTime | None = None
    weekly: Annotated[str, AfterValidator(_weekly)] | None = None

    @model_validator(mode="after")
    def _one_schedule(self) -> MaintenanceConfig:
        fixed = self.start is not None or self.end is not None
        if self.weekly is not None and fixed:
            raise ValueError("give either start and end, or weekly, not both")
        if self.weekly is None and (self.start is None or self.end is None):
            raise ValueError("needs start and end, or weekly")
        return self

    def window(self) -> Window:
        """The window this table describes."""
        if self.weekly is not None:
            weekly = parse_weekly(self.weekly, self.timezone)
            return Window(self.components, self.reason, "config", weekly=weekly)
        assert self.start is not None
        assert self.end is not None
        start, end = self.start.timestamp(), self.end.timestamp()
        return Window(self.components, self.reason, "config", start, end)


def _plain_names(components: dict[str, CheckBase]) -> dict[str, CheckBase]:
    for name in components:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
            raise ValueError(f"component name {name!r}: use letters, digits, '_', '-', '.'")
    return components


def _with_daemon_defaults(
    components: dict[str, CheckBase], info: ValidationInfo
) -> dict[str, CheckBase]:
    """Every check with its effective interval and timeout: its own, or the daemon's."""
    daemon = info.data.get("daemon")
    if daemon is None:
        return components  # [daemon] is invalid, and says so; the config fails either way
    # Set in place, as a frozen dataclass's ``__post_init__`` would: the checks are
    # validation's own, made a moment ago and seen by nothing else yet.
    for check in components.values():
        interval = check.interval or daemon.interval
        timeout = check.timeout or min(daemon.timeout, interval)
        object.__setattr__(check, "interval", interval)
        object.__setattr__(check, "timeout", timeout)
    return components


class Config(BaseSettings):
    """The whole configuration. ``HEALTHD_DAEMON__INTERVAL=10s`` overrides ``[daemon] interval``."""

    model_config = SettingsConfigDict(
        env_prefix="HEALTHD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    # ``daemon`` comes first: fields validate in order, and components inherit from it.
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    components: Annotated[
        dict[str, CheckConfig],
        AfterValidator(_plain_names),
        AfterValidator(_with_daemon_defaults),
    ] = Field(default_factory=dict)
    maintenance: list[MaintenanceConfig] = Field(default_factory=list)
    _local: Mapping[str, CheckBase] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file; nothing else is read.
        return (_MarkedEnvironment(env_settings), init_settings)

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        # A message starts with the key at fault: the error report puts it there.
        for name, check in self.components.items():
            interval, timeout = check.interval_seconds, check.timeout_seconds
            if timeout > interval:
                raise ValueError(
                    f"components.{name}.timeout: timeout {timeout:g}s is longer than interval "
                    f"{interval:g}s, so checks would overlap"
                )
            for dependency in check.depends_on:
                if dependency not in self.components:
                    raise ValueError(
                        f"components.{name}.depends_on: no component named {dependency!r}"
                    )
            for witness in check.evidence:
                if witness == name:
                    raise ValueError(
                        f"components.{name}.evidence: a component cannot be its own evidence"
                    )
                if witness not in self.components:
                    raise ValueError(f"components.{name}.evidence: no component named {witness!r}")
        _reject_cycles(self.components)
        daemon = self.daemon
        if any(check.kind == "heartbeat" for check in self.components.values()) and (
            same_port(daemon.metrics_address, daemon.push_address)
        ):
            raise ValueError(
                f"daemon.push_address: {daemon.push_address} takes the port of metrics_address "
                f"{daemon.metrics_address}; heartbeats need a port of their own"
            )
        for index, planned in enumerate(self.maintenance):
            for name in planned.components:
                if name not in self.components:
                    raise ValueError(f"maintenance.{index}.components: no component named {name!r}")
        # A dependency on another shard's component stays valid: it is not judged here, so
        # it counts as healthy and impact is computed from this shard's components only.
        index, shards = self.daemon.shard_numbers()
        self._local = self.components
        if shards > 1:
            self._local = {
                name: check
                for name, check in self.components.items()
                if shard_module.shard_of(name, shards) == index
            }
        return self

    def checks(self) -> Mapping[str, CheckBase]:
        """The components this instance checks (its shard's, or all), typed as their base."""
        return self._local

    def windows(self) -> tuple[Window, ...]:
        """The scheduled maintenance windows."""
        return tuple(planned.window() for planned in self.maintenance)

    def secrets(self) -> set[str]:
        """Every secret value the config resolved; the redactor scrubs them from all output."""
        return collect_secrets(self.components)


class _MarkedEnvironment(PydanticBaseSettingsSource):
    """The ``HEALTHD_*`` variables, with every string marked as text from the environment."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: ``__call__`` delegates whole to the environment source."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_mark_env_text(self._inner()))


def _mark_env_text(value: Any) -> Any:
    if isinstance(value, str):
        return EnvText(value)
    if isinstance(value, dict):
        return {k: _mark_env_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_env_text(v) for v in value]
    return value


def _reject_cycles(checks: Mapping[str, CheckBase]) -> None:
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise ValueError(f"components.{name}.depends_on: dependencies form a cycle: {cycle}")
        visiting.add(name)
        for dependency in checks[name].depends_on:
            visit(dependency, [*path, name])
        visiting.discard(name)
        done.add(name)

    for name in checks:
        visit(name, [])


# --- loading and error reporting ----------------------------------------------------------


def resolve_path(explicit: str | None) -> Path:
    """``--config``, else ``$HEALTHD_CONFIG``, else the default path."""
    return Path(explicit or os.environ.get("HEALTHD_CONFIG") or DEFAULT_CONFIG_PATH)


def load(path: Path) -> Config:
    """Read, parse and validate ``path``; raise ``ConfigError`` naming file, key and line.

    Besides what the models check, a config must have at least one component, and no check may
    run more often than every ``MIN_INTERVAL_SECONDS`` (models built in code may, for tests).
    """
    try:
        raw = read_capped(path, MAX_CONFIG_BYTES, "config", regular_only=False)
        # Some editors start a UTF-8 file with a byte-order mark; TOML does not allow one.
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnreadableFile as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.reason}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: config is not UTF-8: {exc.reason}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{at.group(1)}" if at else str(path)
        raise ConfigError([f"{where}: malformed TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: malformed TOML: nested too deeply"]) from None
    try:
        config = Config(**data)
    except ValidationError as exc:
        raise ConfigError(describe(path, text, exc, data)) from None
    except SettingsError:
        raise ConfigError(list(bad_variables(path, Config))) from None
    if problems := list(_policy_problems(path, text, config, data)):
        raise ConfigError(problems)
    return config


def _policy_problems(
    path: Path, text: str, config: Config, data: Mapping[str, Any]
) -> Iterator[str]:
    if not config.components:
        where = locate(path, text, ["components"], data)
        yield f"{where}: components: no components: healthd would have nothing to check"
    daemon_too_fast = config.daemon.interval < MIN_INTERVAL_SECONDS
    if daemon_too_fast:
        yield _too_fast(path, text, ["daemon", "interval"], config.daemon.interval, data)
    for name, check in config.components.items():
        seconds = check.interval_seconds
        # An interval inherited from the daemon is reported once, at the daemon's key.
        if seconds < MIN_INTERVAL_SECONDS and not (
            daemon_too_fast and seconds == config.daemon.interval
        ):
            yield _too_fast(path, text, ["components", name, "interval"], seconds, data)


def _too_fast(
    path: Path, text: str, loc: list[str], seconds: float, data: Mapping[str, Any]
) -> str:
    where = locate(path, text, loc, data)
    minimum = f"{MIN_INTERVAL_SECONDS * 1000:g}ms"
    return f"{where}: {'.'.join(loc)}: interval {seconds:g}s is shorter than {minimum}"
