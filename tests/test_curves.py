"""CurvePlot records exactly what each step logged and draws one PNG panel per key."""
from types import SimpleNamespace

import torch

from opd.callbacks.curves import CurvePlot


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
    assert "other/x" not in plot.history  # not a wanted prefix
    out = plot.draw(trainer)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 1000
