"""Every experiment composes and instantiates; typos are errors; the CLI answers --help/--cfg."""
import subprocess
import sys

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import EXPERIMENTS, ROOT, TOY_MODEL, stand_in_reward_overrides
from opd.validate import validate_train_config


def test_there_are_experiments():
    assert "pretrain_mini" in EXPERIMENTS


def shrink(cfg_factory, experiment, tmp_path):
    """Overrides that make an experiment CPU-sized: a toy model of the same family, where it reads
    user prompt files a small one, and real-scale rewards on their random stand-ins (real-scale
    weights, reward servers and data are not on CI machines)."""
    probe = cfg_factory("train", [f"experiment={experiment}"])
    sd3 = "sd3_backbone" in probe.model._target_
    overrides = ["model=sd3_tiny_random"] if sd3 else list(TOY_MODEL)
    overrides += stand_in_reward_overrides(probe)
    prompts = OmegaConf.select(probe, "module.prompts")
    if prompts is not None and prompts.get("_target_", "").endswith("load_prompt_file"):
        file = tmp_path / "prompts.txt"
        file.write_text('a sign that says "OPD"\na photo of a cat\n')
        overrides.append(f"module.prompts.path={file}")
    if "init_adapter" in list((probe.get("module") or {}).keys()):  # a later stage starts from a toy adapter
        lora = OmegaConf.select(probe, "module.lora") or {}
        rank, alpha = lora.get("rank", 32), lora.get("alpha", 64)
        overrides.append(f"module.init_adapter={toy_adapter(tmp_path, sd3, rank=rank, alpha=alpha)}")
    for key, teacher in (probe.get("teacher") or {}).items():  # toy adapters of the toy model's shape
        overrides.append(f"teacher.{key}.adapter={toy_adapter(tmp_path, sd3)}")
        if teacher.prompts.get("_target_", "").endswith("load_prompt_file"):
            file = tmp_path / f"{key}.txt"
            file.write_text("a photo of a cat\n")
            overrides.append(f"teacher.{key}.prompts.path={file}")
    return [f"experiment={experiment}", "trainer=cpu", *overrides]


def toy_adapter(tmp_path, sd3: bool, rank: int = 2, alpha: int = 4):
    from opd.models.lora import add_lora, save_lora
    from opd.models.random_sd3 import tiny_sd3_backbone
    from test_models import toy

    folder = tmp_path / f"toy_adapter{'_sd3' if sd3 else ''}_r{rank}"
    if not folder.exists():
        model = tiny_sd3_backbone() if sd3 else toy()
        add_lora(model.transformer, "t", rank=rank, alpha=alpha)
        save_lora(model.transformer, "t", folder)
    return folder


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(cfg_factory, experiment, tmp_path):
    cfg = cfg_factory("train", shrink(cfg_factory, experiment, tmp_path))
    OmegaConf.resolve(cfg)
    validate_train_config(cfg, overrides=[f"experiment={experiment}"])  # every shipped recipe passes the checks
    module = hydra.utils.instantiate(cfg.module)
    datamodule = hydra.utils.instantiate(cfg.data)
    module.configure_model()  # builds the toy backbone through the model group's factory
    assert module.backbone is not None
    assert datamodule is not None or cfg.data is None  # online RL draws its own prompts
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.max_steps == cfg.trainer.max_steps


# The CLI composes through the same config search path as the in-process tests above, which compose every
# experiment; two subprocesses (13 s each) show the entry point itself: the paper's MOPD run and a mini run.
@pytest.mark.parametrize("experiment", ["mopd_aesthetic_ocr_geneval", "mini/mopd_demo"])
def test_cli_prints_resolved_job_config(experiment):
    out = subprocess.run([sys.executable, "-m", "opd.train", f"experiment={experiment}", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert f"task_name: {OmegaConf.create(out.stdout).task_name}" in out.stdout


def test_cli_help_lists_groups():
    out = subprocess.run([sys.executable, "-m", "opd.train", "--help"], cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for group in ("model", "sampler", "trainer", "logger", "experiment", "teacher", "reward", "callbacks"):
        assert f"{group}:" in out.stdout


def test_typo_in_sampler_key_is_an_error(cfg_factory):
    with pytest.raises(ConfigCompositionException, match="kernal"):
        cfg_factory("train", ["sampler.kernal=flow"])


def test_typo_in_objective_key_is_an_error(cfg_factory):
    with pytest.raises(ConfigCompositionException, match="logit_mena"):
        cfg_factory("train", ["objective.logit_mena=0.5"])


def test_sampler_values_are_typed(cfg_factory):
    with pytest.raises(ConfigCompositionException):
        cfg_factory("train", ["sampler.num_steps=ten"])


def test_every_group_option_composes(cfg_factory):
    for group in ("trainer=gpu", "trainer=ddp", "logger=csv", "logger=wandb", "logger=many",
                  "sampler=flow_sde", "sampler=dpm2", "model=sd35_medium", "debug=default", "debug=fdr",
                  "callbacks=lora", "eval_tasks@eval.tasks=sd35", "eval=null"):
        cfg = cfg_factory("train", [group])
        assert cfg is not None


def test_known_library_noise_is_silenced_and_other_warnings_still_show(caplog):
    import logging
    import warnings

    from opd.train import KNOWN_NOISE, quiet_known_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        for text in KNOWN_NOISE:
            warnings.warn(text + " (and the rest of the library's sentence)", UserWarning, stacklevel=1)
        warnings.warn("teacher 'ocr' failed on 3 images", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["teacher 'ocr' failed on 3 images"]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=rank_zero.name):
        rank_zero.info("💡 Tip: try some cloud product")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records if r.name == rank_zero.name] == ["GPU available: False, used: False"]
