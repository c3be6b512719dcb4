"""Config strings that may carry secrets, and the redactor that keeps them out of every output.

A templated string may contain ``${env:NAME}``, ``${file:/path}`` or ``${credential:NAME}``
(a systemd credential, read from ``$CREDENTIALS_DIRECTORY/NAME``). The template is what
``config show`` prints; the resolved value is only handed to protocol clients.

A secret reaches output in more forms than its own: URL-encoded in a query, JSON- or
repr-escaped in a quoted body, base64-encoded with its user name in a Basic-auth header.
``collect_secrets`` finds every secret and every user/password pair in a config; ``Redactor``
scrubs each secret in all the forms ``derived_forms`` lists.
"""

from __future__ import annotations

import base64
import binascii
import functools
import html
import itertools
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

_REFERENCE = re.compile(r"\$\{(env|file|credential):([^}]*)\}")
#: Secrets shorter than this are not scrubbed from text: a one-letter password would turn every
#: log line into confetti, and such a value is no secret worth the name anyway.
_MIN_SCRUB_LENGTH = 4
REDACTED = "<redacted>"


#: A secret file or credential larger than this is refused (``${file:/dev/zero}`` never ends).
SECRET_FILE_MAX_BYTES = 64 * 1024


class UnreadableFile(ValueError):
    """A file that cannot be used; ``reason`` says why, without the path."""

    def __init__(self, what: str, path: Path, reason: str) -> None:
        super().__init__(f"cannot read {what} {str(path)!r}: {reason}")
        self.reason = reason


def read_capped(path: Path, limit_bytes: int, what: str, *, regular_only: bool = True) -> bytes:
    """The bytes of ``path``, at most ``limit_bytes``; raise ``UnreadableFile`` otherwise.

    The open never blocks (a FIFO without a writer would wait forever), and at most one byte
    more than the limit is read. With ``regular_only``, pipes and devices are refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UnreadableFile(what, path, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UnreadableFile(what, path, "it is a directory")
        if not stat.S_ISREG(mode):
            if regular_only:
                raise UnreadableFile(what, path, "not a regular file")
            # A pipe with a writer (``--config /dev/stdin``) is read to its end.
            os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= limit_bytes and (chunk := os.read(fd, limit_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UnreadableFile(what, path, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > limit_bytes:
        raise UnreadableFile(what, path, f"larger than {limit_bytes} bytes")
    return b"".join(chunks)


def _read_file(path: Path, what: str) -> str:
    data = read_capped(path, SECRET_FILE_MAX_BYTES, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile(what, path, "not UTF-8") from None
    # A trailing newline is an editor's habit, never part of a password.
    return text.rstrip("\r\n")


def _resolve_reference(source: str, name: str) -> str:
    if not name:
        raise ValueError(f"${{{source}:}} needs a name")
    if source == "env":
        value = os.environ.get(name)
        if value is None:
            raise ValueError(f"environment variable {name} is not set")
        return value
    if source == "file":
        return _read_file(Path(name), "secret file")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ValueError(
            f"credential {name!r} needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=)"
        )
    if "/" in name:
        raise ValueError(f"credential name {name!r} must not contain '/'")
    return _read_file(Path(directory) / name, "credential")


#: ``scheme://user:password@``, for a URL too broken for ``urlsplit`` (an unclosed ``[``).
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*?):([^/?#]*)@")


def _url_password(value: str) -> str | None:
    if "://" not in value:
        return None
    try:
        return urlsplit(value).password
    except ValueError:
        return m.group(2) if (m := _USERINFO.match(value)) else None


def _url_credentials(value: str) -> Iterator[tuple[str, str]]:
    """``(user, password)`` from a URL's userinfo and its ``?password=`` (libpq takes one)."""
    if "://" not in value:
        return
    try:
        parts = urlsplit(value)
        user, password, query = parts.username, parts.password, parts.query
    except ValueError:
        m = _USERINFO.match(value)
        user, password = m.groups() if m else (None, None)
        query = ""
    if password:
        yield unquote(user or ""), password
    for key, item in parse_qsl(query, keep_blank_values=False):
        if key.lower() == "password" and item:
            yield unquote(user or ""), item


#: ``key = value`` in a libpq connection string; a value is quoted or runs to a space.
_CONNINFO = re.compile(r"([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'?|(?:[^\s'\\]|\\.)+)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def _conninfo(value: str) -> dict[str, tuple[str, str]]:
    """``{key: (decoded value, value as written)}`` of a ``key=value`` connection string."""
    if "://" in value or "=" not in value:
        return {}
    found: dict[str, tuple[str, str]] = {}
    for match in _CONNINFO.finditer(value):
        written = match.group(2)
        inner = written[1:-1] if written.startswith("'") and len(written) > 1 else written
        found[match.group(1).lower()] = (re.sub(r"\\(.)", r"\1", inner), written)
    return found


def _mask(template: str) -> str:
    """``template`` with literal passwords (URL userinfo, ``?password=``, ``password=``)
    replaced; a password that is itself a reference shows as the reference."""
    password = _url_password(template)
    if password and not _REFERENCE.search(password):
        template = template.replace(f":{password}@", f":{REDACTED}@", 1)
    if "://" in template:
        return _QUERY_PASSWORD.sub(
            lambda m: m.group(0) if _REFERENCE.search(m.group(2)) else m.group(1) + REDACTED,
            template,
        )
    written = _conninfo(template).get("password")
    if written and not _REFERENCE.search(written[1]):
        template = _CONNINFO.sub(
            lambda m: f"{m.group(1)}={REDACTED}" if m.group(1).lower() == "password" else m[0],
            template,
        )
    return template


class Templated:
    """A config string whose ``${...}`` references are resolved once, at load time.

    ``str()`` and ``repr()`` give the template with any URL password masked; ``reveal()`` gives
    the value for a protocol client; ``secrets`` lists what must never be printed.
    """

    __slots__ = ("_credentials", "_secrets", "_value", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        secrets: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            value = _resolve_reference(match.group(1), match.group(2))
            secrets.append(value)
            return value

        self._value = _REFERENCE.sub(substitute, template)
        credentials = list(_url_credentials(self._value))
        for _, password in credentials:
            secrets.extend((password, unquote(password)))
        conninfo = _conninfo(self._value)
        if "password" in conninfo:
            password, written = conninfo["password"]
            secrets.extend((password, written))
            credentials.append((conninfo.get("user", ("", ""))[0], password))
        self._credentials = tuple((unquote(u), unquote(p)) for u, p in credentials if p)
        self._secrets = tuple(s for s in dict.fromkeys(secrets) if s)

    def reveal(self) -> str:
        """The resolved value, for protocol clients only."""
        return self._value

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every resolved secret inside the value."""
        return self._secrets

    @property
    def credentials(self) -> tuple[tuple[str, str], ...]:
        """``(user, password)`` pairs inside the value (URL userinfo, ``user=``/``password=``)."""
        return self._credentials

    def as_secret(self) -> SecretTemplated:
        """The same value, now a secret as a whole (a header that carries a credential)."""
        secret = SecretTemplated.__new__(SecretTemplated)
        secret.template, secret._value = self.template, self._value
        secret._secrets, secret._credentials = self._secrets, self._credentials
        secret._add_whole()
        return secret

    def __str__(self) -> str:
        return _mask(self.template)

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Templated) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )

    @classmethod
    def _validate(cls, value: Any) -> Templated:
        if not isinstance(value, Templated | str):
            raise ValueError("must be a string")
        if isinstance(value, cls):
            return value
        if isinstance(value, Templated):
            return value.as_secret() if cls is SecretTemplated else value
        return cls(value)


class SecretTemplated(Templated):
    """A templated value that is a secret as a whole: a password, an API key, a credential
    header. ``str()`` shows its references, or ``<redacted>`` when it holds literal text."""

    __slots__ = ()

    def __init__(self, template: str) -> None:
        super().__init__(template)
        self._add_whole()

    def _add_whole(self) -> None:
        secrets = [self._value, *self._secrets]
        credentials = list(self._credentials)
        # "Bearer <token>" and "Basic <base64>": the token may be echoed without its scheme,
        # and a Basic pair decoded.
        scheme, _, token = self._value.strip().partition(" ")
        if token.strip():
            secrets.append(token.strip())
        if scheme.lower() == "basic" and (pair := _basic_pair(token.strip())):
            secrets.append(pair[1])
            credentials.append(pair)
        self._secrets = tuple(s for s in dict.fromkeys(secrets) if s)
        self._credentials = tuple(credentials)

    def __str__(self) -> str:
        return self.template if _REFERENCE.search(self.template) else REDACTED

    __repr__ = __str__


def _basic_pair(token: str) -> tuple[str, str] | None:
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep and password else None


def collect_secrets(value: Any) -> set[str]:
    """Every secret held by ``Templated`` values anywhere inside a config tree, and the
    Basic-auth form (base64 of ``user:password``) of every user/password pair it holds: URL
    userinfo, ``user=``/``password=`` in a DSN, and models with ``username`` and ``password``.

    ``Redactor`` adds the encoded and escaped forms of each; they are computed there, once.
    """
    found: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Templated):
            found.update(item.secrets)
            pairs.update(item.credentials)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif hasattr(item, "__pydantic_fields__"):
            stack.extend(getattr(item, name) for name in item.__pydantic_fields__)
            password = getattr(item, "password", None)
            if isinstance(password, Templated) and password.reveal():
                username = getattr(item, "username", None)
                user = username.reveal() if isinstance(username, Templated) else username
                pairs.add((user or "", password.reveal()))
    for user, password in pairs:
        found.add(base64.b64encode(f"{user}:{password}".encode()).decode())
    return found


def derived_forms(secret: str) -> set[str]:
    """``secret`` as it may appear in output: raw, URL-encoded (``quote``, ``quote_plus``,
    lower-case hex), JSON-escaped (ASCII or not, ``\\/``), repr-escaped and HTML-escaped."""
    forms = {secret, html.escape(secret), html.escape(secret, quote=False)}
    for safe in ("", "/", "!$&'()*+,;=:@"):
        forms.add(quote(secret, safe=safe))
        forms.add(quote_plus(secret, safe=safe))
    forms.update({re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), f) for f in list(forms)})
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        forms.update((escaped, escaped.replace("/", "\\/")))
    for text in (repr, ascii):
        # A quote inside a larger string may or may not be escaped, depending on which quote
        # character repr chose for the whole; with both in front, it always escapes ``'``.
        escaped = text("'\"" + secret)[4:-1]
        forms.update((escaped, escaped.replace("\\'", "'")))
    return forms


#: Where output was cut short; a secret's beginning right before one is scrubbed too.
_ELLIPSIS = re.compile(r"\.\.\.|\u2026")
#: A cut-off secret is recognised from this many characters; fewer give too little away.
_MIN_CUT_LENGTH = 6
#: Truncated quotes are short; longer secrets are matched on their first this-many characters.
_MAX_CUT_LENGTH = 256


class Redactor:
    """Replaces known secret values in text. The last line of defence for logs and exports.

    Each secret is scrubbed in every form ``derived_forms`` lists, and also where a quote was
    cut short inside it: the secret's beginning right before ``...`` is scrubbed as well.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._state: tuple[re.Pattern[str], dict[str, tuple[str, ...]]] | None = None
        self.replace(secrets)

    def replace(self, secrets: Iterable[str]) -> None:
        """Scrub these secrets, in every derived form, from now on (after a reload)."""
        # One assignment, so a thread that scrubs during a reload sees old or new, whole.
        self._state = _compiled(frozenset(secrets))

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced by ``<redacted>``."""
        state = self._state
        if state is None:
            return text
        pattern, starts = state
        text = pattern.sub(REDACTED, text)
        if "..." not in text and "\u2026" not in text:
            return text
        return _scrub_cut(text, starts)

    def scrub_tree(self, value: Any) -> Any:
        """Scrub every string inside a JSON-like tree."""
        if self._state is None:
            return value
        return self._scrub_tree(value)

    def _scrub_tree(self, value: Any) -> Any:
        # Numbers and None by exact type first: history.json's 90 daily shares per component
        # made a million ABC checks (Mapping) at 10,000 components, 2.7 s of a first export.
        if type(value) in _ATOMS:
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {self.scrub(str(k)): self._scrub_tree(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            if _ATOMS.issuperset(map(type, value)):
                return list(value)  # a list of numbers, looked at in C
            return [self._scrub_tree(v) for v in value]
        return value


#: Values ``scrub_tree`` passes through as they are: nothing in them can hold a secret.
_ATOMS = frozenset({int, float, bool, type(None)})


@functools.lru_cache(maxsize=1024)
def _compiled(
    secrets: frozenset[str],
) -> tuple[re.Pattern[str], dict[str, tuple[str, ...]]] | None:
    """The matcher for ``secrets``, built once per set: probes make a redactor per failure,
    and compiling is the slow part (3.3 s for 1,000 secrets of 22 characters, 14,000 forms;
    0.2 ms per 90-character line to scrub with it, 2026-11-29 on the 2-core build machine)."""
    forms = {
        form
        for secret in secrets
        if len(secret) >= _MIN_SCRUB_LENGTH
        for form in derived_forms(secret)
        if len(form) >= _MIN_SCRUB_LENGTH
    }
    if not forms:
        return None
    starts: dict[str, list[str]] = {}
    for form in forms:
        if len(form) > _MIN_CUT_LENGTH:
            starts.setdefault(form[:_MIN_CUT_LENGTH], []).append(form[:_MAX_CUT_LENGTH])
    return re.compile(_trie(sorted(forms))), {k: tuple(v) for k, v in starts.items()}


def _trie(words: list[str]) -> str:
    """A regex matching any of ``words`` (sorted, unique), longest first, built as a trie.

    A plain alternation of 15,000 forms (1,000 secrets) tried every form at every position:
    8 ms to scrub one 90-character line. Shared prefixes are written once here, so a
    position is rejected after a look at its first character.
    """
    optional = bool(words) and words[0] == ""
    if optional:
        words = words[1:]
    if not words:
        return ""
    branches = []
    for _, group in itertools.groupby(words, key=lambda word: word[0]):
        members = list(group)
        # Sorted: what the first and last share, all of them share.
        first, last = members[0], members[-1]
        shared = next(
            (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b),
            min(len(first), len(last)),
        )
        branches.append(re.escape(first[:shared]) + _trie([m[shared:] for m in members]))
    if optional:
        # Greedy: the longer form wins, and the shorter one still matches where it stops.
        return "(?:" + "|".join(branches) + ")?"
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


def _scrub_cut(text: str, starts: Mapping[str, tuple[str, ...]]) -> str:
    """``text`` with each secret's beginning that runs into an ellipsis replaced."""
    pieces: list[str] = []
    done = 0
    for match in _ELLIPSIS.finditer(text):
        end = match.start()
        cut = 0
        for length in range(min(_MAX_CUT_LENGTH, end - done), _MIN_CUT_LENGTH - 1, -1):
            tail = text[end - length : end]
            if any(form.startswith(tail) for form in starts.get(tail[:_MIN_CUT_LENGTH], ())):
                cut = length
                break
        pieces.append(text[done : end - cut] + (REDACTED if cut else ""))
        done = end
    pieces.append(text[done:])
    return "".join(pieces)
