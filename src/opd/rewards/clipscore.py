"""CLIPScore (Hessel et al., 2021) with OpenAI's CLIP ViT-L/14.

torchmetrics' ``CLIPScore`` (the field's usual implementation) is ``max(100 · cos(image, text), 0)``
on a 0–100 scale; DiffusionOPD's Table 1 reports the same quantity on the 0–1 scale (0.285 for
SD3.5-M). So the reward here is ``max(cos, 0)`` = torchmetrics' score / 100, and ``"x100"`` is
torchmetrics' number. (Flow-GRPO's training-time ``clip_score`` uses ``100 · cos / 30`` instead, a
rescaling with the same ranking; nothing here trains on it.)

Weights: ``openai/clip-vit-large-patch14`` (model, tokenizer and image config in one folder),
found by :func:`~opd.rewards.weights.resolve_weights`.
"""
from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from opd.rewards.base import mark_stand_in
from opd.rewards.clip_hf import CLIPModelReward, load_clip, random_clip


class CLIPScore(CLIPModelReward):
    """``reward = max(cos(text, image), 0)`` (0–1 scale); ``"x100"`` = torchmetrics' 0–100 score.

    Args:
        model: hub id / folder of the ``CLIPModel``.
        processor: hub id / folder of its ``CLIPProcessor``; ``None`` → the model's folder.
        weights_dir, device, batch_size, dtype, random_weights_for_tests: as
            :class:`~opd.rewards.pickscore.PickScore`.
    """

    name = "clipscore"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 weights_dir: str | os.PathLike | None = None, device: str | None = None,
                 batch_size: int = 32, dtype: str = "float32", random_weights_for_tests: bool = False) -> None:
        if random_weights_for_tests:
            clip, proc = self._random_stand_in()
        else:
            clip, proc = load_clip(model, processor or model, what="CLIPScore reward", weights_dir=weights_dir)
        self._setup(clip, proc, device, batch_size, dtype)
        if random_weights_for_tests:
            mark_stand_in(self, "a 2-layer CLIPModel (the class of CLIP ViT-L/14) with random weights")

    @staticmethod
    def _random_stand_in() -> tuple[Any, Any]:
        """CLIP ViT-L/14's class, a transformers ``CLIPModel``, shrunk and randomly initialised (a
        seed of its own, so it differs from PickScore's stand-in), byte-level tokenizer, real
        preprocessing. Nothing is read from disk."""
        return random_clip(seed=1)

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``uint8 [b, 3, H, W]`` → ``{"reward": max(cos, 0), "x100": max(100 cos, 0)}``."""
        cos = (self.encoder.image_embeds(images) * self.encoder.text_embeds(prompts)).sum(dim=-1)
        reward = cos.clamp(min=0)
        return {"reward": reward, "x100": 100 * reward}
