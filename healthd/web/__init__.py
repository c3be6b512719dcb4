"""The static status page: HTML, CSS and plain JavaScript, no build step, nothing external.

It reads ``status.json`` and ``history.json`` from its own directory, so it is installed next
to the status file (``healthd web install DIR``) and served by the same nginx location.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from healthd.exporters.status_file import write_atomic

#: The files of the page, as shipped in this package.
FILES = ("index.html", "status.css", "status.js")


def install(directory: Path) -> list[Path]:
    """Copy the page into ``directory`` (each file replaced atomically); return the paths."""
    package = resources.files(__name__)
    directory.mkdir(parents=True, exist_ok=True)  # write_atomic never creates directories
    installed = []
    for name in FILES:
        target = directory / name
        write_atomic(target, package.joinpath(name).read_bytes())
        installed.append(target)
    return installed
