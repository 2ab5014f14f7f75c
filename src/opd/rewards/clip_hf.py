"""L2-normalised CLIP embeddings from a transformers ``CLIPModel`` + ``CLIPProcessor``: the common
core of PickScore, CLIPScore and the LAION aesthetic predictor.

Images go through :class:`~opd.rewards.model_reward.ImageTransform` built from the processor's own
config (resize, crop, mean, std), batched on the model's device; prompts through the processor's
tokenizer with ``padding=True, truncation=True, max_length=77`` as Flow-GRPO's scorers call it
(CLIP pools the end-of-text token under a causal mask, so the padding length does not change the
embedding).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from opd.rewards.model_reward import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform, ModelReward
from opd.rewards.weights import resolve_weights


def load_clip(model: str | os.PathLike, processor: str | os.PathLike, *, what: str,
              weights_dir: str | os.PathLike | None) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from local folders resolved by
    :func:`~opd.rewards.weights.resolve_weights` (never downloads; a missing folder raises
    :class:`~opd.rewards.weights.MissingWeightsError` naming it)."""
    model_path = resolve_weights(model, what=f"{what} (CLIP model)", root=weights_dir)
    processor_path = resolve_weights(processor, what=f"{what} (CLIP processor: tokenizer + image config)",
                                     root=weights_dir)
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(model_path, local_files_only=True)
    proc = CLIPProcessor.from_pretrained(processor_path, local_files_only=True)
    return clip, proc


#: the image-processor config of openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14 (the same)
CLIP_IMAGE_CONFIG: dict[str, Any] = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                                     "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "resample": 3}
#: token ids of :func:`opd.models.random_sd3._byte_vocab_tokenizer` (bos, pad, eos) and its vocabulary bound
BYTE_VOCAB = {"vocab_size": 520, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}


def random_clip_model(seed: int = 0, projection_dim: int = 16, vocab_size: int = BYTE_VOCAB["vocab_size"],
                      bos_token_id: int = 0, pad_token_id: int = 1, eos_token_id: int = 2) -> Any:
    """A randomly initialised transformers ``CLIPModel`` — the class of every released CLIP — shrunk
    to 2 layers of width 32 (patch 32, so 224-px inputs are 49 tokens); ``logit_scale`` = ln 100 as
    in released CLIPs. For tests and stand-ins: nothing is read from disk."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": eos_token_id,
                     "bos_token_id": bos_token_id, "pad_token_id": pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 224, "patch_size": 32},
        projection_dim=projection_dim, logit_scale_init_value=math.log(100.0),
    )
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random stream
        torch.manual_seed(seed)
        return CLIPModel(config).eval()


def clip_processor(tokenizer: Any) -> Any:
    """A ``CLIPProcessor`` with the released CLIPs' image config (:data:`CLIP_IMAGE_CONFIG`) and ``tokenizer``."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    return CLIPProcessor(image_processor=CLIPImageProcessor(**CLIP_IMAGE_CONFIG), tokenizer=tokenizer)


def random_clip(seed: int = 0, projection_dim: int = 16) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` for a random-weight reward stand-in: :func:`random_clip_model`
    with a byte-level CLIP tokenizer (no BPE file needed) and the real image preprocessing."""
    import tempfile
    from pathlib import Path

    from opd.models.random_sd3 import _byte_vocab_tokenizer

    tokenizer = _byte_vocab_tokenizer(Path(tempfile.mkdtemp(prefix="opd_clip_tok_")))
    return random_clip_model(seed, projection_dim, **BYTE_VOCAB), clip_processor(tokenizer)


def features(output: Any) -> Tensor:
    """The projected embedding from ``get_{image,text}_features``: a tensor in transformers 4, an
    output object whose ``pooler_output`` holds it in transformers 5."""
    return output if isinstance(output, Tensor) else output.pooler_output


class CLIPEncoder:
    """Normalised image and text embeddings ``[b, D]`` of one CLIP model.

    Args:
        model: a transformers ``CLIPModel``.
        processor: its ``CLIPProcessor`` (``image_processor`` describes the preprocessing,
            ``tokenizer`` tokenises prompts).
        max_length: token budget of a prompt (CLIP's context, 77).
    """

    def __init__(self, model: Any, processor: Any, max_length: int = 77) -> None:
        self.model = model
        self.tokenizer = processor.tokenizer
        self.transform = ImageTransform.from_image_processor(processor.image_processor)
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixel_values(self, images: Tensor) -> Tensor:
        """``uint8 [b, 3, H, W]`` → the model's input ``[b, 3, crop, crop]``."""
        return self.transform(images.to(self.device)).to(self.dtype)

    def image_embeds(self, images: Tensor) -> Tensor:
        """``uint8 [b, 3, H, W]`` → unit-norm image embeddings ``float32 [b, D]``."""
        emb = features(self.model.get_image_features(pixel_values=self.pixel_values(images))).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def tokens(self, prompts: list[str]) -> dict[str, Tensor]:
        """Token ids and attention mask of ``prompts`` on the model's device."""
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {key: enc[key].to(self.device) for key in ("input_ids", "attention_mask")}

    def text_embeds(self, prompts: list[str]) -> Tensor:
        """Prompts → unit-norm text embeddings ``float32 [b, D]``."""
        emb = features(self.model.get_text_features(**self.tokens(prompts))).float()
        return emb / emb.norm(dim=-1, keepdim=True)


class CLIPModelReward(ModelReward):
    """A reward scored from one transformers ``CLIPModel``'s embeddings (PickScore, CLIPScore):
    building from an already-made model and the networks the runtime moves and casts."""

    encoder: CLIPEncoder

    @classmethod
    def from_model(cls, model: Any, processor: Any, *, device: str | None = None, batch_size: int = 32,
                   dtype: str = "float32") -> CLIPModelReward:
        """The reward around an already-built ``CLIPModel`` and ``CLIPProcessor`` (tests, notebooks)."""
        self = cls.__new__(cls)
        self._setup(model, processor, device, batch_size, dtype)
        return self

    def _setup(self, model: Any, processor: Any, device: str | None, batch_size: int, dtype: str) -> None:
        self.encoder = CLIPEncoder(model, processor)
        self._setup_runtime(device, batch_size, dtype)

    def networks(self) -> Sequence[nn.Module]:
        return [self.encoder.model]
