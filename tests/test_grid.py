"""caption_grid wraps captions onto as many lines as they need within the image width: nothing is cut."""
import numpy as np
import pytest
import torch
from PIL import ImageFont

from opd.utils.grid import caption_grid, wrap_caption

LONG = ("a photo of a red circle to the left of a blue square, under a sign that reads "
        "'SUPERCALIFRAGILISTICEXPIALIDOCIOUS-AND-THEN-SOME', on a green field at noon")


@pytest.mark.parametrize("width", [30, 64, 128, 500])
def test_wrapped_lines_fit_the_width_and_join_back_to_the_caption(width):
    font = ImageFont.load_default(size=10)
    lines = wrap_caption(LONG, font, width)
    assert "".join(lines) == LONG  # nothing cut, nothing added
    assert all(font.getlength(line.rstrip()) <= width for line in lines)
    if width >= 500:  # wider than the longest word: breaks only at spaces
        assert all(line.endswith(" ") for line in lines[:-1])
        assert [w for line in lines for w in line.split()] == LONG.split()


def test_wrapping_keeps_newlines_and_short_captions_on_one_line():
    font = ImageFont.load_default(size=10)
    assert wrap_caption("a cat", font, 200) == ["a cat"]
    assert wrap_caption("", font, 200) == [""]
    assert wrap_caption("one\ntwo", font, 200) == ["one\n", "two"]
    lines = wrap_caption("x" * 40, font, 30)  # one word wider than a line: split between characters
    assert "".join(lines) == "x" * 40 and len(lines) > 1


def test_the_caption_band_grows_with_the_longest_caption():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    short = caption_grid(images, ["a", "b", "c"], num_cols=3)
    long = caption_grid(images, ["a", LONG, "c"], num_cols=3)
    font = ImageFont.load_default(size=10)  # 16 px × scale 2 = 32 px cells: font size 10
    ascent, descent = font.getmetrics()
    extra_lines = len(wrap_caption(LONG, font, 32)) - 1
    assert long.width == short.width
    assert long.height - short.height == extra_lines * (ascent + descent + 1)
    assert extra_lines > 10
    # the text reaches the bottom band: dark pixels in the last caption line of the long cell
    arr = np.asarray(long.convert("L"))
    last_line = arr[long.height - 4 - (ascent + descent + 1) - 4: long.height - 4, 36:36 + 32]
    assert (last_line < 128).any()
