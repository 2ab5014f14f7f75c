"""EMA snapshots of the trained adapter along a run, to choose one on val (early stopping).

Every ``every_n_steps`` optimiser steps the module's ``export_adapter`` writes the EMA adapter to
``<output_dir>/exports/step_NNNNNN`` (the same diffusers LoRA file as ``<output_dir>/adapter``), so
the snapshots can be evaluated on the val prompts while the run goes on and the best one chosen
(``python -m opd.evaluate +checkpoints.<name>=<run>/exports/step_NNNNNN`` with the val splits, then
``python -m opd.results.pick_teachers`` or ``python -m opd.evaluation.choose``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class AdapterSnapshots(pl.Callback):
    """Export the module's EMA adapter each time the optimiser step count passes a multiple of
    ``every_n_steps`` (a round may take several optimiser steps, so a multiple can be stepped over);
    ``None`` or 0 turns it off."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"callbacks.adapter_snapshots.every_n_steps must be >= 0 or null; got {every_n_steps}")
        self.every_n_steps = every_n_steps or 0
        self.last_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_step = trainer.global_step  # a resumed run does not export again what it exported before

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if every and step // every > self.last_step // every:
            out = Path(trainer.default_root_dir) / "exports" / f"step_{step:06d}"
            pl_module.export_adapter(out, "an adapter snapshot")
        self.last_step = step
