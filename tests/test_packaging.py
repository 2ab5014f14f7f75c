"""Packaging (docs/install.md): a wheel holds every module and every config, runs from its own copy of
conf/ outside a checkout, and says which key to set when it has no data root; the metadata states the
Python range the pins support and one OpenCV; the preview grids reach W&B."""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from opd.callbacks.image_grid import ImageGrid, log_grid

ROOT = Path(__file__).resolve().parents[1]
#: what the wheel is built from (pyproject.toml names README.md as the long description)
SOURCES = ("pyproject.toml", "README.md", "src", "conf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources, with a developer's conf/local/default.yaml in it
    (the copy keeps the build's egg-info and build/ out of the checkout)."""
    work = tmp_path_factory.mktemp("build")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, work / name)
    (work / "conf" / "local" / "default.yaml").write_text("# a developer's own settings\n")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(work / "dist"), str(work)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (found,) = (work / "dist").glob("opd-*.whl")
    return found


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def test_the_wheel_holds_every_module_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"opd/{p.relative_to(ROOT / 'src' / 'opd').as_posix()}" for p in (ROOT / "src" / "opd").rglob("*.py")}
    assert modules - names == set(), "a subpackage missing from [tool.setuptools] packages in pyproject.toml"
    configs = {f"opd/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")
               if p.parent.name != "local"}
    assert {"opd/conf/train.yaml", "opd/conf/eval.yaml", "opd/conf/paths/default.yaml",
            "opd/conf/logger/wandb.yaml", "opd/conf/experiment/pretrain_mini.yaml"} <= configs
    assert configs - names == set()
    assert not [n for n in names if n.startswith("opd/conf/local/")]  # git-ignored settings stay out
    assert not [n for n in names if n.startswith(("data/", "models/", "conf/")) or n.endswith(".safetensors")]


def test_the_metadata_states_the_supported_pythons_and_one_opencv(wheel):
    meta = metadata(wheel)
    assert meta["Requires-Python"].replace(" ", "") in {">=3.11,<3.13", "<3.13,>=3.11"}
    requires = meta.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    names = {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requires}
    assert "diffusers==0.42.1" in base and any(r.startswith("rapidocr-onnxruntime") for r in base)
    assert "torchmetrics" not in names  # imported nowhere in opd
    assert not {"opencv-python-headless", "easyocr"} & names  # easyocr goes in with --no-deps (make install)
    assert "wandb" in meta.get_all("Provides-Extra")
    assert any(r.startswith("wandb") and 'extra == "wandb"' in r for r in requires)
    assert not [f for f in (ROOT / "src").rglob("*.py") if "import torchmetrics" in f.read_text()]


def test_make_install_keeps_one_opencv_and_pins_easyocr():
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP): pyproject.toml constraints.txt", 1)[1].split("\n\n")[0]
    assert "--no-deps easyocr" in recipe and "uninstall -q -y opencv-python-headless opencv-python" in recipe
    assert "one OpenCV expected" in recipe
    assert "easyocr==1.7.2" in (ROOT / "constraints.txt").read_text().splitlines()


PROBE = textwrap.dedent("""
    import json, sys
    import opd.config as c
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(c.config_dir()), version_base="1.3"):
        cfg = compose("train", ["logger=wandb"])
    out = {"file": c.__file__, "in_checkout": c.in_checkout(), "config_dir": str(c.config_dir()),
           "logger": cfg.logger.wandb._target_}
    try:
        out["model_path"] = cfg.model.path
    except Exception as err:  # noqa: BLE001 — the message is what is tested
        out["error"] = str(err)
    print(json.dumps(out))
""")


def run_installed(site: Path, cwd: Path, args: list[str], opd_root: Path | None = None,
                  timeout: int = 120) -> subprocess.CompletedProcess:
    """``python <args>`` with the unpacked wheel first on the path (ahead of the checkout's editable opd)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPD_ROOT", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    if opd_root is not None:
        env["OPD_ROOT"] = str(opd_root)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as a site-packages folder (a pure-Python wheel installs as its files)."""
    folder = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(folder)
    return folder


def probe(site: Path, cwd: Path, opd_root: Path | None = None) -> dict:
    import json

    done = run_installed(site, cwd, ["-c", PROBE], opd_root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_installed_wheel_reads_its_own_configs_and_its_data_root(site, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    data_root = tmp_path / "data_root"
    (data_root / "models").mkdir(parents=True)

    out = probe(site, empty, opd_root=data_root)
    assert Path(out["file"]).is_relative_to(site) and out["in_checkout"] is False
    assert out["config_dir"] == str(site / "opd" / "conf")
    assert out["logger"] == "lightning.pytorch.loggers.WandbLogger"
    assert out["model_path"] == f"{data_root}/models/mini_base"

    assert probe(site, data_root)["model_path"] == f"{data_root}/models/mini_base"  # the working folder

    error = probe(site, empty)["error"]  # nothing says where data/ and models/ are: a clear error
    assert "paths.root_dir" in error and "OPD_ROOT=<checkout>" in error and str(empty) in error
    assert "models/mini_base" in error and "docs/install.md" in error


def test_the_installed_entry_point_composes_from_the_packaged_configs(site, tmp_path):
    done = run_installed(site, tmp_path, ["-m", "opd.train", "--cfg", "job", "--resolve", "-p", "model"],
                         opd_root=tmp_path / "root")
    assert done.returncode == 0, done.stderr
    assert f"path: {tmp_path}/root/models/mini_base" in done.stdout
    assert "_target_: opd.models.build.mini_backbone" in done.stdout


def test_in_the_checkout_the_configs_and_the_root_are_the_checkouts(monkeypatch, tmp_path):
    import opd.config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPD_ROOT", raising=False)
    assert opd.config.in_checkout() and opd.config.config_dir() == ROOT / "conf"
    assert opd.config.config_root_dir() == str(ROOT) == opd.config.project_root()
    monkeypatch.setenv("OPD_ROOT", str(tmp_path))
    assert opd.config.config_root_dir() == str(tmp_path)


# -- preview grids to the loggers -----------------------------------------------------------------
class FakeWandb:
    """The part of Lightning's WandbLogger that ImageGrid uses."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append({"key": key, "images": images, "step": step, **kwargs})


class FakeTensorBoard:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.experiment = SimpleNamespace(add_image=lambda *a, **k: self.calls.append((a, k)))


class Previewer:
    training = True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def preview(self, num_steps):
        return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(num_steps)), ["a", "b", "c"]


def test_the_preview_grid_reaches_wandb_tensorboard_and_disk(tmp_path):
    wandb, tensorboard = FakeWandb(), FakeTensorBoard()
    trainer = SimpleNamespace(is_global_zero=True, callbacks=[], default_root_dir=str(tmp_path), global_step=40,
                              loggers=[CSVLogger(tmp_path), wandb, tensorboard])
    module = Previewer()
    out = ImageGrid(num_steps=2, num_cols=3).draw(trainer, module)
    assert out == tmp_path / "images" / "step_000040.png" and out.is_file() and module.training

    (call,) = wandb.calls
    assert call["key"] == "preview" and call["step"] == 40 and call["caption"] == ["step 40"]
    (image,) = call["images"]
    from PIL import Image

    on_disk = Image.open(out)
    assert image.size == on_disk.size and list(image.convert("RGB").getdata()) == list(on_disk.convert("RGB").getdata())

    ((args, kwargs),) = tensorboard.calls
    assert args[0] == "preview" and args[2] == 40 and kwargs == {"dataformats": "HWC"}
    assert args[1].shape == (on_disk.height, on_disk.width, 3)


def test_a_logger_without_images_is_skipped(tmp_path):
    from PIL import Image

    log_grid([CSVLogger(tmp_path), SimpleNamespace(experiment=object())], Image.new("RGB", (4, 4)), 1)
