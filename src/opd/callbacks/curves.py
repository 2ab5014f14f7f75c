"""Plot the run's logged curves to ``<output_dir>/curves.png`` (losses, KL, rewards per step).

Whatever logger is configured, a PNG beside the checkpoints shows at a glance whether the KL falls
and the rewards rise. Values are collected from ``trainer.callback_metrics`` after each step and
redrawn every ``every_n_steps`` and at the end; keys are matched by prefix. A key whose value did
not change since its last point is taken as not logged this step (multi-task runs log each task's
reward on its own rounds only).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class CurvePlot(pl.Callback):
    """One panel per key group (``train/kl``, ``teacher/*/kl``, ``reward/*``, ...), x = optimiser step."""

    def __init__(self, prefixes: tuple[str, ...] = ("train/kl", "train/loss", "train/policy_loss", "reward/",
                                                     "teacher/"),
                 every_n_steps: int = 200, exclude: tuple[str, ...] = ("_std",)) -> None:
        self.prefixes = tuple(prefixes)
        self.exclude = tuple(exclude)
        self.every_n_steps = every_n_steps
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def wanted(self, key: str) -> bool:
        return key.startswith(self.prefixes) and not any(e in key for e in self.exclude)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for key, value in trainer.callback_metrics.items():
            if not (self.wanted(key) and value.numel() == 1):
                continue
            seen = self.history[key]
            if not seen or seen[-1][1] != float(value):  # a key not logged this step keeps its old value
                seen.append((trainer.global_step, float(value)))
        if trainer.global_step % self.every_n_steps == 0:
            self.draw(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer)

    def draw(self, trainer: pl.Trainer) -> Path | None:
        if not trainer.is_global_zero or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted(self.history)
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            steps, values = zip(*self.history[key])
            ax.plot(steps, values, lw=0.8, alpha=0.5)
            k = max(1, len(values) // 20)  # a moving average over ~5% of the run
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(values))]
            ax.plot(steps, smooth, lw=1.6)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        out = Path(trainer.default_root_dir) / "curves.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
