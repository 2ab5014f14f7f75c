"""Flow-GRPO / GRPO-Guard teacher training (the PPO-style family).

One round: SDE rollout of the student adapter on this round's prompt groups (log-probs and
means stored) → rewards → group advantages over all ranks → ``num_updates_per_round`` optimiser
steps, each on a slice of the round, accumulating the per-step loss over the trained steps
(``timestep_fraction`` of the schedule, in order). The loss object decides the algorithm
(``GRPOLoss`` or ``GRPOGuardLoss``); this module only orchestrates.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from opd.modules.online_rl import OnlineRL
from opd.sampling import Trajectory, transition


class GRPOTeacher(OnlineRL):
    """``objective`` is a GRPO-family loss ``(log_prob, old_log_prob, advantages, mean=, ref_mean=,
    std=, delta=, old_mean=) -> (loss, metrics)``.

    Samples whose advantage is exactly 0 (groups with equal rewards) are kept: their policy
    gradient is 0 anyway, and keeping them gives every rank the same number of backward passes
    under DDP (the references drop them, which only changes the KL term's averaging).
    """

    def __init__(self, *args: Any, objective: Any, timestep_fraction: float = 0.99,
                 num_updates_per_round: int = 2, train_guidance_scale: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.timestep_fraction = timestep_fraction
        self.num_updates_per_round = num_updates_per_round
        self.train_guidance_scale = (self.sampler.guidance_scale if train_guidance_scale is None
                                     else train_guidance_scale)

    def run_round(self) -> dict[str, Tensor]:
        rows, group_ids = self.draw_round()
        if self.sampler.noise_level <= 0 or self.sampler.kernel == "ode":
            raise ValueError(f"sampler.kernel={self.sampler.kernel!r} with noise_level={self.sampler.noise_level} "
                             "is deterministic: GRPO needs an SDE sampler (e.g. sampler=flow_sde)")
        traj, scores = self.sample_and_score(rows, keep_means=True)
        adv = self.advantages(scores["reward"], group_ids)
        metrics = self.log_rewards(scores)
        self.note_nonfinite(f"the group advantages of reward {self.reward_name!r}", adv)
        metrics.update(self.update_round(
            adv.shape[0], max(1, int(self.sampler.num_steps * self.timestep_fraction)), self.num_updates_per_round,
            lambda idx, j: self.step_loss(traj, adv, idx, j),
            f"the {type(self.objective).__name__} loss at trained step"))
        metrics["train/zero_adv_frac"] = (adv == 0).float().mean()
        return metrics

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any, adapter: str | None) -> Tensor:
        """The training-forward velocity (CFG ``train_guidance_scale``) under ``adapter``."""
        return self.velocity_under(adapter, x, sigma, cond, self.train_guidance_scale)

    def step_loss(self, traj: Trajectory, adv: Tensor, idx: Tensor, j: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective at trained step ``j`` for samples ``idx``; only the student's mean has grad."""
        x, x_next = traj.latents[idx, j], traj.latents[idx, j + 1]
        sigma, sigma_next = traj.sigmas[j], traj.sigmas[j + 1]
        cond = traj.cond[idx]
        kernel, a = self.sampler.kernel, self.sampler.noise_level
        step = transition(kernel, x, self.velocity(x, sigma, cond, self.STUDENT), sigma, sigma_next, a)
        ref_mean = None
        if getattr(self.objective, "kl_weight", 0.0) > 0:
            ref_mean = transition(kernel, x, self.velocity(x, sigma, cond, None), sigma, sigma_next, a).mean
        return self.objective(step.log_prob(x_next), traj.log_probs[idx, j], adv[idx], mean=step.mean,
                              ref_mean=ref_mean, std=step.std, delta=sigma - sigma_next,
                              old_mean=traj.means[idx, j])
