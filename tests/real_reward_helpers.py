"""Builders shared by the real-scale reward tests: reduced-size models of the *same* classes as the
released checkpoints (transformers CLIP, open_clip CLIP), the real CLIP BPE tokenizer rebuilt from
open_clip's bundled vocabulary, and test images. Nothing is downloaded."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

from opd.rewards.clip_hf import CLIP_IMAGE_CONFIG, random_clip_model
from opd.rewards.hps import TINY_OPEN_CLIP_CFG, random_open_clip
from opd.rewards.model_reward import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["CLIP_IMAGE_CONFIG", "OPENAI_MEAN", "OPENAI_STD", "TINY_OPEN_CLIP_CFG", "clip_processor", "clip_tokenizer",
           "sample_images", "tiny_clip", "tiny_open_clip", "to_pil"]

OPENAI_MEAN = OPENAI_CLIP_MEAN
OPENAI_STD = OPENAI_CLIP_STD


@lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers' ``CLIPTokenizer`` with CLIP's real 49,408-token BPE (open_clip ships it)."""
    pytest.importorskip("open_clip", reason="open_clip_torch (the `dev` extra) provides CLIP's BPE vocabulary")
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def clip_processor():
    from opd.rewards.clip_hf import clip_processor as build

    return build(clip_tokenizer())


def tiny_clip(projection_dim: int = 16, seed: int = 0):
    """The package's reduced random ``CLIPModel`` (2 layers, width 32, 224-px images; the reward
    stand-ins' architecture) with CLIP's full 49,408-token vocabulary and its real token ids."""
    return random_clip_model(seed, projection_dim, vocab_size=49408, bos_token_id=49406, pad_token_id=49407,
                             eos_token_id=49407)


def tiny_open_clip(seed: int = 0):
    """The package's reduced random open_clip ``CLIP`` (the class ``create_model('ViT-H-14')`` builds),
    2 layers of width 64, 224-px input, patch 14 (:data:`TINY_OPEN_CLIP_CFG`)."""
    pytest.importorskip("open_clip", reason="HPSv2.1 needs open_clip_torch (the `dev` extra)")
    return random_open_clip(seed)


def sample_images(num: int = 3, height: int = 200, width: int = 300, seed: int = 0) -> torch.Tensor:
    """``[num, 3, H, W]`` in [0, 1]: smooth colour fields with sharp bars (edges stress resizing)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(num, 3, 6, 8, generator=g)
    images = torch.nn.functional.interpolate(base, size=(height, width), mode="bicubic", align_corners=False)
    images[:, :, height // 4: height // 2, width // 3: width // 3 + 12] = 1.0
    images[:, 1, -20:, :] = 0.0
    return images.clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] → PIL RGB, rounded as the references round."""
    array = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))
