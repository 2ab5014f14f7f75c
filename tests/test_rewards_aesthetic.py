"""AestheticMini: the documented formula by hand on a 2×2 image, and its ordering on constructed scenes."""

from __future__ import annotations

import math

import pytest
import torch

from opd.rewards.aesthetic_mini import AestheticMini


def _gray_with_square(background: float, square: float) -> torch.Tensor:
    image = torch.full((3, 64, 64), background)
    image[:, 16:48, 16:48] = square
    return image


def _colour_quadrants() -> torch.Tensor:
    """Red, blue, yellow and black quadrants: saturated, several hues, strong luminance edges."""
    image = torch.zeros(3, 64, 64)
    image[0, :32, :32] = 1  # red
    image[2, :32, 32:] = 1  # blue
    image[0:2, 32:, :32] = 1  # yellow; bottom-right stays black
    return image


def _text_like() -> torch.Tensor:
    """Black 2-px strokes on a white canvas (384 of 4096 px), like a legible sign."""
    image = torch.ones(3, 64, 64)
    for left in range(8, 56, 4):
        image[:, 24:40, left : left + 2] = 0
    return image


def test_formula_by_hand_on_2x2() -> None:
    pixels = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)]  # R, G, B, white
    image = torch.tensor(pixels).T.reshape(1, 3, 2, 2)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def pstd(xs: list[float]) -> float:
        return math.sqrt(mean([(x - mean(xs)) ** 2 for x in xs]))

    rg = [r - g for r, g, b in pixels]
    yb = [(r + g) / 2 - b for r, g, b in pixels]
    m = math.sqrt(pstd(rg) ** 2 + pstd(yb) ** 2) + 0.3 * math.hypot(mean(rg), mean(yb))
    luma = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in pixels]
    c, k = 1 - math.exp(-m / 0.25), min(1.0, 2 * pstd(luma))
    u = min(1.0, mean([pstd([p[ch] for p in pixels]) for ch in range(3)]) / 0.1)
    out = AestheticMini().score(image, [""], [{}])
    assert out["colourfulness"].item() == pytest.approx(c, abs=1e-6)
    assert out["contrast"].item() == pytest.approx(k, abs=1e-6)
    assert out["structure"].item() == pytest.approx(u, abs=1e-6)
    assert out["reward"].item() == pytest.approx(u * (0.6 * c + 0.4 * k), abs=1e-6)
    assert out["reward"].item() == pytest.approx(0.853, abs=1e-3)  # the same, worked on paper


def test_ordering_and_range() -> None:
    images = torch.stack(
        [
            torch.full((3, 64, 64), 0.5),  # uniform gray
            _gray_with_square(0.5, 0.56),  # gray with a dim shape
            _text_like(),  # black on white
            _colour_quadrants(),  # saturated, multi-colour, high contrast
            torch.zeros(3, 64, 64).index_fill_(0, torch.tensor([0]), 1.0),  # flat saturated red
        ]
    )
    out = AestheticMini().score(images, [""] * 5, [{}] * 5)
    uniform, dim, text, vivid, flat_red = out["reward"].tolist()
    assert uniform == 0.0 and flat_red == 0.0  # a flat canvas scores nothing, however saturated
    assert uniform < dim < text < vivid
    assert dim < 0.05 and vivid > 0.8
    assert out["colourfulness"][2].item() == pytest.approx(0.0, abs=1e-6)  # gray levels carry no colour
    for value in out.values():
        assert value.shape == (5,) and value.dtype == torch.float32
        assert ((value >= 0) & (value <= 1)).all()


def test_deterministic_and_dtype_independent() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reward = AestheticMini()
    a = reward(images, [""] * 4)
    assert torch.equal(a, reward(images, [""] * 4))
    assert torch.allclose(a, reward(images.double(), [""] * 4), atol=1e-7)


def test_weights_must_keep_score_in_unit_interval() -> None:
    with pytest.raises(ValueError, match="contrast_weight"):
        AestheticMini(colour_weight=0.8, contrast_weight=0.4)
