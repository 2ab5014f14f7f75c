"""The evaluation that ends a training run gives exactly the numbers ``python -m opd.evaluate`` gives for
the same adapter (or exported model) and settings: one implementation, whatever training left behind
in the process (seeds, TF32 flags, threads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TOY_MODEL, compose_cfg
from opd.train import train
from test_experiments import compose_train

#: the evaluation's settings, small but with every control: swapped prompts, prompt sensitivity, covers
SETTINGS = {"max_prompts": 3, "images_per_prompt": 2, "num_steps": 2, "batch_size": 4, "device": "cpu",
            "controls.sensitivity_pairs": 2, "controls.cover.num_scenes": 8, "controls.cover.num_train_prompts": 4,
            "controls.bootstrap.num_resamples": 50}
TRAIN_SMALL = ["trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=1",
               "trainer.max_time=null", "callbacks.image_grid=null", "callbacks.curves=null", "sampler.num_steps=2"]


def eval_overrides(prefix: str) -> list[str]:
    return [f"{prefix}{key}={value}" for key, value in SETTINGS.items()]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    from test_models import toy

    root = tmp_path_factory.mktemp("train_eval")
    toy(seed=4).save_pretrained(root / "base", dtype=torch.float32)
    return root / "base"


def test_end_of_run_evaluation_equals_opd_evaluate(toy_base, tmp_path):
    # the GenEval teacher recipe (DiffusionNFT, CFG-free rollouts): the adapter is evaluated at the CFG
    # it was trained with (1.0), the base at eval.guidance_scale (4.5) and, as the run's start, at 1.0
    run = tmp_path / "run"
    cfg = compose_train(["experiment=mini/teacher_geneval", f"model.path={toy_base}", "model.image_size=16",
                                *TRAIN_SMALL, "module.num_groups_per_round=2", "module.group_size=2",
                                "module.rollout_chunks=1", "module.num_train_steps=2", "module.lora={rank:2,alpha:4}",
                                *eval_overrides("eval.")], run)
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    trained = json.loads((run / "eval" / "results.json").read_text())
    assert set(trained) == {"base", "base_at_trained_cfg", "trained", "cover"}
    assert objects["eval"] == trained
    assert metrics["eval/trained/geneval/geneval_mini_correct"] == pytest.approx(trained["trained"][
        "geneval/geneval_mini_correct"])
    for kind in ("ocr/ocr/swapped", "ocr/sensitivity", "ocr/ocr/ci_low"):  # the controls ran
        assert kind in trained["trained"], kind
    assert "| trained | 1 |" in (run / "eval" / "results.md").read_text()  # the adapter at its training CFG

    alone = tmp_path / "alone"
    done = subprocess.run(
        [sys.executable, "-m", "opd.evaluate", f"model.path={toy_base}", "model.image_size=16",
         f"+checkpoints.trained={{adapter:{run / 'adapter'},guidance_scale:1.0}}",
         "+checkpoints.base_at_trained_cfg={adapter:null,guidance_scale:1.0}", *eval_overrides(""),
         f"hydra.run.dir={alone}"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((alone / "results.json").read_text()) == trained  # exactly the same numbers


def test_end_of_pretraining_evaluates_the_exported_model(tmp_path):
    from opd.evaluate import evaluate

    # the experiment's end-of-run evaluation reads the val prompts, without a cover search
    settings = [o for o in eval_overrides("eval.") if "cover" not in o]
    cfg = compose_train(["experiment=pretrain_mini", *TOY_MODEL, *TRAIN_SMALL, "data.batch_size=2", "data.num_workers=0",
                         "module.cooldown_steps=0", "module.export_every_n_steps=null", *settings], tmp_path)
    OmegaConf.resolve(cfg)
    train(cfg)
    trained = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(trained) == {"trained"}  # no base: pre-training trains every weight
    alone = evaluate(compose_cfg("eval", [f"model.path={tmp_path / 'model'}", "model.image_size=16",
                                          "~checkpoints", "+checkpoints.trained=null", *eval_overrides(""), "controls.cover=null",
                                          "controls.swapped=false",
                                          *(f"eval_tasks.{t}.prompts.split=val" for t in ("geneval", "ocr", "aesthetic"))],
                                 tmp_path / "alone"))
    assert alone == trained


def test_eval_null_skips_it_and_bad_settings_fail_before_training(tmp_path, monkeypatch):
    from opd.validate import ConfigError

    base = ["experiment=mini/teacher_ocr", *TOY_MODEL, *TRAIN_SMALL]
    cfg = compose_train([*base, "eval.max_prompts=0", "eval.tasks.ocr.table={OCR:orc}"], tmp_path)
    monkeypatch.setattr("opd.train._fit", lambda *a: pytest.fail("training started"))
    with pytest.raises(ConfigError, match=r"(?s)end-of-run evaluation.*eval\.tasks\.ocr\.table\.OCR='orc'"
                                          r".*eval\.max_prompts=0"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"eval\.max_prompt=.*unknown key"):
        train(compose_train([*base, "+eval.max_prompt=2"], tmp_path))
    missing = f"{{_target_:opd.data.prompt_files.load_prompt_file,path:{tmp_path / 'nope.txt'}}}"
    with pytest.raises(Exception, match=r"(?s)eval\.tasks\.ocr\.prompts.*nope\.txt"):
        train(compose_train([*base, f"eval.tasks.ocr.prompts={missing}"], tmp_path))
    monkeypatch.undo()
    metrics, objects = train(compose_train([*base, "eval=null", "module.num_groups_per_round=2", "module.group_size=2",
                                            "module.lora={rank:2,alpha:4}"], tmp_path))
    assert "eval" not in objects and not (tmp_path / "eval").exists()
    assert not any(key.startswith("eval/") for key in metrics)


def test_a_ddp_run_ends_with_the_evaluation_one_process_gives(toy_base, tmp_path):
    """Two DDP ranks (gloo, CPU) under torchrun: rank 0 exports the adapter at the end of fit and the
    other rank waits for it before loading; both evaluate their share and rank 0 writes the numbers a
    single ``python -m opd.evaluate`` of that adapter gives."""
    run, alone = tmp_path / "run", tmp_path / "alone"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "opd.train", "experiment=mini/teacher_ocr", f"model.path={toy_base}", "model.image_size=16",
         *TRAIN_SMALL, "trainer.devices=2", "++trainer.strategy=ddp", "module.num_groups_per_round=2",
         "module.group_size=2", "module.lora={rank:2,alpha:4}", *eval_overrides("eval."), "eval.controls.cover=null",
         f"hydra.run.dir={run}"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((run / "eval" / "results.json").read_text())
    assert set(trained) == {"base", "trained"} and "ocr/ocr/swapped" in trained["trained"]
    done = subprocess.run(
        [sys.executable, "-m", "opd.evaluate", f"model.path={toy_base}", "model.image_size=16",
         f"+checkpoints.trained={{adapter:{run / 'adapter'},guidance_scale:4.5}}", *eval_overrides(""),
         "controls.cover=null", f"hydra.run.dir={alone}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for row, metrics in json.loads((alone / "results.json").read_text()).items():  # another batch split: float noise
        assert trained[row] == pytest.approx(metrics, rel=1e-4, abs=1e-4), row


def test_the_verdict_compares_student_base_and_teacher_per_task():
    from opd.evaluation.run import headlines, verdict

    heads = headlines({"geneval": {"table": {"GenEval": "geneval_mini_correct"}}, "ocr": {"table": {"OCR": "ocr_exact"}},
                       "aesthetic": {"prompts": {}}})  # a task without a table has no headline
    assert heads == {"geneval": ("GenEval", "geneval/geneval_mini_correct"), "ocr": ("OCR", "ocr/ocr_exact")}
    results = {"trained": {"geneval/geneval_mini_correct": 0.40, "geneval/geneval_mini_correct/ci_low": 0.30,
                           "geneval/geneval_mini_correct/ci_high": 0.50, "ocr/ocr_exact": 0.5,
                           "ocr/ocr_exact/ci_low": 0.4, "ocr/ocr_exact/ci_high": 0.6},
               "base": {"geneval/geneval_mini_correct": 0.25, "ocr/ocr_exact": 0.55},
               "teacher_geneval": {"geneval/geneval_mini_correct": 0.6}}
    assert verdict(results, heads) == [
        ("GenEval: student 0.400 better than the base 0.250 by 0.150 (the base is outside its 95 % interval); "
         "its teacher 0.600"),
        "OCR: student 0.500 worse than the base 0.550 by 0.050 (within its 95 % interval)"]
    results["base_at_trained_cfg"] = {"ocr/ocr_exact": 0.23}
    assert verdict(results, heads)[1] == ("OCR: student 0.500 worse than the base 0.550 by 0.050 (within its 95 % "
                                          "interval); the base at the student's CFG 0.230")


def test_the_verdict_says_which_prompts_it_read(cfg_factory, tmp_path):
    from opd.evaluation.run import evaluated_on, run_eval_config

    demo = run_eval_config(cfg_factory("train", ["experiment=mini/mopd_demo", "eval.teachers=true",
                                             f"paths.output_dir={tmp_path}"]))
    assert evaluated_on(demo) == "test prompts, at most 8 per task, 1 image per prompt"
    val = run_eval_config(cfg_factory("train", [
        "experiment=mini/mopd_demo", "eval.max_prompts=null", "eval.images_per_prompt=4",
        *(f"eval.tasks.{t}.prompts.split=val" for t in ("geneval", "ocr", "aesthetic")), f"paths.output_dir={tmp_path}"]))
    assert evaluated_on(val) == "val prompts, 4 images per prompt"


def test_eval_teachers_adds_each_teacher_at_its_own_cfg(cfg_factory, tmp_path):
    from opd.evaluation.run import run_eval_config

    cfg = cfg_factory("train", ["experiment=mini/mopd_demo", "eval.teachers=true", f"paths.output_dir={tmp_path}"])
    checkpoints = OmegaConf.to_container(run_eval_config(cfg).checkpoints, resolve=True)
    # the demo's student is CFG-free: the base at its CFG (where it started) is a row too
    assert set(checkpoints) == {"base", "base_at_trained_cfg", "trained", "teacher_geneval", "teacher_ocr",
                                "teacher_aesthetic"}
    for name in ("geneval", "ocr", "aesthetic"):
        assert checkpoints[f"teacher_{name}"] == {"adapter": str(cfg.teacher[name].adapter),
                                                  "guidance_scale": float(cfg.teacher[name].guidance_scale)}
    # a base-model teacher (CFG distillation) is the base at its CFG, not an adapter called "None"
    cfgd = cfg_factory("train", ["experiment=mini/mopd_demo", "teacher=[mini_geneval]", "teacher.geneval.adapter=null",
                                 "teacher.geneval.guidance_scale=4.5", "eval.teachers=true", f"paths.output_dir={tmp_path}"])
    assert OmegaConf.to_container(run_eval_config(cfgd).checkpoints)["teacher_geneval"] == {"adapter": None,
                                                                                           "guidance_scale": 4.5}
    off = cfg_factory("train", ["experiment=mini/mopd_demo", "eval.teachers=false", "sampler.guidance_scale=4.5",
                                f"paths.output_dir={tmp_path}"])
    assert set(run_eval_config(off).checkpoints) == {"base", "trained"}   # a student at the base's CFG
    # a CFG-free student: the base at its CFG too, where it started
    free = run_eval_config(cfg_factory("train", ["experiment=mini/mopd_cfg_free", "eval.teachers=false",
                                                 f"paths.output_dir={tmp_path}"]))
    assert OmegaConf.to_container(free.checkpoints)["base_at_trained_cfg"] == {"adapter": None, "guidance_scale": 1.0}
    assert OmegaConf.to_container(free.checkpoints)["trained"]["guidance_scale"] == 1.0
