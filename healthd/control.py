"""The control socket: ad hoc maintenance from ``healthd maintenance``, to the running daemon.

A Unix socket (``[daemon] control_socket``, mode 0660), never a network port. One request per
connection: a JSON object on one line, at most ``MAX_REQUEST_BYTES``; one JSON line answers,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. A bad request gets an error, never
a crash. The windows are kept in ``maintenance.json`` beside the status file, written
atomically, so that they survive a restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream

from healthd.exporters.status_file import iso_timestamp, write_atomic
from healthd.maintenance import Window

log = logging.getLogger("healthd.control")

WINDOWS_FILE_NAME = "maintenance.json"
#: A request longer than this is refused: the socket is for one short command.
MAX_REQUEST_BYTES = 64 * 1024
#: A client that does not finish its request within this long is dropped.
REQUEST_TIMEOUT_SECONDS = 5.0
#: The longest ad hoc window: a forgotten ``start`` must not silence a component for ever.
MAX_WINDOW_SECONDS = 30 * 86400.0
MAX_REASON_CHARS = 500


class ControlError(Exception):
    """A request the daemon refused, or a daemon that could not be reached."""


class AdHocWindows:
    """The windows started from the CLI, one per component, persisted at ``path``."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, Window] = {}

    def load(self) -> None:
        """Read the file, if any; a missing or damaged file starts empty (logged)."""
        if self._path is None:
            return
        try:
            data = json.loads(self._path.read_bytes())
            loaded = {
                str(name): Window(
                    (str(name),), str(entry["reason"]), "cli", float(entry["start"]),
                    float(entry["end"]),
                )
                for name, entry in data["windows"].items()
            }  # fmt: skip
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning(
                "cannot read maintenance windows from %s, starting afresh: %s", self._path, exc
            )
            return
        now = self._clock()
        with self._lock:
            self._windows = {name: w for name, w in loaded.items() if w.end > now}

    def windows(self) -> tuple[Window, ...]:
        """The windows that have not ended."""
        now = self._clock()
        with self._lock:
            return tuple(w for w in self._windows.values() if w.end > now)

    def start(self, names: list[str], seconds: float, reason: str) -> None:
        """Put ``names`` in maintenance for ``seconds`` from now (replacing their windows)."""
        now = self._clock()
        with self._lock:
            for name in names:
                self._windows[name] = Window((name,), reason, "cli", now, now + seconds)
        self.save()

    def end(self, names: list[str]) -> list[str]:
        """End the windows of ``names``; the names that had one."""
        with self._lock:
            ended = [name for name in names if self._windows.pop(name, None) is not None]
        self.save()
        return ended

    def forget(self, keep: Mapping[str, object]) -> None:
        """Drop the windows of components the config no longer has."""
        with self._lock:
            self._windows = {n: w for n, w in self._windows.items() if n in keep}

    def save(self) -> None:
        """Write the windows atomically; a failure is logged, never raised."""
        if self._path is None:
            return
        with self._lock:
            data = {
                name: {"start": w.start, "end": w.end, "reason": w.reason}
                for name, w in self._windows.items()
            }
        text = json.dumps({"version": 1, "windows": data}, indent=1, sort_keys=True)
        try:
            write_atomic(self._path, text.encode() + b"\n", mode=0o640)
        except OSError as exc:
            log.error("cannot save maintenance windows to %s: %s", self._path, exc)


def describe(windows: tuple[Window, ...], now: float) -> list[dict[str, Any]]:
    """Every window that runs now, as ``list`` shows it: one entry per component."""
    rows = []
    for window in windows:
        for begin, finish in window.spans(now):
            if begin <= now < finish:
                for name in window.components:
                    rows.append(
                        {
                            "component": name,
                            "until": None if math.isinf(finish) else iso_timestamp(finish),
                            "reason": window.reason,
                            "source": window.source,
                        }
                    )
    return sorted(rows, key=lambda row: (row["component"], row["source"]))


def answer(
    line: bytes,
    adhoc: AdHocWindows,
    components: Mapping[str, object],
    all_windows: Callable[[], tuple[Window, ...]],
    now: float,
) -> dict[str, Any]:
    """The answer to one request line; bad requests get ``{"ok": false, "error": ...}``."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {"ok": False, "error": "the request is not JSON"}
    if not isinstance(request, dict):
        return {"ok": False, "error": "the request must be a JSON object"}
    op = request.get("op")
    if op == "list":
        return {"ok": True, "maintenance": describe(all_windows(), now)}
    if op not in ("start", "end"):
        return {"ok": False, "error": "op must be 'start', 'end' or 'list'"}
    names = request.get("components")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return {"ok": False, "error": "components must be a non-empty list of names"}
    if unknown := [n for n in names if n not in components]:
        return {"ok": False, "error": f"no component named {', '.join(map(repr, unknown))}"}
    if op == "end":
        return {"ok": True, "ended": adhoc.end(names)}
    seconds = request.get("seconds")
    if (
        not isinstance(seconds, int | float)
        or isinstance(seconds, bool)
        or not 0 < seconds <= MAX_WINDOW_SECONDS
    ):
        return {"ok": False, "error": f"seconds must be in (0, {MAX_WINDOW_SECONDS:g}]"}
    reason = request.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        return {"ok": False, "error": f"reason must be 1 to {MAX_REASON_CHARS} characters"}
    adhoc.start(names, float(seconds), reason)
    return {"ok": True, "maintenance": describe(all_windows(), now)}


async def serve(
    path: Path,
    handle: Callable[[bytes], dict[str, Any]],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the Unix socket ``path`` (mode 0660) until cancelled."""
    _remove_stale_socket(path)
    listener = await anyio.create_unix_listener(path)
    os.chmod(path, 0o660)
    task_status.started()
    try:
        async with listener:
            await listener.serve(lambda stream: _one(stream, handle))
    finally:
        _remove_stale_socket(path)


async def _one(stream: SocketStream, handle: Callable[[bytes], dict[str, Any]]) -> None:
    async with stream:
        reply: dict[str, Any]
        try:
            line = await _read_line(stream)
        except ControlError as exc:
            reply = {"ok": False, "error": str(exc)}
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        else:
            # On the loop: it writes one small file at most, and the caller may poke the loop.
            reply = handle(line)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await stream.send(json.dumps(reply).encode() + b"\n")


async def _read_line(stream: SocketStream) -> bytes:
    data = b""
    with anyio.move_on_after(REQUEST_TIMEOUT_SECONDS) as scope:
        while b"\n" not in data:
            try:
                chunk = await stream.receive(4096)
            except anyio.EndOfStream:
                break
            data += chunk
            if len(data) > MAX_REQUEST_BYTES:
                raise ControlError(f"the request is longer than {MAX_REQUEST_BYTES} bytes")
    if scope.cancelled_caught:
        raise ControlError("the request did not arrive in time")
    return data.split(b"\n", 1)[0]


def _remove_stale_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def request(
    path: Path, message: Mapping[str, Any], timeout_seconds: float = 10.0
) -> dict[str, Any]:
    """Send one request to the daemon's control socket; its answer, or ``ControlError``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_seconds)
            sock.connect(os.fspath(path))
            sock.sendall(json.dumps(dict(message)).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ControlError(f"cannot reach healthd at {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"healthd at {path} gave no answer") from None
    if not isinstance(reply, dict):
        raise ControlError(f"healthd at {path} gave no answer")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "refused")))
    return reply
