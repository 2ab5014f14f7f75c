"""A progress bar over optimiser steps (``step 12/24``) rather than epochs.

Runs here are bounded by ``trainer.max_steps`` with ``max_epochs: -1``, which Lightning's Rich bar
shows as ``Epoch 0/-2`` (and a bar over one epoch's batches). :class:`StepProgressBar` shows one bar
of ``global_step`` out of ``max_steps`` that carries on across epochs and resumes where the
checkpoint stopped. Without a terminal (a log file, a pipe) Rich would print the bar once at the end,
so the bar then turns itself off (``tty_only``) and :class:`~opd.callbacks.progress_log.ProgressLog`
lines carry the progress.

``trainer.enable_progress_bar: false`` refuses any progress bar among the callbacks; the config entry
therefore goes through :func:`progress_bar`, which returns a no-op callback in that case.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def _stdout_is_terminal(console_kwargs: dict[str, Any] | None = None) -> bool:
    from rich.console import Console

    console = Console(**(console_kwargs or {}))
    return bool(console.is_terminal or console.is_jupyter)


class StepProgressBar(RichProgressBar):
    """Rich progress bar of ``global_step / max_steps`` (description ``step``) whenever
    ``max_steps`` is set; otherwise Lightning's per-epoch bar. ``tty_only``: off without a
    terminal."""

    DESCRIPTION = "step"

    def __init__(self, tty_only: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tty_only = tty_only

    def by_step(self, trainer: pl.Trainer | None = None) -> bool:
        trainer = trainer or self.trainer
        return trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self.by_step():
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self.by_step():
            return super()._get_train_description(current_epoch)
        return f"{self.DESCRIPTION:{len(self.validation_description)}}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.tty_only and not _stdout_is_terminal(self._console_kwargs):
            self.disable()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.by_step(trainer) and self.train_progress_bar_id is not None:
            self.refresh()  # one bar for the whole run: no reset at a new epoch
            return
        super().on_train_epoch_start(trainer, pl_module)
        if self.by_step(trainer):  # a resumed run starts where its checkpoint stopped
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.by_step(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def progress_bar(enabled: bool = True, tty_only: bool = True, **kwargs: Any) -> pl.Callback:
    """The config's progress bar: a :class:`StepProgressBar` (Lightning's TQDM bar if Rich is not
    installed), or a no-op callback when ``enabled`` is false (``trainer.enable_progress_bar``)."""
    if not enabled:
        return pl.Callback()
    if not _RICH_AVAILABLE:
        return TQDMProgressBar()
    return StepProgressBar(tty_only=tty_only, **kwargs)
