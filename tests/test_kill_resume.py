"""Honest resume: a real ``python -m opd.train`` is killed with SIGKILL right after it writes its first
checkpoint, resumed with ``ckpt_path=last``, and the steps that follow log the same losses and end
with the same weights as an uninterrupted run (pre-training, GRPO-Guard, NFT, MOPD).

The killed run is a subprocess (SIGKILL leaves its lock file behind, so the resume also takes over a
stale lock); the uninterrupted run trains in this process while the subprocess starts, and the
resumed run trains here too, after everything before it has used this process's global generators:
only restored random states and a position-seeded scene stream make them agree.
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg
from opd.callbacks.curves import CurvePlot
from opd.train import train
from test_distill import overrides as mopd_overrides
from test_distill import (
    small_prompt_files,
    toy_world,  # noqa: F401 — the fixture: a toy base and two teacher adapters
)
from test_pretrain import SMALL as PRETRAIN
from test_teacher_rl import NFT
from test_teacher_rl import SMALL as GRPO

TIMEOUT_S = 300
FAST = ["callbacks.image_grid=null", "callbacks.curves=null"]  # previews and plots: not what is tested here


class KillAtFirstCheckpoint(threading.Thread):
    """Start ``python -m opd.train`` into ``out_dir`` (a checkpoint every optimiser step, no end in
    sight) and SIGKILL it the moment ``checkpoints/last.ckpt`` appears, while the test goes on."""

    def __init__(self, overrides: list[str], out_dir: Path, log_file: Path) -> None:
        super().__init__(daemon=True)
        self.last = out_dir / "checkpoints" / "last.ckpt"
        self.log_file = log_file
        cmd = [sys.executable, "-m", "opd.train", *overrides, f"hydra.run.dir={out_dir}", "trainer.max_steps=1000",
               "trainer.max_time=null", "callbacks.model_checkpoint.every_n_train_steps=1"]
        with open(log_file, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "HYDRA_FULL_ERROR": "1"})
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not self.last.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def killed_step(self) -> int:
        """Wait for the kill; the global step of the checkpoint left behind."""
        self.join(TIMEOUT_S + 60)
        code = self.proc.wait(timeout=60)
        if code != -signal.SIGKILL or not self.last.exists():
            pytest.fail(f"the run ended with {code} instead of being killed after a checkpoint:\n"
                        f"{self.log_file.read_text()[-3000:]}")
        return int(torch.load(self.last, map_location="cpu", weights_only=False)["global_step"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def fit(overrides: list[str], out_dir: Path, steps: int, extra: tuple[str, ...] = ()) -> dict:
    cfg = compose_cfg("train", [*overrides, f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", *extra],
                      out_dir)
    OmegaConf.resolve(cfg)
    return train(cfg)[1]


def logged_last_version(out_dir: Path, key: str) -> dict[int, float]:
    """``step → value`` of ``key`` in the newest CSV-logger version (the resumed run's)."""
    newest = max(out_dir.glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n or p.requires_grad}


def kill_resume_and_compare(overrides: list[str], tmp_path: Path, keys: tuple[str, ...], first_ckpt: int,
                            end: int, caplog) -> tuple[object, object]:
    """Kill at the first checkpoint (step ``first_ckpt``), resume to ``end`` and compare with a
    straight run to ``end`` (trained meanwhile); returns the (straight, resumed) modules."""
    overrides = [*overrides, *FAST]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killer = KillAtFirstCheckpoint(overrides, killed, tmp_path / "killed.log")
    try:
        a = fit(overrides, straight, end)["module"]  # meanwhile the subprocess starts, trains and is killed
        step = killer.killed_step()
    finally:
        killer.stop()
    assert first_ckpt <= step < end  # the first checkpoint, unless a loaded machine let the next one through
    assert (killed / "run.lock").is_file()  # SIGKILL leaves the lock behind
    with caplog.at_level(logging.WARNING, logger="opd.train"):
        b = fit(overrides, killed, end, ("ckpt_path=last",))["module"]
    assert f"taking over the run lock of pid {killer.proc.pid}" in caplog.text
    assert not (killed / "run.lock").exists()  # released at the end
    for key in keys:
        resumed = logged_last_version(killed, key)
        assert resumed and min(resumed) > 0, f"{key}: nothing logged after the resume"
        uninterrupted = {s: v for s, v in logged_last_version(straight, key).items() if s >= min(resumed)}
        assert set(resumed) == set(uninterrupted), (key, sorted(uninterrupted), sorted(resumed))
        for s, value in uninterrupted.items():
            assert resumed[s] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, s, value, resumed[s])
    wa, wb = trainable(a), trainable(b)
    assert wa and set(wa) == set(wb)
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-5, atol=1e-7)
    return a, b


def test_pretrain_killed_and_resumed_continues_exactly(tmp_path, caplog):
    overrides = ["experiment=pretrain_mini", *PRETRAIN]
    kill_resume_and_compare(overrides, tmp_path, ("train/loss",), 1, 3, caplog)
    assert (tmp_path / "killed" / "model" / "config.json").is_file()


def test_grpo_killed_and_resumed_continues_exactly(tmp_path, caplog):
    overrides = ["experiment=mini/teacher_ocr", *GRPO]  # 2 optimiser steps a round
    kill_resume_and_compare(overrides, tmp_path, ("train/policy_loss", "reward/aesthetic_mini"), 2, 6, caplog)
    assert (tmp_path / "killed" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_nft_killed_and_resumed_continues_exactly(tmp_path, caplog):
    overrides = ["experiment=mini/teacher_geneval", *NFT]
    _, resumed = kill_resume_and_compare(overrides, tmp_path, ("train/policy_loss", "train/old_decay"), 1, 3, caplog)
    assert any(".old." in n for n in trainable(resumed))  # NFT's old adapter resumes too


def test_mopd_killed_and_resumed_continues_exactly_and_checks_its_teachers(toy_world, tmp_path, caplog):  # noqa: F811
    from opd.models.lora import resolve_lora_file
    from opd.modules.guards import file_sha256

    overrides = mopd_overrides(toy_world, ["module.teacher_weighting=balanced", *small_prompt_files(tmp_path)])
    straight, resumed = kill_resume_and_compare(
        overrides, tmp_path, ("teacher/ocr/kl", "teacher/geneval/kl", "teacher/geneval/weight"), 1, 3, caplog)
    assert straight.kl_scale == resumed.kl_scale  # balanced weighting's running KL scales resume too
    # a resume with another file behind a teacher's name fails, naming the teacher and both hashes ...
    ocr, geneval = resolve_lora_file(toy_world / "ocr"), resolve_lora_file(toy_world / "geneval")
    swapped = [o for o in overrides if not o.startswith("teacher.ocr.adapter=")] + [f"teacher.ocr.adapter={geneval}"]
    with pytest.raises(ValueError, match=f"teacher 'ocr'.*{file_sha256(ocr)}.*{file_sha256(geneval)}"):
        fit([*swapped, *FAST], tmp_path / "killed", 3, ("ckpt_path=last",))
    # a resume with another LoRA rank is refused naming the adapter and both ranks, before any loading
    with pytest.raises(ValueError, match=r"LoRA 'student': rank 2 in the checkpoint, 4 in this run.*module\.lora"):
        fit([*overrides, *FAST, "module.lora={rank:4,alpha:8}"], tmp_path / "killed", 3, ("ckpt_path=last",))
    # the checkpoint holds the student, not the frozen teachers (they are reloaded from their files)
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(".student." in k for k in saved["state_dict"])
    assert not [k for k in saved["state_dict"] if ".teacher_" in k]
    # ... unless told so on purpose (the run-level flag reaches the module), and then the new file is
    # what it distils: "ocr" now holds the GenEval file, so its weights equal the GenEval teacher's
    # (a checkpoint of an older version holds teacher weights too: they are dropped on loading)
    teacher_keys = [k for k in straight.state_dict() if ".teacher_ocr." in k]
    saved["state_dict"].update({k: torch.zeros_like(straight.state_dict()[k]) for k in teacher_keys})
    torch.save(saved, tmp_path / "killed" / "checkpoints" / "last.ckpt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opd.modules.distill"):
        changed = fit([*swapped, *FAST], tmp_path / "killed", 3, ("ckpt_path=last", "allow_teacher_change=true"))
    assert "allow_teacher_change=true: continuing" in caplog.text
    weights = {n: p for n, p in changed["module"].named_parameters() if ".teacher_" in n}
    ocr_weights = {n: p for n, p in weights.items() if ".teacher_ocr." in n}
    assert ocr_weights
    for n, p in ocr_weights.items():
        torch.testing.assert_close(p, weights[n.replace(".teacher_ocr.", ".teacher_geneval.")], rtol=0, atol=0)



class SigtermAtStep(pl.Callback):
    """Sends this process SIGTERM at the end of optimiser step ``step`` (as ``timeout`` would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_at_the_step_it_stops_and_resumes_exactly(tmp_path):
    """SIGTERM (a scheduler's limit, ``timeout``) between checkpoints: the run stops after the step
    under way, saves ``last.ckpt`` there, and the resume ends where a straight run ends. The curves
    are drawn on the way out, and the resumed run's curves start at step 1, not at the resume."""
    overrides = ["experiment=mini/teacher_geneval", *NFT, "callbacks.image_grid=null",
                 "callbacks.curves.every_n_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=1000"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    with pytest.raises(SystemExit):
        fit(overrides, stopped, 4, ("+callbacks.sigterm={_target_:test_kill_resume.SigtermAtStep,step:2}",))
    last = stopped / "checkpoints" / "last.ckpt"
    assert int(torch.load(last, map_location="cpu", weights_only=False)["global_step"]) == 2
    assert not (stopped / "run.lock").exists()  # released on the way out
    assert (stopped / "curves.png").is_file()  # drawn when the run stopped (every_n_steps not reached)
    run = fit(overrides, stopped, 4, ("ckpt_path=last",))
    resumed = run["module"]
    (plot,) = [c for c in run["trainer"].callbacks if isinstance(c, CurvePlot)]
    assert [step for step, _ in plot.history["train/grad_norm"]] == [1, 2, 3, 4]
    logged = logged_last_version(stopped, "train/grad_norm")
    # the resumed process logged steps 3 and 4 (the CSV counts steps from 0): the same values
    assert [v for s, v in plot.history["train/grad_norm"] if s > 2] == pytest.approx([logged[s] for s in sorted(logged)])
    reference = fit(overrides, straight, 4)["module"]
    wa, wb = trainable(reference), trainable(resumed)
    assert wa and set(wa) == set(wb)
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-5, atol=1e-7)


def test_time_slice_stops_resumably_with_status_75_and_the_resume_finishes(tmp_path):
    """``callbacks.time_slice.minutes``: the run stops after the first step past its slice as on SIGTERM
    (``last.ckpt`` there, no adapter), ``python -m opd.train`` exits 75 (not 0: make and schedulers must
    see an unfinished run), and ``ckpt_path=last`` trains on to ``max_steps`` and exports the adapter."""
    overrides = ["experiment=mini/teacher_geneval", *NFT, *FAST, "callbacks.model_checkpoint.every_n_train_steps=1000"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "opd.train", *overrides, f"hydra.run.dir={out}", "trainer.max_steps=3",
           "trainer.max_time=null", "callbacks.time_slice.minutes=1e-6"]  # used up by the end of step 1
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ckpt_path=last" in proc.stdout + proc.stderr
    last = out / "checkpoints" / "last.ckpt"
    assert int(torch.load(last, map_location="cpu", weights_only=False)["global_step"]) == 1
    assert not (out / "adapter").exists() and not (out / "run.lock").exists()
    resumed = fit(overrides, out, 3, ("ckpt_path=last",))
    assert resumed["trainer"].global_step == 3
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_time_slice_rejects_a_non_positive_slice():
    from opd.callbacks.time_slice import TimeSlice

    with pytest.raises(ValueError, match="callbacks.time_slice.minutes"):
        TimeSlice(minutes=0)


def test_a_resume_at_max_steps_exports_what_the_end_of_training_exports(tmp_path, caplog):
    """A checkpoint already at ``max_steps`` (a run stopped between its last checkpoint and its export,
    or ended early with a lower ``trainer.max_steps``): Lightning trains nothing and skips every
    end-of-training hook; the run still ends with the adapter the end of training would export."""
    from safetensors.torch import load_file

    overrides = ["experiment=mini/teacher_geneval", *NFT, *FAST, "callbacks.model_checkpoint.every_n_train_steps=1"]
    out = tmp_path / "run"
    fit(overrides, out, 2)
    adapter = out / "adapter" / "pytorch_lora_weights.safetensors"
    exported = load_file(adapter)
    shutil.rmtree(out / "adapter")  # as if stopped after the last checkpoint, before the export
    with caplog.at_level(logging.INFO, logger="opd.train"):
        run = fit(overrides, out, 2, ("ckpt_path=last",))
    assert run["trainer"].global_step == 2 and "nothing to train" in caplog.text
    again = load_file(adapter)
    assert set(again) == set(exported)
    for name, tensor in exported.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0)  # the EMA weights, bit for bit
    shutil.rmtree(out / "adapter")  # ended early: a lower max_steps than the checkpoint's step
    fit(overrides, out, 1, ("ckpt_path=last",))
    assert adapter.is_file()
