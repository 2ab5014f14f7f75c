"""Flow-matching pre-training of a base model on (image, caption) pairs (the mini base)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opd.models.backbone import Backbone
from opd.modules.base import BackboneModule
from opd.objectives.flow_matching import FlowMatchingLoss


def lr_factor(step: int, warmup_steps: int = 0, cooldown_steps: int = 0, total_steps: int | None = None) -> float:
    """Warm-up, constant, cool-down: the learning rate's factor before optimiser step ``step``
    (0-based). It rises linearly over ``warmup_steps`` (``(step + 1) / warmup_steps``), stays at 1,
    and with ``cooldown_steps`` falls linearly to 0 over the last ``cooldown_steps`` of
    ``total_steps`` (the last step still moves: ``1 / cooldown_steps``)."""
    factor = min(1.0, (step + 1) / max(1, warmup_steps))
    if cooldown_steps and total_steps is not None:
        factor = min(factor, max(0.0, (total_steps - step) / cooldown_steps))
    return factor


class FlowMatchingPretrain(BackboneModule):
    """Trains every weight of the backbone (transformer and text encoder) with the flow-matching
    loss; captions are dropped to ``""`` with probability ``cond_dropout`` so CFG works.

    At the end of training the EMA weights are exported with ``save_pretrained`` to
    ``<output_dir>/model`` (the folder ``model.path`` points at). A non-finite loss or gradient stops
    the run before the optimiser step; checkpoints carry the random-number states, and the scene
    stream restarts where it stopped, so a resumed run continues exactly.
    """

    def __init__(self, backbone: Callable[[], Backbone], objective: FlowMatchingLoss, sampler: Any,
                 optimizer: Callable[..., torch.optim.Optimizer], cond_dropout: float = 0.1,
                 warmup_steps: int = 0, cooldown_steps: int = 0, preview_prompts: Sequence[str] = (),
                 export_every_n_steps: int | None = None) -> None:
        super().__init__(backbone, sampler, optimizer, preview_prompts)
        self.objective = objective
        self.cond_dropout = cond_dropout
        self.warmup_steps = warmup_steps
        self.cooldown_steps = cooldown_steps
        self.export_every_n_steps = export_every_n_steps

    def ema_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.backbone.named_parameters() if p.requires_grad}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        prompts = [p if torch.rand(()) >= self.cond_dropout else "" for p in batch["prompts"]]
        x0 = self.backbone.encode_images(batch["images"])
        loss, metrics = self.objective(self.backbone, x0, self.backbone.encode_prompts(prompts))
        self.note_loss("the flow-matching loss (train/loss; lower module.optimizer.lr or check the data)", loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({k: v for k, v in metrics.items() if torch.isfinite(v)})
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The non-finite guard: a non-finite loss or gradient stops the run before the weights change
        (with an fp16 gradient scaler, inf gradients are the scaler's business: only the loss counts)."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                self.note_nonfinite("the gradient norm", torch.nn.utils.get_total_norm(grads))
        self.raise_if_nonfinite()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self._optimizer(self.parameters())
        total = self.trainer.max_steps if self.cooldown_steps else None
        if self.cooldown_steps and (total is None or total < self.cooldown_steps):
            raise ValueError(f"module.cooldown_steps={self.cooldown_steps} needs trainer.max_steps >= it "
                             f"(got {total}): the learning rate decays to 0 over the last cooldown_steps steps")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_factor, warmup_steps=self.warmup_steps, cooldown_steps=self.cooldown_steps,
                               total_steps=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Snapshots of the EMA weights along the way, to pick a base of the wanted strength."""
        step = self.global_step
        if self.export_every_n_steps and step % self.export_every_n_steps == 0:
            self.export(Path(self.trainer.default_root_dir) / "exports" / f"step_{step:06d}")

    def on_train_end(self) -> None:
        self.export(Path(self.trainer.default_root_dir) / "model")

    def export(self, out: Path) -> None:
        """Write the EMA weights with ``save_pretrained`` (rank 0)."""
        self.export_ema(out, "the model", self.backbone.named_parameters(), self.backbone.save_pretrained,
                        f" (use model.path={out})")
