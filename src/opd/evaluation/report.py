"""Generate → score → record: the pieces behind ``python -m opd.evaluate``.

Every rank generates and scores its share of the batches (:func:`score_task`), saving each image
and keeping one record per image (:meth:`Report.add`). Rank 0 then merges all records, computes
the metrics from them (so the report adds up what ``samples.jsonl`` shows) and writes the files.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from opd.evaluation.distributed import Ranks
from opd.rewards.base import Reward
from opd.sampling import generate
from opd.utils.grid import caption_grid, to_pil


@dataclass
class EvalTask:
    """A prompt set (metadata rows with ``prompt`` and ``tag``) and the rewards that score it.

    ``average="tag"`` makes the headline of every score the mean of its per-tag means (GenEval's
    overall score) instead of the mean over images. ``table`` maps a results.md column header to
    a score key of this task (``{"GenEval": "geneval_correct"}``).
    """

    name: str
    rows: list[dict[str, Any]]
    rewards: dict[str, Reward]
    average: str = "image"
    table: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.average not in ("image", "tag"):
            raise ValueError(f"eval_tasks.{self.name}.average={self.average!r}: use 'image' or 'tag'")


@dataclass
class Report:
    """Per-image records of one rank; on rank 0, the merged metrics and the report files."""

    out_dir: Path
    grid_size: int = 32
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, ckpt: str, task: str, rows: list[dict], images: Tensor, scores: dict[str, Tensor],
            start: int = 0) -> None:
        """Save ``images`` (rows ``start…`` of the task) and keep one record per image."""
        folder = self.out_dir / "images" / ckpt / task
        folder.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            file = folder / f"{start + i:05d}.png"
            to_pil(images[i]).save(file)
            self.samples.append({"checkpoint": ckpt, "task": task, "index": start + i, "prompt": row["prompt"],
                                 "metadata": row, "image": str(file.relative_to(self.out_dir)),
                                 "scores": {k: float(v[i]) for k, v in scores.items()}})

    def merge(self, samples: list[dict[str, Any]], tasks: dict[str, EvalTask], checkpoints: list[str]) -> None:
        """Adopt every rank's records (in checkpoint, task, image order) and compute the metrics."""
        rank_of = {(c, t): (i, j) for i, c in enumerate(checkpoints) for j, t in enumerate(tasks)}
        self.samples = sorted(samples, key=lambda s: (*rank_of[s["checkpoint"], s["task"]], s["index"]))
        self.results = {}
        grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for sample in self.samples:
            grouped[sample["checkpoint"], sample["task"]].append(sample)
        for ckpt in checkpoints:
            metrics = self.results.setdefault(ckpt, {})
            for name, task in tasks.items():
                metrics.update(task_metrics(task, grouped[ckpt, name]))

    def write(self, config: dict[str, Any], tasks: dict[str, EvalTask], guidance: dict[str, float],
              notes: list[str] = ()) -> None:
        """results.json, samples.jsonl, results.md, scores.png and one grid per checkpoint × task."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(json.dumps(self.results, indent=2, sort_keys=True))
        with open(self.out_dir / "samples.jsonl", "w") as f:
            f.writelines(json.dumps({**s, "scores": {k: round(v, 6) for k, v in s["scores"].items()}}) + "\n"
                         for s in self.samples)
        columns = table_columns(self.results, tasks)
        (self.out_dir / "results.md").write_text(markdown_report(self.results, columns, guidance, config, notes))
        bar_chart(self.results, list(columns.values()), self.out_dir / "scores.png", list(columns))
        self.write_grids()
        print(f"\nresults: {self.out_dir / 'results.md'}\n{notes_block(notes)}"
              f"{main_table(self.results, columns, guidance)[0]}"
              f"\nimages: {self.out_dir / 'grids'} (grids), {self.out_dir / 'images'} (every image), "
              f"{self.out_dir / 'samples.jsonl'}")

    def write_grids(self, compare_rows: int = 8) -> None:
        """``grids/<checkpoint>_<task>.png``: the first ``grid_size`` images, captioned with the
        first score and the prompt (read back from the saved images, whichever rank made them);
        with several checkpoints also ``grids/compare_<task>.png``: the first ``compare_rows``
        prompts (rows) as every checkpoint drew them (columns, in the checkpoints' order)."""
        grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for sample in self.samples:
            grouped[sample["checkpoint"], sample["task"]].append(sample)
        grid_dir = self.out_dir / "grids"
        grid_dir.mkdir(parents=True, exist_ok=True)
        for (ckpt, task), samples in grouped.items():
            shown = samples[: self.grid_size]
            captions = [f"[{_first_score(s):.2f}] {s['prompt']}" for s in shown]
            caption_grid(self._load(shown), captions, num_cols=8).save(grid_dir / f"{ckpt}_{task}.png")
        checkpoints = list(dict.fromkeys(c for c, _ in grouped))
        if len(checkpoints) < 2:
            return
        for task in dict.fromkeys(t for _, t in grouped):
            n = min(compare_rows, *(len(grouped[c, task]) for c in checkpoints))
            shown = [grouped[c, task][i] for i in range(n) for c in checkpoints]  # row = prompt, column = checkpoint
            captions = [f"{s['checkpoint']} [{_first_score(s):.2f}]" + (f": {s['prompt']}" if s["checkpoint"] ==
                                                                         checkpoints[0] else "") for s in shown]
            caption_grid(self._load(shown), captions, num_cols=len(checkpoints)).save(grid_dir / f"compare_{task}.png")

    def _load(self, samples: list[dict[str, Any]]) -> Tensor:
        return torch.stack([torch.from_numpy(np.asarray(Image.open(self.out_dir / s["image"]).convert("RGB"),
                                                        dtype=np.float32) / 255).permute(2, 0, 1) for s in samples])


def _first_score(sample: dict[str, Any]) -> float:
    return next(iter(sample["scores"].values()), float("nan"))


def task_metrics(task: EvalTask, samples: list[dict[str, Any]]) -> dict[str, float]:
    """``task/key`` (headline) and ``task/key/tag`` (when the task has several tags) for each score."""
    if not samples:
        return {}
    tags = [s["metadata"].get("tag", task.name) for s in samples]
    metrics: dict[str, float] = {}
    for key in samples[0]["scores"]:
        values = [s["scores"][key] for s in samples]
        by_tag: dict[str, list[float]] = defaultdict(list)
        for tag, v in zip(tags, values):
            by_tag[tag].append(v)
        tag_means = {tag: sum(vs) / len(vs) for tag, vs in sorted(by_tag.items())}
        if task.average == "tag":
            metrics[f"{task.name}/{key}"] = sum(tag_means.values()) / len(tag_means)
        else:
            metrics[f"{task.name}/{key}"] = sum(values) / len(values)
        if len(tag_means) > 1:
            metrics.update({f"{task.name}/{key}/{tag}": v for tag, v in tag_means.items()})
    return metrics


def headline_metrics(results: dict[str, dict[str, float]]) -> list[str]:
    """Metric names without a per-tag suffix (``task/key``), in first-seen order."""
    names: list[str] = []
    for metrics in results.values():
        names += [k for k in metrics if k.count("/") == 1 and k not in names]
    return names


def table_columns(results: dict[str, dict[str, float]], tasks: dict[str, EvalTask]) -> dict[str, str]:
    """Column header → metric of the main table: the tasks' ``table`` entries, else every headline."""
    columns = {header: f"{name}/{key}" for name, task in tasks.items() for header, key in task.table.items()}
    return columns or {m: m for m in headline_metrics(results)}


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def normalised_average(results: dict[str, dict[str, float]], columns: list[str]
                       ) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Per checkpoint, the mean over ``columns`` of ``(x − min) / (max − min)`` with the bounds taken
    over the checkpoints in ``results`` (columns where all of them tie carry no information and are
    left out; so are differences at float32 rounding, which would otherwise be blown up to 0 vs 1);
    returns the averages and the bounds used."""
    bounds = {}
    for col in columns:
        values = [m[col] for m in results.values() if col in m]
        if values and max(values) - min(values) > 1e-6 * max(1.0, abs(max(values))):
            bounds[col] = (min(values), max(values))
    averages = {}
    for ckpt, metrics in results.items():
        parts = [(metrics[c] - lo) / (hi - lo) for c, (lo, hi) in bounds.items() if c in metrics]
        averages[ckpt] = sum(parts) / len(parts) if parts else float("nan")
    return averages, bounds


def main_table(results: dict[str, dict[str, float]], columns: dict[str, str], guidance: dict[str, float]
               ) -> tuple[str, str]:
    """The paper's Table 1 layout (rows = checkpoints, columns = metrics, normalised average) and
    the line stating the average's bounds."""
    averages, bounds = normalised_average(results, list(columns.values()))
    lines = ["| checkpoint | CFG | " + " | ".join(columns) + " | avg (min–max norm.) |",
             "|---" * (len(columns) + 3) + "|"]
    for ckpt, metrics in results.items():
        cells = [_fmt(metrics[m]) if m in metrics else "–" for m in columns.values()]
        lines.append(f"| {ckpt} | {guidance.get(ckpt, float('nan')):g} | " + " | ".join(cells)
                     + f" | {_fmt(averages[ckpt]) if averages[ckpt] == averages[ckpt] else '–'} |")
    header_of = {m: h for h, m in columns.items()}
    stated = ", ".join(f"{header_of[m]} [{_fmt(lo)}, {_fmt(hi)}]" for m, (lo, hi) in bounds.items())
    tied = [h for h, m in columns.items() if m not in bounds]
    note = (f"avg (min–max norm.): each column rescaled to [0, 1] between its min and max over the "
            f"{len(results)} checkpoint(s) above, then averaged; bounds: {stated or 'none'}"
            + (f"; left out (all checkpoints tie): {', '.join(tied)}" if tied else "") + ".")
    return "\n".join(lines) + "\n", note


def notes_block(notes: list[str]) -> str:
    return "".join(f"> **{note}**\n\n" for note in notes)


def _metric_table(results: dict[str, dict[str, float]], cols: list[str]) -> list[str]:
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for ckpt, metrics in results.items():
        lines.append(f"| {ckpt} | " + " | ".join(_fmt(metrics[c]) if c in metrics else "–" for c in cols) + " |")
    return lines


def markdown_report(results: dict[str, dict[str, float]], columns: dict[str, str], guidance: dict[str, float],
                    config: dict[str, Any], notes: list[str] = ()) -> str:
    """results.md: notes, settings, the main table and its bounds, all metrics, per-tag metrics."""
    table, bounds = main_table(results, columns, guidance)
    out = ["# Evaluation results", "", notes_block(notes) +
           f"{config.get('num_steps')} sampling steps, seed {config.get('seed')}, "
           f"{config.get('images_per_prompt')} image(s) per prompt, model "
           f"`{_model_name(config)}`; "
           "CFG per checkpoint in the table.", "", table, bounds]
    headline = headline_metrics(results)
    if headline != list(columns.values()):
        out += ["", "## All metrics", "", *_metric_table(results, headline)]
    tagged = sorted({k for m in results.values() for k in m if k.count("/") == 2})
    if tagged:
        out += ["", "## Per tag", "", *_metric_table(results, tagged)]
    return "\n".join(out) + "\n"


def _model_name(config: dict[str, Any]) -> str | None:
    """The model's weights folder (relative to the checkout when inside it), else its factory."""
    model = config.get("model", {})
    return _short_path(model.get("path"), config.get("paths", {}).get("root_dir")) or model.get("_target_")


def _short_path(path: str | None, root: str | None) -> str | None:
    """``path`` relative to the repository root when it lies inside it (portable reports)."""
    if path and root and Path(path).is_relative_to(root):
        return str(Path(path).relative_to(root))
    return path


def bar_chart(results: dict[str, dict[str, float]], cols: list[str], path: Path,
              labels: list[str] | None = None) -> None:
    """Grouped bars: one group per metric in ``cols``, one bar per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cols)), 3.6))
    for i, (ckpt, metrics) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [metrics.get(c, 0.0) for c in cols], width, label=ckpt)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], labels or cols, rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_task(report: Report, backbone: Any, ckpt: str, task: EvalTask, *, num_steps: int,
               guidance_scale: float, shift: float, seed: int, images_per_prompt: int, batch_size: int,
               ranks: Ranks | None = None) -> None:
    """Generate ``images_per_prompt`` images per prompt of ``task``, score and record them.

    Rows are cut into batches of ``batch_size``; this rank takes every ``world_size``-th batch. A
    batch's noise depends only on its first row's index, so the images (and scores) do not depend
    on how many ranks share the work.
    """
    ranks = ranks or Ranks()
    rows = [r for r in task.rows for _ in range(images_per_prompt)]
    starts = ranks.shard(range(0, len(rows), batch_size))
    for start in tqdm(starts, desc=f"{ckpt}/{task.name}", unit="batch", disable=not ranks.is_main):
        chunk = rows[start : start + batch_size]
        prompts = [r["prompt"] for r in chunk]
        images = generate(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale, shift=shift,
                          seed=seed + start, batch_size=batch_size)
        scores: dict[str, Tensor] = {}
        for name, reward in task.rewards.items():
            for key, value in reward.score(images.to(backbone.device), prompts, chunk).items():
                scores[name if key == "reward" else f"{name}_{key}"] = value.detach().float().cpu()
        report.add(ckpt, task.name, chunk, images, scores, start)
