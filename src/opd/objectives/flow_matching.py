"""Rectified-flow (flow-matching) loss, SD3 convention, for pre-training."""
from __future__ import annotations

import torch
from torch import Tensor

from opd.models.backbone import Backbone, PromptEmbeds


def logit_normal_sigmas(batch_size: int, mean: float, std: float, device: torch.device,
                        generator: torch.Generator | None = None) -> Tensor:
    """SD3's training density of σ: ``σ = sigmoid(m + s·n)``, ``n ~ N(0, 1)``; ``[B]``."""
    n = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(mean + std * n)


def flow_matching_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity a flow-matching model regresses: ``v* = ε − x0``."""
    return noise - x0


class FlowMatchingLoss:
    """``E_{σ, ε} ||v_θ((1 − σ) x0 + σ ε, σ, c) − (ε − x0)||²`` (mean over elements)."""

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def __call__(self, backbone: Backbone, x0: Tensor, cond: PromptEmbeds,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``x0 [B, C, H, W]`` clean latents → ``(loss, {"train/loss_hi_noise", "train/loss_lo_noise"})``."""
        sigma = logit_normal_sigmas(x0.shape[0], self.logit_mean, self.logit_std, x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - s) * x0 + s * noise
        v = backbone.velocity(x_t.to(backbone.dtype), sigma, cond).float()
        per_sample = (v - flow_matching_target(x0, noise).float()).square().flatten(1).mean(1)
        hi = sigma >= 0.5
        metrics = {
            "train/loss_hi_noise": per_sample[hi].mean() if hi.any() else per_sample.new_tensor(float("nan")),
            "train/loss_lo_noise": per_sample[~hi].mean() if (~hi).any() else per_sample.new_tensor(float("nan")),
        }
        return per_sample.mean(), metrics
