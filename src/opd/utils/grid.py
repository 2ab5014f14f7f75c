"""Image grids with captions (previews, evaluation reports)."""
from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] → RGB PIL image."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def caption_grid(images: Tensor, captions: list[str], num_cols: int = 8, scale: int = 2,
                 caption_lines: int = 3) -> Image.Image:
    """Tile ``images [B, 3, H, W]`` with each caption (wrapped) under its image.

    Small images are upscaled ``scale``× (nearest) so that a 64 px world stays legible.
    """
    b, _, h, w = images.shape
    h, w = h * scale, w * scale
    font = ImageFont.load_default(size=max(10, w // 12))
    chars = max(8, int(w / (font.size * 0.55)))
    line_h = font.size + 2
    cell_h = h + caption_lines * line_h + 4
    cols = min(num_cols, b)
    rows = (b + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + 4) + 4, rows * cell_h + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        x, y = 4 + (i % cols) * (w + 4), 4 + (i // cols) * cell_h
        grid.paste(to_pil(images[i]).resize((w, h), Image.NEAREST), (x, y))
        lines = textwrap.wrap(captions[i], chars)[:caption_lines]
        for k, line in enumerate(lines):
            draw.text((x, y + h + 2 + k * line_h), line, fill="black", font=font)
    return grid
