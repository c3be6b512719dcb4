"""The JSON status file: rendered from a snapshot, replaced atomically, never left half-written.

nginx serves this file to people and tools. A reader must never see a partial document, and a
failed write must never destroy the last good one: write a temp file in the same directory,
fsync it, rename it over the old one, then fsync the directory so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from healthd.config import DetailLevel
from healthd.exporters._fragments import FragmentCache
from healthd.model import ComponentState, Maintenance, Snapshot, Status
from healthd.secrets import Redactor

SCHEMA_VERSION = 1


def iso_timestamp(unix_seconds: float | None) -> str | None:
    """UTC ISO 8601 with milliseconds: ``2026-11-21T23:00:00.123Z``."""
    if unix_seconds is None:
        return None
    # Rounded to microseconds exactly as datetime.fromtimestamp does, then truncated to ms.
    fraction, whole = math.modf(unix_seconds)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_second(int(whole))}{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8192)
def _second(unix_seconds: int) -> str:
    # strftime was most of the cost of a status file write; whole seconds repeat a lot
    # (``since`` values, a round of checks), so each is formatted once.
    m = datetime.fromtimestamp(unix_seconds, UTC)
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."


def document(
    snapshot: Snapshot, redactor: Redactor | None = None, details: DetailLevel = "full"
) -> dict[str, Any]:
    """The status document for ``snapshot``, with every secret scrubbed."""
    components = {
        name: _component(state, details) for name, state in sorted(snapshot.components.items())
    }
    doc = {**_head(snapshot), "components": components}
    return redactor.scrub_tree(doc) if redactor is not None else doc


def _head(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": iso_timestamp(snapshot.generated_at),
        "status": snapshot.overall.label,
        "summary": snapshot.summary(),
    }


def _component(state: ComponentState, details: DetailLevel) -> dict[str, Any]:
    # What holds while the status does comes first, then what every check changes: a check
    # that keeps its status rewrites only the end of the entry (``StatusDocument._refresh``).
    return {**_settled_fields(state, details), **_check_fields(state, details)}


def _settled_fields(state: ComponentState, details: DetailLevel) -> dict[str, Any]:
    """The entry's fields that hold while the status does (``_same_until_checked``)."""
    entry: dict[str, Any] = {
        "kind": state.kind,
        "status": state.status.label,
        "critical": state.critical,
        "reason_code": state.reason_code,
    }
    # Root causes are component names, which the document already shows: kept in summary too.
    if state.impacted_by:
        entry["impacted_by"] = list(state.impacted_by)
    if (planned := state.maintenance) is not None:
        until = None if math.isinf(planned.until) else iso_timestamp(planned.until)
        entry["maintenance"] = {"until": until, "source": planned.source}
        if details == "full":
            entry["maintenance"]["reason"] = planned.reason
    if details == "full":
        entry["reason"] = state.reason
    entry["since"] = iso_timestamp(state.since)
    return entry


def _check_fields(state: ComponentState, details: DetailLevel) -> dict[str, Any]:
    """The entry's fields that a check changes while the status holds; they end the entry."""
    checked_at = iso_timestamp(state.checked_at)
    if details == "summary":
        return {"checked_at": checked_at}
    return {
        "latency_ms": round(state.latency_seconds * 1000, 1),
        "checked_at": checked_at,
        # The same instant after every success: formatted once.
        "last_success_at": checked_at
        if state.last_success_at == state.checked_at
        else iso_timestamp(state.last_success_at),
        "consecutive_failures": state.consecutive_failures,
        "details": dict(state.details),
    }


def _same_until_checked(old: ComponentState, new: ComponentState) -> bool:
    """Whether ``_settled_fields`` are the same for both."""
    return (
        old.status is new.status
        and old.since == new.since
        and old.reason_code == new.reason_code
        and old.reason == new.reason
        and old.impacted_by == new.impacted_by
        and old.maintenance == new.maintenance
        and old.kind == new.kind
        and old.critical == new.critical
    )


def render(doc: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON with a trailing newline."""
    return compact_json(doc) + b"\n"


#: What ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)`` builds on every call
#: (a fifth of the cost of a status file entry), built once: encoding keeps no state in it.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: How ``_COMPACT`` writes a string (json's C function), for the fields of a hot path.
_encode_string = json.encoder.encode_basestring
#: json's C encoder as ``_COMPACT.encode`` makes it afresh on every call (1.1 of its 2.7 us
#: for a small dict), made once. Without the cycle check: what healthd encodes is trees it
#: built. ``None`` where json has no C speedups.
_ENCODE: Callable[[Any, int], Iterable[str]] | None = None
if (_make_encoder := getattr(json.encoder, "c_make_encoder", None)) is not None:
    _ENCODE = _make_encoder(
        None, _COMPACT.default, _encode_string, None, ":", ",", False, False, True
    )


def compact_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON, as every file healthd writes has it."""
    if _ENCODE is None:
        return _COMPACT.encode(value).encode()
    return "".join(_ENCODE(value, 0)).encode()


def render_with_components(head: dict[str, Any], entries: Iterable[bytes | memoryview]) -> bytes:
    """``render({**head, "components": {...}})`` from the components' entries already encoded
    (``"name":{...}``, comma-separated): what incremental exports join."""
    return b"".join(parts_with_components(head, entries))


def parts_with_components(
    head: dict[str, Any], entries: Iterable[bytes | memoryview]
) -> tuple[bytes | memoryview, ...]:
    """``render_with_components`` in the pieces it joins: to write without joining them."""
    return (compact_json(head)[:-1] + b',"components":{', *entries, b"}}\n")


class StatusDocument:
    """Renders the status file for snapshots, re-rendering only the components that changed.

    Each component's JSON entry is kept as bytes, keyed on its ``ComponentState`` object: the
    store hands out the very same object while a component's judged state (its dependency
    impact included) is unchanged. The bytes equal ``render(document(...))``.

    :param redactor: scrubs secrets from every entry; build a new ``StatusDocument`` when its
        secrets change, since cached entries were scrubbed with the old ones.
    :param details: ``full`` or ``summary``.
    """

    def __init__(self, redactor: Redactor | None = None, details: DetailLevel = "full") -> None:
        # Without secrets a redactor scrubs nothing and costs one check.
        self._scrub = (redactor if redactor is not None else Redactor()).scrub_tree
        self._details = details
        self._lock = threading.Lock()
        # One column: every component's entry followed by a comma.
        self._entries = FragmentCache(self._fragment, 1, refresh=self._refresh)
        # Each per-check field's key as it stands in an entry: scrubbed, as every key is.
        fields = _check_fields(_PLACEHOLDER, details)
        self._keys = {key: b"," + compact_json(self._scrub(key)) + b":" for key in fields}
        first = next(iter(fields))
        self._first_key = self._keys[first]
        # Secrets can make keys read alike: two of an entry's keys are then merged, as
        # ``scrub_tree`` merges a dict's keys, or another key reads as the first per-check one.
        # Either way an entry's end cannot be told by its keys, and entries are rendered whole.
        top = [*_settled_fields(_PLACEHOLDER_IN_FULL, details), *fields]
        nested = _settled_fields(_PLACEHOLDER_IN_FULL, "full")["maintenance"]
        read = {key: self._scrub(key) for key in {*top, *nested}}
        merged = len({read[key] for key in top}) < len(top)
        self._whole = merged or any(read[key] == read[first] for key in read if key != first)

    @property
    def rendered_components(self) -> int:
        """How many components the last ``render`` had to render afresh."""
        return self._entries.rendered_components

    def render(self, snapshot: Snapshot) -> bytes:
        """The document for ``snapshot``, compact UTF-8 JSON with a trailing newline."""
        return b"".join(self.render_parts(snapshot))

    def render_parts(self, snapshot: Snapshot) -> tuple[bytes | memoryview, ...]:
        """``render`` in pieces, to be written as they are: joined, the 3 MB of 10,000
        components cost the running daemon 1.8 ms, most of it faulting in fresh pages. The
        pieces stay as they are: a later render makes new ones."""
        with self._lock:
            (entries,) = self._entries.update(snapshot.components)
        head = self._scrub(_head(snapshot))
        return parts_with_components(head, (memoryview(entries)[:-1],))  # no trailing comma

    def _fragment(self, name: str, state: ComponentState) -> tuple[bytes]:
        if self._whole:
            return (
                compact_json(self._scrub({name: _component(state, self._details)}))[1:-1] + b",",
            )
        settled = compact_json(self._scrub({name: _settled_fields(state, self._details)}))
        return (b"".join((memoryview(settled)[1:-2], self._tail(state), b"},")),)

    def _refresh(
        self, name: str, old: ComponentState, new: ComponentState, olds: tuple[memoryview, ...]
    ) -> tuple[bytes] | None:
        """A check that kept the status: the old entry up to its per-check fields, and those
        encoded afresh, ``details`` copied when they are the very same object. A fifth of the
        cost of the whole entry with secrets to scrub, half without (docs/performance.md)."""
        if self._whole or not _same_until_checked(old, new):
            return None
        entry = bytes(olds[0])
        # The first unescaped occurrence: keys before it are fixed, and strings are escaped.
        at = entry.find(self._first_key)
        if at < 0:
            return None
        details = None
        if new.details is old.details and (key := self._keys.get("details")) is not None:
            # The last field: its old text runs to the entry's closing "},".
            details = memoryview(entry)[entry.index(key, at) + len(key) : -2]
        return (b"".join((memoryview(entry)[:at], self._tail(new, details), b"},")),)

    def _tail(self, state: ComponentState, details: memoryview | None = None) -> bytes:
        """``_check_fields`` encoded field by field, as ``compact_json`` would, and scrubbed."""
        parts: list[bytes | memoryview] = []
        for key, value in _check_fields(state, self._details).items():
            parts.append(self._keys[key])
            if key == "details" and details is not None:
                parts.append(details)
            elif value is None:
                parts.append(b"null")
            elif type(value) is int or (type(value) is float and math.isfinite(value)):
                parts.append(repr(value).encode())  # json's own form for both
            elif type(value) is str:
                parts.append(_encode_string(self._scrub(value)).encode())
            else:
                parts.append(compact_json(self._scrub(value)))
        return b"".join(parts)


#: States to learn an entry's keys from: the per-check ones, and every settled one.
_PLACEHOLDER = ComponentState(
    name="", kind="", critical=False, status=Status.HEALTHY, reason_code="", reason="",
    latency_seconds=0.0, checked_at=0.0, since=0.0, last_success_at=None,
    consecutive_failures=0, consecutive_successes=0,
)  # fmt: skip
_PLACEHOLDER_IN_FULL = dataclasses.replace(
    _PLACEHOLDER, impacted_by=("",), maintenance=Maintenance(0.0, "", "")
)


def write_atomic(path: Path, data: bytes | Iterable[bytes | memoryview], mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``, or its pieces in turn, so that readers see the old file
    or the new one, whole.

    Raises ``OSError`` on failure (a missing directory included), after removing its temp
    file; the old file is untouched.
    """
    directory = path.parent
    # Never created here: a directory that vanished (an unmounted volume, say) must fail the
    # write, not get recreated on the disk beneath it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as tmp:
            if isinstance(data, bytes):
                tmp.write(data)
            else:
                tmp.writelines(data)
            tmp.flush()
            os.fchmod(tmp.fileno(), mode)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Without this the rename may be lost in a crash; some filesystems refuse, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def age_seconds(path: Path, now: float) -> float:
    """How old the document at ``path`` is, by its ``generated_at``.

    Raises ``OSError`` when it cannot be read and ``ValueError`` when it is not a status
    document, so a caller can tell "healthd is stuck" from "healthd never wrote anything".
    """
    doc = json.loads(path.read_bytes())
    generated_at = doc.get("generated_at") if isinstance(doc, dict) else None
    if not isinstance(generated_at, str):
        raise ValueError("no generated_at")
    moment = datetime.strptime(generated_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return now - moment.timestamp()


def main(argv: list[str] | None = None) -> int:
    """``python -m healthd.exporters.status_file [--max-age 60] PATH``: is healthd alive?

    Exit 0 when the file was generated within ``--max-age`` seconds, 1 otherwise. This is a
    container ``HEALTHCHECK``: it fails when healthd itself is stuck, never because a
    component is unhealthy (healthd reporting an outage is healthd working).
    """
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="python -m healthd.exporters.status_file")
    parser.add_argument("path", type=Path)
    parser.add_argument("--max-age", type=float, default=60.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    try:
        age = age_seconds(args.path, time.time())
    except (OSError, ValueError) as exc:
        print(f"status file {args.path} is not usable: {exc}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"status file {args.path} is {age:.0f} s old (limit {args.max_age:g} s)")
        return 1
    print(f"status file {args.path} is {age:.1f} s old")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
