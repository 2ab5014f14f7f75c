"""The reward protocol shared by every reward family.

A reward scores a batch of images against their prompts:

    images   Tensor[B, 3, H, W], float in [0, 1] (any device; rewards move what they need)
    prompts  list[str] of length B
    metadata list[dict] of length B (task metadata, e.g. GenEval's ``include``/``exclude``)

``score`` returns a dict of per-image tensors ``[B]`` (float32, on CPU). The key ``"reward"`` is
the training signal; other keys are evaluation metrics of the same images (e.g. ``"exact"`` for
OCR exact match, ``"correct"`` for GenEval strict correctness). ``__call__`` returns
``score(...)["reward"]``.

``score_matrix(images [N, 3, H, W], metadata: M rows)`` judges every image against every row (each
row's ``"prompt"`` is its prompt) and returns ``{key: Tensor[N, M]}`` with the keys of ``score``:
entry ``[n, m]`` is what ``score`` gives image ``n`` under row ``m``. The evaluation's controls use
it (the best constant "cover" image, :mod:`opd.evaluation.controls`). The default here calls
``score`` once per image (or per row, whichever is fewer) — correct for any reward, but it
re-analyses each image ``M`` times; rewards whose analysis of an image does not depend on the
prompt override it to analyse each image once.
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

    def score_matrix(self, images: Tensor, metadata: list[dict[str, Any]], batch_size: int = 64
                     ) -> dict[str, Tensor]:
        """Every image against every row: ``{key: Tensor[N, M]}``, ``[n, m]`` = ``score`` of image
        ``n`` with row ``m`` (prompt ``metadata[m]["prompt"]``). This default loops over
        :meth:`score` in batches of at most ``batch_size`` pairs: one image against a run of rows
        when there are fewer images than rows, else a run of images against one row."""
        n, m = images.shape[0], len(metadata)
        prompts = [row["prompt"] for row in metadata]
        out: dict[str, Tensor] = {}

        def put(rows: slice | int, cols: slice | int, scores: dict[str, Tensor]) -> None:
            for key, value in scores.items():
                if key not in out:
                    out[key] = torch.zeros(n, m, dtype=torch.float32)
                out[key][rows, cols] = value.detach().float().cpu()

        if n <= m:
            for i in range(n):
                for j in range(0, m, batch_size):
                    k = min(batch_size, m - j)
                    put(i, slice(j, j + k), self.score(images[i : i + 1].expand(k, -1, -1, -1),
                                                       prompts[j : j + k], metadata[j : j + k]))
        else:
            for j in range(m):
                for i in range(0, n, batch_size):
                    k = min(batch_size, n - i)
                    put(slice(i, i + k), j, self.score(images[i : i + k], [prompts[j]] * k, [metadata[j]] * k))
        return out


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
