"""HPSv2.1 on a reduced-size random open_clip CLIP (the class ``create_model('ViT-H-14')`` builds):
HPSv2's validation transform, the cosine score against open_clip's own forward, loading through
the real constructor from a weights folder, and the missing-weights error."""
from __future__ import annotations

import json

import pytest
import torch

from opd.rewards.hps import HPS_FILE, HPSv21
from opd.rewards.model_reward import to_uint8
from opd.rewards.weights import WEIGHTS_ENV, MissingWeightsError
from real_reward_helpers import (
    OPENAI_MEAN,
    OPENAI_STD,
    TINY_OPEN_CLIP_CFG,
    sample_images,
    tiny_open_clip,
    to_pil,
)

open_clip = pytest.importorskip("open_clip", reason="HPSv2.1 needs open_clip_torch (the `dev` extra)")

PROMPTS = ["a photo of a cat", "an astronaut riding a horse, digital art", 'a sign that says "OPD"']
TINY_ARCH = "opd-test-tiny-vit"


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hpsv2_val_transform():
    """HPSv2's ``image_transform(224, is_train=False)`` (hpsv2/src/open_clip/transform.py):
    RGB → ToTensor → Resize(224, bicubic) → CenterCrop(224) → Normalize(OpenAI)."""
    from torchvision import transforms as T

    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(),
                      T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.Normalize(OPENAI_MEAN, OPENAI_STD)])


def test_preprocessing_is_hpsv2s_validation_transform():
    reward = HPSv21.from_model(tiny_open_clip(), open_clip.get_tokenizer("ViT-H-14"))
    images = sample_images(2, height=256, width=320)
    ours = reward.transform(to_uint8(images))
    reference = torch.stack([hpsv2_val_transform()(to_pil(x)) for x in images])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # and the same geometry as open_clip's stock (PIL) transform, up to where the resize happens
    stock = open_clip.image_transform(224, is_train=False)
    stock_out = torch.stack([stock(to_pil(x)) for x in images])
    assert (ours - stock_out).abs().mean() < 0.01


def test_score_is_the_cosine_of_normalised_features():
    model = tiny_open_clip()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    images = sample_images(3)
    out = HPSv21.from_model(model, tokenizer, batch_size=2).score(images, PROMPTS, [{}] * 3)
    pixels = torch.stack([hpsv2_val_transform()(to_pil(x)) for x in images])
    with torch.no_grad():  # HPSv2's img_score.py: diag(image_features @ text_features.T)
        image_features, text_features, _ = model(pixels, tokenizer(PROMPTS))
    expected = (image_features @ text_features.T).diagonal()
    torch.testing.assert_close(out["reward"], expected, atol=1e-5, rtol=1e-4)
    assert out["reward"].shape == (3,) and (out["reward"].abs() <= 1 + 1e-5).all()


def _register_tiny_arch(tmp_path):
    config = tmp_path / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(config)


def test_loads_the_hps_checkpoint_from_the_weights_dir(tmp_path):
    _register_tiny_arch(tmp_path)
    model = tiny_open_clip(seed=3)
    folder = tmp_path / "weights" / "xswu" / "HPSv2"
    folder.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict()}, folder / HPS_FILE)  # the released file's layout
    loaded = HPSv21(arch=TINY_ARCH, weights_dir=tmp_path / "weights")
    images = sample_images(2)
    expected = HPSv21.from_model(model, open_clip.get_tokenizer(TINY_ARCH))(images, PROMPTS[:2])
    torch.testing.assert_close(loaded(images, PROMPTS[:2]), expected)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    _register_tiny_arch(tmp_path)
    state = tiny_open_clip().state_dict()
    del state["text_projection"]
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="lacks 1 weights"):
        HPSv21(checkpoint=str(tmp_path / "partial.pt"), arch=TINY_ARCH)


def test_missing_checkpoint_fails_at_construction(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        HPSv21(weights_dir=tmp_path)
    message = str(err.value)
    assert "xswu/HPSv2" in message and HPS_FILE in message and WEIGHTS_ENV in message


@pytest.mark.slow
def test_full_size_vit_h_14_scores_a_batch():
    """The released architecture itself (random weights, ~1B parameters)."""
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    reward = HPSv21.from_model(model, open_clip.get_tokenizer("ViT-H-14"), batch_size=2)
    out = reward(sample_images(2, height=512, width=512), PROMPTS[:2])
    assert out.shape == (2,) and (out.abs() <= 1 + 1e-5).all()
    assert reward.transform.size == 224
