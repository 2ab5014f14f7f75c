"""GRPO-Guard: Flow-GRPO with a normalised ratio and per-step re-weighting (docs/algorithms.md, GRPO-Guard).

**RatioNorm.** With ``x' = μ_old + s ξ`` drawn at rollout, ``δ = μ_θ − μ_old`` and ``m = mean_D δ²``,
the raw log-ratio is ``ℓ_θ − ℓ_old = mean_D(ξ δ)/s − m/(2 s²)``: its mean under the old policy is
``−m/(2 s²) < 0`` and depends on the step through ``s``, so the clip band of a fixed ε sits off
centre and differently at each step. GRPO-Guard uses
``log ρ̃ = s (ℓ_θ − ℓ_old) + m/(2 s) = mean_D(ξ δ)``, mean 0 at every step.
``per_sample=False`` reproduces the released code, which averages ``δ²`` over the whole batch.

**Re-weighting.** ``L_pol,k = (1/Δ_k) · mean_i max(−A ρ̃, −A clip(ρ̃, 1 ± ε))`` (``reweight=True``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from opd.objectives.gaussian import per_sample_scalar
from opd.objectives.grpo import GRPOLoss


def ratio_norm(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor,
               std: Tensor | float, per_sample: bool = True) -> Tensor:
    """``log ρ̃ = s (ℓ_θ − ℓ_old) + m/(2 s)``, ``[B]``.

    ``log_prob, old_log_prob [B]`` (means over ``D``, as ``Transition.log_prob``); ``mean [B, ...]`` =
    μ_θ (carries gradient), ``old_mean [B, ...]`` = μ_old stored at rollout; ``std`` = the step's
    ``s_k`` (scalar, ``[B]`` or ``[B, 1, ...]``). ``m = mean_D δ²`` per sample, or over the whole batch
    with ``per_sample=False``.
    """
    s = per_sample_scalar(std, log_prob.shape[0], "std").to(log_prob.device)
    sq = (mean.float() - old_mean.detach().float()).square()
    m = sq.flatten(1).mean(dim=1) if per_sample else sq.mean()
    return s * (log_prob.float() - old_log_prob.float()) + m / (2 * s)


class GRPOGuardLoss(GRPOLoss):
    """:class:`GRPOLoss` with RatioNorm and ``1/Δ_k`` re-weighting of the policy term.

    Defaults follow GRPO-Guard: ε = 2e-6 (OCR, GenEval; 4e-6 PickScore), β = 0.
    """

    def __init__(self, clip_range: float = 2e-6, kl_weight: float = 0.0, exact_kl: bool = True,
                 per_sample: bool = True, reweight: bool = True) -> None:
        super().__init__(clip_range=clip_range, kl_weight=kl_weight, exact_kl=exact_kl)
        self.per_sample = per_sample
        self.reweight = reweight

    def __call__(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                 mean: Tensor | None = None, ref_mean: Tensor | None = None,
                 std: Tensor | float | None = None, delta: Tensor | float | None = None,
                 old_mean: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` for one step; arguments as :meth:`GRPOLoss.__call__` plus
        ``old_mean [B, ...]`` = μ_old stored at rollout. ``mean``, ``old_mean`` and ``std`` are required,
        ``delta`` too when ``reweight``. The ratio metrics refer to ρ̃; ``train/ratio_raw_mean`` is the
        mean of the unnormalised ρ (below 1 on average: the bias RatioNorm removes)."""
        if mean is None or old_mean is None or std is None:
            raise ValueError("GRPOGuardLoss needs mean (μ_θ), old_mean (μ_old at rollout) and std (s_k) "
                             "for RatioNorm")
        scale: Tensor | float = 1.0
        if self.reweight:
            if delta is None:
                raise ValueError("reweight=True scales the policy loss by 1/Δ_k: pass delta (step size > 0)")
            d = per_sample_scalar(delta, log_prob.shape[0], "delta").to(log_prob.device)
            if bool((d <= 0).any()):
                raise ValueError("delta must be the step size Δ_k = t_k − t_{k+1} > 0")
            scale = 1 / d
        log_diff = log_prob.float() - old_log_prob.float()
        log_ratio = ratio_norm(log_prob, old_log_prob, mean, old_mean, std, self.per_sample)
        loss, metrics = self._combine(log_diff, log_ratio, advantages, scale, mean, ref_mean, std, delta)
        metrics["train/ratio_raw_mean"] = torch.exp(log_diff.detach()).mean()
        return loss, metrics
