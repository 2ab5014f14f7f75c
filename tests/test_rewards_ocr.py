"""OCR reward: string scoring against hand-computed values, RapidOCR on images drawn here."""

from __future__ import annotations

import doctest
import random
import string
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from opd.rewards import ocr as ocr_module
from opd.rewards import text_match
from opd.rewards.ocr import OCRReward, prepare_for_ocr
from opd.rewards.text_match import exact_match, levenshtein, ocr_accuracy, quoted_text


def draw_text(text: str, size: int = 64, font_size: int = 22) -> torch.Tensor:
    """Black ``text`` centred on a white ``size``² canvas → ``[3, size, size]`` in [0, 1]."""
    canvas = Image.new("RGB", (size, size), "white")
    font = ImageFont.load_default(size=font_size)
    ImageDraw.Draw(canvas).text((size / 2, size / 2), text, fill="black", font=font, anchor="mm")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward() -> OCRReward:
    return OCRReward()


def test_text_match_doctests() -> None:
    assert doctest.testmod(text_match).failed == 0


@pytest.mark.parametrize(
    ("target", "recognised", "expected"),
    [
        ("Hello World", "helo world", 1 - 1 / 10),  # docs/algorithms.md's OCR example: one deletion of 10
        ("CAT", "the cat sat", 1.0),  # substring → distance 0
        ("CAT", "CUT", 1 - 1 / 3),  # one substitution
        ("CAT", "", 0.0),  # nothing read: distance 3 = len(target)
        ("CAT", "XYZWVU", 0.0),  # distance 6 capped at 3
        ("AB CD", "abdc", 1 - 2 / 4),  # "abcd" vs "abdc": two substitutions, spaces dropped
    ],
)
def test_ocr_accuracy_by_hand(target: str, recognised: str, expected: float) -> None:
    assert ocr_accuracy(target, recognised) == pytest.approx(expected)


def test_levenshtein_and_helpers() -> None:
    assert levenshtein("flaw", "lawn") == 2  # delete f, insert n
    assert levenshtein("abc", "") == 3 and levenshtein("", "") == 0
    assert quoted_text('a sign that says "ZIP" next to "ZAP"') == "ZIP"
    assert quoted_text('an unclosed "quote') is None
    assert exact_match("Big Cat", "BIGCAT") and not exact_match("CAT", "the cat")


def test_reads_clean_renders(reward: OCRReward) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_uppercase) for _ in range(3)) for _ in range(20)]
    images = torch.stack([draw_text(word) for word in words])
    prompts = [f'a sign that says "{word}"' for word in words]
    out = reward.score(images, prompts, [{} for _ in words])
    # measured 20/20 (and 80/80 in the upscale sweep); 0.8 leaves room for onnxruntime versions
    assert out["exact"].mean().item() >= 0.8
    assert out["reward"].mean().item() >= 0.9
    # threads, each with its own engine, read exactly what one sequential reader reads
    sequential = OCRReward(num_workers=1).read_all(ocr_module.to_uint8_hwc(images))
    assert reward.read_all(ocr_module.to_uint8_hwc(images)) == sequential


def test_blank_image_scores_zero(reward: OCRReward) -> None:
    out = reward.score(torch.ones(1, 3, 64, 64), ['a sign that says "CAT"'], [{}])
    assert out["reward"].tolist() == [0.0] and out["exact"].tolist() == [0.0]


def test_mixed_batch_shapes_and_metadata_target(reward: OCRReward) -> None:
    images = torch.stack([draw_text("CAT"), torch.ones(3, 64, 64), draw_text("DOG"), torch.zeros(3, 64, 64)])
    prompts = ['a sign that says "CAT"', 'a sign that says "CAT"', 'a sign that says "CAT"', '"CAT"']
    metadata: list[dict] = [{}, {}, {"text": "DOG"}, {}]  # metadata["text"] overrides the quotes
    out = reward.score(images, prompts, metadata)
    assert set(out) == {"reward", "exact", "failed"}
    for value in out.values():
        assert value.shape == (4,) and value.dtype == torch.float32 and value.device.type == "cpu"
    assert out["exact"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert reward(images[:1], prompts[:1]).tolist() == [1.0]


def test_missing_target_is_a_clear_error(reward: OCRReward) -> None:
    with pytest.raises(ValueError, match="double quotes"):
        reward.score(torch.ones(1, 3, 64, 64), ["a sign"], [{}])


class _FlakyEngine:
    """Raises on an all-black image, reads "CAT" otherwise."""

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        if image.max() == 0:
            raise RuntimeError("boom")
        return [("CA", 0.9), ("T", 0.8), ("junk", 0.0)]  # zero-confidence lines are dropped


@pytest.mark.parametrize("num_workers", [1, 2])
def test_engine_failure_scores_zero_with_warning(monkeypatch: pytest.MonkeyPatch, num_workers: int) -> None:
    monkeypatch.setitem(ocr_module.ENGINES, "flaky", _FlakyEngine)
    reward = OCRReward(engine="flaky", num_workers=num_workers)
    images = torch.ones(3, 3, 64, 64)
    images[1] = 0
    with pytest.warns(RuntimeWarning, match="image 1"):
        out = reward.score(images, ['"CAT"'] * 3, [{}] * 3)
    assert out["reward"].tolist() == [1.0, 0.0, 1.0]
    assert out["exact"].tolist() == [1.0, 0.0, 1.0]


def test_bad_engine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="rapidocr"):
        OCRReward(engine="tesseract")

    def broken(**kwargs: object) -> None:
        raise FileNotFoundError("ch_PP-OCRv4_det_infer.onnx")

    monkeypatch.setattr("rapidocr_onnxruntime.RapidOCR", broken)
    with pytest.raises(RuntimeError, match="reinstall rapidocr-onnxruntime"):
        OCRReward()
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import now fails
    with pytest.raises(ImportError, match="pip install rapidocr-onnxruntime"):
        OCRReward()


def test_prepare_pads_then_upscales() -> None:
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    image[:, 0] = 255  # the left column is replicated into the border
    padded = prepare_for_ocr(image, pad=2, upscale_to=None)
    assert padded.shape == (14, 24, 3) and (padded[:, :3] == 255).all()
    assert prepare_for_ocr(image, pad=2, upscale_to=28).shape == (28, 48, 3)  # short side 14 → 28
    assert prepare_for_ocr(image, pad=0, upscale_to=5).shape == (10, 20, 3)  # never downscales
