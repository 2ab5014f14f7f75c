"""ImageReward (Xu et al., 2023): a BLIP-based human-preference reward model.

The scoring path of THUDM's ``ImageReward.score``, rebuilt from transformers' BLIP components:

1. the image (bicubic resize to 224, centre crop, OpenAI CLIP normalisation) goes through BLIP's
   ViT-L/16 (24 blocks, width 1024, pre-norm, final LayerNorm, eps 1e-6) → ``[b, 197, 1024]``;
2. the prompt, tokenised by BERT's uncased WordPiece (``[CLS] … [SEP]``, padded to 35 tokens, the
   ``[CLS]`` id *not* replaced by ``[ENC]``), goes through BLIP's BERT-base text encoder whose every
   layer cross-attends to all image tokens (``med_config.json``: 12 layers, width 768,
   ``encoder_width`` 1024, vocabulary 30524 = BERT's + ``[DEC]`` + ``[ENC]``);
3. the first token's final state → the improved-aesthetic-predictor MLP (768 → 1024 → 128 → 64 →
   16 → 1) → ``(s − 0.16717362830052426) / 1.0333394966054072`` (the repository's constants).

``transformers.BlipVisionModel`` is BLIP's ViT with renamed parameters and
``transformers.BlipTextModel`` (built with cross-attention, run in bidirectional mode) is BLIP's
``med.BertModel`` with identical names; :func:`convert_imagereward_state_dict` maps the released
``ImageReward.pt`` onto them. The tests check that mapping numerically against a functional
re-implementation of the original ViT and BERT layers.

Weights: ``ImageReward.pt`` of ``THUDM/ImageReward`` and the tokenizer of
``google-bert/bert-base-uncased``, found by :func:`~opd.rewards.weights.resolve_weights`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from opd.rewards.aesthetic import AestheticHead
from opd.rewards.base import mark_stand_in
from opd.rewards.model_reward import ImageTransform, ModelReward
from opd.rewards.weights import resolve_weights

IMAGEREWARD_FILE = "ImageReward.pt"
#: ImageReward's normalisation of the MLP output (``ImageReward.py``)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: the prompt's token budget in ``ImageReward.score``
MAX_LENGTH = 35


def imagereward_configs() -> tuple[Any, Any]:
    """``(BlipVisionConfig, BlipTextConfig)`` of ImageReward-v1.0 (BLIP ViT-L + ``med_config.json``)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                          hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
                          is_decoder=True)  # builds the cross-attention blocks; run with is_decoder=False
    return vision, text


def reduced_imagereward_configs(width: int = 32, depth: int = 2, heads: int = 2, hidden: int = 48, layers: int = 2,
                                text_heads: int = 3, intermediate: int = 64, vocab: int = 40,
                                positions: int = 64) -> tuple[Any, Any]:
    """:func:`imagereward_configs` shrunk (same patch 16 at 224 px, same activations and norms):
    ViT ``width``×``depth`` with ``heads``, BERT ``hidden``×``layers`` cross-attending the ViT."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision, text = imagereward_configs()
    vision = BlipVisionConfig(**{**vision.to_dict(), "hidden_size": width, "intermediate_size": 4 * width,
                                 "num_hidden_layers": depth, "num_attention_heads": heads})
    text = BlipTextConfig(**{**text.to_dict(), "hidden_size": hidden, "encoder_hidden_size": width,
                             "intermediate_size": intermediate, "num_hidden_layers": layers,
                             "num_attention_heads": text_heads, "vocab_size": vocab,
                             "max_position_embeddings": positions, "bos_token_id": None, "sep_token_id": None})
    return vision, text


def char_bert_tokenizer() -> Any:
    """A BERT uncased WordPiece tokenizer whose vocabulary is ASCII letters, digits and punctuation
    (each also as a ``##`` continuation), so any English prompt tokenises character by character;
    plus BLIP's ``[DEC]`` and ``[ENC]`` as :func:`load_bert_tokenizer` adds them. For stand-ins."""
    import string

    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    try:  # transformers >= 5 takes the vocabulary itself
        tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})
    except TypeError:  # transformers 4.x: a vocab.txt
        import tempfile
        from pathlib import Path

        file = Path(tempfile.mkdtemp(prefix="opd_bert_tok_")) / "vocab.txt"
        file.write_text("\n".join(tokens) + "\n")
        tokenizer = BertTokenizer(str(file))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head → the *unnormalised* score ``[b]``."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticHead(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask, is_decoder=False)
        return self.head(out.last_hidden_state[:, 0])


#: BLIP ViT block (timm naming) → transformers ``BlipEncoderLayer``
_BLOCK_RENAMES = (
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.", "mlp."),
)


def _rename_vision(key: str) -> str:
    """A BLIP ``visual_encoder`` key → its ``BlipVisionModel`` name (unknown keys pass through, so
    a strict load reports them)."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}
    if key in fixed:
        return fixed[key]
    if key.startswith("patch_embed.proj."):
        return "embeddings.patch_embedding." + key.removeprefix("patch_embed.proj.")
    if key.startswith("norm."):
        return "post_layernorm." + key.removeprefix("norm.")
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                return f"encoder.layers.{index}.{new}{rest.removeprefix(old)}"
    return key


def convert_imagereward_state_dict(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split ``ImageReward.pt`` into state dicts for :class:`ImageRewardModel`'s ``vision``, ``text``
    and ``head``. Keys the scoring path does not use (projections, ``position_ids``) are dropped."""
    out: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            out["vision"][_rename_vision(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            out["head"][key.removeprefix("mlp.")] = value
    return out


def load_imagereward_model(checkpoint: str | os.PathLike, filename: str,
                           weights_dir: str | os.PathLike | None) -> ImageRewardModel:
    """:class:`ImageRewardModel` with the released weights (every parameter must be present)."""
    path = resolve_weights(checkpoint, what="ImageReward reward", filename=filename, root=weights_dir)
    if path.is_dir():
        path = path / filename
    state = torch.load(path, map_location="cpu", weights_only=True)
    parts = convert_imagereward_state_dict(state.get("state_dict", state))
    model = ImageRewardModel(*imagereward_configs())
    for name, part in parts.items():
        try:
            getattr(model, name).load_state_dict(part, strict=True)
        except RuntimeError as err:
            raise RuntimeError(f"ImageReward reward: {path} does not fit the ImageReward-v1.0 {name} "
                               f"architecture: {err}") from err
    return model


def load_bert_tokenizer(source: str | os.PathLike, weights_dir: str | os.PathLike | None) -> Any:
    """BLIP's tokenizer: BERT uncased WordPiece plus ``[DEC]`` (bos) and ``[ENC]``."""
    path = resolve_weights(source, what="ImageReward reward (BERT tokenizer)", root=weights_dir)
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(ModelReward):
    """``reward = (MLP(BLIP text-image [CLS] state) − 0.1672) / 1.0333`` (SD3.5-M ≈ 0.85).

    Args:
        checkpoint: hub id / folder holding ``filename`` (or the file itself).
        filename: ``ImageReward.pt``.
        tokenizer: hub id / folder of BERT's uncased tokenizer.
        weights_dir, device, batch_size, dtype, random_weights_for_tests: as
            :class:`~opd.rewards.pickscore.PickScore`.
    """

    name = "imagereward"

    def __init__(self, checkpoint: str = "THUDM/ImageReward", filename: str = IMAGEREWARD_FILE,
                 tokenizer: str = "google-bert/bert-base-uncased", weights_dir: str | os.PathLike | None = None,
                 device: str | None = None, batch_size: int = 32, dtype: str = "float32",
                 random_weights_for_tests: bool = False) -> None:
        if random_weights_for_tests:
            model, bert_tokenizer = self._random_stand_in()
            self._setup(model, bert_tokenizer, device, batch_size, dtype)
            mark_stand_in(self, "a 2+2-layer ImageRewardModel (BLIP ViT + cross-attending BERT + MLP) with "
                                "random weights")
            return
        model = load_imagereward_model(checkpoint, filename, weights_dir)
        self._setup(model, load_bert_tokenizer(tokenizer, weights_dir), device, batch_size, dtype)

    @staticmethod
    def _random_stand_in() -> tuple[ImageRewardModel, Any]:
        """:class:`ImageRewardModel` of :func:`reduced_imagereward_configs` (its vocabulary sized to
        :func:`char_bert_tokenizer`'s) with random weights. Nothing is read from disk."""
        tokenizer = char_bert_tokenizer()
        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random stream
            torch.manual_seed(0)
            model = ImageRewardModel(*reduced_imagereward_configs(vocab=len(tokenizer))).eval()
        return model, tokenizer

    @classmethod
    def from_model(cls, model: ImageRewardModel, tokenizer: Any, *, device: str | None = None,
                   batch_size: int = 32, dtype: str = "float32") -> ImageReward:
        """An ImageReward around an already-built model and tokenizer (tests, notebooks)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, device, batch_size, dtype)
        return self

    def _setup(self, model: ImageRewardModel, tokenizer: Any, device: str | None, batch_size: int,
               dtype: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        size = model.vision.config.image_size
        self.transform = ImageTransform(size=size, crop=size)
        self._setup_runtime(device, batch_size, dtype)

    def networks(self) -> Sequence[nn.Module]:
        return [self.model]

    def tokens(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``uint8 [b, 3, H, W]`` → ``{"reward": normalised ImageReward}``."""
        param = next(self.model.parameters())
        pixels = self.transform(images.to(param.device)).to(param.dtype)
        raw = self.model(pixels, **self.tokens(prompts, param.device)).float()
        return {"reward": (raw - REWARD_MEAN) / REWARD_STD}
