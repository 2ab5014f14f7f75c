"""The SD3.5 teacher experiments (teacher_aesthetic: GRPO-Guard on PickScore + CLIPScore + HPSv2.1;
teacher_ocr: GRPO-Guard on OCR; teacher_geneval: DiffusionNFT on GenEval) keep the reference recipes
and each runs one round on the tiny random SD3, its rewards on random stand-ins, on the CPU."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, stand_in_reward_overrides
from opd.train import train

OCR_PROMPTS = ['a sign that says "OPD"', 'a neon sign that says "hello"', "", 'a poster that says "42"']
#: case → (experiment, prompt file name, its lines (None: GenEval rows), optimiser steps of one round, the
#: logged reward key, own overrides)
CASES = {
    "teacher_aesthetic": ("teacher_aesthetic", "pickapic_train.txt",
                          ["a castle at dawn, oil painting", "a corgi astronaut, 3d render"], 2,
                          "reward/aesthetic_sd35", []),
    # RapidOCR reads nothing in the tiny model's 32-px noise: all rewards 0, all advantages 0 and, with
    # β = 0, no gradient; the same recipe on JPEG compressibility (real, weight-free, varying) moves
    "teacher_ocr": ("teacher_ocr", "ocr_train.txt", OCR_PROMPTS, 2, "reward/ocr", []),
    "teacher_ocr_jpeg": ("teacher_ocr", "ocr_train.txt", OCR_PROMPTS, 2, "reward/jpeg_compressibility",
                         ["reward=jpeg_compressibility"]),
    # NFT noises each sample at num_train_steps of the K = 2 grid times. The official-logic GenEval's
    # tiny random Mask2Former detects nothing (every class probability ≈ 1/81 < 0.3): all rewards 0,
    # r = ½ for every sample and, at θ = θ_old, a zero NFT gradient — so that case checks the round
    # and its logs, and the same experiment on the GenEval server client's local stand-in (a reward
    # that varies) checks that the student moves.
    "teacher_geneval": ("teacher_geneval", "train_metadata.jsonl", None, 1, "reward/geneval",
                        ["module.num_train_steps=2"]),
    "teacher_geneval_remote": ("teacher_geneval", "train_metadata.jsonl", None, 1, "reward/geneval",
                               ["module.num_train_steps=2", "reward=geneval_remote"]),
}
#: CPU-sized overrides every case shares: 2 groups of 2 images, 2 sampling steps, a rank-2 LoRA
SMALL = ["model=sd3_tiny_random", "trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false",
         "trainer.log_every_n_steps=1", "module.num_groups_per_round=2", "module.group_size=2",
         "module.lora={rank:2,alpha:4}", "sampler.num_steps=2", "callbacks.image_grid.num_steps=2",
         "+module.preview_prompts=[a sign]", "module.rollout_chunks=1"]


def geneval_rows() -> list[str]:
    """Two shipped GenEval metadata rows (the training file's format: prompt, tag, include, exclude)."""
    shipped = [json.loads(x) for x in (ROOT / "data/geneval/evaluation_metadata.jsonl").read_text().splitlines()]
    return [json.dumps(next(r for r in shipped if r["tag"] == tag)) for tag in ("single_object", "colors")]


def compose(cfg_factory, case: str, tmp_path, extra=()):
    """``case``'s experiment shrunk for the CPU, with a prompt file in ``tmp_path`` and every reward
    that has one on its random stand-in."""
    experiment, name, lines, steps, _, own = CASES[case]
    prompts = tmp_path / name
    prompts.write_text("\n".join(lines if lines is not None else geneval_rows()) + "\n")
    base = [f"experiment={experiment}", *own]
    probe = cfg_factory("train", base)
    return cfg_factory("train", [*base, *SMALL, f"trainer.max_steps={steps}", f"module.prompts.path={prompts}",
                                 *stand_in_reward_overrides(probe), *extra])


def test_recipes_are_the_references(cfg_factory):
    aesthetic = cfg_factory("train", ["experiment=teacher_aesthetic"])
    assert aesthetic.module._target_ == "opd.modules.teacher_rl.GRPOTeacher"
    assert aesthetic.objective._target_.endswith("GRPOGuardLoss") and aesthetic.sampler.kernel == "flow"
    assert (aesthetic.objective.kl_weight, aesthetic.objective.clip_range) == (0.0, 4e-6)
    assert aesthetic.module.global_std is False and aesthetic.module.optimizer.lr == 1e-4
    assert dict(aesthetic.reward.aesthetic_sd35.weights) == {"pickscore": 1.0, "clipscore": 1.0, "hpsv21": 1.0}
    assert aesthetic.module.prompts.path.endswith("pickscore/train.txt")

    geneval = cfg_factory("train", ["experiment=teacher_geneval"])
    assert geneval.module._target_ == "opd.modules.teacher_nft.NFTTeacher"
    assert geneval.objective._target_.endswith("NFTLoss") and geneval.objective.beta == 1.0
    assert (geneval.sampler.kernel, geneval.sampler.guidance_scale) == ("dpm2", 1.0)
    assert geneval.reward.geneval._target_ == "opd.rewards.geneval.GenEval"
    assert geneval.module.prompts.path.endswith("geneval/train_metadata.jsonl")
    assert (geneval.module.num_groups_per_round, geneval.module.group_size) == (48, 24)
    assert geneval.module.num_updates_per_round == 1 and geneval.module.decay_schedule == "linear"
    assert geneval.module.optimizer.lr == 3e-4

    for experiment in ("teacher_aesthetic", "teacher_ocr", "teacher_geneval"):  # the shared SD3.5 recipe
        cfg = cfg_factory("train", [f"experiment={experiment}"])
        assert cfg.model.image_size == 512 and cfg.sampler.num_steps == 10
        assert dict(cfg.module.lora) == {"rank": 32, "alpha": 64}
        assert cfg.trainer.strategy == "ddp"
        assert (cfg.callbacks.ema.decay, cfg.callbacks.ema.every_n_steps) == (0.9, 8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sd35_teacher_runs_a_round_on_a_tiny_random_sd3(cfg_factory, case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPD_WEIGHTS_DIR", str(tmp_path / "no_weights"))  # stand-ins read nothing
    cfg = compose(cfg_factory, case, tmp_path)
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    _, _, _, steps, key, _ = CASES[case]
    assert objects["trainer"].global_step == steps  # one round
    assert key in metrics and torch.isfinite(torch.as_tensor(metrics[key]))
    if case in ("teacher_ocr", "teacher_geneval", "teacher_geneval_remote"):
        assert 0.0 <= metrics[key] <= 1.0
    if case == "teacher_geneval":  # GenEval's strict correctness is logged beside the partial score
        assert f"{key}/correct" in metrics
    if case == "teacher_aesthetic":  # the 1:1:1 sum and each component are logged
        parts = [metrics[f"{key}/{name}"] for name in ("pickscore", "clipscore", "hpsv21")]
        assert metrics[key] == pytest.approx(sum(parts), rel=1e-4, abs=1e-5)
    module = objects["module"]
    # the LoRA B matrices start at zero: after one round the trained adapter's must have moved
    trained = {k: v for k, v in module.backbone.transformer.named_parameters()
               if "lora_B" in k and (".old." not in k)}
    assert trained
    if case not in ("teacher_geneval", "teacher_ocr"):  # constant rewards give no gradient: see CASES
        assert any(v.detach().abs().sum() > 0 for v in trained.values())
    assert all(not p.requires_grad for k, p in module.backbone.named_parameters() if "lora_" not in k)
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
