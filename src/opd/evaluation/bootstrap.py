"""95 % intervals for the evaluation's headline metrics: a prompt-clustered bootstrap.

The images of one prompt are not independent draws (they share the prompt, and a model tends to
get a prompt right or wrong on every image), so the unit of resampling is the prompt: a resample
draws as many prompts as the set has, with replacement, and keeps *all* images of each drawn
prompt. The statistic is the headline's own definition:

- ``strata=None`` (tasks averaged over images): the mean over the images of the drawn prompts;
- ``strata`` = each prompt's tag (tasks averaged by tag, GenEval's overall score): the prompts are
  resampled *within* each tag, as many as the tag has, so every tag keeps its prompt count and its
  mean stays defined; the statistic is the mean of the tag means.

The interval is the percentile interval (``numpy.quantile``, linear interpolation) of the
statistic over ``num_resamples`` resamples drawn with ``numpy.random.default_rng(seed)``: the same
prompts-and-images layout gives the same resamples, so intervals are reproducible and two metrics
of one run are resampled alike.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_RESAMPLES = 1000
LEVEL = 0.95


def _layout(groups: Sequence[Sequence[float]], strata: Sequence[str] | None
            ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("bootstrap: every prompt needs at least one value, and there must be one prompt")
    if strata is not None and len(strata) != len(groups):
        raise ValueError(f"bootstrap: {len(strata)} strata for {len(groups)} prompts")
    sums = np.array([float(np.sum(g)) for g in groups])
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    labels = np.array(["" for _ in groups] if strata is None else list(strata), dtype=object)
    members = [np.flatnonzero(labels == s) for s in sorted(set(labels.tolist()))]
    return sums, counts, members


def clustered_mean(groups: Sequence[Sequence[float]], strata: Sequence[str] | None = None) -> float:
    """The statistic on the prompts as they are: the mean over all values (``strata=None``) or the
    mean over strata of each stratum's mean over its values."""
    sums, counts, members = _layout(groups, strata)
    return float(np.mean([sums[m].sum() / counts[m].sum() for m in members]))


def resampled_means(models: Sequence[Sequence[Sequence[float]]], strata: Sequence[str] | None = None, *,
                    num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[model, resample]``: :func:`clustered_mean` of every model on the *same* prompt resamples.

    ``models[k][p]``: model ``k``'s values on prompt ``p`` (every model scored the same prompts, in
    the same order; ``strata[p]`` as in :func:`bootstrap_ci`). Drawing the prompts once for all models
    pairs them: a statistic of several models (a difference, a ratio of differences) then varies only
    with which prompts were drawn, not with independent draws per model. One model gives exactly the
    resamples behind :func:`bootstrap_ci`.
    """
    if num_resamples < 1:
        raise ValueError(f"bootstrap: num_resamples={num_resamples} must be >= 1")
    if not models:
        raise ValueError("bootstrap: no models to resample")
    layouts = [_layout(groups, strata) for groups in models]
    if len({len(sums) for sums, _, _ in layouts}) > 1:
        raise ValueError(f"bootstrap: the models scored different numbers of prompts "
                         f"({[len(sums) for sums, _, _ in layouts]}); pair them on the same prompts")
    members = layouts[0][2]
    rng = np.random.default_rng(seed)
    stats = np.zeros((len(models), num_resamples))
    for m in members:
        drawn = m[rng.integers(0, len(m), size=(num_resamples, len(m)))]  # [resample, prompt of this stratum]
        for k, (sums, counts, _) in enumerate(layouts):
            stats[k] += sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    return stats / len(members)


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of resampled statistics (``numpy.quantile``, linear)."""
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level={level} must be in (0, 1)")
    low, high = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def bootstrap_ci(groups: Sequence[Sequence[float]], strata: Sequence[str] | None = None, *,
                 num_resamples: int = NUM_RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of :func:`clustered_mean` under prompt resampling.

    ``groups[p]``: the values of prompt ``p``'s images; ``strata[p]``: its tag (resample within tags,
    average the tag means) or ``None`` (resample all prompts, average all images). Returns
    ``(low, high)``.
    """
    if not 0 < level < 1 or num_resamples < 1:
        raise ValueError(f"bootstrap: level={level} must be in (0, 1) and num_resamples={num_resamples} >= 1")
    return percentile_interval(resampled_means([groups], strata, num_resamples=num_resamples, seed=seed)[0], level)
