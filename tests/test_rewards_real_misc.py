"""JPEG (in)compressibility against PIL, the EasyOCR engine's plumbing and weight errors, and the
real-reward configs (every one composes; the aesthetic-teacher mix instantiates from a weights
folder and sums its parts)."""
from __future__ import annotations

import io
import json

import cv2
import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_cfg
from opd.rewards.jpeg import JpegSize
from opd.rewards.multi import MultiReward
from opd.rewards.ocr import EASYOCR_FILES, ENGINES, EasyOCREngine, OCRReward
from opd.rewards.weights import WEIGHTS_ENV, MissingWeightsError
from real_reward_helpers import TINY_OPEN_CLIP_CFG, clip_processor, sample_images, tiny_clip, tiny_open_clip

REAL_CONFIGS = ["pickscore", "hpsv21", "clipscore", "laion_aesthetic", "imagereward", "jpeg_compressibility",
                "jpeg_incompressibility", "ocr_easyocr", "geneval_remote", "unifiedreward_remote", "aesthetic_sd35"]


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# -- JPEG ---------------------------------------------------------------------------------------
def pil_kb(image: torch.Tensor, quality: int = 95) -> float:
    array = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def test_jpeg_sizes_are_pils_and_signs_follow_flow_grpo():
    g = torch.Generator().manual_seed(0)
    images = torch.stack([torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64, generator=g), sample_images(1, 64, 64)[0]])
    kb = torch.tensor([pil_kb(x) for x in images])
    comp = JpegSize(sign=-1).score(images, ["a"] * 3, [{}] * 3)
    incomp = JpegSize(sign=1, scale=1.0).score(images, ["a"] * 3, [{}] * 3)
    torch.testing.assert_close(comp["kb"], kb)
    torch.testing.assert_close(comp["reward"], -kb / 500)
    torch.testing.assert_close(incomp["reward"], kb)  # Flow-GRPO's incompressibility: raw kB
    assert comp["reward"][0] > comp["reward"][1]  # a flat image compresses better than noise


# -- EasyOCR ------------------------------------------------------------------------------------
def test_easyocr_is_an_engine_choice():
    assert ENGINES["easyocr"] is EasyOCREngine


def test_easyocr_without_weights_names_the_files_and_the_variable(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        OCRReward(engine="easyocr", engine_kwargs={"weights_dir": tmp_path})
    message = str(err.value)
    assert "easyocr" in message and WEIGHTS_ENV in message
    assert all(name in message and url in message for name, url in EASYOCR_FILES.items())


def test_easyocr_never_downloads_over_corrupt_files(tmp_path):
    pytest.importorskip("easyocr", reason="the easyocr engine needs easyocr (the `dev` extra)")
    folder = tmp_path / "easyocr"
    folder.mkdir()
    for name in EASYOCR_FILES:
        (folder / name).write_bytes(b"not a checkpoint")
    with pytest.raises(MissingWeightsError, match="MD5 mismatch.*downloads disabled"):
        EasyOCREngine(weights_dir=tmp_path, gpu=False)


class StubReader:
    """Records what EasyOCR's two steps receive; reads a fixed line."""

    def __init__(self, text: str, conf: float):
        self.text, self.conf, self.calls = text, conf, []

    def detect(self, image):
        self.calls.append(("detect", image))
        return [[[0, 10, 0, 10]]], [[]]

    def recognize(self, grey, horizontal, free, detail):
        self.calls.append(("recognize", grey))
        return [([[0, 0], [10, 0], [10, 10], [0, 10]], self.text, self.conf)]


def test_easyocr_detects_on_rgb_recognises_on_grey_and_scores_like_flow_grpo():
    reward = OCRReward(num_workers=1)  # the default engine, then swapped for a stubbed EasyOCR one
    stub = StubReader("helo world", 0.9)
    reward.engine = EasyOCREngine.from_reader(stub)
    images = sample_images(1, 64, 64)
    out = reward.score(images, ['a sign that says "Hello World"'], [{}])
    torch.testing.assert_close(out["reward"], torch.tensor([0.9]))  # docs/algorithms.md's OCR example
    (_, rgb), (_, grey) = stub.calls
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    np.testing.assert_array_equal(grey, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


# -- configs ------------------------------------------------------------------------------------
def _values(node, key):
    """Every value of ``key`` anywhere in a nested dict/list."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _values(v, key)]
    return [x for v in node for x in _values(v, key)] if isinstance(node, list) else []


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_reward_config_composes_with_weights_dir(name, tmp_path):
    cfg = compose_cfg("train", [f"reward={name}", f"paths.weights_dir={tmp_path}"], tmp_path)
    reward = OmegaConf.to_container(cfg.reward, resolve=True)
    assert len(reward) == 1  # one named reward (a mix is one `multi` reward)
    for target in _values(reward, "_target_"):
        assert hydra.utils.get_class(target)
    assert set(_values(reward, "weights_dir")) <= {str(tmp_path)}


@pytest.mark.parametrize("name", ["pickscore", "hpsv21", "clipscore", "laion_aesthetic", "imagereward"])
def test_weight_configs_fail_at_instantiation_without_weights(name, tmp_path):
    cfg = compose_cfg("train", [f"reward={name}", f"paths.weights_dir={tmp_path}"], tmp_path)
    with pytest.raises(Exception) as err:
        hydra.utils.instantiate(cfg.reward)
    chain, error = [], err.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert any(isinstance(e, MissingWeightsError) for e in chain), chain
    assert WEIGHTS_ENV in str(err.value) and str(tmp_path) in str(err.value)


def test_aesthetic_sd35_is_pickscore_clipscore_hps_one_to_one(tmp_path):
    """The paper's aesthetic-teacher reward, built from its config and a weights folder of
    reduced-size models: reward = PickScore/26 + CLIPScore + HPSv2.1, with every part logged."""
    open_clip = pytest.importorskip("open_clip", reason="HPSv2.1 needs open_clip_torch (the `dev` extra)")
    arch = tmp_path / "opd-test-mix-vit.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(arch)
    weights = tmp_path / "weights"
    tiny_clip(seed=1).save_pretrained(weights / "yuvalkirstain/PickScore_v1")
    clip_processor().save_pretrained(weights / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    tiny_clip(seed=2).save_pretrained(weights / "openai/clip-vit-large-patch14")
    clip_processor().save_pretrained(weights / "openai/clip-vit-large-patch14")
    (weights / "xswu/HPSv2").mkdir(parents=True)
    torch.save({"state_dict": tiny_open_clip(seed=3).state_dict()}, weights / "xswu/HPSv2/HPS_v2.1_compressed.pt")

    cfg = compose_cfg("train", ["reward=aesthetic_sd35", f"paths.weights_dir={weights}",
                                "reward.aesthetic_sd35.rewards.hpsv21.arch=opd-test-mix-vit"], tmp_path)
    reward = hydra.utils.instantiate(cfg.reward)["aesthetic_sd35"]
    assert isinstance(reward, MultiReward) and reward.weights == {"pickscore": 1.0, "clipscore": 1.0, "hpsv21": 1.0}
    out = reward.score(sample_images(2), ["a photo of a cat", "a dog"], [{}, {}])
    assert {"reward", "pickscore", "pickscore/raw", "clipscore", "clipscore/x100", "hpsv21"} <= set(out)
    torch.testing.assert_close(out["reward"], out["pickscore"] + out["clipscore"] + out["hpsv21"])
    torch.testing.assert_close(out["pickscore"], out["pickscore/raw"] / 26)
