"""Progress as plain log lines: visible without a terminal, in ``train.log`` and in job logs.

A progress bar draws nothing useful when the output is a file or a pipe (Rich prints it once, at
the end). :class:`ProgressLog` writes one ``logging`` line every ``every_n_steps`` steps and/or
``every_n_seconds`` seconds (and after the first step, and at the end)::

    step 12/24 (50%), round 12 | kl_sum 0.1532, aesthetic/kl 0.08, geneval/kl 0.006, ocr/kl 0.02
    | 2.0 steps/min (30.0 s/step) | elapsed 6m00s | ETA 6m00s (max_steps)

The ETA is the sooner of ``max_steps`` (at the session's mean rate) and ``max_time`` (Lightning's
``Timer``). :func:`log_progress` does the same for any loop (evaluation batches): a tqdm bar on a
terminal, log lines otherwise.
"""
from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the headline metrics, in order of preference (full-match regular expressions on the logged keys):
#: the reward of RL runs, the KL of distillation (total, then per teacher), the pre-training loss
DEFAULT_METRICS = (r"reward/[^/]+", r"train/kl_sum", r"teacher/[^/]+/kl", r"train/kl_ref\w*",
                   r"train/loss", r"train/policy_loss")


def format_duration(seconds: float) -> str:
    """``42s``, ``6m05s``, ``2h03m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def short_name(key: str) -> str:
    """The key as a log line shows it: ``train/kl_sum`` → ``kl_sum``, ``teacher/ocr/kl`` → ``ocr/kl``."""
    for prefix in ("train/", "teacher/"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def headline_metrics(metrics: dict[str, float], patterns: Sequence[str] = DEFAULT_METRICS,
                     limit: int = 4) -> list[tuple[str, float]]:
    """At most ``limit`` ``(key, value)`` of ``metrics`` matching ``patterns`` (pattern order, then
    key order); spreads (``…_std``) and failure counts are left out."""
    out: list[tuple[str, float]] = []
    for pattern in patterns:
        regex = re.compile(pattern)
        for key in sorted(metrics):
            if regex.fullmatch(key) and not key.endswith(("_std", "/failures")) and key not in dict(out):
                out.append((key, metrics[key]))
    return out[:limit]


def _scalars(trainer: pl.Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        try:
            if getattr(value, "numel", lambda: 1)() == 1:
                out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class ProgressLog(pl.Callback):
    """One ``logging`` line (rank 0) every ``every_n_steps`` optimiser steps and/or
    ``every_n_seconds`` seconds, after the first step of the session and at the end: step of
    ``max_steps``, up to ``max_metrics`` headline metrics (:data:`DEFAULT_METRICS`), steps per
    minute, elapsed time and the ETA. ``clock`` (seconds) is injectable for tests."""

    def __init__(self, every_n_steps: int | None = None, every_n_seconds: float | None = 60.0, max_metrics: int = 4,
                 metrics: Sequence[str] = DEFAULT_METRICS, clock: Callable[[], float] = time.monotonic) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or null; got {every_n_steps}")
        if every_n_seconds is not None and every_n_seconds <= 0:
            raise ValueError(f"every_n_seconds must be > 0 or null; got {every_n_seconds}")
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.max_metrics = max_metrics
        self.metrics = tuple(metrics)
        self.clock = clock
        self._start_time: float | None = None
        self._start_step = 0
        self._last_time: float | None = None
        self._last_step: int | None = None

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_time = self.clock()
        self._start_step = trainer.global_step
        self._last_time, self._last_step = self._start_time, None
        if trainer.is_global_zero:
            limits = [f"max_steps {trainer.max_steps}"] if trainer.max_steps and trainer.max_steps > 0 else []
            remaining = self._time_remaining(trainer)
            if remaining is not None:
                limits.append(f"max_time (in {format_duration(remaining)})")
            log.info("training from step %d until %s", trainer.global_step, " or ".join(limits) or "the data ends")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        if self._start_time is None:  # hooks called without on_train_start (tests, odd loops)
            self.on_train_start(trainer, pl_module)
        now, step = self.clock(), trainer.global_step
        if self._due(step, now):
            log.info("%s", self.line(trainer, pl_module, now))
            self._last_time, self._last_step = now, step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._start_time is not None:
            log.info("finished: %s", self.line(trainer, pl_module, self.clock(), eta=False))

    # -- the line ---------------------------------------------------------------------------------
    def _due(self, step: int, now: float) -> bool:
        if self._last_step is None:
            return step > self._start_step  # the first step of the session shows the pace at once
        if step == self._last_step:
            return False
        if self.every_n_steps is not None and step // self.every_n_steps > self._last_step // self.every_n_steps:
            return True  # a multiple of every_n_steps was reached (or passed) since the last line
        return self.every_n_seconds is not None and now - self._last_time >= self.every_n_seconds

    @staticmethod
    def _time_remaining(trainer: pl.Trainer) -> float | None:
        for callback in getattr(trainer, "callbacks", []):
            if isinstance(callback, Timer):
                remaining = callback.time_remaining("train")
                return None if remaining is None else float(remaining)
        return None

    def rate(self, step: int, now: float) -> float:
        """Steps per second over this session (0 until a step is done)."""
        elapsed = now - (self._start_time if self._start_time is not None else now)
        done = step - self._start_step
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    def eta(self, trainer: pl.Trainer, now: float) -> tuple[float | None, str | None]:
        """``(seconds, which limit)``: the sooner of ``max_steps`` at the session's rate and ``max_time``."""
        options = []
        rate = self.rate(trainer.global_step, now)
        if trainer.max_steps is not None and trainer.max_steps > 0 and rate > 0:
            options.append((max(0, trainer.max_steps - trainer.global_step) / rate, "max_steps"))
        remaining = self._time_remaining(trainer)
        if remaining is not None:
            options.append((max(0.0, remaining), "max_time"))
        return min(options) if options else (None, None)

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None, now: float, eta: bool = True) -> str:
        step = trainer.global_step
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None
        head = f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps else f"step {step}"
        round_ = getattr(pl_module, "round", None)
        if isinstance(round_, int) and round_ != step:
            head += f", round {round_}"
        parts = [head]
        shown = headline_metrics(_scalars(trainer), self.metrics, self.max_metrics)
        if shown:
            parts.append(", ".join(f"{short_name(k)} {v:.4g}" for k, v in shown))
        rate = self.rate(step, now)
        if rate > 0:
            parts.append(f"{60 * rate:.3g} steps/min ({1 / rate:.3g} s/step)")
        elapsed = now - self._start_time if self._start_time is not None else 0.0
        parts.append(f"elapsed {format_duration(elapsed)}")
        if eta:
            seconds, limit = self.eta(trainer, now)
            parts.append(f"ETA {format_duration(seconds)}" + (f" ({limit})" if limit else ""))
        return " | ".join(parts)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def log_progress(items: Iterable[T], desc: str, *, total: int | None = None, enabled: bool = True,
                 tty: bool | None = None, every_n_seconds: float = 0.0, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic, unit: str = "batch") -> Iterator[T]:
    """Iterate over ``items`` showing progress: a tqdm bar when stderr is a terminal (``tty``
    overrides the check), otherwise a log line ``<desc>: batch i/n (p%) | x s/batch | elapsed | ETA``
    after each item (at most one per ``every_n_seconds``; the last one always). ``enabled=False``
    shows nothing (non-zero ranks)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if not enabled:
        yield from items
        return
    if tty is None:
        tty = _is_terminal(sys.stderr)
    if tty:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit)
        return
    logger = logger or log
    start = last = clock()
    of = f"/{total}" if total is not None else ""
    plural = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")
    logger.info("%s: %s %s to do", desc, total if total is not None else "?", plural)
    for i, item in enumerate(items, start=1):
        yield item
        now = clock()
        if now - last < every_n_seconds and (total is None or i < total):
            continue
        last = now
        per = (now - start) / i
        parts = [f"{desc}: {unit} {i}{of}" + (f" ({100 * i / total:.0f}%)" if total else ""),
                 f"{per:.3g} s/{unit}", f"elapsed {format_duration(now - start)}"]
        if total is not None:
            parts.append(f"ETA {format_duration(per * (total - i))}")
        logger.info("%s", " | ".join(parts))
