"""Sample the module's preview prompts every N steps: a PNG grid on disk and in the logger."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from PIL import Image

from opd.callbacks.ema import ema_weights
from opd.utils.grid import caption_grid


class ImageGrid(pl.Callback):
    """Calls ``pl_module.preview(num_steps) -> (images [B,3,H,W], captions)`` with EMA weights,
    writes ``<output_dir>/images/step_XXXXXX.png`` and logs the grid as ``preview`` to every logger that
    takes images: TensorBoard (``experiment.add_image``) and W&B (``log_image``, ``logger=wandb``)."""

    def __init__(self, every_n_steps: int = 500, num_steps: int = 20, num_cols: int = 8, at_start: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.num_steps = num_steps
        self.num_cols = num_cols

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and self.at_start:  # the starting point, to compare the end with
            self.draw(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        if not trainer.is_global_zero:
            return None
        was_training = pl_module.training
        pl_module.eval()
        with ema_weights(trainer, pl_module):
            images, captions = pl_module.preview(self.num_steps)
        pl_module.train(was_training)
        grid = caption_grid(images, captions, self.num_cols)
        out = Path(trainer.default_root_dir) / "images" / f"step_{trainer.global_step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        log_grid(trainer.loggers, grid, trainer.global_step)
        return out


def log_grid(loggers: list[Any], grid: Image.Image, step: int, key: str = "preview") -> None:
    """``grid`` to each logger that takes images: one with ``log_image(key, images, step, caption=...)``
    (Lightning's ``WandbLogger``) gets the PIL image, one whose ``experiment`` has ``add_image``
    (TensorBoard) an HWC array; the others (CSV) are skipped."""
    for logger in loggers:
        if callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[grid], step=step, caption=[f"step {step}"])
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, np.asarray(grid), step, dataformats="HWC")
