"""systemd's notify protocol, and a watchdog that is fed only while healthd makes progress.

The protocol is a datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``; a leading ``@`` names
an abstract socket. Without the variable every call does nothing, so healthd runs the same under
systemd, in a container or in a terminal.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable

import anyio

log = logging.getLogger("healthd.watchdog")


class Notifier:
    """Sends ``sd_notify`` messages without ever blocking the event loop.

    The socket is non-blocking: a message the service manager's queue cannot take right now
    (``EAGAIN``, ``ENOBUFS``) is dropped, not waited for, because a blocking ``sendto`` held
    the loop, and every check, for as long as the queue stayed full. Each dropped message is
    counted through ``on_dropped``; each kind of failure is logged once. A failure never stops
    the daemon.
    """

    def __init__(
        self,
        environ: dict[str, str] | None = None,
        *,
        on_dropped: Callable[[], None] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        self._logged: set[int | None] = set()
        #: Called once for every message that could not be sent.
        self.on_dropped = on_dropped
        self.watchdog_seconds = _watchdog_seconds(env)

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines; ``send(READY=1, STATUS="ok")``. Returns whether it was sent."""
        if self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message, self._address)
        except OSError as exc:
            self._dropped(exc, message)
            return False
        return True

    def _dropped(self, exc: OSError, message: bytes) -> None:
        if self.on_dropped is not None:
            self.on_dropped()
        if exc.errno in self._logged:
            return
        self._logged.add(exc.errno)
        if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
            log.warning(
                "the service manager's notify queue is full; dropping messages such as %s "
                "(counted in healthd_notify_dropped_total, logged once)",
                message.split(b"\n", 1)[0].decode(),
            )
        else:
            log.warning(
                "cannot notify the service manager at $NOTIFY_SOCKET: %s (logged once)",
                exc.strerror or exc,
            )

    def ready(self, status: str) -> None:
        """Start-up is complete."""
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        """A one-line summary for ``systemctl status``."""
        self.send(STATUS=status)

    def reloading(self) -> None:
        """A reload has begun; ``READY=1`` ends it."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.send(STOPPING=1, STATUS="stopping")

    def watchdog(self) -> None:
        """Tell the service manager healthd is alive and making progress."""
        self.send(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_seconds(env: os._Environ[str] | dict[str, str]) -> float | None:
    """The watchdog interval asked for by systemd, if it is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000


async def feed_watchdog(
    notifier: Notifier, interval_seconds: float, stuck: Callable[[], list[str]]
) -> None:
    """Send ``WATCHDOG=1`` every ``interval_seconds`` while ``stuck()`` names nothing.

    This runs in the event loop on purpose: a blocked loop stops the pings, and systemd then
    restarts healthd, which a free-running thread would have hidden.
    """
    warned = False
    while True:
        problems = stuck()
        if not problems:
            notifier.watchdog()
            if warned:
                log.warning("progress again; feeding the watchdog")
            warned = False
        elif not warned:
            log.error("not feeding the watchdog: no progress in %s", ", ".join(problems))
            warned = True
        await anyio.sleep(interval_seconds)
