"""The mini world's GenEval judge: detection, strict correctness and the partial training score."""

from __future__ import annotations

import copy
import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from opd.data.world.grammar import load_prompts
from opd.data.world.layout import scene_for
from opd.data.world.render import render, render_tensor
from opd.data.world.scene import BACKGROUNDS, OBJECT_COLORS, OPPOSITE, SHAPE_KINDS, Scene, Shape
from opd.rewards.base import Reward
from opd.rewards.geneval_mini import GenEvalMini, by_class, detect, exact_correct
from opd.rewards.shapes import MARGIN, segment, template_ious

COLORS = list(OBJECT_COLORS)
GAP = 3.0  # the least gap the tests leave between an added object and the scene's objects


def _image(scene: Scene) -> np.ndarray:
    return np.asarray(render(scene))


def _found(image: np.ndarray) -> list[tuple[str | None, str]]:
    return sorted(((d.cls or "?", d.color) for d in detect(image)), key=str)


def _expected(scene: Scene) -> list[tuple[str, str]]:
    return sorted(((s.kind, s.color) for s in scene.shapes), key=str)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_every_kind_alone_is_detected_as_itself(kind: str) -> None:
    rng = random.Random(SHAPE_KINDS.index(kind))
    for i, size in enumerate((10, 12, 15, 19, 24, 30, 38)):
        color, background = COLORS[(i + len(kind)) % len(COLORS)], list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        shape = Shape(kind, color, 32 + rng.uniform(-3, 3), 32 + rng.uniform(-3, 3), size)
        image = _image(Scene([shape], background=background))
        found = detect(image)
        assert [(d.cls, d.color) for d in found] == [(kind, color)], (size, color, background, found)
        # the box of the pixels at least half way from the background to the colour (not the shape's
        # box: a crescent's horn tips end short of its right edge)
        bg, rgb = np.array(BACKGROUNDS[background]), np.array(OBJECT_COLORS[color])
        ys, xs = np.nonzero((image - bg) @ (rgb - bg) >= 0.5 * (rgb - bg) @ (rgb - bg))
        assert np.allclose(found[0].bbox, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), atol=1)
        assert found[0].score >= 0.9


def test_every_pair_of_kinds_is_told_apart() -> None:
    rng = random.Random(1)
    for a, b in itertools.combinations(SHAPE_KINDS, 2):
        ca, cb = rng.sample(COLORS, 2)
        y = rng.uniform(20, 44)
        scene = Scene([Shape(a, ca, 17, y, rng.uniform(13, 20)), Shape(b, cb, 47, y, rng.uniform(13, 20))])
        assert _found(_image(scene)) == _expected(scene), (a, b)


def test_templates_of_other_kinds_trail_by_the_margin() -> None:
    # the IoU of a kind's own template leads every other kind's by more than MARGIN (clean renders)
    for kind in SHAPE_KINDS:
        for size in (12, 20, 32):
            (blob,) = segment(_image(Scene([Shape(kind, "blue", 31.6, 32.3, size)])))
            ious = template_ious(blob.soft)
            own = ious[SHAPE_KINDS.index(kind)]
            assert own - np.delete(ious, SHAPE_KINDS.index(kind)).max() > MARGIN, (kind, size, ious)


def test_detect_measures_shapes() -> None:
    scene = Scene(
        [
            Shape("circle", "red", 16, 16, 16),
            Shape("square", "blue", 46, 20, 12),
            Shape("triangle", "yellow", 30, 46, 18),
        ]
    )
    found = {d.cls: d for d in detect(_image(scene))}
    assert set(found) == {"circle", "square", "triangle"}
    for shape in scene.shapes:
        det = found[shape.kind]
        assert det.color == shape.color and det.score > 0.9
        assert np.allclose(det.bbox, shape.bbox, atol=1.0)
        assert all(isinstance(v, int) for v in det.bbox)
    square = found["square"]
    assert square.centroid == pytest.approx((46, 20), abs=0.3) and abs(square.area - 144) <= 6
    # a triangle's mass sits low: centroid 1/6 of its height below the box centre
    assert found["triangle"].centroid[1] == pytest.approx(46 + 18 / 6, abs=0.6)


def test_detect_ignores_backgrounds_and_noise() -> None:
    rng = random.Random(3)
    for m in load_prompts("aesthetic", "test")[:60]:  # every background, sizes up to 38 px
        scene = scene_for(m, rng)
        assert _found(_image(scene)) == _expected(scene), m["prompt"]
    speckle = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    assert detect(speckle) == []


# --------------------------------------------------------------------------- test prompts


def _noisy(image: np.ndarray, seed: int) -> np.ndarray:
    """Slight blur (radius 0.6 px) and Gaussian noise (sigma 0.05 of the range) on one image."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float64)
    noise = np.random.default_rng(seed).normal(0, 0.05 * 255, image.shape)
    return np.clip(np.round(blurred + noise), 0, 255).astype(np.uint8)


def _free_spot(scene: Scene, width: float, height: float, rng: random.Random) -> tuple[float, float]:
    """A centre where a ``width`` x ``height`` box keeps ``GAP`` from every shape and the edge."""
    for _ in range(2000):
        cx, cy = rng.uniform(2 + width / 2, 62 - width / 2), rng.uniform(2 + height / 2, 62 - height / 2)
        box = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
        if all(
            box[2] + GAP <= s.bbox[0]
            or s.bbox[2] + GAP <= box[0]
            or box[3] + GAP <= s.bbox[1]
            or s.bbox[3] + GAP <= box[1]
            for s in scene.shapes
        ):
            return cx, cy
    raise RuntimeError("no free spot")


def _with_blob(scene: Scene, rng: random.Random) -> np.ndarray:
    """The scene's render with a 16 x 8 px rectangle (no kind's outline) in a palette colour."""
    cx, cy = _free_spot(scene, 16, 8, rng)
    image = _image(scene).copy()
    image[round(cy - 4) : round(cy + 4), round(cx - 8) : round(cx + 8)] = OBJECT_COLORS[rng.choice(COLORS)]
    return image


def _violations(meta: dict, rng: random.Random) -> dict[str, np.ndarray]:
    """Renders that break ``meta`` in one way each (those that apply to its tag): drawn for changed
    metadata, or the clean scene with an object removed or added."""
    tag, include = meta["tag"], meta["include"]
    kinds = {c["class"] for c in include}
    changed: dict[str, dict] = {}

    def change(name: str) -> list[dict]:
        changed[name] = copy.deepcopy(meta)
        return changed[name]["include"]

    change("wrong kind")[0]["class"] = rng.choice([k for k in SHAPE_KINDS if k not in kinds])
    if tag != "position":  # scene_for places one object per clause in position scenes
        change("one more")[0]["count"] += 1
    if include[0]["count"] > 1:
        change("one fewer")[0]["count"] -= 1
    coloured = [i for i, c in enumerate(include) if "color" in c]
    if coloured:
        clause = change("wrong colour")[coloured[0]]
        clause["color"] = rng.choice([c for c in COLORS if c != clause["color"]])
    if len(coloured) == 2 and include[0]["color"] != include[1]["color"]:
        first, second = change("colours swapped")
        first["color"], second["color"] = second["color"], first["color"]
    if "position" in include[-1]:
        rel = include[-1]["position"][0]
        change("opposite position")[-1]["position"][0] = OPPOSITE[rel]
        change("position across")[-1]["position"][0] = (
            "above" if rel in ("left of", "right of") else "left of"
        )
    out = {name: _image(scene_for(m, rng)) for name, m in changed.items()}

    clean = scene_for(meta, rng)
    out["one missing"] = _image(Scene(clean.shapes[1:]))
    cx, cy = _free_spot(clean, 14, 14, rng)
    extra = Shape(rng.choice([k for k in SHAPE_KINDS if k not in kinds]), rng.choice(COLORS), cx, cy, 14)
    out["extra object"] = _image(Scene([*clean.shapes, extra]))
    out["extra blob"] = _with_blob(clean, rng)
    return out


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_prompts("geneval", "test")


@pytest.fixture(scope="module")
def clean(rows) -> list[np.ndarray]:
    rng = random.Random(0)
    return [_image(scene_for(m, rng)) for m in rows]


def test_clean_renders_of_every_test_prompt_are_correct(rows, clean) -> None:
    assert len(rows) >= 300
    out = GenEvalMini().score(_to_tensor(clean), [m["prompt"] for m in rows], rows)
    assert set(out) == {"reward", "correct"}
    assert all(v.shape == (len(rows),) and v.dtype == torch.float32 for v in out.values())
    assert set(out["correct"].tolist()) <= {0.0, 1.0}
    assert out["correct"].mean() >= 0.98
    assert out["reward"].mean() >= 0.98


def test_noisy_renders_are_still_correct(rows, clean) -> None:
    some = list(range(0, len(rows), 3))
    images = [_noisy(clean[i], i) for i in some]
    out = GenEvalMini().score(_to_tensor(images), [rows[i]["prompt"] for i in some], [rows[i] for i in some])
    assert out["correct"].mean() >= 0.95


def test_renders_that_violate_the_prompt_are_wrong(rows) -> None:
    rng = random.Random(1)
    by_tag: dict[str, list[dict]] = {}
    for m in rows:
        by_tag.setdefault(m["tag"], []).append(m)
    cases: dict[str, list[tuple[np.ndarray, dict]]] = {}
    for tagged in by_tag.values():
        for m in rng.sample(tagged, min(8, len(tagged))):
            for name, image in _violations(m, rng).items():
                cases.setdefault(name, []).append((image, m))
    assert set(cases) == {
        "wrong kind",
        "one more",
        "one fewer",
        "one missing",
        "wrong colour",
        "colours swapped",
        "opposite position",
        "position across",
        "extra object",
        "extra blob",
    }
    judge = GenEvalMini()
    for name, pairs in cases.items():
        images, metas = zip(*pairs, strict=True)
        out = judge.score(_to_tensor(list(images)), [m["prompt"] for m in metas], list(metas))
        assert out["correct"].sum() == 0, (name, [m["prompt"] for m, c in zip(metas, out["correct"]) if c])


def test_an_unknown_blob_is_an_object_of_no_kind() -> None:
    rng = random.Random(2)
    scene = Scene([Shape("star", "red", 16, 16, 16)])
    found = detect(_with_blob(scene, rng))
    assert sorted(str(d.cls) for d in found) == ["None", "star"]


# --------------------------------------------------------------------------- prompt-blind images


def _half_block() -> np.ndarray:
    image = np.full((64, 64, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    image[:, :32] = OBJECT_COLORS["yellow"]
    return image


def _every_kind() -> Scene:
    cells = [(8 + 16 * (i % 4), 11 + 21 * (i // 4)) for i in range(len(SHAPE_KINDS))]
    return Scene(
        [Shape(k, COLORS[i % len(COLORS)], x, y, 13) for i, (k, (x, y)) in enumerate(zip(SHAPE_KINDS, cells))]
    )


def test_prompt_blind_images_are_never_correct(rows) -> None:
    block, gray, every = _half_block(), np.full((64, 64, 3), 128, np.uint8), _image(_every_kind())
    # what the detector sees: the block is one object of no kind; every kind is there, each as itself
    assert [(d.cls, d.color) for d in detect(block)] == [(None, "yellow")]
    assert detect(gray) == []
    assert _found(every) == _expected(_every_kind())
    out = GenEvalMini().score_matrix(_to_tensor([block, gray, every]), rows)
    assert out["correct"].sum() == 0
    assert out["reward"][:2].max() == 0  # no object of any class: every count term is 0


def test_an_oversize_shape_is_no_kind() -> None:
    image = _image(Scene([Shape("circle", "red", 32, 32, 50)]))
    assert [d.cls for d in detect(image, max_size=64)] == ["circle"]  # it is a clean circle...
    assert [(d.cls, d.color) for d in detect(image)] == [(None, "red")]  # ...but too large to be one
    meta = {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "exclude": [],
        "prompt": "p",
    }
    assert GenEvalMini().score(_to_tensor([image]), ["p"], [meta])["correct"].item() == 0


def test_size_limits_are_in_canvas_units() -> None:
    # at 128 px a 30-canvas-px circle spans 60 image px and is still a circle; a 50 one is too large
    for size, expected in ((30, "circle"), (50, None)):
        image = np.asarray(render(Scene([Shape("circle", "green", 32, 32, size)]), 128))
        assert [(d.cls, d.color) for d in detect(image)] == [(expected, "green")]


def test_score_matrix_matches_score(rows, clean) -> None:
    rng = random.Random(4)
    picks = rng.sample(range(len(rows)), 6)
    images = _to_tensor([clean[i] for i in picks] + [_half_block()])
    metas = [rows[i] for i in picks] + [rows[picks[0]]]
    judge = GenEvalMini()
    matrix = judge.score_matrix(images, metas)
    assert set(matrix) == {"reward", "correct"}
    assert all(v.shape == (7, 7) and v.dtype == torch.float32 for v in matrix.values())
    # the base class's score_matrix: score() of every (image, row) pair, batched
    pairwise = Reward.score_matrix(judge, images, metas, batch_size=4)
    for key in ("reward", "correct"):
        assert torch.allclose(matrix[key], pairwise[key]), key
    diagonal = judge.score(images, [m["prompt"] for m in metas], metas)
    for key in ("reward", "correct"):
        assert torch.allclose(matrix[key].diagonal(), diagonal[key]), key
    assert matrix["correct"].diagonal()[:6].sum() == 6 and matrix["correct"][6].sum() == 0


# --------------------------------------------------------------------------- hand-computed scores


def _score(shapes: list[Shape], meta: dict, reference_quirk: bool = False) -> tuple[float, float]:
    images = render_tensor([Scene(shapes)])
    out = GenEvalMini(reference_quirk=reference_quirk).score(images, [meta["prompt"]], [meta])
    return out["reward"].item(), out["correct"].item()


def _circles(n: int, color: str = "red") -> list[Shape]:
    return [Shape("circle", color, 10 + 15 * (i % 4), 20 + 22 * (i // 4), 12) for i in range(n)]


def _meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    return {"tag": tag, "include": include, "exclude": exclude or [], "prompt": "p"}


def test_count_subscore() -> None:
    three = _meta("counting", [{"class": "circle", "count": 3}], [{"class": "circle", "count": 4}])
    assert _score(_circles(2), three) == pytest.approx((1 - 1 / 3, 0.0))
    assert _score(_circles(3), three) == pytest.approx((1.0, 1.0))
    assert _score(_circles(4), three) == pytest.approx((1 - 1 / 3, 0.0))
    two = _meta("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
    assert _score(_circles(5), two) == pytest.approx((1 - 3 / 2, 0.0))  # the count term goes negative


def test_extra_objects_fail_strict_and_partial() -> None:
    red_circle = _meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    assert _score(_circles(1), red_circle) == pytest.approx((1.0, 1.0))
    assert _score(_circles(2), red_circle) == pytest.approx((0.0, 0.0))  # count 0, colour 0 (count wrong)
    assert _score(_circles(1, "blue"), red_circle) == pytest.approx((0.5, 0.0))  # count 1, colour 0
    # an unrequested object of another class: the partial score ignores it, strict correctness does not
    assert _score([*_circles(1), Shape("star", "blue", 40, 44, 14)], red_circle) == pytest.approx((1.0, 0.0))


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


def test_exact_correct_on_detections() -> None:
    objects = by_class(
        detect(_image(Scene([Shape("circle", "red", 16, 32, 14), Shape("circle", "blue", 46, 32, 14)])))
    )
    assert sorted(d.color for d in objects["circle"]) == ["blue", "red"]
    two = _meta("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
    assert exact_correct(objects, two)
    # one red circle is asked, but a blue one is there too: GenEval would pass it, this judge does not
    assert not exact_correct(objects, _meta("colors", [{"class": "circle", "count": 1, "color": "red"}]))
    pair = _meta(
        "color_attr",
        [{"class": "circle", "count": 1, "color": "blue"}, {"class": "circle", "count": 1, "color": "red"}],
    )
    assert exact_correct(objects, pair)  # two clauses of one class split its objects between them


def test_bad_metadata_and_batch() -> None:
    judge = GenEvalMini()
    images = render_tensor([Scene(_circles(1))])
    with pytest.raises(ValueError, match="no 'include'"):
        judge.score(images, ["x"], [{"tag": "ocr", "prompt": "x", "text": "ABC"}])
    with pytest.raises(ValueError, match="no 'include'"):
        judge.score_matrix(images, [{"tag": "ocr", "prompt": "x", "text": "ABC"}])
    with pytest.raises(ValueError, match="batch mismatch"):
        judge.score(images, ["x", "y"], [{}, {}])
