"""No reference in the documentation points at a file, or a section, that does not exist.

Checked: every relative markdown link (and its ``#anchor``) in README.md and docs/*.md; every
path into the repository they name (``tests/test_nginx.py``, ``config/prometheus/``) and every
``python -m healthd...`` module; the same paths in the deployment files and in the Python
sources' docstrings and comments; and the ``Documentation=`` lines of the systemd units. Pure
file reading: no servers, well under a second. ``.ci/checks.sh`` runs this file as a script.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Top-level directories a path in the text may start with; a path under anything else
#: (``/etc/healthd/...``, ``mlflow/server/...`` in another project) is not the repository's.
_TOP_DIRS = (".ci", "bench", "config", "docs", "healthd", "scripts", "systemd", "tests")
_REPO_PATH = re.compile(
    r"(?<![\w./~$@:-])((?:" + "|".join(re.escape(d) for d in _TOP_DIRS) + r")/[\w./-]*)"
)
_MODULE = re.compile(r"python3? -m (healthd(?:\.\w+)*)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_INSTALLED_DOCS = "file:///opt/healthd/"


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _deploy_files() -> list[Path]:
    """The shipped deployment and config files whose comments may name repository paths."""
    found = [REPO / "Dockerfile", REPO / "pyproject.toml"]
    for folder in ("systemd", "config", ".ci", "scripts"):
        found.extend(p for p in sorted((REPO / folder).rglob("*")) if p.is_file())
    return [p for p in found if p.suffix not in (".json",)]


def _source_files() -> list[Path]:
    """Python sources, whose docstrings and comments cite tests, docs and scripts by path.

    This file is left out: its own examples of broken references are meant to be broken.
    """
    found = [p for folder in ("healthd", "tests", "bench") for p in (REPO / folder).rglob("*.py")]
    return sorted(p for p in found if p != Path(__file__).resolve())


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """Numbered lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: ``1. Install a venv`` -> ``1-install-a-venv``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, with GitHub's ``-1``, ``-2`` for repeats."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in _prose_lines(text):
        if m := _HEADING.match(line):
            base = slug(m.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_problems(source: Path, text: str) -> Iterator[str]:
    """Relative links in ``text`` (the contents of ``source``) whose file or anchor is missing."""
    for number, line in _prose_lines(text):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, file:
                continue
            where = f"{_shown(source)}:{number}"
            path_part, _, anchor = target.partition("#")
            if not path_part:
                if anchor not in anchors(text):
                    yield f"{where}: link to {target!r}: no heading with that anchor"
                continue
            linked = (source.parent / path_part).resolve()
            if not linked.exists():
                yield f"{where}: link to {target!r}: no such file"
                continue
            if (
                anchor
                and linked.suffix == ".md"
                and anchor not in anchors(linked.read_text(encoding="utf-8"))
            ):
                yield f"{where}: link to {target!r}: no heading with that anchor"


def path_problems(source: Path, text: str) -> Iterator[str]:
    """Repository paths and ``python -m`` modules named in ``text`` that do not exist."""
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{_shown(source)}:{number}"
        for m in _REPO_PATH.finditer(line):
            following = line[m.end() : m.end() + 1]
            if following in ("<", "{", "*"):  # a pattern such as tests/test_<module>.py
                continue
            named = m.group(1).rstrip(".")
            if not (REPO / named).exists():
                yield f"{where}: names {named!r}, which does not exist"
        for module in _MODULE.findall(line):
            base = REPO / module.replace(".", "/")
            if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
                yield f"{where}: runs module {module!r}, which does not exist"


def documentation_problems(unit: Path) -> Iterator[str]:
    """``Documentation=file:///opt/healthd/X`` must name a file X that the repository ships."""
    for number, line in enumerate(unit.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.startswith("Documentation="):
            continue
        for uri in line.removeprefix("Documentation=").split():
            if uri.startswith(_INSTALLED_DOCS):
                named = uri.removeprefix(_INSTALLED_DOCS)
                if not (REPO / named).is_file():
                    yield f"{_shown(unit)}:{number}: Documentation={uri}: no {named} to install"
            elif uri.startswith("file:"):
                yield f"{_shown(unit)}:{number}: Documentation={uri}: not under {_INSTALLED_DOCS}"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _read(paths: Iterable[Path]) -> Iterator[tuple[Path, str]]:
    for path in paths:
        try:
            yield path, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file names no paths


def all_problems() -> list[str]:
    """Every broken reference in the documentation and the deployment files."""
    problems: list[str] = []
    for path, text in _read(_markdown_files()):
        problems.extend(link_problems(path, text))
        problems.extend(path_problems(path, text))
    for path, text in _read([*_deploy_files(), *_source_files()]):
        problems.extend(path_problems(path, text))
    for unit in sorted((REPO / "systemd").glob("*.service")):
        problems.extend(documentation_problems(unit))
    return problems


# --- the checks -------------------------------------------------------------------------


def test_markdown_links_and_anchors_resolve() -> None:
    problems = [p for path, text in _read(_markdown_files()) for p in link_problems(path, text)]
    assert problems == []


def test_repository_paths_named_in_docs_and_deploy_files_exist() -> None:
    problems = [
        p
        for path, text in _read([*_markdown_files(), *_deploy_files()])
        for p in path_problems(path, text)
    ]
    assert problems == []


def test_repository_paths_named_in_python_sources_exist() -> None:
    problems = [p for path, text in _read(_source_files()) for p in path_problems(path, text)]
    assert problems == []


def test_unit_documentation_points_at_a_shipped_document() -> None:
    units = sorted((REPO / "systemd").glob("*.service"))
    assert units, "no systemd unit found"
    assert any("Documentation=" in unit.read_text(encoding="utf-8") for unit in units), (
        "no unit has a Documentation= line"
    )
    assert [p for unit in units for p in documentation_problems(unit)] == []


# --- the checker itself -----------------------------------------------------------------


def test_slug_matches_githubs_anchors() -> None:
    cases = {
        "1. Install into a venv": "1-install-into-a-venv",
        "`[daemon]`": "daemon",
        "The alerts, and what to do about each": "the-alerts-and-what-to-do-about-each",
        "Memory and descriptors at 10,000 checks": "memory-and-descriptors-at-10000-checks",
        "Bench on a quiet machine (end)": "bench-on-a-quiet-machine-end",
        "`redis` and `falkordb`": "redis-and-falkordb",
    }
    assert {heading: slug(heading) for heading in cases} == cases


def test_checker_reports_missing_files_anchors_and_paths() -> None:
    source = REPO / "docs" / "example.md"
    text = "\n".join(
        [
            "# Title",
            "[ok](../README.md#verdicts) [self](#title) [web](https://example.com/x)",
            "[gone](missing.md) [bad anchor](../README.md#no-such-heading)",
            "see tests/test_no_such_module.py and tests/test_<kind>.py and /etc/healthd/x",
            "python -m healthd.no_such_module",
            "```",
            "[in code](not-a-link.md)",
            "```",
        ]
    )
    problems = list(link_problems(source, text)) + list(path_problems(source, text))
    assert problems == [
        "docs/example.md:3: link to 'missing.md': no such file",
        "docs/example.md:3: link to '../README.md#no-such-heading': no heading with that anchor",
        "docs/example.md:4: names 'tests/test_no_such_module.py', which does not exist",
        "docs/example.md:5: runs module 'healthd.no_such_module', which does not exist",
    ]


if __name__ == "__main__":
    found = all_problems()
    for problem in found:
        print(problem, file=sys.stderr)
    print(f"docs: {len(found)} broken references" if found else "docs: every reference resolves")
    sys.exit(1 if found else 0)
