"""Plot the run's logged curves to ``<output_dir>/curves.png`` (losses, KL, rewards per step).

Whatever logger is configured, a PNG beside the checkpoints shows at a glance whether the KL falls
and the rewards rise. Values are collected from ``trainer.callback_metrics`` after each step and
redrawn every ``every_n_steps`` and at the end; keys are matched by prefix. Modules that keep their
last step's metrics in ``last_metrics`` (every :class:`~opd.modules.policy.AdapterPolicy`) give
exactly what each step logged; otherwise ``trainer.callback_metrics`` is used.
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
        fresh = getattr(pl_module, "last_metrics", None)
        if fresh is not None:  # exactly what this step logged (multi-task runs log rewards on their rounds)
            values = fresh
        else:  # other modules: Lightning's latest values, where a key not logged this step keeps its old one
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        for key, value in values.items():
            if self.wanted(key):
                self.history[key].append((trainer.global_step, value))
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
