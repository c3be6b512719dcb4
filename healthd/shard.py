"""Which instance checks which component: rendezvous (highest-random-weight) hashing.

Every instance of a sharded fleet reads the same config and keeps only the components whose
name hashes highest for its own shard number. The assignment needs no coordination, and going
from N to N+1 shards moves only the ~1/(N+1) of the components that the new shard wins.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

#: More shards than this is a typo, not a fleet (each shard is a healthd instance).
MAX_SHARDS = 1000


def parse(value: str) -> tuple[int, int]:
    """``"2/3"`` -> ``(2, 3)``; ``ValueError`` unless ``1 <= i <= N <= MAX_SHARDS``."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", value)
    if match is None:
        raise ValueError(f'shard {value!r} must look like "i/N", for example "2/3"')
    index, shards = int(match[1]), int(match[2])
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shard {value!r}: N must be between 1 and {MAX_SHARDS}")
    if not 1 <= index <= shards:
        raise ValueError(f"shard {value!r}: i must be between 1 and N ({shards})")
    return index, shards


def _weight(name: str, shard: int) -> bytes:
    # A stable hash: Python's hash() of a str changes with every process (PYTHONHASHSEED).
    return hashlib.blake2b(f"{name}/{shard}".encode(), digest_size=8).digest()


def shard_of(name: str, shards: int) -> int:
    """The shard (1..``shards``) that checks the component ``name``."""
    return max(range(1, shards + 1), key=lambda shard: _weight(name, shard))


def assign(names: Iterable[str], shards: int) -> dict[str, int]:
    """Every name with its shard, in the order given."""
    return {name: shard_of(name, shards) for name in names}
