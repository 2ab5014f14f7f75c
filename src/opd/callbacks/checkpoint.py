"""Checkpoints that are never half-written: each is saved beside its final name and renamed into place.

Lightning's own local save stages the file in ``$TMPDIR`` and moves it; when ``$TMPDIR`` is on
another file system than the run folder (a node-local ``/tmp`` and a shared ``outputs/``), the
move is a copy, and a run killed during the copy leaves a truncated ``last.ckpt``: the one file
``ckpt_path=last`` resumes from. Here the checkpoint is written to ``<name>.partial`` in the same
folder and ``os.replace``-d over the old one (atomic on one file system), so a kill at any moment
leaves either the previous checkpoint or the new one.

A run stopped by SIGTERM (a scheduler's time limit, ``timeout``, ``kill``) also saves ``last.ckpt``
on its way out. Lightning notes the signal and stops at the end of the optimiser step under way, a
point where the step is complete; the checkpoint written there is the one a save at that step would
have written, so ``ckpt_path=last`` loses nothing. Other exceptions save nothing: they can stop a
step half done.
"""
from __future__ import annotations

from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from opd.utils.files import replace_path


class AtomicModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` with atomic local writes (same
    arguments; its state in checkpoints keeps ModelCheckpoint's key, so either resumes the other)."""

    @property
    def state_key(self) -> str:
        key = super().state_key
        return key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On SIGTERM, ``last.ckpt`` at the step that just ended (unless it was saved there already)."""
        if not isinstance(exception, SIGTERMException) or not self.save_last or trainer.sanity_checking:
            super().on_exception(trainer, pl_module, exception)
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"SIGTERM: stopped after step {trainer.global_step}; {self.last_model_path} resumes it "
                       "(ckpt_path=last)")

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if "://" in str(filepath):  # remote storage: Lightning's own upload
            super()._save_checkpoint(trainer, filepath)
            return
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            replace_path(partial, filepath)
        trainer.strategy.barrier("atomic_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

