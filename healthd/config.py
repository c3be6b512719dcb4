"""The configuration contract: a TOML file, overridden by ``HEALTHD_*`` environment variables.

One pydantic model per check kind, joined in a union discriminated on ``kind``. Every model
forbids unknown keys and carries its defaults, so a config either loads whole and typed, or
fails with errors that name the file, the key and the line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from healthd import shard as shard_module
from healthd.maintenance import Window, parse_weekly
from healthd.secrets import (
    Redactor,
    SecretTemplated,
    Templated,
    UnreadableFile,
    collect_secrets,
    read_capped,
)

DEFAULT_CONFIG_PATH = Path("/etc/healthd/healthd.toml")
#: A config file larger than this is refused rather than read (``/dev/zero`` would never end).
MAX_CONFIG_BYTES = 16 * 1024 * 1024

# ASCII digits only: ``\d`` and ``float()`` also take Arabic-Indic or full-width digits.
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: Every duration lies between these bounds: finite, and small enough for any clock arithmetic.
MIN_DURATION_SECONDS = 0.001
MAX_DURATION_SECONDS = 86_400.0
#: A check interval shorter than this would burn a core; enforced by ``load`` (see there).
MIN_INTERVAL_SECONDS = 0.1


def parse_duration(value: Any, *, max_seconds: float = MAX_DURATION_SECONDS) -> float:
    """Seconds from ``"500ms"``, ``"15s"``, ``"2m"``, ``"1h"`` or a plain number of seconds.

    The result is finite and between 1 ms and ``max_seconds`` (1 day unless said otherwise).
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '15s'")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"bad duration {value!r}: use '500ms', '15s', '2m', '1h' or seconds")
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} must be a finite number")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be greater than zero")
    if seconds < MIN_DURATION_SECONDS or seconds > max_seconds:
        raise ValueError(f"duration {value!r} must be between 1ms and {max_seconds / 3600:g}h")
    return seconds


#: A duration in seconds: finite, between 1 ms and 1 day.
Duration = Annotated[float, BeforeValidator(parse_duration)]
#: How long kept data lives: finite, between 1 ms and 10 years.
Retention = Annotated[
    float, BeforeValidator(lambda v: parse_duration(v, max_seconds=10 * 365 * 86400.0))
]


def _strict_bool(value: Any) -> bool:
    # pydantic would take "yes", "on" or 1 for true; a TOML file says true or false. An
    # environment override is text, so it may say "true"/"false" or "1"/"0".
    if isinstance(value, bool):
        return value
    if isinstance(value, _EnvText) and value.strip().lower() in _ENV_BOOLS:
        return _ENV_BOOLS[value.strip().lower()]
    raise ValueError(f"{value!r} is not a boolean: write true or false, without quotes")


_ENV_BOOLS = {"true": True, "false": False, "1": True, "0": False}
#: A boolean written as TOML ``true``/``false`` (or ``true``/``false``/``1``/``0`` in a variable).
Flag = Annotated[bool, BeforeValidator(_strict_bool)]


class _EnvText(str):
    """A string that came from a ``HEALTHD_*`` variable, where ``"true"`` is how a bool reads."""

    __slots__ = ()


_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_BRACKETED = re.compile(r"\[([^\[\]]*)\](?::(.*))?", re.S)


def parse_address(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into its parts, checking the port's range.

    An IPv6 address must be in brackets, so that its colons cannot be taken for the port's.
    """
    if "\x00" in value:
        raise ValueError("address contains a NUL byte")
    if value.startswith("["):
        if not (m := _BRACKETED.fullmatch(value)):
            raise ValueError(f"address {value!r} must be [v6-address]:port")
        host, port_text = m.group(1), m.group(2)
        if port_text is None:
            if default_port is None:
                raise ValueError(f"address {value!r} must be [v6-address]:port")
            port_text = str(default_port)
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError(f"address {value!r} must be host:port")
            host, port_text = value, str(default_port)
        if ":" in host:
            raise ValueError(f"address {value!r}: write an IPv6 address in brackets, [::1]:port")
        if "[" in host or "]" in host:
            raise ValueError(f"address {value!r} has a stray bracket")
    if not host:
        raise ValueError(f"address {value!r} has no host")
    _check_host_name(host, f"address {value!r}")
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"address {value!r} has no valid port (1-65535)")
    return host, int(port_text)


def _check_host_name(host: str, where: str) -> None:
    # A name a resolver cannot even encode (a label over 63 bytes, an empty label) would fail
    # inside every probe; an IPv6 literal has colons and no labels to check.
    if ":" in host:
        return
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(f"{where}: host {host[:80]!r} is not a valid host name") from None


def bind_address(value: str) -> tuple[socket.AddressFamily, str, int]:
    """Where a listener for ``host:port`` binds: the address family, a numeric host, the port.

    ``[::1]:9469`` gives ``(AF_INET6, "::1", 9469)``. Raises ``ValueError`` when the host does
    not resolve, or resolves only to addresses that are not this machine's.
    """
    host, port = parse_address(value)
    try:
        found = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"host {host!r} does not resolve: {reason}") from None
    problem = "no IPv4 or IPv6 address"
    for family, _, _, _, sockaddr in found:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        numeric = str(sockaddr[0])
        # Port 0 proves the address is this machine's without touching the real port, which
        # may be held by a running healthd (validate) or be free only later (a restart).
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((numeric, 0))
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                problem = f"{numeric} is not an address of this machine"
                continue
            # Anything else (no permission, no memory) is not the address's fault.
        return socket.AddressFamily(family), numeric, port
    raise ValueError(f"host {host!r} cannot be bound: {problem}")


def _readable_ca_file(path: Path | None) -> Path | None:
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError(f"CA file {str(path)!r} is not readable")
    return path


#: A CA bundle to trust instead of the system store; it must be readable at load time.
CaFile = Annotated[Path | None, AfterValidator(_readable_ca_file)]


def _check_address(value: str) -> str:
    parse_address(value)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckBase(_Strict):
    """Settings every check kind shares. ``None`` means: take the ``[daemon]`` default."""

    kind: str
    critical: Flag = False
    interval: Duration | None = None
    timeout: Duration | None = None
    degraded_latency: Duration | None = None
    failure_threshold: int = Field(default=3, ge=1)
    recovery_threshold: int = Field(default=2, ge=1)
    #: Flapping: unhealthy once ``flap_threshold`` of the last ``flap_window`` checks failed.
    flap_window: int = Field(default=10, ge=0, le=1000)
    flap_threshold: float = Field(default=0.5, gt=0, le=1)
    depends_on: tuple[str, ...] = ()
    #: Components whose reasons are appended to this one's while it is not healthy.
    evidence: tuple[str, ...] = ()
    description: str = ""
    #: The availability objective (share of good checks), exported for the SLO burn-rate rules.
    slo: float | None = Field(default=None, gt=0, lt=1)

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

#: Header names whose values are credentials: scrubbed from output, masked by ``config show``.
_CREDENTIAL_HEADER = re.compile(r"auth|cookie|token|secret|key|passw|session|signature", re.I)


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError("equals takes a string, a finite number or a boolean")


class Condition(_Strict):
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


class HttpCheck(CheckBase):
    """An HTTP(S) request whose status, latency and body decide the verdict."""

    kind: Literal["http"] = "http"
    url: Templated
    method: Literal["GET", "HEAD", "POST", "PUT", "OPTIONS"] = "GET"
    headers: dict[str, Templated] = Field(default_factory=dict)
    body: Templated | None = None
    expected_status: StatusRanges = ((200, 399),)
    conditions: tuple[Condition, ...] = ()
    tls_verify: Flag = True
    ca_file: CaFile = None
    follow_redirects: Flag = True
    max_redirects: int = Field(default=5, ge=0, le=30)
    max_body_bytes: int = Field(default=1 << 20, ge=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: Templated) -> Templated:
        value = url.reveal()
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) < 1:
            raise ValueError(f"url {str(url)!r} must start with http:// or https://")
        # A bad port or host would otherwise surface as a crash inside the probe, every run.
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError as exc:
            raise ValueError(f"url {str(url)!r} is not valid: {exc}") from None
        if not parts.hostname:
            raise ValueError(f"url {str(url)!r} has no host")
        _check_host_name(parts.hostname, f"url {str(url)!r}")
        return url

    @field_validator("headers")
    @classmethod
    def _header_values(cls, headers: dict[str, Templated]) -> dict[str, Templated]:
        # HTTP only carries printable ASCII; the error names the header, never its value.
        for name, value in headers.items():
            if not re.fullmatch(r"[!-~]+", name) or ":" in name:
                raise ValueError(f"header name {name!r} is not a valid HTTP token")
            if not re.fullmatch(r"[\t -~]*", value.reveal()):
                raise ValueError(
                    f"header {name!r}: value must be printable ASCII without line breaks"
                )
        # A credential header is a secret whole, even when written literally in the file.
        return {
            name: value.as_secret() if _CREDENTIAL_HEADER.search(name) else value
            for name, value in headers.items()
        }


# --- tcp ----------------------------------------------------------------------------------


class TcpCheck(CheckBase):
    """A TCP connect (optionally a TLS handshake) to ``address``."""

    kind: Literal["tcp"] = "tcp"
    address: str
    tls: Flag = False
    tls_verify: Flag = True
    ca_file: CaFile = None
    server_name: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_address(value)


# --- datastores ---------------------------------------------------------------------------

#: A share of a capacity, such as 0.8 of the usable connection slots.
Ratio = Annotated[float, Field(gt=0, le=1)]


class PostgresCheck(CheckBase):
    """A fresh PostgreSQL connection: ``SELECT 1``, then role, saturation, lag and transactions.

    ``dsn`` is a libpq URL or ``key=value`` string. The password may sit inside it as a
    ``${env:...}``/``${file:...}`` reference, or in ``password``, which needs no URL escaping.
    """

    kind: Literal["postgres"] = "postgres"
    dsn: Templated
    password: SecretTemplated | None = None
    expect_role: Literal["primary", "standby", "any"] = "primary"
    degraded_saturation: Ratio = 0.8
    degraded_replay_lag: Duration | None = 30.0
    degraded_transaction_age: Duration | None = 300.0

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, dsn: Templated) -> Templated:
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
            raise ValueError(
                f"dsn {str(dsn)!r} is not valid: {reason.replace(value, '…')}"
            ) from None
        for port in str(params.get("port") or "").split(","):
            if port and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
                raise ValueError(f"dsn {str(dsn)!r} has no valid port (1-65535)")
        return dsn


class RedisCheckBase(CheckBase):
    """Settings shared by ``redis`` and the kinds built on it: ``PING``, then ``INFO``.

    ``url`` is ``redis://``, ``rediss://`` (TLS) or ``unix://``. The password may sit inside
    it as a reference, or in ``password``, which needs no URL escaping.
    """

    url: Templated
    password: SecretTemplated | None = None
    username: str | None = None
    expect_role: Literal["master", "replica", "any"] = "master"
    degraded_memory: Ratio = 0.9
    degraded_clients: Ratio = 0.8
    unhealthy_master_link_down: Duration = 60.0
    tls_verify: Flag = True
    ca_file: CaFile = None

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: Templated) -> Templated:
        if not url.reveal().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url {str(url)!r} must start with redis://, rediss:// or unix://")
        from redis.connection import parse_url

        try:
            parse_url(url.reveal())  # type: ignore[no-untyped-call]
        except ValueError as exc:
            # redis-py's messages name the part at fault, never the URL.
            raise ValueError(f"url {str(url)!r} is not valid: {exc}") from None
        return url


class RedisCheck(RedisCheckBase):
    """A Redis server: reachable, in the expected role, persisting, and not out of room."""

    kind: Literal["redis"] = "redis"


class FalkorDbCheck(RedisCheckBase):
    """Everything a ``redis`` check does, plus proof that the graph module answers queries.

    ``graph`` is a dedicated probe graph, created (idempotently) on a master when missing;
    ``query`` is run on it read-only. A queue of waiting queries that has grown to at least
    ``degraded_waiting_queries`` since the previous probe is degraded.
    """

    kind: Literal["falkordb"] = "falkordb"
    graph: str = Field(default="healthd_probe", min_length=1)
    query: str = "RETURN 1"
    degraded_waiting_queries: int = Field(default=5, ge=1)


# --- service presets ----------------------------------------------------------------------


def _request_path(value: str) -> str:
    # A path is appended to the base URL as is: no spaces, fragments or line breaks.
    if not re.fullmatch(r"/[!-~]*", value) or "#" in value:
        raise ValueError(f"path {value!r} must start with '/' and be printable ASCII without '#'")
    return value


#: A request path, optionally with a query, appended to a service's base URL.
RequestPath = Annotated[str, AfterValidator(_request_path)]
#: A ``Host`` header: a name or an address, with an optional port.
_HOST_HEADER = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d+)?"


class ServiceCheckBase(CheckBase):
    """Settings every service preset shares: the service's base URL and how to reach it.

    ``url`` is the base (scheme, host, port and an optional prefix); each preset appends its
    documented paths, every one of which can be overridden. ``headers`` go with every request,
    for credentials that a proxy in front of the service may want.
    """

    url: Templated
    headers: dict[str, Templated] = Field(default_factory=dict)
    tls_verify: Flag = True
    ca_file: CaFile = None
    max_body_bytes: int = Field(default=256 * 1024, ge=0)

    @field_validator("url")
    @classmethod
    def _base_url(cls, url: Templated) -> Templated:
        return HttpCheck._http_url(url)

    @field_validator("headers")
    @classmethod
    def _service_headers(cls, headers: dict[str, Templated]) -> dict[str, Templated]:
        return HttpCheck._header_values(headers)


class ApiCheck(ServiceCheckBase):
    """The platform's FastAPI service: ``/health`` for liveness, then its own health report,
    whose ``agents_available`` must reach ``expected_agents``."""

    kind: Literal["api"] = "api"
    liveness_path: RequestPath = "/health"
    health_path: RequestPath = "/api/v1/health"
    expected_agents: int = Field(default=11, ge=0)


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
    host: str | None = None
    degraded_search_latency: Duration | None = 2.0

    @field_validator("host")
    @classmethod
    def _host_header(cls, host: str | None) -> str | None:
        if host is not None and not re.fullmatch(_HOST_HEADER, host):
            raise ValueError(f"host {host!r} must be a host name or address, optionally :port")
        return host

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> MlflowCheck:
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both 'username' and 'password'")
        return self


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
    min_requests: int = Field(default=20, ge=1)


class OpikCheck(ServiceCheckBase):
    """Opik: the backend at ``url`` (``:8080``) and, when ``ui_url`` is set, the UI and the
    backend as the UI proxies it (``:5173``)."""

    kind: Literal["opik"] = "opik"
    ui_url: Templated | None = None
    ping_path: RequestPath = "/is-alive/ping"
    version_path: RequestPath = "/is-alive/ver"
    health_check_path: RequestPath = "/health-check?name=all"
    ui_path: RequestPath = "/"
    ui_ping_path: RequestPath = "/api/is-alive/ping"

    @field_validator("ui_url")
    @classmethod
    def _ui_url(cls, url: Templated | None) -> Templated | None:
        return None if url is None else HttpCheck._http_url(url)


class SupabaseCheck(ServiceCheckBase):
    """Supabase through its Kong gateway: GoTrue's health and PostgREST, optionally Storage and
    one table read.

    ``api_key`` goes in the ``apikey`` header, and also as ``Authorization: Bearer`` when it is
    a legacy JWT key (``legacy_key``; by default, when the key looks like a JWT).
    """

    kind: Literal["supabase"] = "supabase"
    api_key: SecretTemplated
    legacy_key: Flag | None = None
    auth_path: RequestPath = "/auth/v1/health"
    rest_path: RequestPath = "/rest/v1/"
    storage: Flag = False
    storage_path: RequestPath = "/storage/v1/status"
    table: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    select: str = Field(default="*", pattern=r"^[A-Za-z0-9_*,]+$")

    @field_validator("api_key")
    @classmethod
    def _printable_key(cls, key: Templated) -> Templated:
        if not re.fullmatch(r"[!-~]+", key.reveal()):
            raise ValueError("api_key must be printable ASCII without spaces")
        return key


# --- the unit and the host ----------------------------------------------------------------

#: A unit name as systemd spells it: no path, no spaces, a known suffix.
_UNIT = re.compile(
    r"[A-Za-z0-9:_.\\@-]{1,250}\.(service|socket|timer|mount|path|target|scope|slice)",
    re.ASCII,
)


class SystemdCheck(CheckBase):
    """A systemd unit's state, result and restarts, read with ``systemctl show``."""

    kind: Literal["systemd"] = "systemd"
    unit: str
    restart_window: Duration = 600.0
    max_restarts: int = Field(default=3, ge=1, le=10_000)

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        if not _UNIT.fullmatch(value):
            raise ValueError(f"unit {value[:80]!r} is not a unit name such as 'e2i-api.service'")
        return value


#: A share between 0 and 1, both included (0 disables a memory threshold, 1 a disk one).
Share = Annotated[float, Field(ge=0, le=1)]


class HostCheck(CheckBase):
    """This machine: disk usage of ``disk_paths``, available memory and pressure stalls.

    Usage and availability are shares (0 to 1); pressure is the percent ``some avg60``.
    """

    kind: Literal["host"] = "host"
    disk_paths: tuple[str, ...] = ("/",)
    degraded_disk_usage: Share = 0.85
    # Validated even when left out, so that a raised degraded threshold is checked against it.
    unhealthy_disk_usage: Share = Field(default=0.95, validate_default=True)
    degraded_memory_available: Share = 0.15
    unhealthy_memory_available: Share = Field(default=0.05, validate_default=True)
    degraded_pressure: float = Field(default=20.0, ge=0, le=100)
    unhealthy_pressure: float = Field(default=50.0, ge=0, le=100, validate_default=True)

    @field_validator("disk_paths")
    @classmethod
    def _paths(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if not path.startswith("/") or "\x00" in path:
                raise ValueError(f"disk path {path[:80]!r} must be an absolute path")
        return paths

    @field_validator("unhealthy_disk_usage", "unhealthy_pressure")
    @classmethod
    def _above_degraded(cls, value: float, info: ValidationInfo) -> float:
        degraded_key = info.field_name.replace("unhealthy", "degraded")  # type: ignore[union-attr]
        degraded = info.data.get(degraded_key)
        if degraded is not None and value < degraded:
            raise ValueError(f"must not be below {degraded_key} ({degraded:g})")
        return value

    @field_validator("unhealthy_memory_available")
    @classmethod
    def _below_degraded(cls, value: float, info: ValidationInfo) -> float:
        degraded = info.data.get("degraded_memory_available")
        if degraded is not None and value > degraded:
            raise ValueError(f"must not be above degraded_memory_available ({degraded:g})")
        return value


# --- heartbeat -----------------------------------------------------------------------------

#: How often a job runs: up to a month, for a monthly cron job.
Period = Annotated[float, BeforeValidator(lambda v: parse_duration(v, max_seconds=31 * 86400.0))]


class HeartbeatCheck(CheckBase):
    """A job that reports to healthd (``POST /ping/NAME`` on ``push_address``) every
    ``period``, at most ``grace`` late, and runs no longer than ``max_runtime``.

    Checked every second by default, so that a ping changes the verdict at once; a verdict
    is taken as it is (``failure_threshold`` and ``recovery_threshold`` 1, no flapping),
    because ``grace`` already is the tolerance.
    """

    kind: Literal["heartbeat"] = "heartbeat"
    interval: Duration | None = 1.0
    failure_threshold: int = Field(default=1, ge=1)
    recovery_threshold: int = Field(default=1, ge=1)
    flap_window: int = Field(default=0, ge=0, le=1000)
    period: Period
    grace: Period = 60.0
    max_runtime: Period | None = None
    #: Pings must carry ``Authorization: Bearer TOKEN`` when set.
    token: SecretTemplated | None = None

    @field_validator("token")
    @classmethod
    def _printable_token(cls, token: SecretTemplated | None) -> SecretTemplated | None:
        if token is not None and not re.fullmatch(r"[!-~]+", token.reveal()):
            raise ValueError("token must be printable ASCII without spaces")
        return token


#: Every check kind. A new kind needs a model here, a row in ``probes.PROBES`` (a test holds
#: the two to the same set), and its section in docs/probes.md.
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


# --- daemon and the whole file ------------------------------------------------------------

#: How much the status file shows (``status_details``).
DetailLevel = Literal["full", "summary"]


class DaemonConfig(_Strict):
    """The ``[daemon]`` table: where healthd exports, and defaults for every component."""

    metrics_address: str = "127.0.0.1:9469"
    #: Where jobs ping their heartbeats; listened on only when a heartbeat is configured.
    push_address: str = "127.0.0.1:9470"
    status_file: Path = Path("/var/lib/healthd/status.json")
    #: The Unix socket ``healthd maintenance`` talks to (mode 0660; never a network port).
    control_socket: Path = Path("/run/healthd/control.sock")
    status_file_refresh: Duration = 5.0
    interval: Duration = 15.0
    timeout: Duration = 5.0
    #: ``None``: sized from the checks (``scheduler.concurrency_limit``).
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000)
    #: ``None``: 1 ms per check (``scheduler.startup_spread``).
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
    history_file: Path | None = None
    history_retention: Retention = 90 * 86400.0
    #: ``"i/N"``: check only the components that rendezvous hashing gives shard i of N
    #: (``healthd.shard``); ``None`` checks them all.
    shard: str | None = None

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is None:
            return None
        index, shards = shard_module.parse(value)
        return f"{index}/{shards}"

    def shard_numbers(self) -> tuple[int, int]:
        """``(i, N)`` of ``shard``; ``(1, 1)`` when the instance checks everything."""
        return shard_module.parse(self.shard) if self.shard is not None else (1, 1)

    @field_validator("metrics_address", "push_address")
    @classmethod
    def _address(cls, value: str) -> str:
        # Resolved now, so that a name that does not resolve is a config error (exit 78), not
        # a failed start that systemd would retry forever.
        bind_address(value)
        return value

    @field_validator("status_file", "history_file", "control_socket", mode="before")
    @classmethod
    def _file(cls, value: Any, info: ValidationInfo) -> Any:
        key = info.field_name
        if isinstance(value, str | os.PathLike):
            value = os.fspath(value)
            if not value:
                raise ValueError(f"{key} must not be empty")
            if "\x00" in value:
                raise ValueError(f"{key} contains a NUL byte")
            if not value.startswith("/"):
                raise ValueError(f"{key} {value!r} must be an absolute path")
            path = Path(value)
            if len(os.fsencode(path.name)) > 255 or len(os.fsencode(value)) > 4095:
                raise ValueError(f"{key} is longer than a path may be")
            if value.endswith("/") or path.name in ("", ".", "..") or _is_directory(path):
                raise ValueError(f"{key} {value!r} must name a file, not a directory")
        return value


class MaintenanceConfig(_Strict):
    """A ``[[maintenance]]`` table: planned work on ``components``, once (``start``/``end``,
    RFC 3339 with an offset) or every week (``weekly = "Sun 02:00-03:00"`` in ``timezone``)."""

    components: tuple[str, ...] = Field(min_length=1)
    reason: str = Field(min_length=1, max_length=500)
    timezone: str = "UTC"
    start: datetime | None = None
    end: datetime | None = None
    weekly: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use a zoneinfo name") from None
        return value

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError(f"{info.field_name} needs a UTC offset (RFC 3339), such as 'Z'")
        if info.field_name == "end" and value is not None:
            start = info.data.get("start")
            if start is not None and value <= start:
                raise ValueError("end must be after start")
        return value

    @field_validator("weekly")
    @classmethod
    def _weekly(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_weekly(value, info.data.get("timezone", "UTC"))
        return value

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
            return Window(
                self.components,
                self.reason,
                "config",
                weekly=parse_weekly(self.weekly, self.timezone),
            )
        assert self.start is not None
        assert self.end is not None
        return Window(
            self.components, self.reason, "config", self.start.timestamp(), self.end.timestamp()
        )


def _is_directory(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        # Unreadable on the way there: the first write will say so, counted and logged.
        return False


class Config(BaseSettings):
    """The whole configuration. ``HEALTHD_DAEMON__INTERVAL=10s`` overrides ``[daemon] interval``."""

    model_config = SettingsConfigDict(
        env_prefix="HEALTHD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    components: dict[str, CheckConfig] = Field(default_factory=dict)
    maintenance: list[MaintenanceConfig] = Field(default_factory=list)
    _local: dict[str, CheckBase] = PrivateAttr(default_factory=dict)

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

    @field_validator("components")
    @classmethod
    def _names(cls, components: dict[str, CheckBase]) -> dict[str, CheckBase]:
        for name in components:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
                raise ValueError(f"component name {name!r}: use letters, digits, '_', '-', '.'")
        return components

    @model_validator(mode="after")
    def _inherit_and_cross_check(self) -> Config:
        resolved: dict[str, CheckBase] = {}
        for name, check in self.components.items():
            interval = check.interval or self.daemon.interval
            timeout = check.timeout or min(self.daemon.timeout, interval)
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
            resolved[name] = check.model_copy(update={"interval": interval, "timeout": timeout})
        _reject_cycles(resolved)
        for index, planned in enumerate(self.maintenance):
            for name in planned.components:
                if name not in self.components:
                    raise ValueError(f"maintenance.{index}.components: no component named {name!r}")
        object.__setattr__(self, "components", resolved)
        # A dependency on another shard's component stays valid: it is not judged here, so
        # it counts as healthy and impact is computed from this shard's components only.
        index, shards = self.daemon.shard_numbers()
        self._local = {
            name: check
            for name, check in resolved.items()
            if shards == 1 or shard_module.shard_of(name, shards) == index
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
        return _EnvText(value)
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


class ConfigError(Exception):
    """The config cannot be used. ``problems`` are one line each: ``file:line: key: what``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
        redactor = Redactor(_secrets_in_input(data))
        raise ConfigError([redactor.scrub(p) for p in _describe(path, text, exc, data)]) from None
    except SettingsError:
        raise ConfigError(list(_bad_variables(path))) from None
    if problems := list(_policy_problems(path, text, config, data)):
        raise ConfigError(problems)
    return config


def _policy_problems(
    path: Path, text: str, config: Config, data: Mapping[str, Any]
) -> Iterator[str]:
    if not config.components:
        where = _where(path, text, ["components"], data)
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
    where = _where(path, text, loc, data)
    minimum = f"{MIN_INTERVAL_SECONDS * 1000:g}ms"
    return f"{where}: {'.'.join(loc)}: interval {seconds:g}s is shorter than {minimum}"


def _where(path: Path, text: str, loc: list[str], data: Mapping[str, Any]) -> str:
    if (variable := _overriding_variable(loc, data)) is not None:
        # The value came from the environment: a line of the file would mislead.
        return f"{path}: ${variable}"
    if line := _find_line(text, loc):
        return f"{path}:{line}"
    return str(path)


def _bad_variables(path: Path) -> Iterator[str]:
    """One line per ``HEALTHD_*`` variable that pydantic-settings cannot decode (bad JSON)."""
    source = EnvSettingsSource(Config, env_prefix="HEALTHD_", env_nested_delimiter="__")
    names = {name.lower(): name for name in os.environ}
    found = False
    for key, value in sorted(source.env_vars.items()):
        if not key.startswith("healthd_") or key == "healthd_config":
            continue
        source.env_vars = {key: value}
        try:
            source()
        except SettingsError as exc:
            found = True
            cause = exc.__cause__
            detail = cause.msg if isinstance(cause, json.JSONDecodeError) else "cannot decode"
            dotted = ".".join(key.removeprefix("healthd_").split("__"))
            yield (
                f"{path}: ${names.get(key, key.upper())}: {dotted}: this key takes a JSON "
                f"value here, and the variable is not valid JSON ({detail})"
            )
    if not found:
        yield f"{path}: the HEALTHD_* environment variables cannot be decoded"


#: Keys whose values may carry a secret (a URL's password), and keys that are secrets whole.
_SECRET_BEARING = frozenset({"url", "ui_url", "dsn", "body", "username"})
_SECRET_WHOLE = frozenset({"password", "api_key", "token"})


def _secrets_in_input(data: Mapping[str, Any]) -> set[str]:
    """Best-effort secrets of a config that failed validation, so its errors cannot show them."""
    values: list[Templated] = []
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(("headers.*" if key == "headers" else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((key, v) for v in item)
        elif isinstance(item, str):
            values.extend(_secret_value(key, item))
    for name, value in os.environ.items():
        parts = name.lower().split("__")
        if parts[0] == "healthd_components" and len(parts) > 2:
            key = "headers.*" if parts[-2] == "headers" else parts[-1]
            values.extend(_secret_value(key, value))
    return collect_secrets(values)


def _secret_value(key: str, text: str) -> list[Templated]:
    whole = key in _SECRET_WHOLE or key == "headers.*"
    if not whole and key not in _SECRET_BEARING:
        return []
    try:
        return [SecretTemplated(text) if whole else Templated(text)]
    except ValueError:
        return []


#: A step pydantic adds to an error's path for a union member ("str", "is-instance[X]"): the
#: file has no such key, and one bad value must make one line, not one per member tried.
_UNION_MEMBER = re.compile(r"(str|int|float|bool|none|[a-z-]+\[.*\])", re.S)


def _describe(
    path: Path, text: str, error: ValidationError, data: Mapping[str, Any]
) -> Iterator[str]:
    said: dict[tuple[str, ...], list[str]] = {}
    for item in error.errors(include_url=False):
        loc = [str(part) for part in item["loc"]]
        # A discriminated union puts the kind's tag into the path; the file has no such key.
        if len(loc) >= 3 and loc[0] == "components":
            loc = [p for i, p in enumerate(loc) if not (i == 2 and p in _KINDS)]
        loc = [p for p in loc if not _UNION_MEMBER.fullmatch(p)]
        message = item["msg"].removeprefix("Value error, ")
        # Cross-field checks run on the whole model; their message starts with the key at fault.
        if not loc and (keyed := re.match(r"^([\w.-]+): (.*)$", message, re.S)):
            loc, message = keyed.group(1).split("."), keyed.group(2)
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "union_tag_invalid":
            tag = (item.get("ctx") or {}).get("tag", item["input"])
            message = f"unknown kind {tag!r}; known kinds: {', '.join(sorted(_KINDS))}"
        elif item["type"] == "union_tag_not_found":
            message = f"missing 'kind'; known kinds: {', '.join(sorted(_KINDS))}"
        elif item["type"] == "missing":
            message = "required key is missing"
        messages = said.setdefault(tuple(loc), [])
        if message not in messages:
            messages.append(message)
    for loc_key, messages in said.items():
        loc = list(loc_key)
        key = ".".join(loc) or "(top level)"
        yield f"{_where(path, text, loc, data)}: {key}: {'; or '.join(messages)}"


def _overriding_variable(loc: list[str], data: Mapping[str, Any]) -> str | None:
    """The ``HEALTHD_*`` variable that set the key at ``loc`` (or a table around it), or that
    created a table on the way to ``loc`` which the file does not have; ``None`` otherwise."""
    if not loc:
        return None
    wanted = [part.lower() for part in loc]
    # loc[:known] is in the file; loc[known] (if any) is not, so someone else made it.
    known = _depth_in_file(data, loc)
    for name in os.environ:
        upper = name.upper()
        if not upper.startswith("HEALTHD_") or upper == "HEALTHD_CONFIG":
            continue
        path = name[len("HEALTHD_") :].lower().split("__")
        if path == wanted[: len(path)]:
            return name
        # Variable names are case-insensitive, so HEALTHD_COMPONENTS__API__X makes a component
        # "api" even when the file's is "Api"; that new table then fails on its own.
        if known < len(wanted) and path[: known + 1] == wanted[: known + 1]:
            return name
    return None


def _depth_in_file(data: Mapping[str, Any], loc: list[str]) -> int:
    node: Any = data
    for depth, part in enumerate(loc):
        if not isinstance(node, Mapping) or part not in node:
            return depth
        node = node[part]
    return len(loc)


#: The ``kind`` values the union accepts, read from the models themselves.
_KINDS = frozenset(
    model.model_fields["kind"].default for model in get_args(get_args(CheckConfig)[0])
)


def _find_line(text: str, loc: list[str]) -> int | None:
    """The line of the TOML key at ``loc``, found by reading table headers and key names.

    ``tomllib`` keeps no positions, and a best effort here is worth more than no line at all.
    """
    if not loc:
        return None
    table: list[str] = []
    best: int | None = None
    best_depth = 0
    header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assignment = re.compile(r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.\s-])+?)\s*=")
    # ``[[a.b]]`` opens element 0, 1, ... of the array ``a.b``; pydantic's path counts the same.
    arrays: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if m := header.match(line):
            table = _split_key(m.group(2))
            if m.group(1) == "[[":
                arrays[tuple(table)] = index = arrays.get(tuple(table), -1) + 1
                table = [*table, str(index)]
            depth = _common_prefix(table, loc)
            if depth == len(table) and depth > best_depth:
                best, best_depth = number, depth
            continue
        if m := assignment.match(line):
            key = table + _split_key(m.group(1))
            depth = _common_prefix(key, loc)
            if depth == len(key) and depth > best_depth:
                best, best_depth = number, depth
    return best


_KEY_PART = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:\.|$)""")


def _split_key(text: str) -> list[str]:
    """``components."api.v1".url`` -> ``["components", "api.v1", "url"]``."""
    return [a or b or c for a, b, c in _KEY_PART.findall(text)]


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
