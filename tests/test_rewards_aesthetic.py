"""AestheticMini v2 (caption adherence × composition quality): the documented formula by hand on
built scenes, the ordering well composed > plain > wrong for several captions, low scores for
caption-blind controls, high scores for clean renders, and ``score_matrix`` against ``score``."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from opd.data.world.grammar import load_prompts
from opd.data.world.layout import scene_for
from opd.data.world.render import render_tensor
from opd.data.world.scene import BACKGROUNDS, OBJECT_COLORS, SHAPE_KINDS, Scene, Shape
from opd.rewards.aesthetic_mini import AestheticMini
from opd.rewards.base import Reward
from opd.rewards.shapes import detect

YELLOW = (245, 235, 60)


def _meta(prompt: str, background: str, objects: list[dict], **extra) -> dict:
    return {"tag": "aesthetic", "background": background, "objects": objects, **extra, "prompt": prompt}


def _clause(count: int = 1, kind: str | None = None, color: str | None = None) -> dict:
    clause: dict = {"count": count}
    if kind is not None:
        clause["class"] = kind
    if color is not None:
        clause["color"] = color
    return clause


#: one caption of every style of the v2 grammar (the test split adds many more once loaded)
HAND_ROWS = [
    _meta("a red circle and a blue square on a navy background", "navy",
          [_clause(1, "circle", "red"), _clause(1, "square", "blue")]),
    _meta("three yellow stars on a brown background", "brown", [_clause(3, "star", "yellow")]),
    _meta("a colourful scene with four shapes on a gray background", "gray", [_clause(4)], distinct_colors=True),
    _meta("a row of three crosses in different colours on a black background", "black", [_clause(3, "cross")],
          distinct_colors=True, layout="row"),
    _meta("a small green heart on a navy background", "navy", [_clause(1, "heart", "green")], scale="small"),
    _meta("a large white ring on a black background", "black", [_clause(1, "ring", "white")], scale="large"),
    _meta("a cyan crescent, a purple semicircle and an orange diamond on a gray background", "gray",
          [_clause(1, "crescent", "cyan"), _clause(1, "semicircle", "purple"), _clause(1, "diamond", "orange")]),
]


def _image(shapes: list[Shape], background: str) -> torch.Tensor:
    return render_tensor([Scene(shapes, background=background)])[0]


def _fill(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 64, 64).clone()


def _score(images: list[torch.Tensor], meta: dict) -> list[float]:
    out = AestheticMini().score(torch.stack(images), [meta["prompt"]] * len(images), [meta] * len(images))
    return out["reward"].tolist()


@pytest.fixture(scope="module")
def test_rows() -> list[dict]:
    return load_prompts("aesthetic", "test")


# --------------------------------------------------------------------------- the formula by hand


def test_formula_by_hand_on_two_squares() -> None:
    """A red 16-px square, box (2, 20)-(18, 36), and a blue 8-px one, box (36, 24)-(44, 32), on navy,
    against three captions that ask for the red square only (plain, large, small)."""
    image = _image([Shape("square", "red", 10, 28, 16), Shape("square", "blue", 40, 28, 8)], "navy")
    # the detector sees both squares exactly, with a template fit of at least 0.9 (confidence 1)
    found = sorted(detect((image.permute(1, 2, 0) * 255).round().byte().numpy()), key=lambda d: -d.area)
    assert [(d.cls, d.color, d.bbox, d.area) for d in found] == [
        ("square", "red", (2, 20, 18, 36), 256), ("square", "blue", (36, 24, 44, 32), 64)]
    assert min(d.score for d in found) >= 0.9

    # quality, by hand: weights 256/320 and 64/320; centroids (10, 28) and (40, 28)
    cx, cy = 0.8 * 10 + 0.2 * 40, 28.0  # = (16, 28)
    balance = 1 - (((cx - 32) / 32) ** 2 + ((cy - 32) / 32) ** 2)  # 1 - (0.25 + 0.015625)
    # red: 2 px from the left edge (the blue box is 18 px away), tau * side = 4 -> 0.5; blue: >= 18 px -> 1
    spacing = (min(1.0, 2 / (0.25 * 16)) + 1.0) / 2
    extent = math.sqrt((16**2 + 8**2) / 64**2)  # 0.2795: inside the default band [0.25, 0.55]
    scale = {"plain": 1.0, "large": 1 - math.log2(0.45 / extent), "small": 1 - math.log2(extent / 0.25)}
    clean = 1.0  # every non-navy pixel lies in a box; fits >= 0.9
    assert math.dist(OBJECT_COLORS["red"], BACKGROUNDS["navy"]) > 100
    assert math.dist(OBJECT_COLORS["blue"], BACKGROUNDS["navy"]) > 100
    contrast = 1.0
    # adherence: the blue square is unrequested (1); "large" also finds the red square 16 px < 20 px (1)
    errors = {"plain": 1.0, "large": 2.0, "small": 1.0}

    rows = [_meta("a red square on a navy background", "navy", [_clause(1, "square", "red")])]
    rows.append({**rows[0], "scale": "large", "prompt": "a large red square on a navy background"})
    rows.append({**rows[0], "scale": "small", "prompt": "a small red square on a navy background"})
    out = AestheticMini().score_matrix(image[None], rows)
    for j, name in enumerate(("plain", "large", "small")):
        terms = (balance, spacing, scale[name], clean, contrast)
        quality = 0.3 + 0.7 * sum(terms) / 5
        adherence = 0.25 ** errors[name]
        got = {key: value[0, j].item() for key, value in out.items()}
        expected = {"balance": balance, "spacing": spacing, "scale": scale[name], "clean": clean,
                    "contrast": contrast, "errors": errors[name], "adherence": adherence,
                    "quality": quality, "reward": adherence * quality}
        assert got == pytest.approx(expected, abs=1e-6), name
    # the plain caption's number, worked on paper: 0.25 * (0.3 + 0.7 * (0.734375 + 0.75 + 3) / 5)
    assert out["reward"][0, 0].item() == pytest.approx(0.2319531, abs=1e-6)


def test_background_share_by_hand() -> None:
    """A brown stripe (rows 60-63, 256 px) on a navy canvas with one red square: the 20 x 20 px
    around the square (its box grown by 2) are not background, so 256 of the other 3696 px are stray."""
    image = _image([Shape("square", "red", 10, 28, 16)], "navy")
    image[:, 60:, :] = _fill(BACKGROUNDS["brown"])[:, 60:, :]
    meta = _meta("a red square on a navy background", "navy", [_clause(1, "square", "red")])
    out = AestheticMini().score(image[None], [meta["prompt"]], [meta])
    errors = (256 / 3696) / 0.1
    assert out["errors"].item() == pytest.approx(errors, abs=1e-6)
    assert out["adherence"].item() == pytest.approx(0.25**errors, abs=1e-6)
    assert out["reward"].item() == pytest.approx(0.25**errors * out["quality"].item(), abs=1e-6)
    brown = AestheticMini().score(image[None], [""], [{**meta, "background": "brown"}])
    assert brown["errors"].item() == pytest.approx((3440 / 3696) / 0.1, abs=1e-6)


def test_violations_counted_by_hand() -> None:
    """``errors`` (E) of built renders against captions, each counted on paper."""
    S = Shape
    rows = {row["prompt"].split(" on ")[0]: row for row in HAND_ROWS}
    pair, stars = rows["a red circle and a blue square"], rows["three yellow stars"]
    four, crosses = rows["a colourful scene with four shapes"], rows["a row of three crosses in different colours"]
    cases = [
        # colours swapped: two wrong colours (or, equally, two wrong kinds)
        (pair, [S("circle", "blue", 20, 32, 16), S("square", "red", 44, 32, 16)], "navy", 2),
        # one unrequested object
        (pair, [S("circle", "red", 20, 32, 16), S("square", "blue", 44, 32, 16), S("square", "blue", 32, 54, 8)],
         "navy", 1),
        (pair, [], "navy", 2),  # both missing
        # an unrequested star and a black background: 1 + (1 - 0) / 0.1
        (pair, [S("circle", "red", 20, 32, 16), S("square", "blue", 44, 32, 16), S("star", "green", 32, 54, 10)],
         "black", 11),
        # three yellow stars and two orange ones: two unrequested
        (stars, [S("star", "yellow", x, 20, 12) for x in (12, 32, 52)]
         + [S("star", "orange", x, 46, 12) for x in (22, 42)], "brown", 2),
        # one yellow star and one orange one: one missing, one of the wrong colour
        (stars, [S("star", "yellow", 20, 32, 14), S("star", "orange", 44, 32, 14)], "brown", 2),
        # four shapes, all red: three repeated colours
        (four, [S(k, "red", x, y, 14) for k, x, y in
                (("circle", 21, 21), ("star", 43, 21), ("diamond", 21, 43), ("cross", 43, 43))], "gray", 3),
        # three crosses in a column: two are off the row through the middle one
        (crosses, [S("cross", c, 32, y, 12) for c, y in (("red", 12), ("cyan", 32), ("white", 52))], "black", 2),
    ]
    images = torch.stack([_image(shapes, bg) for _, shapes, bg, _ in cases])
    metas = [meta for meta, *_ in cases]
    out = AestheticMini().score(images, [m["prompt"] for m in metas], metas)
    assert out["errors"].tolist() == pytest.approx([e for *_, e in cases], abs=1e-6)
    assert out["adherence"].tolist() == pytest.approx([0.25**e for *_, e in cases], rel=1e-5)


# --------------------------------------------------------------------------- ordering


def _ordering_cases() -> dict[str, tuple[dict, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """caption -> (row, well composed render, correct plain render, {violation: wrong render})."""
    S = Shape
    pair = [S("circle", "red", 20, 32, 18), S("square", "blue", 44, 32, 18)]
    stars = [S("star", "yellow", x, 32, 13) for x in (15, 32, 49)]
    four = [S("circle", "red", 21, 21, 14), S("triangle", "blue", 43, 21, 14),
            S("heart", "yellow", 21, 43, 14), S("ring", "green", 43, 43, 14)]
    crosses = [S("cross", c, x, 32, 12) for c, x in (("red", 15), ("cyan", 32), ("white", 49))]
    heart = [S("heart", "green", 32, 32, 12)]
    rows = {row["prompt"]: row for row in HAND_ROWS}
    return {
        "pair": (
            rows["a red circle and a blue square on a navy background"],
            _image(pair, "navy"),
            _image([S("circle", "red", 6, 6, 10), S("square", "blue", 18, 6, 10)], "navy"),  # in a corner
            {
                "colour": _image([pair[0], S("square", "green", 44, 32, 18)], "navy"),
                "kind": _image([pair[0], S("diamond", "blue", 44, 32, 18)], "navy"),
                "missing": _image([S("circle", "red", 32, 32, 18)], "navy"),
                "extra": _image([*pair, S("star", "yellow", 32, 54, 10)], "navy"),
                "background": _image(pair, "black"),
            },
        ),
        "group": (
            rows["three yellow stars on a brown background"],
            _image(stars, "brown"),
            _image([S("star", "yellow", x, 57.5, 13) for x in (6.5, 20.5, 34.5)], "brown"),  # on the bottom edge
            {
                "colour": _image([*stars[:2], S("star", "orange", 49, 32, 13)], "brown"),
                "kind": _image([*stars[:2], S("cross", "yellow", 49, 32, 13)], "brown"),
                "too few": _image([S("star", "yellow", x, 32, 14) for x in (22, 42)], "brown"),
                "too many": _image([S("star", "yellow", x, y, 12) for x in (21, 43) for y in (21, 43)], "brown"),
                "background": _image(stars, "gray"),
            },
        ),
        "colourful": (
            rows["a colourful scene with four shapes on a gray background"],
            _image(four, "gray"),
            _image([S(k, c, 7, y, 12) for (k, c), y in zip(
                [("circle", "red"), ("triangle", "blue"), ("heart", "yellow"), ("ring", "green")],
                (8, 23, 38, 53), strict=True)], "gray"),  # a column against the left edge
            {
                "same colours": _image([*four[:3], S("ring", "red", 43, 43, 14)], "gray"),
                "too few": _image(four[:3], "gray"),
                "too many": _image([*four, S("square", "white", 32, 32, 8)], "gray"),
                "background": _image(four, "navy"),
            },
        ),
        "row": (
            rows["a row of three crosses in different colours on a black background"],
            _image(crosses, "black"),
            _image([S("cross", c, x, 7, 12) for c, x in (("red", 7), ("cyan", 20), ("white", 33))], "black"),
            {
                "not a row": _image([S("cross", c, x, x, 12) for c, x in (("red", 14), ("cyan", 32), ("white", 50))],
                                    "black"),
                "same colours": _image([*crosses[:2], S("cross", "red", 49, 32, 12)], "black"),
                "kind": _image([*crosses[:2], S("square", "white", 49, 32, 12)], "black"),
            },
        ),
        "small": (
            rows["a small green heart on a navy background"],
            _image(heart, "navy"),
            _image([S("heart", "green", 7, 7, 10)], "navy"),  # in a corner
            {
                "large": _image([S("heart", "green", 32, 32, 34)], "navy"),
                "colour": _image([S("heart", "red", 32, 32, 12)], "navy"),
                "extra": _image([*heart, S("heart", "green", 50, 50, 10)], "navy"),
            },
        ),
    }


@pytest.mark.parametrize("case", ["pair", "group", "colourful", "row", "small"])
def test_well_composed_beats_plain_beats_wrong(case: str) -> None:
    meta, well, plain, wrong = _ordering_cases()[case]
    scores = _score([well, plain, *wrong.values()], meta)
    good, flat, bad = scores[0], scores[1], dict(zip(wrong, scores[2:], strict=True))
    assert good >= 0.9, scores
    assert 0.3 <= flat <= good - 0.15, scores  # correct, so at least the quality floor
    assert max(bad.values()) < 0.3, bad  # each violated fact costs a factor 4


# --------------------------------------------------------------------------- controls


def _every_kind(background: str) -> torch.Tensor:
    colours = list(OBJECT_COLORS)
    shapes = [Shape(kind, colours[i % len(colours)], 8 + 16 * (i % 4), 10 + 22 * (i // 4), 12)
              for i, kind in enumerate(SHAPE_KINDS)]
    return _image(shapes, background)


def test_caption_blind_controls_score_low(test_rows: list[dict]) -> None:
    half = _fill(BACKGROUNDS["navy"])
    half[:, :, :32] = _fill(YELLOW)[:, :, :32]
    controls = {
        "half yellow / half navy": half,
        **{f"constant {name}": _fill(rgb) for name, rgb in {**BACKGROUNDS, "yellow": YELLOW}.items()},
        "constant (0, 0, 0)": torch.zeros(3, 64, 64),
        "constant (255, 255, 255)": torch.ones(3, 64, 64),
        **{f"every kind on {bg}": _every_kind(bg) for bg in BACKGROUNDS},
    }
    rows = test_rows + HAND_ROWS
    out = AestheticMini().score_matrix(torch.stack(list(controls.values())), rows)
    worst = out["reward"].max(dim=1)
    for name, value, j in zip(controls, worst.values.tolist(), worst.indices.tolist(), strict=True):
        print(f"{name}: max {value:.4f} ({rows[j]['prompt']!r})")
        assert value <= 0.1, (name, rows[j]["prompt"])


def test_clean_renders_score_high(test_rows: list[dict]) -> None:
    rows = test_rows + HAND_ROWS
    rng = random.Random(0)
    images = render_tensor([scene_for(row, rng) for row in rows])
    out = AestheticMini().score(images, [row["prompt"] for row in rows], rows)
    print({key: round(value.mean().item(), 3) for key, value in out.items()})
    assert out["reward"].mean() >= 0.85
    assert (out["adherence"] > 0.9).float().mean() >= 0.98  # scene_for draws what the caption says
    assert out["reward"].min() >= 0.3


def test_slightly_degraded_renders_still_score_high(test_rows: list[dict]) -> None:
    """A blur of radius 0.6 px and Gaussian noise of sigma 0.05 (GenEval-mini's noisy renders) cost
    little: the background is judged on a box-filtered image and quality terms are soft."""
    rows = test_rows[:60]
    rng = random.Random(2)
    noisy = []
    for i, image in enumerate(render_tensor([scene_for(row, rng) for row in rows])):
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        blurred = torch.from_numpy(np.array(pil.filter(ImageFilter.GaussianBlur(0.6)))).permute(2, 0, 1) / 255
        noisy.append((blurred + 0.05 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(i))).clamp(0, 1))
    out = AestheticMini().score(torch.stack(noisy), [row["prompt"] for row in rows], rows)
    print({key: round(value.mean().item(), 3) for key, value in out.items()})
    assert out["reward"].mean() >= 0.85


# --------------------------------------------------------------------------- API


def test_score_matrix_is_score_against_every_row() -> None:
    rng = random.Random(1)
    images = render_tensor([scene_for(row, rng) for row in HAND_ROWS])
    prompts = [row["prompt"] for row in HAND_ROWS]
    reward = AestheticMini()
    matrix = reward.score_matrix(images, HAND_ROWS)
    n = len(HAND_ROWS)
    for shift in (0, 1, 3):
        rows = [HAND_ROWS[(i + shift) % n] for i in range(n)]
        out = reward.score(images, prompts, rows)
        assert set(out) == set(matrix)
        for key, value in out.items():
            assert torch.equal(value, matrix[key][torch.arange(n), (torch.arange(n) + shift) % n]), key
    # the base class's loop over score() gives the same matrix
    default = Reward.score_matrix(reward, images, HAND_ROWS, batch_size=3)
    assert set(default) == set(matrix) and all(torch.equal(default[key], matrix[key]) for key in matrix)
    # a render matches its own caption best
    assert torch.equal(matrix["reward"].argmax(dim=1), torch.arange(n))


def test_output_format_and_errors() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = AestheticMini().score(images, ["a", "b"], HAND_ROWS[:2])
    assert set(out) == {"reward", "adherence", "errors", "quality", "balance", "spacing", "scale", "clean", "contrast"}
    for key, value in out.items():
        assert value.shape == (2,) and value.dtype == torch.float32 and value.device.type == "cpu"
        if key != "errors":
            assert ((value >= 0) & (value <= 1)).all(), key
    with pytest.raises(ValueError, match=r"metadata\[1\] \(prompt 'b'\).*'objects'/'background'"):
        AestheticMini().score(images, ["a", "b"], [HAND_ROWS[0], {"include": []}])
    with pytest.raises(ValueError, match=r"metadata\[0\].*'objects'/'background'"):
        AestheticMini().score_matrix(images, [{"objects": []}])
    with pytest.raises(ValueError, match="background='green'"):
        AestheticMini().score(images[:1], ["a"], [{**HAND_ROWS[0], "background": "green"}])
    with pytest.raises(ValueError, match="quality_floor"):
        AestheticMini(violation_factor=0.5, quality_floor=0.3)
