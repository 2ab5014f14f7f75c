"""JPEG (in)compressibility (DDPO, Black et al. 2023; Flow-GRPO's ``jpeg_*`` rewards).

Each image is rounded to ``uint8``, saved by PIL as JPEG at quality 95, and its size measured in
kB (``bytes / 1000``). Flow-GRPO's compressibility reward is ``−kB / 500``; incompressibility is
``+kB / scale`` here with the same ``scale = 500`` (Flow-GRPO returns raw kB for it: set
``scale: 1`` to match that). ``"kb"`` is returned too.
"""
from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from opd.rewards.base import Reward, check_batch, to_uint8_hwc


def jpeg_kb(image: Any, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of ``uint8 [H, W, 3]`` saved as JPEG by PIL at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegSize(Reward):
    """``reward = sign · kB / scale``: ``sign = -1`` rewards compressible images, ``+1``
    incompressible ones.

    Args:
        sign: ``-1`` (compressibility) or ``+1`` (incompressibility).
        scale: kB per reward unit (Flow-GRPO: 500).
        quality: JPEG quality (95, as DDPO and Flow-GRPO).
    """

    name = "jpeg"

    def __init__(self, sign: int = -1, scale: float = 500.0, quality: int = 95) -> None:
        if sign not in (-1, 1):
            raise ValueError(f"JpegSize: sign must be -1 (compressibility) or +1 (incompressibility), got {sign}")
        if scale <= 0:
            raise ValueError(f"JpegSize: scale must be > 0 kB, got {scale}")
        self.sign = sign
        self.scale = float(scale)
        self.quality = quality

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → ``{"reward": sign · kB / scale, "kb": kB}``."""
        check_batch(images, prompts, metadata)
        kb = torch.tensor([jpeg_kb(image, self.quality) for image in to_uint8_hwc(images)], dtype=torch.float32)
        return {"reward": self.sign * kb / self.scale, "kb": kb}
