"""Shared plumbing of the rewards that run a neural network (PickScore, HPSv2.1, CLIPScore, LAION
aesthetic, ImageReward): batching, device placement, the references' 8-bit rounding and CLIP-style
image preprocessing on tensors.

The references score *saved* images: Flow-GRPO turns samples into ``uint8`` PIL images before every
learned reward. :func:`to_uint8` does the same rounding, so a score never depends on sub-1/255
differences the references cannot see. Preprocessing then runs batched on the images' device
(:class:`ImageTransform`) instead of image by image through PIL; tests compare it with the original
processors on the same PIL image.
"""
from __future__ import annotations

import importlib
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from opd.rewards.base import Reward, check_batch

#: OpenAI CLIP's normalisation (also open_clip's default and the BLIP/ImageReward transform's)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_uint8(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] → ``uint8`` ``[B, 3, H, W]``, rounded as the references do
    (``(x · 255).round().clamp(0, 255)``)."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class ImageTransform:
    """CLIP-style preprocessing of a ``uint8 [B, 3, H, W]`` batch: bicubic resize of the short side
    to ``size`` (antialiased), centre crop to ``crop``, scale to [0, 1], normalise.

    ``resize_uint8=True`` resizes the ``uint8`` images and keeps the result in whole levels, as PIL
    and the transformers/open_clip processors do (they resize PIL images); ``False`` resizes the
    [0, 1] floats, as HPSv2's validation transform does (``ToTensor`` before ``Resize``).
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resize_uint8: bool = True

    def __call__(self, images: Tensor) -> Tensor:
        """``uint8 [B, 3, H, W]`` → ``float32 [B, 3, crop, crop]`` (normalised)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"ImageTransform takes uint8 images (see to_uint8); got {images.dtype}")
        x = images if self.resize_uint8 else images.float() / 255
        x = TF.resize(x, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [self.crop, self.crop])
        x = x.float() / 255 if self.resize_uint8 else x
        return TF.normalize(x, list(self.mean), list(self.std))

    @classmethod
    def from_image_processor(cls, processor: Any) -> ImageTransform:
        """The transform a transformers CLIP image processor describes (``size.shortest_edge``,
        ``crop_size``, ``image_mean``, ``image_std``; bicubic, as every CLIP processor config says)."""
        short = _field(processor.size, "shortest_edge")
        crop = _field(processor.crop_size, "height")
        return cls(size=int(short), crop=int(crop), mean=tuple(processor.image_mean),
                   std=tuple(processor.image_std), resize_uint8=True)


def _field(value: Any, key: str) -> Any:
    """``value[key]`` of a processor size (a dict in transformers 4, a ``SizeDict`` in 5), or
    ``value`` itself when it is a plain number."""
    if isinstance(value, (int, float)):
        return value
    try:
        return value[key]
    except (KeyError, TypeError):
        return getattr(value, key)


def require(package: str, reward: str, pip_name: str | None = None) -> ModuleType:
    """Import an optional package or raise an ImportError saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{reward} needs the `{pip_name or package}` package: pip install {pip_name or package} "
            "(or `pip install -e '.[dev]'`, which `make install` runs)"
        ) from err


class ModelReward(Reward):
    """A reward computed by networks: :meth:`score_batch` on chunks of ``batch_size`` images.

    ``score`` checks the batch, rounds it to ``uint8`` (:func:`to_uint8`), moves it and the
    networks to ``device`` (``None``: the images' own device, so each DDP rank scores on its GPU)
    and runs under ``torch.inference_mode``. Outputs are ``float32 [B]`` on CPU.
    Subclasses call :meth:`_setup_runtime` in their constructors and list their networks in
    :meth:`networks`.
    """

    device: torch.device | None = None
    batch_size: int = 32
    dtype: torch.dtype = torch.float32

    def _setup_runtime(self, device: str | None, batch_size: int, dtype: str) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"{type(self).__name__}: dtype={dtype!r}; choose one of {sorted(DTYPES)}")
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device else None
        self.batch_size = batch_size
        self.dtype = DTYPES[dtype]
        for net in self.networks():
            net.eval().requires_grad_(False).to(dtype=self.dtype)

    @abstractmethod
    def networks(self) -> Sequence[nn.Module]:
        """The modules to move to the scoring device."""

    @abstractmethod
    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images``: ``uint8 [b, 3, H, W]`` on the scoring device → ``{key: Tensor[b]}``."""

    def _place(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:  # "cuda" means this rank's current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        for net in self.networks():
            param = next(net.parameters(), None)
            if param is not None and param.device != device:
                net.to(device)

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → per-image metrics, ``float32 [B]`` on CPU."""
        check_batch(images, prompts, metadata)
        device = self.device or images.device
        self._place(device)
        pixels = to_uint8(images.detach()).to(device)
        chunks: list[dict[str, Tensor]] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                stop = start + self.batch_size
                chunks.append(self.score_batch(pixels[start:stop], prompts[start:stop], metadata[start:stop]))
        return {key: torch.cat([c[key] for c in chunks]).float().cpu() for key in chunks[0]}
