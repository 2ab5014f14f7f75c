"""Render mini-world scenes with PIL.

Scenes are drawn at ``SUPERSAMPLE`` times the target size and box-filtered down: edges are
anti-aliased while every pixel fully inside a shape keeps its exact palette colour. Text uses
Pillow's bundled font (``ImageFont.load_default(size=...)``, Pillow >= 10.1), so renders are the same
on every machine and need no system fonts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

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
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw_shape(draw, shape, scale)
    if scene.sign is not None:
        _draw_sign(canvas, scene.sign, scale)
    return canvas.resize((size, size), Image.Resampling.BOX)


def render_tensor(scenes: Sequence[Scene], size: int = 64) -> Tensor:
    """Render a batch: ``Tensor[B, 3, size, size]``, float32 in [0, 1]."""
    arrays = np.stack([np.asarray(render(scene, size)) for scene in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scale: float) -> None:
    x0, y0, x1, y1 = (v * scale for v in shape.bbox)
    fill = OBJECT_COLORS[shape.color]
    # PIL treats x1/y1 as inclusive; subtract one supersampled pixel so the box is exactly `size` wide
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # unreachable: Shape validates its kind
        raise ValueError(f"cannot draw shape kind {shape.kind!r}")


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
