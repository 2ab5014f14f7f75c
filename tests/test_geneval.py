"""The GenEval reward's model plumbing: Mask2Former post-processing, CLIP colour crops, the reward's
wiring of detections into GenEval's rules, and weights that must exist."""
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from opd.data.geneval_prompts import COCO_CLASSES
from opd.rewards.geneval import (
    COLOR_TEMPLATES,
    ClipColorClassifier,
    GenEval,
    Mask2FormerDetector,
    geneval_label_names,
)
from opd.rewards.geneval_rules import COLORS, Detection
from opd.rewards.weights import MissingWeightsError


def fake_detector_model(id2label):
    return SimpleNamespace(config=SimpleNamespace(id2label=id2label), eval=lambda: fake_detector_model(id2label))


def test_label_aliases_map_detectron_names_to_geneval_classes():
    names = geneval_label_names({0: "mouse", 1: "remote", 2: "keyboard", 3: "dining table", 4: "banner"})
    assert names == ["computer mouse", "tv remote", "computer keyboard", "dining table", None]
    with pytest.raises(ValueError, match="COCO instance-segmentation checkpoint"):
        Mask2FormerDetector(fake_detector_model({0: "cat"}))


def test_postprocess_matches_a_hand_computation():
    """One confident query whose mask logits are +6 on a rectangle: score = p(class) · sigmoid(6),
    box = the rectangle; the uniform queries fall under the threshold."""
    id2label = dict(enumerate(COCO_CLASSES))
    detector = Mask2FormerDetector(fake_detector_model(id2label), min_score=0.3)
    num_queries, num_classes, size = 4, len(COCO_CLASSES), (16, 20)
    class_logits = torch.zeros(num_queries, num_classes + 1)
    cat = COCO_CLASSES.index("cat")
    class_logits[0, cat] = 8.0
    masks = torch.full((num_queries, *size), -6.0)
    masks[0, 3:9, 5:12] = 6.0  # rows 3..8, columns 5..11
    masks[1:, :, :10] = 6.0
    found = detector.postprocess(class_logits, masks, size, size, size)
    p_cat = np.exp(8.0) / (np.exp(8.0) + num_classes)  # softmax over C classes + "no object"
    assert len(found) == 1
    assert found[0].label == "cat"
    assert found[0].box == (5.0, 3.0, 12.0, 9.0)
    assert found[0].score == pytest.approx(p_cat / (1 + np.exp(-6.0)), rel=1e-5)
    assert found[0].mask.sum() == 6 * 7


def test_preprocess_fits_1333x800_and_pads_to_32():
    detector = Mask2FormerDetector(fake_detector_model(dict(enumerate(COCO_CLASSES))))
    pixels, size = detector.preprocess(torch.full((1, 3, 480, 640), 0.5))
    assert size == (800, 1067) and pixels.shape == (1, 3, 800, 1088)  # factor min(1333/640, 800/480)
    expected = (0.5 * 255 - 123.675) / 58.395
    assert pixels[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert pixels[0, :, :, 1067:].abs().max() == 0  # padding


class FakeClip(nn.Module):
    """A CLIP whose text embedding is the one-hot of the colour named in the prompt and whose
    image embedding is the one-hot of the palette colour nearest the crop's mean non-grey pixel."""

    PALETTE: ClassVar[dict[str, tuple[float, float, float]]] = {
        "red": (1, 0, 0), "green": (0, 0.5, 0), "blue": (0, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0)}

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=32))
        self.text_projection = self.visual_projection = nn.Identity()
        self.prompts = []

    def text_model(self, input_ids, attention_mask):
        return SimpleNamespace(pooler_output=nn.functional.one_hot(input_ids[:, 0], len(COLORS)).float())

    def vision_model(self, pixel_values):
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
        rgb = (pixel_values * std + mean).flatten(2)  # [B, 3, P]
        grey = (rgb - 153 / 255).abs().amax(1) < 0.02
        out = []
        for colours, g in zip(rgb, grey):
            m = colours[:, ~g].mean(1)
            name = min(self.PALETTE, key=lambda c: float(((m - torch.tensor(self.PALETTE[c])) ** 2).sum()))
            out.append(nn.functional.one_hot(torch.tensor(COLORS.index(name)), len(COLORS)).float())
        return SimpleNamespace(pooler_output=torch.stack(out))


def test_colour_of_the_masked_object_not_of_its_box():
    """A red disc on a blue background: its mask says red; the bare box (mostly blue) says blue."""
    log = []
    classifier = ClipColorClassifier(FakeClip(), lambda texts, padding, return_tensors: _tokens(texts, log))
    image = np.zeros((40, 40, 3), np.uint8)
    image[:] = (0, 0, 255)
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 36
    image[disc] = (255, 0, 0)
    box = (10.0, 10.0, 30.0, 30.0)
    assert classifier(image, [Detection("car", 0.9, box, disc)], "car") == ["red"]
    assert classifier(image, [Detection("car", 0.9, box, None)], "car") == ["blue"]
    assert set(log) == {t.format(c=c, cls="car") for c in COLORS for t in COLOR_TEMPLATES}
    assert "a photo of a red-colored car" in log
    columns = classifier.text_classifier("car")
    assert torch.allclose(columns.norm(dim=0), torch.ones(len(COLORS)))


def _tokens(texts, log):
    log.extend(texts)
    ids = torch.tensor([[next(i for i, c in enumerate(COLORS) if f" {c} " in t or f" {c}-" in t)] for t in texts])

    class Batch(dict):
        def to(self, device):
            return self

    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.fixture(scope="module")
def tiny_reward():
    return GenEval(random_weights_for_tests=True)


def test_reward_wires_detections_and_colours_into_the_rules(tiny_reward):
    """With a stub detector and colour classifier, the reward's two outputs equal the rules'."""
    two_cups = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    metadata = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}, two_cups, two_cups]
    boxes = [[Detection("car", 0.8, (0, 0, 5, 5)), Detection("car", 0.5, (9, 9, 12, 12))],
             [Detection("cup", 0.95, (0, 0, 4, 4)), Detection("cup", 0.92, (8, 8, 12, 12))],
             [Detection("cup", 0.95, (0, 0, 4, 4)), Detection("cup", 0.85, (8, 8, 12, 12))]]  # 0.85 < 0.9
    tiny_reward.detector, saved = (lambda images: boxes), tiny_reward.detector
    tiny_reward.colors, saved_colors = (lambda image, dets, cls: ["red"] * len(dets)), tiny_reward.colors
    try:
        out = tiny_reward.score(torch.rand(3, 3, 16, 16), ["p"] * 3, metadata)
    finally:
        tiny_reward.detector, tiny_reward.colors = saved, saved_colors
    # red car: strict ✓ (top-1 red); partial [1 − |1 − 2|/1 = 0, 0] → 0 (two cars found)
    assert out["correct"].tolist() == [1.0, 1.0, 0.0]
    assert out["reward"].tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_tiny_random_reward_runs_on_images(tiny_reward):
    rows = [{"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                              {"class": "bus", "count": 1, "color": "blue"}]},
            {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}]
    out = tiny_reward.score(torch.rand(2, 3, 32, 32), ["a", "b"], rows)
    assert set(out) == {"reward", "correct"} and out["reward"].shape == (2,) and out["reward"].dtype == torch.float32
    assert set(out["correct"].tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="no 'include' key"):
        tiny_reward.score(torch.rand(1, 3, 32, 32), ["a"], [{"tag": "x"}])


def test_missing_weights_fail_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="GenEval reward.*facebook/mask2former-swin-small-coco-instance"
                                                  ".*huggingface-cli download"):
        GenEval(weights_dir=str(tmp_path))


@pytest.mark.slow
def test_full_size_random_architectures_score_a_512px_image():
    reward = GenEval(random_weights_for_tests=True, random_size="full")
    assert sum(p.numel() for p in reward.colors.model.parameters()) > 3.5e8  # CLIP ViT-L/14 (toy vocabulary)
    assert sum(p.numel() for p in reward.detector.model.parameters()) > 6e7  # Mask2Former Swin-S
    rows = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}]
    out = reward.score(torch.rand(1, 3, 512, 512), ["a photo of a red car"], rows)
    assert out["reward"].shape == (1,)
