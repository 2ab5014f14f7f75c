"""PickScore (Kirstain et al., 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

As Flow-GRPO's ``PickScoreScorer`` computes it: ``raw = exp(logit_scale) · cos(text, image)``
with the model's own learned temperature (≈ 100), and the training reward ``raw / 26``, which maps
typical scores (≈ 20–24) to about 0.8–0.9. Papers (and the DiffusionOPD paper's Table 1, e.g. 22.34) report
``raw``; it is returned as ``"raw"``.

Weights: model ``yuvalkirstain/PickScore_v1``; tokenizer and image config
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PickScore ships none of its own). Both are local folders
found by :func:`~opd.rewards.weights.resolve_weights`.
"""
from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from opd.rewards.base import mark_stand_in
from opd.rewards.clip_hf import CLIPModelReward, load_clip, random_clip

#: Flow-GRPO's normalisation of the raw score ("norm to 0-1")
PICKSCORE_SCALE = 26.0


class PickScore(CLIPModelReward):
    """``reward = exp(logit_scale) · cos(text, image) / 26``; ``"raw"`` is the unscaled score.

    Args:
        model: hub id / folder of the PickScore ``CLIPModel``.
        processor: hub id / folder of the ``CLIPProcessor`` (tokenizer + image preprocessing).
        weights_dir: folder holding ``<hub id>/`` copies (``paths.weights_dir``); ``None`` →
            ``$OPD_WEIGHTS_DIR``.
        device: scoring device; ``None`` follows the images.
        batch_size: images per forward pass.
        dtype: ``float32`` (the reference) | ``bfloat16`` | ``float16``.
        random_weights_for_tests: build :meth:`_random_stand_in` instead of loading weights (tests
            only: the scores mean nothing; ``stand_in`` is then True and a warning is logged).

    Raises:
        MissingWeightsError: at construction, when a folder is not on this machine.
    """

    name = "pickscore"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 weights_dir: str | os.PathLike | None = None, device: str | None = None,
                 batch_size: int = 32, dtype: str = "float32", random_weights_for_tests: bool = False) -> None:
        if random_weights_for_tests:
            clip, proc = self._random_stand_in()
        else:
            clip, proc = load_clip(model, processor, what="PickScore reward", weights_dir=weights_dir)
        self._setup(clip, proc, device, batch_size, dtype)
        if random_weights_for_tests:
            mark_stand_in(self, "a 2-layer CLIPModel (the class of PickScore_v1) with random weights")

    @staticmethod
    def _random_stand_in() -> tuple[Any, Any]:
        """PickScore's architecture class, a transformers ``CLIPModel``, shrunk and randomly
        initialised (``logit_scale`` = ln 100, so ``raw`` keeps PickScore's ±100 range), with a
        byte-level tokenizer and the real image preprocessing. Nothing is read from disk."""
        return random_clip(seed=0)

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``uint8 [b, 3, H, W]`` → ``{"reward": raw / 26, "raw": exp(logit_scale) · cos}``."""
        cos = (self.encoder.image_embeds(images) * self.encoder.text_embeds(prompts)).sum(dim=-1)
        raw = self.encoder.model.logit_scale.float().exp() * cos
        return {"reward": raw / PICKSCORE_SCALE, "raw": raw}
