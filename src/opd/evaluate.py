"""Evaluation entry point: ``python -m opd.evaluate [checkpoints.<name>=<adapter>] ...``.

Generates every task's test prompts with every checkpoint (the base model and LoRA adapters on
it, each at its own CFG scale if given), ``images_per_prompt`` images per prompt, each from its own
noise seed (:mod:`opd.evaluation.seeds`: the same image whatever the batch size or rank count),
scores them with the task's rewards and writes, under the run folder: ``results.json``
(row → metric → value; the key scheme is in :mod:`opd.evaluation.report`), ``results.md`` (the
paper's Table 1 layout with 95 % prompt-clustered bootstrap intervals, a min–max normalised average,
the controls, all metrics and per-tag means), ``scores.png`` (bar chart with the intervals),
``grids/<checkpoint>_<task>.png``, ``grids/compare_<task>.png`` (with several checkpoints: the same
prompts side by side), ``grids/cover_<task>.png``, ``images/…png`` and ``samples.jsonl`` (one line
per image with its prompt, metadata, scores and swapped-prompt scores).

Controls (:mod:`opd.evaluation.controls`, settings under ``controls`` in conf/eval.yaml): each
image is also scored against another prompt of its tag (``controls.swapped``); each checkpoint's
prompt sensitivity is measured on ``controls.sensitivity_pairs`` prompt pairs against the base model
(adapter off) at the same CFG scale; and a task with a ``cover`` entry gets a ``cover`` row: the best
constant image among random mini-world scenes, found on its training prompts.

Under ``torchrun --nproc_per_node N`` the batches (and sensitivity pairs) are shared among the
ranks and rank 0 searches the covers and writes the report (:mod:`opd.evaluation.distributed`).
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
from opd.data.prompt_files import MAX_PROMPT_CHARS
from opd.evaluation.checkpoints import Checkpoint, parse_checkpoints
from opd.evaluation.controls import find_cover, sensitivity_differences, sensitivity_pairs, subsample
from opd.evaluation.distributed import Ranks, init_ranks
from opd.evaluation.report import Report, score_task
from opd.evaluation.tasks import CoverSpec, EvalTask
from opd.models.lora import active_adapter, adapter_names, load_lora, resolve_lora_file
from opd.rewards.base import Reward
from opd.validate import validate_eval_config

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
RANDOM_FLAG = "random_weights_for_tests"


def _instantiate_prompts(spec: DictConfig, where: str) -> list[dict[str, Any]]:
    try:
        rows = list(hydra.utils.instantiate(spec))
    except InstantiationException as err:
        raise InstantiationException(f"{where}: {err}\n(point it at your file with {where}.path=<file>, or leave "
                                     f"it out with ~{where.rsplit('.', 1)[0]})") from err
    if not rows:
        raise ValueError(f"{where}: the prompt set is empty")
    for number, row in enumerate(rows):
        prompt = row.get("prompt") if hasattr(row, "get") else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: row {number} has no prompt text ({row!r:.120}); each row needs a 'prompt'")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{where}: prompt {number} has {len(prompt)} characters, more than any text encoder here "
                             f"reads (limit {MAX_PROMPT_CHARS}; the mini model reads 48 bytes, CLIP 77 tokens): "
                             f"{prompt[:60]!r}...; fix the prompt set")
    return rows


def load_prompt_sets(cfg: DictConfig) -> dict[str, list[dict[str, Any]]]:
    """Every task's prompt rows, read before any model loads: a missing or empty file fails first."""
    sets = {}
    for name, spec in cfg.eval_tasks.items():
        rows = _instantiate_prompts(spec.prompts, f"eval_tasks.{name}.prompts")
        sets[name] = rows if cfg.max_prompts is None else rows[: cfg.max_prompts]  # validated ≥ 1
    return sets


def cover_specs(cfg: DictConfig) -> dict[str, CoverSpec]:
    """Each task's cover search: its ``cover`` entry (``prompts``: the training prompts to search on;
    any of ``num_scenes``, ``num_train_prompts``, ``seed`` overrides ``controls.cover``). Tasks
    without one, or every task when ``controls.cover`` is null, have none. The prompts are read
    here, before any model loads."""
    defaults = cfg.get("controls", {}).get("cover")
    if defaults is None:
        return {}
    specs = {}
    for name, spec in cfg.eval_tasks.items():
        cover = spec.get("cover")
        if cover is None:
            continue
        settings = {**OmegaConf.to_container(defaults, resolve=True),
                    **{k: v for k, v in OmegaConf.to_container(cover, resolve=True).items() if k != "prompts"}}
        unknown = set(settings) - {"num_scenes", "num_train_prompts", "seed"}
        if unknown:
            raise ValueError(f"eval_tasks.{name}.cover: unknown key(s) {sorted(unknown)}")
        rows = _instantiate_prompts(cover.prompts, f"eval_tasks.{name}.cover.prompts")
        specs[name] = CoverSpec(subsample(rows, settings["num_train_prompts"], settings["seed"]),
                                num_scenes=int(settings["num_scenes"]), seed=int(settings["seed"]))
    return specs


def takes_random_flag(spec: DictConfig) -> bool:
    """Whether the reward's class can build random-weight stand-ins (``random_weights_for_tests``)."""
    return RANDOM_FLAG in inspect.signature(hydra.utils.get_object(spec._target_)).parameters


def build_reward(spec: DictConfig, random_weights: bool) -> Reward:
    """Instantiate one reward; ``random_weights`` reaches the rewards that take ``random_weights_for_tests``."""
    flag = {RANDOM_FLAG: True} if random_weights and takes_random_flag(spec) else {}
    return hydra.utils.instantiate(spec, **flag)


def build_tasks(cfg: DictConfig, prompt_sets: dict[str, list[dict[str, Any]]],
                covers: dict[str, CoverSpec] | None = None) -> dict[str, EvalTask]:
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
                               table=dict(spec.get("table") or {}), cover=(covers or {}).get(name))
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


def _adapter_context(backbone: Any, adapter: str | None):
    transformer = backbone.transformer
    return active_adapter(transformer, adapter) if adapter_names(transformer) else nullcontext()


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    validate_eval_config(cfg)  # every bad value fails here, before anything is built (opd.validate)
    ranks = init_ranks()
    device = resolve_device(cfg.device, ranks)
    checkpoints = parse_checkpoints(OmegaConf.to_container(cfg.checkpoints, resolve=True), cfg.guidance_scale)
    for ckpt in checkpoints:  # a missing adapter fails now, not after the model has loaded
        if ckpt.adapter is not None:
            resolve_lora_file(ckpt.adapter)
    controls = cfg.get("controls") or {}
    tasks = build_tasks(cfg, load_prompt_sets(cfg), cover_specs(cfg))
    backbone = hydra.utils.instantiate(cfg.model)().to(device).eval()
    load_checkpoints(backbone, checkpoints)
    bootstrap = OmegaConf.to_container(controls.get("bootstrap"), resolve=True) if controls.get("bootstrap") else {}
    report = Report(Path(ranks.broadcast(str(cfg.output_dir))), grid_size=cfg.grid_size, bootstrap=bootstrap)
    n_images = sum(len(t.rows) for t in tasks.values()) * cfg.images_per_prompt * len(checkpoints)
    log.info("evaluating %d checkpoint(s) on %s: %d images, %d steps, on %s (rank %d of %d)", len(checkpoints),
             ", ".join(tasks), n_images, cfg.num_steps, device, ranks.rank, ranks.world_size)
    pairs = {name: sensitivity_pairs(t.rows, int(controls.get("sensitivity_pairs", 0) or 0))
             for name, t in tasks.items()}
    # prompt sensitivity, per (adapter, CFG) and task: this rank's {pair: pixel difference}
    differences: dict[tuple[str | None, float, str], dict[int, float]] = {}

    def reference_sensitivity(adapter: str | None, guidance: float) -> None:
        for name, task in tasks.items():
            if pairs[name] and (adapter, guidance, name) not in differences:
                differences[adapter, guidance, name] = sensitivity_differences(
                    backbone, task.rows, pairs[name], seed=cfg.seed, num_steps=cfg.num_steps,
                    guidance_scale=guidance, shift=cfg.sampler.shift, batch_size=cfg.batch_size, ranks=ranks)

    for ckpt in checkpoints:
        adapter = ckpt.name if ckpt.adapter is not None else None
        with _adapter_context(backbone, adapter):
            for name, task in tasks.items():
                differences[adapter, ckpt.guidance_scale, name] = score_task(
                    report, backbone, ckpt.name, task, num_steps=cfg.num_steps, guidance_scale=ckpt.guidance_scale,
                    shift=cfg.sampler.shift, seed=cfg.seed, images_per_prompt=cfg.images_per_prompt,
                    batch_size=cfg.batch_size, ranks=ranks, swapped=bool(controls.get("swapped", False)),
                    pairs=pairs[name])
    with _adapter_context(backbone, None):  # the base model (adapter off) at every checkpoint's CFG
        for guidance in dict.fromkeys(c.guidance_scale for c in checkpoints):
            reference_sensitivity(None, guidance)
    gathered = ranks.gather((report.samples, differences))
    if ranks.is_main:
        merged: dict[tuple[str | None, float, str], dict[int, float]] = {}
        for _, part in gathered:
            for key, values in part.items():
                merged.setdefault(key, {}).update(values)
        mean = {key: sum(v.values()) / len(v) for key, v in merged.items() if v}
        sensitivity = {(c.name, name): (mean[c.name if c.adapter is not None else None, c.guidance_scale, name],
                                        mean[None, c.guidance_scale, name])
                       for c in checkpoints for name in tasks if (None, c.guidance_scale, name) in mean}
        report.merge([s for part, _ in gathered for s in part], tasks, [c.name for c in checkpoints], sensitivity)
        size = getattr(backbone, "image_size", None) or 64
        for task in tasks.values():
            if task.cover is not None:
                log.info("cover search for %s: %d random scenes on %d training prompts", task.name,
                         task.cover.num_scenes, len(task.cover.rows))
                report.add_cover(task, find_cover(task, size))
        report.write(OmegaConf.to_container(cfg, resolve=True), tasks,
                     {c.name: c.guidance_scale for c in checkpoints}, random_weight_notes(cfg))
    return ranks.broadcast(report.results)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
