"""One evaluation, two entry points: ``python -m opd.evaluate`` and the end of every training run.

:func:`evaluate` is the whole evaluation of a composed ``eval`` config (conf/eval.yaml): it
generates every task's test prompts with every checkpoint, scores them and writes the report
(:mod:`opd.evaluate` describes the files). ``python -m opd.evaluate`` calls it on its config;
:func:`evaluate_run` calls it at the end of ``opd.train`` on the config :func:`run_eval_config`
derives from the training config's ``eval`` node, so a run's ``<output_dir>/eval/results.json``
holds exactly the numbers ``opd.evaluate`` gives for the same adapter and settings.

What a run evaluates:

- a run that trains a LoRA (RL teachers, DiffusionOPD students): the exported adapter
  ``<output_dir>/adapter`` (row ``trained``, at the run's ``sampler.guidance_scale``, the CFG it was
  trained with) against the base model (row ``base``, at ``eval.guidance_scale``) and, when the two
  scales differ (a CFG-free student or teacher), the base at the run's scale too (row
  ``base_at_trained_cfg``: where the run started);
- pre-training: the exported model ``<output_dir>/model`` alone (row ``trained``).

Ranks: ``opd.evaluate`` under ``torchrun`` joins the process group torchrun describes
(:func:`~opd.evaluation.distributed.init_ranks`); after a multi-GPU fit every training rank takes
part through the trainer's process group. Either way the ranks share the batches and rank 0 writes
the report.
"""
from __future__ import annotations

import gc
import inspect
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from opd.config import config_dir
from opd.data.prompt_files import MAX_PROMPT_CHARS
from opd.evaluation.checkpoints import Checkpoint, parse_checkpoints
from opd.evaluation.controls import find_cover, sensitivity_differences, sensitivity_pairs, subsample
from opd.evaluation.distributed import Ranks, gloo_ranks, init_ranks
from opd.evaluation.report import Report, score_task
from opd.evaluation.tasks import CoverSpec, EvalTask
from opd.models.lora import active_adapter, adapter_names, load_lora, resolve_lora_file
from opd.rewards.base import Reward
from opd.validate import ConfigError, validate_eval_config

log = logging.getLogger(__name__)
RANDOM_FLAG = "random_weights_for_tests"
#: results.json's rows of the end-of-run evaluation
BASE, TRAINED = "base", "trained"
#: the base at the trained row's CFG scale, added when that differs from the base's (a CFG-free
#: student): where the student started, beside the base it is meant to replace
BASE_AT_TRAINED_CFG = "base_at_trained_cfg"
#: the end-of-run evaluation's folder under the run folder
EVAL_DIR = "eval"
#: the settings shared by both entry points (the keys a training config's ``eval`` node may have besides
#: ``tasks``, from conf/eval_tasks, and ``guidance_scale``, the base's CFG scale)
EVAL_SETTINGS = config_dir() / "eval_settings" / "default.yaml"


def run_eval_keys() -> tuple[str, ...]:
    """The keys of a training config's ``eval`` node."""
    return ("tasks", "guidance_scale", "teachers", *OmegaConf.load(EVAL_SETTINGS).keys())


# -- prompts, covers, rewards -------------------------------------------------------------------
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
                             f"reads (limit {MAX_PROMPT_CHARS}; the mini model reads 96 bytes (the v1 base 48), CLIP 77 tokens): "
                             f"{prompt[:60]!r}...; fix the prompt set")
    return rows


def each_tag_in_turn(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` of ``rows`` taken in turn from each ``tag`` (tags in order of first appearance, rows in file
    order within a tag), so that a short look covers every kind of prompt; rows without a tag share one.
    The result keeps the file order."""
    by_tag: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        by_tag.setdefault(row.get("tag") if hasattr(row, "get") else None, []).append(i)
    chosen: list[int] = []
    for rank in range(max(map(len, by_tag.values()), default=0)):
        chosen += [idx[rank] for idx in by_tag.values() if rank < len(idx)]
    return [rows[i] for i in sorted(chosen[:n])]


def load_prompt_sets(cfg: DictConfig, where: str = "eval_tasks") -> dict[str, list[dict[str, Any]]]:
    """Every task's prompt rows, read before any model loads: a missing or empty file fails first.
    ``where``: how error messages name the tasks node (``eval.tasks`` in a training config)."""
    sets = {}
    for name, spec in cfg.eval_tasks.items():
        rows = _instantiate_prompts(spec.prompts, f"{where}.{name}.prompts")
        sets[name] = rows if cfg.max_prompts is None else each_tag_in_turn(rows, cfg.max_prompts)  # validated ≥ 1
    return sets


def cover_specs(cfg: DictConfig, where: str = "eval_tasks") -> dict[str, CoverSpec]:
    """Each task's cover search: its ``cover`` entry (``prompts``: the training prompts to search on;
    any of ``num_scenes``, ``num_train_prompts``, ``seed`` overrides ``controls.cover``). Tasks
    without one, or every task when ``controls.cover`` is null, have none. The prompts are read
    here, before any model loads."""
    defaults = (cfg.get("controls") or {}).get("cover")
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
            raise ValueError(f"{where}.{name}.cover: unknown key(s) {sorted(unknown)}")
        rows = _instantiate_prompts(cover.prompts, f"{where}.{name}.cover.prompts")
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


# -- the evaluation -----------------------------------------------------------------------------
def evaluate(cfg: DictConfig, ranks: Ranks | None = None) -> dict[str, dict[str, float]]:
    """Evaluate a composed ``eval`` config; returns results.json's ``row → metric → value`` on every
    rank. ``ranks``: this process's place among the evaluating processes (default: the ones torchrun
    describes, or this process alone)."""
    validate_eval_config(cfg)  # every bad value fails here, before anything is built (opd.validate)
    ranks = init_ranks() if ranks is None else ranks
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


# -- the end of a training run ------------------------------------------------------------------
def exports_full_model(cfg: DictConfig) -> bool:
    """Whether the run's module trains every weight and exports the model (pre-training, to
    ``<output_dir>/model``) rather than a LoRA adapter (to ``<output_dir>/adapter``)."""
    from opd.modules.pretrain import FlowMatchingPretrain

    target = hydra.utils.get_object(str(cfg.module._target_))
    return isinstance(target, type) and issubclass(target, FlowMatchingPretrain)


def run_eval_config(cfg: DictConfig) -> DictConfig | None:
    """The ``eval`` config (as conf/eval.yaml composes it) that evaluates what the training run
    ``cfg`` produces, from its ``eval`` node, model, sampler and paths; ``None`` when ``eval`` is null.
    The model and sampler are the run's; ``eval.device: auto`` follows ``trainer.accelerator: cpu``."""
    spec = cfg.get("eval")
    if spec is None:
        return None
    if not isinstance(spec, DictConfig):
        raise ConfigError([(f"eval={spec!r}: the end-of-run evaluation's settings (conf/train.yaml), or null to "
                            "skip it")], "training config")
    known = run_eval_keys()
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ConfigError([f"eval.{key}={OmegaConf.select(spec, key, throw_on_missing=False)!r}: unknown key of the "
                           f"end-of-run evaluation; it has {', '.join(map(str, known))}" for key in unknown],
                          "training config")
    settings = OmegaConf.to_container(spec, resolve=True)
    tasks = settings.pop("tasks", None)
    with_teachers = bool(settings.pop("teachers", False))
    out = Path(str(cfg.paths.output_dir))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    trained_cfg = float(cfg.sampler.guidance_scale)
    if exports_full_model(cfg):
        if not isinstance(model, dict) or "path" not in model:
            target = model.get("_target_") if isinstance(model, dict) else model
            raise ConfigError([(f"model._target_={target!r}: the end-of-run evaluation of pre-training loads the "
                                "exported model with model.path, which this model config lacks; skip the evaluation "
                                "with eval=null")], "training config")
        model["path"] = str(out / "model")
        checkpoints: dict[str, Any] = {TRAINED: {"adapter": None, "guidance_scale": trained_cfg}}
    else:
        checkpoints = {BASE: None, TRAINED: {"adapter": str(out / "adapter"), "guidance_scale": trained_cfg}}
        if trained_cfg != float(settings.get("guidance_scale", trained_cfg)):
            checkpoints[BASE_AT_TRAINED_CFG] = {"adapter": None, "guidance_scale": trained_cfg}
        if with_teachers:  # a distillation run: its teachers too, each at its own CFG (rows teacher_<name>)
            for name, teacher in (OmegaConf.to_container(cfg.get("teacher") or {}, resolve=True)).items():
                adapter = teacher["adapter"]  # None: the base model as a teacher (CFG distillation)
                checkpoints[f"teacher_{name}"] = {"adapter": None if adapter is None else str(adapter),
                                                  "guidance_scale": float(teacher.get("guidance_scale", trained_cfg))}
    if settings.get("device", "auto") == "auto" and OmegaConf.select(cfg, "trainer.accelerator") == "cpu":
        settings["device"] = "cpu"
    return OmegaConf.create({
        "task_name": f"{cfg.get('task_name', 'train')}_eval",
        "paths": OmegaConf.to_container(cfg.paths, resolve=True),
        "model": model,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "eval_tasks": tasks,
        "checkpoints": checkpoints,
        **settings,
        "output_dir": str(out / EVAL_DIR),
    })


def _as_train_key(problem: str) -> str:
    """An eval-config problem (``<key>=<value>: ...``) named by its key in the training config."""
    key = problem.split("=", 1)[0]
    if key.startswith(("model", "sampler", "paths", "checkpoints")) or " " in key:
        return problem
    if key == "eval_tasks" or key.startswith("eval_tasks."):
        return "eval.tasks" + problem[len("eval_tasks"):]
    return f"eval.{problem}"


def check_run_eval(cfg: DictConfig) -> DictConfig | None:
    """Before training: the end-of-run evaluation's config (:func:`run_eval_config`), its values
    checked (named by their keys in the training config) and its prompt files read, so that a bad
    setting or a missing prompt file fails now rather than after the run."""
    eval_cfg = run_eval_config(cfg)
    if eval_cfg is None:
        return None
    probe = eval_cfg.copy()
    if exports_full_model(cfg):  # the model is exported at the end; its config is the run's, checked as such
        probe.model = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        validate_eval_config(probe)
    except ConfigError as err:
        raise ConfigError([_as_train_key(p) for p in err.problems], "end-of-run evaluation") from None
    load_prompt_sets(eval_cfg, where="eval.tasks")
    cover_specs(eval_cfg, where="eval.tasks")
    return eval_cfg


def _training_ranks(trainer: Any) -> Ranks:
    """The fit's ranks (its process group stays up after ``fit``), talking over a gloo group of their
    own; one process otherwise."""
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world > 1 and dist.is_available() and dist.is_initialized():
        return gloo_ranks(int(trainer.global_rank), world, int(trainer.local_rank))
    return Ranks()


def evaluate_run(cfg: DictConfig, trainer: Any = None, eval_cfg: DictConfig | None = None
                 ) -> dict[str, dict[str, float]] | None:
    """After ``trainer.fit``: evaluate what the run produced (module docstring) into
    ``<output_dir>/eval/`` (replacing an earlier evaluation there); ``None`` when ``eval`` is null.
    Every rank of the fit takes part; rank 0 writes."""
    eval_cfg = run_eval_config(cfg) if eval_cfg is None else eval_cfg
    if eval_cfg is None:
        return None
    ranks = _training_ranks(trainer) if trainer is not None else init_ranks()
    ranks.barrier()  # rank 0 exported the adapter or model at the end of fit; the others load it next
    out = Path(eval_cfg.output_dir)
    if ranks.is_main and out.exists():  # rank 0 clears it before evaluate's first collective call
        log.warning("replacing the earlier evaluation in %s", out)
        shutil.rmtree(out)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("end-of-run evaluation into %s", out)
    results = evaluate(eval_cfg, ranks)
    if ranks.is_main and results and TRAINED in results and BASE in results:
        lines = verdict(results, headlines(eval_cfg.get("eval_tasks")))
        for line in lines:
            log.info("%s", line)
        grids = out / "grids"
        where = f"side by side: {grids}/compare_<task>.png (one grid per row and task beside them)"
        (out / "verdict.txt").write_text("\n".join([*lines, where, ""]))
        print("\n".join(["", f"verdict ({evaluated_on(eval_cfg)}; more in {out / 'results.md'}):",
                         *lines, where, ""]), flush=True)
    return results


def evaluated_on(eval_cfg: Any) -> str:
    """What an evaluation scored, in words: "test prompts, 4 images per prompt" ("val prompts, at most 8
    per task, 1 image per prompt", ...), from the tasks' prompt splits and the sampling settings."""
    splits = sorted({str(split) for spec in (eval_cfg.get("eval_tasks") or {}).values()
                     if (split := ((spec or {}).get("prompts") or {}).get("split")) is not None})
    words = ["/".join(splits) + " prompts" if splits else "the tasks' prompts"]
    if eval_cfg.get("max_prompts") is not None:
        words.append(f"at most {eval_cfg.max_prompts} per task")
    n = eval_cfg.get("images_per_prompt", 1)
    words.append(f"{n} image{'s' if n != 1 else ''} per prompt")
    return ", ".join(words)


def headlines(tasks: Any) -> dict[str, tuple[str, str]]:
    """``{task: (title, results key)}``: each task's first ``table`` entry (its headline)."""
    out = {}
    for task, spec in (tasks or {}).items():
        table = (spec or {}).get("table") or {}
        if table:
            title, key = next(iter(table.items()))
            out[str(task)] = (str(title), f"{task}/{key}")
    return out


def verdict(results: dict[str, dict[str, float]], heads: dict[str, tuple[str, str]]) -> list[str]:
    """One line per task: the trained row against the base (better / worse / level, by how much,
    and whether the base lies outside the trained row's 95 % interval) and, where the evaluation has
    them, the base at the student's CFG (row ``base_at_trained_cfg``) and the task's teacher (row
    ``teacher_<task>``)."""
    lines = []
    for task, (title, key) in heads.items():
        trained, base = results[TRAINED].get(key), results[BASE].get(key)
        if trained is None or base is None:
            continue
        diff = trained - base
        word = "better than" if diff > 0 else "worse than" if diff < 0 else "level with"
        low, high = results[TRAINED].get(f"{key}/ci_low"), results[TRAINED].get(f"{key}/ci_high")
        sure = ""
        if low is not None and high is not None:
            sure = " (the base is outside its 95 % interval)" if not low <= base <= high else " (within its 95 % interval)"
        start = results.get(BASE_AT_TRAINED_CFG, {}).get(key)
        tail = f"; the base at the student's CFG {start:.3f}" if start is not None else ""
        teacher = results.get(f"teacher_{task}", {}).get(key)
        tail += f"; its teacher {teacher:.3f}" if teacher is not None else ""
        lines.append(f"{title}: student {trained:.3f} {word} the base {base:.3f} by {abs(diff):.3f}{sure}{tail}")
    return lines
