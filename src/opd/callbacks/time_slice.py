"""Stop training after a slice of wall-clock time, exactly as a scheduler's time limit would.

``callbacks.time_slice.minutes=M`` ends this process's training at the end of the first optimiser
step that finishes ``M`` minutes after training started (in this process: a resumed run gets a
fresh slice). It is the path of SIGTERM (:mod:`opd.callbacks.checkpoint`): rank 0 sends itself
SIGTERM at the end of that step, Lightning stops there and shares the stop with the other ranks,
``last.ckpt`` is saved at that step, no adapter is exported and no evaluation runs, and
``python -m opd.train`` exits with status :data:`opd.train.STOPPED_EXIT_CODE` (75) so that
``make`` or a job script sees an unfinished run. Running the same command with ``ckpt_path=last``
continues it; the chains of the Makefile do so by themselves.

What it is for: machines lent for a fixed time, queues with short slots, and chains of runs side by
side that should all stop before a deadline without anyone sending signals. ``trainer.max_time``
is different: it ends the run for good (the adapter is exported as final, the evaluation runs) and
counts the time of every earlier slice.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from lightning.pytorch import Callback

log = logging.getLogger(__name__)


class TimeSlice(Callback):
    def __init__(self, minutes: float | None = None) -> None:
        if minutes is not None and not minutes > 0:
            raise ValueError(f"callbacks.time_slice.minutes must be > 0 (or null: no slice), got {minutes}")
        self.minutes = minutes
        self._start: float | None = None
        self._sent = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.monotonic()
        self._sent = False
        if self.minutes is not None:
            log.info("time slice: training stops resumably after the step that ends %.4g min from now", self.minutes)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.minutes is None or self._start is None or self._sent or not trainer.is_global_zero:
            return
        if time.monotonic() - self._start >= 60.0 * self.minutes:
            self._sent = True
            log.info("time slice of %.4g min used at step %d: stopping as on SIGTERM", self.minutes,
                     trainer.global_step)
            os.kill(os.getpid(), signal.SIGTERM)
