"""How a config problem is told: one line each, naming the file, the key and the line.

The line locator is the heart of it. ``tomllib`` keeps no positions, so the line of a key is
found again by reading table headers and key names (a best effort here is worth more than no
line at all), and a key that a ``HEALTHD_*`` variable set is named by its variable instead.
Secrets in a config that failed are scrubbed from its errors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsError

from healthd.config_checks import KINDS
from healthd.secrets import Redactor, SecretTemplated, Templated, collect_secrets


class ConfigError(Exception):
    """The config cannot be used. ``problems`` are one line each: ``file:line: key: what``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- where a key was set ----------------------------------------------------------------


def locate(path: Path, text: str, loc: Sequence[str], data: Mapping[str, Any]) -> str:
    """``file: $VARIABLE`` when a variable set the key at ``loc``, else ``file:line``, else
    ``file``. ``text`` is the file as read, ``data`` the table ``tomllib`` made of it."""
    if (variable := _overriding_variable(loc, data)) is not None:
        # The value came from the environment: a line of the file would mislead.
        return f"{path}: ${variable}"
    if line := _find_line(text, loc):
        return f"{path}:{line}"
    return str(path)


def _overriding_variable(loc: Sequence[str], data: Mapping[str, Any]) -> str | None:
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


def _depth_in_file(data: Mapping[str, Any], loc: Sequence[str]) -> int:
    node: Any = data
    for depth, part in enumerate(loc):
        if not isinstance(node, Mapping) or part not in node:
            return depth
        node = node[part]
    return len(loc)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGNMENT = re.compile(r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.\s-])+?)\s*=")
_KEY_PART = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:\.|$)""")


def _find_line(text: str, loc: Sequence[str]) -> int | None:
    """The line of the TOML key at ``loc``, found by reading table headers and key names."""
    if not loc:
        return None
    table: list[str] = []
    best: int | None = None
    best_depth = 0
    # ``[[a.b]]`` opens element 0, 1, ... of the array ``a.b``; pydantic's path counts the same.
    arrays: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(line):
            table = _split_key(m.group(2))
            if m.group(1) == "[[":
                arrays[tuple(table)] = index = arrays.get(tuple(table), -1) + 1
                table = [*table, str(index)]
            key = table
        elif m := _ASSIGNMENT.match(line):
            key = table + _split_key(m.group(1))
        else:
            continue
        depth = _common_prefix(key, loc)
        if depth == len(key) and depth > best_depth:
            best, best_depth = number, depth
    return best


def _split_key(text: str) -> list[str]:
    """``components."api.v1".url`` -> ``["components", "api.v1", "url"]``."""
    return [a or b or c for a, b, c in _KEY_PART.findall(text)]


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --- what went wrong --------------------------------------------------------------------


def bad_variables(path: Path, settings: type[BaseSettings]) -> Iterator[str]:
    """One line per ``HEALTHD_*`` variable that pydantic-settings cannot decode (bad JSON)."""
    source = EnvSettingsSource(settings, env_prefix="HEALTHD_", env_nested_delimiter="__")
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


def describe(path: Path, text: str, error: ValidationError, data: Mapping[str, Any]) -> list[str]:
    """One line per key at fault, ``file:line: key: what``, with the input's secrets scrubbed."""
    redactor = Redactor(_secrets_in_input(data))
    return [redactor.scrub(line) for line in _described(path, text, error, data)]


def _described(
    path: Path, text: str, error: ValidationError, data: Mapping[str, Any]
) -> Iterator[str]:
    said: dict[tuple[str, ...], list[str]] = {}
    for item in error.errors(include_url=False):
        loc = [str(part) for part in item["loc"]]
        # A discriminated union puts the kind's tag into the path; the file has no such key.
        if len(loc) >= 3 and loc[0] == "components":
            loc = [p for i, p in enumerate(loc) if not (i == 2 and p in KINDS)]
        loc = [p for p in loc if not _UNION_MEMBER.fullmatch(p)]
        message = item["msg"].removeprefix("Value error, ")
        # Cross-field checks run on the whole model; their message starts with the key at fault.
        if not loc and (keyed := re.match(r"^([\w.-]+): (.*)$", message, re.S)):
            loc, message = keyed.group(1).split("."), keyed.group(2)
        if item["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown key"
        elif item["type"] == "union_tag_invalid":
            tag = (item.get("ctx") or {}).get("tag", item["input"])
            message = f"unknown kind {tag!r}; known kinds: {', '.join(sorted(KINDS))}"
        elif item["type"] == "union_tag_not_found":
            message = f"missing 'kind'; known kinds: {', '.join(sorted(KINDS))}"
        elif item["type"] == "missing":
            message = "required key is missing"
        messages = said.setdefault(tuple(loc), [])
        if message not in messages:
            messages.append(message)
    for loc_key, messages in said.items():
        loc = list(loc_key)
        key = ".".join(loc) or "(top level)"
        yield f"{locate(path, text, loc, data)}: {key}: {'; or '.join(messages)}"
