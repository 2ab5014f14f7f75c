"""Checks of a composed ``eval`` config (:func:`validate_eval_config`)."""
from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opd.validate.checks import (
    EVAL_TASK_KEYS,
    _check_choice,
    _check_int,
    _check_range,
    _get,
    _is_int,
    _is_number,
    _Problems,
    _raw,
    check_model,
    check_sampler,
    check_target_keys,
)


def check_eval_tasks(p: _Problems, cfg: Any) -> None:
    from opd.data.prompt_files import load_prompt_file  # noqa: F401 — the usual prompts target

    tasks = _get(cfg, "eval_tasks")
    if not isinstance(tasks, DictConfig) or not tasks:
        p.add("eval_tasks", OmegaConf.to_container(tasks) if isinstance(tasks, DictConfig) else tasks,
              "no task to evaluate: pick a suite (eval_tasks=mini or eval_tasks=sd35) and leave tasks out with "
              "~eval_tasks.<task>, not all of them")
        return
    for name in tasks:
        where = f"eval_tasks.{name}"
        spec = _get(cfg, where)
        if not isinstance(spec, DictConfig):
            p.add(where, spec, "each task is {prompts: {_target_: ...}, rewards: {<name>: {_target_: ...}}, table: ...}")
            continue
        for key in spec:
            if key not in EVAL_TASK_KEYS:
                near = difflib.get_close_matches(str(key), EVAL_TASK_KEYS, n=1)
                p.add(f"{where}.{key}", _raw(spec, key), f"unknown task key{f' (did you mean {near[0]}?)' if near else ''}; "
                      f"a task has {', '.join(EVAL_TASK_KEYS)}")
        prompts = _get(cfg, f"{where}.prompts")
        if not isinstance(prompts, DictConfig) or "_target_" not in prompts:
            p.add(f"{where}.prompts", prompts, "give the prompt set as {_target_: opd.data.prompt_files.load_prompt_file, "
                  "path: <file>} (or opd.data.world.grammar.load_prompts)")
        else:
            check_target_keys(p, cfg, f"{where}.prompts")
        rewards = _get(cfg, f"{where}.rewards")
        if not isinstance(rewards, DictConfig) or not rewards:
            p.add(f"{where}.rewards", rewards, "the task has no reward: name at least one, e.g. "
                  f"{where}.rewards.ocr={{_target_: opd.rewards.ocr.OCRReward}}")
            continue
        for reward in rewards:
            if not isinstance(_get(cfg, f"{where}.rewards.{reward}"), DictConfig) \
                    or "_target_" not in _get(cfg, f"{where}.rewards.{reward}"):
                p.add(f"{where}.rewards.{reward}", _get(cfg, f"{where}.rewards.{reward}"), "a reward needs a _target_")
            else:
                check_target_keys(p, cfg, f"{where}.rewards.{reward}")
        _check_choice(p, cfg, f"{where}.average", ["image", "tag"])
        table = _get(cfg, f"{where}.table")
        if isinstance(table, DictConfig):
            for column, score in table.items():
                if not any(score == r or str(score).startswith(f"{r}_") for r in rewards):
                    p.add(f"{where}.table.{column}", score, f"is no score of this task's rewards ({', '.join(rewards)}); "
                          "write <reward> or <reward>_<metric>, e.g. ocr or ocr_exact")
        cover = _get(cfg, f"{where}.cover")
        if isinstance(cover, DictConfig):
            _check_int(p, cfg, f"{where}.cover.num_scenes", 1)
            _check_int(p, cfg, f"{where}.cover.num_train_prompts", 1)


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every bad value of a composed ``eval`` config."""
    from opd.evaluation.checkpoints import parse_checkpoints

    p = _Problems()
    check_eval_tasks(p, cfg)
    max_prompts = _get(cfg, "max_prompts")
    if max_prompts is not None and (not _is_int(max_prompts) or max_prompts < 1):
        p.add("max_prompts", max_prompts, "must be an integer ≥ 1 (N prompts of each task, taken in turn from each tag), or null for every "
              "prompt; 0 would evaluate nothing")
    _check_int(p, cfg, "images_per_prompt", 1, "images per prompt, each from its own seed (4 for result tables)")
    _check_int(p, cfg, "batch_size", 1, "images per generation batch")
    _check_int(p, cfg, "num_steps", 1, "sampling steps per image")
    _check_int(p, cfg, "grid_size", 1)
    _check_range(p, cfg, "guidance_scale", 0, fix="the default CFG scale (1.0 = CFG-free)")
    device = _get(cfg, "device")
    if device is not None and not (device in ("auto", "cpu", "cuda", "mps")
                                   or (isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit())):
        p.add("device", device, "must be auto, cpu, cuda, cuda:<index> or mps")
    _check_int(p, cfg, "controls.sensitivity_pairs", 0, "prompt pairs per task (0 = off)", optional=True)
    if isinstance(_get(cfg, "controls.cover"), DictConfig):
        _check_int(p, cfg, "controls.cover.num_scenes", 1)
        _check_int(p, cfg, "controls.cover.num_train_prompts", 1)
    if isinstance(_get(cfg, "controls.bootstrap"), DictConfig):
        _check_int(p, cfg, "controls.bootstrap.num_resamples", 1)
        _check_range(p, cfg, "controls.bootstrap.level", 0, 1, low_open=True, high_open=True)
    check_sampler(p, cfg)
    check_model(p, cfg)
    spec = _get(cfg, "checkpoints")
    try:
        checkpoints = parse_checkpoints(OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig)
                                        else spec, 1.0)
    except (ValueError, TypeError) as err:
        p.items.append(str(err))
        checkpoints = []
    for ckpt in checkpoints:  # (their adapter files are checked by opd.evaluate, before the model loads)
        if not _is_number(ckpt.guidance_scale) or ckpt.guidance_scale < 0:
            p.add(f"checkpoints.{ckpt.name}.guidance_scale", ckpt.guidance_scale, "must be ≥ 0 (1.0 = CFG-free)")
    p.raise_if_any("evaluation config")
