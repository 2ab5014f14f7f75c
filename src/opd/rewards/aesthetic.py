"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022).

A linear-probe-style MLP on the L2-normalised CLIP ViT-L/14 image embedding, trained on SAC +
LAION-Logos + AVA ratings (``sac+logos+ava1-l14-linearMSE.pth``); scores are on AVA's 1–10 scale
(SD3.5-M ≈ 5.4 in the DiffusionOPD paper's Table 1). The head is ``768 → 1024 → 128 → 64 → 16 → 1`` with
dropouts 0.2, 0.2, 0.1 and *no* non-linearities, exactly as the original (whose state-dict keys,
``layers.{0,2,4,6,7}``, :class:`AestheticHead` reproduces); Flow-GRPO uses the raw score as reward.

Weights: CLIP ``openai/clip-vit-large-patch14`` and the head file, both found by
:func:`~opd.rewards.weights.resolve_weights`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from opd.rewards.base import mark_stand_in
from opd.rewards.clip_hf import CLIPEncoder, load_clip, random_clip
from opd.rewards.model_reward import ModelReward
from opd.rewards.weights import MissingWeightsError, resolve_weights

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}"


class AestheticHead(nn.Module):
    """The predictor's MLP: ``[b, 768]`` unit-norm CLIP embedding → ``[b]`` score."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


def load_head(source: str | os.PathLike, weights_dir: str | os.PathLike | None) -> AestheticHead:
    """The head from ``<source>/sac+logos+ava1-l14-linearMSE.pth`` (or ``source`` as the file)."""
    try:
        path = resolve_weights(source, what="LAION aesthetic reward (MLP head)", filename=HEAD_FILE,
                               root=weights_dir)
    except MissingWeightsError as err:
        raise MissingWeightsError(f"{err} The head file is published at {HEAD_URL}") from None
    if path.is_dir():
        path = path / HEAD_FILE
    head = AestheticHead()
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return head


class LaionAesthetic(ModelReward):
    """``reward = MLP(CLIP-L/14 image embedding / ‖·‖)`` (prompt-independent, ≈ 1–10).

    Args:
        clip: hub id / folder of the CLIP ViT-L/14 ``CLIPModel`` + processor.
        head: folder holding ``sac+logos+ava1-l14-linearMSE.pth`` (or the file itself),
            relative to ``weights_dir`` unless absolute.
        weights_dir, device, batch_size, dtype, random_weights_for_tests: as
            :class:`~opd.rewards.pickscore.PickScore`.
    """

    name = "laion_aesthetic"

    def __init__(self, clip: str = "openai/clip-vit-large-patch14", head: str = "improved-aesthetic-predictor",
                 weights_dir: str | os.PathLike | None = None, device: str | None = None,
                 batch_size: int = 32, dtype: str = "float32", random_weights_for_tests: bool = False) -> None:
        if random_weights_for_tests:
            model, proc, mlp = self._random_stand_in()
            self._setup(model, proc, mlp, device, batch_size, dtype)
            mark_stand_in(self, "a 2-layer CLIPModel and the predictor's MLP head, all with random weights")
            return
        model, proc = load_clip(clip, clip, what="LAION aesthetic reward", weights_dir=weights_dir)
        self._setup(model, proc, load_head(head, weights_dir), device, batch_size, dtype)

    @staticmethod
    def _random_stand_in() -> tuple[Any, Any, AestheticHead]:
        """A shrunk random ``CLIPModel`` (CLIP ViT-L/14's class) and an :class:`AestheticHead` — the
        predictor's own MLP, 1024 → 128 → 64 → 16 → 1, on the stand-in's embedding width — with
        random weights. Nothing is read from disk."""
        projection_dim = 16
        model, proc = random_clip(seed=2, projection_dim=projection_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            head = AestheticHead(projection_dim).eval()
        return model, proc, head

    @classmethod
    def from_model(cls, model: Any, processor: Any, head: AestheticHead, *, device: str | None = None,
                   batch_size: int = 32, dtype: str = "float32") -> LaionAesthetic:
        """A predictor around an already-built CLIP model, processor and head (tests, notebooks)."""
        self = cls.__new__(cls)
        self._setup(model, processor, head, device, batch_size, dtype)
        return self

    def _setup(self, model: Any, processor: Any, head: AestheticHead, device: str | None, batch_size: int,
               dtype: str) -> None:
        self.encoder = CLIPEncoder(model, processor)
        self.head = head
        self._setup_runtime(device, batch_size, dtype)

    def networks(self) -> Sequence[nn.Module]:
        return [self.encoder.model, self.head]

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``uint8 [b, 3, H, W]`` → ``{"reward": aesthetic score}``."""
        embeds = self.encoder.image_embeds(images)
        return {"reward": self.head(embeds.to(next(self.head.parameters()).dtype)).float()}
