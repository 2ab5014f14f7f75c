"""Checks of a composed ``train`` config: teachers, module, data, trainer (:func:`validate_train_config`)."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from opd.validate.checks import (
    CONFIG_DIR,
    _check_choice,
    _check_int,
    _check_range,
    _get,
    _has,
    _is_int,
    _is_interpolation,
    _is_number,
    _Problems,
    check_ckpt_path,
    check_model,
    check_sampler,
    check_target_keys,
)

log = logging.getLogger(__name__)


def teacher_config_entries(overrides: list[str], config_name: str = "train",
                           config_dir: str | Path = CONFIG_DIR) -> list[tuple[str, str]]:
    """``(config file, package)`` of every teacher config in the defaults list that ``overrides``
    give (a config listed twice appears twice: the composed config cannot show that, it merges)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    import opd.config  # noqa: F401 — the schemas the teacher files name in their defaults

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir)))
    defaults = loader.compute_defaults_list(config_name, list(overrides), RunMode.RUN).defaults
    return [(d.config_path, d.package) for d in defaults
            if d.config_path and d.config_path.startswith("teacher/") and not d.config_path.endswith("_schema")]


def _hydra_overrides() -> tuple[list[str], str, str] | None:
    """The running Hydra job's ``(overrides, config name, config dir)``, or ``None`` outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    source = next((s for s in hc.runtime.config_sources if s.provider == "main" and s.schema == "file"), None)
    return list(hc.overrides.task), str(hc.job.config_name), source.path if source is not None else str(CONFIG_DIR)


def check_teachers(p: _Problems, cfg: Any, overrides: list[str] | None, config_name: str, config_dir: str | Path
                   ) -> None:
    """DiffusionOPD needs ≥ 1 teacher, each configured once, with an adapter file and a sane CFG."""
    from opd.models.lora import resolve_lora_file

    teachers = _get(cfg, "teacher")
    if not _has(cfg, "module.teachers"):
        return
    if not teachers:
        p.add("teacher", OmegaConf.to_container(teachers) if teachers is not None else [],
              "DiffusionOPD (module=distill) needs at least one teacher: e.g. teacher=[mini_ocr,mini_geneval] "
              "(conf/teacher lists them)")
        return
    if overrides is not None:
        try:
            entries = teacher_config_entries(overrides, config_name, config_dir)
        except Exception as err:  # noqa: BLE001 — the check is a help, never a blocker of its own
            log.debug("could not recompute the defaults list for the duplicate-teacher check: %s", err)
            entries = []
        by_package = Counter(pkg for _, pkg in entries)
        for package, count in by_package.items():
            if count > 1:
                files = [f.split("/", 1)[1] for f, pkg in entries if pkg == package]
                listed = f"[{','.join(f.split('/', 1)[1] for f, _ in entries)}]"
                if len(set(files)) == 1:
                    why = f"{files[0]} is listed {count} times"
                else:
                    why = f"{' and '.join(files)} are configs of the same teacher"
                p.add("teacher", listed, f"{why}: each fills {package}, so the run would distil ONE {package[8:]} "
                      "teacher, not several; list each teacher once (duplicate teachers are an error)")
    names: dict[str, str] = {}
    for key in teachers:
        where = f"teacher.{key}"
        name = _get(cfg, f"{where}.name")
        if str(name) in names:
            p.add(f"{where}.name", name, f"also the name of teacher.{names[str(name)]}; teacher names must be unique")
        names[str(name)] = key
        adapter = _get(cfg, f"{where}.adapter")
        if isinstance(adapter, str):
            try:
                resolve_lora_file(adapter)
            except FileNotFoundError as err:
                p.add(f"{where}.adapter", adapter, f"{err}; train it with its teacher experiment (conf/experiment/**/"
                      f"teacher_{name}*.yaml) or point teacher.{key}.adapter at it")
        _check_range(p, cfg, f"{where}.guidance_scale", 0, fix="the teacher's CFG scale (1.0 = CFG-free)")
        check_target_keys(p, cfg, f"{where}.prompts")
        monitor = _get(cfg, f"{where}.monitor_reward")
        if isinstance(monitor, DictConfig):
            for reward in monitor:
                check_target_keys(p, cfg, f"{where}.monitor_reward.{reward}")


# -- module ---------------------------------------------------------------------------------
def _world_size(cfg: Any) -> int | None:
    devices, nodes = _get(cfg, "trainer.devices"), _get(cfg, "trainer.num_nodes", 1)
    if isinstance(devices, (ListConfig, list)):
        devices = len(devices)
    return devices * (nodes or 1) if _is_int(devices) and _is_int(nodes or 1) and devices > 0 else None


def check_module(p: _Problems, cfg: Any) -> None:
    m = "module"
    if not isinstance(_get(cfg, m), DictConfig):
        return
    _check_range(p, cfg, f"{m}.optimizer.lr", 0, low_open=True, fix="the learning rate (the recipes use 1e-4 to 5e-4)")
    _check_range(p, cfg, f"{m}.optimizer.weight_decay", 0)
    _check_range(p, cfg, f"{m}.optimizer.eps", 0, low_open=True)
    betas = _get(cfg, f"{m}.optimizer.betas")
    if betas is not None and (not isinstance(betas, ListConfig) or len(betas) != 2
                              or not all(_is_number(b) and 0 <= b < 1 for b in betas)):
        p.add(f"{m}.optimizer.betas", betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _check_range(p, cfg, f"{m}.grad_clip", 0, low_open=True, optional=True, fix="the gradient-norm clip (null = none)")
    _check_int(p, cfg, f"{m}.lora.rank", 1, "the LoRA rank (the recipes: 16 or 32)")
    _check_range(p, cfg, f"{m}.lora.alpha", 0, low_open=True, fix="LoRA alpha (the recipes: 2 × rank)")
    _check_range(p, cfg, f"{m}.timestep_fraction", 0, 1, low_open=True,
                 fix="the share of the rollout's steps that are trained (0.99 → floor(0.99 · num_steps) steps)")
    kernel, noise = _get(cfg, "sampler.kernel"), _get(cfg, "sampler.noise_level")
    num_steps = _get(cfg, "sampler.num_steps")
    world = _world_size(cfg)

    if _has(cfg, f"{m}.teachers"):  # DiffusionOPD
        _check_int(p, cfg, f"{m}.prompts_per_teacher", 1, "prompts per GPU, per teacher, per round (the reference: 3)")
        _check_int(p, cfg, f"{m}.target_chunk", 1, "teacher states per forward")
        _check_int(p, cfg, f"{m}.train_chunk", 1, "student states per forward+backward")
        _check_choice(p, cfg, f"{m}.teacher_weighting", ["sum", "balanced"])
        _check_range(p, cfg, f"{m}.balance_decay", 0, 1, high_open=True)
        if kernel == "dpm2":
            p.add("sampler.kernel", kernel, "dpm2 keeps a history across steps, which the per-step KL of DiffusionOPD "
                  "cannot use; distil with a first-order kernel (ode, flow, dance, cps, ddim, dpm1)")

    if _has(cfg, f"{m}.group_size"):  # GRPO family (GRPO, GRPO-Guard, DiffusionNFT)
        groups = _check_int(p, cfg, f"{m}.num_groups_per_round", 1, "distinct prompts per round, all ranks together")
        size = _get(cfg, f"{m}.group_size")
        if not _is_int(size) or size < 2:
            p.add(f"{m}.group_size", size, "must be an integer ≥ 2: the advantages are group-relative (each reward "
                  "minus its prompt group's mean), so a group of one image has advantage 0 and the policy learns "
                  "nothing (the recipes: 8 to 24)")
            size = None
        _check_int(p, cfg, f"{m}.rollout_chunks", 1, "rollout pieces per round")
        updates = _check_int(p, cfg, f"{m}.num_updates_per_round", 1, "optimiser steps per round")
        if groups and size and world:
            total = groups * size
            if total % world:
                p.add(f"{m}.num_groups_per_round", groups, f"num_groups_per_round × group_size = {total} images per "
                      f"round do not split over {world} GPUs (trainer.devices × num_nodes); make it a multiple")
            elif updates and updates > total // world:
                p.add(f"{m}.num_updates_per_round", updates, f"more optimiser steps per round than the {total // world} "
                      "images each GPU samples; lower it")
        _check_range(p, cfg, f"{m}.train_guidance_scale", 0, optional=True,
                     fix="CFG scale in the training forward (null = sampler.guidance_scale)")
        if _has(cfg, f"{m}.timestep_fraction") and (kernel == "ode" or noise == 0):
            p.add("sampler.kernel", kernel, f"with noise_level={noise} the rollout is deterministic, but GRPO needs "
                  "log-probabilities of stochastic steps: use an SDE sampler (sampler=flow_sde)")
        if _has(cfg, f"{m}.num_train_steps"):  # DiffusionNFT
            high = num_steps if _is_int(num_steps) and num_steps >= 1 else None
            nts = _get(cfg, f"{m}.num_train_steps")
            if not _is_int(nts) or nts < 1 or (high is not None and nts > high):
                p.add(f"{m}.num_train_steps", nts, f"must be an integer in [1, sampler.num_steps = {high}]: the noised "
                      "times are drawn from the sampling grid")
            _check_choice(p, cfg, f"{m}.decay_schedule", ["linear", "delayed"])
            _check_int(p, cfg, f"{m}.nograd_chunk", 1, "old-policy and reference states per no-grad forward",
                       optional=True)
            _check_int(p, cfg, f"{m}.terms_per_forward", 1, "noised times per student forward+backward")

    if _has(cfg, f"{m}.cond_dropout"):  # pre-training
        _check_range(p, cfg, f"{m}.cond_dropout", 0, 1, fix="the share of prompts replaced by '' (CFG training)")
        _check_int(p, cfg, f"{m}.warmup_steps", 0)
        _check_int(p, cfg, f"{m}.export_every_n_steps", 1, optional=True)
        cooldown, max_steps = _get(cfg, f"{m}.cooldown_steps", 0), _get(cfg, "trainer.max_steps", -1)
        if _has(cfg, f"{m}.cooldown_steps") and cooldown:
            _check_int(p, cfg, f"{m}.cooldown_steps", 0)
            if _is_int(cooldown) and (not _is_int(max_steps) or max_steps < cooldown):
                p.add(f"{m}.cooldown_steps", cooldown, f"needs trainer.max_steps >= it (got {max_steps}): the "
                      "learning rate falls to 0 over the last cooldown_steps steps")


def check_data(p: _Problems, cfg: Any) -> None:
    if not isinstance(_get(cfg, "data"), DictConfig):
        return
    _check_int(p, cfg, "data.batch_size", 1, "images per batch per GPU")
    _check_int(p, cfg, "data.num_workers", 0)
    _check_range(p, cfg, "data.sign_fraction", 0, 1)


def check_trainer_and_callbacks(p: _Problems, cfg: Any) -> None:
    steps = _get(cfg, "trainer.max_steps")
    if steps is not None and (not _is_int(steps) or steps < -1):
        p.add("trainer.max_steps", steps, "must be an integer ≥ 1 (optimiser steps), -1 with max_epochs/max_time, or 0 "
              "to only build, export and checkpoint")
    elif steps == 0:
        log.warning("trainer.max_steps=0: nothing will be trained (the run only builds, exports and checkpoints)")
    if _has(cfg, "trainer.devices") and _is_int(_get(cfg, "trainer.devices")):
        _check_int(p, cfg, "trainer.devices", 1)
    if isinstance(_get(cfg, "callbacks.ema"), DictConfig):
        _check_range(p, cfg, "callbacks.ema.decay", 0, 1, high_open=True)
        _check_int(p, cfg, "callbacks.ema.every_n_steps", 1)
    if isinstance(_get(cfg, "callbacks.image_grid"), DictConfig):
        _check_int(p, cfg, "callbacks.image_grid.every_n_steps", 1)
        _check_int(p, cfg, "callbacks.image_grid.num_steps", 1)
    if isinstance(_get(cfg, "callbacks.curves"), DictConfig):
        _check_int(p, cfg, "callbacks.curves.every_n_steps", 1)
    if isinstance(_get(cfg, "callbacks.model_checkpoint"), DictConfig):
        _check_int(p, cfg, "callbacks.model_checkpoint.every_n_train_steps", 0, optional=True)
    if isinstance(_get(cfg, "callbacks.compute_budget"), DictConfig):
        for name in ("max_model_tflop", "max_images_sampled"):  # '' is what a failed $(python -m opd.results.compute) leaves
            _check_range(p, cfg, f"callbacks.compute_budget.{name}", 0, low_open=True, optional=True,
                         fix="the compute after which training stops; where a command computed it "
                             "(python -m opd.results.compute in make), that command failed: see its error above")


# -- entry points -----------------------------------------------------------------------------
def validate_train_config(cfg: DictConfig, overrides: list[str] | None = None, config_name: str = "train",
                          config_dir: str | Path = CONFIG_DIR) -> None:
    """Raise :class:`ConfigError` listing every bad value of a composed ``train`` config.

    ``overrides`` (the command line's) let it see a teacher config listed twice, which the composed
    config cannot show; inside ``python -m opd.train`` they are read from Hydra, so
    ``validate_train_config(cfg)`` is the whole call.
    """
    p = _Problems()
    if overrides is None:
        job = _hydra_overrides()
        if job is not None:
            overrides, config_name, config_dir = job
    check_sampler(p, cfg)
    check_model(p, cfg)
    check_module(p, cfg)
    check_teachers(p, cfg, overrides, config_name, config_dir)
    check_data(p, cfg)
    check_trainer_and_callbacks(p, cfg)
    for group in ("module", "model", "reward", "objective", "data", "callbacks", "logger", "trainer"):
        if _has(cfg, group) and not _is_interpolation(cfg, group):
            check_target_keys(p, cfg, group)
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is not None and ckpt != "last":
        try:
            check_ckpt_path(ckpt)
        except (FileNotFoundError, ValueError) as err:
            p.items.append(str(err))
    p.raise_if_any("training config")
