"""Render mini-world scenes with PIL.

Scenes are drawn at ``SUPERSAMPLE`` times the target size and box-filtered down: edges are
anti-aliased while every pixel fully inside a shape keeps its exact palette colour. Text uses
Pillow's bundled font (``ImageFont.load_default(size=...)``, Pillow >= 10.1), so renders are the same
on every machine and need no system fonts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from opd.data.world.scene import (
    BACKGROUNDS,
    CANVAS,
    OBJECT_COLORS,
    PLATE_COLORS,
    TEXT_COLORS,
    Scene,
    Shape,
    Sign,
)

SUPERSAMPLE = 4
#: padding between a sign's text and the edge of its plate, and the widest a plate may be (canvas px)
PLATE_PAD = 3.0
MAX_PLATE_WIDTH = 62.0


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` on a ``size`` x ``size`` RGB image (scene coordinates scale by size / 64)."""
    hi = size * SUPERSAMPLE
    scale = hi / CANVAS
    canvas = Image.new("RGB", (hi, hi), BACKGROUNDS[scene.background])
    for shape in scene.shapes:
        _draw_shape(canvas, shape, scale)
    if scene.sign is not None:
        _draw_sign(canvas, scene.sign, scale)
    return canvas.resize((size, size), Image.Resampling.BOX)


def render_tensor(scenes: Sequence[Scene], size: int = 64) -> Tensor:
    """Render a batch: ``Tensor[B, 3, size, size]``, float32 in [0, 1]."""
    arrays = np.stack([np.asarray(render(scene, size)) for scene in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """A ``points``-pointed star, apex up, stretched to fill the unit box."""
    pts = [(r * math.cos(math.radians(-90 + 180 * i / points)), r * math.sin(math.radians(-90 + 180 * i / points)))
           for i, r in zip(range(2 * points), [1.0, inner] * points, strict=True)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]


#: each kind's outline in its unit box (u, v in [0, 1], v down): ("poly", points) and ("ellipse", box)
#: parts are filled, ("cut", box) ellipses are cleared again; ("pie", box) is an ellipse's upper half
UNIT_OUTLINES: dict[str, list[tuple[str, Any]]] = {
    "circle": [("ellipse", (0, 0, 1, 1))],
    "square": [("poly", [(0, 0), (1, 0), (1, 1), (0, 1)])],
    "triangle": [("poly", [(0.5, 0), (1, 1), (0, 1)])],
    "diamond": [("poly", [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)])],
    "star": [("poly", _star())],
    "cross": [("poly", [(0.32, 0), (0.68, 0), (0.68, 0.32), (1, 0.32), (1, 0.68), (0.68, 0.68), (0.68, 1),
                        (0.32, 1), (0.32, 0.68), (0, 0.68), (0, 0.32), (0.32, 0.32)])],
    "ring": [("ellipse", (0, 0, 1, 1)), ("cut", (0.26, 0.26, 0.74, 0.74))],
    "heart": [("ellipse", (0, 0, 0.54, 0.54)), ("ellipse", (0.46, 0, 1, 0.54)),
              ("poly", [(0.03, 0.38), (0.97, 0.38), (0.5, 1)])],
    "crescent": [("ellipse", (0, 0, 1, 1)), ("cut", (0.36, -0.06, 1.3, 0.88))],
    "semicircle": [("pie", (0, 0, 1, 2))],
}


def kind_mask(kind: str, width: int, height: int) -> Image.Image:
    """An ``L`` mask (255 inside) of ``kind`` filling a ``width`` x ``height`` box: the one outline
    both the renderer and the judges' templates (``rewards/geneval_mini.py``) use."""
    if kind not in UNIT_OUTLINES:
        raise ValueError(f"cannot draw shape kind {kind!r}; expected one of {tuple(UNIT_OUTLINES)}")
    mask = Image.new("L", (max(1, width), max(1, height)), 0)
    draw = ImageDraw.Draw(mask)

    def box(b: tuple[float, ...]) -> tuple[float, ...]:  # PIL's x1/y1 are inclusive
        return (b[0] * width, b[1] * height, b[2] * width - 1, b[3] * height - 1)

    for op, arg in UNIT_OUTLINES[kind]:
        if op == "poly":
            draw.polygon([(u * width, v * height) for u, v in arg], fill=255)
        elif op == "pie":
            draw.pieslice(box(arg), 180, 360, fill=255)
        else:
            draw.ellipse(box(arg), fill=0 if op == "cut" else 255)
    return mask


def _draw_shape(canvas: Image.Image, shape: Shape, scale: float) -> None:
    x0, y0, x1, y1 = (v * scale for v in shape.bbox)
    left, top = round(x0), round(y0)
    mask = kind_mask(shape.kind, round(x1) - left, round(y1) - top)
    canvas.paste(Image.new("RGB", mask.size, OBJECT_COLORS[shape.color]), (left, top), mask)


@lru_cache(maxsize=64)
def _font(pixel_cap_height: int) -> ImageFont.FreeTypeFont:
    """Bundled font sized so that a capital letter is ``pixel_cap_height`` pixels tall."""
    probe = ImageFont.load_default(size=100)
    _, top, _, bottom = probe.getbbox("H")
    return ImageFont.load_default(size=max(1, round(100 * pixel_cap_height / (bottom - top))))


def _text_mask(text: str, cap_height: int, max_width: int) -> Image.Image:
    """An ``L`` mask holding ``text`` cropped to its ink, condensed to at most ``max_width``."""
    font = _font(cap_height)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255)
    if mask.width > max_width:
        # condense rather than shrink: the text height is what makes it legible at 64 px
        mask = mask.resize((max_width, mask.height), Image.Resampling.LANCZOS)
    return mask


def _draw_sign(canvas: Image.Image, sign: Sign, scale: float) -> None:
    pad = PLATE_PAD * scale
    mask = _text_mask(sign.text, round(sign.text_height * scale), int((MAX_PLATE_WIDTH * scale) - 2 * pad))
    cx, cy = sign.cx * scale, sign.cy * scale
    x0, y0 = round(cx - mask.width / 2), round(cy - mask.height / 2)
    if sign.plate is not None:
        plate = (x0 - pad, y0 - pad, x0 + mask.width + pad - 1, y0 + mask.height + pad - 1)
        ImageDraw.Draw(canvas).rectangle(plate, fill=PLATE_COLORS[sign.plate])
    ink = Image.new("RGB", mask.size, TEXT_COLORS[sign.color])
    canvas.paste(ink, (x0, y0), mask)


def sign_box(sign: Sign) -> tuple[float, float, float, float]:
    """The canvas-pixel box ``(x0, y0, x1, y1)`` a sign (with its plate) covers, for layout."""
    mask = _text_mask(
        sign.text, round(sign.text_height * SUPERSAMPLE), int((MAX_PLATE_WIDTH - 2 * PLATE_PAD) * SUPERSAMPLE)
    )
    half_w = mask.width / SUPERSAMPLE / 2 + PLATE_PAD
    half_h = mask.height / SUPERSAMPLE / 2 + PLATE_PAD
    return (sign.cx - half_w, sign.cy - half_h, sign.cx + half_w, sign.cy + half_h)
