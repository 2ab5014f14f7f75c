"""Evaluation entry point: ``python -m opd.evaluate [checkpoints.<name>=<adapter>] ...``.

Generates every task's test prompts with every checkpoint (the base model and LoRA adapters on
it, each at its own CFG scale if given), scores them with the task's rewards and writes, under
the run folder: ``results.json`` (checkpoint → metric → value, per-tag accuracies included),
``results.md`` (the paper's Table 1 layout plus a min–max normalised average), ``scores.png``
(bar chart), ``grids/<checkpoint>_<task>.png``, ``grids/compare_<task>.png`` (with several
checkpoints: the same prompts side by side), ``images/…png`` and ``samples.jsonl`` (one line
per image with its prompt, metadata and scores). Under ``torchrun --nproc_per_node N`` the batches
are shared among the ranks and rank 0 writes the report (:mod:`opd.evaluation.distributed`).
"""
from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

import opd.config  # noqa: F401 — registers the structured-config schemas
from opd.evaluation.checkpoints import Checkpoint, parse_checkpoints
from opd.evaluation.distributed import Ranks, init_ranks
from opd.evaluation.report import EvalTask, Report, score_task
from opd.models.lora import active_adapter, adapter_names, load_lora
from opd.rewards.base import Reward

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
RANDOM_FLAG = "random_weights_for_tests"


def load_prompt_sets(cfg: DictConfig) -> dict[str, list[dict[str, Any]]]:
    """Every task's prompt rows, read before any model loads: a missing or empty file fails first."""
    sets = {}
    for name, spec in cfg.eval_tasks.items():
        try:
            rows = list(hydra.utils.instantiate(spec.prompts))
        except InstantiationException as err:
            raise InstantiationException(f"eval_tasks.{name}.prompts: {err}\n(point it at your file with "
                                         f"eval_tasks.{name}.prompts.path=<file>, or leave the task out with "
                                         f"~eval_tasks.{name})") from err
        rows = rows[: cfg.max_prompts] if cfg.max_prompts else rows
        if not rows:
            raise ValueError(f"eval_tasks.{name}: the prompt set is empty")
        sets[name] = rows
    return sets


def takes_random_flag(spec: DictConfig) -> bool:
    """Whether the reward's class can build random-weight stand-ins (``random_weights_for_tests``)."""
    return RANDOM_FLAG in inspect.signature(hydra.utils.get_object(spec._target_)).parameters


def build_reward(spec: DictConfig, random_weights: bool) -> Reward:
    """Instantiate one reward; ``random_weights`` reaches the rewards that take ``random_weights_for_tests``."""
    flag = {RANDOM_FLAG: True} if random_weights and takes_random_flag(spec) else {}
    return hydra.utils.instantiate(spec, **flag)


def build_tasks(cfg: DictConfig, prompt_sets: dict[str, list[dict[str, Any]]]) -> dict[str, EvalTask]:
    """Tasks with their rewards; a reward configured identically for several tasks is built once."""
    built: dict[str, Reward] = {}
    tasks = {}
    for name, spec in cfg.eval_tasks.items():
        rewards = {}
        for key, reward_cfg in spec.rewards.items():
            ident = OmegaConf.to_yaml(reward_cfg, resolve=True)
            if ident not in built:
                built[ident] = build_reward(reward_cfg, cfg.get(RANDOM_FLAG, False))
            rewards[key] = built[ident]
        tasks[name] = EvalTask(name, prompt_sets[name], rewards, average=spec.get("average", "image"),
                               table=dict(spec.get("table") or {}))
    return tasks


def load_checkpoints(backbone: Any, checkpoints: list[Checkpoint]) -> None:
    """Load each named adapter (missing/corrupt files fail before any sampling)."""
    for ckpt in checkpoints:
        if ckpt.adapter is not None:
            load_lora(backbone.transformer, ckpt.adapter, ckpt.name)


def random_weight_notes(cfg: DictConfig) -> list[str]:
    """Warnings for results.md when any reward runs on random-weight stand-ins."""
    if not cfg.get(RANDOM_FLAG, False):
        return []
    names = sorted({key for spec in cfg.eval_tasks.values() for key, reward in spec.rewards.items()
                    if takes_random_flag(reward)})
    return [(f"RANDOM-WEIGHT STAND-INS ({RANDOM_FLAG}=true): rewards {', '.join(names) or 'none'} use randomly "
             "initialised networks. These numbers are meaningless; the run only tests the pipeline.")]


def resolve_device(device: str, ranks: Ranks) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{ranks.local_rank}" if device == "cuda" and ranks.world_size > 1 else device


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    ranks = init_ranks()
    device = resolve_device(cfg.device, ranks)
    checkpoints = parse_checkpoints(OmegaConf.to_container(cfg.checkpoints, resolve=True), cfg.guidance_scale)
    tasks = build_tasks(cfg, load_prompt_sets(cfg))
    backbone = hydra.utils.instantiate(cfg.model)().to(device).eval()
    load_checkpoints(backbone, checkpoints)
    report = Report(Path(ranks.broadcast(str(cfg.output_dir))), grid_size=cfg.grid_size)
    n_images = sum(len(t.rows) for t in tasks.values()) * cfg.images_per_prompt * len(checkpoints)
    log.info("evaluating %d checkpoint(s) on %s: %d images, %d steps, on %s (rank %d of %d)", len(checkpoints),
             ", ".join(tasks), n_images, cfg.num_steps, device, ranks.rank, ranks.world_size)
    for ckpt in checkpoints:
        adapter = ckpt.name if ckpt.adapter is not None else None
        with active_adapter(backbone.transformer, adapter) if adapter_names(backbone.transformer) else nullcontext():
            for task in tasks.values():
                score_task(report, backbone, ckpt.name, task, num_steps=cfg.num_steps,
                           guidance_scale=ckpt.guidance_scale, shift=cfg.sampler.shift, seed=cfg.seed,
                           images_per_prompt=cfg.images_per_prompt, batch_size=cfg.batch_size, ranks=ranks)
    gathered = ranks.gather(report.samples)
    if ranks.is_main:
        report.merge([s for part in gathered for s in part], tasks, [c.name for c in checkpoints])
        report.write(OmegaConf.to_container(cfg, resolve=True), tasks,
                     {c.name: c.guidance_scale for c in checkpoints}, random_weight_notes(cfg))
    return ranks.broadcast(report.results)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
