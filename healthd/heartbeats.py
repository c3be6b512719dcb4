"""Job heartbeats: the pings jobs push to healthd, kept, persisted, and received over HTTP.

A job reports on ``[daemon] push_address``: ``POST /ping/NAME`` (done), ``/ping/NAME/start``
and ``/ping/NAME/fail?exit_code=N``. The listener runs in its own thread (``HttpListener``)
and records into a ``PingStore``, which the ``heartbeat`` probe reads on the event loop: the
store's lock is the one handoff between the two. Every accepted ping is written to a small
JSON file beside the status file, so that the last ping survives a restart.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import h11
import httpx
from pydantic import TypeAdapter, ValidationError

from healthd import shard as shard_module
from healthd.config import (
    MAX_CONFIG_BYTES,
    Config,
    ConfigError,
    DaemonConfig,
    HeartbeatCheck,
    parse_address,
)
from healthd.exporters.status_file import write_atomic
from healthd.listener import HttpListener, ListenerLimits, Reply, request_header
from healthd.secrets import UnreadableFile, read_capped

log = logging.getLogger("healthd.heartbeats")

#: A job may POST its output with a ping: read and discarded up to this size, refused above.
MAX_PING_BODY_BYTES = 10 * 1024
#: The pings file beside the status file.
PINGS_FILE_NAME = "heartbeats.json"

Event = Literal["success", "start", "fail"]


@dataclass(frozen=True, slots=True)
class Pings:
    """What one heartbeat's job has reported, as Unix timestamps (``None``: never).

    ``watching_since`` is when healthd first knew the heartbeat: until the first ping, it is
    the start of the first period.
    """

    watching_since: float
    success_at: float | None = None
    start_at: float | None = None
    fail_at: float | None = None
    exit_code: int | None = None


def pings_path(config: Config) -> Path:
    """Where the last pings are kept: ``heartbeats.json`` beside the status file."""
    return config.daemon.status_file.with_name(PINGS_FILE_NAME)


def heartbeat_tokens(config: Config) -> dict[str, str | None]:
    """Every heartbeat's name and its token (revealed), or ``None`` when it takes none."""
    return {
        name: check.token.reveal() if check.token is not None else None
        for name, check in config.checks().items()
        if isinstance(check, HeartbeatCheck)
    }


def heartbeat_shards(config: Config) -> dict[str, str]:
    """The heartbeats another shard checks, each with that shard (``"2/3"``).

    A job that pings this instance for one of them is told where to ping instead (421): a
    ping kept here would never reach the instance that judges it.
    """
    local = config.checks()
    _, shards = config.daemon.shard_numbers()
    return {
        name: f"{shard_module.shard_of(name, shards)}/{shards}"
        for name, check in config.components.items()
        if isinstance(check, HeartbeatCheck) and name not in local
    }


class PingStore:
    """The last pings of every heartbeat, safe to use from any thread.

    :param path: the JSON file that keeps them across restarts; ``None`` keeps nothing.
    :param clock: wall-clock time, in Unix seconds.
    """

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._pings: dict[str, Pings] = {}
        self._lock = threading.Lock()
        # Serialises whole saves, so an older picture can never replace a newer one.
        self._save_lock = threading.Lock()
        self._save_failed = False

    def now(self) -> float:
        """The store's clock."""
        return self._clock()

    def load(self) -> None:
        """Read the file, if there is one. A missing or damaged file starts empty (logged)."""
        if self._path is None:
            return
        try:
            data = json.loads(self._path.read_bytes())
            loaded = {str(name): _pings(entry) for name, entry in data["heartbeats"].items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("cannot read the last pings from %s, starting afresh: %s", self._path, exc)
            return
        with self._lock:
            self._pings.update(loaded)

    def watch(self, names: Iterable[str]) -> None:
        """Keep exactly these heartbeats; one not known before is watched from now on."""
        now = self._clock()
        wanted = set(names)
        with self._lock:
            self._pings = {
                name: self._pings.get(name) or Pings(watching_since=now) for name in wanted
            }

    def get(self, name: str) -> Pings | None:
        """The pings of ``name``, or ``None`` when it is not watched."""
        with self._lock:
            return self._pings.get(name)

    def record(self, name: str, event: Event, exit_code: int | None = None) -> bool:
        """Note a ping now; ``False`` when ``name`` is not watched (nothing changes)."""
        now = self._clock()
        with self._lock:
            pings = self._pings.get(name)
            if pings is None:
                return False
            if event == "success":
                pings = replace(pings, success_at=now)
            elif event == "start":
                pings = replace(pings, start_at=now)
            else:
                pings = replace(pings, fail_at=now, exit_code=exit_code)
            self._pings[name] = pings
        return True

    def save(self) -> None:
        """Write every heartbeat's pings to the file, atomically. Blocks: call it off the
        event loop. A failure is logged (once until a save works again), never raised."""
        if self._path is None:
            return
        with self._save_lock:
            with self._lock:
                data = {name: asdict(pings) for name, pings in self._pings.items()}
            text = json.dumps({"version": 1, "heartbeats": data}, indent=1, sort_keys=True)
            try:
                write_atomic(self._path, text.encode() + b"\n")
            except OSError as exc:
                if not self._save_failed:
                    log.error("cannot save the last pings to %s: %s", self._path, exc)
                self._save_failed = True
            else:
                self._save_failed = False


def _pings(entry: Mapping[str, object]) -> Pings:
    def timestamp(key: str) -> float | None:
        value = entry.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{key} is not finite")
        return float(value)

    watching = timestamp("watching_since")
    if watching is None:
        raise ValueError("watching_since is missing")
    exit_code = entry.get("exit_code")
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
        raise ValueError("exit_code is not an integer")
    return Pings(
        watching, timestamp("success_at"), timestamp("start_at"), timestamp("fail_at"), exit_code
    )


_EVENTS: dict[str, Event] = {"": "success", "start": "start", "fail": "fail"}


class PushServer(HttpListener):
    """The push listener: ``POST /ping/NAME[/start|/fail]`` from jobs, into ``store``.

    Everything that is not a well-formed ping of a known heartbeat with its token gets a 4xx
    and changes nothing: an unknown name 404, a heartbeat another shard checks 421 naming the
    shard, a missing token 401, a wrong one 403, a body over ``MAX_PING_BODY_BYTES`` 413,
    garbage or a bad ``exit_code`` 400, another method 405. Tokens are compared in constant
    time and never logged.

    :param tokens: every heartbeat's name and token (``None``: no token needed).
    :param elsewhere: the heartbeats other shards check, each with its shard (``"2/3"``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        store: PingStore,
        tokens: Mapping[str, str | None],
        elsewhere: Mapping[str, str] | None = None,
        *,
        idle_timeout_seconds: float = 5.0,
    ) -> None:
        limits = ListenerLimits(
            idle_timeout_seconds=idle_timeout_seconds, max_body_bytes=MAX_PING_BODY_BYTES
        )
        super().__init__(host, port, name="push", logger=log, limits=limits)
        self._store = store
        self._routes = (dict(tokens), dict(elsewhere or {}))

    def configure(
        self, tokens: Mapping[str, str | None], elsewhere: Mapping[str, str] | None = None
    ) -> None:
        """Take a new set of heartbeats and tokens (a reload); one reference swap."""
        self._routes = (dict(tokens), dict(elsewhere or {}))

    def persist_soon(self) -> None:
        """Save the store from the listener's thread, off the caller's event loop."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._store.save)
        else:
            threading.Thread(target=self._store.save, name="healthd-push-save").start()

    def _answer(self, request: h11.Request, body: bytes) -> Reply:
        code, text, headers = self._ping(request)
        if code == 200:
            # Blocking, but on the listener's own thread: pings are rare, and a job told "ok"
            # can rely on its ping surviving a restart.
            self._store.save()
        return Reply(code, text.encode() + b"\n", headers=tuple(headers))

    def _ping(self, request: h11.Request) -> tuple[int, str, list[tuple[str, str]]]:
        target = request.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        parts = path.split("/")
        if len(parts) not in (3, 4) or parts[:2] != ["", "ping"] or not parts[2]:
            return 404, "not found: ping /ping/NAME, /ping/NAME/start or /ping/NAME/fail", []
        name, suffix = parts[2], parts[3] if len(parts) == 4 else ""
        event = _EVENTS.get(suffix)
        if event is None:
            return 404, "not found: ping /ping/NAME, /ping/NAME/start or /ping/NAME/fail", []
        if request.method != b"POST":
            return 405, "method not allowed: use POST", [("Allow", "POST")]
        tokens, elsewhere = self._routes
        if name not in tokens:
            if name in elsewhere:
                return 421, f"shard {elsewhere[name]} checks this heartbeat: ping that instance", []
            return 404, "no heartbeat of that name", []
        expected = tokens[name]
        if expected is not None:
            given = request_header(request, b"authorization")
            if not given:
                return 401, "a token is required", [("WWW-Authenticate", "Bearer")]
            scheme, _, token = given.partition(" ")
            wanted = expected.encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), wanted):
                return 403, "wrong token", []
        exit_code = None
        if event == "fail":
            try:
                exit_code = _exit_code(query)
            except ValueError:
                return 400, "exit_code must be an integer", []
        if not self._store.record(name, event, exit_code):
            return 404, "no heartbeat of that name", []
        log.debug("heartbeat %s: %s", name, event)
        return 200, "ok", []


def _exit_code(query: str) -> int | None:
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key == "exit_code":
            if not re.fullmatch(r"-?[0-9]{1,10}", value, re.ASCII):
                raise ValueError(value)
            return int(value)
    return None


# --- the client: ``healthd ping`` ------------------------------------------------------------


class PingNotDelivered(Exception):
    """A ping was refused by healthd, or healthd could not be reached; one line says which."""


def push_url(address: str, name: str, event: Event, exit_code: int | None = None) -> str:
    """The URL a job pings; a wildcard listen address is reached on loopback."""
    host, port = parse_address(address)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    path = {"success": "", "start": "/start", "fail": "/fail"}[event]
    query = f"?exit_code={exit_code}" if event == "fail" and exit_code is not None else ""
    return f"http://{host}:{port}/ping/{name}{path}{query}"


@dataclass(frozen=True, slots=True)
class PingTarget:
    """Where a job's pings go, and the token they carry (revealed; ``None``: none)."""

    address: str
    token: str | None


def ping_target(path: Path, name: str) -> PingTarget:
    """``push_address`` and the token of heartbeat ``name``, read from the config file alone.

    Only those two are resolved: a job's user cannot resolve the service's other secrets
    (``${credential:}`` exists only inside the service). ``HEALTHD_DAEMON__PUSH_ADDRESS``
    overrides the file, as for the daemon. Raises ``ConfigError`` (one line) or ``KeyError``
    when there is no heartbeat of that name.
    """
    try:
        raw = read_capped(path, MAX_CONFIG_BYTES, "config", regular_only=False)
        data = tomllib.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnreadableFile as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.reason}"]) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError([f"{path}: malformed config: {exc}"]) from None
    daemon = data.get("daemon")
    daemon = daemon if isinstance(daemon, dict) else {}
    components = data.get("components")
    entry = components.get(name) if isinstance(components, dict) else None
    if not isinstance(entry, dict) or entry.get("kind") != "heartbeat":
        raise KeyError(name)
    try:
        settings = DaemonConfig.model_validate(
            {"push_address": os.environ.get("HEALTHD_DAEMON__PUSH_ADDRESS")}
            if os.environ.get("HEALTHD_DAEMON__PUSH_ADDRESS")
            else {k: v for k, v in daemon.items() if k == "push_address"}
        )
        check = TypeAdapter(HeartbeatCheck).validate_python(entry)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError([f"{path}: {key}: {first['msg']}"]) from None
    token = check.token.reveal() if check.token is not None else None
    return PingTarget(settings.push_address, token)


def send_ping(
    target: PingTarget,
    name: str,
    event: Event,
    exit_code: int | None = None,
    *,
    timeout_seconds: float = 10.0,
) -> None:
    """Deliver one ping to the running daemon, or raise ``PingNotDelivered``."""
    url = push_url(target.address, name, event, exit_code)
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    try:
        response = httpx.post(url, headers=headers, timeout=timeout_seconds)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise PingNotDelivered(f"cannot reach healthd at {url}: {reason}") from None
    if response.status_code != 200:
        said = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        raise PingNotDelivered(
            f"healthd refused the ping ({response.status_code}{': ' + said if said else ''})"
        )
