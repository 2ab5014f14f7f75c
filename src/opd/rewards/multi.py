"""Weighted sum of several rewards (Flow-GRPO's multi-reward), keeping every component for logging."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from opd.rewards.base import Reward, check_batch


class MultiReward(Reward):
    """``reward = Σ_k weights[k] · rewards[k].score(...)["reward"]``.

    Built from two mappings keyed by the same component names, which instantiates directly from
    Hydra::

        _target_: opd.rewards.multi.MultiReward
        rewards:
          ocr: {_target_: opd.rewards.ocr.OCRReward}
          aesthetic: {_target_: opd.rewards.aesthetic_mini.AestheticMini}
        weights: {ocr: 1.0, aesthetic: 0.5}

    ``score`` returns ``"reward"``, each component's reward as ``"<name>"`` and each component's
    other keys as ``"<name>/<key>"`` (e.g. ``"ocr/exact"``, ``"ocr/failed"``), all ``float32 [B]`` on
    CPU; when a component reports ``failed`` (1.0 where it could not score an image, e.g. the OCR
    engine raised), an overall ``"failed"`` is 1.0 where any component failed.
    A non-finite value from any component raises: training on NaN would silently corrupt the policy.
    """

    name = "multi"

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]) -> None:
        if set(rewards) != set(weights):
            raise ValueError(
                f"MultiReward: `rewards` names {sorted(rewards)} but `weights` names {sorted(weights)}; "
                "give every reward exactly one weight"
            )
        if not rewards:
            raise ValueError("MultiReward: `rewards` is empty; name at least one reward")
        for key, reward in rewards.items():
            if not isinstance(reward, Reward):
                raise TypeError(
                    f"MultiReward: rewards.{key} is a {type(reward).__name__}, not a Reward; "
                    "does its config lack a `_target_`?"
                )
        self.rewards: dict[str, Reward] = dict(rewards)
        self.weights: dict[str, float] = {key: float(weights[key]) for key in rewards}

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → ``{"reward": [B], "<name>": [B], "<name>/<key>": [B]}``."""
        check_batch(images, prompts, metadata)
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        failed: Tensor | None = None
        out: dict[str, Tensor] = {}
        for key, reward in self.rewards.items():
            component = reward.score(images, prompts, metadata)
            for metric, value in component.items():
                _check_finite(key, metric, value)
                out[key if metric == "reward" else f"{key}/{metric}"] = value.float().cpu()
            total += self.weights[key] * out[key]
            if "failed" in component:
                mine = out[f"{key}/failed"]
                failed = mine.clone() if failed is None else torch.maximum(failed, mine)
        return {"reward": total, **out, **({} if failed is None else {"failed": failed})}


def _check_finite(key: str, metric: str, value: Tensor) -> None:
    """Raise naming the component whose score is NaN/inf."""
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
        raise ValueError(
            f"MultiReward: reward {key!r} returned non-finite {metric!r} for images {bad}; "
            f"fix that reward (or drop it from `rewards`) before training"
        )
