"""The objects of the mini world: flat shapes, text signs and the scenes that hold them.

Coordinates are pixels of a ``CANVAS`` (64 px) square canvas, origin top-left, y pointing down;
renders at other sizes scale them. Every colour is an exact RGB triple so that a rule judge can
segment renders by colour (``rewards/geneval_mini.py``) and tests can check exact pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: side of the canvas that scene coordinates refer to (pixels)
CANVAS = 64

#: shape kinds; they play the role of GenEval's object classes. Each is drawn upright in its box
#: (``opd.data.world.render.draw_kind``) and the judges fit the same outlines as templates, so the
#: set is chosen for outlines that stay apart at 10-30 px (no hexagon next to the circle).
SHAPE_KINDS: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart", "crescent", "semicircle",
)
PLURALS: dict[str, str] = {kind: kind + ("es" if kind.endswith("ss") else "s") for kind in SHAPE_KINDS}
#: height / width of each kind's box (the semicircle is a half disc, flat side down)
ASPECT: dict[str, float] = {kind: 0.5 if kind == "semicircle" else 1.0 for kind in SHAPE_KINDS}

#: object colours, chosen pairwise far apart in RGB (closest pair: red/orange, 110 apart)
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 45),
    "orange": (245, 130, 10),
    "yellow": (245, 235, 60),
    "green": (40, 180, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 230),
    "purple": (160, 50, 200),
    "white": (245, 245, 245),
}

#: background colours; each is >= 110 away from every object colour so segmentation is unambiguous
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "navy": (25, 35, 85),
    "brown": (100, 62, 40),
}

#: the background of GenEval-style scenes (their prompts never name one)
DEFAULT_BACKGROUND = "gray"

#: text and plate colours of signs (high contrast pairs only: OCR must be able to read them)
TEXT_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "yellow": (240, 210, 40),
}
PLATE_COLORS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250)}

#: every named colour of the world
RGB: dict[str, tuple[int, int, int]] = {**OBJECT_COLORS, **BACKGROUNDS, **TEXT_COLORS, **PLATE_COLORS}

#: GenEval's relative-position relations and their opposites
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

#: GenEval's POSITION_THRESHOLD: the offset must exceed this fraction of the summed box sizes
POSITION_THRESHOLD = 0.1

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), pixels, x1/y1 exclusive


@dataclass(frozen=True)
class Shape:
    """A flat, upright shape. ``size`` is the width of its bounding box (pixels); the box is
    ``size * ASPECT[kind]`` tall (square for every kind but the semicircle).

    Triangles point up (apex at the top centre), hearts point down, crescents open to the right.
    """

    kind: str
    color: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.kind not in SHAPE_KINDS:
            raise ValueError(f"Shape.kind={self.kind!r}; expected one of {SHAPE_KINDS}")
        if self.color not in OBJECT_COLORS:
            raise ValueError(f"Shape.color={self.color!r}; expected one of {tuple(OBJECT_COLORS)}")

    @property
    def bbox(self) -> Box:
        half_w, half_h = self.size / 2, self.size * ASPECT[self.kind] / 2
        return (self.cx - half_w, self.cy - half_h, self.cx + half_w, self.cy + half_h)


@dataclass(frozen=True)
class Sign:
    """A text label centred at (cx, cy): capital letters ``text_height`` pixels tall.

    ``plate`` is the colour of a plain rectangle behind the text, or ``None`` to draw the text
    directly on the background. Text wider than the canvas allows is condensed horizontally.
    """

    text: str
    color: str
    cx: float
    cy: float
    text_height: float
    plate: str | None = "white"

    def __post_init__(self) -> None:
        if self.color not in TEXT_COLORS:
            raise ValueError(f"Sign.color={self.color!r}; expected one of {tuple(TEXT_COLORS)}")
        if self.plate is not None and self.plate not in PLATE_COLORS:
            raise ValueError(f"Sign.plate={self.plate!r}; expected None or one of {tuple(PLATE_COLORS)}")


@dataclass
class Scene:
    """Everything drawn on one canvas: shapes (in drawing order), an optional sign, a background."""

    shapes: list[Shape] = field(default_factory=list)
    sign: Sign | None = None
    background: str = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background={self.background!r}; expected one of {tuple(BACKGROUNDS)}")


def relations(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where box A lies relative to box B, as GenEval's ``relative_position`` decides.

    The centre offset is shrunk on each axis by ``threshold`` times the summed box extents on that
    axis, then normalised by the raw offset's length; a relation holds where the shrunk component
    exceeds 0.5 (so diagonal placements can satisfy two relations and near ones none).

    >>> sorted(relations((0, 20, 10, 30), (40, 20, 50, 30)))
    ['left of']
    >>> relations((0, 0, 10, 10), (2, 2, 12, 12))
    set()
    """
    centre_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    centre_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dims = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    offset = (centre_a[0] - centre_b[0], centre_a[1] - centre_b[1])
    shrunk = [math.copysign(max(abs(o) - threshold * d, 0.0), o) for o, d in zip(offset, dims, strict=True)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    dx, dy = (s / math.hypot(*offset) for s in shrunk)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found
