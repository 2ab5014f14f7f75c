"""The mini world: scenes, renderer and prompt grammar (DESIGN.md section 5)."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from opd.data.world import grammar, layout
from opd.data.world.grammar import (
    GENEVAL_TAGS,
    SHARED_TAGS,
    load_prompts,
    write_prompt_files,
)
from opd.data.world.layout import random_scene, scene_for
from opd.data.world.render import render, render_tensor, sign_box
from opd.data.world.scene import (
    BACKGROUNDS,
    CANVAS,
    OBJECT_COLORS,
    RELATIONS,
    SHAPE_KINDS,
    TEXT_COLORS,
    Scene,
    Shape,
    Sign,
    relations,
)


@pytest.fixture(scope="module")
def prompts() -> dict[tuple[str, str], list[dict]]:
    return {(t, s): load_prompts(t, s) for t, s in itertools.product(grammar.TASKS, grammar.SPLITS)}


# --------------------------------------------------------------------------- scene and render


@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_render_exact_palette_colours_at_centres(kind: str) -> None:
    for color, background in zip(OBJECT_COLORS, itertools.cycle(BACKGROUNDS)):
        image = np.asarray(render(Scene([Shape(kind, color, 32, 32, 20)], background=background)))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        # the box centre is inside every kind (a triangle is half as wide as its base there)
        assert tuple(image[32, 32]) == OBJECT_COLORS[color]
        assert tuple(image[1, 1]) == BACKGROUNDS[background]


def test_shape_extent_matches_its_box() -> None:
    image = np.asarray(render(Scene([Shape("square", "red", 20, 30, 16)])))
    ys, xs = np.nonzero((image == OBJECT_COLORS["red"]).all(-1))
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (12, 28, 22, 38)


def test_render_is_deterministic_and_tensor_matches() -> None:
    scenes = [random_scene(random.Random(seed))[0] for seed in range(6)]
    again = [random_scene(random.Random(seed))[0] for seed in range(6)]
    assert scenes == again
    batch = render_tensor(scenes)
    assert batch.shape == (6, 3, 64, 64) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1
    for i, scene in enumerate(scenes):
        expected = torch.from_numpy(np.asarray(render(scene))).permute(2, 0, 1).float() / 255
        assert torch.equal(batch[i], expected)
        assert render(scene).tobytes() == render(again[i]).tobytes()


def test_render_scales_to_other_sizes() -> None:
    scene = Scene([Shape("circle", "blue", 16, 16, 12)])
    image = np.asarray(render(scene, size=128))
    assert image.shape == (128, 128, 3)
    assert tuple(image[32, 32]) == OBJECT_COLORS["blue"] and tuple(image[96, 96]) == BACKGROUNDS["gray"]


@pytest.mark.parametrize("height", [20, 24])
def test_sign_text_height_and_contrast(height: int) -> None:
    image = np.asarray(render(Scene([], Sign("HEN", "black", 32, 32, height), background="navy")))
    ink = (image.max(-1) < 60) & (np.abs(np.arange(64) - 32) < 28)[None, :]  # dark pixels on the plate
    rows = np.nonzero(ink.sum(1) >= 2)[0]
    assert abs(len(rows) - height) <= 1  # cap height in pixels
    assert (image == (250, 250, 250)).all(-1).sum() > 200  # a white plate around it
    wide = np.asarray(render(Scene([], Sign("WWM", "white", 32, 32, 24, plate=None), background="black")))
    cols = np.nonzero((wide == TEXT_COLORS["white"]).all(-1).any(0))[0]
    assert cols.min() >= 1 and cols.max() <= 62  # wide text is condensed to fit the canvas


def test_invalid_names_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"Shape\.kind"):
        Shape("hexagon", "red", 32, 32, 10)
    with pytest.raises(ValueError, match=r"Shape\.color"):
        Shape("circle", "teal", 32, 32, 10)
    with pytest.raises(ValueError, match=r"Scene\.background"):
        Scene([], background="gray" + "ish")


def test_relations_follow_geneval() -> None:
    a = (10, 28, 18, 36)  # 8 px box
    assert relations(a, (40, 28, 48, 36)) == {"left of"}
    assert relations((40, 28, 48, 36), a) == {"right of"}
    assert relations((28, 5, 36, 13), (28, 40, 36, 48)) == {"above"}
    assert relations((10, 10, 18, 18), (40, 40, 48, 48)) == {"left of", "above"}  # diagonal: both
    # 3 px apart: the shrunk offset (3 - 0.1 * 16 = 1.4) over |offset| = 3 is below 0.5
    assert relations((10, 28, 18, 36), (13, 28, 21, 36)) == set()


# --------------------------------------------------------------------------- prompt files


def test_prompt_files_are_deterministic_and_committed(tmp_path) -> None:
    first = write_prompt_files(tmp_path / "a")
    second = write_prompt_files(tmp_path / "b")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
        committed = grammar.DEFAULT_DATA_DIR / a.name
        assert committed.read_bytes() == a.read_bytes(), f"{committed} is stale: run write_prompt_files()"
    other = write_prompt_files(tmp_path / "c", seed=1)
    assert other[0].read_bytes() != first[0].read_bytes()


def test_file_sizes(prompts) -> None:
    sizes = {key: len(rows) for key, rows in prompts.items()}
    assert sizes[("geneval", "train")] >= 2000 and 200 <= sizes[("geneval", "test")] <= 400
    assert sizes[("ocr", "train")] >= 1000 and 100 <= sizes[("ocr", "test")] <= 200
    assert sizes[("aesthetic", "train")] == 1000 and sizes[("aesthetic", "test")] == 200


def test_splits_are_disjoint(prompts) -> None:
    for tag in GENEVAL_TAGS:
        train = {m["prompt"] for m in prompts["geneval", "train"] if m["tag"] == tag}
        test = {m["prompt"] for m in prompts["geneval", "test"] if m["tag"] == tag}
        assert test, tag
        if tag in SHARED_TAGS:
            assert train == test  # 3-12 possible prompts: both splits cover all of them
        else:
            assert not train & test, tag
    ocr_train = {m["text"] for m in prompts["ocr", "train"]}
    ocr_test = {m["text"] for m in prompts["ocr", "test"]}
    assert not ocr_train & ocr_test and ocr_test == set(grammar.ocr_test_strings())
    aesthetic = [{m["prompt"] for m in prompts["aesthetic", s]} for s in grammar.SPLITS]
    assert not aesthetic[0] & aesthetic[1]


def test_geneval_schema(prompts) -> None:
    for split in grammar.SPLITS:
        rows = prompts["geneval", split]
        tags = Counter(m["tag"] for m in rows)
        assert set(tags) == set(GENEVAL_TAGS) and len(set(tags.values())) == 1  # balanced
        for m in rows:
            assert list(m) == ["tag", "include", "exclude", "prompt"]
            assert m["prompt"].startswith("a photo of ")
            for clause in m["include"]:
                assert clause["class"] in SHAPE_KINDS and clause["count"] >= 1
                assert set(clause) <= {"class", "count", "color", "position"}
            _check_tag(m)


def _check_tag(m: dict) -> None:
    include, tag = m["include"], m["tag"]
    num = {"single_object": 1, "counting": 1, "colors": 1}.get(tag, 2)
    assert len(include) == num, m
    if tag == "counting":
        (clause,) = include
        assert 1 <= clause["count"] <= 4 and m["exclude"] == [
            {"class": clause["class"], "count": clause["count"] + 1}
        ]
    else:
        assert m["exclude"] == [] and all(c["count"] == 1 for c in include)
    has_color = [("color" in c) for c in include]
    assert has_color == [tag in ("colors", "color_attr")] * num, m
    if tag == "position":
        rel, target = include[1]["position"]
        assert rel in RELATIONS and target == 0 and "position" not in include[0]
        assert m["prompt"] == f"a photo of a {include[1]['class']} {rel} a {include[0]['class']}"
    if tag in ("two_object", "position", "color_attr"):
        assert include[0]["class"] != include[1]["class"]
    if tag == "color_attr":
        assert include[0]["color"] != include[1]["color"]
        assert m["prompt"] == "a photo of a {0[color]} {0[class]} and a {1[color]} {1[class]}".format(
            *include
        )


def test_ocr_and_aesthetic_schema(prompts) -> None:
    for split in grammar.SPLITS:
        for m in prompts["ocr", split]:
            assert set(m) == {"tag", "prompt", "text"} and m["tag"] == "ocr"
            assert (
                re.fullmatch(r"[A-Z0-9]{3}", m["text"]) and m["prompt"] == f'a sign that says "{m["text"]}"'
            )
        for m in prompts["aesthetic", split]:
            assert m["tag"] == "aesthetic" and m["background"] in BACKGROUNDS
            assert m["background"] in m["prompt"] and 1 <= sum(o["count"] for o in m["objects"]) <= 4


def test_load_prompts_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"geneval_test\.jsonl"):
        load_prompts("geneval", "test", tmp_path)
    (tmp_path / "ocr_train.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"ocr_train\.jsonl is empty"):
        load_prompts("ocr", "train", tmp_path)
    (tmp_path / "own.jsonl").write_text(json.dumps({"tag": "ocr", "prompt": 'a sign that says "A1B"'}) + "\n")
    assert load_prompts("ocr", "test", tmp_path / "own.jsonl")[0]["prompt"].endswith('"A1B"')
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("geneval", "val")


# --------------------------------------------------------------------------- scenes for prompts


def _check_layout(scene: Scene) -> None:
    for shape in scene.shapes:
        x0, y0, x1, y1 = shape.bbox
        assert x0 >= 0 and y0 >= 0 and x1 <= CANVAS and y1 <= CANVAS
    for a, b in itertools.combinations(scene.shapes, 2):
        assert layout._apart(a.bbox, b.bbox), (a, b)


def test_scene_for_satisfies_every_test_row(prompts) -> None:
    rng = random.Random(0)
    for m in prompts["geneval", "test"] + prompts["aesthetic", "test"]:
        scene = scene_for(m, rng)
        _check_layout(scene)
        clauses = m.get("include") or m["objects"]
        assert len(scene.shapes) == sum(c["count"] for c in clauses)
        seen = Counter((s.kind, s.color) for s in scene.shapes)
        for c in clauses:
            assert (
                sum(
                    n for (k, col), n in seen.items() if c.get("class", k) == k and c.get("color", col) == col
                )
                >= c["count"]
            )
        if m["tag"] == "position":
            assert relations(scene.shapes[1].bbox, scene.shapes[0].bbox) == {m["include"][1]["position"][0]}
        if m["tag"] == "aesthetic":
            assert scene.background == m["background"]
            if m.get("distinct_colors"):
                assert len({s.color for s in scene.shapes}) == len(scene.shapes)
    for m in prompts["ocr", "test"][:20]:
        assert scene_for(m, rng).sign.text == m["text"]


def test_random_scene_mix_and_truthful_captions() -> None:
    rng = random.Random(1)
    held_out = grammar.ocr_test_strings()
    samples = [random_scene(rng) for _ in range(1500)]
    tags = Counter(meta["tag"] for _, _, meta in samples)
    assert 0.45 < tags["ocr"] / len(samples) < 0.55 and tags["aesthetic"] > 100
    assert all(tags[t] > 10 for t in GENEVAL_TAGS)
    for scene, prompt, meta in samples:
        assert prompt == meta["prompt"]
        _check_layout(scene)
        if meta["tag"] == "ocr":
            assert scene.sign.text == meta["text"] and meta["text"] not in held_out and not scene.shapes
            x0, y0, x1, y1 = sign_box(scene.sign)
            assert x0 >= 0 and y0 >= 0 and x1 <= CANVAS and y1 <= CANVAS
        else:
            clauses = meta.get("include") or meta["objects"]
            assert len(scene.shapes) == sum(c["count"] for c in clauses) and scene.sign is None


def test_scene_for_rejects_unknown_metadata() -> None:
    with pytest.raises(ValueError, match="tag='caption'"):
        scene_for({"tag": "caption", "prompt": "x"}, random.Random(0))
