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


def bootstrap_ci(groups: Sequence[Sequence[float]], strata: Sequence[str] | None = None, *,
                 num_resamples: int = NUM_RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of :func:`clustered_mean` under prompt resampling.

    ``groups[p]``: the values of prompt ``p``'s images; ``strata[p]``: its tag (resample within tags,
    average the tag means) or ``None`` (resample all prompts, average all images). Returns
    ``(low, high)``.
    """
    if not 0 < level < 1 or num_resamples < 1:
        raise ValueError(f"bootstrap: level={level} must be in (0, 1) and num_resamples={num_resamples} >= 1")
    sums, counts, members = _layout(groups, strata)
    rng = np.random.default_rng(seed)
    stats = np.zeros(num_resamples)
    for m in members:
        drawn = m[rng.integers(0, len(m), size=(num_resamples, len(m)))]  # [resample, prompt of this stratum]
        stats += sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    stats /= len(members)
    low, high = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)
