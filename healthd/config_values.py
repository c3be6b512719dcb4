"""Value types the config's tables share: durations, booleans, addresses, paths, URLs, headers.

Each is an ``Annotated`` type carrying its own validator, so a model states a field's rules by
naming its type, and a rule two kinds share is one type rather than a method of one of them.
A validator that needs the field's name (for its message) takes ``ValidationInfo``.
"""

from __future__ import annotations

import errno
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

from healthd.secrets import SecretTemplated, Templated

# --- durations ------------------------------------------------------------------------------

# ASCII digits only: ``\d`` and ``float()`` also take Arabic-Indic or full-width digits.
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: Every duration lies between these bounds: finite, and small enough for any clock arithmetic.
MIN_DURATION_SECONDS = 0.001
MAX_DURATION_SECONDS = 86_400.0


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
#: How often a job runs: up to a month, for a monthly cron job.
Period = Annotated[float, BeforeValidator(lambda v: parse_duration(v, max_seconds=31 * 86400.0))]

# --- booleans and shares --------------------------------------------------------------------


class EnvText(str):
    """A string that came from a ``HEALTHD_*`` variable, where ``"true"`` is how a bool reads."""

    __slots__ = ()


_ENV_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _strict_bool(value: Any) -> bool:
    # pydantic would take "yes", "on" or 1 for true; a TOML file says true or false. An
    # environment override is text, so it may say "true"/"false" or "1"/"0".
    if isinstance(value, bool):
        return value
    if isinstance(value, EnvText) and value.strip().lower() in _ENV_BOOLS:
        return _ENV_BOOLS[value.strip().lower()]
    raise ValueError(f"{value!r} is not a boolean: write true or false, without quotes")


#: A boolean written as TOML ``true``/``false`` (or ``true``/``false``/``1``/``0`` in a variable).
Flag = Annotated[bool, BeforeValidator(_strict_bool)]
#: A share of a capacity, such as 0.8 of the usable connection slots.
Ratio = Annotated[float, Field(gt=0, le=1)]
#: A share between 0 and 1, both included (0 disables a memory threshold, 1 a disk one).
Share = Annotated[float, Field(ge=0, le=1)]

# --- addresses --------------------------------------------------------------------------------

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
    if not is_port(port_text):
        raise ValueError(f"address {value!r} has no valid port (1-65535)")
    return host, int(port_text)


def is_port(text: str) -> bool:
    """Whether ``text`` is a TCP port number, 1 to 65535, in ASCII digits."""
    return bool(_PORT.fullmatch(text)) and 0 < int(text) < 65536


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


def same_port(first: str, second: str) -> bool:
    """Whether listeners on two bind addresses would take the same port.

    ``::`` listens on IPv4 too (Linux's default dual stack); ``0.0.0.0`` on every IPv4 address.
    """
    first_family, first_host, first_port = bind_address(first)
    second_family, second_host, second_port = bind_address(second)
    hosts = (first_host, second_host)
    return first_port == second_port and (
        "::" in hosts
        or (first_family == second_family and (first_host == second_host or "0.0.0.0" in hosts))
    )


def _address(value: str) -> str:
    parse_address(value)
    return value


def _bindable(value: str) -> str:
    # Resolved now, so that a name that does not resolve is a config error (exit 78), not
    # a failed start that systemd would retry forever.
    bind_address(value)
    return value


#: ``host:port`` or ``[v6]:port`` to connect to.
Address = Annotated[str, AfterValidator(_address)]
#: ``host:port`` to listen on: it must resolve to an address of this machine.
BindAddress = Annotated[str, AfterValidator(_bindable)]

# --- files ------------------------------------------------------------------------------------


def _readable_ca_file(path: Path | None) -> Path | None:
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError(f"CA file {str(path)!r} is not readable")
    return path


def _absolute_file(value: Any, info: ValidationInfo) -> Any:
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


def _is_directory(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        # Unreadable on the way there: the first write will say so, counted and logged.
        return False


#: A CA bundle to trust instead of the system store; it must be readable at load time.
CaFile = Annotated[Path | None, AfterValidator(_readable_ca_file)]
#: A file healthd writes or listens on: an absolute path that is not a directory.
AbsoluteFile = Annotated[Path, BeforeValidator(_absolute_file)]

# --- HTTP -------------------------------------------------------------------------------------

#: Header names whose values are credentials: scrubbed from output, masked by ``config show``.
_CREDENTIAL_HEADER = re.compile(r"auth|cookie|token|secret|key|passw|session|signature", re.I)


def _http_url(url: Templated) -> Templated:
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


def _header_values(headers: Mapping[str, Templated]) -> Mapping[str, Templated]:
    # HTTP only carries printable ASCII; the error names the header, never its value.
    for name, value in headers.items():
        if not re.fullmatch(r"[!-~]+", name) or ":" in name:
            raise ValueError(f"header name {name!r} is not a valid HTTP token")
        if not re.fullmatch(r"[\t -~]*", value.reveal()):
            raise ValueError(f"header {name!r}: value must be printable ASCII without line breaks")
    # A credential header is a secret whole, even when written literally in the file.
    return {
        name: value.as_secret() if _CREDENTIAL_HEADER.search(name) else value
        for name, value in headers.items()
    }


def _request_path(value: str) -> str:
    # A path is appended to the base URL as is: no spaces, fragments or line breaks.
    if not re.fullmatch(r"/[!-~]*", value) or "#" in value:
        raise ValueError(f"path {value!r} must start with '/' and be printable ASCII without '#'")
    return value


def _printable_secret(value: SecretTemplated, info: ValidationInfo) -> SecretTemplated:
    if not re.fullmatch(r"[!-~]+", value.reveal()):
        raise ValueError(f"{info.field_name} must be printable ASCII without spaces")
    return value


#: An ``http://`` or ``https://`` URL with a host, which may hold secret references.
HttpUrl = Annotated[Templated, AfterValidator(_http_url)]
#: Headers sent with every request; a header named like a credential is a secret whole.
HttpHeaders = Annotated[Mapping[str, Templated], AfterValidator(_header_values)]
#: No headers. Shared, because a check that sends none should not carry an empty dict of its own
#: (10,000 checks, 0.6 MB); the type is read-only, so nothing writes to it.
NO_HEADERS: Mapping[str, Templated] = {}
#: A request path, optionally with a query, appended to a service's base URL.
RequestPath = Annotated[str, AfterValidator(_request_path)]
#: A key or token sent in a header: a secret, printable ASCII without spaces.
PrintableSecret = Annotated[SecretTemplated, AfterValidator(_printable_secret)]
