"""The mini world's GenEval judge: detection, strict correctness and the partial training score."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from opd.data.world.grammar import load_prompts
from opd.data.world.layout import scene_for
from opd.data.world.render import render, render_tensor
from opd.data.world.scene import OBJECT_COLORS, OPPOSITE, SHAPE_KINDS, Scene, Shape
from opd.rewards.geneval_mini import GenEvalMini, by_class, detect, strict_correct


def _violate(meta: dict, rng: random.Random) -> dict:
    """Metadata whose clean render must fail ``meta`` under GenEval's rules.

    GenEval accepts extra objects except where ``exclude`` forbids them, so a violation removes or
    changes what is asked: another class, a missing object, a count off by one, another colour,
    the opposite relation, or the two colours swapped between the objects.
    """
    out, tag = copy.deepcopy(meta), meta["tag"]
    include = out["include"]
    if tag == "single_object":
        include[0]["class"] = rng.choice([k for k in SHAPE_KINDS if k != include[0]["class"]])
    elif tag == "two_object":
        del include[rng.randrange(2)]
    elif tag == "counting":
        n = include[0]["count"]
        include[0]["count"] = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    elif tag == "colors":
        include[0]["color"] = rng.choice([c for c in OBJECT_COLORS if c != include[0]["color"]])
    elif tag == "position":
        include[1]["position"][0] = OPPOSITE[include[1]["position"][0]]
    elif tag == "color_attr":
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
    return out


def _noisy(image: torch.Tensor, seed: int) -> torch.Tensor:
    """Slight blur (radius 0.6 px) and Gaussian noise (sigma 0.05) on one ``[3, H, W]`` image."""
    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    blurred = torch.from_numpy(np.array(pil.filter(ImageFilter.GaussianBlur(0.6)))).permute(2, 0, 1) / 255
    noise = torch.randn(blurred.shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    return (blurred + noise).clamp(0, 1)


@pytest.fixture(scope="module")
def judged() -> dict[str, dict[str, torch.Tensor]]:
    """The judge's scores of the test prompts: clean, violating and noisy renders."""
    rows = load_prompts("geneval", "test")
    prompts = [m["prompt"] for m in rows]
    rng = random.Random(0)
    clean = render_tensor([scene_for(m, rng) for m in rows])
    violating = render_tensor([scene_for(_violate(m, rng), rng) for m in rows])
    noisy = torch.stack([_noisy(img, i) for i, img in enumerate(clean)])
    judge = GenEvalMini()
    return {
        name: judge.score(images, prompts, rows)
        for name, images in (("clean", clean), ("violating", violating), ("noisy", noisy))
    }


def test_clean_renders_are_correct(judged) -> None:
    assert judged["clean"]["correct"].mean() >= 0.98
    assert judged["clean"]["reward"].mean() >= 0.98


def test_violating_renders_are_wrong(judged) -> None:
    assert judged["violating"]["correct"].mean() <= 0.02
    assert judged["violating"]["reward"].mean() < 0.8


def test_noisy_renders_are_still_correct(judged) -> None:
    assert judged["noisy"]["correct"].mean() >= 0.95


def test_output_format(judged) -> None:
    for scores in judged.values():
        assert set(scores) == {"reward", "correct"}
        assert all(v.shape == (300,) and v.dtype == torch.float32 for v in scores.values())
        assert set(scores["correct"].tolist()) <= {0.0, 1.0}


def test_detect_measures_shapes() -> None:
    scene = Scene(
        [
            Shape("circle", "red", 16, 16, 16),
            Shape("square", "blue", 46, 20, 12),
            Shape("triangle", "yellow", 30, 46, 18),
        ]
    )
    found = {d.cls: d for d in detect(np.asarray(render(scene)))}
    assert set(found) == set(SHAPE_KINDS)
    for shape in scene.shapes:
        det = found[shape.kind]
        assert det.color == shape.color and det.score > 0.9
        assert np.allclose(det.bbox, shape.bbox, atol=1.0)
    square = found["square"]
    assert square.centroid == pytest.approx((46, 20), abs=0.3) and abs(square.area - 144) <= 6
    # a triangle's mass sits low: centroid 1/6 of its height below the box centre
    assert found["triangle"].centroid[1] == pytest.approx(46 + 18 / 6, abs=0.6)


def test_detect_ignores_backgrounds_and_noise() -> None:
    rng = random.Random(3)
    for m in load_prompts("aesthetic", "test")[:60]:  # black / navy / gray backgrounds
        scene = scene_for(m, rng)
        found = sorted((d.cls, d.color) for d in detect(np.asarray(render(scene))))
        assert found == sorted((s.kind, s.color) for s in scene.shapes), m["prompt"]
    speckle = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    assert detect(speckle) == []


# --------------------------------------------------------------------------- hand-computed scores


def _score(shapes: list[Shape], meta: dict, reference_quirk: bool = False) -> tuple[float, float]:
    images = render_tensor([Scene(shapes)])
    out = GenEvalMini(reference_quirk=reference_quirk).score(images, [meta["prompt"]], [meta])
    return out["reward"].item(), out["correct"].item()


def _circles(n: int, color: str = "red") -> list[Shape]:
    return [Shape("circle", color, 8 + 12 * i, 32, 9) for i in range(n)]


def _meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    return {"tag": tag, "include": include, "exclude": exclude or [], "prompt": "p"}


def test_count_subscore() -> None:
    three = _meta("counting", [{"class": "circle", "count": 3}], [{"class": "circle", "count": 4}])
    assert _score(_circles(2), three) == pytest.approx((1 - 1 / 3, 0.0))
    assert _score(_circles(3), three) == pytest.approx((1.0, 1.0))
    assert _score(_circles(4), three) == pytest.approx((1 - 1 / 3, 0.0))  # exclude: no 4th circle
    two = _meta("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
    assert _score(_circles(5), two) == pytest.approx((1 - 3 / 2, 0.0))  # the count term goes negative


def test_extra_objects_pass_strict_but_not_partial() -> None:
    # GenEval: at least `count` found passes when nothing is excluded; the partial score wants exactly n
    red_circle = _meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    assert _score(_circles(2), red_circle) == pytest.approx((0.0, 1.0))  # count 0, colour 0 (count wrong)
    assert _score(_circles(1, "blue"), red_circle) == pytest.approx((0.5, 0.0))  # count 1, colour 0


def test_colour_subscore() -> None:
    meta = _meta(
        "color_attr",
        [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
    )
    circle, square = Shape("circle", "red", 16, 32, 14), Shape("square", "green", 46, 32, 14)
    # sub-scores [count 1, colour 1, count 1, colour 0]; the quirk only concerns positions
    assert _score([circle, square], meta) == pytest.approx((0.75, 0.0))
    assert _score([circle, square], meta, reference_quirk=True) == pytest.approx((0.75, 0.0))


def test_position_subscore() -> None:
    meta = _meta(
        "position",
        [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}],
    )
    left, right = Shape("square", "blue", 12, 32, 14), Shape("square", "blue", 52, 32, 14)
    circle = Shape("circle", "red", 32, 32, 14)
    assert _score([circle, left], meta) == pytest.approx((1.0, 1.0))
    assert _score([circle, left], meta, reference_quirk=True) == pytest.approx((1.0, 1.0))
    # flipped: [count 1, count 1, position 0]; the reference appends its 1 even on failure
    assert _score([circle, right], meta) == pytest.approx((2 / 3, 0.0))
    assert _score([circle, right], meta, reference_quirk=True) == pytest.approx((3 / 4, 0.0))
    # reference object missing: [count 0, count 1, position 0]
    assert _score([left], meta) == pytest.approx((1 / 3, 0.0))


def test_strict_correct_uses_most_confident_objects() -> None:
    dets = detect(
        np.asarray(render(Scene([Shape("circle", "red", 16, 32, 14), Shape("circle", "blue", 46, 32, 14)])))
    )
    objects = by_class(dets)
    assert [d.score for d in objects["circle"]] == sorted((d.score for d in dets), reverse=True)
    top = objects["circle"][0].color
    meta = _meta("colors", [{"class": "circle", "count": 1, "color": top}])
    assert strict_correct(objects, meta)


def test_bad_metadata_and_batch() -> None:
    judge = GenEvalMini()
    images = render_tensor([Scene(_circles(1))])
    with pytest.raises(ValueError, match="no 'include'"):
        judge.score(images, ["x"], [{"tag": "ocr", "prompt": "x", "text": "ABC"}])
    with pytest.raises(ValueError, match="batch mismatch"):
        judge.score(images, ["x", "y"], [{}, {}])
