"""The mini-world model: a pixel-space ``SD3Transformer2DModel`` and a byte-level text encoder.

Same architecture family as SD3.5 (joint attention MMDiT, adaLN, pooled projection), small
enough to train on one GPU in minutes and to run on a laptop CPU. Prompts are read byte by byte,
so the model can learn to spell the words on signs. Pixel space: latents are images scaled to
[-1, 1], ``decode`` is the inverse.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from opd.models.backbone import Backbone, PromptEmbeds

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: shards keep every file small enough to ship and to copy back from a lent GPU machine
MAX_SHARD_BYTES = 12 * 2**20


class ByteTextEncoder(nn.Module):
    """Prompt bytes → ``(embeds [B, L, dim], pooled [B, pooled_dim])``.

    Token 0 is padding, 1 a learned summary token prepended to every prompt (its output is the
    pooled vector), bytes map to ``2 + byte``. Padding outputs are zeroed so that they carry no
    information into the joint attention.
    """

    def __init__(self, dim: int = 256, num_layers: int = 2, num_heads: int = 4, max_length: int = 48,
                 pooled_dim: int = 256) -> None:
        super().__init__()
        self.max_length = max_length
        self.tokens = nn.Embedding(258, dim, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(max_length + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, pooled_dim)

    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> Tensor:
        """``[B, max_length + 1]`` token ids; prompts longer than ``max_length`` bytes are cut (the
        first cut is logged as a warning, once per encoder: the model never sees the rest)."""
        ids = torch.zeros(len(prompts), self.max_length + 1, dtype=torch.long)
        ids[:, 0] = 1
        for i, prompt in enumerate(prompts):
            data = list(prompt.encode("utf-8"))
            if len(data) > self.max_length and not getattr(self, "_warned_cut", False):
                self._warned_cut = True
                log.warning("mini text encoder: a prompt of %d bytes is cut to its first %d (text_encoder.max_length"
                            "=%d; the model never sees the rest): %r → %r. Later cuts are not reported.",
                            len(data), self.max_length, self.max_length, prompt[:80],
                            bytes(data[: self.max_length]).decode("utf-8", "replace"))
            data = data[: self.max_length]
            ids[i, 1 : 1 + len(data)] = torch.tensor(data, dtype=torch.long) + 2
        return ids.to(device)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        pad = ids == 0
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        h = self.norm(self.layers(h, src_key_padding_mask=pad))
        h = h.masked_fill(pad.unsqueeze(-1), 0.0)
        return h, self.pool(h[:, 0])


def default_transformer_config(image_size: int = 64) -> dict[str, Any]:
    """The shipped mini model's transformer (≈ 12M parameters at these settings)."""
    return {"sample_size": image_size, "patch_size": 4, "in_channels": 3, "out_channels": 3, "num_layers": 5,
                "attention_head_dim": 64, "num_attention_heads": 4, "joint_attention_dim": 256,
                "caption_projection_dim": 256, "pooled_projection_dim": 256, "pos_embed_max_size": image_size // 4,
                "qk_norm": "rms_norm"}


class MiniBackbone(Backbone):
    """Pixel-space SD3-architecture model of the mini world."""

    def __init__(self, transformer: dict[str, Any] | None = None, text_encoder: dict[str, Any] | None = None,
                 image_size: int = 64) -> None:
        from diffusers import SD3Transformer2DModel

        super().__init__()
        self.config = {"transformer": dict(transformer or default_transformer_config(image_size)),
                       "text_encoder": dict(text_encoder or {}), "image_size": image_size}
        self.transformer = SD3Transformer2DModel(**self.config["transformer"])
        self.text_encoder = ByteTextEncoder(**self.config["text_encoder"])
        self.image_size = image_size

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Not wrapped in ``no_grad``: pre-training trains the text encoder with the transformer."""
        embeds, pooled = self.text_encoder(self.text_encoder.tokenize(prompts, self.device))
        return PromptEmbeds(embeds.to(self.dtype), pooled.to(self.dtype))

    def decode(self, latents: Tensor) -> Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        return images * 2 - 1

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        patch = self.transformer.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} must be a multiple of the patch size {patch}")
        return self.transformer.config.in_channels, height, width

    # -- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (base weights only, adapters excluded)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()
                 if "lora_" not in k}
        for old in directory.glob("model*.safetensors"):
            old.unlink()
        shards: list[dict[str, Tensor]] = [{}]
        for key, value in state.items():
            if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + value.nbytes > MAX_SHARD_BYTES:
                shards.append({})
            shards[-1][key] = value
        for i, shard in enumerate(shards):
            name = WEIGHTS_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt", "opd": "mini"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, torch_dtype: str | torch.dtype = "float32") -> MiniBackbone:
        """Load a folder written by :meth:`save_pretrained`; errors name the missing/bad file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from opd.models.sd3 import resolve_dtype

        directory = Path(directory)
        files = sorted(directory.glob("model*.safetensors"))
        hint = ("the shipped base lives in models/mini_base/; train one with "
                "`python -m opd.train experiment=pretrain_mini`")
        if not (directory / CONFIG_FILE).is_file() or not files:
            raise FileNotFoundError(f"mini model: {directory} holds no {CONFIG_FILE} + {WEIGHTS_FILE} "
                                    f"(model.path={directory}); {hint}")
        config = json.loads((directory / CONFIG_FILE).read_text())
        model = cls(**config)
        state: dict[str, Tensor] = {}
        for file in files:
            try:
                state.update(load_file(str(file)))
            except (SafetensorError, OSError) as err:
                raise ValueError(f"mini model: {file} is not a readable safetensors file ({err}); "
                                 f"restore it from git or retrain; {hint}") from err
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            missing, unexpected = [str(err).splitlines()[1].strip()], []
        if missing or unexpected:
            raise ValueError(f"mini model: the weights in {directory} do not match {directory / CONFIG_FILE} "
                             f"(missing/mismatched {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(resolve_dtype(torch_dtype))
