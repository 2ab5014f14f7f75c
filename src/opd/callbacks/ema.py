"""Exponential moving average of the trainable weights, used for previews, eval and export."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


class EMA(pl.Callback):
    """Keeps ``shadow ← d·shadow + (1 − d)·θ`` every ``every_n_steps`` optimiser steps.

    ``d = min(decay, (1 + n)/(10 + n))`` with ``n`` the number of EMA updates so far (the
    references' warm-up, so early averages are not dominated by the random init). The module
    names what to average through ``ema_parameters() -> dict[str, Parameter]``; the shadow is
    stored in checkpoints so a resumed run continues the same average.
    """

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1) -> None:
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.shadow: dict[str, Tensor] = {}
        self.num_updates = 0

    @staticmethod
    def find(trainer: pl.Trainer) -> EMA | None:
        return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)

    def _params(self, pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        return dict(pl_module.ema_parameters())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        if not self.shadow:
            self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        else:  # restored from a checkpoint: move next to the weights
            self.shadow = {k: v.to(params[k].device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in self._params(pl_module).items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)
        self.num_updates += 1

    @contextmanager
    def swapped(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Temporarily load the averaged weights into the module."""
        params = self._params(pl_module)
        backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.cpu() for k, v in self.shadow.items()}, "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.num_updates = int(state_dict["num_updates"])


@contextmanager
def ema_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """The EMA weights if an :class:`EMA` callback is configured, else the live ones."""
    ema = EMA.find(trainer)
    if ema is None or not ema.shadow:
        yield
    else:
        with ema.swapped(pl_module):
            yield
