"""Structured-config schemas (Hydra ConfigStore): a typo in a key of these groups is an error.

Group files start with ``defaults: [<group>_schema, _self_]`` and are validated against the
dataclasses below at compose time. Value ranges and cross-group rules (a kernel's noise level, a GRPO
group of at least two images, a teacher listed twice, ...) are checked by :mod:`opd.validate` before
anything is built: :func:`validate_train_config` / :func:`validate_eval_config` here call it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from opd.utils.paths import checkout_root


@dataclass
class SamplerConfig:
    """How trajectories are sampled (docs/method.md, "Sampling as a chain of Gaussians")."""

    kernel: str = "ode"            # ode | flow | dance | cps | ddim | dpm1 | dpm2 (opd.sampling.KERNELS)
    noise_level: float = 0.0       # a (flow/dance/ddim) or η (dpm*); 0 for ode (opd.validate: ranges)
    num_steps: int = 10            # rollout steps in training
    eval_num_steps: int = 40       # steps for evaluation and previews
    shift: float = 3.0             # SD3 schedule shift
    guidance_scale: float = 4.5    # CFG scale w; 1.0 = CFG-free


@dataclass
class FlowMatchingConfig:
    """Rectified-flow pre-training loss with logit-normal σ (SD3)."""

    _target_: str = "opd.objectives.flow_matching.FlowMatchingLoss"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class GRPOConfig:
    """Flow-GRPO's PPO-clipped objective (docs/algorithms.md, Flow-GRPO)."""

    _target_: str = "opd.objectives.grpo.GRPOLoss"
    clip_range: float = 1e-4
    kl_weight: float = 0.04
    exact_kl: bool = True          # False: the released code's KL without the Δ factor


@dataclass
class GRPOGuardConfig:
    """GRPO-Guard (docs/algorithms.md, GRPO-Guard)."""

    _target_: str = "opd.objectives.grpo_guard.GRPOGuardLoss"
    clip_range: float = 2e-6
    kl_weight: float = 0.0
    exact_kl: bool = True
    per_sample: bool = True        # False: the released code's batch-wide RatioNorm
    reweight: bool = True          # the 1/Δ_k step weighting


@dataclass
class NFTConfig:
    """DiffusionNFT (docs/algorithms.md, DiffusionNFT)."""

    _target_: str = "opd.objectives.nft.NFTLoss"
    beta: float = 1.0              # β_NFT: 1.0 GenEval/PickScore, 0.1 OCR
    kl_weight: float = 1e-4        # λ, velocity L2 to the reference model
    loss_scale: float = 5.0


@dataclass
class OPDConfig:
    """DiffusionOPD's loss (docs/method.md, "Per-step KL (SDE)"; paper Eq. 10-12)."""

    _target_: str = "opd.objectives.opd.OPDLoss"
    estimator: str = "pathwise"    # pathwise | score_function (the PPO-style estimator, Sec. 3.3)
    variant: str = "paper"         # paper (the per-step KL) | code (the released script's loss, per kernel)
    kernel: Optional[str] = "${sampler.kernel}"  # noqa: UP045 (OmegaConf schemas) — the rollout kernel, variant=code needs it
    reduction: str = "mean"        # mean over latent elements (reference) | sum (exact KL)
    step_reduction: str = "sum"    # sum over trained steps and teachers (paper Eq. 11) | mean (the authors' script)
    kl_weight: float = 1.0         # scales the loss (the effective learning rate of distillation)


@dataclass
class TeacherConfig:
    """One frozen teacher adapter of DiffusionOPD: what it is good at and where it lives."""

    name: str = "???"              # unique; log keys are teacher/<name>/*
    adapter: Optional[str] = "???"  # noqa: UP045 — LoRA folder or .safetensors (diffusers format); null: the base model
    prompts: Any = "???"           # the task's prompt set (a `_target_` returning metadata rows)
    guidance_scale: float = 4.5    # the teacher's own CFG for its targets
    monitor_reward: Any = None     # a reward config logged on the student's samples


#: the environment variable that names ``paths.root_dir`` (conf/paths/default.yaml)
ROOT_ENV = "OPD_ROOT"
#: the folders a root holds (``paths.data_dir``, ``paths.models_dir``)
ROOT_FOLDERS = ("data", "models")


def in_checkout() -> bool:
    """Whether this ``opd`` is the source of a checkout (``<root>/src/opd`` with ``<root>/conf``), not a
    copy installed from a wheel into site-packages."""
    root = checkout_root()
    return Path(__file__).resolve().parent == root / "src" / "opd" and (root / "conf").is_dir()


def config_dir() -> Path:
    """The Hydra config folder: the checkout's ``conf/``, else the copy a wheel ships inside the package
    (``opd/conf``, the same files: pyproject.toml maps ``conf/`` to the package ``opd.conf``)."""
    if in_checkout():
        return checkout_root() / "conf"
    packaged = Path(__file__).resolve().parent / "conf"
    if not (packaged / "train.yaml").is_file():
        raise FileNotFoundError(f"opd's configs are missing: neither a checkout's conf/ nor {packaged}; reinstall "
                                "opd (`pip install .` in the checkout ships conf/ inside the package)")
    return packaged


def project_root() -> str:
    """The checkout opd runs from (``conf/`` and ``models/`` beside ``src/``), else the working folder."""
    return str(checkout_root()) if in_checkout() else str(Path.cwd())


def config_root_dir() -> str:
    """``paths.root_dir`` (the ``opd_root`` resolver): ``$OPD_ROOT``, else the checkout; outside one (opd
    installed from a wheel) the working folder if it holds ``data/`` or ``models/``, else a clear error,
    rather than runs that fail later on files missing under a folder nobody chose. (``$OPD_ROOT`` is
    read here too: OmegaConf resolves ``oc.env``'s default even when the variable is set.)"""
    if os.environ.get(ROOT_ENV):
        return os.environ[ROOT_ENV]
    if in_checkout():
        return str(checkout_root())
    cwd = Path.cwd()
    if any((cwd / name).is_dir() for name in ROOT_FOLDERS):
        return str(cwd)
    raise ValueError(
        f"paths.root_dir (the folder holding data/ and models/) is not set: opd runs from an installed package, "
        f"not a checkout, and the working folder {cwd} holds neither data/ nor models/. Set {ROOT_ENV}=<checkout> "
        "or paths.root_dir=<checkout> (the mini world's base model is <checkout>/models/mini_base, its prompts "
        "<checkout>/data/mini), or run from the checkout folder; see docs/install.md")


def validate_train_config(cfg: Any) -> None:
    """Every bad value of a composed training config, raised at once before anything is built
    (:func:`opd.validate.validate_train_config`; ``opd.train.train`` calls it first)."""
    from opd.validate import validate_train_config as validate

    validate(cfg)


def validate_eval_config(cfg: Any) -> None:
    """The same for an evaluation config (:func:`opd.validate.validate_eval_config`)."""
    from opd.validate import validate_eval_config as validate

    validate(cfg)


def register_configs() -> None:
    if not OmegaConf.has_resolver("opd_root"):
        OmegaConf.register_new_resolver("opd_root", config_root_dir)
    cs = ConfigStore.instance()
    cs.store(group="sampler", name="sampler_schema", node=SamplerConfig)
    cs.store(group="objective", name="flow_matching_schema", node=FlowMatchingConfig)
    cs.store(group="objective", name="grpo_schema", node=GRPOConfig)
    cs.store(group="objective", name="grpo_guard_schema", node=GRPOGuardConfig)
    cs.store(group="objective", name="nft_schema", node=NFTConfig)
    cs.store(group="objective", name="opd_schema", node=OPDConfig)
    cs.store(group="teacher", name="teacher_schema", node=TeacherConfig)


register_configs()
