"""Training entry point: ``python -m opd.train experiment=<name> [overrides]``.

``train(cfg)`` builds everything from the composed config (Hydra ``_target_`` is the only
registry) and fits; ``main`` is the thin ``@hydra.main`` wrapper.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

import opd.config  # noqa: F401 — registers the structured-config schemas

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``name: {_target_: ...}`` mapping (callbacks, loggers)."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` → ``<output_dir>/checkpoints/last.ckpt`` (clear error when absent)."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"ckpt_path=last but {last} does not exist; resume inside the stopped "
                                "run's folder with hydra.run.dir=<that folder>")
    return str(last)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build data, module, callbacks, loggers and trainer from ``cfg``; fit. Returns
    ``(metrics, objects)``."""
    pl.seed_everything(cfg.seed, workers=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ for the fp32 parts
    torch.backends.cudnn.allow_tf32 = True
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    objects = {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}
    log.info("output folder: %s", cfg.paths.output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("done; outputs in %s", cfg.paths.output_dir)
    return metrics, objects


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    OmegaConf.resolve(cfg)
    metrics, _ = train(cfg)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    main()
