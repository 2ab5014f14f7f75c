"""MultiReward: weighted sum and key layout against per-component calls, clear errors, Hydra instantiation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from opd.rewards.aesthetic_mini import AestheticMini
from opd.rewards.base import Reward
from opd.rewards.multi import MultiReward


class _Brightness(Reward):
    """Mean pixel value, with an extra evaluation key; NaN for image ``nan_at`` if set."""

    name = "brightness"

    def __init__(self, nan_at: int | None = None) -> None:
        self.nan_at = nan_at

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        value = images.mean(dim=(1, 2, 3))
        if self.nan_at is not None:
            value[self.nan_at] = float("nan")
        return {"reward": value, "bright": (value > 0.5).float()}


def _batch(num_images: int = 3) -> tuple[Tensor, list[str], list[dict[str, Any]]]:
    images = torch.rand(num_images, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # AestheticMini is prompt-conditioned: aesthetic rows (objects, background)
    row = {"tag": "aesthetic", "background": "gray", "objects": [{"count": 1}], "prompt": "a shape on a gray background"}
    return images, [row["prompt"]] * num_images, [dict(row) for _ in range(num_images)]


def test_weighted_sum_and_keys() -> None:
    images, prompts, metadata = _batch()
    aesthetic, brightness = AestheticMini(), _Brightness()
    multi = MultiReward(rewards={"aes": aesthetic, "light": brightness}, weights={"aes": 0.7, "light": -0.2})
    out = multi.score(images, prompts, metadata)
    expected_aes = aesthetic.score(images, prompts, metadata)
    expected_light = brightness.score(images, prompts, metadata)
    assert set(out) == {
        "reward",
        "aes",
        "aes/adherence",
        "aes/errors",
        "aes/quality",
        "aes/balance",
        "aes/spacing",
        "aes/scale",
        "aes/clean",
        "aes/contrast",
        "light",
        "light/bright",
    }
    torch.testing.assert_close(out["reward"], 0.7 * expected_aes["reward"] - 0.2 * expected_light["reward"])
    torch.testing.assert_close(out["aes/contrast"], expected_aes["contrast"])
    torch.testing.assert_close(out["light/bright"], expected_light["bright"])
    for value in out.values():
        assert value.shape == (3,) and value.dtype == torch.float32
    torch.testing.assert_close(multi(images, prompts, metadata), out["reward"])


def test_mismatched_names_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"\['aes', 'ocr'\].*\['aes'\]"):
        MultiReward(rewards={"aes": AestheticMini(), "ocr": _Brightness()}, weights={"aes": 1.0})
    with pytest.raises(TypeError, match="rewards.aes.*_target_"):
        MultiReward(rewards={"aes": {"quality_floor": 0.5}}, weights={"aes": 1.0})  # type: ignore[dict-item]


def test_nan_component_names_the_reward() -> None:
    multi = MultiReward(
        rewards={"aes": AestheticMini(), "light": _Brightness(nan_at=1)}, weights={"aes": 1.0, "light": 1.0}
    )
    with pytest.raises(ValueError, match=r"'light'.*\[1\]"):
        multi.score(*_batch())


def test_instantiates_from_hydra_config() -> None:
    cfg = OmegaConf.create(
        {
            "_target_": "opd.rewards.multi.MultiReward",
            "rewards": {
                "aesthetic": {"_target_": "opd.rewards.aesthetic_mini.AestheticMini", "quality_floor": 0.5},
                "light": {"_target_": f"{__name__}._Brightness"},
            },
            "weights": {"aesthetic": 2.0, "light": 1.0},
        }
    )
    multi = instantiate(cfg)
    images, prompts, metadata = _batch()
    out = multi.score(images, prompts, metadata)
    torch.testing.assert_close(out["reward"], 2 * out["aesthetic"] + out["light"])
    assert multi.rewards["aesthetic"].quality_floor == 0.5
