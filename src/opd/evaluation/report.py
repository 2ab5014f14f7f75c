"""Generate → score → record: the pieces behind ``python -m opd.evaluate``.

Every rank generates and scores its share of the batches (:func:`score_task`), saving each image
and keeping one record per image (:meth:`Report.add`). Rank 0 then merges all records, computes
the metrics from them (so the report adds up what ``samples.jsonl`` shows) and writes the files.

``results.json`` maps each row to its metrics. The rows are the checkpoints, in order, then
``"cover"`` when any task searched a cover (the best constant image, :mod:`opd.evaluation.controls`;
no checkpoint may be called that). A metric is named by ``/``-separated parts:

- ``<task>/<key>``: the headline, the mean over images (over tag means for ``average: tag``);
- ``<task>/<key>/ci_low``, ``<task>/<key>/ci_high``: its 95 % prompt-clustered bootstrap
  interval (:mod:`opd.evaluation.bootstrap`);
- ``<task>/<key>/<tag>``: the mean over the tag's images (tasks with several tags);
- ``<task>/<key>/swapped`` (and ``…/swapped/ci_low``, ``…/swapped/ci_high``): the swapped-prompt
  control, the same images each scored against its partner prompt of the same tag, averaged alike;
- ``<task>/sensitivity``: prompt sensitivity divided by the base model's at the same CFG scale;
- ``<task>/sensitivity/raw``: prompt sensitivity itself, the mean per-pixel |difference| (images in
  [0, 1]) between two prompts' images drawn from the same noise.

Tags cannot be ``ci_low``, ``ci_high`` or ``swapped`` and no reward can be called ``sensitivity``
(:class:`~opd.evaluation.tasks.EvalTask` refuses them), so :func:`metric_kind` tells every name
apart. The ``cover`` row has headlines, intervals and per-tag means (no controls of its own).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from opd.callbacks.progress_log import log_progress
from opd.evaluation.bootstrap import bootstrap_ci, clustered_mean
from opd.evaluation.controls import Cover, sensitivity_differences
from opd.evaluation.distributed import Ranks
from opd.evaluation.seeds import image_seed
from opd.evaluation.tasks import SENSITIVITY, EvalTask
from opd.sampling import generate
from opd.utils.files import write_atomic
from opd.utils.grid import caption_grid, to_pil

__all__ = ["COVER", "EvalTask", "Report", "main_table", "metric_kind", "normalised_average", "score_task",
           "task_metrics"]

#: the results row of the cover images
COVER = "cover"
CI_LOW, CI_HIGH, SWAPPED, RAW = "ci_low", "ci_high", "swapped", "raw"


def metric_kind(name: str) -> str:
    """What a metric name is (module docstring): ``"headline"``, ``"ci"``, ``"tag"``, ``"swapped"``,
    ``"swapped_ci"``, ``"sensitivity"``, ``"sensitivity_raw"``, or ``"other"``."""
    parts = name.split("/")
    if len(parts) == 2:
        return "sensitivity" if parts[1] == SENSITIVITY else "headline"
    if len(parts) == 3:
        if parts[1] == SENSITIVITY:
            return "sensitivity_raw" if parts[2] == RAW else "other"
        return {CI_LOW: "ci", CI_HIGH: "ci", SWAPPED: "swapped"}.get(parts[2], "tag")
    if len(parts) == 4 and parts[2] == SWAPPED and parts[3] in (CI_LOW, CI_HIGH):
        return "swapped_ci"
    return "other"


def checkpoint_rows(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The checkpoints' rows of ``results`` (the cover row left out)."""
    return {k: v for k, v in results.items() if k != COVER}


@dataclass
class Report:
    """Per-image records of one rank; on rank 0, the merged metrics and the report files.

    ``bootstrap``: keyword arguments of :func:`~opd.evaluation.bootstrap.bootstrap_ci`
    (``num_resamples``, ``level``, ``seed``).
    """

    out_dir: Path
    grid_size: int = 32
    bootstrap: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    covers: dict[str, Cover] = field(default_factory=dict)

    def add(self, ckpt: str, task: str, rows: list[dict], images: Tensor, scores: dict[str, Tensor],
            start: int = 0, ids: list[tuple[int, int]] | None = None,
            swapped: list[tuple[int, dict[str, float]] | None] | None = None) -> None:
        """Save ``images`` (images ``start…`` of the task) and keep one record per image: ``ids[i]`` =
        (prompt index, image index) of image ``i`` (default: one image per prompt, prompt ``start + i``),
        ``swapped[i]`` = (partner prompt index, scores against it) or ``None``."""
        folder = self.out_dir / "images" / ckpt / task
        folder.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            file = folder / f"{start + i:05d}.png"
            to_pil(images[i]).save(file)
            prompt_index, image_index = ids[i] if ids is not None else (start + i, 0)
            other = swapped[i] if swapped is not None else None
            self.samples.append({"checkpoint": ckpt, "task": task, "index": start + i, "prompt_index": prompt_index,
                                 "image_index": image_index, "prompt": row["prompt"], "metadata": row,
                                 "image": str(file.relative_to(self.out_dir)),
                                 "scores": {k: float(v[i]) for k, v in scores.items()},
                                 "swapped": None if other is None else {"prompt_index": other[0], "scores": other[1]}})

    def merge(self, samples: list[dict[str, Any]], tasks: dict[str, EvalTask], checkpoints: list[str],
              sensitivity: dict[tuple[str, str], tuple[float, float]] | None = None) -> None:
        """Adopt every rank's records (in checkpoint, task, image order) and compute the metrics;
        ``sensitivity[(checkpoint, task)]`` = (its prompt sensitivity, the base model's at its CFG)."""
        rank_of = {(c, t): (i, j) for i, c in enumerate(checkpoints) for j, t in enumerate(tasks)}
        self.samples = sorted(samples, key=lambda s: (*rank_of[s["checkpoint"], s["task"]], s["index"]))
        self.results = {}
        grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for sample in self.samples:
            grouped[sample["checkpoint"], sample["task"]].append(sample)
        for ckpt in checkpoints:
            metrics = self.results.setdefault(ckpt, {})
            for name, task in tasks.items():
                metrics.update(task_metrics(task, grouped[ckpt, name], self.bootstrap))
                if sensitivity and (ckpt, name) in sensitivity:
                    own, base = sensitivity[ckpt, name]
                    metrics[f"{name}/{SENSITIVITY}"] = own / base if base > 0 else float("nan")
                    metrics[f"{name}/{SENSITIVITY}/{RAW}"] = own

    def add_cover(self, task: EvalTask, cover: Cover) -> None:
        """The cover's scores on the test rows become the ``cover`` row's metrics of ``task``."""
        self.covers[task.name] = cover
        samples = [{"prompt_index": m, "metadata": row, "scores": {k: float(v[m]) for k, v in cover.test_scores.items()}}
                   for m, row in enumerate(task.rows)]
        self.results.setdefault(COVER, {}).update(task_metrics(task, samples, self.bootstrap))

    def write(self, config: dict[str, Any], tasks: dict[str, EvalTask], guidance: dict[str, float],
              notes: list[str] = ()) -> None:
        """samples.jsonl, results.md, scores.png, one grid per checkpoint × task,
        ``grids/cover_<task>.png``, and last results.json (atomically: what ``make`` waits for,
        :mod:`opd.utils.files`)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(_rounded(s)) + "\n" for s in self.samples)
        columns = table_columns(self.results, tasks)
        (self.out_dir / "results.md").write_text(
            markdown_report(self.results, columns, guidance, config, notes, tasks, self.covers, self.bootstrap))
        bar_chart(checkpoint_rows(self.results), list(columns.values()), self.out_dir / "scores.png", list(columns))
        self.write_grids()
        write_atomic(self.out_dir / "results.json", json.dumps(self.results, indent=2, sort_keys=True))
        print(f"\nresults: {self.out_dir / 'results.md'}\n{notes_block(notes)}"
              f"{main_table(self.results, columns, guidance)[0]}"
              f"\nimages: {self.out_dir / 'grids'} (grids), {self.out_dir / 'images'} (every image), "
              f"{self.out_dir / 'samples.jsonl'}")

    def write_grids(self, compare_rows: int = 8) -> None:
        """``grids/<checkpoint>_<task>.png``: the first ``grid_size`` images, captioned with the
        first score and the prompt (read back from the saved images, whichever rank made them);
        with several checkpoints also ``grids/compare_<task>.png``: the first ``compare_rows``
        images (rows) as every checkpoint drew them (columns, in the checkpoints' order); for each
        cover, ``grids/cover_<task>.png``: the image, captioned with its scene's caption."""
        grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for sample in self.samples:
            grouped[sample["checkpoint"], sample["task"]].append(sample)
        grid_dir = self.out_dir / "grids"
        grid_dir.mkdir(parents=True, exist_ok=True)
        for (ckpt, task), samples in grouped.items():
            shown = samples[: self.grid_size]
            captions = [f"[{_first_score(s):.2f}] {s['prompt']}" for s in shown]
            caption_grid(self._load(shown), captions, num_cols=8).save(grid_dir / f"{ckpt}_{task}.png")
        for task, cover in self.covers.items():
            caption = f"cover ({cover.key} {cover.train_score:.2f} on train): {cover.caption}"
            caption_grid(cover.image[None], [caption], num_cols=1, scale=4).save(grid_dir / f"cover_{task}.png")
        checkpoints = list(dict.fromkeys(c for c, _ in grouped))
        if len(checkpoints) < 2:
            return
        for task in dict.fromkeys(t for _, t in grouped):
            n = min(compare_rows, *(len(grouped[c, task]) for c in checkpoints))
            shown = [grouped[c, task][i] for i in range(n) for c in checkpoints]  # row = image, column = checkpoint
            captions = [f"{s['checkpoint']} [{_first_score(s):.2f}]" + (f": {s['prompt']}" if s["checkpoint"] ==
                                                                         checkpoints[0] else "") for s in shown]
            caption_grid(self._load(shown), captions, num_cols=len(checkpoints)).save(grid_dir / f"compare_{task}.png")

    def _load(self, samples: list[dict[str, Any]]) -> Tensor:
        return torch.stack([torch.from_numpy(np.asarray(Image.open(self.out_dir / s["image"]).convert("RGB"),
                                                        dtype=np.float32) / 255).permute(2, 0, 1) for s in samples])


def _rounded(sample: dict[str, Any]) -> dict[str, Any]:
    """A record for samples.jsonl: scores rounded to 6 decimals."""
    out = {**sample, "scores": {k: round(v, 6) for k, v in sample["scores"].items()}}
    if sample.get("swapped"):
        out["swapped"] = {**sample["swapped"], "scores": {k: round(v, 6) for k, v in sample["swapped"]["scores"].items()}}
    return out


def _first_score(sample: dict[str, Any]) -> float:
    return next(iter(sample["scores"].values()), float("nan"))


def _headline_with_ci(prefix: str, groups: list[list[float]], strata: list[str] | None,
                      bootstrap: dict[str, Any]) -> dict[str, float]:
    low, high = bootstrap_ci(groups, strata, **bootstrap)
    return {prefix: clustered_mean(groups, strata), f"{prefix}/{CI_LOW}": low, f"{prefix}/{CI_HIGH}": high}


def task_metrics(task: EvalTask, samples: list[dict[str, Any]], bootstrap: dict[str, Any] | None = None
                 ) -> dict[str, float]:
    """Every score's headline ``task/key`` with its interval (``/ci_low``, ``/ci_high``), its per-tag
    means ``task/key/<tag>`` (when the task has several tags) and, when the records carry swapped
    scores, the swapped-prompt control ``task/key/swapped`` with its interval.

    Records are grouped by prompt (``prompt_index``) for the prompt-clustered bootstrap; a task
    averaged by tag averages (and resamples) within each prompt's tag. The swapped control groups
    each image by its own prompt; tags without partners (a single distinct prompt) drop out of it.
    """
    if not samples:
        return {}
    bootstrap = bootstrap or {}
    by_prompt: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_prompt[s.get("prompt_index", s.get("index"))].append(s)
    prompts = sorted(by_prompt)
    tag_of = {p: task.tag(by_prompt[p][0]["metadata"]) for p in prompts}
    several_tags = len(set(tag_of.values())) > 1
    swapped = [p for p in prompts if all(s.get("swapped") for s in by_prompt[p])]
    metrics: dict[str, float] = {}
    for key in samples[0]["scores"]:
        name = f"{task.name}/{key}"
        groups = [[s["scores"][key] for s in by_prompt[p]] for p in prompts]
        strata = [tag_of[p] for p in prompts] if task.average == "tag" else None
        metrics.update(_headline_with_ci(name, groups, strata, bootstrap))
        if several_tags:
            by_tag: dict[str, list[float]] = defaultdict(list)
            for p, values in zip(prompts, groups):
                by_tag[tag_of[p]] += values
            metrics.update({f"{name}/{tag}": sum(vs) / len(vs) for tag, vs in sorted(by_tag.items())})
        if swapped:
            groups = [[s["swapped"]["scores"][key] for s in by_prompt[p]] for p in swapped]
            strata = [tag_of[p] for p in swapped] if task.average == "tag" else None
            metrics.update(_headline_with_ci(f"{name}/{SWAPPED}", groups, strata, bootstrap))
    return metrics


def headline_metrics(results: dict[str, dict[str, float]]) -> list[str]:
    """Headline metric names (``task/key``), in first-seen order."""
    names: list[str] = []
    for metrics in results.values():
        names += [k for k in metrics if metric_kind(k) == "headline" and k not in names]
    return names


def table_columns(results: dict[str, dict[str, float]], tasks: dict[str, EvalTask]) -> dict[str, str]:
    """Column header → metric of the main table: the tasks' ``table`` entries, else every headline."""
    columns = {header: f"{name}/{key}" for name, task in tasks.items() for header, key in task.table.items()}
    return columns or {m: m for m in headline_metrics(checkpoint_rows(results))}


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def _fmt_ci(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def cell(metrics: dict[str, float], name: str) -> str:
    """``metrics[name]`` for a table: ``0.213 [0.18, 0.25]`` when its interval is there, ``–`` when absent."""
    if name not in metrics:
        return "–"
    low, high = metrics.get(f"{name}/{CI_LOW}"), metrics.get(f"{name}/{CI_HIGH}")
    interval = f" [{_fmt_ci(low)}, {_fmt_ci(high)}]" if low is not None and high is not None else ""
    return _fmt(metrics[name]) + interval


def normalised_average(results: dict[str, dict[str, float]], columns: list[str]
                       ) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Per checkpoint, the mean over ``columns`` of ``(x − min) / (max − min)`` with the bounds taken
    over the checkpoints in ``results`` (columns where all of them tie carry no information and are
    left out; so are differences at float32 rounding, which would otherwise be blown up to 0 vs 1);
    returns the averages and the bounds used. The cover row, if any, takes no part."""
    results = checkpoint_rows(results)
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
    """The paper's Table 1 layout (rows = checkpoints, columns = metrics with their 95 % intervals,
    normalised average) and the line stating the average's bounds. The cover row is not a
    checkpoint: it is in the controls (:func:`controls_section`)."""
    results = checkpoint_rows(results)
    averages, bounds = normalised_average(results, list(columns.values()))
    lines = ["| checkpoint | CFG | " + " | ".join(columns) + " | avg (min–max norm.) |",
             "|---" * (len(columns) + 3) + "|"]
    for ckpt, metrics in results.items():
        cells = [cell(metrics, m) for m in columns.values()]
        lines.append(f"| {ckpt} | {guidance.get(ckpt, float('nan')):g} | " + " | ".join(cells)
                     + f" | {_fmt(averages[ckpt])} |")
    header_of = {m: h for h, m in columns.items()}
    stated = ", ".join(f"{header_of[m]} [{_fmt(lo)}, {_fmt(hi)}]" for m, (lo, hi) in bounds.items())
    tied = [h for h, m in columns.items() if m not in bounds]
    note = (f"avg (min–max norm.): each column rescaled to [0, 1] between its min and max over the "
            f"{len(results)} checkpoint(s) above, then averaged; bounds: {stated or 'none'}"
            + (f"; left out (all checkpoints tie): {', '.join(tied)}" if tied else "") + ".")
    return "\n".join(lines) + "\n", note


def notes_block(notes: list[str]) -> str:
    return "".join(f"> **{note}**\n\n" for note in notes)


def _metric_table(results: dict[str, dict[str, float]], cols: list[str], with_ci: bool = False) -> list[str]:
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for ckpt, metrics in results.items():
        cells = [cell(metrics, c) if with_ci else (_fmt(metrics[c]) if c in metrics else "–") for c in cols]
        lines.append(f"| {ckpt} | " + " | ".join(cells) + " |")
    return lines


def controls_section(results: dict[str, dict[str, float]], tasks: dict[str, EvalTask],
                     covers: dict[str, Cover]) -> list[str]:
    """results.md's "Controls": per task, each checkpoint's scores on its own prompts and on the
    swapped prompts, its prompt sensitivity, and the cover image's scores."""
    rows = checkpoint_rows(results)
    out: list[str] = []
    for name, task in tasks.items():
        keys = list(task.table.values()) or [k.split("/", 1)[1] for k in headline_metrics(rows) if
                                             k.startswith(f"{name}/")]
        headers = list(task.table) or keys
        metric = [f"{name}/{k}" for k in keys]
        def has(m: str) -> bool:
            return any(m in r for r in results.values())

        if not any(has(f"{m}/{SWAPPED}") for m in metric) and not has(f"{name}/{SENSITIVITY}") and name not in covers:
            continue
        lines = [f"### {name}", "", "| row | " + " | ".join(headers) + " | prompt sensitivity |",
                 "|---" * (len(headers) + 2) + "|"]
        for ckpt, m in rows.items():
            sens = m.get(f"{name}/{SENSITIVITY}")
            raw = m.get(f"{name}/{SENSITIVITY}/{RAW}")
            sens_cell = "–" if sens is None else f"{_fmt(sens)} (Δ {raw:.4f})"
            lines.append(f"| {ckpt} | " + " | ".join(cell(m, x) for x in metric) + f" | {sens_cell} |")
            if any(f"{x}/{SWAPPED}" in m for x in metric):
                lines.append(f"| {ckpt}, swapped prompts | "
                             + " | ".join(cell(m, f"{x}/{SWAPPED}") for x in metric) + " | |")
        if name in covers:
            cover = covers[name]
            lines.append("| cover image | " + " | ".join(cell(results.get(COVER, {}), x) for x in metric) + " | |")
            lines += ["", (f"Cover: scene {cover.index} of {cover.num_scenes} random scenes, captioned "
                          f"“{cover.caption}”; chosen by `{cover.key}` = {_fmt(cover.train_score)} on "
                          f"{cover.num_train_rows} training prompts (`grids/cover_{name}.png`).")]
        out += [*lines, ""]
    if not out:
        return []
    intro = [
        "## Controls", "",
        ("- *swapped prompts*: the checkpoint's images, each scored against another prompt of the same tag (a fixed "
        "derangement that never pairs a prompt with an identical one). Close to the row above = the score does not "
        "depend on following the prompt."),
        ("- *cover image*: the one constant image, among random mini-world scenes, that scores best on the task's "
        "training prompts, scored on the test prompts: what drawing that image for every prompt earns."),
        ("- *prompt sensitivity*: mean per-pixel |difference| between the images of two different prompts drawn "
        "from the same noise (fixed prompt pairs; Δ in brackets, images in [0, 1]), divided by the base model's "
        "(adapter off) at the same CFG scale: 1 = as prompt-dependent as the base, ~0 = one image for every prompt."),
        "",
    ]
    return intro + out


def markdown_report(results: dict[str, dict[str, float]], columns: dict[str, str], guidance: dict[str, float],
                    config: dict[str, Any], notes: list[str] = (), tasks: dict[str, EvalTask] | None = None,
                    covers: dict[str, Cover] | None = None, bootstrap: dict[str, Any] | None = None) -> str:
    """results.md: notes, settings, the main table and its bounds, the controls, all metrics,
    per-tag metrics."""
    table, bounds = main_table(results, columns, guidance)
    rows = checkpoint_rows(results)
    out = ["# Evaluation results", "", notes_block(notes) +
           f"{config.get('num_steps')} sampling steps, seed {config.get('seed')}, "
           f"{config.get('images_per_prompt')} image(s) per prompt, model "
           f"`{_model_name(config)}`; "
           "CFG per checkpoint in the table.", "", table, bounds]
    if any(metric_kind(k) == "ci" for m in results.values() for k in m):
        b = bootstrap or {}
        out += ["", (f"In brackets: {100 * b.get('level', 0.95):g} % intervals, percentile bootstrap over the "
                    f"prompts ({b.get('num_resamples', 1000):,} resamples, seed {b.get('seed', 0)}; all images of "
                    "a prompt resampled together, within each tag for tasks averaged by tag).")]
    if tasks:
        section = controls_section(results, tasks, covers or {})
        if section:
            out += ["", *section]
    headline = headline_metrics(rows)
    if headline != list(columns.values()):
        out += ["", "## All metrics", "", *_metric_table(rows, headline, with_ci=True)]
    tagged = sorted({k for m in results.values() for k in m if metric_kind(k) == "tag"})
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
    """Grouped bars: one group per metric in ``cols``, one bar per checkpoint, with the 95 %
    intervals as error bars where the metrics have them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cols)), 3.6))
    for i, (ckpt, metrics) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(cols))]
        values = [metrics.get(c, 0.0) for c in cols]
        err = np.array([[max(0.0, v - metrics.get(f"{c}/{CI_LOW}", v)), max(0.0, metrics.get(f"{c}/{CI_HIGH}", v) - v)]
                        for c, v in zip(cols, values)]).T.reshape(2, len(cols))
        ax.bar(xs, values, width, label=ckpt, yerr=err if err.any() else None, capsize=2)
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
               ranks: Ranks | None = None, swapped: bool = True, pairs: list[tuple[int, int]] | None = None
               ) -> dict[int, float]:
    """Generate ``images_per_prompt`` images per prompt of ``task``, score and record them.

    Image ``j`` of prompt ``p`` is number ``p · images_per_prompt + j`` of the task; its initial
    noise is seeded with :func:`~opd.evaluation.seeds.image_seed` ``(seed, p, j)``, so it does not
    depend on the batch size, on how many ranks share the work, or on ``images_per_prompt``. The
    images are cut into batches of ``batch_size``; this rank takes every ``world_size``-th batch.
    With ``swapped``, each image is also scored against its partner prompt (``task.partners``).
    ``pairs`` (:func:`~opd.evaluation.controls.sensitivity_pairs`): prompt sensitivity, measured on
    the pairs whose first image is in this rank's batches; returns ``{pair index: pixel difference}``.
    """
    ranks = ranks or Ranks()
    ids = [(p, j) for p in range(len(task.rows)) for j in range(images_per_prompt)]
    first_of = {(i, 0): k for k, (i, _) in enumerate(pairs or [])}
    starts = ranks.shard(range(0, len(ids), batch_size))
    firsts: dict[int, Tensor] = {}
    share = f" (rank 0's share of {ranks.world_size} ranks)" if ranks.world_size > 1 else ""
    desc = f"checkpoint {ckpt}, task {task.name}{share}"  # a tqdm bar on a terminal, else a log line per batch
    for start in log_progress(starts, desc, enabled=ranks.is_main):
        chunk = ids[start : start + batch_size]
        rows = [task.rows[p] for p, _ in chunk]
        images = generate(backbone, [r["prompt"] for r in rows], num_steps=num_steps, guidance_scale=guidance_scale,
                          shift=shift, batch_size=batch_size, seeds=[image_seed(seed, p, j) for p, j in chunk])
        firsts.update({first_of[pid]: images[i] for i, pid in enumerate(chunk) if pid in first_of})
        scores = task.score(images.to(backbone.device), rows)
        others: list[tuple[int, dict[str, float]] | None] = [None] * len(chunk)
        paired = [i for i, (p, _) in enumerate(chunk) if swapped and task.partners[p] is not None]
        if paired:
            partner_rows = [task.rows[task.partners[chunk[i][0]]] for i in paired]
            swapped_scores = task.score(images[paired].to(backbone.device), partner_rows)
            for n, i in enumerate(paired):
                others[i] = (task.partners[chunk[i][0]], {k: float(v[n]) for k, v in swapped_scores.items()})
        report.add(ckpt, task.name, rows, images, scores, start, ids=chunk, swapped=others)
    if not pairs:
        return {}
    return sensitivity_differences(backbone, task.rows, pairs, seed=seed, num_steps=num_steps,
                                   guidance_scale=guidance_scale, shift=shift, batch_size=batch_size, firsts=firsts)
