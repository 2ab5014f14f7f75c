"""Random LoRA teacher adapters of the right shape for a model config: the teachers of a dry run.

    python -m opd.models.random_adapters experiment=mopd_aesthetic_ocr_geneval \\
        model=sd35_medium_random paths.weights_dir=/tmp/opd_scale

composes the training config from the overrides given (Hydra syntax, as ``python -m opd.train``
takes them) and writes one diffusers LoRA file (``<adapter>/pytorch_lora_weights.safetensors``, the
layout :func:`opd.models.lora.save_lora` writes) at every ``teacher.<name>.adapter`` path of that
config, so that the same overrides then run ``python -m opd.train`` with these teachers. ``--out DIR``
writes ``DIR/<name>`` instead, for each of ``--names`` (default: the config's teachers).

The adapters target the references' modules (:data:`opd.models.lora.DEFAULT_TARGETS`) at rank
``--rank`` / alpha ``--alpha`` (default r = 32, α = 64: Flow-GRPO's and DiffusionNFT's), with both
factors drawn from N(0, ``--std``²) (B ≠ 0: each teacher differs from the base and from the others).
Only the transformer's layer shapes are needed: a random-weight model config
(``model=sd35_medium_random``) or ``model=sd35_medium`` (its folder's ``transformer/config.json``) is
built on the meta device, so the full-size model costs no memory; any other model is built as configured.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opd.models.lora import DEFAULT_TARGETS, WEIGHT_NAME, add_lora

log = logging.getLogger(__name__)


def meta_transformer(model: Mapping[str, Any]) -> nn.Module:
    """The transformer of the model config ``model`` (a resolved ``cfg.model``), on the meta device where
    its config says its architecture without building the rest (random SD3 configs, SD3 folders)."""
    import hydra
    from diffusers import SD3Transformer2DModel

    from opd.models.random_sd3 import TINY_TRANSFORMER, _plain

    model = _plain(model)
    target = str(model.get("_target_", "")).rsplit(".", 1)[-1]
    if target == "random_sd3_backbone":
        config = model["transformer"]
    elif target == "tiny_sd3_backbone":
        config = {**TINY_TRANSFORMER, "sample_size": model.get("image_size", 32)}
    elif target == "sd3_backbone":
        config = SD3Transformer2DModel.load_config(str(Path(str(model["path"])).expanduser()), subfolder="transformer")
    else:  # e.g. the mini model: small, built as configured
        built = hydra.utils.instantiate(model)
        return (built() if model.get("_partial_") else built).transformer
    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(config)


def random_lora_state(transformer: nn.Module, rank: int = 32, alpha: float = 64,
                      target_modules: Sequence[str] = DEFAULT_TARGETS, std: float = 0.01,
                      seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(LoRA factors keyed as ``get_peft_model_state_dict`` keys them, the adapter's LoRA config) for
    ``transformer`` (meta or real): the modules and shapes peft gives an adapter of these settings,
    the values drawn on the CPU from N(0, std²) with ``seed``."""
    from peft.utils import get_peft_model_state_dict

    add_lora(transformer, "random", rank=rank, alpha=alpha, target_modules=target_modules)
    try:
        shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(transformer, adapter_name="random").items()}
        metadata = transformer.peft_config["random"].to_dict()
    finally:
        transformer.delete_adapters("random")
    metadata["target_modules"] = sorted(metadata["target_modules"])
    g = torch.Generator().manual_seed(seed)
    state = {k: std * torch.randn(shape, generator=g) for k, shape in sorted(shapes.items())}
    return state, metadata


def write_random_adapter(transformer: nn.Module, directory: str | Path, rank: int = 32, alpha: float = 64,
                         std: float = 0.01, seed: int = 0) -> Path:
    """Write a random adapter for ``transformer`` to ``directory`` (diffusers layout); returns the file."""
    from diffusers import StableDiffusion3Pipeline

    state, metadata = random_lora_state(transformer, rank=rank, alpha=alpha, std=std, seed=seed)
    directory = Path(directory)
    StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=metadata)
    return directory / WEIGHT_NAME


def compose(overrides: Sequence[str]) -> Any:
    """The training config (``conf/train.yaml``) with ``overrides``, as ``python -m opd.train`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import opd.config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(opd.config.config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m opd.models.random_adapters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (experiment=..., "
                        "model=..., paths.weights_dir=...)")
    parser.add_argument("--out", type=Path, help="write DIR/<name> for each of --names instead of the config's "
                        "teacher.<name>.adapter paths")
    parser.add_argument("--names", nargs="+", help="the adapters' names (default: the config's teachers)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64)
    parser.add_argument("--std", type=float, default=0.01, help="standard deviation of both LoRA factors")
    parser.add_argument("--seed", type=int, default=0, help="teacher i draws with seed + i")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    cfg = compose(args.overrides)
    teachers = OmegaConf.to_container(cfg.teacher, resolve=True) if cfg.get("teacher") else {}
    names = args.names or [t.get("name", key) for key, t in teachers.items()]
    if not names:
        parser.error("no adapters to write: the composed config has no teachers; give experiment=... (a "
                     "distillation experiment) or --names")
    if args.out is not None:
        targets = {name: args.out / name for name in names}
    else:
        if not teachers:
            parser.error("the composed config has no teachers: give experiment=... (a distillation experiment) or "
                         "--out DIR --names ...")
        by_name = {t.get("name", key): t for key, t in teachers.items()}
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            parser.error(f"--names {unknown}: not teachers of this config ({sorted(by_name)}); use --out DIR")
        targets = {name: Path(str(by_name[name]["adapter"])).expanduser() for name in names
                   if by_name[name]["adapter"] is not None}  # a base-model teacher has no adapter to write
    transformer = meta_transformer(OmegaConf.to_container(cfg.model, resolve=True))
    written = {}
    for i, (name, directory) in enumerate(targets.items()):
        written[name] = write_random_adapter(transformer, directory, rank=args.rank, alpha=args.alpha, std=args.std,
                                             seed=args.seed + i)
        print(f"random teacher {name!r} (r={args.rank}, alpha={args.alpha:g}): {written[name]}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
