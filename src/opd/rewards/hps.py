"""HPSv2.1 (Wu et al., 2023): an open_clip ViT-H/14 fine-tuned on Human Preference Dataset v2.

Scored as the HPSv2 repository (``hpsv2/img_score.py``) and Flow-GRPO's ``hpsv2_scorer`` do: the
cosine of the L2-normalised image and text features, with no temperature (SD3.5-M ≈ 0.279 in
the DiffusionOPD paper's Table 1). Preprocessing is HPSv2's validation transform: ``ToTensor`` first, then a
bicubic resize of the short side to 224 and a centre crop on the float tensor, OpenAI CLIP
normalisation (:class:`~opd.rewards.model_reward.ImageTransform` with ``resize_uint8=False``).
The tensor resize is antialiased, torchvision's default since 0.17 and so what HPSv2's transform
does in Flow-GRPO's environment (torchvision < 0.17 resized tensors without antialiasing).

Weights: ``HPS_v2.1_compressed.pt`` of ``xswu/HPSv2`` (a ``{"state_dict": ...}`` checkpoint of the
whole CLIP model), found by :func:`~opd.rewards.weights.resolve_weights`; the architecture comes
from open_clip's ``ViT-H-14`` config and the tokenizer is open_clip's bundled BPE, so nothing else
is needed.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from opd.rewards.base import mark_stand_in
from opd.rewards.model_reward import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform, ModelReward, require
from opd.rewards.weights import resolve_weights

HPS_FILE = "HPS_v2.1_compressed.pt"
#: an open_clip model config of ViT-H-14's family, shrunk (same keys as open_clip's JSON configs):
#: the random-weight stand-in's and the tests' architecture
TINY_OPEN_CLIP_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def random_open_clip(seed: int = 0) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` — the class ``create_model('ViT-H-14')`` builds —
    of :data:`TINY_OPEN_CLIP_CFG`'s size (2 layers, width 64, 224-px input, patch 14)."""
    open_clip = require("open_clip", "HPSv2.1 reward", "open_clip_torch")
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random stream
        torch.manual_seed(seed)
        return open_clip.CLIP(**TINY_OPEN_CLIP_CFG).eval()


def load_hps_model(arch: str, checkpoint: str | os.PathLike, filename: str,
                   weights_dir: str | os.PathLike | None) -> nn.Module:
    """open_clip ``arch`` with the HPS checkpoint loaded (missing keys are an error: a partly
    random model would score silently wrong)."""
    path = resolve_weights(checkpoint, what="HPSv2.1 reward", filename=filename, root=weights_dir)
    if path.is_dir():
        path = path / filename
    open_clip = require("open_clip", "HPSv2.1 reward", "open_clip_torch")
    model = open_clip.create_model(arch, pretrained=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"HPSv2.1 reward: {path} lacks {len(missing)} weights of open_clip {arch!r} "
                           f"(e.g. {missing[:3]}); is it an HPSv2 checkpoint for {arch}?")
    if unexpected:
        raise RuntimeError(f"HPSv2.1 reward: {path} has {len(unexpected)} weights open_clip {arch!r} does not "
                           f"(e.g. {unexpected[:3]}); is it an HPSv2 checkpoint for {arch}?")
    return model


class HPSv21(ModelReward):
    """``reward = cos(image features, text features)`` of the HPSv2.1 model (≈ 0.2–0.35).

    Args:
        checkpoint: hub id / folder holding ``filename`` (or the file itself).
        filename: the checkpoint file (``HPS_v2.1_compressed.pt``; ``HPS_v2_compressed.pt`` for v2.0).
        arch: open_clip architecture (``ViT-H-14``).
        weights_dir, device, batch_size, dtype, random_weights_for_tests: as
            :class:`~opd.rewards.pickscore.PickScore`.
    """

    name = "hpsv21"

    def __init__(self, checkpoint: str = "xswu/HPSv2", filename: str = HPS_FILE, arch: str = "ViT-H-14",
                 weights_dir: str | os.PathLike | None = None, device: str | None = None,
                 batch_size: int = 32, dtype: str = "float32", random_weights_for_tests: bool = False) -> None:
        if random_weights_for_tests:
            model, tokenizer = self._random_stand_in()
        else:
            model = load_hps_model(arch, checkpoint, filename, weights_dir)
            tokenizer = require("open_clip", "HPSv2.1 reward", "open_clip_torch").get_tokenizer(arch)
        self._setup(model, tokenizer, device, batch_size, dtype)
        if random_weights_for_tests:
            mark_stand_in(self, "a 2-layer open_clip CLIP (the class of ViT-H-14) with random weights")

    @staticmethod
    def _random_stand_in() -> tuple[nn.Module, Any]:
        """HPSv2.1's architecture class, open_clip's ``CLIP``, shrunk (:func:`random_open_clip`) with
        open_clip's bundled CLIP BPE tokenizer (shipped inside the package: nothing is downloaded)."""
        open_clip = require("open_clip", "HPSv2.1 reward", "open_clip_torch")
        return random_open_clip(seed=0), open_clip.tokenizer.SimpleTokenizer()

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, *, device: str | None = None, batch_size: int = 32,
                   dtype: str = "float32") -> HPSv21:
        """An HPS reward around an already-built open_clip model and tokenizer (tests, notebooks)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, device, batch_size, dtype)
        return self

    def _setup(self, model: nn.Module, tokenizer: Any, device: str | None, batch_size: int, dtype: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.transform = ImageTransform(size=size, crop=size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                        resize_uint8=False)
        self._setup_runtime(device, batch_size, dtype)

    def networks(self) -> Sequence[nn.Module]:
        return [self.model]

    def features(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm image and text features ``float32 [b, D]``."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        pixels = self.transform(images.to(device)).to(dtype)
        image = self.model.encode_image(pixels).float()
        text = self.model.encode_text(self.tokenizer(prompts).to(device)).float()
        return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``uint8 [b, 3, H, W]`` → ``{"reward": cosine}``."""
        image, text = self.features(images, prompts)
        return {"reward": (image * text).sum(dim=-1)}
