"""A deterministic, image-statistics stand-in for learned preference scores (PickScore, LAION
aesthetic) in the mini world.

Like those scores it prefers vivid, high-contrast, colourful pictures, and like them it can be
hacked (saturate every colour, fill the canvas with edges) and conflicts with legible black-on-white
text or with plain scenes whose object counts are right — the conflict multi-reward distillation
must resolve.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from opd.rewards.base import Reward, check_batch

#: ITU-R BT.601 luma weights
LUMA = (0.299, 0.587, 0.114)


def colourfulness_raw(images: Tensor) -> Tensor:
    """Hasler–Süsstrunk (2003) colourfulness ``M`` of ``[B, 3, H, W]`` RGB in [0, 1] → ``[B]``.

    ``rg = R − G``, ``yb = (R + G)/2 − B``;
    ``M = sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²)`` with population statistics over
    pixels. On this [0, 1] scale, the paper's "highly colourful" threshold (82 on 0–255) is 0.32.
    """
    r, g, b = images.unbind(dim=1)
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    spread = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
    offset = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
    return spread + 0.3 * offset


def rms_contrast(images: Tensor) -> Tensor:
    """Population standard deviation of BT.601 luminance, ``[B, 3, H, W]`` → ``[B]`` in [0, 0.5]."""
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    luma = (images * weights).sum(dim=1).flatten(1)
    return luma.std(dim=1, unbiased=False)


class AestheticMini(Reward):
    """``reward = u · (w_c · c + w_k · k)`` in [0, 1], with

    - colourfulness ``c = 1 − exp(−M / m0)``, ``M`` = :func:`colourfulness_raw`, ``m0 = 0.25``
      (``c ≈ 0.72`` at the paper's "highly colourful" 0.32; a grey image has ``c = 0``);
    - contrast ``k = min(1, 2 · σ_Y)``, ``σ_Y`` = :func:`rms_contrast` (a half-black, half-white
      image has ``σ_Y = 0.5``, ``k = 1``);
    - near-uniform penalty ``u = min(1, s̄ / s0)``, ``s̄`` = mean over R, G, B of each channel's
      population standard deviation, ``s0 = 0.1``: a flat canvas of any colour scores 0 however
      saturated, and faint structure is scaled down;
    - weights ``w_c = 0.6``, ``w_k = 0.4`` (colour outweighs contrast, so black-on-white text,
      ``c = 0``, can reach at most 0.4).

    ``score`` returns ``{"reward", "colourfulness": c, "contrast": k, "structure": u}``, each
    ``float32 [B]`` on CPU.
    """

    name = "aesthetic_mini"

    def __init__(
        self,
        colour_weight: float = 0.6,
        contrast_weight: float = 0.4,
        colour_scale: float = 0.25,
        structure_scale: float = 0.1,
    ) -> None:
        if colour_weight < 0 or contrast_weight < 0 or colour_weight + contrast_weight > 1 + 1e-9:
            raise ValueError(
                f"AestheticMini: colour_weight={colour_weight}, contrast_weight={contrast_weight} must be "
                "non-negative and sum to at most 1 so the score stays in [0, 1]"
            )
        self.colour_weight = colour_weight
        self.contrast_weight = contrast_weight
        self.colour_scale = colour_scale
        self.structure_scale = structure_scale

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → per-image ``[B]`` scores (prompts are ignored)."""
        check_batch(images, prompts, metadata)
        # float64: the hand-checked constants should not drift with the caller's dtype
        x = images.detach().to(dtype=torch.float64).clamp(0, 1)
        colour = 1 - torch.exp(-colourfulness_raw(x) / self.colour_scale)
        contrast = (2 * rms_contrast(x)).clamp(max=1)
        channel_std = x.flatten(2).std(dim=2, unbiased=False).mean(dim=1)
        structure = (channel_std / self.structure_scale).clamp(max=1)
        reward = structure * (self.colour_weight * colour + self.contrast_weight * contrast)
        out = {"reward": reward, "colourfulness": colour, "contrast": contrast, "structure": structure}
        return {key: value.float().cpu() for key, value in out.items()}
