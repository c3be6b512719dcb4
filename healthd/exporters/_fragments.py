"""Per-component renders kept until a component's state changes: what makes exports incremental.

The state store hands out the very same ``ComponentState`` object while a component's judged
state is unchanged, so a cache keyed on the object (``is``) knows, without comparing anything,
which components an export must render afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from healthd.model import ComponentState

T = TypeVar("T")


class FragmentCache(Generic[T]):
    """Each component's fragment, in name order, rendered by ``render(name, state)`` only when
    the component's state object changes. Not thread-safe: its owner holds a lock around it.

    :param render: turns one component into its fragment.
    :param empty: what a row holds before its first render (never returned).
    """

    def __init__(self, render: Callable[[str, ComponentState], T], empty: T) -> None:
        self._render = render
        self._empty = empty
        self._names: list[str] = []
        self._states: list[ComponentState | None] = []
        self._fragments: list[T] = []
        self._rows: dict[str, int] = {}
        #: How many components the last ``update`` had to render afresh.
        self.rendered_components = 0

    def update(self, components: Mapping[str, ComponentState]) -> list[T]:
        """Every component's fragment, in name order, rendering only those that changed."""
        if components.keys() != self._rows.keys():
            self._reorder(components)
        rendered = 0
        states, fragments = self._states, self._fragments
        for row, name in enumerate(self._names):
            state = components[name]
            if states[row] is not state:
                states[row] = state
                fragments[row] = self._render(name, state)
                rendered += 1
        self.rendered_components = rendered
        return fragments

    def _reorder(self, names: Mapping[str, ComponentState]) -> None:
        """Components came or went: lay the rows out again, keeping every cached fragment."""
        old = self._rows
        self._names = sorted(names)
        self._rows = {name: row for row, name in enumerate(self._names)}
        rows = [old.get(name) for name in self._names]
        self._states = [None if row is None else self._states[row] for row in rows]
        self._fragments = [self._empty if row is None else self._fragments[row] for row in rows]
