"""Evaluation entry point: ``python -m opd.evaluate [checkpoints.<name>=<adapter>] ...``.

Generates every task's test prompts with every checkpoint (the base model and LoRA adapters on
it), scores them with the task's rewards and writes, under the run folder:
``results.json`` (checkpoint → metric → value, per-tag accuracies included), ``results.md``,
``scores.png`` (bar chart), ``grids/<checkpoint>_<task>.png``, ``images/…png`` and
``samples.jsonl`` (one line per image with its prompt, metadata and scores).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import opd.config  # noqa: F401 — registers the structured-config schemas
from opd.evaluation.report import EvalTask, Report, score_task
from opd.models.lora import active_adapter, adapter_names, load_lora

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def build_tasks(cfg: DictConfig) -> dict[str, EvalTask]:
    """Instantiate prompt sets and rewards; empty or missing prompt files fail here, early."""
    tasks = {}
    for name, spec in cfg.eval_tasks.items():
        rows = list(hydra.utils.instantiate(spec.prompts))
        if cfg.max_prompts:
            rows = rows[: cfg.max_prompts]
        if not rows:
            raise ValueError(f"eval_tasks.{name}: the prompt set is empty")
        rewards = {k: hydra.utils.instantiate(r) for k, r in spec.rewards.items()}
        tasks[name] = EvalTask(name, rows, rewards)
    return tasks


def load_checkpoints(backbone: Any, checkpoints: dict[str, str | None]) -> None:
    """Load each named adapter (missing/corrupt files fail before any sampling)."""
    for name, path in checkpoints.items():
        if path is not None:
            load_lora(backbone.transformer, path, name)


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = build_tasks(cfg)
    backbone = hydra.utils.instantiate(cfg.model)().to(device).eval()
    load_checkpoints(backbone, dict(cfg.checkpoints))
    report = Report(Path(cfg.output_dir), grid_size=cfg.grid_size)
    n_images = sum(len(t.rows) for t in tasks.values()) * cfg.images_per_prompt * len(cfg.checkpoints)
    log.info("evaluating %d checkpoint(s) on %s: %d images, %d steps, on %s", len(cfg.checkpoints),
             ", ".join(tasks), n_images, cfg.num_steps, device)
    for ckpt, path in cfg.checkpoints.items():
        adapter = ckpt if path is not None else None
        with active_adapter(backbone.transformer, adapter) if adapter_names(backbone.transformer) else nullcontext():
            for task in tasks.values():
                score_task(report, backbone, ckpt, task, num_steps=cfg.num_steps,
                           guidance_scale=cfg.guidance_scale, shift=cfg.sampler.shift, seed=cfg.seed,
                           images_per_prompt=cfg.images_per_prompt, batch_size=cfg.batch_size)
    report.write(OmegaConf.to_container(cfg, resolve=True))
    return report.results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
