"""A GenEval-style rule judge for the mini world (``opd.data.world``), stricter than GenEval.

GenEval runs an object detector, classifies each object's colour with CLIP and checks counts,
colours and relative positions against the prompt's metadata. Here the detector is
:func:`opd.rewards.shapes.detect` (colour segmentation, outlines fitted to every kind's template
with a margin, size limits; its docstring gives the thresholds and how they were measured).

Scoring (docs/algorithms.md, Rewards; docs/mini_world.md, Judges):

- ``"correct"`` (:func:`exact_correct`): the image shows what the prompt asks and nothing else.
  Every ``include`` clause matches *exactly* ``count`` objects of its class, all of the named
  colour where one is named; a position ``[rel, i]`` must hold between each of them and each
  object of clause ``i`` under GenEval's relation test (box centres, margin 0.1 of the summed box
  sizes; :func:`opd.data.world.scene.relations`); and the image holds no other object at all —
  an extra copy, an object of another class or an object of no kind fails it.
  GenEval itself accepts *at least* ``count`` objects and ignores unrequested ones (only an
  ``exclude`` clause limits a count). That is a detector-noise allowance: on real photographs a
  strict rule would punish the detector's false positives. In the mini world detection is exact
  (clean renders of every test prompt are 100% correct, blurred and noisy ones 99%), so the
  allowance only lets prompt-blind images pass — the previous judge read a half-canvas yellow
  block as a square or circle and passed any prompt asking for one. The rules differ, so they are
  two functions (GenEval's is :func:`opd.rewards.geneval_rules.strict_correct`); the relation test
  and the ``exclude`` check are shared (:func:`~opd.rewards.geneval_rules.positions_hold`,
  :func:`~opd.rewards.geneval_rules.excluded`).
- ``"reward"`` (:func:`partial_score`): Flow-GRPO's partial training score, unchanged: the mean of
  per-clause sub-scores; count ``1 - |n - n_found| / n`` over the class's detections (negative
  when far too many; objects of no kind belong to no class); if the count is wrong, 0 for each
  colour/position the clause asks; else colour ``1 - |n - n_match| / n`` and position 1 or 0.
  ``exclude`` is ignored. ``reference_quirk=True`` reproduces the reference's extra 1 appended
  after every position check (a failed position then scores ``[0, 1]``).

:meth:`GenEvalMini.score_matrix` judges N images against M rows with N detections (evaluation
controls: a row's images against other rows' prompts).

The detections are the mini detector's :class:`~opd.rewards.shapes.Detection` (imported here as
``ShapeDetection``: a kind or ``None``, a palette colour, a pixel box, centroid and area), not
GenEval's :class:`opd.rewards.geneval_rules.Detection` (a COCO label, a score, a box, a mask).
"""

from __future__ import annotations

import itertools
from functools import partial
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from opd.rewards.base import Reward, check_batch, to_uint8_hwc
from opd.rewards.geneval_rules import excluded, partial_score_with, positions_hold
from opd.rewards.shapes import (
    MARGIN,
    MAX_SIZE,
    MIN_AREA_FRAC,
    MIN_SCORE,
    MIN_SIZE,
    by_class,
    detect,
)
from opd.rewards.shapes import Detection as ShapeDetection
from opd.rewards.workers import ImageWorkers

__all__ = ["GenEvalMini", "ShapeDetection", "by_class", "detect", "exact_correct", "partial_score"]


# --------------------------------------------------------------------------- judging


def _holds(found: list[ShapeDetection], relation: str, targets: list[ShapeDetection]) -> bool:
    return positions_hold(found, relation, targets, box=attrgetter("bbox"))


def _assign(
    include: list[dict],
    objects: dict[str | None, list[ShapeDetection]],
    groups: list[list[ShapeDetection]],
    used: set[int],
) -> bool:
    """Whether the clauses from ``len(groups)`` on can each take ``count`` unused objects of their
    class and colour so that every position holds (backtracking; prompts hold a few objects)."""
    i = len(groups)
    if i == len(include):
        return all(
            _holds(group, clause["position"][0], groups[clause["position"][1]])
            for clause, group in zip(include, groups, strict=True)
            if "position" in clause
        )
    clause = include[i]
    pool = [
        d
        for d in objects.get(clause["class"], [])
        if id(d) not in used and clause.get("color") in (None, d.color)
    ]
    for chosen in itertools.combinations(pool, clause["count"]):
        if _assign(include, objects, [*groups, list(chosen)], used | {id(d) for d in chosen}):
            return True
    return False


def exact_correct(objects: dict[str | None, list[ShapeDetection]], meta: dict[str, Any]) -> bool:
    """The image shows what ``meta`` asks and nothing else: exactly ``count`` objects per clause and
    no other object (stricter than GenEval's ``strict_correct``; see the module docstring).

    ``objects`` is :func:`by_class` of *all* detections, objects of no kind (key ``None``) included.
    """
    include = meta["include"]
    if sum(len(group) for group in objects.values()) != sum(c["count"] for c in include):
        return False  # an extra object of any kind (or of none), or one too few
    if excluded(objects, meta):
        return False
    return _assign(include, objects, [], set())


def partial_score(
    objects: dict[str | None, list[ShapeDetection]], meta: dict[str, Any], reference_quirk: bool = False
) -> float:
    """Flow-GRPO's partial GenEval reward of one image (see the module docstring); the rule itself is
    :func:`opd.rewards.geneval_rules.partial_score_with`, shared with the real-scale judge."""
    return partial_score_with(objects, meta, lambda d: d.color, _holds, reference_quirk)


def _objects_of(image: Any, **detect_kwargs: Any) -> dict[str | None, list[ShapeDetection]]:
    return by_class(detect(image, **detect_kwargs))


class GenEvalMini(Reward):
    """The mini world's GenEval: ``score`` → ``{"reward": partial score, "correct": strict 0/1}``.

    Metadata rows must follow GenEval's schema (``include``/``exclude``; see
    ``opd.data.world.grammar``). Images ``[B, 3, H, W]`` in [0, 1]; outputs ``Tensor[B]`` float32
    (CPU). :meth:`score_matrix` judges every image against every row (evaluation controls).
    ``num_workers`` > 1 detects the images of a batch in that many processes (the same scores;
    :mod:`opd.rewards.workers`).
    """

    name = "geneval"

    def __init__(
        self,
        min_score: float = MIN_SCORE,
        margin: float = MARGIN,
        min_size: float = MIN_SIZE,
        max_size: float = MAX_SIZE,
        min_area_frac: float = MIN_AREA_FRAC,
        max_color_dist: float = 100.0,
        reference_quirk: bool = False,
        num_workers: int = 1,
    ) -> None:
        self.detect_kwargs = {
            "min_score": min_score,
            "margin": margin,
            "min_size": min_size,
            "max_size": max_size,
            "min_area_frac": min_area_frac,
            "max_color_dist": max_color_dist,
        }
        self.reference_quirk = reference_quirk
        self.workers = ImageWorkers(num_workers, "GenEvalMini")

    def objects(self, images: Tensor) -> list[dict[str | None, list[ShapeDetection]]]:
        """:func:`by_class` of each image's detections, ``[B, 3, H, W]`` in [0, 1] (in ``num_workers``
        processes: :mod:`opd.rewards.workers`)."""
        return self.workers.map(partial(_objects_of, **self.detect_kwargs), to_uint8_hwc(images))

    def judge(
        self, objects: dict[str | None, list[ShapeDetection]], meta: dict[str, Any]
    ) -> tuple[float, float]:
        """``(partial score, strict 0/1)`` of one image's objects against one metadata row."""
        return partial_score(objects, meta, self.reference_quirk), float(exact_correct(objects, meta))

    @staticmethod
    def _check_rows(metadata: list[dict[str, Any]], prompts: list[str] | None = None) -> None:
        for i, meta in enumerate(metadata):
            if "include" not in meta:
                prompt = prompts[i] if prompts is not None else meta.get("prompt")
                raise ValueError(
                    f"GenEvalMini: metadata[{i}] (prompt {prompt!r}) has no 'include' key; it "
                    f"needs GenEval-schema rows such as load_prompts('geneval', ...)"
                )

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        check_batch(images, prompts, metadata)
        self._check_rows(metadata, prompts)
        judged = [self.judge(objs, meta) for objs, meta in zip(self.objects(images), metadata, strict=True)]
        reward, correct = zip(*judged) if judged else ((), ())
        return {
            "reward": torch.tensor(reward, dtype=torch.float32),
            "correct": torch.tensor(correct, dtype=torch.float32),
        }

    def score_matrix(
        self, images: Tensor, metadata: list[dict[str, Any]], batch_size: int = 64
    ) -> dict[str, Tensor]:
        """Every image against every row: ``{"reward", "correct"}`` → ``Tensor[N, M]`` float32, entry
        ``[i, j]`` = image ``i`` judged against ``metadata[j]`` (what ``score`` gives that pair).
        Each image is detected once, so this costs N detections, not N·M; ``batch_size`` (the base
        class's pair batching) does not apply and is ignored."""
        check_batch(images, [""] * images.shape[0], [{}] * images.shape[0])  # shape and finiteness
        self._check_rows(metadata)
        counts = [sum(c["count"] for c in meta["include"]) for meta in metadata]
        reward, correct = [], []
        for objs in self.objects(images):
            total = sum(len(group) for group in objs.values())
            reward.append([partial_score(objs, meta, self.reference_quirk) for meta in metadata])
            correct.append(  # a row asking for another number of objects fails at once
                [
                    float(n == total and exact_correct(objs, meta))
                    for n, meta in zip(counts, metadata, strict=True)
                ]
            )
        shape = (images.shape[0], len(metadata))
        return {
            "reward": torch.tensor(reward, dtype=torch.float32).reshape(shape),
            "correct": torch.tensor(correct, dtype=torch.float32).reshape(shape),
        }
