"""Config strings that may carry secrets, and the redactor that keeps them out of every output.

A templated string may contain ``${env:NAME}``, ``${file:/path}`` or ``${credential:NAME}``
(a systemd credential, read from ``$CREDENTIALS_DIRECTORY/NAME``). The template is what
``config show`` prints; the resolved value is only handed to protocol clients.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

_REFERENCE = re.compile(r"\$\{(env|file|credential):([^}]*)\}")
#: Secrets shorter than this are not scrubbed from text: a one-letter password would turn every
#: log line into confetti, and such a value is no secret worth the name anyway.
_MIN_SCRUB_LENGTH = 4
REDACTED = "<redacted>"


def _read_file(path: Path, what: str) -> str:
    try:
        # A trailing newline is an editor's habit, never part of a password.
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


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


def _url_password(value: str) -> str | None:
    if "://" not in value:
        return None
    try:
        return urlsplit(value).password
    except ValueError:
        return None


class Templated:
    """A config string whose ``${...}`` references are resolved once, at load time.

    ``str()`` and ``repr()`` give the template with any URL password masked; ``reveal()`` gives
    the value for a protocol client; ``secrets`` lists what must never be printed.
    """

    __slots__ = ("_secrets", "_value", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        secrets: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            value = _resolve_reference(match.group(1), match.group(2))
            secrets.append(value)
            return value

        self._value = _REFERENCE.sub(substitute, template)
        password = _url_password(self._value)
        if password:
            secrets.append(password)
        self._secrets = tuple(s for s in secrets if s)

    def reveal(self) -> str:
        """The resolved value, for protocol clients only."""
        return self._value

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every resolved secret inside the value."""
        return self._secrets

    def __str__(self) -> str:
        password = _url_password(self.template)
        if password and not _REFERENCE.search(password):
            return self.template.replace(f":{password}@", f":{REDACTED}@", 1)
        return self.template

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Templated) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls._validate,
            core_schema.union_schema(
                [core_schema.is_instance_schema(cls), core_schema.str_schema()]
            ),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )

    @classmethod
    def _validate(cls, value: Templated | str) -> Templated:
        return value if isinstance(value, Templated) else cls(value)


def collect_secrets(value: Any) -> set[str]:
    """Every secret held by ``Templated`` values anywhere inside a config tree."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Templated):
            found.update(item.secrets)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif hasattr(item, "__pydantic_fields__"):
            stack.extend(getattr(item, name) for name in item.__pydantic_fields__)
    return found


class Redactor:
    """Replaces known secret values in text. The last line of defence for logs and exports."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._pattern: re.Pattern[str] | None = None
        self.replace(secrets)

    def replace(self, secrets: Iterable[str]) -> None:
        """Scrub these secrets from now on (after a reload brought new ones)."""
        # Longest first, so a secret that contains another is removed whole.
        ordered = sorted({s for s in secrets if len(s) >= _MIN_SCRUB_LENGTH}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced by ``<redacted>``."""
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)

    def scrub_tree(self, value: Any) -> Any:
        """Scrub every string inside a JSON-like tree."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {self.scrub(str(k)): self.scrub_tree(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub_tree(v) for v in value]
        return value
