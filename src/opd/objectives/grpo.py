"""Flow-GRPO's loss for one trained SDE step (docs/algorithms.md, Flow-GRPO).

For step ``k`` of a rollout from the old policy, with per-sample log-probabilities ``ℓ`` (Gaussian
log-density of the sampled ``x_{k+1}``, averaged over the ``D`` latent elements, as
``Transition.log_prob`` computes it):

- ``ρ = exp(ℓ_θ − ℓ_old)``;
- ``L_pol = mean_i max(−A_i ρ_i, −A_i clip(ρ_i, 1 − ε, 1 + ε))`` (PPO's pessimistic clipped surrogate);
- ``KL = mean_i mean_D (μ_θ − μ_ref)² / (2 s_k²)``, the exact KL between the two Gaussians of the step,
  which share the covariance ``s_k² I`` (``s_k = σ_k sqrt(Δ_k)`` the step's standard deviation).
  The reference code divides by ``2 g_k²`` with ``g_k = s_k / sqrt(Δ_k)`` instead (it drops ``Δ_k``):
  ``exact_kl=False`` reproduces that, i.e. ``KL_quirk = Δ_k · KL_exact``;
- ``L = L_pol + β KL``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from opd.objectives.gaussian import gaussian_kl_same_std, per_sample_scalar


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """PPO's per-sample loss ``max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))``, ``[B]``.

    The max picks the clipped branch exactly when the ratio has already moved past the band in the
    direction the advantage favours, so those samples give no gradient.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped)


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float, delta: Tensor | float | None,
                     exact: bool) -> Tensor:
    """Per-sample ``mean_D (μ − μ_ref)² / (2 s²)`` ``[B]`` (exact), or ``/ (2 s²/Δ)`` (the code's quirk).

    ``mean, ref_mean [B, ...]``; ``std`` = the step's ``s`` and ``delta`` = ``Δ > 0``, each a scalar,
    ``[B]`` or ``[B, 1, ...]``. The reference is a fixed target, hence detached.
    """
    b = mean.shape[0]
    s = per_sample_scalar(std, b, "std").to(mean.device)
    if not exact:
        if delta is None:
            raise ValueError("exact_kl=False divides by 2 s²/Δ: pass delta (the step size Δ_k > 0)")
        d = per_sample_scalar(delta, b, "delta").to(mean.device)
        if bool((d <= 0).any()):
            raise ValueError("delta must be the step size Δ_k = t_k − t_{k+1} > 0")
        s = s / d.sqrt()  # the code's g = s / sqrt(Δ) in place of s
    return gaussian_kl_same_std(mean, ref_mean.detach(), s, "mean")


class GRPOLoss:
    """Flow-GRPO's clipped-ratio loss with an optional KL to the reference model (one step ``k``).

    ``clip_range`` = ε, ``kl_weight`` = β (0.04 GenEval/OCR, 0.01 PickScore), ``exact_kl`` = divide by
    ``2 s_k²`` (True) or by the reference code's ``2 s_k²/Δ_k`` (False).
    """

    def __init__(self, clip_range: float = 1e-4, kl_weight: float = 0.04, exact_kl: bool = True) -> None:
        if clip_range <= 0:
            raise ValueError(f"clip_range must be > 0; got {clip_range}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0; got {kl_weight}")
        self.clip_range = clip_range
        self.kl_weight = kl_weight
        self.exact_kl = exact_kl

    def __call__(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                 mean: Tensor | None = None, ref_mean: Tensor | None = None,
                 std: Tensor | float | None = None, delta: Tensor | float | None = None,
                 old_mean: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` for one step.

        ``log_prob [B]`` under θ (carries gradient), ``old_log_prob [B]`` stored at rollout,
        ``advantages [B]``; for the KL term ``mean [B, ...]`` = μ_θ, ``ref_mean [B, ...]`` = μ_ref,
        ``std`` = ``s_k`` and (``exact_kl=False`` only) ``delta`` = ``Δ_k``. The KL term is skipped when
        β = 0 or ``ref_mean`` is None. Metrics: ``train/policy_loss``, ``train/kl_ref`` (the KL term: the
        closed-form KL between θ's and the reference model's step kernels, mean over samples; when computed),
        ``train/clip_frac``, ``train/ratio_mean``, ``train/approx_kl``. ``old_mean`` is unused here; it is
        accepted so that :class:`GRPOGuardLoss` (which needs it) is a drop-in replacement.
        """
        log_diff = log_prob.float() - old_log_prob.float()
        return self._combine(log_diff, log_diff, advantages, 1.0, mean, ref_mean, std, delta)

    def _combine(self, log_diff: Tensor, log_ratio: Tensor, advantages: Tensor, scale: Tensor | float,
                 mean: Tensor | None, ref_mean: Tensor | None, std: Tensor | float | None,
                 delta: Tensor | float | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The shared tail: clipped surrogate on ``exp(log_ratio)`` times ``scale`` (``[]`` or ``[B]``),
        plus ``β KL``. ``log_diff = ℓ_θ − ℓ_old`` feeds only the approx-KL metric."""
        ratio = torch.exp(log_ratio)
        surrogate = clipped_surrogate(ratio, advantages.to(ratio.dtype), self.clip_range)
        policy_loss = (scale * surrogate).mean()
        metrics = {
            "train/policy_loss": policy_loss.detach(),
            "train/clip_frac": ((ratio.detach() - 1).abs() > self.clip_range).float().mean(),
            "train/ratio_mean": ratio.detach().mean(),
            # k2 estimator of KL(old || θ) from the raw log-probabilities
            "train/approx_kl": 0.5 * log_diff.detach().square().mean(),
        }
        loss = policy_loss
        if ref_mean is not None and self.kl_weight > 0:
            if mean is None or std is None:
                raise ValueError("the KL term needs mean (μ_θ) and std (s_k) besides ref_mean")
            kl = gaussian_mean_kl(mean, ref_mean, std, delta, self.exact_kl).mean()
            metrics["train/kl_ref"] = kl.detach()
            loss = loss + self.kl_weight * kl
        return loss, metrics
