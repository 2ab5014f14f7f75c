"""ImageReward: the released checkpoint's BLIP layout (keys and shapes written out from BLIP's
``vit.py`` / ``med.py``) maps onto opd's transformers-based model, and the converted model computes
what a functional re-implementation of the original layers computes from the *original* weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opd.rewards.imagereward import (
    IMAGEREWARD_FILE,
    MAX_LENGTH,
    REWARD_MEAN,
    REWARD_STD,
    ImageReward,
    ImageRewardModel,
    convert_imagereward_state_dict,
    imagereward_configs,
    load_bert_tokenizer,
    reduced_imagereward_configs,
)
from opd.rewards.model_reward import to_uint8
from opd.rewards.weights import WEIGHTS_ENV, MissingWeightsError
from real_reward_helpers import OPENAI_MEAN, OPENAI_STD, sample_images, to_pil

#: BLIP ViT-L/16 and med_config.json (encoder_width = the ViT's width), and a reduced copy
FULL = {"width": 1024, "depth": 24, "heads": 16, "patch": 16, "image": 224, "hidden": 768, "layers": 12, "text_heads": 12,
            "intermediate": 3072, "vocab": 30524, "positions": 512}
TINY = {"width": 32, "depth": 2, "heads": 2, "patch": 16, "image": 224, "hidden": 48, "layers": 2, "text_heads": 3,
            "intermediate": 64, "vocab": 40, "positions": 64}
WORDS = ["a", "photo", "of", "cat", "dog", "red", "sign", "that", "says", "hello", "world", "two", "on", "the"]


def blip_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every key of ``ImageReward.pt`` the scoring path uses, with its shape, in BLIP's own names."""
    w, h, n = c["width"], c["hidden"], (c["image"] // c["patch"]) ** 2 + 1
    shapes = {"blip.visual_encoder.cls_token": (1, 1, w), "blip.visual_encoder.pos_embed": (1, n, w),
              "blip.visual_encoder.patch_embed.proj.weight": (w, 3, c["patch"], c["patch"]),
              "blip.visual_encoder.patch_embed.proj.bias": (w,),
              "blip.visual_encoder.norm.weight": (w,), "blip.visual_encoder.norm.bias": (w,)}
    for i in range(c["depth"]):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes |= {b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                   b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,),
                   b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                   b + "mlp.fc1.weight": (4 * w, w), b + "mlp.fc1.bias": (4 * w,),
                   b + "mlp.fc2.weight": (w, 4 * w), b + "mlp.fc2.bias": (w,)}
    t = "blip.text_encoder."
    shapes |= {t + "embeddings.word_embeddings.weight": (c["vocab"], h),
               t + "embeddings.position_embeddings.weight": (c["positions"], h),
               t + "embeddings.LayerNorm.weight": (h,), t + "embeddings.LayerNorm.bias": (h,)}
    for i in range(c["layers"]):
        b = f"{t}encoder.layer.{i}."
        for kind, kv_width in (("attention", h), ("crossattention", w)):
            shapes |= {f"{b}{kind}.self.query.weight": (h, h), f"{b}{kind}.self.query.bias": (h,),
                       f"{b}{kind}.self.key.weight": (h, kv_width), f"{b}{kind}.self.key.bias": (h,),
                       f"{b}{kind}.self.value.weight": (h, kv_width), f"{b}{kind}.self.value.bias": (h,),
                       f"{b}{kind}.output.dense.weight": (h, h), f"{b}{kind}.output.dense.bias": (h,),
                       f"{b}{kind}.output.LayerNorm.weight": (h,), f"{b}{kind}.output.LayerNorm.bias": (h,)}
        shapes |= {b + "intermediate.dense.weight": (c["intermediate"], h), b + "intermediate.dense.bias": (c["intermediate"],),
                   b + "output.dense.weight": (h, c["intermediate"]), b + "output.dense.bias": (h,),
                   b + "output.LayerNorm.weight": (h,), b + "output.LayerNorm.bias": (h,)}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((h, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        shapes |= {f"mlp.layers.{index}.weight": (fan_out, fan_in), f"mlp.layers.{index}.bias": (fan_out,)}
    return shapes


def blip_state_dict(c: dict, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the released file's layout, plus keys the scorer must ignore."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in blip_shapes(c).items():
        if device == "meta":
            state[key] = torch.empty(shape, device="meta")
        elif "norm" in key.lower() and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.2 * torch.randn(shape, generator=g)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(c["positions"])[None]
    state["blip.vision_proj.weight"] = torch.zeros(256, c["width"], device=device)
    return state


def tiny_configs(c: dict = TINY):
    """The package's reduced configs (the stand-in's builder) at the sizes of ``c``."""
    assert (c["patch"], c["image"]) == (16, 224)  # fixed by imagereward_configs
    return reduced_imagereward_configs(width=c["width"], depth=c["depth"], heads=c["heads"], hidden=c["hidden"],
                                       layers=c["layers"], text_heads=c["text_heads"], intermediate=c["intermediate"],
                                       vocab=c["vocab"], positions=c["positions"])


def reference_score(state: dict, c: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """ImageReward.score from the original weights, written from BLIP's vit.py and med.py."""
    s = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    v, t = "blip.visual_encoder.", "blip.text_encoder."

    def lin(x, name):
        return x @ s[name + ".weight"].T + s[name + ".bias"]

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps)

    def heads(x, num):
        return x.view(x.shape[0], x.shape[1], num, -1).transpose(1, 2)

    def attend(q, k, v_, num, bias=None):
        q, k, v_ = heads(q, num), heads(k, num), heads(v_, num)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + (0 if bias is None else bias)
        out = scores.softmax(-1) @ v_
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    x = F.conv2d(pixels.double(), s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=c["patch"])
    x = torch.cat([s[v + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[v + "pos_embed"]
    for i in range(c["depth"]):
        b = f"{v}blocks.{i}."
        q, k, v_ = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, v_, c["heads"]), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    y = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = ln(y, t + "embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].double()) * -10000.0
    for i in range(c["layers"]):
        b = f"{t}encoder.layer.{i}."
        a = attend(lin(y, b + "attention.self.query"), lin(y, b + "attention.self.key"),
                   lin(y, b + "attention.self.value"), c["text_heads"], pad)
        y = ln(lin(a, b + "attention.output.dense") + y, b + "attention.output.LayerNorm", 1e-12)
        a = attend(lin(y, b + "crossattention.self.query"), lin(image, b + "crossattention.self.key"),
                   lin(image, b + "crossattention.self.value"), c["text_heads"])
        y = ln(lin(a, b + "crossattention.output.dense") + y, b + "crossattention.output.LayerNorm", 1e-12)
        y = ln(lin(F.gelu(lin(y, b + "intermediate.dense")), b + "output.dense") + y, b + "output.LayerNorm", 1e-12)
    z = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        z = lin(z, f"mlp.layers.{index}")
    return ((z.squeeze(-1) - REWARD_MEAN) / REWARD_STD).float()


@pytest.fixture
def tokenizer(tmp_path):
    folder = tmp_path / "google-bert" / "bert-base-uncased"
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return load_bert_tokenizer("google-bert/bert-base-uncased", tmp_path)


def test_full_size_checkpoint_layout_maps_onto_the_model():
    """Every released key lands on a parameter of the right shape, and none is left over (meta
    tensors: no memory, no time)."""
    parts = convert_imagereward_state_dict(blip_state_dict(FULL, device="meta"))
    with torch.device("meta"):
        model = ImageRewardModel(*imagereward_configs())
    for name, part in parts.items():
        getattr(model, name).load_state_dict(part, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(shape).numel() for shape in blip_shapes(FULL).values())


def test_tokenizer_is_blips(tokenizer):
    enc = tokenizer(["a photo of a cat"], padding="max_length", truncation=True, max_length=MAX_LENGTH)
    ids = enc["input_ids"][0]
    assert len(ids) == MAX_LENGTH and ids[:7] == [2, 5, 6, 7, 5, 8, 3] and set(ids[7:]) == {0}
    base = 5 + len(WORDS)  # BLIP appends [DEC] then [ENC] after BERT's vocabulary (30522, 30523)
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [base, base + 1]


def test_converted_model_matches_the_original_layers(tokenizer):
    state = blip_state_dict(TINY)
    model = ImageRewardModel(*tiny_configs())
    for name, part in convert_imagereward_state_dict(state).items():
        getattr(model, name).load_state_dict(part, strict=True)
    reward = ImageReward.from_model(model.eval(), tokenizer, batch_size=2)
    images = sample_images(3, height=240, width=320)
    prompts = ["a photo of a cat", 'a red sign that says "hello world"', "two dogs on the sofa"]
    out = reward.score(images, prompts, [{}] * 3)
    enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    pixels = reward.transform(to_uint8(images))  # checked against ImageReward's transform below
    expected = reference_score(state, TINY, pixels, enc["input_ids"], enc["attention_mask"])
    assert out["reward"].shape == (3,)
    torch.testing.assert_close(out["reward"], expected, atol=1e-4, rtol=1e-4)
    assert out["reward"].std() > 0.01  # the three prompts/images are told apart


def test_preprocessing_is_imagerewards_transform(tokenizer):
    """ImageReward.py's ``_transform(224)`` on PIL images vs opd's batched tensor transform."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    images = sample_images(2, height=240, width=320)
    reference = torch.stack([transform(to_pil(x)) for x in images])
    reward = ImageReward.from_model(ImageRewardModel(*tiny_configs()).eval(), tokenizer)
    diff = (reward.transform(to_uint8(images)) - reference).abs()
    assert diff.max() < 0.04 and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_missing_checkpoint_fails_at_construction(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(MissingWeightsError) as err:
        ImageReward(weights_dir=tmp_path)
    message = str(err.value)
    assert "THUDM/ImageReward" in message and IMAGEREWARD_FILE in message and WEIGHTS_ENV in message


@pytest.mark.slow
def test_full_size_random_model_scores_a_batch(tokenizer):
    vision, text = imagereward_configs()
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    reward = ImageReward.from_model(ImageRewardModel(vision, text).eval(), tokenizer, batch_size=2)
    out = reward(sample_images(2, height=512, width=512), ["a photo of a cat", "a dog"])
    assert out.shape == (2,) and torch.isfinite(out).all()
