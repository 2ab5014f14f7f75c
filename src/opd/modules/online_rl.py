"""Online RL: prompt rounds of GRPO groups spread over ranks, rewards and group advantages
gathered across ranks. Subclasses implement the algorithm's update.

One task (a prompt set and its reward) is the teacher setting. Several tasks, given as mappings
``name → prompt set`` and ``name → reward`` with the same names, give joint multi-reward RL: round
``r`` draws its groups from task ``r mod n`` and scores them with that task's reward (the paper's
multi-task baseline alternates prompt sets the same way).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from opd.data.prompts import rank_slice, round_groups
from opd.models.backbone import Backbone
from opd.modules.policy import AdapterPolicy
from opd.objectives.advantages import group_advantages
from opd.rewards.base import Reward
from opd.sampling import Trajectory
from opd.utils.pieces import ordered_pieces


class OnlineRL(AdapterPolicy):
    """Base of the teacher-RL modules: GRPO groups over ranks on one task (or alternating tasks)."""

    def __init__(self, backbone: Callable[[], Backbone], reward: dict[str, Reward],
                 prompts: Sequence[dict] | Mapping[str, Sequence[dict]], sampler: Any,
                 optimizer: Callable[..., torch.optim.Optimizer], lora: dict[str, Any] | None = None,
                 num_groups_per_round: int = 8, group_size: int = 8, global_std: bool = True,
                 grad_clip: float = 1.0, seed: int = 0, preview_prompts: Sequence[str] = (),
                 rollout_chunks: int = 2, init_adapter: str | None = None) -> None:
        tasks = _tasks(reward, prompts)
        previews = list(preview_prompts) or [r["prompt"] for _, rows in tasks.values()
                                             for r in rows[: max(1, 8 // len(tasks))]]
        super().__init__(backbone, sampler, optimizer, lora, grad_clip, seed, previews, init_adapter)
        self.tasks = tasks
        self.num_groups_per_round = num_groups_per_round
        self.group_size = group_size
        self.global_std = global_std
        self.rollout_chunks = rollout_chunks
        self._score_wait_s = 0.0  # seconds the last round waited for its scores (collect_scores)
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-reward")

    @property
    def task_name(self) -> str:
        """The task of the current round (its reward's name in log keys)."""
        names = list(self.tasks)
        return names[self.round % len(names)]

    @property
    def reward_name(self) -> str:
        return self.task_name

    @property
    def reward(self) -> Reward:
        return self.tasks[self.task_name][0]

    # -- one round ---------------------------------------------------------------------------
    def draw_round(self) -> tuple[list[dict], Tensor]:
        """This rank's prompt rows and their global group ids for the current round."""
        rows = self.tasks[self.task_name][1]
        prompt_ids, group_ids = round_groups(len(rows), self.num_groups_per_round, self.group_size,
                                             self.seed, self.round)
        rank, world = self.global_rank, self.trainer.world_size
        mine = rank_slice(prompt_ids, rank, world)
        return [rows[i] for i in mine.tolist()], rank_slice(group_ids, rank, world).to(self.device)

    def sample_and_score(self, rows: list[dict], *, keep_means: bool = False) -> tuple[Trajectory, dict[str, Tensor]]:
        """:meth:`sample_and_submit`, then wait for the scores (:meth:`collect_scores`)."""
        traj, pending = self.sample_and_submit(rows, keep_means=keep_means)
        return traj, self.collect_scores(pending)

    def sample_and_submit(self, rows: list[dict], *, keep_means: bool = False) -> tuple[Trajectory, list[Future]]:
        """Roll out the active adapter in ``rollout_chunks`` pieces and score each piece in a worker
        thread while the next one samples, so CPU rewards (OCR, the judge) overlap GPU work; the
        scores are still being computed when this returns (:meth:`collect_scores` waits for them), so
        work that does not need them can overlap the last piece's too. A non-finite rollout stops the
        run (on every rank) before it is scored."""
        parts, futures = [], []
        for k, chunk in enumerate(ordered_pieces(rows, self.rollout_chunks)):
            with torch.no_grad():
                traj = self.sample([r["prompt"] for r in chunk], kernel=self.sampler.kernel,
                                   noise_level=self.sampler.noise_level, guidance_scale=self.sampler.guidance_scale,
                                   keep_means=keep_means, purpose=10 * (k + 1))
            parts.append(traj)
            self.raise_if_nonfinite(f"scoring the rollouts of reward {self.reward_name!r}")  # all ranks agree
            futures.append(self._reward_pool.submit(self.score, traj.final.detach(), chunk))
        return Trajectory.cat(parts), futures

    def collect_scores(self, pending: list[Future]) -> dict[str, Tensor]:
        """The scores of :meth:`sample_and_submit`'s pieces, in order (an error on any rank stops every rank).
        How long the round waited here for them is logged as ``time/score_wait_s`` (:meth:`log_rewards`):
        the part of the rewards' cost that no GPU work hid."""
        start = time.perf_counter()
        results = self.results(pending, f"scoring with reward {self.reward_name!r}")
        self._score_wait_s = time.perf_counter() - start
        return {k: torch.cat([r[k] for r in results]) for k in results[0]}

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
        """The rewards' means over all ranks, and this rank's wait for them (:meth:`collect_scores`)."""
        return {**self.gathered_means("reward", self.reward_name, scores),
                "time/score_wait_s": torch.tensor(self._score_wait_s)}

    def update_round(self, num_samples: int, num_terms: int, num_updates: int,
                     term_loss: Callable[[Tensor, int], tuple[Tensor, dict[str, Tensor]]],
                     label: str) -> dict[str, Tensor]:
        """The round's ``num_updates`` optimiser steps, step ``u`` on the ``u``-th of ``num_updates``
        nearly equal slices of the round's ``num_samples`` samples. A slice's loss is the mean over
        ``k < num_terms`` (trained steps, noised times) of ``term_loss(indices, k) -> (loss, metrics)``,
        back-propagated term by term; ``f"{label} {k}"`` names a non-finite term.

        Returns the round means to log: each metric's mean over every term of every update, and
        ``train/grad_norm``, the pre-clip gradient norm's mean over the updates."""
        means: dict[str, Tensor] = {}

        def add(metrics: dict[str, Tensor], count: int) -> None:
            for key, value in metrics.items():
                means[key] = means.get(key, 0.0) + value.detach().float() / count

        for indices in torch.arange(num_samples, device=self.device).tensor_split(num_updates):
            for k in range(num_terms):
                loss, metrics = term_loss(indices, k)
                self.note_loss(f"{label} {k}", loss, metrics)
                self.manual_backward(loss / num_terms)
                add(metrics, num_terms * num_updates)
            add({"train/grad_norm": self.optimizer_step_with_clip()}, num_updates)
        return means


def _tasks(reward: Mapping[str, Reward], prompts: Sequence[dict] | Mapping[str, Sequence[dict]]
           ) -> dict[str, tuple[Reward, list[dict]]]:
    """``task → (reward, prompt rows)``; one reward with one prompt set, or matching mappings."""
    if not reward:
        raise ValueError("reward: no reward configured (pick one from conf/reward, e.g. reward=ocr)")
    if isinstance(prompts, Mapping):
        if set(prompts) != set(reward):
            raise ValueError(f"multi-task RL needs one reward per prompt set with the same names: "
                             f"module.prompts has {sorted(prompts)}, reward has {sorted(reward)}")
        tasks = {name: (reward[name], list(prompts[name])) for name in prompts}
    else:
        if len(reward) != 1:
            raise ValueError(f"reward: give exactly one reward (a `multi` reward for a mix, or module.prompts as "
                             f"a mapping with one prompt set per reward), got {list(reward)}")
        name, fn = next(iter(reward.items()))
        tasks = {name: (fn, list(prompts))}
    for name, (_, rows) in tasks.items():
        if not rows:
            raise ValueError(f"prompts: the prompt set of task {name!r} is empty")
    return tasks
