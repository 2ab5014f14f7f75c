"""Several ranks for one evaluation (``torchrun --nproc_per_node N -m opd.evaluate``).

Each rank generates and scores a share of the batches; rank 0 gathers the per-image records and
writes the report. Only small Python objects travel (records, the output folder), so they travel
over gloo even on GPUs: no device pinning, and the same code runs on a CPU-only machine (``opd.evaluate``
under torchrun starts a gloo process group; the evaluation that ends a DDP training run opens a gloo
group beside the fit's NCCL one, :func:`gloo_ranks`). Images
go to the output folder from every rank, which therefore must be shared (one node, or a shared
file system).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world_size`` evaluation processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # the process group of the collectives (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th, starting at ``rank``."""
        return list(items)[self.rank :: self.world_size]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (``None`` elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            dist.barrier(group=self.group)


#: how long ranks wait for each other in an evaluation (rank 0 alone runs the cover search and the report)
TIMEOUT = timedelta(hours=3)


def gloo_ranks(rank: int, world_size: int, local_rank: int) -> Ranks:
    """The ranks of an initialised process group (e.g. a DDP fit's NCCL one), with a new gloo group
    over all of them for the evaluation's collectives. Every rank must call it (creating a group is
    collective)."""
    return Ranks(rank, world_size, local_rank, dist.new_group(backend="gloo", timeout=TIMEOUT))


def init_ranks() -> Ranks:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/…);
    a single process (no ``WORLD_SIZE`` or 1) needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    return Ranks(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
