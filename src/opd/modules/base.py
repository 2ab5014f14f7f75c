"""What every opd training module does with its backbone, once: build it on first use, draw
previews with the sampler's settings, and export it (or part of it) with the EMA weights after the
non-finite check. Pre-training (:class:`opd.modules.pretrain.FlowMatchingPretrain`) trains the
whole backbone; the adapter modules (:class:`opd.modules.policy.AdapterPolicy`) a LoRA on it.

Precision (docs/precision.md): a backbone loaded in bf16 or fp16 runs its forwards under
``torch.autocast`` in that dtype (:meth:`BackboneModule.autocast`), so fp32 trainable weights on it
take low-precision matmul inputs; an fp32 backbone runs as it always did.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opd.callbacks.ema import ema_weights
from opd.models.backbone import Backbone
from opd.modules.guards import GuardedModule
from opd.sampling import generate
from opd.utils.files import replace_path


class BackboneModule(GuardedModule):
    """A module around one backbone, built by the ``backbone`` factory in :meth:`configure_model`
    (so Lightning places it, and a checkpoint needs no copy of it); ``optimizer`` is a partial the
    subclass calls on the parameters it trains; previews use ``sampler``'s guidance and shift."""

    def __init__(self, backbone: Callable[[], Backbone], sampler: Any,
                 optimizer: Callable[..., torch.optim.Optimizer], preview_prompts: Sequence[str] = ()) -> None:
        super().__init__()
        self._build_backbone = backbone
        self.backbone: Backbone | None = None
        self.sampler = sampler
        self._optimizer = optimizer
        self.preview_prompts = list(preview_prompts)

    def configure_model(self) -> None:
        """Build the backbone, once (Lightning may call this again)."""
        if self.backbone is None:
            self.backbone = self._build_backbone()

    def autocast(self) -> AbstractContextManager:
        """``torch.autocast`` in the backbone's dtype when that is bf16 or fp16, else nothing.

        Under it the fp32 trainable LoRA of a low-precision backbone computes its matmuls from bf16/fp16
        inputs (its weights, gradients and optimiser state stay fp32); Lightning's ``*-mixed`` precision
        wraps the training step in the same autocast on a GPU, so nested use changes nothing there.
        ``cache_enabled=False`` as Lightning does: inside an outer autocast the weight-cast cache would
        outlive this context, and a cast cached under ``no_grad`` (a rollout) or before an optimiser
        step would be reused by a later training forward (no gradient, or stale weights)."""
        dtype = self.backbone.dtype
        if dtype not in (torch.bfloat16, torch.float16):
            return nullcontext()
        return torch.autocast(self.backbone.device.type, dtype=dtype, cache_enabled=False)

    @torch.no_grad()
    def preview(self, num_steps: int) -> tuple[Tensor, list[str]]:
        """Images of the preview prompts (seed 0) and the prompts, for the image-grid callback."""
        with self.autocast():
            images = generate(self.backbone, self.preview_prompts, num_steps=num_steps,
                              guidance_scale=self.sampler.guidance_scale, shift=self.sampler.shift, seed=0)
        return images, self.preview_prompts

    def export_ema(self, out: Path, what: str, tensors: Iterable[tuple[str, Tensor]],
                   save: Callable[[Path], None], hint: str = "") -> None:
        """On rank 0, with the EMA weights swapped in (when an EMA callback is configured): refuse
        non-finite ``tensors`` (the weights ``save`` writes), then ``save(out)`` and say so."""
        if not self.trainer.is_global_zero:
            return
        with ema_weights(self.trainer, self):
            self.check_export(tensors, f"{what} to {out}")
            # beside it first (a hidden name: globs such as exports/step_* skip it), then moved into place:
            # a run stopped while writing leaves no truncated file that make (whose chains wait for the
            # adapter file) would take for a finished run
            partial = out.with_name(f".{out.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            save(partial)
            replace_path(partial, out)
        self.print(f"exported {what} (EMA) to {out}{hint}")
