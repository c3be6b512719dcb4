"""Resources a probe keeps between runs, and the ones every check shares."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from healthd.heartbeats import PingStore

T = TypeVar("T")


class SharedResources:
    """Expensive objects built once per daemon and shared by every check.

    Building an ``ssl.SSLContext`` from the CA bundle costs about 21 ms of CPU, so one context
    serves every check with the same verification settings.
    """

    def __init__(self) -> None:
        self._ssl: dict[tuple[bool, Path | None], ssl.SSLContext] = {}
        #: Leased resources by key.
        self._leases: dict[Hashable, _Shared] = {}
        #: The pings jobs pushed, for the ``heartbeat`` kind; ``None`` outside the daemon.
        self.heartbeats: PingStore | None = None

    def ssl_context(self, *, verify: bool = True, ca_file: Path | None = None) -> ssl.SSLContext:
        """A client context: the system trust store, or ``ca_file``, or no verification."""
        key = (verify, ca_file)
        if key not in self._ssl:
            if not verify:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            self._ssl[key] = context
        return self._ssl[key]

    def lease(
        self, key: Hashable, factory: Callable[[], T], close: Callable[[T], Awaitable[None]]
    ) -> tuple[T, Lease]:
        """The resource shared under ``key`` (built by ``factory`` for its first holder), and
        the holder's ``Lease``; the last holder to give it back closes it with ``close``.

        Checks with identical client settings share one HTTP client and its connections this
        way: at 10,000 checks a client each would be most of the daemon's memory.
        """
        entry = self._leases.get(key)
        if entry is None:
            entry = self._leases[key] = _Shared(factory(), close, key)
        entry.holders += 1
        resource: T = entry.resource
        return resource, Lease(self, entry)

    @property
    def leases(self) -> int:
        """How many shared resources are held now."""
        return len(self._leases)


class _Shared:
    """One leased resource: its closer, the key it was first leased under, how many hold it."""

    __slots__ = ("close", "holders", "key", "resource")

    def __init__(
        self, resource: Any, close: Callable[[Any], Awaitable[None]], key: Hashable
    ) -> None:
        self.resource = resource
        self.close = close
        self.key = key
        self.holders = 0


class Lease:
    """One holder's share of a resource from ``SharedResources.lease``.

    Slotted, and pointing at the shared entry, which keeps the key, so that each of 10,000
    holders costs a small object rather than a closure with its cells and its own copy of the
    key (about 0.4 KiB each).
    """

    __slots__ = ("_entry", "_owner")

    def __init__(self, owner: SharedResources, entry: _Shared) -> None:
        self._owner: SharedResources | None = owner
        self._entry = entry

    async def give_back(self) -> None:
        """Give the resource back, once; the last holder's return closes it."""
        owner, entry = self._owner, self._entry
        if owner is None:
            return
        self._owner = None
        entry.holders -= 1
        if entry.holders == 0 and owner._leases.get(entry.key) is entry:
            del owner._leases[entry.key]
            await entry.close(entry.resource)


class ProbeContext:
    """One check's private resources: a client or pool built on first use, closed at the end.

    The scheduler creates one per check and calls ``aclose()`` when the check stops (shutdown,
    or a reload that changes or removes it). Slotted, with its table made on first use: there
    is one per check, 10,000 of them in a large fleet.
    """

    __slots__ = ("_resources", "name", "shared")

    def __init__(self, shared: SharedResources, name: str = "") -> None:
        self.shared = shared
        #: The component's name, for kinds that look their facts up by it (``heartbeat``).
        self.name = name
        # Each resource with its closer, in the order built.
        self._resources: dict[str, tuple[Any, Callable[[Any], Awaitable[None]] | None]] = {}

    def get(
        self,
        key: str,
        factory: Callable[[], T],
        close: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """The resource stored under ``key``, built by ``factory`` the first time; ``close``
        closes it with the check (none for plain state, such as counts from the last run)."""
        found = self._resources.get(key)
        if found is None:
            found = self._resources[key] = (factory(), close)
        value: T = found[0]
        return value

    async def aclose(self) -> None:
        """Close every resource, newest first. Errors while closing are not worth a crash."""
        resources, self._resources = self._resources, {}
        for resource, close in reversed(resources.values()):
            if close is None:
                continue
            # Closing a client whose connection already broke may fail; there is nothing to do.
            with contextlib.suppress(Exception):
                await close(resource)
