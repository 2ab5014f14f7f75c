"""Which ``results.json`` keys are the headlines, and what an evaluation folder holds.

The headline metrics are the ``table`` entries of ``conf/eval_tasks/<suite>.yaml`` (the same ones
``python -m opd.evaluate`` puts in its main table): task name = top-level key, results key =
``<task>/<reward key>`` (:mod:`opd.evaluation.report`). Nothing here names a metric itself.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from opd.config import config_dir
from opd.evaluation.checkpoints import parse_checkpoints
from opd.evaluation.report import checkpoint_rows

CONF_DIR = config_dir()


def _suite(suite: str, conf_dir: Path | None) -> DictConfig:
    path = Path(conf_dir or CONF_DIR) / "eval_tasks" / f"{suite}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such evaluation suite (conf/eval_tasks/<suite>.yaml)")
    return OmegaConf.load(path)


def headline_keys(suite: str = "mini", conf_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """``{task: {column title: "<task>/<reward key>"}}``, in the file's order; tasks without a
    ``table`` are left out."""
    out: dict[str, dict[str, str]] = {}
    for task, node in _suite(suite, conf_dir).items():
        if task == "defaults" or not isinstance(node, DictConfig) or not node.get("table"):
            continue
        out[str(task)] = {str(title): f"{task}/{key}" for title, key in node.table.items()}
    return out


def columns(suite: str = "mini", conf_dir: Path | None = None) -> dict[str, str]:
    """Every headline as ``{column title: results key}``; a title that two tasks share is written
    ``<title> (<task>)``."""
    keys = headline_keys(suite, conf_dir)
    titles = [title for table in keys.values() for title in table]
    return {(title if titles.count(title) == 1 else f"{title} ({task})"): key
            for task, table in keys.items() for title, key in table.items()}


def own_metrics(suite: str = "mini", conf_dir: Path | None = None) -> dict[str, str]:
    """``{task: results key}``: the metric a task is judged by, its first ``table`` entry (a teacher
    of the task is picked by it, a student's share of the teacher's gain is measured on it)."""
    return {task: next(iter(table.values())) for task, table in headline_keys(suite, conf_dir).items()}


def averages(suite: str = "mini", conf_dir: Path | None = None) -> dict[str, str]:
    """``{task: "image" | "tag"}``: how each task's headline averages its images (``average`` in the
    suite's file, default ``image``; :class:`opd.evaluation.tasks.EvalTask`)."""
    return {str(task): str(node.get("average", "image")) for task, node in _suite(suite, conf_dir).items()
            if task != "defaults" and isinstance(node, DictConfig)}


def reward_names(suite: str = "mini", conf_dir: Path | None = None) -> dict[str, list[str]]:
    """``{task: reward keys}``: the keys of the task's ``rewards`` (training logs name rewards by
    them); a task whose rewards come from the defaults list gets its ``table`` keys instead."""
    out = {}
    for task, node in _suite(suite, conf_dir).items():
        if task == "defaults" or not isinstance(node, DictConfig):
            continue
        rewards = node.get("rewards")
        names = list(rewards) if isinstance(rewards, DictConfig) else list((node.get("table") or {}).values())
        out[str(task)] = [str(n) for n in names]
    return out


def evaluated_rows(results: Path) -> dict[str, dict[str, float]]:
    """The checkpoints' rows of a ``results.json`` of ``python -m opd.evaluate`` (the cover row left out)."""
    results = Path(results)
    if not results.is_file():
        raise FileNotFoundError(f"{results}: no such results.json (run python -m opd.evaluate first)")
    return checkpoint_rows(json.loads(results.read_text()))


def guidance_scales(results: Path) -> dict[str, float]:
    """``{row: CFG scale it was sampled at}`` from the evaluation's own ``.hydra/config.yaml`` beside
    ``results``; empty when that file is missing."""
    config = Path(results).parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    cfg = OmegaConf.load(config)
    default = OmegaConf.select(cfg, "guidance_scale", throw_on_resolution_failure=False)
    spec = OmegaConf.to_container(cfg.checkpoints, resolve=True) if cfg.get("checkpoints") else {}
    if not isinstance(default, (int, float)):  # an unresolvable default: only explicit per-checkpoint scales
        spec = {k: v for k, v in spec.items() if isinstance(v, dict) and "guidance_scale" in v}
        default = float("nan")
    return {c.name: c.guidance_scale for c in parse_checkpoints(spec, default)} if spec else {}


def with_interval(metrics: Mapping[str, float], key: str) -> str:
    """``0.183 [0.15, 0.21]``: the value and, where the row has it, its 95 % interval; ``–`` without it."""
    if key not in metrics:
        return "–"
    low, high = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
    return f"{metrics[key]:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")
