"""Per-component renders kept until a component's state changes: what makes exports incremental.

The state store hands out the very same ``ComponentState`` object while a component's judged
state is unchanged, so a cache keyed on the object (``is``) knows, without comparing anything,
which components an export must render afresh.
"""

from __future__ import annotations

import itertools
import zlib
from array import array
from collections.abc import Callable, Mapping
from operator import eq, is_not

from healthd.model import ComponentState
from healthd.pacing import pacer

#: ``refresh(name, old, new, old_fragments)``: see ``FragmentCache``.
Refresh = Callable[
    [str, ComponentState, ComponentState, tuple[memoryview, ...]], tuple[bytes, ...] | None
]


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
    :param same: whether a component's new state renders exactly as its old one, for columns
        that read only a few fields; without it, only the same object does.
    :param packed: keep the columns zlib-compressed between updates, for columns that seldom
        change: a reader pays to unpack them (2 ms a megabyte), an update that changes them
        to pack them again (3 ms a megabyte), and memory holds a twentieth of the text.
    :param refresh: ``refresh(name, old, new, old_fragments)`` gives the new fragments made
        from the old ones, or ``None`` to render afresh: for renders most of whose text
        outlives a check, so that a check changes only its own few fields.
    """

    def __init__(
        self,
        render: Callable[[str, ComponentState], tuple[bytes, ...]],
        columns: int,
        *,
        same: Callable[[ComponentState, ComponentState], bool] | None = None,
        packed: bool = False,
        refresh: Refresh | None = None,
    ) -> None:
        self._render = render
        self._same = same
        self._packed = packed
        self._refresh = refresh
        self._names: list[str] = []
        self._states: list[ComponentState | None] = []
        # Unless the mapping gives them in name order (``_sorted``): the components' names in
        # the order it last gave them, and for each row where its component stands in that order.
        self._order: list[str] = []
        self._at = array("I")
        self._sorted = True
        self._columns: list[bytes | bytearray] = [self._pack(bytearray()) for _ in range(columns)]
        self._lengths: list[array[int]] = [array("I") for _ in range(columns)]
        #: How many components the last ``update`` had to render afresh.
        self.rendered_components = 0

    def update(self, components: Mapping[str, ComponentState]) -> list[bytes | bytearray]:
        """Every column, each holding every component's fragment in name order, rendering
        only the components that changed. Read the columns under the owner's lock, and do
        not change them: unless packed, they are the cache's own."""
        states = self._current(components)
        # Told apart in C: a Python loop over 10,000 rows cost a millisecond on every export.
        changed = list(itertools.compress(itertools.count(), map(is_not, states, self._states)))
        if (same := self._same) is not None:
            kept, rendered = self._states, []
            for row in changed:
                if (old := kept[row]) is not None and same(old, states[row]):
                    kept[row] = states[row]  # renders as before; the newer one is compared next
                else:
                    rendered.append(row)
            changed = rendered
        self.rendered_components = len(changed)
        if changed:
            return self._rewrite(changed, states)
        return [self._unpack(column) for column in self._columns]

    def _current(self, components: Mapping[str, ComponentState]) -> list[ComponentState]:
        """Each row's state now, after laying the rows out again if components came or went.

        Read in the mapping's own order and put in name order in C: looking 10,000 names up
        touched every name's string and cost 3 ms in the running daemon, where the objects
        lie scattered through the heap. A snapshot keeps its order while the set holds, so
        the order is compared by identity, touching no string.
        """
        order = list(components)
        if order != (self._names if self._sorted else self._order):
            names = self._names
            if len(order) != len(names) or not all(name in components for name in names):
                self._reorder(components)
            row_of = {name: at for at, name in enumerate(order)}
            at_rows = array("I", map(row_of.__getitem__, self._names))
            # The mapping already iterates in name order (a common case): nothing more to keep.
            self._sorted = all(itertools.starmap(eq, enumerate(at_rows)))
            self._order, self._at = ([], array("I")) if self._sorted else (order, at_rows)
        values = list(components.values())
        return values if self._sorted else list(map(values.__getitem__, self._at))

    def _rewrite(self, changed: list[int], states: list[ComponentState]) -> list[bytes | bytearray]:
        """Write every column afresh: the runs between changed rows copied from the old one,
        and each changed row rendered and appended in turn. A render's fragments are dropped
        as soon as they are copied, so the first export of 10,000 components holds one
        component's fragments at a time rather than all 130,000 (whose freed memory stayed
        scattered through the heap, 6 MiB of RSS)."""
        # Arrays, not lists: 130,000 int objects at once left pymalloc's arenas scattered.
        starts = [array("Q", itertools.accumulate(lengths, initial=0)) for lengths in self._lengths]
        old = [memoryview(self._unpack(column)) for column in self._columns]
        texts: list[bytes | bytearray] = [bytearray() for _ in old]
        after = 0  # the first row not yet copied or rendered
        pace = pacer()
        names, kept, refresh = self._names, self._states, self._refresh
        for row in changed:
            pace()
            previous, state = kept[row], states[row]
            kept[row] = state
            fragments = None
            if previous is not None and refresh is not None:
                olds = tuple(
                    view[at[row] : at[row + 1]] for view, at in zip(old, starts, strict=True)
                )
                fragments = refresh(names[row], previous, state, olds)
            if fragments is None:
                fragments = self._render(names[row], state)
            for column, fragment in enumerate(fragments):
                at = starts[column]
                texts[column] += old[column][at[after] : at[row]]
                texts[column] += fragment
                self._lengths[column][row] = len(fragment)
            after = row + 1
        for column, view in enumerate(old):
            texts[column] += view[starts[column][after] :]
            view.release()
        self._columns = [self._pack(text) for text in texts]
        return texts

    def _reorder(self, components: Mapping[str, ComponentState]) -> None:
        """Components came or went: lay the rows out again, keeping every cached fragment."""
        old_rows = {name: row for row, name in enumerate(self._names)}
        self._names = sorted(components)
        kept = [old_rows.get(name) for name in self._names]
        self._states = [None if row is None else self._states[row] for row in kept]
        for column, lengths in enumerate(self._lengths):
            starts = list(itertools.accumulate(lengths, initial=0))
            old = memoryview(self._unpack(self._columns[column]))
            self._columns[column] = self._pack(
                bytearray().join(
                    old[starts[row] : starts[row + 1]] for row in kept if row is not None
                )
            )
            old.release()
            self._lengths[column] = array("I", (0 if row is None else lengths[row] for row in kept))

    def _pack(self, text: bytes | bytearray) -> bytes | bytearray:
        return zlib.compress(text, 1) if self._packed else text

    def _unpack(self, column: bytes | bytearray) -> bytes | bytearray:
        return zlib.decompress(column) if self._packed else column
