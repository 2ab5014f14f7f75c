"""Randomly initialised SD3 pipelines built from configs (no download): tests, smoke runs and
benchmarks of the real-scale code paths on machines without the weights.

``tiny_sd3_pipeline`` mirrors the toy configuration diffusers' own SD3 tests use; the CLIP
tokenizers get a byte-level vocabulary written to a temporary folder (no merges), which is enough
for the text encoders to see distinct prompts.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from opd.models.sd3 import SD3Backbone


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    shifted, n = {}, 0
    for b in range(256):
        if b not in keep:
            shifted[b] = 256 + n
            n += 1
    return [chr(b if b in keep else shifted[b]) for b in range(256)]


def _byte_vocab_tokenizer(directory: Path) -> Any:
    """A CLIP tokenizer whose vocabulary is every byte (with and without ``</w>``), no merges."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in _byte_level_chars():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    try:  # transformers >= 5: tokenizers-backed, takes the vocabulary directly
        return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)
    except TypeError:  # transformers 4.x: files
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!",
                             model_max_length=77)


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32) -> Any:
    """A ``StableDiffusion3Pipeline`` with toy-sized random CLIP-L/G, transformer and VAE, no T5."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=520,
                          hidden_act="gelu", projection_dim=32, max_position_embeddings=77)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip)
    vae = AutoencoderKL(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    tok_dir = Path(tempfile.mkdtemp(prefix="opd_tok_"))
    tokenizer = _byte_vocab_tokenizer(tok_dir)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    return pipe


def tiny_sd3_backbone(seed: int = 0, image_size: int = 32) -> SD3Backbone:
    """:class:`SD3Backbone` around :func:`tiny_sd3_pipeline` (float32, CPU; ``model=sd3_tiny_random``)."""
    backbone = SD3Backbone(tiny_sd3_pipeline(seed, image_size))
    backbone.image_size = image_size
    return backbone
