"""The pieces every config check uses: the problem list, typed value checks, and the checks
shared by training and evaluation (sampler, model, ``_target_`` keys, checkpoint files)."""
from __future__ import annotations

import difflib
import inspect
import itertools
import logging
import math
import zipfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from opd.config import config_dir

log = logging.getLogger(__name__)

CONFIG_DIR = config_dir()  # the checkout's conf/, or the copy inside an installed wheel
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
    other file (a truncated zip has lost its directory) is opened with ``weights_only=True``, so
    checking a file never runs code from it."""
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

        torch.load(file, map_location="cpu", weights_only=True)
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
