"""Per-component renders kept until a component's state changes: what makes exports incremental.

The state store hands out the very same ``ComponentState`` object while a component's judged
state is unchanged, so a cache keyed on the object (``is``) knows, without comparing anything,
which components an export must render afresh.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Mapping

from healthd.model import ComponentState


class FragmentCache:
    """Each component's fragments, in name order, rendered by ``render(name, state)`` only when
    the component's state object changes. Not thread-safe: its owner holds a lock around it.

    A render gives one fragment per column (a metric family, say), and each column is kept as
    one string with every component's fragment in turn, plus their lengths. Kept as one object
    per fragment instead, 10,000 components' metrics held 5 MiB of object headers and tuples
    beside their 10 MB of text, and an export joined 130,000 of them again; here an update
    splices only the changed fragments into each column.

    :param render: turns one component into its fragments, one per column.
    :param columns: how many fragments ``render`` returns.
    """

    def __init__(
        self, render: Callable[[str, ComponentState], tuple[bytes, ...]], columns: int
    ) -> None:
        self._render = render
        self._names: list[str] = []
        self._states: list[ComponentState | None] = []
        self._rows: dict[str, int] = {}
        self._columns: list[bytes] = [b""] * columns
        self._lengths: list[array[int]] = [array("I") for _ in range(columns)]
        #: How many components the last ``update`` had to render afresh.
        self.rendered_components = 0

    def update(self, components: Mapping[str, ComponentState]) -> list[bytes]:
        """Every column, each holding every component's fragment in name order, rendering
        only the components that changed. The list is the cache's own: read it under the
        owner's lock, and do not change it."""
        if components.keys() != self._rows.keys():
            self._reorder(components)
        states = self._states
        changed: list[tuple[int, tuple[bytes, ...]]] = []
        for row, name in enumerate(self._names):
            state = components[name]
            if states[row] is not state:
                states[row] = state
                changed.append((row, self._render(name, state)))
        self.rendered_components = len(changed)
        if changed:
            for column in range(len(self._columns)):
                self._splice(column, [(row, fragments[column]) for row, fragments in changed])
        return self._columns

    def _splice(self, column: int, changed: list[tuple[int, bytes]]) -> None:
        """Put the changed rows' new fragments into one column, copying the runs between."""
        lengths = self._lengths[column]
        starts = list(itertools.accumulate(lengths, initial=0))
        old = memoryview(self._columns[column])
        parts: list[bytes | memoryview] = []
        at = 0
        for row, fragment in changed:
            if starts[row] > at:
                parts.append(old[at : starts[row]])
            parts.append(fragment)
            at = starts[row + 1]
            lengths[row] = len(fragment)
        parts.append(old[at:])
        self._columns[column] = b"".join(parts)

    def _reorder(self, components: Mapping[str, ComponentState]) -> None:
        """Components came or went: lay the rows out again, keeping every cached fragment."""
        old_rows = self._rows
        self._names = sorted(components)
        self._rows = {name: row for row, name in enumerate(self._names)}
        kept = [old_rows.get(name) for name in self._names]
        self._states = [None if row is None else self._states[row] for row in kept]
        for column, lengths in enumerate(self._lengths):
            starts = list(itertools.accumulate(lengths, initial=0))
            old = memoryview(self._columns[column])
            self._columns[column] = b"".join(
                old[starts[row] : starts[row + 1]] for row in kept if row is not None
            )
            self._lengths[column] = array("I", (0 if row is None else lengths[row] for row in kept))
