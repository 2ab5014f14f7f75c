"""The mini world: scenes, renderer and prompt grammar (docs/mini_world.md)."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from opd.data.world import grammar, layout
from opd.data.world.grammar import (
    GENEVAL_TAGS,
    GENEVAL_TEMPLATES,
    SPLITS,
    TASKS,
    load_prompts,
    write_prompt_files,
)
from opd.data.world.layout import random_scene, scene_for
from opd.data.world.render import SUPERSAMPLE, kind_mask, render, render_tensor, sign_box
from opd.data.world.scene import (
    ASPECT,
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

NUMBER = {2: "two", 3: "three", 4: "four"}
#: compositions per family: (template, kind), unordered kind pair, (count, kind), (colour, kind)
SPACE = {
    "single": len(GENEVAL_TEMPLATES) * len(SHAPE_KINDS),
    "pair": math.comb(len(SHAPE_KINDS), 2),
    "count": 3 * len(SHAPE_KINDS),
    "colour": len(OBJECT_COLORS) * len(SHAPE_KINDS),
}
#: tags whose entries have exactly one composition, and its family
FAMILY = {
    "single_object": "single",
    "two_object": "pair",
    "position": "pair",
    "counting": "count",
    "colors": "colour",
}


@pytest.fixture(scope="module")
def prompts() -> dict[tuple[str, str], list[dict]]:
    return {(t, s): load_prompts(t, s) for t, s in itertools.product(TASKS, SPLITS)}


@pytest.fixture(scope="module")
def pools() -> dict[tuple[str, str], list[dict]]:
    """Every GenEval entry of each tag and split (not only the rows written to the files)."""
    return {(tag, s): grammar.geneval_split(tag, s) for tag, s in itertools.product(GENEVAL_TAGS, SPLITS)}


@pytest.fixture(scope="module")
def draws() -> list[tuple[Scene, str, dict]]:
    rng = random.Random(1)
    return [random_scene(rng) for _ in range(3000)]


def _prompt_set(rows: list[dict]) -> set[str]:
    return {m["prompt"] for m in rows}


# --------------------------------------------------------------------------- scene and palette


def test_world_vocabulary() -> None:
    assert len(SHAPE_KINDS) == len(set(SHAPE_KINDS)) == 10 and "semicircle" in SHAPE_KINDS
    assert ASPECT == {k: (0.5 if k == "semicircle" else 1.0) for k in SHAPE_KINDS}
    assert len(OBJECT_COLORS) == 8 and len(BACKGROUNDS) == 4
    assert grammar.PLURALS["cross"] == "crosses" and grammar.PLURALS["star"] == "stars"
    # a colour judge segments renders by colour: every pair of palette colours is far apart
    for a, b in itertools.combinations(OBJECT_COLORS.values(), 2):
        assert math.dist(a, b) >= 110, (a, b)
    for a, b in itertools.product(OBJECT_COLORS.values(), BACKGROUNDS.values()):
        assert math.dist(a, b) >= 110, (a, b)


def _classify_blocks(kind: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Which output pixels of a size-20 shape centred at (32, 32) lie wholly inside / outside its
    outline, from ``kind_mask`` drawn at the supersampled resolution (box corners fall on pixels)."""
    shape = Shape(kind, "red", 32, 32, 20)
    x0, y0, x1, y1 = shape.bbox
    assert (x1 - x0, y1 - y0) == (20, 20 * ASPECT[kind])
    mask = np.asarray(kind_mask(kind, round((x1 - x0) * SUPERSAMPLE), round((y1 - y0) * SUPERSAMPLE)))
    blocks = mask.reshape(
        mask.shape[0] // SUPERSAMPLE, SUPERSAMPLE, mask.shape[1] // SUPERSAMPLE, SUPERSAMPLE
    )
    return (blocks == 255).all((1, 3)), (blocks == 0).all((1, 3)), (round(x0), round(y0))


@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_every_kind_renders_exact_palette_colours(kind: str) -> None:
    inside, outside, (left, top) = _classify_blocks(kind)
    assert inside.sum() >= 40, kind  # a solid interior, even for the ring, crescent and semicircle
    edge = ~inside & ~outside
    assert edge.any() or kind == "square"  # only the square's edges fall on pixel borders
    for color, background in zip(OBJECT_COLORS, itertools.cycle(BACKGROUNDS), strict=False):
        image = np.asarray(render(Scene([Shape(kind, color, 32, 32, 20)], background=background)))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        fg, bg = np.array(OBJECT_COLORS[color]), np.array(BACKGROUNDS[background])
        patch = image[top : top + inside.shape[0], left : left + inside.shape[1]]
        assert (patch[inside] == fg).all(), (kind, color)  # wholly inside: the exact palette colour
        assert (patch[outside] == bg).all(), (kind, color)
        # anti-aliased edge: partly covered pixels are blends, neither colour exactly
        blends = patch[edge]
        assert not (blends == fg).all(-1).any() and not (blends == bg).all(-1).any(), (kind, color)
        # nothing outside the box is touched
        rest = np.ones((64, 64), bool)
        rest[top : top + inside.shape[0], left : left + inside.shape[1]] = False
        assert (image[rest] == bg).all()


@pytest.mark.parametrize("kind", ["ring", "crescent"])
def test_hole_kinds_show_background_at_their_centre(kind: str) -> None:
    image = np.asarray(render(Scene([Shape(kind, "yellow", 32, 32, 20)], background="navy")))
    assert tuple(image[32, 32]) == BACKGROUNDS["navy"]
    assert (image == OBJECT_COLORS["yellow"]).all(-1).sum() >= 40


def test_shape_extent_matches_its_box() -> None:
    image = np.asarray(render(Scene([Shape("square", "red", 20, 30, 16)])))
    ys, xs = np.nonzero((image == OBJECT_COLORS["red"]).all(-1))
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (12, 28, 22, 38)
    for kind in SHAPE_KINDS:
        image = np.asarray(render(Scene([Shape(kind, "blue", 32, 32, 20)])))
        ys, xs = np.nonzero((image != BACKGROUNDS["gray"]).any(-1))
        width, height = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        if kind == "semicircle":  # a half disc, flat side down: half as tall as wide
            assert (xs.min(), ys.min(), width, height) == (22, 27, 20, 10)
            assert Shape(kind, "blue", 32, 32, 20).bbox == (22, 27, 42, 37)
        elif kind == "crescent":  # opens to the right: the bite leaves the right edge empty
            assert (xs.min(), ys.min(), height) == (22, 22, 20) and width < 20
        else:
            assert (xs.min(), ys.min(), width, height) == (22, 22, 20, 20), kind


def test_semicircle_is_the_upper_half_disc() -> None:
    image = np.asarray(render(Scene([Shape("semicircle", "green", 32, 32, 24)], background="black")))
    ink = (image == OBJECT_COLORS["green"]).all(-1)
    ys, xs = np.nonzero(ink)
    assert ys.max() + 1 - ys.min() <= 12 and xs.max() + 1 - xs.min() >= 22
    # flat side down: the bottom row is widest, the top row narrowest
    assert ink[ys.max()].sum() > 2 * ink[ys.min()].sum()


def test_kind_mask_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="hexagon"):
        kind_mask("hexagon", 10, 10)


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
    written = write_prompt_files(tmp_path / "a")
    assert sorted(p.name for p in written) == sorted(f"{t}_{s}.jsonl" for t in TASKS for s in SPLITS)
    for file in written:
        committed = grammar.DEFAULT_DATA_DIR / file.name
        assert committed.read_bytes() == file.read_bytes(), f"{committed} is stale: run write_prompt_files()"
    # a second generation in this process gives the same rows; another seed other rows
    again = "".join(json.dumps(row) + "\n" for row in grammar.geneval_rows("test"))
    assert again.encode() == (tmp_path / "a" / "geneval_test.jsonl").read_bytes()
    assert grammar.geneval_rows("test", seed=1) != grammar.geneval_rows("test")


def test_file_sizes(prompts) -> None:
    sizes = {key: len(rows) for key, rows in prompts.items()}
    assert sizes[("geneval", "train")] == grammar.GENEVAL_TRAIN_ROWS_PER_TAG * len(GENEVAL_TAGS) >= 2000
    assert 300 <= sizes[("geneval", "test")] <= 500 and 100 <= sizes[("geneval", "val")] <= 300
    assert sizes[("ocr", "train")] >= 1000 and 150 <= sizes[("ocr", "test")] <= 250
    assert sizes[("ocr", "val")] >= 80
    assert [sizes[("aesthetic", s)] for s in SPLITS] == [1000, 100, 200]


def test_held_out_sets_are_large_enough(prompts) -> None:
    seen = {task: _prompt_set(prompts[task, "train"]) | _prompt_set(prompts[task, "val"]) for task in TASKS}
    geneval_test = prompts["geneval", "test"]
    assert len(_prompt_set(geneval_test) - seen["geneval"]) >= 300
    for tag in GENEVAL_TAGS:
        assert len(_prompt_set([m for m in geneval_test if m["tag"] == tag]) - seen["geneval"]) >= 10, tag
    ocr_seen = {m["text"] for s in ("train", "val") for m in prompts["ocr", s]}
    assert len({m["text"] for m in prompts["ocr", "test"]} - ocr_seen) >= 150
    assert len(_prompt_set(prompts["aesthetic", "test"]) - seen["aesthetic"]) >= 200


def test_splits_are_disjoint(prompts) -> None:
    every = {s: set() for s in SPLITS}
    for task in TASKS:
        train, val, test = (_prompt_set(prompts[task, s]) for s in SPLITS)
        assert test and val and train, task
        assert not test & (train | val), task
        assert not val & train, task
        for s in ("val", "test"):  # evaluation sets list each prompt once
            assert len(prompts[task, s]) == len(_prompt_set(prompts[task, s])), (task, s)
        for s, found in zip(SPLITS, (train, val, test), strict=True):
            every[s] |= found
    assert not every["test"] & (every["train"] | every["val"]) and not every["val"] & every["train"]
    ocr = {s: {m["text"] for m in prompts["ocr", s]} for s in SPLITS}
    assert not ocr["test"] & (ocr["train"] | ocr["val"]) and not ocr["val"] & ocr["train"]
    assert grammar.ocr_test_strings() == ocr["test"]
    assert grammar.ocr_held_out_strings() == ocr["val"] | ocr["test"]
    assert set(grammar.ocr_splits()) == ocr["train"] | ocr["val"] | ocr["test"]
    assert grammar.held_out_prompts() == every["val"] | every["test"]
    for s in SPLITS:
        assert all(grammar.aesthetic_split(m["prompt"]) == s for m in prompts["aesthetic", s])


# --------------------------------------------------------------------------- geneval compositions


def _template(prompt: str) -> str:
    (template,) = [t for t in GENEVAL_TEMPLATES if prompt.startswith(t + " ")]
    return template


def _compositions(m: dict) -> set:
    """The compositions of a GenEval row, read from its clauses (and the prompt's template)."""
    inc, tag = m["include"], m["tag"]
    if tag == "single_object":
        return {(_template(m["prompt"]), inc[0]["class"])}
    if tag in ("two_object", "position"):
        return {frozenset(c["class"] for c in inc)}
    if tag == "counting":
        return {(inc[0]["count"], inc[0]["class"])}
    return {(c["color"], c["class"]) for c in inc}  # colors, color_attr


def _compositions_of(rows: list[dict], tags: tuple[str, ...]) -> set:
    return set().union(*(_compositions(m) for m in rows if m["tag"] in tags))


@pytest.mark.parametrize(
    "tags", [("single_object",), ("two_object", "position"), ("counting",), ("colors", "color_attr")]
)
def test_test_and_val_rows_hold_out_compositions(prompts, pools, tags) -> None:
    # train rows as written, and every train prompt the grammar could ever write
    train_rows = prompts["geneval", "train"] + [m for tag in tags for m in pools[tag, "train"]]
    train = _compositions_of(train_rows, tags)
    assert train
    for split in ("val", "test"):
        rows = [m for m in prompts["geneval", split] if m["tag"] in tags]
        assert rows, (tags, split)
        for m in rows:
            # a colour-attribution prompt is held out when either of its (colour, kind) pairs is
            assert _compositions(m) - train, (split, m["prompt"])
            if m["tag"] != "color_attr":
                assert not _compositions(m) & train, (split, m["prompt"])


def test_composition_spaces_split_in_fixed_shares(pools) -> None:
    family_split: dict[str, dict] = {f: {} for f in SPACE}
    for (tag, split), entries in pools.items():
        if tag not in FAMILY:
            continue
        for m in entries:
            (comp,) = _compositions(m)
            assert family_split[FAMILY[tag]].setdefault(comp, split) == split, (tag, comp)  # one split each
    for family, n in SPACE.items():
        shares = Counter(family_split[family].values())
        assert len(family_split[family]) == n, family
        assert shares["test"] == math.ceil(grammar.TEST_FRACTION * n), family
        assert shares["val"] == math.ceil(grammar.VAL_FRACTION * n), family
    # colour attribution: test when either pair is test, else val when either is val, else train
    colour = family_split["colour"]
    order = {"train": 0, "val": 1, "test": 2}
    for split in SPLITS:
        for m in pools["color_attr", split]:
            assert max((colour[c] for c in _compositions(m)), key=order.__getitem__) == split, m["prompt"]
    # every prompt of the world is in exactly one split
    for tag in GENEVAL_TAGS:
        everything = [m["prompt"] for s in SPLITS for m in pools[tag, s]]
        assert sorted(everything) == sorted(m["prompt"] for m in grammar.geneval_pool(tag)), tag
        assert len(everything) == len(set(everything)), tag


def test_geneval_row_counts(prompts, pools) -> None:
    tags = Counter(m["tag"] for m in prompts["geneval", "train"])
    assert tags == {tag: grammar.GENEVAL_TRAIN_ROWS_PER_TAG for tag in GENEVAL_TAGS}  # balanced
    for tag in GENEVAL_TAGS:  # train rows cycle through every train prompt of the tag
        train = _prompt_set(pools[tag, "train"])
        rows = Counter(m["prompt"] for m in prompts["geneval", "train"] if m["tag"] == tag)
        assert set(rows) <= train
        if len(train) <= grammar.GENEVAL_TRAIN_ROWS_PER_TAG:
            assert set(rows) == train and max(rows.values()) - min(rows.values()) <= 1, tag
    for split in ("val", "test"):
        cap = grammar.GENEVAL_EVAL_PER_TAG[split]
        tags = Counter(m["tag"] for m in prompts["geneval", split])
        assert tags == {tag: min(cap, len(pools[tag, split])) for tag in GENEVAL_TAGS}, split
        assert _prompt_set(prompts["geneval", split]) <= set().union(
            *(_prompt_set(pools[tag, split]) for tag in GENEVAL_TAGS)
        )


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _expected_prompt(m: dict) -> str:
    inc, tag, t = m["include"], m["tag"], _template(m["prompt"])
    if tag == "single_object":
        return f"{t} {_a(inc[0]['class'])}"
    if tag == "two_object":
        return f"{t} {_a(inc[0]['class'])} and {_a(inc[1]['class'])}"
    if tag == "counting":
        kind = inc[0]["class"]
        return f"{t} {NUMBER[inc[0]['count']]} {kind}{'es' if kind == 'cross' else 's'}"
    if tag == "colors":
        return f"{t} {_a(inc[0]['color'])} {inc[0]['class']}"
    if tag == "position":  # clause 1 lies `rel` of clause 0 and is named first
        return f"{t} {_a(inc[1]['class'])} {inc[1]['position'][0]} {_a(inc[0]['class'])}"
    return f"{t} {_a(inc[0]['color'])} {inc[0]['class']} and {_a(inc[1]['color'])} {inc[1]['class']}"


def test_geneval_schema(prompts) -> None:
    for split in SPLITS:
        templates = Counter()
        for m in prompts["geneval", split]:
            assert list(m) == ["tag", "include", "exclude", "prompt"]
            assert m["tag"] in GENEVAL_TAGS
            for clause in m["include"]:
                assert clause["class"] in SHAPE_KINDS and clause["count"] >= 1
                assert set(clause) <= {"class", "count", "color", "position"}
                assert clause.get("color", "red") in OBJECT_COLORS
            _check_tag(m)
            assert m["prompt"] == _expected_prompt(m)
            templates[_template(m["prompt"])] += 1
        assert set(templates) == set(GENEVAL_TEMPLATES), split
    assert "an image of an orange star" in {m["prompt"] for m in grammar.geneval_pool("colors")}


def _check_tag(m: dict) -> None:
    include, tag = m["include"], m["tag"]
    num = {"single_object": 1, "counting": 1, "colors": 1}.get(tag, 2)
    assert len(include) == num, m
    if tag == "counting":
        (clause,) = include
        assert 2 <= clause["count"] <= 4 and m["exclude"] == [
            {"class": clause["class"], "count": clause["count"] + 1}
        ]
    else:
        assert m["exclude"] == [] and all(c["count"] == 1 for c in include)
    has_color = [("color" in c) for c in include]
    assert has_color == [tag in ("colors", "color_attr")] * num, m
    if tag == "position":
        rel, target = include[1]["position"]
        assert rel in RELATIONS and target == 0 and "position" not in include[0]
    else:
        assert all("position" not in c for c in include)
    if tag in ("two_object", "position", "color_attr"):
        assert include[0]["class"] != include[1]["class"]
    if tag == "color_attr":
        assert include[0]["color"] != include[1]["color"]


def test_ocr_and_aesthetic_schema(prompts) -> None:
    for split in SPLITS:
        for m in prompts["ocr", split]:
            assert set(m) == {"tag", "prompt", "text"} and m["tag"] == "ocr"
            assert (
                re.fullmatch(r"[A-Z0-9]{3}", m["text"]) and m["prompt"] == f'a sign that says "{m["text"]}"'
            )
        for m in prompts["aesthetic", split]:
            assert m["tag"] == "aesthetic" and m["background"] in BACKGROUNDS
            assert m["prompt"].endswith(f" on a {m['background']} background")
            assert 1 <= sum(o["count"] for o in m["objects"]) <= 4
            for o in m["objects"]:
                assert o.get("class", "circle") in SHAPE_KINDS and o.get("color", "red") in OBJECT_COLORS
                assert all(word in m["prompt"] for word in (o.get("class", ""), o.get("color", "")))


def test_load_prompts_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"geneval_test\.jsonl"):
        load_prompts("geneval", "test", tmp_path)
    (tmp_path / "ocr_train.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"ocr_train\.jsonl is empty"):
        load_prompts("ocr", "train", tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"tag": "ocr"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 is not valid JSON"):
        load_prompts("ocr", "train", tmp_path / "bad.jsonl")
    (tmp_path / "own.jsonl").write_text(json.dumps({"tag": "ocr", "prompt": 'a sign that says "A1B"'}) + "\n")
    assert load_prompts("ocr", "test", tmp_path / "own.jsonl")[0]["prompt"].endswith('"A1B"')
    assert load_prompts("geneval", "val")  # val is a split now
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("geneval", "dev")
    with pytest.raises(ValueError, match="unknown split"):
        grammar.geneval_split("colors", "dev")


# --------------------------------------------------------------------------- scenes for prompts


def _check_layout(scene: Scene) -> None:
    for shape in scene.shapes:
        x0, y0, x1, y1 = shape.bbox
        assert x0 >= 0 and y0 >= 0 and x1 <= CANVAS and y1 <= CANVAS
    for a, b in itertools.combinations(scene.shapes, 2):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
        gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)  # separation along the freer axis
        assert gap >= layout.GAP >= 3, (a, b)


def _check_satisfies(scene: Scene, m: dict) -> None:
    """``scene`` shows what ``m`` states and nothing more."""
    _check_layout(scene)
    if m["tag"] == "ocr":
        assert scene.sign is not None and scene.sign.text == m["text"] and not scene.shapes
        x0, y0, x1, y1 = sign_box(scene.sign)
        assert x0 >= 0 and y0 >= 0 and x1 <= CANVAS and y1 <= CANVAS
        return
    assert scene.sign is None
    clauses = m.get("include") or m["objects"]
    assert len(scene.shapes) == sum(c["count"] for c in clauses)
    seen = Counter((s.kind, s.color) for s in scene.shapes)
    for c in clauses:
        matching = sum(
            n for (k, col), n in seen.items() if c.get("class", k) == k and c.get("color", col) == col
        )
        assert matching >= c["count"], (m["prompt"], scene)
    if m["tag"] == "position":
        rel = m["include"][1]["position"][0]
        second, first = scene.shapes[1].bbox, scene.shapes[0].bbox
        assert scene.shapes[1].kind == m["include"][1]["class"]
        assert relations(second, first) == {rel}
        assert rel in relations(second, first, threshold=2 * 0.1)  # twice GenEval's margin
    if m["tag"] == "aesthetic":
        assert scene.background == m["background"]
        if m.get("distinct_colors"):
            assert len({s.color for s in scene.shapes}) == len(scene.shapes)
    else:
        assert scene.background == "gray"


def test_scene_for_satisfies_every_test_row(prompts) -> None:
    rng = random.Random(0)
    for m in prompts["geneval", "test"] + prompts["aesthetic", "test"] + prompts["geneval", "val"]:
        _check_satisfies(scene_for(m, rng), m)
    for m in prompts["ocr", "test"][:20]:
        _check_satisfies(scene_for(m, rng), m)
    for kind in SHAPE_KINDS:  # every kind can be placed in every relation
        for rel in RELATIONS:
            m = {
                "tag": "position",
                "include": [{"class": "star", "count": 1}, {"class": kind, "count": 1, "position": [rel, 0]}],
                "exclude": [],
                "prompt": "x",
            }
            _check_satisfies(scene_for(m, rng), m)


def test_random_scene_mix_and_truthful_captions(draws) -> None:
    tags = Counter(meta["tag"] for _, _, meta in draws)
    assert 0.45 < tags["ocr"] / len(draws) < 0.55 and tags["aesthetic"] > 300
    assert all(tags[t] > 50 for t in GENEVAL_TAGS)
    for scene, prompt, meta in draws:
        assert prompt == meta["prompt"]
        _check_satisfies(scene, meta)
    kinds = Counter(s.kind for scene, _, _ in draws for s in scene.shapes)
    assert set(kinds) == set(SHAPE_KINDS)


def test_random_scene_never_draws_held_out_prompts(prompts, pools, draws) -> None:
    held_out = set().union(*(_prompt_set(prompts[t, s]) for t in TASKS for s in ("val", "test")))
    held_out_text = {m["text"] for s in ("val", "test") for m in prompts["ocr", s]}
    # compositions of every val/test entry of the single-composition tags
    held_comp = {f: set() for f in SPACE}
    for (tag, split), entries in pools.items():
        if tag in FAMILY and split != "train":
            for m in entries:
                held_comp[FAMILY[tag]] |= _compositions(m)
    train_prompts = {m["prompt"] for tag in GENEVAL_TAGS for m in pools[tag, "train"]}
    for scene, prompt, meta in draws:
        assert prompt not in held_out, prompt
        if meta["tag"] == "ocr":
            assert scene.sign.text not in held_out_text, prompt
        elif meta["tag"] in GENEVAL_TAGS:
            assert prompt in train_prompts
            family = FAMILY.get(meta["tag"], "colour")
            assert not _compositions(meta) & held_comp[family], prompt
    # the draws are varied enough for the checks above to mean something
    assert len({p for _, p, m in draws if m["tag"] == "ocr"}) > 800
    assert len({p for _, p, m in draws if m["tag"] in GENEVAL_TAGS}) > 400


def test_scene_for_rejects_unknown_metadata() -> None:
    with pytest.raises(ValueError, match="tag='caption'"):
        scene_for({"tag": "caption", "prompt": "x"}, random.Random(0))
