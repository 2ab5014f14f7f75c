"""Progress without a terminal: ProgressLog's lines (rate, ETA from injected times), log_progress for
evaluation batches, and the step-based progress bar."""
import logging
from datetime import timedelta
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar, Timer
from omegaconf import OmegaConf

from conftest import TOY_MODEL
from opd.callbacks.progress_bar import StepProgressBar, progress_bar
from opd.callbacks.progress_log import ProgressLog, format_duration, headline_metrics, log_progress
from opd.train import train


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fake_trainer(**kw):
    base = {"global_step": 0, "max_steps": 100, "callbacks": [], "is_global_zero": True, "callback_metrics": {}}
    return SimpleNamespace(**{**base, **kw})


def test_durations_read_as_seconds_minutes_hours():
    assert [format_duration(s) for s in (0, 42.4, 60, 372, 3599, 7380)] == ["0s", "42s", "1m00s", "6m12s", "59m59s",
                                                                         "2h03m"]
    assert format_duration(float("nan")) == "?"


def test_headline_metrics_pick_reward_kl_or_loss_by_prefix_at_most_four():
    distill = {"train/kl_sum": 0.1, "teacher/ocr/kl": 0.02, "teacher/aes/kl": 0.08, "teacher/gen/kl": 0.006,
               "teacher/zz/kl": 1.0, "train/grad_norm": 3.0, "teacher/ocr/weight": 1.0, "teacher/ocr/ocr": 0.5}
    assert headline_metrics(distill) == [("train/kl_sum", 0.1), ("teacher/aes/kl", 0.08), ("teacher/gen/kl", 0.006),
                                         ("teacher/ocr/kl", 0.02)]
    rl = {"reward/ocr": 0.7, "reward/ocr_std": 0.1, "reward/ocr/failures": 0.0, "train/kl_ref": 0.01,
          "train/policy_loss": -0.2, "train/clip_frac": 0.1}
    assert headline_metrics(rl) == [("reward/ocr", 0.7), ("train/kl_ref", 0.01), ("train/policy_loss", -0.2)]
    assert headline_metrics({"train/loss": 0.3, "lr-AdamW": 1e-4}) == [("train/loss", 0.3)]


def test_progress_line_has_step_metrics_rate_elapsed_and_eta_from_injected_times(caplog):
    clock = Clock(1000.0)
    cb = ProgressLog(every_n_steps=None, every_n_seconds=60, clock=clock)
    trainer = fake_trainer(global_step=10, max_steps=70)
    module = SimpleNamespace(round=10)
    with caplog.at_level(logging.INFO, logger="opd.callbacks.progress_log"):
        cb.on_train_start(trainer, module)  # a resumed run: this session starts at step 10
        assert "training from step 10 until max_steps 70" in caplog.messages[-1]
        clock.t += 90  # first step of the session: logged at once
        trainer.global_step, module.round = 11, 11
        trainer.callback_metrics = {"train/kl_sum": torch.tensor(0.25), "teacher/ocr/kl": torch.tensor(0.125),
                                    "train/grad_norm": torch.tensor(2.0)}
        cb.on_train_batch_end(trainer, module)
        assert len(caplog.messages) == 2
        for step in range(12, 21):  # 9 more steps in the next 270 s (under 60 s apart: no line until 60 s)
            clock.t += 30
            trainer.global_step = module.round = step
            cb.on_train_batch_end(trainer, module)
    lines = caplog.messages[1:]
    assert lines[0] == ("step 11/70 (16%) | kl_sum 0.25, ocr/kl 0.125 | 0.667 steps/min (90 s/step) | elapsed 1m30s"
                        " | ETA 1h28m (max_steps)")  # 59 steps at 90 s
    # logged again at steps 13 (60 s after step 11), 15, 17, 19
    assert [line.split(" |")[0] for line in lines[1:]] == [f"step {s}/70 ({100 * s / 70:.0f}%)" for s in (13, 15, 17, 19)]
    # step 19: 9 steps in 90 + 8·30 = 330 s → 1.64 steps/min; 51 steps left → 51·330/9 = 1870 s = 31m10s
    assert "1.64 steps/min (36.7 s/step)" in lines[-1] and "elapsed 5m30s" in lines[-1]
    assert lines[-1].endswith("ETA 31m10s (max_steps)")


def test_eta_is_the_sooner_of_max_steps_and_max_time(caplog):
    clock = Clock(0.0)
    timer = Timer(duration=timedelta(hours=1))
    timer.time_remaining = lambda stage=None: 600.0  # 10 minutes of max_time left
    cb = ProgressLog(every_n_steps=1, every_n_seconds=None, clock=clock)
    trainer = fake_trainer(max_steps=1000, callbacks=[timer])
    with caplog.at_level(logging.INFO, logger="opd.callbacks.progress_log"):
        cb.on_train_start(trainer, None)
        for step in (1, 2):
            clock.t += 6
            trainer.global_step = step
            cb.on_train_batch_end(trainer, None)
        cb.on_train_end(trainer, None)
    assert "max_steps 1000 or max_time (in 10m00s)" in caplog.messages[0]
    assert caplog.messages[1].endswith("10 steps/min (6 s/step) | elapsed 6s | ETA 10m00s (max_time)")
    assert len(caplog.messages) == 4 and caplog.messages[-1].startswith("finished: step 2/1000")
    timer.time_remaining = lambda stage=None: 1e6  # now max_steps comes first: 998 steps at 6 s
    assert cb.eta(trainer, clock.t) == (pytest.approx(998 * 6), "max_steps")


def test_progress_log_is_quiet_on_other_ranks(caplog):
    cb = ProgressLog(every_n_steps=1, clock=Clock())
    trainer = fake_trainer(is_global_zero=False, global_step=1)
    with caplog.at_level(logging.INFO, logger="opd.callbacks.progress_log"):
        cb.on_train_start(trainer, None)
        cb.on_train_batch_end(trainer, None)
    assert caplog.messages == []


def test_log_progress_writes_a_line_per_batch_without_a_terminal(caplog):
    clock = Clock(0.0)

    def batches():
        for i in range(4):
            clock.t += 5  # each batch takes 5 s
            yield i

    with caplog.at_level(logging.INFO, logger="opd.callbacks.progress_log"):
        seen = list(log_progress(batches(), "checkpoint student, task ocr", total=4, tty=False, clock=clock))
    assert seen == [0, 1, 2, 3]
    assert caplog.messages == [
        "checkpoint student, task ocr: 4 batches to do",
        "checkpoint student, task ocr: batch 1/4 (25%) | 5 s/batch | elapsed 5s | ETA 15s",
        "checkpoint student, task ocr: batch 2/4 (50%) | 5 s/batch | elapsed 10s | ETA 10s",
        "checkpoint student, task ocr: batch 3/4 (75%) | 5 s/batch | elapsed 15s | ETA 5s",
        "checkpoint student, task ocr: batch 4/4 (100%) | 5 s/batch | elapsed 20s | ETA 0s"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opd.callbacks.progress_log"):
        assert list(log_progress([1, 2], "x", enabled=False)) == [1, 2]
        assert list(log_progress(range(6), "y", tty=False, clock=clock, every_n_seconds=60)) == list(range(6))
    assert caplog.messages == ["y: 6 batches to do", "y: batch 6/6 (100%) | 0 s/batch | elapsed 0s | ETA 0s"]


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(3, 1), batch_size=1)  # 3 batches an epoch


def test_step_progress_bar_counts_steps_of_max_steps_across_epochs(tmp_path):
    bar = StepProgressBar(tty_only=False)
    trainer = pl.Trainer(max_steps=7, max_epochs=-1, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny())
    assert trainer.current_epoch >= 2  # 7 steps of 3-batch epochs: it crossed two epoch boundaries
    (task,) = bar.progress.tasks
    assert task.description.strip() == "step" and "Epoch" not in task.description
    assert (task.completed, task.total) == (7, 7)


def test_step_progress_bar_turns_off_without_a_terminal(tmp_path):
    bar = StepProgressBar()  # pytest captures stdout: not a terminal
    trainer = pl.Trainer(max_steps=2, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny())
    assert bar.is_disabled and bar.progress is None


def test_progress_bar_factory_respects_enable_progress_bar(tmp_path):
    assert isinstance(progress_bar(enabled=True), StepProgressBar)
    off = progress_bar(enabled=False)
    assert not isinstance(off, ProgressBar)
    trainer = pl.Trainer(max_steps=1, callbacks=[off], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny())  # a progress bar among the callbacks would be refused here
    assert trainer.progress_bar_callback is None


def test_a_real_run_logs_progress_lines(cfg_factory, caplog):
    cfg = cfg_factory("train", [
        "experiment=pretrain_mini", *TOY_MODEL, "trainer=cpu", "logger=csv", "data.batch_size=2", "data.num_workers=0",
        "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "module.preview_prompts=[a red circle]", "module.cooldown_steps=0", "~callbacks.image_grid",
        "+callbacks.progress_log={_target_:opd.callbacks.progress_log.ProgressLog,every_n_steps:1}",
        ("+callbacks.progress_bar={_target_:opd.callbacks.progress_bar.progress_bar,"
         "enabled:${trainer.enable_progress_bar}}")])
    OmegaConf.resolve(cfg)
    with caplog.at_level(logging.INFO, logger="opd.callbacks.progress_log"):
        train(cfg)
    lines = [m for m in caplog.messages if m.startswith(("step ", "finished: "))]
    assert [line.split(" |")[0] for line in lines] == ["step 1/3 (33%)", "step 2/3 (67%)", "step 3/3 (100%)",
                                                       "finished: step 3/3 (100%)"]
    assert all(" | loss " in line and "steps/min" in line for line in lines)


def test_every_n_steps_logs_at_its_multiples(caplog):
    cb = ProgressLog(every_n_steps=4, every_n_seconds=None, clock=Clock())
    trainer = fake_trainer(max_steps=12)
    with caplog.at_level(logging.INFO, logger="opd.callbacks.progress_log"):
        cb.on_train_start(trainer, None)
        for step in range(1, 13):
            trainer.global_step = step
            cb.on_train_batch_end(trainer, None)
    assert [m.split(" |")[0] for m in caplog.messages[1:]] == ["step 1/12 (8%)", "step 4/12 (33%)", "step 8/12 (67%)",
                                                               "step 12/12 (100%)"]
