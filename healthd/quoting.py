"""How a reason quotes what a target sent: redacted, then escaped, then cut short.

A target's bytes reach reasons and details (an HTTP body value, a Redis reply, a PostgreSQL
message, a version string), and from there the status file, logs and metrics. ``quote`` is
the one way they get there. The order matters:

1. **Redact** the whole text first, while every secret is still whole and unescaped, so that a
   cut or an escape can never leave part of one behind.
2. **Escape** what is not printable (``\\n``, ``\\x00``, a byte that is not UTF-8), and the
   backslash itself, so one line stays one line and binary garbage stays readable.
3. **Truncate** to ``limit`` characters of the escaped text, never inside an escape.
"""

from __future__ import annotations

import json
from typing import Any

from healthd.secrets import Redactor

#: The most characters of a target's text any one quote shows.
QUOTE_LIMIT = 100
_ELLIPSIS = "..."
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def quote(text: str | bytes, redactor: Redactor | None = None, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a reason may show it: secrets redacted, non-printables escaped, at most
    ``limit`` characters (the last three ``...`` when it was cut).

    Bytes are read as UTF-8; a byte that is not UTF-8 shows as ``\\xNN``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="surrogateescape")
    if redactor is not None:
        text = redactor.scrub(text)
    out: list[str] = []
    size = 0
    for char in text:
        piece = _escape(char)
        out.append(piece)
        size += len(piece)
        if size > limit:
            # It does not fit: end with the ellipsis, and only whole escapes before it.
            while out and size + len(_ELLIPSIS) > limit:
                size -= len(out.pop())
            out.append(_ELLIPSIS)
            break
    return "".join(out)


def quote_value(value: Any, redactor: Redactor | None = None, limit: int = QUOTE_LIMIT) -> str:
    """A value from a target's JSON as a reason shows it: a string in single quotes, anything
    else as JSON. Redacted before it is serialised, since JSON would escape a secret's ``"``
    and ``\\`` and hide it from the redactor."""
    if redactor is not None:
        value = redactor.scrub_tree(value)
    if isinstance(value, str):
        return f"'{quote(value, limit=limit)}'"
    return quote(json.dumps(value, ensure_ascii=False), limit=limit)


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Text that is already fit to show (a reason, quoted names), cut to ``limit`` characters,
    the last three ``...`` when it was cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(_ELLIPSIS)] + _ELLIPSIS


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that was not UTF-8 (surrogateescape)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
