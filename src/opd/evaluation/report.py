"""Generate → score → record: the pieces behind ``python -m opd.evaluate``."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from opd.rewards.base import Reward
from opd.sampling import generate
from opd.utils.grid import caption_grid, to_pil


@dataclass
class EvalTask:
    """A prompt set (metadata rows with ``prompt`` and ``tag``) and the rewards that score it."""

    name: str
    rows: list[dict[str, Any]]
    rewards: dict[str, Reward]


@dataclass
class Report:
    """Accumulates per-image scores and writes the report files into ``out_dir``."""

    out_dir: Path
    grid_size: int = 32
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, ckpt: str, task: str, rows: list[dict], images: Tensor, scores: dict[str, Tensor]) -> None:
        """Save images, record sample lines, and aggregate means (overall and per tag)."""
        folder = self.out_dir / "images" / ckpt / task
        folder.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            file = folder / f"{i:05d}.png"
            to_pil(images[i]).save(file)
            self.samples.append({"checkpoint": ckpt, "task": task, "prompt": row["prompt"], "metadata": row,
                                 "image": str(file.relative_to(self.out_dir)),
                                 "scores": {k: round(float(v[i]), 6) for k, v in scores.items()}})
        metrics = self.results.setdefault(ckpt, {})
        tags = [row.get("tag", task) for row in rows]
        for key, values in scores.items():
            metrics[f"{task}/{key}"] = float(values.float().mean())
            if len(set(tags)) > 1:
                by_tag: dict[str, list[float]] = defaultdict(list)
                for tag, v in zip(tags, values.tolist()):
                    by_tag[tag].append(v)
                for tag, vs in sorted(by_tag.items()):
                    metrics[f"{task}/{key}/{tag}"] = sum(vs) / len(vs)
        headline = next(iter(scores))
        captions = [f"[{float(scores[headline][i]):.2f}] {r['prompt']}" for i, r in enumerate(rows)]
        n = min(self.grid_size, len(rows))
        grid_dir = self.out_dir / "grids"
        grid_dir.mkdir(parents=True, exist_ok=True)
        caption_grid(images[:n], captions[:n], num_cols=8).save(grid_dir / f"{ckpt}_{task}.png")

    def write(self, config: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(json.dumps(self.results, indent=2, sort_keys=True))
        with open(self.out_dir / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in self.samples)
        (self.out_dir / "results.md").write_text(markdown_table(self.results, config))
        bar_chart(self.results, self.out_dir / "scores.png")
        print(f"\nresults: {self.out_dir / 'results.md'}\n{markdown_table(self.results, config, brief=True)}"
              f"\nimages: {self.out_dir / 'grids'} (grids), {self.out_dir / 'images'} (every image), "
              f"{self.out_dir / 'samples.jsonl'}")


def headline_metrics(results: dict[str, dict[str, float]]) -> list[str]:
    """Metric names without a per-tag suffix (``task/key``), in first-seen order."""
    names: list[str] = []
    for metrics in results.values():
        names += [k for k in metrics if k.count("/") == 1 and k not in names]
    return names


def markdown_table(results: dict[str, dict[str, float]], config: dict[str, Any], brief: bool = False) -> str:
    """Rows = checkpoints, columns = headline metrics; per-tag tables follow unless ``brief``."""
    cols = headline_metrics(results)
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for ckpt, metrics in results.items():
        lines.append(f"| {ckpt} | " + " | ".join(f"{metrics.get(c, float('nan')):.3f}" for c in cols) + " |")
    if brief:
        return "\n".join(lines)
    tagged = sorted({k for m in results.values() for k in m if k.count("/") == 2})
    out = ["# Evaluation results", "",
           f"{config.get('num_steps')} sampling steps, CFG {config.get('guidance_scale')}, seed "
           f"{config.get('seed')}, {config.get('images_per_prompt')} image(s) per prompt, model "
           f"`{_short_path(config.get('model', {}).get('path'), config.get('paths', {}).get('root_dir'))}`.",
           "", *lines]
    if tagged:
        out += ["", "## Per tag", "", "| checkpoint | " + " | ".join(tagged) + " |", "|---" * (len(tagged) + 1) + "|"]
        for ckpt, metrics in results.items():
            out.append(f"| {ckpt} | " + " | ".join(f"{metrics.get(c, float('nan')):.3f}" for c in tagged) + " |")
    return "\n".join(out) + "\n"


def _short_path(path: str | None, root: str | None) -> str | None:
    """``path`` relative to the repository root when it lies inside it (portable reports)."""
    if path and root and Path(path).is_relative_to(root):
        return str(Path(path).relative_to(root))
    return path


def bar_chart(results: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars: one group per headline metric, one bar per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = headline_metrics(results)
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cols)), 3.6))
    for i, (ckpt, metrics) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [metrics.get(c, 0.0) for c in cols], width, label=ckpt)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_task(report: Report, backbone: Any, ckpt: str, task: EvalTask, *, num_steps: int,
               guidance_scale: float, shift: float, seed: int, images_per_prompt: int, batch_size: int) -> None:
    """Generate ``images_per_prompt`` images for every prompt of ``task``, score them, record."""
    rows = [r for r in task.rows for _ in range(images_per_prompt)]
    images = []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"{ckpt}/{task.name}", unit="batch"):
        chunk = rows[start : start + batch_size]
        images.append(generate(backbone, [r["prompt"] for r in chunk], num_steps=num_steps,
                               guidance_scale=guidance_scale, shift=shift, seed=seed + start,
                               batch_size=batch_size))
    all_images = torch.cat(images)
    prompts = [r["prompt"] for r in rows]
    scores: dict[str, Tensor] = {}
    for name, reward in task.rewards.items():
        for key, value in reward.score(all_images, prompts, rows).items():
            scores[f"{name}" if key == "reward" else f"{name}_{key}"] = value
    report.add(ckpt, task.name, rows, all_images, scores)
