"""Image grids with captions (previews, evaluation reports)."""
from __future__ import annotations

import re

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] → RGB PIL image."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def wrap_caption(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Split ``text`` into lines no wider than ``width`` pixels in ``font``, at spaces where possible
    (a word wider than a line is split between characters); a newline in ``text`` starts a new line.

    Nothing is dropped: the lines joined give ``text`` back exactly (a line keeps the spaces it ends
    with, which draw as nothing).
    """
    def fits(line: str) -> bool:
        return font.getlength(line.rstrip()) <= width

    lines: list[str] = []
    line = ""
    for token in re.findall(r"\S+\s*|\s+", text):  # a word with the spaces after it (or leading spaces)
        word = token.rstrip()
        if line and not fits(line + word):
            lines.append(line)
            line = ""
        while word and not fits(line + word):  # too wide even on a line of its own: split it
            cut = max(1, max(k for k in range(len(word) + 1) if fits(line + word[:k])))
            lines.append(line + word[:cut])
            line, word, token = "", word[cut:], token[cut:]
        line += token
        if "\n" in token:
            lines.append(line)
            line = ""
    if line or not lines:
        lines.append(line)
    return lines


def caption_grid(images: Tensor, captions: list[str], num_cols: int = 8, scale: int = 2,
                 caption_lines: int = 1) -> Image.Image:
    """Tile ``images [B, 3, H, W]`` with each caption under its image, wrapped onto as many lines as
    it needs within the image's width (:func:`wrap_caption`, never cut): every row's caption band
    is as tall as the longest caption of the grid, and at least ``caption_lines`` lines.

    Small images are upscaled ``scale``× (nearest) so that a 64 px world stays legible.
    """
    b, _, h, w = images.shape
    h, w = h * scale, w * scale
    font = ImageFont.load_default(size=max(10, w // 12))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line_h = ascent + descent + 1
    wrapped = [wrap_caption(c, font, w) for c in captions]
    band = max(caption_lines, *(len(lines) for lines in wrapped)) if wrapped else caption_lines
    cell_h = h + band * line_h + 6
    cols = min(num_cols, b)
    rows = (b + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + 4) + 4, rows * cell_h + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        x, y = 4 + (i % cols) * (w + 4), 4 + (i // cols) * cell_h
        grid.paste(to_pil(images[i]).resize((w, h), Image.NEAREST), (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x, y + h + 2 + k * line_h), line.rstrip(), fill="black", font=font)
    return grid
