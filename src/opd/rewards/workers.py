"""Per-image reward analysis in worker processes, for rewards whose cost is Python code per image.

The mini world's rule judges (:class:`~opd.rewards.geneval_mini.GenEvalMini`,
:class:`~opd.rewards.aesthetic_mini.AestheticMini`) analyse each image on its own in Python and NumPy:
small arrays, so the GIL is held nearly all the time and threads do not help (two threads score no
faster than one), while the training loop waits for the scores. :class:`ImageWorkers` maps such a
per-image function over a batch in ``num_workers`` processes, in contiguous slices, and returns the
results in order: the same values as the loop in this process, on more cores. ``num_workers=1``
(the default of the rewards) is that loop, with no process started.

The processes come from the ``forkserver`` start method (``spawn`` where there is none): they never
inherit a CUDA context or a training loop's threads from the process that asks, and they are
started on the first batch and reused until the pool is closed or the program exits. The function
and its results cross processes by pickling: a module-level function (or a ``functools.partial``
of one) and plain data.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from opd.utils.pieces import ordered_pieces

T = TypeVar("T")
R = TypeVar("R")


def _apply(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(item) for item in items]


def check_num_workers(owner: str, num_workers: int) -> int:
    """``num_workers`` as an int ≥ 1, or a ValueError naming ``owner``."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"{owner}: num_workers={num_workers!r} must be an integer >= 1 (1: score in this process)")
    return num_workers


class ImageWorkers:
    """``map(fn, items)`` = ``[fn(x) for x in items]``, spread over ``num_workers`` processes."""

    def __init__(self, num_workers: int = 1, owner: str = "reward") -> None:
        self.num_workers = check_num_workers(owner, num_workers)
        self.owner = owner
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` of every item, in order (in this process when one worker or one item)."""
        if self.num_workers == 1 or len(items) < 2:
            return _apply(fn, items)
        parts = ordered_pieces(items, self.num_workers)
        try:
            return [r for part in self._executor().map(_apply, [fn] * len(parts), parts) for r in part]
        except BrokenProcessPool as err:
            self.close()
            raise RuntimeError(f"{self.owner}: a scoring worker process died ({err}); "
                               f"num_workers=1 scores in this process") from err

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.num_workers, mp_context=context)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (a later ``map`` starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:  # a reward is pickled (DDP spawn, deep copies): not its processes
        return {**self.__dict__, "_pool": None}
