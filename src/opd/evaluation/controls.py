"""Controls: what a score would be without the skill it is meant to measure.

A reward can be satisfied by things other than following the prompt (a constant image that
happens to please it, images that ignore the prompt). Every evaluation therefore reports, next to
each score, three controls (their keys: :mod:`opd.evaluation.report`):

- **swapped prompt** (:func:`derangement`): every image is also scored against *another* prompt of
  the same tag. A model that follows its prompts scores much lower on the swapped prompt than on
  its own; a model that draws the same kind of picture for every prompt scores about the same.
  Computed right after scoring, from the images in memory.
- **cover** (:func:`search_cover`, :func:`find_cover`): the best single constant image among
  ``num_scenes`` random mini-world scenes (:func:`opd.data.world.layout.random_scene`), chosen on a
  sample of the task's *training* prompts with each reward's ``score_matrix`` and the task's headline
  score, then scored on the test prompts: the score a model reaches by drawing that one image for
  every prompt.
- **prompt sensitivity** (:func:`sensitivity_pairs`, :func:`sensitivity_differences`): the mean
  per-pixel absolute difference between the images of two different prompts drawn from the same
  noise, over fixed prompt pairs, divided by the same quantity of the base model (adapter off) at the
  same CFG scale: 1 = as prompt-dependent as the base, ~0 = collapse (one image whatever the prompt).
  The first image of a pair is one the main evaluation drew anyway, so a pair costs one image; the
  base's reference, when the base at that CFG is not among the checkpoints, costs two per pair.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from opd.evaluation.distributed import Ranks
from opd.evaluation.seeds import image_seed
from opd.evaluation.tasks import EvalTask
from opd.sampling import generate

#: the derangement and the sensitivity pairs are fixed: they do not change with the run's seed
CONTROL_SEED = 0


# --------------------------------------------------------------------------- swapped prompt


def derangement(rows: Sequence[dict[str, Any]], seed: int = CONTROL_SEED) -> list[int | None]:
    """Each row's partner: another row of the same ``tag`` whose prompt string differs.

    Within a tag, the distinct prompt strings are shuffled (``random.Random(seed)``, tags in sorted
    order), the rows are laid out string by string in that order, and each row is paired with the
    row ``s`` places further round the circle, ``s`` = the largest number of rows sharing one
    string. That is a permutation that never pairs equal strings whenever no string fills more
    than half its tag; otherwise the rows it would pair with an equal string take the next row
    round the circle with another string (no longer a permutation). A tag with a single distinct
    string has no partners (``None``).
    """
    by_tag: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_tag[row.get("tag", "")].append(i)
    rng = random.Random(seed)
    partner: list[int | None] = [None] * len(rows)
    for tag in sorted(by_tag):
        by_string: dict[str, list[int]] = defaultdict(list)
        for i in by_tag[tag]:
            by_string[rows[i]["prompt"]].append(i)
        strings = sorted(by_string)
        rng.shuffle(strings)
        if len(strings) < 2:
            continue
        order = [i for s in strings for i in by_string[s]]
        n, shift = len(order), max(len(v) for v in by_string.values())
        for pos, i in enumerate(order):
            step = shift
            while rows[order[(pos + step) % n]]["prompt"] == rows[i]["prompt"]:
                step += 1
            partner[i] = order[(pos + step) % n]
    return partner


# --------------------------------------------------------------------------- cover


def subsample(rows: Sequence[dict[str, Any]], num: int | None, seed: int = CONTROL_SEED) -> list[dict[str, Any]]:
    """``num`` rows drawn without replacement (``random.Random(seed)``), in their original order;
    all rows when ``num`` is ``None`` or at least their number."""
    if num is None or num >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), num))
    return [rows[i] for i in keep]


def tag_weighted_mean(matrix: Tensor, tags: Sequence[str] | None) -> Tensor:
    """``matrix [N, M]`` → ``[N]``: the mean over columns (``tags=None``), or the mean over tags of
    the mean over each tag's columns (``tags[m]`` = column ``m``'s tag) — a task's headline."""
    if tags is None:
        return matrix.mean(dim=1)
    groups: dict[str, list[int]] = defaultdict(list)
    for m, tag in enumerate(tags):
        groups[tag].append(m)
    return torch.stack([matrix[:, cols].mean(dim=1) for _, cols in sorted(groups.items())]).mean(dim=0)


def search_cover(candidates: Tensor, rows: Sequence[dict[str, Any]],
                 score_matrix: Callable[[Tensor, list[dict[str, Any]]], Tensor],
                 tags: Sequence[str] | None = None, batch_size: int = 250) -> tuple[int, Tensor]:
    """The best constant image: ``(index, objective [N])``.

    ``objective[n]`` is the headline candidate ``n`` would get if drawn for every row:
    :func:`tag_weighted_mean` of ``score_matrix(candidates, rows) [N, M]`` (``tags``: each row's
    tag for a task averaged by tag, else ``None``). ``index`` is the first maximum. Candidates are
    judged ``batch_size`` at a time.
    """
    rows = list(rows)
    parts = [tag_weighted_mean(score_matrix(candidates[i : i + batch_size], rows).float(), tags)
             for i in range(0, candidates.shape[0], batch_size)]
    objective = torch.cat(parts)
    return int(torch.argmax(objective)), objective  # argmax: the first of equal maxima


@lru_cache(maxsize=4)
def random_candidates(num_scenes: int, seed: int, size: int) -> tuple[Tensor, tuple[str, ...]]:
    """``num_scenes`` random scenes (``random_scene(random.Random(seed))`` in turn), rendered at
    ``size`` px: ``(images [N, 3, size, size], captions)``; cached, as every task searches the same."""
    from opd.data.world.layout import random_scene
    from opd.data.world.render import render_tensor

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(num_scenes)]
    return render_tensor([s for s, _, _ in scenes], size), tuple(caption for _, caption, _ in scenes)


@dataclass
class Cover:
    """A task's cover: the chosen scene (``index`` among the candidates, its ``caption`` and
    ``image [3, H, W]``), the score it was chosen by (``key``) and its value on the training rows
    (``train_score``), and every score of the image on each test row (``test_scores``: key → ``[M]``)."""

    task: str
    key: str
    index: int
    caption: str
    image: Tensor
    train_score: float
    num_train_rows: int
    num_scenes: int
    test_scores: dict[str, Tensor]


def find_cover(task: EvalTask, size: int) -> Cover:
    """Search ``task.cover`` (:class:`~opd.evaluation.tasks.CoverSpec`) at ``size`` px by the task's
    headline score, then score the winner on the task's (test) rows with every reward."""
    spec = task.cover
    if spec is None:
        raise ValueError(f"eval_tasks.{task.name} has no cover search")
    candidates, captions = random_candidates(spec.num_scenes, spec.seed, size)
    key = task.headline_key
    name, own = task.reward_of(key)
    reward = task.rewards[name]
    tags = [task.tag(r) for r in spec.rows] if task.average == "tag" else None
    index, objective = search_cover(candidates, spec.rows, lambda x, rows: reward.score_matrix(x, rows)[own], tags)
    image = candidates[index]
    test = task.score_matrix(image[None], task.rows)
    return Cover(task.name, key, index, captions[index], image, float(objective[index]), len(spec.rows),
                 spec.num_scenes, {k: v[0] for k, v in test.items()})


# --------------------------------------------------------------------------- prompt sensitivity


def sensitivity_pairs(rows: Sequence[dict[str, Any]], num_pairs: int, seed: int = CONTROL_SEED
                      ) -> list[tuple[int, int]]:
    """Up to ``num_pairs`` pairs ``(i, j)`` of rows with different prompt strings, each string
    represented by its first row: the first members ``i`` are distinct (all strings when there are
    at most ``num_pairs``, else a sample), each paired with another string drawn at random
    (``random.Random(seed)``). A pair's image of ``i`` is image 0 of prompt ``i`` in the main
    evaluation, so a pair costs one more image."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(row["prompt"], i)
    uniq = list(first.values())
    if len(uniq) < 2 or num_pairs <= 0:
        return []
    rng = random.Random(seed)
    firsts = uniq if len(uniq) <= num_pairs else sorted(rng.sample(uniq, num_pairs))
    pairs = []
    for i in firsts:
        j = rng.choice(uniq[:-1])
        pairs.append((i, uniq[-1] if j == i else j))  # any string but i's, uniformly
    return pairs


def pixel_difference(a: Tensor, b: Tensor) -> Tensor:
    """``[K, 3, H, W]`` twice → ``[K]``: the mean absolute difference over channels and pixels."""
    return (a.float() - b.float()).abs().flatten(1).mean(dim=1)


def sensitivity_differences(backbone: Any, rows: Sequence[dict[str, Any]], pairs: Sequence[tuple[int, int]], *,
                            seed: int, num_steps: int, guidance_scale: float, shift: float, batch_size: int,
                            ranks: Ranks | None = None, firsts: dict[int, Tensor] | None = None) -> dict[int, float]:
    """This rank's share of the pairs (every ``world_size``-th): pair ``k`` = ``(i, j)`` draws prompt
    ``i`` and prompt ``j`` from the same noise, the noise of image 0 of prompt ``i`` in the main
    evaluation (:func:`~opd.evaluation.seeds.image_seed` ``(seed, i, 0)``); returns
    ``{k: pixel_difference}``. ``firsts`` (pair index → its image of ``i``, already drawn by the main
    evaluation) replaces both the sharding and the drawing of those images: only the ``j`` images are drawn."""
    ranks = ranks or Ranks()
    mine = sorted(firsts) if firsts is not None else ranks.shard(range(len(pairs)))
    if not mine:
        return {}
    both = firsts is None
    prompts = [rows[i]["prompt"] for k in mine for i in (pairs[k] if both else pairs[k][1:])]
    seeds = [image_seed(seed, pairs[k][0], 0) for k in mine for _ in range(2 if both else 1)]
    images = generate(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale, shift=shift,
                      batch_size=batch_size, seeds=seeds)
    first = images[0::2] if both else torch.stack([firsts[k] for k in mine]).to(images)
    diffs = pixel_difference(first, images[1::2] if both else images)
    return {k: float(d) for k, d in zip(mine, diffs)}
