"""The one small interface every text-to-image flow model implements.

Rollouts, objectives and Lightning modules only talk to a :class:`Backbone`; SD3.5 (diffusers)
and the mini-world model are two implementations. The trainable/frozen LoRA adapters live on
``backbone.transformer`` (see :mod:`opd.models.lora`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class PromptEmbeds:
    """Text conditioning: ``embeds [B, L, D]`` (token sequence) and ``pooled [B, P]``."""

    embeds: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx) -> PromptEmbeds:
        return PromptEmbeds(self.embeds[idx], self.pooled[idx])

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return PromptEmbeds(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def repeat_interleave(self, k: int) -> PromptEmbeds:
        """Each prompt ``k`` times in a row (GRPO groups)."""
        return PromptEmbeds(self.embeds.repeat_interleave(k, 0), self.pooled.repeat_interleave(k, 0))

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([i.embeds for i in items]), torch.cat([i.pooled for i in items]))


class Backbone(nn.Module, ABC):
    """A flow-matching text-to-image model: prompts → conditioning, velocity, latents ↔ images."""

    #: the denoising network (an ``SD3Transformer2DModel``); LoRA adapters attach here
    transformer: nn.Module

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Encode ``B`` prompts (no grad); the empty prompt ``""`` is the CFG negative."""

    def velocity(self, x: Tensor, sigma: Tensor, cond: PromptEmbeds) -> Tensor:
        """``v(x, σ, c)``: ``x [B, C, H, W]``, ``sigma [B]`` (σ ∈ [0, 1], passed as ``1000·σ``)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        return self.transformer(
            hidden_states=x,
            timestep=sigma * 1000.0,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in [0, 1]."""

    @abstractmethod
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → latents ``x0`` (for flow-matching training)."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of an ``height × width`` image."""

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype
