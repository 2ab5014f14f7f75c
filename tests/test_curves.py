"""CurvePlot records exactly what each step logged, groups keys into labelled panels by pattern and
draws raw and EMA-smoothed curves into one PNG."""
from types import SimpleNamespace

import pytest
import torch

from opd.callbacks.curves import CurvePlot, auto_smoothing, classify, ema


def test_curves_follow_last_metrics_and_skip_unlogged_steps(tmp_path):
    plot = CurvePlot(every_n_steps=1000)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, default_root_dir=str(tmp_path),
                              callback_metrics={"reward/ocr": torch.tensor(9.0)})
    module = SimpleNamespace(last_metrics={})
    logged = [{"train/kl": 0.4, "reward/ocr": 1.0}, {"train/kl": 0.3}, {"train/kl": 0.2, "reward/ocr": 1.0},
              {"train/kl": 0.1, "other/x": 5.0}]
    for step, metrics in enumerate(logged, start=1):
        trainer.global_step, module.last_metrics = step, metrics
        plot.on_train_batch_end(trainer, module)
    assert plot.history["train/kl"] == [(1, 0.4), (2, 0.3), (3, 0.2), (4, 0.1)]
    assert plot.history["reward/ocr"] == [(1, 1.0), (3, 1.0)]  # a repeated value is still a point
    assert "other/x" not in plot.history  # no panel draws it
    out = plot.draw(trainer)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 1000


DEMO_KEYS = [  # what a DiffusionOPD run (three teachers, monitor rewards) and RL / pre-training runs log
    "train/kl_sum", "train/kl", "train/grad_norm", "train/round", "time/minutes", "lr-AdamW",
    "teacher/ocr/kl", "teacher/geneval/kl", "teacher/ocr/weight", "teacher/geneval/weight",
    "teacher/ocr/ocr", "teacher/ocr/ocr/exact", "teacher/ocr/ocr/failures", "teacher/ocr/ocr_std",
    "teacher/aesthetic/aesthetic_mini", "teacher/aesthetic/aesthetic_mini/contrast",
    "teacher/aesthetic/aesthetic_mini/errors",
    "reward/ocr", "reward/ocr_std", "reward/multi/aesthetic", "train/kl_ref", "train/kl_ref_velocity_mse",
    "train/kl_step", "train/approx_kl", "train/policy_loss", "train/loss", "train/loss_hi_noise", "train/loss_pos",
    "train/clip_frac", "train/ratio_mean", "train/mean_gap",
]


def test_keys_are_grouped_into_labelled_panels_by_pattern(tmp_path):
    plot = CurvePlot()
    for key in DEMO_KEYS:
        if plot.wanted(key):
            plot.history[key].append((1, 1.0))
    grouped = {title: series for title, (_, _, series) in plot.grouped().items()}
    assert grouped == {
        "Reward of the policy's samples": {"ocr": "reward/ocr"},
        "Reward multi: components": {"aesthetic": "reward/multi/aesthetic"},
        "Monitor rewards on each teacher's prompts": {"aesthetic_mini (aesthetic's prompts)":
                                                      "teacher/aesthetic/aesthetic_mini",
                                                      "ocr (ocr's prompts)": "teacher/ocr/ocr"},
        "Monitor reward aesthetic_mini on aesthetic's prompts: caption facts violated": {
            "errors": "teacher/aesthetic/aesthetic_mini/errors"},  # a count, on its own axis
        "Monitor reward aesthetic_mini on aesthetic's prompts: components": {
            "contrast": "teacher/aesthetic/aesthetic_mini/contrast"},
        "Monitor reward ocr on ocr's prompts: components": {"exact": "teacher/ocr/ocr/exact"},
        "Total KL to the teachers": {"train/kl": "train/kl", "sum": "train/kl_sum"},
        "KL to each teacher": {"geneval": "teacher/geneval/kl", "ocr": "teacher/ocr/kl"},
        "Teacher weights (balanced weighting)": {"geneval": "teacher/geneval/weight", "ocr": "teacher/ocr/weight"},
        "KL to the reference model (regulariser)": {"kl_ref": "train/kl_ref",
                                                    "kl_ref_velocity_mse": "train/kl_ref_velocity_mse"},
        "Other KL estimates": {"approx_kl": "train/approx_kl", "kl_step": "train/kl_step"},
        "Loss": {"loss": "train/loss", "loss_hi_noise": "train/loss_hi_noise", "loss_pos": "train/loss_pos",
                 "policy_loss": "train/policy_loss"},
        "Learning rate": {"AdamW": "lr-AdamW"},
        "Gradient norm (before clipping)": {"grad_norm": "train/grad_norm"},
        "PPO clipping": {"clip_frac": "train/clip_frac"},
    }
    # spreads, failure counts, counters and unknown diagnostics are not drawn
    for key in ("teacher/ocr/ocr/failures", "teacher/ocr/ocr_std", "reward/ocr_std", "train/round", "time/minutes",
                "train/ratio_mean", "train/mean_gap"):
        assert key not in plot.history
    _, keys, _ = plot.grouped()["KL to each teacher"]
    assert keys == "teacher/<teacher>/kl"  # the title's second line names the logged keys
    assert classify("teacher/ocr/ocr/exact")[2] == "teacher/ocr/ocr/*"


def test_smoothing_is_a_bias_corrected_ema_by_hand():
    # β = 0.5: s = 0.5, 1.75, 3.375 over 1 − β^t = 0.5, 0.75, 0.875
    assert ema([1.0, 3.0, 5.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75, 3.375 / 0.875])
    assert ema([2.0, 4.0], 0.0) == [2.0, 4.0]  # no smoothing
    assert auto_smoothing(10) == pytest.approx(1 / 3)  # span 2 (the least)
    assert auto_smoothing(190) == pytest.approx(0.9)  # span 19 = 10 % of the run
    plot = CurvePlot(smoothing=0.5)
    plot.history["train/kl_sum"] = [(1, 1.0), (2, 3.0), (3, 5.0)]
    assert plot.smoothed("train/kl_sum") == pytest.approx([1.0, 2.0 + 1 / 3, 3.375 / 0.875])
    with pytest.raises(ValueError, match="smoothing"):
        CurvePlot(smoothing=1.0)


def test_learning_rate_comes_from_callback_metrics_beside_last_metrics(tmp_path):
    plot = CurvePlot(every_n_steps=1000)
    trainer = SimpleNamespace(global_step=1, is_global_zero=True, default_root_dir=str(tmp_path),
                              callback_metrics={"lr-AdamW": torch.tensor(3e-4), "train/kl_sum": torch.tensor(9.0)})
    plot.on_train_batch_end(trainer, SimpleNamespace(last_metrics={"train/kl_sum": 0.5, "train/loss_lo_noise": float("nan")}))
    assert dict(plot.history) == {"lr-AdamW": [(1, pytest.approx(3e-4))], "train/kl_sum": [(1, 0.5)]}  # NaN skipped


def test_a_demo_like_history_draws_one_png(tmp_path):
    import math

    plot = CurvePlot()
    for step in range(1, 41):
        for i, key in enumerate(DEMO_KEYS):
            if plot.wanted(key):
                plot.history[key].append((step, (1 + i) * (0.5 + 0.5 * math.exp(-step / 10)) + 0.1 * math.sin(step)))
    trainer = SimpleNamespace(global_step=40, is_global_zero=True, default_root_dir=str(tmp_path))
    out = plot.draw(trainer)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 10000


def test_a_schedule_is_drawn_as_it_is_and_a_loss_spanning_decades_on_a_log_axis(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    plot_line = matplotlib.axes.Axes.plot

    def spy(ax, x, y, **kwargs):
        drawn.append((ax, list(y), kwargs.get("alpha")))
        return plot_line(ax, x, y, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot = CurvePlot(smoothing=0.5)
    plot.history["lr-AdamW"] = [(1, 1e-4), (2, 2e-4), (3, 3e-4)]
    plot.history["train/loss"] = [(1, 1.0), (2, 0.1), (3, 0.01)]
    plot.draw(SimpleNamespace(global_step=3, is_global_zero=True, default_root_dir=str(tmp_path)))
    loss_raw, loss_smooth, lr = drawn  # panel order: loss, then learning rate
    assert loss_raw[1:] == ([1.0, 0.1, 0.01], 0.3) and loss_smooth[1] == pytest.approx(ema([1.0, 0.1, 0.01], 0.5))
    assert loss_raw[0].get_yscale() == "log"
    assert lr[1:] == ([1e-4, 2e-4, 3e-4], None) and lr[0].get_yscale() == "linear"  # one line, unsmoothed
