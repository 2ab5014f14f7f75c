"""The reward protocol shared by every reward family.

A reward scores a batch of images against their prompts:

    images   Tensor[B, 3, H, W], float in [0, 1] (any device; rewards move what they need)
    prompts  list[str] of length B
    metadata list[dict] of length B (task metadata, e.g. GenEval's ``include``/``exclude``)

``score`` returns a dict of per-image tensors ``[B]`` (float32, on CPU). The key ``"reward"`` is
the training signal; other keys are evaluation metrics of the same images (e.g. ``"exact"`` for
OCR exact match, ``"correct"`` for GenEval strict correctness). ``__call__`` returns
``score(...)["reward"]``.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor


class Reward(ABC):
    """Base class: subclasses implement :meth:`score`."""

    #: name used in log keys (``reward/<name>``) and result tables
    name: str = "reward"
    #: True for a test stand-in (random weights, or a local fake of a reward server): its scores
    #: exercise the pipeline and mean nothing (:func:`mark_stand_in`)
    stand_in: bool = False

    @abstractmethod
    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Per-image metrics ``{key: Tensor[B]}``; must contain ``"reward"``."""

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None) -> Tensor:
        return self.score(images, prompts, metadata or [{} for _ in prompts])["reward"]


def mark_stand_in(reward: Reward, what: str) -> None:
    """Flag ``reward`` as a test stand-in (``reward.stand_in = True``) and say so in the log, loudly,
    so that a stand-in can never pass unnoticed for the real reward. ``what`` describes what was
    built instead (e.g. "a 2-layer CLIP with random weights")."""
    reward.stand_in = True
    logging.getLogger(type(reward).__module__).warning(
        "%s reward: STAND-IN (random_weights_for_tests=true) — %s; tests only, its scores mean nothing",
        type(reward).__name__, what)


def check_batch(images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
    """Fail early and clearly on a malformed batch (shape, range, lengths)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards take images of shape [B, 3, H, W]; got {tuple(images.shape)}")
    if len(prompts) != images.shape[0] or len(metadata) != images.shape[0]:
        raise ValueError(
            f"batch mismatch: {images.shape[0]} images, {len(prompts)} prompts, {len(metadata)} metadata entries"
        )
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN/inf: the sampler diverged before scoring")


def to_uint8_hwc(images: Tensor) -> list:
    """``[B, 3, H, W]`` in [0, 1] → list of ``numpy.uint8`` arrays ``[H, W, 3]`` (RGB)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)
