"""PickScore, CLIPScore and the LAION aesthetic predictor on reduced-size random CLIPs of the real
class: preprocessing against the original processors, formulas against the model's own forward,
loading through the real constructors from a weights folder, and the missing-weights errors."""
from __future__ import annotations

import pytest
import torch

from opd.rewards.aesthetic import HEAD_FILE, HEAD_URL, AestheticHead, LaionAesthetic
from opd.rewards.clipscore import CLIPScore
from opd.rewards.model_reward import ImageTransform, to_uint8
from opd.rewards.pickscore import PickScore
from opd.rewards.weights import WEIGHTS_ENV, MissingWeightsError
from real_reward_helpers import (
    CLIP_IMAGE_CONFIG,
    clip_processor,
    clip_tokenizer,
    sample_images,
    tiny_clip,
    to_pil,
)

PROMPTS = ["a photo of a cat", 'a sign that says "Hello World"', "two dogs on a red sofa, oil painting"]


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch, tmp_path):
    """No $OPD_WEIGHTS_DIR and an empty Hugging Face cache: only what a test writes exists."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _reference_inputs(images, prompts):
    """Pixel values and tokens from transformers' own CLIP processor (not opd's transform)."""
    proc = clip_processor()
    pixels = proc.image_processor(images=[to_pil(x) for x in images], return_tensors="pt")["pixel_values"]
    tokens = proc.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    return pixels, tokens


def test_clip_tokenizer_is_clips_bpe():
    """The test tokenizer is CLIP's real BPE: it agrees with open_clip's tokenizer token for token."""
    from open_clip.tokenizer import SimpleTokenizer

    for prompt in PROMPTS:
        ours = clip_tokenizer()([prompt])["input_ids"][0]
        theirs = SimpleTokenizer()([prompt])[0]
        assert ours == theirs[theirs.nonzero()].flatten().tolist()


def test_image_transform_matches_the_pil_clip_processor():
    """Same PIL image → opd's batched tensor preprocessing ≈ transformers' PIL CLIP processor (the
    Flow-GRPO-era implementation: resize short side 224 bicubic, centre crop, normalise)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = sample_images(2, height=200, width=300)
    reference = CLIPImageProcessorPil(**CLIP_IMAGE_CONFIG)(images=[to_pil(x) for x in images],
                                                          return_tensors="pt")["pixel_values"]
    ours = ImageTransform.from_image_processor(CLIPImageProcessorPil(**CLIP_IMAGE_CONFIG))(to_uint8(images))
    assert ours.shape == reference.shape == (2, 3, 224, 224)
    diff = (ours - reference).abs()
    # a few 1/255 levels at sharp edges (PIL's fixed-point bicubic), none on average
    assert diff.max() < 0.04 and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_image_transform_crops_the_centre_of_tall_and_wide_images():
    """A wide image keeps its central square: a bar at the far left is cropped away."""
    images = torch.zeros(1, 3, 224, 448)
    images[..., :, :100] = 1.0  # left of the central crop [112, 336)
    out = ImageTransform()(to_uint8(images))
    mean = torch.tensor(ImageTransform().mean).view(1, 3, 1, 1)
    std = torch.tensor(ImageTransform().std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ((torch.zeros_like(out) - mean) / std).expand_as(out), atol=1e-6, rtol=0)


def test_pickscore_is_scaled_logit_of_the_models_own_forward():
    model, proc = tiny_clip(), clip_processor()
    images = sample_images(3)
    out = PickScore.from_model(model, proc, batch_size=2).score(images, PROMPTS, [{}] * 3)
    pixels, tokens = _reference_inputs(images, PROMPTS)
    with torch.no_grad():
        logits = model(pixel_values=pixels, **tokens).logits_per_image.diagonal()  # exp(scale) · cos
    torch.testing.assert_close(out["raw"], logits, atol=0.05, rtol=0)  # ≤ 2-level pixel differences
    torch.testing.assert_close(out["reward"], out["raw"] / 26)
    assert out["reward"].shape == (3,) and out["reward"].dtype == torch.float32
    assert (out["raw"].abs() <= 100 + 1e-3).all()  # |cos| ≤ 1 at temperature 100


def test_pickscore_hand_computed_from_embeddings():
    """``exp(logit_scale) · cos / 26`` from the model's own normalised embeddings, exactly."""
    model, proc = tiny_clip(), clip_processor()
    reward = PickScore.from_model(model, proc)
    images = sample_images(2)
    pixels = reward.encoder.pixel_values(to_uint8(images))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**reward.encoder.tokens(PROMPTS[:2]))
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    expected = 100.0 * cos / 26  # logit_scale = ln 100
    torch.testing.assert_close(reward(images, PROMPTS[:2]), expected, atol=1e-5, rtol=1e-5)


def test_batching_does_not_change_scores():
    model, proc = tiny_clip(), clip_processor()
    images = sample_images(3)
    one = PickScore.from_model(model, proc, batch_size=1)(images, PROMPTS)
    all_ = PickScore.from_model(model, proc, batch_size=8)(images, PROMPTS)
    torch.testing.assert_close(one, all_, atol=1e-5, rtol=1e-5)


def test_clipscore_is_clamped_cosine_on_the_0_1_scale():
    model, proc = tiny_clip(), clip_processor()
    images = sample_images(3)
    pixels, tokens = _reference_inputs(images, PROMPTS)
    for flip in (1.0, -1.0):  # negating the text projection negates every cosine: both signs clamp
        with torch.no_grad():
            model.text_projection.weight.mul_(flip)
            cos = model(pixel_values=pixels, **tokens).logits_per_image.diagonal() / 100.0
        out = CLIPScore.from_model(model, proc).score(images, PROMPTS, [{}] * 3)
        torch.testing.assert_close(out["reward"], cos.clamp(min=0), atol=5e-4, rtol=0)
        torch.testing.assert_close(out["x100"], 100 * out["reward"])
        assert (out["reward"] >= 0).all() and (out["reward"] <= 1).all()


def test_aesthetic_head_has_the_original_layout():
    head = AestheticHead()
    shapes = {key: tuple(value.shape) for key, value in head.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_aesthetic_is_the_linear_mlp_of_the_normalised_image_embedding():
    model, proc, head = tiny_clip(projection_dim=768), clip_processor(), AestheticHead()
    images = sample_images(3)
    reward = LaionAesthetic.from_model(model, proc, head)
    out = reward(images, PROMPTS)
    pixels, _ = _reference_inputs(images, PROMPTS)
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels)
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        x = emb / emb.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # no activations in the original predictor
            layer = head.layers[index]
            x = x @ layer.weight.T + layer.bias
    torch.testing.assert_close(out, x.squeeze(-1), atol=2e-4, rtol=0)
    torch.testing.assert_close(reward(images, PROMPTS), out)  # dropout is off
    torch.testing.assert_close(reward(images, ["something else"] * 3), out)  # prompt-independent


def _save_clip(folder, projection_dim=16, seed=0):
    model = tiny_clip(projection_dim, seed)
    model.save_pretrained(folder)
    clip_processor().save_pretrained(folder)
    return model


def test_pickscore_loads_from_the_weights_dir(tmp_path):
    """The real constructor: `<weights_dir>/<hub id>/` folders, no network, same scores."""
    model = _save_clip(tmp_path / "yuvalkirstain/PickScore_v1")
    clip_processor().save_pretrained(tmp_path / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    loaded = PickScore(weights_dir=tmp_path)
    images = sample_images(2)
    torch.testing.assert_close(loaded(images, PROMPTS[:2]),
                               PickScore.from_model(model, clip_processor())(images, PROMPTS[:2]))


def test_laion_aesthetic_loads_clip_and_head_from_the_weights_dir(tmp_path, monkeypatch):
    _save_clip(tmp_path / "openai/clip-vit-large-patch14", projection_dim=768)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))  # the environment variable alone is enough
    with pytest.raises(MissingWeightsError, match=r"improved-aesthetic-predictor.*" + HEAD_URL.replace("+", r"\+")):
        LaionAesthetic()
    head = AestheticHead()
    (tmp_path / "improved-aesthetic-predictor").mkdir()
    torch.save(head.state_dict(), tmp_path / "improved-aesthetic-predictor" / HEAD_FILE)
    loaded = LaionAesthetic()
    torch.testing.assert_close(loaded.head.layers[0].weight, head.layers[0].weight)


@pytest.mark.parametrize(("build", "source"), [
    (lambda root: PickScore(weights_dir=root), "yuvalkirstain/PickScore_v1"),
    (lambda root: CLIPScore(weights_dir=root), "openai/clip-vit-large-patch14"),
    (lambda root: LaionAesthetic(weights_dir=root), "openai/clip-vit-large-patch14"),
])
def test_missing_weights_fail_at_construction_naming_the_source(tmp_path, build, source):
    with pytest.raises(MissingWeightsError) as err:
        build(tmp_path)
    message = str(err.value)
    assert source in message and WEIGHTS_ENV in message and "paths.weights_dir" in message
    assert f"huggingface-cli download {source}" in message
