"""Bad inputs fail before any model loads, with an error naming the config key and the fix
(opd.validate), or warn clearly; rewards mark the images they could not score."""
import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from opd.validate import ConfigError, check_ckpt_path, validate_eval_config, validate_train_config

DISTILL = ["experiment=mini/mopd_demo"]
GRPO = ["experiment=mini/teacher_ocr"]
NFT = ["experiment=mini/teacher_ocr_nft"]


def bad_train(cfg_factory, overrides, match):
    """``overrides`` compose, and validation names ``match`` (a regex) in one ConfigError."""
    cfg = cfg_factory("train", overrides)
    with pytest.raises(ConfigError, match=match) as err:
        validate_train_config(cfg, overrides=overrides)
    return str(err.value)


def bad_eval(cfg_factory, overrides, match):
    cfg = cfg_factory("eval", overrides)
    with pytest.raises(ConfigError, match=match) as err:
        validate_eval_config(cfg)
    return str(err.value)


@pytest.mark.parametrize("overrides", [DISTILL, GRPO, NFT, ["experiment=pretrain_mini"], []])
def test_shipped_mini_configs_pass(cfg_factory, overrides):
    validate_train_config(cfg_factory("train", overrides), overrides=overrides)


def test_default_eval_config_passes(cfg_factory):
    validate_eval_config(cfg_factory("eval", []))


# -- module ---------------------------------------------------------------------------------
def test_prompts_per_teacher_zero(cfg_factory):
    bad_train(cfg_factory, [*DISTILL, "module.prompts_per_teacher=0"], r"module\.prompts_per_teacher=0: must be an "
              r"integer ≥ 1")


@pytest.mark.parametrize("base", [GRPO, NFT])
@pytest.mark.parametrize("size", [0, 1])
def test_group_size_below_two_is_an_error_explained(cfg_factory, base, size):
    msg = bad_train(cfg_factory, [*base, f"module.group_size={size}"], rf"module\.group_size={size}: must be an integer ≥ 2")
    assert "group of one image has advantage 0" in msg


def test_timestep_fraction_above_one(cfg_factory):
    bad_train(cfg_factory, [*GRPO, "module.timestep_fraction=2"], r"module\.timestep_fraction=2: must be in \(0, 1\]")
    bad_train(cfg_factory, [*DISTILL, "module.timestep_fraction=0"], r"module\.timestep_fraction=0: must be in \(0, 1\]")


def test_negative_lr_and_zero_steps_are_listed_together(cfg_factory):
    msg = bad_train(cfg_factory, [*GRPO, "module.optimizer.lr=-1", "sampler.num_steps=0"], "2 bad training config values")
    assert "module.optimizer.lr=-1: must be > 0" in msg and "sampler.num_steps=0: must be an integer ≥ 1" in msg


def test_an_empty_or_negative_compute_budget_is_named_before_anything_is_built(cfg_factory):
    # empty: what a failed $(python -m opd.results.compute ...) in a Makefile recipe passes on
    msg = bad_train(cfg_factory, [*NFT, "callbacks.compute_budget.max_model_tflop=",
                                  "callbacks.compute_budget.max_images_sampled=-5"], "2 bad training config values")
    assert "callbacks.compute_budget.max_model_tflop='': must be > 0 (or null); the compute after which" in msg
    assert "opd.results.compute in make), that command failed" in msg
    assert "callbacks.compute_budget.max_images_sampled=-5: must be > 0 (or null)" in msg
    cfg = cfg_factory("train", [*NFT, "callbacks.compute_budget.max_model_tflop=16040.502"])
    validate_train_config(cfg, overrides=[])  # a number: no error


def test_grpo_needs_a_stochastic_sampler(cfg_factory):
    bad_train(cfg_factory, [*GRPO, "sampler=ode"], r"sampler\.kernel='ode': .*GRPO needs .*sampler=flow_sde")


def test_nft_train_steps_within_the_grid(cfg_factory):
    bad_train(cfg_factory, [*NFT, "module.num_train_steps=11"], r"module\.num_train_steps=11: .*\[1, sampler\.num_steps = 10\]")


def test_round_must_split_over_the_gpus(cfg_factory):
    bad_train(cfg_factory, [*GRPO, "trainer.devices=3"], r"module\.num_groups_per_round=16: .*128 images per round do "
              r"not split over 3 GPUs")


def test_distill_rejects_dpm2(cfg_factory):
    bad_train(cfg_factory, [*DISTILL, "sampler=dpm2"], r"sampler\.kernel='dpm2': dpm2 keeps a history")


def test_typo_in_a_module_key_is_caught_before_instantiation(cfg_factory):
    bad_train(cfg_factory, [*GRPO, "+module.group_sise=4"], r"module\.group_sise=4: GRPOTeacher takes no argument "
              r"'group_sise'; did you mean module\.group_size\?")


def test_data_batch_size_zero(cfg_factory):
    bad_train(cfg_factory, ["experiment=pretrain_mini", "data.batch_size=0"], r"data\.batch_size=0: must be an integer ≥ 1")


def test_max_steps_below_minus_one(cfg_factory):
    bad_train(cfg_factory, [*GRPO, "trainer.max_steps=-5"], r"trainer\.max_steps=-5")


# -- sampler --------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "match"), [
    ([*GRPO, "sampler.noise_level=-1"], r"sampler\.noise_level=-1\.0: must be ≥ 0"),
    ([*GRPO, "sampler.noise_level=50"], r"sampler\.noise_level=50\.0: for kernel=flow .* use 0 ≤ noise_level ≤ 1\.3"),
    ([*DISTILL, "sampler.noise_level=50"], r"kernel=ode is deterministic and ignores it"),
    ([*GRPO, "sampler.kernel=dance", "sampler.noise_level=2"], r"for kernel=dance .* ≤ 1\.41"),
    ([*GRPO, "sampler.kernel=dpm1", "sampler.noise_level=1.5"], r"for kernel=dpm1 .* ≤ 1"),
])
def test_noise_level_out_of_range(cfg_factory, overrides, match):
    bad_train(cfg_factory, overrides, match)


def test_negative_guidance_scale(cfg_factory):
    bad_train(cfg_factory, [*GRPO, "sampler.guidance_scale=-5"], r"sampler\.guidance_scale=-5\.0: must be ≥ 0")


def test_unknown_kernel_lists_the_kernels(cfg_factory):
    from opd.sampling import KERNELS

    msg = bad_train(cfg_factory, [*GRPO, "sampler.kernel=flw"], r"sampler\.kernel='flw': must be one of .*did you mean "
                    r"'flow'\?")
    assert all(name in msg for name in KERNELS)


def test_bad_values_fail_before_anything_is_built(cfg_factory, monkeypatch):
    import hydra

    from opd.train import train

    cfg = cfg_factory("train", [*GRPO, "sampler.kernel=flw"])
    OmegaConf.resolve(cfg)
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: pytest.fail("something was built"))
    with pytest.raises(ConfigError, match="sampler.kernel"):
        train(cfg)


# -- teachers -------------------------------------------------------------------------------
def test_no_teacher_gets_the_friendly_message(cfg_factory):
    bad_train(cfg_factory, [*DISTILL, "teacher=[]"], r"teacher=\{\}: DiffusionOPD .* needs at least one teacher")
    cfg = cfg_factory("train", [*DISTILL, "teacher=[]"])
    OmegaConf.resolve(cfg)  # the interpolation module.teachers: ${teacher} resolves (it used not to)
    import hydra

    with pytest.raises(Exception, match="no teachers configured"):  # the module's own check is reachable too
        hydra.utils.instantiate(cfg.module)


def test_duplicate_teacher_is_an_error(cfg_factory):
    bad_train(cfg_factory, [*DISTILL, "teacher=[mini_ocr,mini_ocr]"], r"mini_ocr is listed 2 times: each fills "
              r"teacher\.ocr, so the run would distil ONE ocr teacher")
    bad_train(cfg_factory, [*DISTILL, "teacher=[mini_ocr,sd35_ocr]"], r"mini_ocr and sd35_ocr are configs of the same "
              r"teacher")


def test_duplicate_teacher_fails_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "opd.train", *DISTILL, "teacher=[mini_ocr,mini_ocr]",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode != 0
    assert "mini_ocr is listed 2 times" in out.stderr, out.stderr[-2000:]


def test_missing_teacher_adapter_is_named(cfg_factory, tmp_path):
    bad_train(cfg_factory, [*DISTILL, f"teacher.ocr.adapter={tmp_path / 'nope'}"],
              r"teacher\.ocr\.adapter=.*LoRA adapter not found")


# -- models and checkpoints -------------------------------------------------------------------
def test_sd35_without_weights_names_the_path_and_the_download(cfg_factory, tmp_path):
    missing = tmp_path / "sd35"
    msg = bad_train(cfg_factory, [*DISTILL, "model=sd35_medium", f"model.path={missing}"],
                    rf"model\.path='{missing}': no such folder")
    assert "huggingface-cli download stabilityai/stable-diffusion-3.5-medium" in msg
    from opd.models.sd3 import SD3Backbone

    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):  # the loader itself, not a hub error
        SD3Backbone.from_pretrained(str(missing))


def test_mini_model_path_missing(cfg_factory, tmp_path):
    bad_train(cfg_factory, [*GRPO, f"model.path={tmp_path}"], r"model\.path=.*holds no mini model")


@pytest.fixture
def ckpt_dir(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(64)}}, folder / "step_000050.ckpt")
    data = (folder / "step_000050.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # a save interrupted half-way
    return folder


def test_truncated_checkpoint_names_the_file_and_the_others(ckpt_dir):
    with pytest.raises(ValueError, match=r"last\.ckpt is not a readable checkpoint") as err:
        check_ckpt_path(ckpt_dir / "last.ckpt")
    assert "step_000050.ckpt" in str(err.value) and f"ckpt_path={ckpt_dir / 'step_000050.ckpt'}" in str(err.value)
    assert check_ckpt_path(ckpt_dir / "step_000050.ckpt") == str(ckpt_dir / "step_000050.ckpt")
    assert check_ckpt_path(None) is None
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt: no such file; other checkpoints"):
        check_ckpt_path(ckpt_dir / "nope.ckpt")


def test_truncated_ckpt_path_fails_validation(cfg_factory, ckpt_dir):
    bad_train(cfg_factory, [*GRPO, f"ckpt_path={ckpt_dir / 'last.ckpt'}"], "last.ckpt is not a readable checkpoint")


# -- prompts --------------------------------------------------------------------------------
def test_long_prompt_is_cut_with_one_warning(caplog):
    from opd.models.mini import ByteTextEncoder

    encoder = ByteTextEncoder(dim=8, num_layers=1, num_heads=1, max_length=48, pooled_dim=8)
    with caplog.at_level(logging.WARNING, logger="opd.models.mini"):
        ids = encoder.tokenize(["x" * 4000, "short"])
        encoder.tokenize(["y" * 4000])
    assert ids.shape == (2, 49)
    cuts = [r for r in caplog.records if "is cut" in r.getMessage()]
    assert len(cuts) == 1 and "4000 bytes is cut to its first 48" in cuts[0].getMessage()


def test_prompt_file_rejects_a_4000_character_line(tmp_path):
    from opd.data.prompt_files import load_prompt_file

    file = tmp_path / "p.txt"
    file.write_text("a cat\n" + "word " * 800 + "\n")
    with pytest.raises(ValueError, match=r"p\.txt:2: a prompt of 3999 characters.*limit 2000"):
        load_prompt_file(file)


def test_eval_prompt_sets_reject_long_prompts(cfg_factory, tmp_path):
    from opd.evaluate import _instantiate_prompts, load_prompt_sets

    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "' + "a" * 4000 + '"}\n')
    spec = f"{{_target_:opd.data.prompt_files.load_prompt_file,path:{file}}}"
    cfg = cfg_factory("eval", ["~eval_tasks.ocr.prompts", f"+eval_tasks.ocr.prompts={spec}"])
    with pytest.raises(Exception, match=r"p\.jsonl:1: a prompt of 4000 characters"):
        load_prompt_sets(cfg)
    rows = OmegaConf.create({"_target_": "builtins.list", "_args_": [[{"prompt": "b" * 4000}]]})  # any prompt target
    with pytest.raises(ValueError, match="eval_tasks.x.prompts: prompt 0 has 4000 characters"):
        _instantiate_prompts(rows, "eval_tasks.x.prompts")


# -- evaluation -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1])
def test_max_prompts_zero_or_negative(cfg_factory, value):
    bad_eval(cfg_factory, [f"max_prompts={value}"], rf"max_prompts={value}: must be an integer ≥ 1 .*or null")


def test_max_prompts_null_means_every_prompt(cfg_factory):
    from opd.evaluate import load_prompt_sets

    every = load_prompt_sets(cfg_factory("eval", ["max_prompts=null"]))
    two = load_prompt_sets(cfg_factory("eval", ["max_prompts=2"]))
    assert {len(rows) for rows in two.values()} == {2} and all(len(every[k]) > 2 for k in every)


def test_max_prompts_takes_each_tag_in_turn(cfg_factory):
    """A short look covers every kind of prompt: N prompts taken in turn from each tag (tags in order of
    first appearance, file order within a tag and in the result), not the first N of the file."""
    from opd.evaluation.run import each_tag_in_turn, load_prompt_sets

    rows = [{"tag": t, "prompt": f"{t}{i}"} for i, t in enumerate("aabacbbd")]
    assert [r["prompt"] for r in each_tag_in_turn(rows, 4)] == ["a0", "b2", "c4", "d7"]
    assert [r["prompt"] for r in each_tag_in_turn(rows, 6)] == ["a0", "a1", "b2", "c4", "b5", "d7"]
    assert each_tag_in_turn(rows, 100) == rows and each_tag_in_turn([{"prompt": "x"}] * 3, 2) == [{"prompt": "x"}] * 2
    # the GenEval test set starts with five position prompts; eight prompts now span all six tags
    geneval = load_prompt_sets(cfg_factory("eval", ["max_prompts=8"]))["geneval"]
    assert len(geneval) == 8 and len({r["tag"] for r in geneval}) == 6


def test_evaluation_without_tasks(cfg_factory):
    bad_eval(cfg_factory, ["~eval_tasks.ocr", "~eval_tasks.geneval", "~eval_tasks.aesthetic"],
             r"eval_tasks=\{\}: no task to evaluate")


@pytest.mark.parametrize(("overrides", "match"), [
    (["images_per_prompt=0"], r"images_per_prompt=0: must be an integer ≥ 1"),
    (["batch_size=0"], r"batch_size=0: must be an integer ≥ 1"),
    (["num_steps=0"], r"num_steps=0: must be an integer ≥ 1"),
    (["guidance_scale=-1"], r"guidance_scale=-1: must be ≥ 0"),
    (["device=gpu"], r"device='gpu': must be auto, cpu, cuda"),
    (["~eval_tasks.ocr.rewards"], r"eval_tasks\.ocr\.rewards=None: the task has no reward"),
    (["+eval_tasks.ocr.tabel={OCR:ocr}"], r"eval_tasks\.ocr\.tabel=.*unknown task key \(did you mean table\?\)"),
    (["eval_tasks.ocr.table={OCR:orc_exact}"], r"eval_tasks\.ocr\.table\.OCR='orc_exact': is no score"),
    (["+eval_tasks.ocr.average=prompt"], r"eval_tasks\.ocr\.average='prompt': must be one of image, tag"),
    (["sampler.shift=0"], r"sampler\.shift=0\.0: must be > 0"),
    (["~checkpoints"], r"checkpoints is empty: name at least one"),
    (["+eval_tasks.ocrr.prompts.path=x.txt"], r"eval_tasks\.ocrr\.prompts=.*give the prompt set as \{_target_"),
    (["+eval_tasks.ocrr.prompts.path=x.txt"], r"eval_tasks\.ocrr\.rewards=None: the task has no reward"),
])
def test_bad_eval_values(cfg_factory, overrides, match):
    bad_eval(cfg_factory, overrides, match)


def test_missing_eval_adapter_fails_before_the_model_loads(cfg_factory, monkeypatch):
    import hydra

    from opd.evaluate import evaluate

    cfg = cfg_factory("eval", ["+checkpoints.student=/nowhere/adapter", "controls.cover=null"])
    real = hydra.utils.instantiate
    monkeypatch.setattr(hydra.utils, "instantiate", lambda spec, *a, **k: pytest.fail("the model was built")
                        if "_partial_" in spec and "backbone" in spec._target_ else real(spec, *a, **k))
    with pytest.raises(FileNotFoundError, match="LoRA adapter not found: /nowhere/adapter"):
        evaluate(cfg)


def test_eval_fails_before_anything_is_built(cfg_factory, monkeypatch):
    import hydra

    from opd.evaluate import evaluate

    cfg = cfg_factory("eval", ["max_prompts=0"])
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: pytest.fail("something was built"))
    with pytest.raises(ConfigError, match="max_prompts=0"):
        evaluate(cfg)


# -- rewards that cannot score --------------------------------------------------------------
class _BrokenEngine:
    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        raise RuntimeError("engine down")


@pytest.fixture
def broken_ocr(monkeypatch):
    from opd.rewards import ocr as ocr_module

    monkeypatch.setitem(ocr_module.ENGINES, "broken", _BrokenEngine)
    return ocr_module.OCRReward(engine="broken", num_workers=2)


def test_ocr_engine_raising_marks_every_image_failed(broken_ocr):
    images, prompts = torch.rand(4, 3, 64, 64), ['a sign that says "OPD"'] * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # the filter that used to swallow repeats
        first = broken_ocr.score(images, prompts, [{}] * 4)
        second = broken_ocr.score(images, prompts, [{}] * 4)
    assert first["failed"].tolist() == [1.0] * 4 and first["reward"].tolist() == [0.0] * 4
    assert second["failed"].tolist() == [1.0] * 4 and first["exact"].tolist() == [0.0] * 4
    assert (broken_ocr.num_failed, broken_ocr.num_read) == (8, 8)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2 and "8 of 8 images failed so far" in messages[1] and "engine down" in messages[0]
    with pytest.warns(RuntimeWarning, match="raised on 2 of 2"):
        matrix = broken_ocr.score_matrix(images[:2], [{"prompt": p} for p in prompts[:3]])
    assert matrix["failed"].shape == (2, 3) and matrix["failed"].eq(1).all() and matrix["reward"].eq(0).all()


def test_ocr_reports_failed_zero_when_it_reads(monkeypatch):
    from opd.rewards import ocr as ocr_module

    class Reads:
        def read(self, image):
            return [("OPD", 0.9)]

    monkeypatch.setitem(ocr_module.ENGINES, "reads", Reads)
    out = ocr_module.OCRReward(engine="reads").score(torch.rand(2, 3, 64, 64), ['"OPD"'] * 2, [{}] * 2)
    assert out["failed"].tolist() == [0.0, 0.0] and out["reward"].tolist() == [1.0, 1.0]


def test_multi_reward_passes_failed_through(broken_ocr):
    from opd.rewards.base import Reward
    from opd.rewards.multi import MultiReward

    class Half(Reward):
        name = "half"

        def score(self, images, prompts, metadata):
            return {"reward": torch.full((images.shape[0],), 0.5)}

    multi = MultiReward({"ocr": broken_ocr, "half": Half()}, {"ocr": 1.0, "half": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = multi.score(torch.rand(3, 3, 64, 64), ['"OPD"'] * 3, [{}] * 3)
    assert out["ocr/failed"].tolist() == [1.0] * 3 and out["failed"].tolist() == [1.0] * 3
    assert out["reward"].tolist() == [1.0] * 3  # 1·0 (failed OCR) + 2·0.5
    plain = MultiReward({"half": Half()}, {"half": 1.0}).score(torch.rand(1, 3, 8, 8), ["x"], [{}])
    assert "failed" not in plain  # only rewards that can fail report it
