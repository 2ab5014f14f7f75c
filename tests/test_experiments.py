"""Every experiment under conf/experiment (found by globbing: a new file is covered) trains one step on
a tiny model on the CPU and ends with its evaluation, whose results.json has every table column of
its task suite (conf/eval_tasks) for every row.

The mini-world experiments run on a saved toy mini model (so the evaluation's base is the trained
one's), the SD3.5 ones on the tiny random SD3 (model=sd3_tiny_random), every reward with a random
stand-in on it, teachers and earlier stages on toy adapters, user prompt files on small ones. The
evaluation is as small as it gets (one prompt per task, one image, one step, no controls), and each
reward it builds is built once for the whole module.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from conftest import EXPERIMENTS, ROOT, TOY_MODEL, stand_in_reward_overrides

#: one training step, no previews or curves
TRAIN_SMALL = ["trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=1",
               "trainer.max_time=null", "trainer.log_every_n_steps=1", "callbacks.image_grid=null",
               "callbacks.curves=null", "sampler.num_steps=2"]
#: the end-of-run evaluation at its smallest
EVAL_SMALL = ["eval.max_prompts=1", "eval.images_per_prompt=1", "eval.num_steps=1", "eval.batch_size=8",
              "eval.device=cpu", "eval.controls.swapped=false", "eval.controls.sensitivity_pairs=0",
              "eval.controls.cover=null", "eval.controls.bootstrap.num_resamples=20", "eval.random_weights_for_tests=true"]
OCR_LINES = 'a sign that says "OPD"\na sign that says "K7"\n'


def compose_train(overrides: list[str], output_dir) -> DictConfig:
    """The composed training config with its end-of-run evaluation as configured (conftest's
    compose_cfg may turn it off for the other tests), the run folder at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.root_dir={ROOT}", f"paths.output_dir={output_dir}",
                                                       *overrides])


def geneval_rows() -> str:
    """Two shipped GenEval metadata rows (prompt, tag, include, exclude), the format GenEval rewards read."""
    shipped = [json.loads(x) for x in (ROOT / "data/geneval/evaluation_metadata.jsonl").read_text().splitlines()]
    return "".join(json.dumps(next(r for r in shipped if r["tag"] == tag)) + "\n" for tag in ("single_object", "colors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved toy mini base, rank-2 toy adapters of it and of the tiny random SD3, and prompt files."""
    from opd.models.lora import add_lora, save_lora
    from opd.models.random_sd3 import tiny_sd3_backbone
    from test_models import toy

    root = tmp_path_factory.mktemp("experiments")
    toy(seed=0).save_pretrained(root / "base", dtype=torch.float32)
    for name, model in (("mini", toy(seed=0)), ("sd3", tiny_sd3_backbone())):
        torch.manual_seed(1)
        add_lora(model.transformer, "t", rank=2, alpha=4)
        save_lora(model.transformer, "t", root / f"adapter_{name}")
    (root / "ocr.txt").write_text(OCR_LINES)
    (root / "plain.txt").write_text("a castle at dawn, oil painting\na photo of a cat\n")
    (root / "geneval.jsonl").write_text(geneval_rows())
    (root / "mini_prompts").mkdir()
    for file in (ROOT / "data" / "mini").glob("*.jsonl"):  # the mini world's prompt sets, 8 rows each
        (root / "mini_prompts" / file.name).write_text("".join(file.read_text().splitlines(keepends=True)[:8]))
    return root


@pytest.fixture(scope="module", autouse=True)
def cpu_sized():
    """For the whole module: the evaluation builds each reward (config, random flag) once (the SD3.5
    suite's random stand-ins are large networks), no reward reaches the network, and torch runs in one
    thread that flushes denormal floats to zero."""
    from opd.evaluation import run

    built, real = {}, run.build_reward

    def cached(spec, random_weights):
        key = (OmegaConf.to_yaml(spec, resolve=True), bool(random_weights))
        if key not in built:
            built[key] = real(spec, random_weights)
        return built[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(run, "build_reward", cached)
    # the random networks' tiny activations (denormal floats) are many times slower on CPUs: flush them to
    # zero, in one thread (the flag is per thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("OPD_UNIFIEDREWARD_URL", "http://127.0.0.1:9")  # nothing answers: the stand-in must not ask
    yield
    mp.undo()
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def prompt_file(world, spec) -> str:
    """A small prompt file standing in for a user prompt file: GenEval rows where the task reads them."""
    path = str(spec.get("path", ""))
    return str(world / ("geneval.jsonl" if "geneval" in path or "geneval" in str(spec.get("tag", ""))
                        else "ocr.txt" if "ocr" in path else "plain.txt"))


def mini_prompt_overrides(node, path: str, world) -> list[str]:
    """Every mini-world prompt set under ``node`` read from the 8-row copies: the full sets are
    thousands of rows, which a DiffusionOPD module's teachers carry through Hydra's instantiate."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return []
    if node.get("_target_") == "opd.data.world.grammar.load_prompts":
        return [f"{'' if 'path' in node else '+'}{path}.path={world / 'mini_prompts'}"]
    return [o for key in node if key != "_target_" for o in mini_prompt_overrides(node._get_node(key), f"{path}.{key}",
                                                                                  world)]


def shrink(experiment: str, world, out) -> list[str]:
    """Overrides that make ``experiment`` one CPU step on a tiny model, evaluated at the smallest."""
    probe = compose_train([f"experiment={experiment}"], out)
    sd3 = "sd3_backbone" in probe.model._target_
    pretrain = "cond_dropout" in probe.module
    if sd3:
        model = ["model=sd3_tiny_random"]
    elif pretrain:
        model = list(TOY_MODEL)
    else:
        model = [f"model.path={world / 'base'}", "model.image_size=16"]
    overrides = [f"experiment={experiment}", *model, *TRAIN_SMALL, *EVAL_SMALL, *stand_in_reward_overrides(probe)]
    module = probe.module
    if pretrain:
        overrides += ["data.batch_size=2", "data.num_workers=0", "module.cooldown_steps=0", "module.warmup_steps=0",
                      "module.export_every_n_steps=null"]
    else:
        overrides.append("module.lora={rank:2,alpha:4}")
    if "group_size" in module:  # GRPO family: 2 groups of 2 images in one rollout piece
        overrides += ["module.num_groups_per_round=2", "module.group_size=2", "module.rollout_chunks=1",
                      "module.num_updates_per_round=1"]
    if "num_train_steps" in module:
        overrides.append("module.num_train_steps=2")
    if "prompts_per_teacher" in module:
        overrides += ["module.prompts_per_teacher=1", "module.train_chunk=4", "module.target_chunk=4"]
    prompts = OmegaConf.select(probe, "module.prompts")
    if prompts is not None and str(prompts.get("_target_", "")).endswith("load_prompt_file"):
        overrides.append(f"module.prompts.path={prompt_file(world, prompts)}")
    if "init_adapter" in list(module.keys()):  # a later stage starts from a toy adapter (its value may be ???)
        overrides.append(f"module.init_adapter={world / ('adapter_sd3' if sd3 else 'adapter_mini')}")
    for key, teacher in (probe.get("teacher") or {}).items():
        overrides.append(f"teacher.{key}.adapter={world / ('adapter_sd3' if sd3 else 'adapter_mini')}")
        if str(teacher.prompts.get("_target_", "")).endswith("load_prompt_file"):
            overrides.append(f"teacher.{key}.prompts.path={prompt_file(world, teacher.prompts)}")
    for root in ("module", "teacher", "eval"):
        overrides += mini_prompt_overrides(probe.get(root), root, world)
    for name, task in (probe.eval.tasks or {}).items():  # the suite's user prompt files
        if str(task.prompts.get("_target_", "")).endswith("load_prompt_file"):
            overrides.append(f"eval.tasks.{name}.prompts.path={prompt_file(world, task.prompts)}")
    return overrides


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_trains_a_step_and_evaluates(experiment, world, tmp_path):
    from opd.train import train

    start = time.monotonic()
    cfg = compose_train(shrink(experiment, world, tmp_path), tmp_path)
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step >= 1
    pretrain = "cond_dropout" in cfg.module
    assert (tmp_path / ("model" if pretrain else "adapter")).is_dir()
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    teachers = [f"teacher_{name}" for name in (cfg.get("teacher") or {})] if cfg.eval.get("teachers") else []
    # a run at another CFG than the base's (CFG-free) has the base at its own CFG as well
    at_own_cfg = ["base_at_trained_cfg"] if float(cfg.sampler.guidance_scale) != float(cfg.eval.guidance_scale) else []
    assert sorted(results) == sorted(["trained"] if pretrain else ["base", "trained", *at_own_cfg, *teachers])
    columns = {f"{task}/{key}" for task, spec in cfg.eval.tasks.items() for key in (spec.get("table") or {}).values()}
    assert columns, "the suite names no table column"
    for row, values in results.items():
        assert columns <= set(values), (row, sorted(columns - set(values)))
        assert all(isinstance(v, float) for v in values.values())
        for column in columns:
            assert metrics[f"eval/{row}/{column}"] == pytest.approx(values[column])
    assert (tmp_path / "eval" / "results.md").is_file() and any((tmp_path / "eval" / "grids").glob("*.png"))
    print(f"{experiment}: {time.monotonic() - start:.1f} s")


def test_a_sweep_runs_in_parallel_with_the_local_launcher(tmp_path):
    """`python -m opd.train -m hydra/launcher=local` (joblib, worker processes): every run trains and
    evaluates into its own folder, and returns the evaluation's value it is asked for."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "opd.train", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2",
         "experiment=mini/teacher_ocr", *TOY_MODEL, *TRAIN_SMALL, *EVAL_SMALL, "module.num_groups_per_round=2",
         "module.group_size=2", "module.lora={rank:2,alpha:4}", "optimized_metric=eval/trained/ocr/ocr_exact", "seed=0,1",
         f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
    for job in ("0", "1"):
        results = json.loads((tmp_path / job / "eval" / "results.json").read_text())
        value = results["trained"]["ocr/ocr_exact"]
        assert f"optimized_metric eval/trained/ocr/ocr_exact = {value:.6g}" in (tmp_path / job / "train.log").read_text()
        assert OmegaConf.load(tmp_path / job / ".hydra" / "config.yaml").seed == int(job)


@pytest.mark.parametrize(("launcher", "plugin", "overrides", "expected"), [
    ("local", "hydra_joblib_launcher", ["hydra.launcher.n_jobs=3"], {"n_jobs": 3}),
    ("slurm", "hydra_submitit_launcher", ["hydra.launcher.timeout_min=30", "hydra.launcher.partition=gpu"],
     {"timeout_min": 30, "partition": "gpu", "gpus_per_node": 1, "tasks_per_node": 1, "nodes": 1}),
])
def test_launcher_configs_compose(launcher, plugin, overrides, expected):
    pytest.importorskip(f"hydra_plugins.{plugin}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [f"hydra/launcher={launcher}", "experiment=mini/sopd_ocr", *overrides],
                      return_hydra_config=True)
    assert plugin in cfg.hydra.launcher._target_
    assert {key: cfg.hydra.launcher[key] for key in expected} == expected


def test_debug_shrinks_pretraining_data_and_is_ignored_by_experiments_without_data(tmp_path):
    """`debug=default` sets data.batch_size for pre-training; an RL/distillation experiment (data: null)
    gets a data node without `_target_`, which training ignores instead of instantiating."""
    from opd.train import datamodule_config

    pretrain = datamodule_config(compose_train(["experiment=pretrain_mini", "debug=default"], tmp_path / "a"))
    assert pretrain._target_ == "opd.data.scenes.SceneDataModule" and pretrain.batch_size == 4
    distill = compose_train(["experiment=mini/sopd_ocr", "debug=default"], tmp_path / "b")
    assert OmegaConf.to_container(distill.data) == {"batch_size": 4, "num_workers": 0}
    assert datamodule_config(distill) is None


def test_optimized_metric_must_name_a_metric_the_run_produced():
    from opd.train import optimized_value

    produced = {"eval/trained/ocr/ocr_exact": 0.5, "train/loss": 1.0}
    assert optimized_value(OmegaConf.create({"optimized_metric": "eval/trained/ocr/ocr_exact"}), produced) == 0.5
    assert optimized_value(OmegaConf.create({"optimized_metric": None}), produced) is None
    with pytest.raises(KeyError, match=r"optimized_metric='eval/trained/ocr/orc'.*eval/trained/ocr/ocr_exact, train/loss"):
        optimized_value(OmegaConf.create({"optimized_metric": "eval/trained/ocr/orc"}), produced)
