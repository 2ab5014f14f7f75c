"""Checks of a composed config that run before anything is built (no model, no reward, no data).

``validate_train_config(cfg)`` (top of :func:`opd.train.train`) and ``validate_eval_config(cfg)``
(top of :func:`opd.evaluate.evaluate`) collect *every* bad value they find and raise one
:class:`ConfigError` listing them, each as ``<config key>=<value>: <the allowed range and how to fix
it>``. Typos in the keys of a ``_target_`` node (``module.group_sise``) are caught here too, from the
target's signature, before Hydra instantiates anything. :func:`check_ckpt_path` checks a checkpoint
file (resuming from a truncated ``last.ckpt`` names the file and lists the other checkpoints of
its folder).

The structured-config schemas of :mod:`opd.config` already type-check the sampler, objective and
teacher groups at compose time; the ranges and the cross-group rules live here.
"""
from __future__ import annotations

import difflib
import inspect
import itertools
import logging
import math
import zipfile
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
#: sampler.kernel → what ``noise_level`` means for it (opd.sampling.kernels)
KERNEL_NOISE = {
    "ode": "ignored (deterministic Euler)",
    "flow": "a of Flow-GRPO's SDE",
    "dance": "a of DanceGRPO's SDE",
    "cps": "a of Flow-GRPO's coefficient-preserving step (std = σ' sin(aπ/2))",
    "ddim": "η of DDIM (0 = deterministic, 1 = the SDE-DPM-Solver++ step)",
    "dpm1": "η of SDE-DPM-Solver++ (0 = deterministic, 1 = SDE)",
    "dpm2": "η of SDE-DPM-Solver++(2M) (0 = deterministic, 1 = SDE)",
}
#: keys an ``eval_tasks.<task>`` entry may have (conf/eval_tasks/*.yaml)
EVAL_TASK_KEYS = ("prompts", "rewards", "table", "average", "cover")
#: Hydra's own keys of a ``_target_`` node
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """One or more config values are out of range; ``problems`` lists them (``key=value: fix``)."""

    def __init__(self, problems: list[str], what: str = "config") -> None:
        self.problems = list(problems)
        head = (f"bad {what} value" if len(problems) == 1 else f"{len(problems)} bad {what} values")
        super().__init__(f"{head} (nothing was built):\n" + "\n".join(f"  - {p}" for p in problems))


class _Problems:
    """Collects problems; ``raise_if_any`` raises them all at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, value: Any, fix: str) -> None:
        self.items.append(f"{key}={_show(value)}: {fix}")

    def raise_if_any(self, what: str) -> None:
        if self.items:
            raise ConfigError(self.items, what)


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _leaf(cfg: Any, key: str) -> tuple[DictConfig, str] | None:
    """The container holding dotted ``key`` and the last part of it, or ``None`` when absent."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return (node, leaf) if isinstance(node, DictConfig) and leaf in node else None


def _has(cfg: Any, key: str) -> bool:
    return _leaf(cfg, key) is not None


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.<key>`` (dotted, interpolations resolved); ``default`` when absent or ``???``."""
    found = _leaf(cfg, key)
    if found is None or OmegaConf.is_missing(*found):
        return default
    return found[0][found[1]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(p: _Problems, cfg: Any, key: str, low: int, fix: str = "", optional: bool = False) -> int | None:
    """``cfg.<key>`` must be an integer ≥ ``low`` (``null`` allowed when ``optional``)."""
    if not _has(cfg, key):
        return None
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if not _is_int(value) or value < low:
        p.add(key, value, f"must be an integer ≥ {low}{'' if not optional else ' (or null)'}" + (f"; {fix}" if fix else ""))
        return None
    return value


def _check_range(p: _Problems, cfg: Any, key: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, fix: str = "", optional: bool = False
                 ) -> float | None:
    """``cfg.<key>`` must be a finite number in the range (``null`` allowed when ``optional``)."""
    if not _has(cfg, key):
        return None
    value = _get(cfg, key)
    if value is None and optional:
        return None
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rng = f"{'>' if low_open else '≥'} {low:g}"
        elif high is not None:
            rng = f"{'<' if high_open else '≤'} {high:g}"
        else:
            rng = "a finite number"
        p.add(key, value, f"must be {rng}{' (or null)' if optional else ''}" + (f"; {fix}" if fix else ""))
        return None
    return float(value)


def _check_choice(p: _Problems, cfg: Any, key: str, choices: Iterable[str], fix: str = "") -> str | None:
    if not _has(cfg, key):
        return None
    value = _get(cfg, key)
    choices = list(choices)
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        p.add(key, value, f"must be one of {', '.join(choices)}{hint}" + (f"; {fix}" if fix else ""))
        return None
    return value


# -- sampler ---------------------------------------------------------------------------------
def _sigmas(num_steps: int, shift: float) -> list[float]:
    from opd.sampling import sd3_sigmas

    return sd3_sigmas(num_steps, shift=shift).double().tolist()


def max_noise_level(kernel: str, num_steps: int, shift: float) -> tuple[float, str]:
    """The largest ``sampler.noise_level`` that keeps ``kernel`` a sensible sampler on this schedule,
    and why. ``flow``/``dance``: beyond it the SDE mean multiplies ``x_t`` by a coefficient ≤ 0 at some
    step (the noise correction overshoots, images blow up); ``cps``: ``sin(aπ/2)`` is periodic, ``a = 1``
    is its largest noise; ``ddim``/``dpm*``: ``η = 1`` is the SDE solver. Other kernels: no bound."""
    if kernel in ("cps", "ddim", "dpm1", "dpm2"):
        return 1.0, ("a = 1 is the most noise (sin(aπ/2) repeats beyond)" if kernel == "cps"
                     else "η = 1 is the SDE solver, 0 the deterministic one")
    if kernel not in ("flow", "dance"):
        return math.inf, ""
    s = _sigmas(num_steps, shift)
    bounds = []
    for sigma, nxt in itertools.pairwise(s):
        step = sigma - nxt
        if kernel == "flow":  # x-coefficient of the mean: 1 − a² Δ / (2 (1 − σ̃)), σ̃ = σ' at σ = 1
            rest = 1 - (nxt if sigma == 1 else sigma)
            bounds.append(math.sqrt(2 * rest / step))
        else:  # dance: 1 − a² Δ / (2σ)
            bounds.append(math.sqrt(2 * sigma / step))
    return min(bounds), (f"larger values make the SDE mean multiply x by a coefficient ≤ 0 at num_steps={num_steps}, "
                         f"shift={shift:g}")


def check_sampler(p: _Problems, cfg: Any, key: str = "sampler") -> None:
    """Kernel name, noise level for that kernel, step counts, shift, CFG scale."""
    from opd.sampling import KERNELS

    if not isinstance(_get(cfg, key), DictConfig):
        return
    kernel = _check_choice(p, cfg, f"{key}.kernel", sorted(KERNELS),
                           "opd.sampling.KERNELS; e.g. sampler=flow_sde (flow, a = 0.7) or sampler=ode")
    num_steps = _check_int(p, cfg, f"{key}.num_steps", 1, "the rollout needs at least one step")
    _check_int(p, cfg, f"{key}.eval_num_steps", 1, "evaluation and previews need at least one step")
    shift = _check_range(p, cfg, f"{key}.shift", 0, low_open=True, fix="SD3's schedule shift (3.0)")
    _check_range(p, cfg, f"{key}.guidance_scale", 0, fix="the CFG scale w: 1.0 = CFG-free, 4.5 = SD3.5's default")
    noise = _check_range(p, cfg, f"{key}.noise_level", 0,
                         fix=f"the kernel's noise level ({KERNEL_NOISE.get(kernel, 'see opd.sampling.kernels')})")
    if kernel is None or noise is None:
        return
    if kernel == "ode":
        if noise != 0:
            p.add(f"{key}.noise_level", noise, "kernel=ode is deterministic and ignores it: set sampler.noise_level=0, "
                  "or pick an SDE kernel (sampler=flow_sde, or sampler.kernel=flow|dance|cps|ddim|dpm1)")
        return
    if num_steps is None or shift is None:
        return
    high, why = max_noise_level(kernel, num_steps, shift)
    if noise > high:
        p.add(f"{key}.noise_level", noise, f"for kernel={kernel} ({KERNEL_NOISE.get(kernel, 'its noise level')}) use "
              f"0 ≤ noise_level ≤ {math.floor(high * 100) / 100:g}: {why} (Flow-GRPO's flow: a = 0.7)")


# -- _target_ nodes: keys against the signature ----------------------------------------------
def _accepted_params(target: Any) -> set[str] | None:
    """Keyword names ``target`` accepts (through ``**kwargs`` passed up the class hierarchy), or
    ``None`` when that cannot be told (a plain ``**kwargs``)."""
    if inspect.isclass(target):
        names: set[str] = set()
        for klass in target.__mro__:
            if "__init__" not in klass.__dict__:
                continue
            try:
                params = inspect.signature(klass.__init__).parameters.values()
            except (TypeError, ValueError):
                return None
            names |= {q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)} - {"self"}
            if not any(q.kind == q.VAR_KEYWORD for q in params):
                return names
        return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(q.kind == q.VAR_KEYWORD for q in params):
        return None
    return {q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)}


def check_target_keys(p: _Problems, cfg: Any, key: str) -> None:
    """Every ``_target_`` node under ``cfg.<key>``: each key is an argument of the target (a typo in
    an experiment file otherwise surfaces as a TypeError only after earlier parts were built).
    Interpolated values (``module.reward: ${reward}``) are checked where they are defined."""
    import hydra

    node = _get(cfg, key)
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node and not OmegaConf.is_missing(node, "_target_") else None
    if isinstance(target, str):
        try:
            obj = hydra.utils.get_object(target)
        except Exception as err:  # noqa: BLE001 — any import failure is reported the same way
            p.add(f"{key}._target_", target, f"cannot be imported ({type(err).__name__}: {err})")
            obj = None
        accepted = _accepted_params(obj) if obj is not None else None
        if accepted is not None:
            for name in node:
                if name in _HYDRA_KEYS or name in accepted:
                    continue
                near = difflib.get_close_matches(str(name), sorted(accepted), n=1)
                hint = f"did you mean {key}.{near[0]}? " if near else ""
                p.add(f"{key}.{name}", _raw(node, name), f"{target.rsplit('.', 1)[-1]} takes no argument {name!r}; "
                      f"{hint}(it takes {', '.join(sorted(accepted))})")
    for name in node:
        if name in _HYDRA_KEYS or _is_interpolation(node, name):
            continue
        check_target_keys(p, cfg, f"{key}.{name}")


def _raw(node: DictConfig, name: str) -> Any:
    try:
        return node._get_node(name)._value()
    except Exception:  # noqa: BLE001
        return "?"


def _is_interpolation(node: DictConfig, name: Any) -> bool:
    child = node._get_node(name)
    return child is not None and child._is_interpolation()


# -- model --------------------------------------------------------------------------------
SD35_FETCH = ("huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir <dir> "
              "(accept the licence on the model page first), then model.path=<dir> or OPD_WEIGHTS_DIR=<folder "
              "holding stable-diffusion-3.5-medium>")


def check_model(p: _Problems, cfg: Any, key: str = "model") -> None:
    """The model's weights are where ``model.path`` says, before anything else is built."""
    from opd.models.sd3 import looks_local

    node = _get(cfg, key)
    if not isinstance(node, DictConfig):
        return
    target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    path = _get(cfg, f"{key}.path")
    if target == "sd3_backbone":
        if not isinstance(path, str) or not path:
            p.add(f"{key}.path", path, f"give the SD3.5 folder: {SD35_FETCH}")
            return
        local = Path(path).expanduser()
        if looks_local(path) and not local.exists():
            p.add(f"{key}.path", path, f"no such folder: the SD3.5 weights are not there. Fetch them once with "
                  f"{SD35_FETCH}")
        elif local.exists() and not (local / "model_index.json").is_file():
            p.add(f"{key}.path", path, "is not a diffusers pipeline folder (no model_index.json); point model.path at "
                  f"the folder that holds model_index.json ({SD35_FETCH})")
    elif target == "mini_backbone" and path is not None:
        from opd.models.mini import CONFIG_FILE

        folder = Path(str(path)).expanduser()
        if not (folder / CONFIG_FILE).is_file() or not any(folder.glob("model*.safetensors")):
            p.add(f"{key}.path", path, f"holds no mini model ({CONFIG_FILE} + model*.safetensors): the shipped base is "
                  "models/mini_base (model=mini); train one with `python -m opd.train experiment=pretrain_mini`, or "
                  "model=mini_scratch for random weights")
    _check_int(p, cfg, f"{key}.image_size", 1, "the training/evaluation resolution in pixels")


# -- checkpoints ----------------------------------------------------------------------------
def _describe(file: Path) -> str:
    stat = file.stat()
    when = datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%d %H:%M")
    return f"{file.name} ({stat.st_size / 2**20:.1f} MiB, {when})"


def _unreadable(file: Path) -> str | None:
    """Why ``file`` is not a loadable torch checkpoint, or ``None``. A zip checkpoint (torch's format
    since 1.6) is checked through its central directory (at the end: a truncated file fails); any
    other file is loaded."""
    if file.stat().st_size == 0:
        return "the file is empty"
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{type(err).__name__}: {err}"
        if not any(n.endswith("data.pkl") for n in names):
            return "a zip file without data.pkl: not a torch checkpoint"
        return None
    try:
        import torch

        torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — whatever torch says, the file cannot be resumed from
        first = str(err).splitlines()[0].split(". ")[0] if str(err) else ""
        return f"{type(err).__name__}: {first}".rstrip(": ")
    return None


def check_ckpt_path(path: str | Path | None) -> str | None:
    """``path`` if it is a readable checkpoint file (``None`` passes through), else raise naming it.

    Raises ``FileNotFoundError`` (no such file) or ``ValueError`` (empty, truncated or not a
    checkpoint); both list the other ``*.ckpt`` files of its folder, newest first, to resume from
    instead (``ckpt_path=<one of them>``).
    """
    if path is None:
        return None
    file = Path(str(path)).expanduser()
    folder = file.parent
    others = sorted((f for f in folder.glob("*.ckpt") if f.is_file() and f.resolve() != file.resolve()),
                    key=lambda f: f.stat().st_mtime, reverse=True) if folder.is_dir() else []
    readable = [f for f in others if _unreadable(f) is None]
    if readable:
        listing = (f"other checkpoints in {folder} (newest first): " + ", ".join(_describe(f) for f in readable[:8])
                   + (f" and {len(readable) - 8} more" if len(readable) > 8 else "")
                   + f"; resume from one with ckpt_path={readable[0]}")
    else:
        listing = f"no other readable checkpoint in {folder}" + ("" if folder.is_dir() else " (no such folder)")
    if file.is_dir():
        raise ValueError(f"ckpt_path={file} is a folder, not a checkpoint file; {listing}")
    if not file.is_file():
        raise FileNotFoundError(f"ckpt_path={file}: no such file; {listing}")
    why = _unreadable(file)
    if why is not None:
        raise ValueError(f"ckpt_path={file} is not a readable checkpoint ({why}; truncated by an interrupted save?); "
                         f"{listing}")
    return str(file)


# -- teachers -------------------------------------------------------------------------------
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

    if _has(cfg, f"{m}.cond_dropout"):  # pre-training
        _check_range(p, cfg, f"{m}.cond_dropout", 0, 1, fix="the share of prompts replaced by '' (CFG training)")
        _check_int(p, cfg, f"{m}.warmup_steps", 0)
        _check_int(p, cfg, f"{m}.export_every_n_steps", 1, optional=True)


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
        p.add("max_prompts", max_prompts, "must be an integer ≥ 1 (the first N prompts of each task), or null for every "
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
