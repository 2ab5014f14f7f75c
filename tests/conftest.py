"""Shared fixtures: compose the real Hydra config, shrunk for CPU tests."""
from __future__ import annotations

import csv
import inspect
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import opd.config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml"))
#: a toy mini model (two blocks) so CPU tests take seconds
TOY_MODEL = [
    "model.path=null",
    ("+model.transformer={sample_size:16,patch_size:4,in_channels:3,out_channels:3,num_layers:2,"
     "attention_head_dim:16,num_attention_heads:2,joint_attention_dim:32,caption_projection_dim:32,"
     "pooled_projection_dim:32,pos_embed_max_size:4}"),
    "+model.text_encoder={dim:32,num_layers:1,num_heads:2,max_length:40,pooled_dim:32}",
    "model.image_size=16",
]


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path):
    """The composed config, with the run folder (normally Hydra's) pointed at ``output_dir``."""
    GlobalHydra.instance().clear()
    paths = [f"paths.root_dir={ROOT}", f"paths.output_dir={output_dir}"]
    if config_name == "eval":
        paths.append(f"output_dir={output_dir}")
    if config_name == "train" and not any(o.split("=")[0].lstrip("+~").startswith("eval") for o in overrides):
        # the end-of-run evaluation (conf/eval_settings) is tested in test_train_eval.py and
        # test_experiments.py; elsewhere a full mini evaluation per run would only cost minutes
        paths.append("eval=null")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*paths, *overrides])


@pytest.fixture
def cfg_factory(tmp_path):
    def make(config_name: str = "train", overrides: list[str] | None = None):
        return compose_cfg(config_name, overrides or [], tmp_path)
    return make


STAND_IN_FLAG = "random_weights_for_tests"


def stand_in_reward_overrides(cfg, root: str = "reward") -> list[str]:
    """Overrides switching every reward under ``cfg.<root>`` (nested ones too, e.g. a MultiReward's
    components) whose class takes ``random_weights_for_tests`` to its random stand-in: real-scale
    reward weights and servers are not on CI machines. Rewards without the flag are left alone."""
    from omegaconf import DictConfig

    out = []

    def visit(node, path: str) -> None:
        if not isinstance(node, DictConfig):
            return
        target = node.get("_target_")
        if isinstance(target, str) and STAND_IN_FLAG in inspect.signature(hydra.utils.get_object(target)).parameters:
            out.append(f"{'' if STAND_IN_FLAG in node else '+'}{path}.{STAND_IN_FLAG}=true")
        for key in node:
            if key != "_target_":
                visit(node._get_node(key), f"{path}.{key}")

    visit(cfg.get(root), root)
    return out


def logged(out_dir: Path, key: str) -> dict[int, float]:
    """``step → value`` of ``key`` over every CSV-logger version of a run (a resumed run adds one)."""
    rows = []
    for file in sorted(out_dir.glob("csv/version_*/metrics.csv")):
        with open(file) as f:
            rows += [r for r in csv.DictReader(f) if r.get(key)]
    return {int(r["step"]): float(r[key]) for r in rows}
