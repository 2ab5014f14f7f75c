"""Prompt sampling for online RL: groups of k images per prompt, spread across ranks.

As the references do (a k-repeat distributed sampler), each round draws ``num_groups`` distinct
prompts with a generator seeded by ``(seed, round)`` — the same on every rank — repeats each
``group_size`` times, shuffles, and gives every rank a contiguous slice. The k images of a prompt
may therefore live on different ranks; group statistics are computed after gathering. Everything
is a pure function of ``(seed, round)``, so a resumed run draws exactly the prompts it would
have drawn.
"""
from __future__ import annotations

import torch
from torch import Tensor

from opd.utils.seeds import ROUND_GROUPS, stream_seed


def round_groups(num_prompts: int, num_groups: int, group_size: int, seed: int, round_idx: int) -> tuple[Tensor, Tensor]:
    """Global ``(prompt_ids, group_ids)``, each ``[num_groups · group_size]``, shuffled."""
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"a round needs num_groups_per_round ≥ 1 and group_size ≥ 1 (≥ 2 for group advantages); "
                         f"got {num_groups} and {group_size}")
    if num_prompts < num_groups:
        raise ValueError(f"the prompt set has {num_prompts} prompts but a round needs {num_groups} distinct ones "
                         "(lower num_groups_per_round or use a larger prompt set)")
    g = torch.Generator().manual_seed(stream_seed(ROUND_GROUPS, seed, round_idx))
    prompts = torch.randperm(num_prompts, generator=g)[:num_groups]
    groups = torch.arange(num_groups).repeat_interleave(group_size)
    order = torch.randperm(groups.numel(), generator=g)
    return prompts[groups[order]], groups[order]


def rank_slice(values: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous share of a global round (sizes must divide evenly)."""
    if values.shape[0] % world_size:
        raise ValueError(f"{values.shape[0]} images per round do not split over {world_size} ranks; make "
                         "num_groups_per_round × group_size a multiple of the number of GPUs")
    per = values.shape[0] // world_size
    return values[rank * per : (rank + 1) * per]


class RoundTicks(torch.utils.data.IterableDataset):
    """An endless stream of ``None``: online-RL modules draw their own prompts each round (from
    :func:`round_groups`), Lightning only needs something to iterate."""

    def __iter__(self):
        while True:
            yield 0


def ticks_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RoundTicks(), batch_size=None)
