"""One pydantic dataclass per check kind, joined in ``CheckConfig``, a union discriminated on
``kind``.

Every kind forbids unknown keys and carries its defaults. A new kind needs its class here and
a member in ``CheckConfig``, a row in ``probes.PROBES`` (a test holds the two to the same set),
and its section in docs/probes.md; ``healthd.config`` reads the kinds from the union.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)
from pydantic.dataclasses import dataclass

from healthd.config_values import (
    NO_HEADERS,
    Address,
    CaFile,
    Duration,
    Flag,
    HttpHeaders,
    HttpUrl,
    Period,
    PrintableSecret,
    Ratio,
    RequestPath,
    Share,
    is_port,
)
from healthd.secrets import SecretTemplated, Templated


class Strict(BaseModel):
    """A frozen table that rejects keys it does not know."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: How every check kind is declared: a frozen, slotted pydantic dataclass that rejects keys
#: it does not know. Slots rather than a ``BaseModel``: a model keeps a dict of every field
#: and a set of those given, 1.1 KB a check against 0.25 KB, 9 MiB at 10,000 checks.
#: A field whose default is a ``Field(...)`` says ``kw_only=True`` itself: pydantic ignores the
#: decorator's for it and would validate it before every other field, out of the order that
#: ``_no_milder_than_degraded`` relies on.
_CHECK = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class CheckBase:
    """Settings every check kind shares. ``None`` means: take the ``[daemon]`` default."""

    kind: str
    critical: Flag = False
    interval: Duration | None = None
    timeout: Duration | None = None
    degraded_latency: Duration | None = None
    failure_threshold: int = Field(default=3, ge=1, kw_only=True)
    recovery_threshold: int = Field(default=2, ge=1, kw_only=True)
    #: Flapping: unhealthy once ``flap_threshold`` of the last ``flap_window`` checks failed.
    flap_window: int = Field(default=10, ge=0, le=1000, kw_only=True)
    flap_threshold: float = Field(default=0.5, gt=0, le=1, kw_only=True)
    depends_on: tuple[str, ...] = ()
    #: Components whose reasons are appended to this one's while it is not healthy.
    evidence: tuple[str, ...] = ()
    description: str = ""
    #: The availability objective (share of good checks), exported for the SLO burn-rate rules.
    slo: float | None = Field(default=None, gt=0, lt=1, kw_only=True)

    @property
    def interval_seconds(self) -> float:
        """The effective interval; set for every component once the whole config is loaded."""
        assert self.interval is not None
        return self.interval

    @property
    def timeout_seconds(self) -> float:
        """The effective deadline of one check."""
        assert self.timeout is not None
        return self.timeout


# --- http ---------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError("equals takes a string, a finite number or a boolean")


class Condition(Strict):
    """One test on a response body, and the severity it causes when it fails.

    Exactly one of ``json`` (a dotted path such as ``checks.0.status``) or ``regex``. A ``json``
    condition tests with ``equals``, ``min``/``max`` (numbers) or ``present``.
    """

    json_path: str | None = Field(default=None, alias="json")
    regex: str | None = None
    equals: Annotated[str | int | float | bool | None, BeforeValidator(_scalar)] = None
    # NaN compares false with everything, so a NaN bound would never fail.
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    present: Flag | None = None
    severity: Literal["degraded", "unhealthy"] = "unhealthy"
    name: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        if (self.json_path is None) == (self.regex is None):
            raise ValueError("a condition needs exactly one of 'json' or 'regex'")
        if self.regex is not None:
            if any(v is not None for v in (self.equals, self.min, self.max, self.present)):
                raise ValueError("a 'regex' condition takes no equals/min/max/present")
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"bad regex {self.regex!r}: {exc}") from None
        else:
            tests = [self.equals is not None, self.min is not None or self.max is not None]
            tests.append(self.present is not None)
            if sum(tests) != 1:
                raise ValueError("a 'json' condition needs one of equals, min/max or present")
        return self

    @property
    def label(self) -> str:
        """A short human description, used in reasons."""
        if self.name:
            return self.name
        if self.regex is not None:
            return f"body matches /{self.regex}/"
        if self.equals is not None:
            return f"{self.json_path} == {self.equals!r}"
        if self.present is not None:
            return f"{self.json_path} {'present' if self.present else 'absent'}"
        bounds = [f">= {self.min:g}" if self.min is not None else ""]
        bounds.append(f"<= {self.max:g}" if self.max is not None else "")
        return f"{self.json_path} {' and '.join(b for b in bounds if b)}"


def _status_ranges(value: Any) -> Any:
    """Accept ``200``, ``"2xx"``, ``"200-299"`` or a list of those."""
    items = value if isinstance(value, list | tuple) else [value]
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            ranges.append((item, item))
        elif isinstance(item, str) and re.fullmatch(r"[1-5]xx", item):
            base = int(item[0]) * 100
            ranges.append((base, base + 99))
        elif isinstance(item, str) and (m := re.fullmatch(r"(\d{3})\s*-\s*(\d{3})", item)):
            ranges.append((int(m.group(1)), int(m.group(2))))
        else:
            raise ValueError(f"bad status {item!r}: use 200, '2xx' or '200-299'")
    for low, high in ranges:
        if not 100 <= low <= high <= 599:
            raise ValueError(f"status range {low}-{high} is outside 100-599")
    return tuple(ranges)


StatusRanges = Annotated[tuple[tuple[int, int], ...], BeforeValidator(_status_ranges)]


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class HttpCheck(CheckBase):
    """An HTTP(S) request whose status, latency and body decide the verdict."""

    kind: Literal["http"] = "http"
    url: HttpUrl
    method: Literal["GET", "HEAD", "POST", "PUT", "OPTIONS"] = "GET"
    headers: HttpHeaders = Field(default_factory=lambda: NO_HEADERS, kw_only=True)
    body: Templated | None = None
    expected_status: StatusRanges = ((200, 399),)
    conditions: tuple[Condition, ...] = ()
    tls_verify: Flag = True
    ca_file: CaFile = None
    follow_redirects: Flag = True
    max_redirects: int = Field(default=5, ge=0, le=30, kw_only=True)
    max_body_bytes: int = Field(default=1 << 20, ge=0, kw_only=True)


# --- tcp ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class TcpCheck(CheckBase):
    """A TCP connect (optionally a TLS handshake) to ``address``."""

    kind: Literal["tcp"] = "tcp"
    address: Address
    tls: Flag = False
    tls_verify: Flag = True
    ca_file: CaFile = None
    server_name: str | None = None


# --- datastores ---------------------------------------------------------------------------


def _postgres_dsn(dsn: Templated) -> Templated:
    value = dsn.reveal().strip()
    if "://" in value:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"dsn {str(dsn)!r} must start with postgresql://")
    elif "=" not in value:
        raise ValueError(f"dsn {str(dsn)!r} is neither a URL nor key=value pairs")
    # libpq's own parser: unknown keywords, bad quoting and bad URIs fail here, not in
    # every probe. Its messages may quote the DSN, which holds the password: cut that off.
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(value)
    except PsycopgError as exc:
        reason = str(exc).strip().splitlines()[0].split(" in URI: ", 1)[0]
        raise ValueError(f"dsn {str(dsn)!r} is not valid: {reason.replace(value, '…')}") from None
    for port in str(params.get("port") or "").split(","):
        if port and not is_port(port):
            raise ValueError(f"dsn {str(dsn)!r} has no valid port (1-65535)")
    return dsn


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class PostgresCheck(CheckBase):
    """A fresh PostgreSQL connection: ``SELECT 1``, then role, saturation, lag and transactions.

    ``dsn`` is a libpq URL or ``key=value`` string. The password may sit inside it as a
    ``${env:...}``/``${file:...}`` reference, or in ``password``, which needs no URL escaping.
    """

    kind: Literal["postgres"] = "postgres"
    dsn: Annotated[Templated, AfterValidator(_postgres_dsn)]
    password: SecretTemplated | None = None
    expect_role: Literal["primary", "standby", "any"] = "primary"
    degraded_saturation: Ratio = 0.8
    degraded_replay_lag: Duration | None = 30.0
    degraded_transaction_age: Duration | None = 300.0


def _redis_url(url: Templated) -> Templated:
    if not url.reveal().startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"url {str(url)!r} must start with redis://, rediss:// or unix://")
    from redis.connection import parse_url

    try:
        parse_url(url.reveal())  # type: ignore[no-untyped-call]
    except ValueError as exc:
        # redis-py's messages name the part at fault, never the URL.
        raise ValueError(f"url {str(url)!r} is not valid: {exc}") from None
    return url


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class RedisCheckBase(CheckBase):
    """Settings shared by ``redis`` and the kinds built on it: ``PING``, then ``INFO``.

    ``url`` is ``redis://``, ``rediss://`` (TLS) or ``unix://``. The password may sit inside
    it as a reference, or in ``password``, which needs no URL escaping.
    """

    url: Annotated[Templated, AfterValidator(_redis_url)]
    password: SecretTemplated | None = None
    username: str | None = None
    expect_role: Literal["master", "replica", "any"] = "master"
    degraded_memory: Ratio = 0.9
    degraded_clients: Ratio = 0.8
    unhealthy_master_link_down: Duration = 60.0
    tls_verify: Flag = True
    ca_file: CaFile = None


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class RedisCheck(RedisCheckBase):
    """A Redis server: reachable, in the expected role, persisting, and not out of room."""

    kind: Literal["redis"] = "redis"


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class FalkorDbCheck(RedisCheckBase):
    """Everything a ``redis`` check does, plus proof that the graph module answers queries.

    ``graph`` is a dedicated probe graph, created (idempotently) on a master when missing;
    ``query`` is run on it read-only. A queue of waiting queries that has grown to at least
    ``degraded_waiting_queries`` since the previous probe is degraded.
    """

    kind: Literal["falkordb"] = "falkordb"
    graph: str = Field(default="healthd_probe", min_length=1, kw_only=True)
    query: str = "RETURN 1"
    degraded_waiting_queries: int = Field(default=5, ge=1, kw_only=True)


# --- service presets ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class ServiceCheckBase(CheckBase):
    """Settings every service preset shares: the service's base URL and how to reach it.

    ``url`` is the base (scheme, host, port and an optional prefix); each preset appends its
    documented paths, every one of which can be overridden. ``headers`` go with every request,
    for credentials that a proxy in front of the service may want.
    """

    url: HttpUrl
    headers: HttpHeaders = Field(default_factory=lambda: NO_HEADERS, kw_only=True)
    tls_verify: Flag = True
    ca_file: CaFile = None
    max_body_bytes: int = Field(default=256 * 1024, ge=0, kw_only=True)


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class ApiCheck(ServiceCheckBase):
    """The platform's FastAPI service: ``/health`` for liveness, then its own health report,
    whose ``agents_available`` must reach ``expected_agents``."""

    kind: Literal["api"] = "api"
    liveness_path: RequestPath = "/health"
    health_path: RequestPath = "/api/v1/health"
    expected_agents: int = Field(default=11, ge=0, kw_only=True)


def _host_header(host: str) -> str:
    if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d+)?", host):
        raise ValueError(f"host {host!r} must be a host name or address, optionally :port")
    return host


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class MlflowCheck(ServiceCheckBase):
    """An MLflow tracking server: ``/health`` for liveness, ``/version`` for details, and an
    experiment search that proves the backend store works.

    ``username``/``password`` enable basic auth. ``host`` is the ``Host`` header to send when
    the server's ``--allowed-hosts`` does not include the address healthd connects to.
    """

    kind: Literal["mlflow"] = "mlflow"
    health_path: RequestPath = "/health"
    version_path: RequestPath = "/version"
    search_path: RequestPath = "/api/2.0/mlflow/experiments/search"
    username: Templated | None = None
    password: SecretTemplated | None = None
    host: Annotated[str, AfterValidator(_host_header)] | None = None
    degraded_search_latency: Duration | None = 2.0

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> MlflowCheck:
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both 'username' and 'password'")
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class BentomlCheck(ServiceCheckBase):
    """A BentoML service: ``/livez`` for liveness, ``/readyz`` for readiness and, when
    ``metrics`` is on, the share of 5xx responses between two probes from ``/metrics``."""

    kind: Literal["bentoml"] = "bentoml"
    livez_path: RequestPath = "/livez"
    readyz_path: RequestPath = "/readyz"
    metrics: Flag = False
    metrics_path: RequestPath = "/metrics"
    degraded_error_rate: Ratio = 0.05
    #: Fewer requests than this between two probes say nothing about an error rate.
    min_requests: int = Field(default=20, ge=1, kw_only=True)


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class OpikCheck(ServiceCheckBase):
    """Opik: the backend at ``url`` (``:8080``) and, when ``ui_url`` is set, the UI and the
    backend as the UI proxies it (``:5173``)."""

    kind: Literal["opik"] = "opik"
    ui_url: HttpUrl | None = None
    ping_path: RequestPath = "/is-alive/ping"
    version_path: RequestPath = "/is-alive/ver"
    health_check_path: RequestPath = "/health-check?name=all"
    ui_path: RequestPath = "/"
    ui_ping_path: RequestPath = "/api/is-alive/ping"


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class SupabaseCheck(ServiceCheckBase):
    """Supabase through its Kong gateway: GoTrue's health and PostgREST, optionally Storage and
    one table read.

    ``api_key`` goes in the ``apikey`` header, and also as ``Authorization: Bearer`` when it is
    a legacy JWT key (``legacy_key``; by default, when the key looks like a JWT).
    """

    kind: Literal["supabase"] = "supabase"
    api_key: PrintableSecret
    legacy_key: Flag | None = None
    auth_path: RequestPath = "/auth/v1/health"
    rest_path: RequestPath = "/rest/v1/"
    storage: Flag = False
    storage_path: RequestPath = "/storage/v1/status"
    table: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", kw_only=True)
    select: str = Field(default="*", pattern=r"^[A-Za-z0-9_*,]+$", kw_only=True)


# --- the unit and the host ----------------------------------------------------------------

#: A unit name as systemd spells it: no path, no spaces, a known suffix.
_UNIT = re.compile(
    r"[A-Za-z0-9:_.\\@-]{1,250}\.(service|socket|timer|mount|path|target|scope|slice)",
    re.ASCII,
)


def _unit_name(value: str) -> str:
    if not _UNIT.fullmatch(value):
        raise ValueError(f"unit {value[:80]!r} is not a unit name such as 'e2i-api.service'")
    return value


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class SystemdCheck(CheckBase):
    """A systemd unit's state, result and restarts, read with ``systemctl show``."""

    kind: Literal["systemd"] = "systemd"
    unit: Annotated[str, AfterValidator(_unit_name)]
    restart_window: Duration = 600.0
    max_restarts: int = Field(default=3, ge=1, le=10_000, kw_only=True)


def _absolute_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    for path in paths:
        if not path.startswith("/") or "\x00" in path:
            raise ValueError(f"disk path {path[:80]!r} must be an absolute path")
    return paths


def _no_milder_than_degraded(value: float, info: ValidationInfo) -> float:
    # Fields validate in order, so the degraded threshold (declared first) is in info.data.
    degraded_key = str(info.field_name).replace("unhealthy", "degraded")
    degraded = info.data.get(degraded_key)
    lower_is_worse = degraded_key.endswith("_available")
    if degraded is not None and (value > degraded if lower_is_worse else value < degraded):
        side = "above" if lower_is_worse else "below"
        raise ValueError(f"must not be {side} {degraded_key} ({degraded:g})")
    return value


#: An ``unhealthy_*`` threshold, which must be at least as bad as its ``degraded_*`` one.
_Unhealthy = AfterValidator(_no_milder_than_degraded)
#: A percent, 0 to 100.
_Percent = Annotated[float, Field(ge=0, le=100)]


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class HostCheck(CheckBase):
    """This machine: disk usage of ``disk_paths``, available memory and pressure stalls.

    Usage and availability are shares (0 to 1); pressure is the percent ``some avg60``.
    """

    kind: Literal["host"] = "host"
    disk_paths: Annotated[tuple[str, ...], AfterValidator(_absolute_paths)] = ("/",)
    degraded_disk_usage: Share = 0.85
    # Validated even when left out, so that a raised degraded threshold is checked against it.
    unhealthy_disk_usage: Annotated[Share, _Unhealthy] = Field(
        0.95, validate_default=True, kw_only=True
    )
    degraded_memory_available: Share = 0.15
    unhealthy_memory_available: Annotated[Share, _Unhealthy] = Field(
        0.05, validate_default=True, kw_only=True
    )
    degraded_pressure: _Percent = 20.0
    unhealthy_pressure: Annotated[_Percent, _Unhealthy] = Field(
        50.0, validate_default=True, kw_only=True
    )


# --- heartbeat -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, config=_CHECK)
class HeartbeatCheck(CheckBase):
    """A job that reports to healthd (``POST /ping/NAME`` on ``push_address``) every
    ``period``, at most ``grace`` late, and runs no longer than ``max_runtime``.

    Checked every second by default, so that a ping changes the verdict at once; a verdict
    is taken as it is (``failure_threshold`` and ``recovery_threshold`` 1, no flapping),
    because ``grace`` already is the tolerance.
    """

    kind: Literal["heartbeat"] = "heartbeat"
    interval: Duration | None = 1.0
    failure_threshold: int = Field(default=1, ge=1, kw_only=True)
    recovery_threshold: int = Field(default=1, ge=1, kw_only=True)
    flap_window: int = Field(default=0, ge=0, le=1000, kw_only=True)
    period: Period
    grace: Period = 60.0
    max_runtime: Period | None = None
    #: Pings must carry ``Authorization: Bearer TOKEN`` when set.
    token: PrintableSecret | None = None


#: Every check kind; see the module's docstring for what else a new kind needs.
CheckConfig = Annotated[
    HttpCheck
    | TcpCheck
    | PostgresCheck
    | RedisCheck
    | FalkorDbCheck
    | ApiCheck
    | MlflowCheck
    | BentomlCheck
    | OpikCheck
    | SupabaseCheck
    | SystemdCheck
    | HostCheck
    | HeartbeatCheck,
    Field(discriminator="kind"),
]

#: The ``kind`` values the union accepts, read from the models themselves.
KINDS = frozenset(
    model.__pydantic_fields__["kind"].default for model in get_args(get_args(CheckConfig)[0])
)
