"""Stable Diffusion 3 / 3.5 through diffusers' ``StableDiffusion3Pipeline``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opd.models.backbone import Backbone, PromptEmbeds

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def looks_local(path: str) -> bool:
    """Whether ``model.path`` names a local folder (absolute, ``~``, ``./``, or not of the form
    ``org/name``) rather than a hub id."""
    return path.startswith(("/", "~", ".")) or "\\" in path or path.count("/") != 1


class SD3Backbone(Backbone):
    """SD3.5 (Medium/Large) as a :class:`Backbone`: frozen CLIP-L/G, T5-XXL (unless left out) and
    VAE, the ``SD3Transformer2DModel`` carrying the adapters.

    Prompts are encoded as ``StableDiffusion3Pipeline.encode_prompt`` does: CLIP-L and CLIP-G (77
    tokens each, their pooled outputs concatenated) and T5 padded to ``max_sequence_length`` tokens,
    which the references (Flow-GRPO, DiffusionNFT) set to 128 for SD3.5. Without T5 the pipeline puts
    ``max_sequence_length`` zero tokens in its place.

    ``gradient_checkpointing=True`` recomputes each MMDiT block's activations in the backward pass
    (diffusers' ``enable_gradient_checkpointing``): the same gradients for less memory and about one
    more forward pass of compute. It acts only where gradients are taken (the trained forwards), not
    in the rollouts.

    ``compile_blocks=True`` compiles each MMDiT block with ``torch.compile`` (regional compilation,
    :func:`opd.models.speed.compile_blocks`; ``compile_backend`` picks the backend): the same math,
    paid once in compile time on the first calls of each graph (grad or no grad, the batch shapes of
    rollouts, targets and training chunks). On one H200 it halved the distillation loop's seconds
    and cut its peak memory by a third (docs/bench/README.md). Tracing is lazy, so adapters added
    after construction are compiled with the blocks.

    Build it with :meth:`from_pretrained` or wrap an existing pipeline (:mod:`opd.models.random_sd3`
    builds random ones from configs).
    """

    def __init__(self, pipeline: Any, max_sequence_length: int = 128, gradient_checkpointing: bool = False,
                 compile_blocks: bool = False, compile_backend: str = "inductor") -> None:
        super().__init__()
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        # The text encoders are registered so that .to()/device moves reach them; they stay frozen.
        self.text_encoders = torch.nn.ModuleList(
            [m for m in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3) if m is not None]
        )
        for module in (self.vae, self.text_encoders):
            module.requires_grad_(False)
        self._pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if compile_blocks:
            from opd.models.speed import compile_blocks as compile_each_block

            compile_each_block(self.transformer, backend=compile_backend)

    def train(self, mode: bool = True) -> SD3Backbone:
        """Switch the transformer's mode; the frozen text encoders and VAE stay in eval mode (Lightning
        calls ``train()`` on the whole module at the start of fit: T5's dropout, 0.1 in T5 v1.1's config,
        would otherwise act on every prompt encoding)."""
        super().train(mode)
        self.vae.eval()
        self.text_encoders.eval()
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the transformer recomputes its blocks' activations in the backward pass."""
        return bool(getattr(self.transformer, "gradient_checkpointing", False))

    @classmethod
    def from_pretrained(cls, path: str, use_t5: bool = True, torch_dtype: str = "bfloat16",
                        max_sequence_length: int = 128, gradient_checkpointing: bool = False,
                        compile_blocks: bool = False, compile_backend: str = "inductor") -> SD3Backbone:
        """Load from a local diffusers folder or a hub id (``model.path``). T5-XXL is loaded, as the
        references (Flow-GRPO, DiffusionNFT) do, who encode SD3.5 prompts with it at
        ``max_sequence_length=128``; ``use_t5=False`` leaves it out (``text_encoder_3=None``), a memory
        option (about 9.5 GB of bfloat16 weights) that changes the conditioning: a model trained without
        T5 is not the references' setting, and must be sampled without it."""
        from diffusers import StableDiffusion3Pipeline

        kwargs: dict[str, Any] = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        local = Path(os.path.expanduser(path))
        if not local.exists() and looks_local(path):
            raise FileNotFoundError(
                f"SD3 weights not found: {local} does not exist (model.path). Download them once with "
                "`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir <dir>` (accept the "
                "licence on the model page first) and set model.path=<dir>, or OPD_WEIGHTS_DIR to the folder holding "
                "stable-diffusion-3.5-medium.")
        if local.exists() and not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"{local} is not a diffusers pipeline folder (no model_index.json); "
                                    "set model.path to the folder that holds model_index.json")
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(str(local) if local.exists() else path,
                                                            torch_dtype=resolve_dtype(torch_dtype), **kwargs)
        except OSError as err:
            raise FileNotFoundError(
                f"could not load SD3 weights from {path!r} (model.path): {err}. Download them once with "
                "`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir <dir>` "
                "and set model.path=<dir>, or set HF_HOME to a cache that holds them."
            ) from err
        return cls(pipe, max_sequence_length=max_sequence_length, gradient_checkpointing=gradient_checkpointing,
                   compile_blocks=compile_blocks, compile_backend=compile_backend)

    @property
    def pipeline(self) -> Any:
        return self._pipeline

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _, pooled, _ = self._pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(embeds.to(self.dtype), pooled.to(self.dtype))

    def decode(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return (dist.mode() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if height % (f * self.transformer.config.patch_size) or width % (f * self.transformer.config.patch_size):
            raise ValueError(f"image size {height}x{width} must be a multiple of "
                             f"{f * self.transformer.config.patch_size} for this model")
        return self.transformer.config.in_channels, height // f, width // f
