"""Randomly initialised SD3 pipelines built from configs (no download): tests, smoke runs, dry runs and
benchmarks of the real-scale code paths on machines without the weights.

One code path builds them all, :func:`random_sd3_pipeline`: the MMDiT (``SD3Transformer2DModel``),
CLIP-L and CLIP-G (``CLIPTextModelWithProjection``), optionally T5 (``T5EncoderModel``) and the VAE
(``AutoencoderKL``), each from a plain dict of its constructor / config arguments, with tokenizers that
need no files:

* ``model=sd35_medium_random`` (:func:`random_sd3_backbone`): SD3.5-Medium's real sizes, T5 included
  (conf/model/sd35_medium_random.yaml says where each number comes from) — memory and speed of the
  real model without its weights;
* ``model=sd3_tiny_random`` (:func:`tiny_sd3_backbone`): the toy configuration diffusers' own SD3
  tests use, no T5 — the CPU tests.

The CLIP tokenizers get a byte-level vocabulary (no merges) and T5 a character-level one; enough for
the text encoders to see distinct prompts, and every id is below the real vocabulary sizes.
:func:`parameter_counts` counts a configuration's parameters on the meta device (nothing allocated).
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opd.models.sd3 import SD3Backbone, resolve_dtype

#: the text encoders' model families, in the pipeline's order (text_encoder, _2, _3)
TEXT_ENCODERS = ("clip_l", "clip_g", "t5")
#: the CLIP tokenizers' length (the pipeline reads it as ``tokenizer_max_length``)
CLIP_MAX_LENGTH = 77

#: diffusers' SD3 pipeline-test sizes (``tiny_sd3_pipeline``; ``sample_size`` is set per call)
TINY_TRANSFORMER = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
                    "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
                    "pooled_projection_dim": 64, "out_channels": 4}
TINY_CLIP = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_size": 32, "intermediate_size": 37,
             "layer_norm_eps": 1e-5, "num_attention_heads": 4, "num_hidden_layers": 5, "vocab_size": 520,
             "hidden_act": "gelu", "projection_dim": 32, "max_position_embeddings": 77}
TINY_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (4,), "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 1, "use_quant_conv": False, "use_post_quant_conv": False,
            "shift_factor": 0.0609, "scaling_factor": 1.5035}


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
        return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=CLIP_MAX_LENGTH)
    except TypeError:  # transformers 4.x: files
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!",
                             model_max_length=CLIP_MAX_LENGTH)


def _char_t5_tokenizer(model_max_length: int = 512) -> Any:
    """A T5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended, SentencePiece's
    ``▁`` word marker) whose pieces are single characters: the real T5 vocabulary is a SentencePiece
    model file, which a build without downloads does not have."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _byte_level_chars()] + [("▁" + c, -2.5) for c in _byte_level_chars()]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _plain(value: Any) -> Any:
    """An OmegaConf node (Hydra passes nested config dicts as such) as plain Python containers."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating tensors in ``dtype``: a bfloat16 model is initialised in bfloat16, never first
    in float32 (which would double the memory a dry run records while building it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_components(transformer: Mapping[str, Any], vae: Mapping[str, Any], clip_l: Mapping[str, Any],
                     clip_g: Mapping[str, Any], t5: Mapping[str, Any] | None = None,
                     torch_dtype: str | torch.dtype = "float32") -> dict[str, nn.Module]:
    """The networks of an SD3 pipeline with random weights, from their configs, on the current default
    device (``with torch.device("meta")``: nothing allocated; inside Lightning's ``configure_model``:
    the run's GPU): ``transformer`` (``SD3Transformer2DModel`` arguments), ``vae`` (``AutoencoderKL``),
    ``clip_l`` / ``clip_g`` (``CLIPTextConfig`` fields), ``t5`` (``T5Config`` fields; ``None``: none)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    dtype = resolve_dtype(torch_dtype)
    with _default_dtype(dtype):  # the order fixes which random numbers each network gets
        parts: dict[str, nn.Module] = {
            "transformer": SD3Transformer2DModel(**_plain(transformer)),
            "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**_plain(clip_l))),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**_plain(clip_g))),
            "vae": AutoencoderKL(**_plain(vae)),
        }
        if t5 is not None:
            parts["t5"] = T5EncoderModel(T5Config(**_plain(t5)))
    for module in parts.values():
        # a few tensors are made in float32 whatever the default (the MMDiT's positional table): cast them
        # as from_pretrained(torch_dtype=...) does
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)
    if dtype == torch.float16 and "t5" in parts:  # as transformers loads T5 in float16: its `wo` kept in float32
        for name, module in parts["t5"].named_modules():
            if name.split(".")[-1] in (parts["t5"]._keep_in_fp32_modules or ()):
                module.float()
    return parts


def random_sd3_pipeline(transformer: Mapping[str, Any], vae: Mapping[str, Any], clip_l: Mapping[str, Any],
                        clip_g: Mapping[str, Any], t5: Mapping[str, Any] | None = None,
                        scheduler: Mapping[str, Any] | None = None, seed: int = 0,
                        torch_dtype: str | torch.dtype = "float32") -> Any:
    """A ``StableDiffusion3Pipeline`` with random weights built from configs (:func:`build_components`;
    ``t5=None``: no T5, as ``from_pretrained(text_encoder_3=None)``); ``scheduler``:
    ``FlowMatchEulerDiscreteScheduler`` arguments (default shift 3.0, SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    parts = build_components(transformer, vae, clip_l, clip_g, t5, torch_dtype)
    tokenizer = _byte_vocab_tokenizer(Path(tempfile.mkdtemp(prefix="opd_tok_")))
    encoder_3 = parts.get("t5")
    return StableDiffusion3Pipeline(
        transformer=parts["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(**(_plain(scheduler) or {"shift": 3.0})), vae=parts["vae"],
        text_encoder=parts["clip_l"].eval(), tokenizer=tokenizer, text_encoder_2=parts["clip_g"].eval(),
        tokenizer_2=tokenizer, text_encoder_3=None if encoder_3 is None else encoder_3.eval(),
        tokenizer_3=None if encoder_3 is None else _char_t5_tokenizer(),
    )


def random_sd3_backbone(transformer: Mapping[str, Any], vae: Mapping[str, Any], clip_l: Mapping[str, Any],
                        clip_g: Mapping[str, Any], t5: Mapping[str, Any] | None = None,
                        scheduler: Mapping[str, Any] | None = None, use_t5: bool = True, seed: int = 0,
                        image_size: int = 512, torch_dtype: str = "bfloat16", max_sequence_length: int = 128,
                        gradient_checkpointing: bool = False, compile_blocks: bool = False,
                        compile_backend: str = "inductor") -> SD3Backbone:
    """:class:`SD3Backbone` around :func:`random_sd3_pipeline` (``model=sd35_medium_random``): the
    arguments of ``model=sd35_medium`` (``use_t5``, ``torch_dtype``, ``max_sequence_length``,
    ``image_size``, ``gradient_checkpointing``, ``compile_blocks``, ``compile_backend``) plus the
    networks' configs in place of ``path``."""
    pipe = random_sd3_pipeline(transformer, vae, clip_l, clip_g, t5 if use_t5 else None, scheduler, seed, torch_dtype)
    backbone = SD3Backbone(pipe, max_sequence_length=max_sequence_length,
                           gradient_checkpointing=gradient_checkpointing, compile_blocks=compile_blocks,
                           compile_backend=compile_backend)
    backbone.image_size = image_size
    return backbone


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32) -> Any:
    """A ``StableDiffusion3Pipeline`` with toy-sized random CLIP-L/G, transformer and VAE, no T5."""
    return random_sd3_pipeline({**TINY_TRANSFORMER, "sample_size": sample_size},
                               {**TINY_VAE, "sample_size": sample_size}, TINY_CLIP, TINY_CLIP, seed=seed)


def tiny_sd3_backbone(seed: int = 0, image_size: int = 32, max_sequence_length: int = 256,
                      gradient_checkpointing: bool = False, compile_blocks: bool = False,
                      compile_backend: str = "inductor") -> SD3Backbone:
    """:class:`SD3Backbone` around :func:`tiny_sd3_pipeline` (float32, CPU; ``model=sd3_tiny_random``).
    No T5: ``max_sequence_length`` only sets how many zero T5 tokens the pipeline appends (256 is
    ``StableDiffusion3Pipeline``'s own default, so that the tests compare like with like)."""
    backbone = SD3Backbone(tiny_sd3_pipeline(seed, image_size), max_sequence_length=max_sequence_length,
                           gradient_checkpointing=gradient_checkpointing, compile_blocks=compile_blocks,
                           compile_backend=compile_backend)
    backbone.image_size = image_size
    return backbone


def parameter_counts(transformer: Mapping[str, Any], vae: Mapping[str, Any], clip_l: Mapping[str, Any],
                     clip_g: Mapping[str, Any], t5: Mapping[str, Any] | None = None,
                     **_: Any) -> dict[str, dict[str, int]]:
    """``{network: {"parameters": n, "buffers": m}}`` of a configuration (the keyword arguments of
    :func:`random_sd3_backbone`; others are ignored), counted on the meta device: nothing is allocated,
    so the full-size model counts in a second on any machine. ``buffers`` are the persistent ones
    (saved with the weights: the MMDiT's positional-embedding table)."""
    with torch.device("meta"):
        parts = build_components(transformer, vae, clip_l, clip_g, t5)
    out = {}
    for name, module in parts.items():
        persistent = module.state_dict().keys() - dict(module.named_parameters()).keys()
        buffers = dict(module.named_buffers())
        out[name] = {"parameters": sum(p.numel() for p in module.parameters()),
                     "buffers": sum(buffers[k].numel() for k in persistent if k in buffers)}
    return out
