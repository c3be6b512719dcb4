"""Route everything Python would print to stderr by itself through ``logging``.

Uncaught exceptions in threads, "Exception ignored in ..." reports, warnings and asyncio's
"Task exception was never retrieved" bypass the log formatter by default: a raw traceback in
the journal, and a line that is not JSON under ``--log-format json``. Each kind is logged
once, because a fault that repeats (a peer resetting every scrape) would otherwise flood.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from types import TracebackType
from typing import Any

log = logging.getLogger("healthd.stray")

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class OncePerKind:
    """Logs an error the first time its kind is seen, and then never again."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._logger = logger
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def error(self, kind: str, message: str, *args: object, exc_info: _ExcInfo | None) -> None:
        """Log ``message`` unless ``kind`` was logged before."""
        with self._lock:
            if kind in self._seen:
                return
            self._seen.add(kind)
        self._logger.error(message + " (logged once)", *args, exc_info=exc_info)

    def thread_exception(self, args: threading.ExceptHookArgs) -> None:
        """A ``threading.excepthook``."""
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        info = (args.exc_type, args.exc_value, args.exc_traceback)
        self.error(
            f"thread {name} {args.exc_type.__name__}", "thread %s failed", name, exc_info=info
        )

    def unraisable(self, args: Any) -> None:
        """A ``sys.unraisablehook``: an exception in a finalizer or a callback."""
        where = args.err_msg or "Exception ignored"
        info = None
        if args.exc_value is not None:
            info = (args.exc_type, args.exc_value, args.exc_traceback)
        self.error(f"unraisable {args.exc_type.__name__}", "%s: %r", where, args.object,
                   exc_info=info)  # fmt: skip

    def asyncio_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An asyncio exception handler."""
        message = str(context.get("message") or "error in the event loop")
        exc = context.get("exception")
        info = (type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None
        kind = f"asyncio {message} {type(exc).__name__ if exc is not None else ''}"
        self.error(kind, "event loop: %s", message, exc_info=info)


def route_to_logging(once: OncePerKind) -> None:
    """Send uncaught thread exceptions, unraisable exceptions and warnings to ``logging``."""
    logging.captureWarnings(True)
    threading.excepthook = once.thread_exception
    sys.unraisablehook = once.unraisable


def route_asyncio_to_logging(once: OncePerKind) -> None:
    """Send the running asyncio loop's unhandled errors to ``logging``, once per kind."""
    asyncio.get_running_loop().set_exception_handler(once.asyncio_exception)
