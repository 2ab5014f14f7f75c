"""Plot the run's logged curves to ``<output_dir>/curves.png``, one labelled panel per meaning.

Whatever logger is configured, a PNG beside the checkpoints shows at a glance whether the KL falls
and the rewards rise. Values are collected after each step and redrawn every ``every_n_steps`` and
at the end (also when a run stops early: SIGTERM, a time slice, an error). The history is part of
the run's checkpoints, so a resumed run (``ckpt_path=last``) draws its curves from step 1, not from
the resume. Modules that keep their last step's metrics in ``last_metrics`` (every
:class:`~opd.modules.policy.AdapterPolicy`) give exactly what each step logged; otherwise
``trainer.callback_metrics`` is used (the learning rate of ``LearningRateMonitor``, ``lr-*``, always
comes from there).

Keys are sorted into panels by pattern (:data:`PANELS`, first match wins), so renamed or new keys of
a known kind land in the right panel: rewards, monitor rewards on each teacher's prompts, the total
KL, the KL to each teacher, teacher weights, the KL to the reference model, losses, learning rate,
gradient norm, PPO clipping. Each panel has a title, axis labels and, with several series, a legend;
each series is drawn raw (faint) and smoothed (solid, a bias-corrected exponential moving average,
:func:`ema`).
"""
from __future__ import annotations

import math
import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


@dataclass(frozen=True)
class Panel:
    """A kind of panel: ``pattern`` full-matches the keys it draws. ``title``, ``keys`` (the logged
    keys, the title's second line) and ``label`` (a series' legend entry) are format strings over the
    pattern's named groups, so one kind can make a panel per teacher or reward (``title`` names a
    group) or one panel with a series per teacher (``label`` does)."""

    title: str
    ylabel: str
    pattern: str
    keys: str
    label: str = "{label}"
    log_scale_ok: bool = False  # a log y axis when the series are positive and span more than 10×
    smooth: bool = True  # False: a schedule, drawn as it is (no EMA, no faint copy)

    def match(self, key: str) -> tuple[str, str, str] | None:
        """``(title, keys, series label)`` of ``key``, or None."""
        found = re.fullmatch(self.pattern, key)
        if found is None:
            return None
        groups = {k: v for k, v in found.groupdict().items() if v is not None}
        groups.setdefault("label", key)
        return self.title.format(**groups), self.keys.format(**groups), self.label.format(**groups)


#: the kinds of panel, in drawing order; a key goes to the first that matches (and is drawn only then)
PANELS = (
    Panel("Reward of the policy's samples", "reward (mean over images)", r"reward/(?P<label>[^/]+)", "reward/<name>"),
    # counts (aesthetic_mini's violated caption facts, 0-14) get their own axis, apart from [0, 1] terms
    Panel("Reward {reward}: caption facts violated", "facts per image (mean)",
          r"reward/(?P<reward>[^/]+)/(?P<label>errors)", "reward/{reward}/errors"),
    Panel("Reward {reward}: components", "component (mean over images)", r"reward/(?P<reward>[^/]+)/(?P<label>.+)",
          "reward/{reward}/*"),
    Panel("Monitor rewards on each teacher's prompts", "reward (mean over images)",
          r"teacher/(?P<teacher>[^/]+)/(?!kl$|weight$)(?P<reward>[^/]+)", "teacher/<teacher>/<reward>",
          label="{reward} ({teacher}'s prompts)"),
    Panel("Monitor reward {reward} on {teacher}'s prompts: caption facts violated", "facts per image (mean)",
          r"teacher/(?P<teacher>[^/]+)/(?P<reward>[^/]+)/(?P<label>errors)", "teacher/{teacher}/{reward}/errors"),
    Panel("Monitor reward {reward} on {teacher}'s prompts: components", "component (mean over images)",
          r"teacher/(?P<teacher>[^/]+)/(?P<reward>[^/]+)/(?P<label>.+)", "teacher/{teacher}/{reward}/*"),
    Panel("Total KL to the teachers", "KL (sum over teachers)", r"train/kl(?:_(?P<label>sum))?", "train/kl_sum",
          log_scale_ok=True),
    Panel("KL to each teacher", "KL (summed over the trained steps)", r"teacher/(?P<label>[^/]+)/kl",
          "teacher/<teacher>/kl", log_scale_ok=True),
    Panel("Teacher weights (balanced weighting)", "weight", r"teacher/(?P<label>[^/]+)/weight",
          "teacher/<teacher>/weight", log_scale_ok=True),
    Panel("KL to the reference model (regulariser)", "KL term", r"train/(?P<label>kl_ref.*)", "train/kl_ref*",
          log_scale_ok=True),
    Panel("Other KL estimates", "KL", r"train/(?P<label>(?:kl_.+|approx_kl))", "train/kl_*, train/approx_kl",
          log_scale_ok=True),
    Panel("Loss", "loss", r"train/(?P<label>(?:.+_)?loss(?:_.+)?)", "train/*loss*", log_scale_ok=True),
    Panel("Learning rate", "learning rate", r"lr-(?P<label>.+)", "lr-* (LearningRateMonitor)", smooth=False),
    Panel("Gradient norm (before clipping)", "global L2 norm", r"train/(?P<label>grad_norm)", "train/grad_norm"),
    Panel("PPO clipping", "fraction of samples clipped", r"train/(?P<label>clip_frac)", "train/clip_frac"),
)


def classify(key: str, panels: tuple[Panel, ...] = PANELS) -> tuple[Panel, str, str, str] | None:
    """``(kind of panel, panel title, keys line, series label)`` of ``key``, or None when no panel
    draws it."""
    for panel in panels:
        hit = panel.match(key)
        if hit is not None:
            return (panel, *hit)
    return None


def auto_smoothing(num_points: int) -> float:
    """The EMA factor for a series of ``num_points``: a span of ~10 % of the run (pandas'
    ``β = 1 − 2 / (span + 1)``), at least 2 points."""
    span = max(2.0, num_points / 10)
    return 1 - 2 / (span + 1)


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average: ``s_t = β s_{t−1} + (1 − β) x_t`` from ``s_0 = 0``,
    reported as ``s_t / (1 − β^t)`` (so the first point is the first value, as TensorBoard does)."""
    out, s = [], 0.0
    for t, x in enumerate(values, start=1):
        s = beta * s + (1 - beta) * x
        out.append(s / (1 - beta**t) if beta < 1 else x)
    return out


class CurvePlot(pl.Callback):
    """Panels of :data:`PANELS` (x = optimiser step), written to ``<default_root_dir>/curves.png``.

    ``smoothing``: the EMA factor β in [0, 1) (None: :func:`auto_smoothing` of each series' length);
    ``exclude``: substrings of keys never drawn (spreads and failure counts by default).
    """

    def __init__(self, every_n_steps: int = 200, smoothing: float | None = None,
                 exclude: tuple[str, ...] = ("_std", "/failures"), panels: tuple[Panel, ...] = PANELS) -> None:
        if smoothing is not None and not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1) or null; got {smoothing}")
        self.every_n_steps = every_n_steps
        self.smoothing = smoothing
        self.exclude = tuple(exclude)
        self.panels = tuple(panels)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def wanted(self, key: str) -> bool:
        return not any(e in key for e in self.exclude) and classify(key, self.panels) is not None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        latest = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        fresh = getattr(pl_module, "last_metrics", None)
        if fresh is not None:  # exactly what this step logged (multi-task runs log rewards on their rounds)
            values = dict(fresh)
            values.update({k: v for k, v in latest.items() if k.startswith("lr-") and k not in values})
        else:  # other modules: Lightning's latest values, where a key not logged this step keeps its old one
            values = latest
        for key, value in values.items():
            if self.wanted(key) and math.isfinite(value):
                self.history[key].append((trainer.global_step, value))
        if trainer.global_step % self.every_n_steps == 0:
            self.draw(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.draw(trainer)  # a stopped run (SIGTERM, time slice, crash) shows how far it got

    def state_dict(self) -> dict[str, Any]:
        return {"history": {key: [list(point) for point in points] for key, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The history up to the checkpoint's step; points logged after it (by the run that was
        stopped before its next checkpoint) are not in it, so a resume never draws a step twice."""
        self.history = defaultdict(list, {key: [(int(step), float(value)) for step, value in points]
                                          for key, points in state_dict.get("history", {}).items()})

    def grouped(self) -> dict[str, tuple[Panel, str, dict[str, str]]]:
        """``{panel title: (kind, keys line, {series label: key})}`` of the recorded keys, in
        :data:`PANELS` order (then by title)."""
        hits = [(key, classify(key, self.panels)) for key in sorted(self.history)]
        order = {panel: i for i, panel in enumerate(self.panels)}
        out: dict[str, tuple[Panel, str, dict[str, str]]] = {}
        for key, (panel, title, keys, label) in sorted(((k, h) for k, h in hits if h is not None),
                                                      key=lambda kh: (order[kh[1][0]], kh[1][1], kh[0])):
            out.setdefault(title, (panel, keys, {}))[2][label] = key
        return out

    def smoothed(self, key: str) -> list[float]:
        values = [v for _, v in self.history[key]]
        beta = self.smoothing if self.smoothing is not None else auto_smoothing(len(values))
        return ema(values, beta)

    def draw(self, trainer: pl.Trainer) -> Path | None:
        if not trainer.is_global_zero or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = self.grouped()
        if not groups:
            return None
        cols = min(3, len(groups))
        rows = math.ceil(len(groups) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, (title, (panel, keys, series)) in zip(axes.flat, groups.items()):
            lows, highs = [], []
            for i, (label, key) in enumerate(series.items()):
                steps, values = zip(*self.history[key])
                color = colors[i % len(colors)]
                if panel.smooth:
                    ax.plot(steps, values, color=color, lw=0.8, alpha=0.3)
                ax.plot(steps, self.smoothed(key) if panel.smooth else values, color=color, lw=1.8, label=label,
                        marker="o" if len(steps) == 1 else None)
                lows.append(min(values))
                highs.append(max(values))
            if panel.log_scale_ok and min(lows) > 0 and max(highs) / min(lows) > 10:
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
            if len(series) == 1:  # name the very key; several: the pattern of their keys
                keys = next(iter(series.values()))
            ax.set_title(f"{textwrap.fill(title, 66)}\n{keys}", fontsize=9)
            ax.set_xlabel("optimiser step", fontsize=8)
            ax.set_ylabel(panel.ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.25)
            if len(series) > 1:
                ax.legend(fontsize=7, loc="best")
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        fig.suptitle(f"training curves at step {trainer.global_step} (faint: raw; solid: EMA-smoothed)", fontsize=10)
        fig.tight_layout()
        out = Path(trainer.default_root_dir) / "curves.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
