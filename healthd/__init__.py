"""healthd: polls every component of a platform and exports one truthful verdict."""

import sys
from importlib.metadata import PackageNotFoundError, version

# healthd never runs httpx's command line, yet httpx imports it whenever rich and click are
# installed: 8 MiB of RSS in every daemon (docs/performance.md). A None in sys.modules makes
# that import fail, and httpx falls back to its stub ``main``.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

try:
    __version__ = version("healthd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
