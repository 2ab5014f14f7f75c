"""Flow-matching loss against a hand computation; pre-training runs, exports, resumes."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TOY_MODEL
from opd.models.backbone import PromptEmbeds
from opd.models.mini import MiniBackbone
from opd.modules.pretrain import lr_factor
from opd.objectives.flow_matching import FlowMatchingLoss
from opd.train import train


class ConstantVelocity:
    """A stand-in backbone whose velocity is a fixed tensor (records its inputs)."""

    dtype = torch.float32

    def __init__(self, v):
        self.v = v
        self.seen = None

    def velocity(self, x, sigma, cond):
        self.seen = (x.clone(), sigma.clone())
        return self.v


def test_flow_matching_loss_equals_hand_computation():
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    v = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    backbone = ConstantVelocity(v)
    loss, _ = FlowMatchingLoss(logit_mean=0.5, logit_std=0.7)(
        backbone, x0, PromptEmbeds(torch.zeros(4, 2, 2), torch.zeros(4, 2)), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, in the same order: n for σ, then ε
    sigma = torch.sigmoid(0.5 + 0.7 * torch.randn(4, generator=g))
    eps = torch.randn(4, 3, 8, 8, generator=g)
    expected = ((v - (eps - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    x_t, s_seen = backbone.seen
    torch.testing.assert_close(s_seen, sigma)
    torch.testing.assert_close(x_t[1], (1 - sigma[1]) * x0[1] + sigma[1] * eps[1])


SMALL = [*TOY_MODEL, "trainer=cpu", "logger=csv", "data.batch_size=4", "data.num_workers=0",
         "callbacks.image_grid.num_steps=2", "callbacks.image_grid.every_n_steps=100", "trainer.log_every_n_steps=1",
         "module.preview_prompts=[a red circle]", "trainer.enable_progress_bar=false", "module.cooldown_steps=0"]


def test_learning_rate_warms_up_holds_and_cools_down_linearly():
    factors = [lr_factor(s, warmup_steps=4, cooldown_steps=5, total_steps=20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4:15] == [1.0] * 11
    assert factors[15:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])  # step 19 (the last) still moves
    assert [lr_factor(s) for s in (0, 100)] == [1.0, 1.0]


def test_a_cooldown_longer_than_the_run_is_refused_before_training(cfg_factory):
    cfg = cfg_factory("train", ["experiment=pretrain_mini", *SMALL, "trainer.max_steps=4", "module.cooldown_steps=10"])
    with pytest.raises(ValueError, match="cooldown_steps"):
        train(cfg)


def test_pretrain_runs_exports_and_resumes(cfg_factory, tmp_path):
    cfg = cfg_factory("train", ["experiment=pretrain_mini", *SMALL, "trainer.max_steps=4",
                                "callbacks.model_checkpoint.every_n_train_steps=2", "module.export_every_n_steps=2",
                                "module.warmup_steps=1", "module.cooldown_steps=2"])
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # warm-up 1, cool-down over the last 2 of 4 steps: factors 1, 1, 1/2, then 0 after the last step
    assert objects["trainer"].optimizers[0].param_groups[0]["lr"] == 0.0
    assert metrics["lr-AdamW"] == pytest.approx(cfg.module.optimizer.lr / 2)
    out = tmp_path
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "exports" / "step_000002" / "config.json").is_file()
    exported = MiniBackbone.from_pretrained(out / "model")
    ema = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "EMA")
    name, param = next(iter(ema.shadow.items()))
    torch.testing.assert_close(dict(exported.named_parameters())[name].float(), param.half().float())
    assert any((out / "images").glob("step_*.png"))

    cfg2 = cfg_factory("train", ["experiment=pretrain_mini", *SMALL, "trainer.max_steps=6", "ckpt_path=last"])
    OmegaConf.resolve(cfg2)
    _, objects2 = train(cfg2)
    assert objects2["trainer"].global_step == 6
    assert ema.num_updates == 4 and next(c for c in objects2["trainer"].callbacks
                                         if type(c).__name__ == "EMA").num_updates == 6


def test_pretraining_continues_from_exported_weights(cfg_factory, tmp_path):
    """experiment=pretrain_mini_continue starts from the weights at model.path (lr 1e-12: they stay, and
    the EMA export is them), with its own scene stream (seed 1)."""
    from test_models import toy

    start = toy(seed=7)
    start.save_pretrained(tmp_path / "start", dtype=torch.float32)
    cfg = cfg_factory("train", ["experiment=pretrain_mini_continue", *SMALL, f"model.path={tmp_path / 'start'}",
                                "trainer.max_steps=2", "module.warmup_steps=0", "module.optimizer.lr=1e-12",
                                "module.export_every_n_steps=null", "callbacks.image_grid=null"])
    assert cfg.seed == 1
    OmegaConf.resolve(cfg)
    train(cfg)
    exported = MiniBackbone.from_pretrained(tmp_path / "model")
    for (name, a), (_, b) in zip(start.named_parameters(), exported.named_parameters(), strict=True):
        torch.testing.assert_close(a.half().float(), b.float(), msg=name)


def test_scene_stream_is_a_pure_function_of_position():
    """Batch n of a rank is the same whatever the number of workers and wherever the stream starts
    (a resumed run continues the data exactly); ranks and batches differ."""
    from torch.utils.data import DataLoader

    from opd.data.scenes import SceneStream, collate

    def batches(workers, start, rank=0, n=4):
        stream = SceneStream(image_size=16, seed=3, batch_size=2, start_batch=start, rank=rank)
        loader = DataLoader(stream, batch_size=2, num_workers=workers, collate_fn=collate)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
        return out

    straight = batches(0, 0)
    for other in (batches(2, 0), [*straight[:1], *batches(0, 1, n=3)], [*straight[:2], *batches(2, 2, n=2)]):
        for a, b in zip(straight, other, strict=True):
            assert a["prompts"] == b["prompts"] and torch.equal(a["images"], b["images"])
    assert straight[0]["prompts"] != straight[1]["prompts"]
    assert batches(0, 0, rank=1, n=1)[0]["prompts"] != straight[0]["prompts"]


def test_a_nan_loss_stops_pretraining_before_the_step_and_is_never_saved(cfg_factory, tmp_path, monkeypatch):
    from opd.modules.guards import NonFiniteError
    from test_teacher_rl import saved_tensors_are_finite

    original, calls = FlowMatchingLoss.__call__, []

    def poisoned(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), metrics

    monkeypatch.setattr(FlowMatchingLoss, "__call__", poisoned)
    cfg = cfg_factory("train", ["experiment=pretrain_mini", *SMALL, "trainer.max_steps=5", "callbacks.image_grid=null",
                                "callbacks.curves=null", "callbacks.model_checkpoint.every_n_train_steps=1"])
    OmegaConf.resolve(cfg)
    with pytest.raises(NonFiniteError, match="step 2\\).*the flow-matching loss"):
        train(cfg)
    assert saved_tensors_are_finite(tmp_path) == 3  # step 1, step 2 and last
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (tmp_path / "model").exists()  # no export of a failed run


def test_checkpoints_and_exports_holding_nan_are_refused(tmp_path):
    """Whatever slipped past the step guard, a non-finite weight or EMA state is never written."""
    import lightning.pytorch as pl

    from opd.callbacks.ema import EMA
    from opd.modules.guards import GuardedModule, NonFiniteError

    class Tiny(GuardedModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def ema_parameters(self):
            return dict(self.named_parameters())

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    ema = EMA(decay=0.5)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ema], default_root_dir=tmp_path)
    module = Tiny()
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "fine.ckpt")
    assert (tmp_path / "fine.ckpt").is_file()
    ema.shadow["layer.bias"][0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint.*layer.bias"):
        trainer.save_checkpoint(tmp_path / "bad_ema.ckpt")
    ema.shadow["layer.bias"][0] = 0.0
    with torch.no_grad():
        module.layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint.*state_dict/layer.weight"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    with pytest.raises(NonFiniteError, match="refusing to write the export: non-finite weights in layer.weight"):
        module.check_export(module.named_parameters(), "the export")
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["fine.ckpt"]
