"""Scenes that satisfy prompt metadata: layouts with unambiguous counts and positions, clean
renders of any task's prompt (``scene_for``), and the pre-training stream's truthful
(scene, caption) pairs (``random_scene``). The prompt grammar itself is in ``grammar``."""
from __future__ import annotations

import itertools
import json
import random
from functools import cache
from typing import Any

from opd.data.world.grammar import (
    GENEVAL_TAGS,
    distinct_colors,
    geneval_split,
    held_out_prompts,
    ocr_meta,
    random_aesthetic_meta,
    random_text,
)
from opd.data.world.render import sign_box
from opd.data.world.scene import (
    BACKGROUNDS,
    CANVAS,
    DEFAULT_BACKGROUND,
    OBJECT_COLORS,
    SHAPE_KINDS,
    Box,
    Scene,
    Shape,
    Sign,
    relations,
)

# --------------------------------------------------------------------------- scenes for prompts

#: side of each object (canvas px) by the number of objects in the scene: smaller when crowded
#: (ten kinds must stay recognisable: a 10 px star or crescent is a blob, so the floor is 12 px)
SIZE_RANGE: dict[int, tuple[float, float]] = {1: (18, 28), 2: (14, 22), 3: (13, 18), 4: (12, 16)}
SCALE_RANGE: dict[str, tuple[float, float]] = {"small": (12, 14), "large": (30, 38)}
EDGE = 2.0  # the least distance between an object's box and the canvas edge
GAP = 3.0  # the least gap between two boxes: objects never touch, so counts stay countable
#: a generated "A left of B" must still hold with twice GenEval's margin (robust to small shifts)
CLEAR_THRESHOLD = 0.2


def _apart(a: Box, b: Box) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _clear(shape: Shape, reference: Shape, rel: str) -> bool:
    """``shape`` is ``rel`` of ``reference`` and in no other relation, with a safety margin, and
    looks it: the offset across the relation's axis is at most half the offset along it."""
    along, across = abs(shape.cx - reference.cx), abs(shape.cy - reference.cy)
    if rel in ("above", "below"):
        along, across = across, along
    return (
        across <= 0.5 * along
        and relations(shape.bbox, reference.bbox) == {rel}
        and rel in relations(shape.bbox, reference.bbox, CLEAR_THRESHOLD)
    )


def _centres(rng: random.Random, sizes: list[float], row: bool) -> list[tuple[float, float]]:
    if row:  # evenly spaced slots along one horizontal line
        slot = CANVAS / len(sizes)
        y = rng.uniform(EDGE + max(sizes) / 2, CANVAS - EDGE - max(sizes) / 2)
        return [(slot * (i + 0.5) + rng.uniform(-1, 1), y) for i in range(len(sizes))]
    return [
        (rng.uniform(EDGE + s / 2, CANVAS - EDGE - s / 2), rng.uniform(EDGE + s / 2, CANVAS - EDGE - s / 2))
        for s in sizes
    ]


def layout(
    rng: random.Random,
    specs: list[tuple[str, str]],
    size_range: tuple[float, float] | None = None,
    relation: str | None = None,
    row: bool = False,
) -> list[Shape]:
    """Place shapes ``[(kind, color), ...]`` inside the canvas without overlap (rejection sampling).

    ``relation``: the second shape must lie clearly ``relation`` of the first (GenEval's position).
    """
    lo, hi = size_range or SIZE_RANGE[min(len(specs), 4)]
    if row:
        hi = min(hi, CANVAS / len(specs) - GAP - 2)
    for _ in range(2000):
        sizes = [rng.uniform(lo, hi) for _ in specs]
        shapes = [
            Shape(k, c, x, y, s)
            for (k, c), (x, y), s in zip(specs, _centres(rng, sizes, row), sizes, strict=True)
        ]
        if not all(_apart(a.bbox, b.bbox) for a, b in itertools.combinations(shapes, 2)):
            continue
        if relation is None or _clear(shapes[1], shapes[0], relation):
            return shapes
    raise RuntimeError(f"could not place {specs} (relation={relation!r}) in a {CANVAS}px canvas")


def _geneval_scene(meta: dict[str, Any], rng: random.Random) -> Scene:
    include = meta["include"]
    specs = [
        (c["class"], c.get("color") or rng.choice(list(OBJECT_COLORS)))
        for c in include
        for _ in range(c["count"])
    ]
    positioned = [c for c in include if "position" in c]
    relation = None
    if positioned:
        if (
            len(include) != 2
            or include[1] is not positioned[0]
            or positioned[0]["position"][1] != 0
            or len(specs) != 2
        ):
            raise ValueError(
                f"scene_for supports position only as GenEval encodes it (one object "
                f"each, clause 1 relative to clause 0); got include={include}"
            )
        relation = positioned[0]["position"][0]
    return Scene(layout(rng, specs, relation=relation), background=DEFAULT_BACKGROUND)


def _aesthetic_scene(meta: dict[str, Any], rng: random.Random) -> Scene:
    clauses = meta["objects"]
    num = sum(c["count"] for c in clauses)
    spare = distinct_colors(rng, len(OBJECT_COLORS)) if meta.get("distinct_colors") else None
    specs = []
    for clause in clauses:
        for _ in range(clause["count"]):
            kind = clause.get("class") or rng.choice(SHAPE_KINDS)
            color = clause.get("color") or (spare.pop() if spare else rng.choice(list(OBJECT_COLORS)))
            specs.append((kind, color))
    size_range = SCALE_RANGE[meta["scale"]] if "scale" in meta else SIZE_RANGE[min(num, 4)]
    shapes = layout(rng, specs, size_range, row=meta.get("layout") == "row")
    return Scene(shapes, background=meta["background"])


def _sign_scene(text: str, rng: random.Random) -> Scene:
    """Black text on a white plate (any background), or light text straight on a dark background."""
    height = rng.randint(20, 24)
    if rng.random() < 0.75:
        background, color, plate = rng.choice(list(BACKGROUNDS)), "black", "white"
    else:
        background, color, plate = rng.choice(["black", "navy"]), rng.choice(["white", "yellow"]), None
    probe = sign_box(Sign(text, color, CANVAS / 2, CANVAS / 2, height, plate))
    half_w, half_h = (probe[2] - probe[0]) / 2, (probe[3] - probe[1]) / 2
    cx = rng.uniform(max(half_w + 1, 28), min(CANVAS - half_w - 1, 36))
    cy = rng.uniform(half_h + 2, CANVAS - half_h - 2)
    return Scene([], Sign(text, color, cx, cy, height, plate), background=background)


def scene_for(meta: dict[str, Any], rng: random.Random) -> Scene:
    """A clean scene that satisfies ``meta`` (a row of any task) and shows nothing else."""
    tag = meta.get("tag")
    if tag == "ocr":
        return _sign_scene(meta["text"], rng)
    if tag == "aesthetic":
        return _aesthetic_scene(meta, rng)
    if "include" in meta:
        return _geneval_scene(meta, rng)
    raise ValueError(
        f"scene_for: metadata has tag={tag!r} and no 'include'; expected an ocr, aesthetic "
        f"or GenEval row, got keys {sorted(meta)}"
    )


@cache
def _train_pool_json(tag: str, seed: int) -> tuple[str, ...]:
    return tuple(json.dumps(m) for m in geneval_split(tag, "train", seed))


def random_scene(rng: random.Random, seed: int = 0, sign_fraction: float = 0.5) -> tuple[Scene, str, dict[str, Any]]:
    """A pre-training example ``(scene, caption, metadata)`` with a truthful caption.

    A ``sign_fraction`` share are signs (never showing an OCR val or test string), the rest 1-4
    shapes with a GenEval-style (60%, train compositions only) or aesthetic-style (40%) caption;
    a caption that is a val or test prompt of any task is drawn again. The mixture sets how fast
    each skill is learned relative to the others.
    """
    held_out = held_out_prompts(seed)
    while True:
        if rng.random() < sign_fraction:
            meta = ocr_meta(random_text(rng, seed))
        elif rng.random() < 0.6:
            meta = json.loads(rng.choice(_train_pool_json(rng.choice(GENEVAL_TAGS), seed)))
        else:
            meta = random_aesthetic_meta(rng)
        if meta["prompt"] not in held_out:
            return scene_for(meta, rng), meta["prompt"], meta
