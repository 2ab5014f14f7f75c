"""A sequence cut into nearly equal, ordered pieces (rollout pieces of a round, a batch over worker processes)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def ordered_pieces(items: Sequence[T], n: int) -> list[Sequence[T]]:
    """``items`` in ``min(n, len(items))`` contiguous, non-empty pieces whose sizes differ by at most one, the
    larger ones first (no items: one empty piece); joined in order they are ``items`` again."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for k in range(n):
        stop = start + size + (k < extra)
        out.append(items[start:stop])
        start = stop
    return out
