"""Online RL on one reward: prompt rounds of GRPO groups spread over ranks, rewards and group
advantages gathered across ranks. Subclasses implement the algorithm's update."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from opd.data.prompts import rank_slice, round_groups
from opd.models.backbone import Backbone
from opd.modules.policy import AdapterPolicy
from opd.objectives.advantages import group_advantages
from opd.rewards.base import Reward


class OnlineRL(AdapterPolicy):
    """Base of the teacher-RL modules: one reward, one prompt set, GRPO groups over ranks."""

    def __init__(self, backbone: Callable[[], Backbone], reward: dict[str, Reward], prompts: Sequence[dict],
                 sampler: Any, optimizer: Callable[..., torch.optim.Optimizer], lora: dict[str, Any] | None = None,
                 num_groups_per_round: int = 8, group_size: int = 8, global_std: bool = True,
                 grad_clip: float = 1.0, seed: int = 0, preview_prompts: Sequence[str] = ()) -> None:
        rows = list(prompts)
        if not rows:
            raise ValueError("prompts: the prompt set is empty")
        super().__init__(backbone, sampler, optimizer, lora, grad_clip, seed,
                         list(preview_prompts) or [r["prompt"] for r in rows[:8]])
        if len(reward) != 1:
            raise ValueError(f"reward: give exactly one reward (a `multi` reward for a mix), got {list(reward)}")
        self.reward_name, self.reward = next(iter(reward.items()))
        self.prompt_rows = rows
        self.num_groups_per_round = num_groups_per_round
        self.group_size = group_size
        self.global_std = global_std

    # -- one round ---------------------------------------------------------------------------
    def draw_round(self) -> tuple[list[dict], Tensor]:
        """This rank's prompt rows and their global group ids for the current round."""
        prompt_ids, group_ids = round_groups(len(self.prompt_rows), self.num_groups_per_round, self.group_size,
                                             self.seed, self.round)
        rank, world = self.global_rank, self.trainer.world_size
        mine = rank_slice(prompt_ids, rank, world)
        return [self.prompt_rows[i] for i in mine.tolist()], rank_slice(group_ids, rank, world).to(self.device)

    def score(self, latents: Tensor, rows: list[dict]) -> dict[str, Tensor]:
        """Decode and score with the training reward (NaN stops the run with a clear error)."""
        return self.score_images(self.reward, self.reward_name, latents, rows)

    def advantages(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """Group-normalised advantages over the whole round (all ranks), this rank's slice."""
        all_rewards = self.all_gather(rewards).reshape(-1)
        all_groups = self.all_gather(group_ids).reshape(-1)
        adv = group_advantages(all_rewards.float(), all_groups, global_std=self.global_std)
        return rank_slice(adv, self.global_rank, self.trainer.world_size)

    def log_rewards(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.gathered_means("reward", self.reward_name, scores)
