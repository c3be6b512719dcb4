"""healthd: polls every component of a platform and exports one truthful verdict."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("healthd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
