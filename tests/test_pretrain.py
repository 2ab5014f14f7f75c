"""Flow-matching loss against a hand computation; pre-training runs, exports, resumes."""
import torch
from omegaconf import OmegaConf

from conftest import TOY_MODEL
from opd.models.backbone import PromptEmbeds
from opd.models.mini import MiniBackbone
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
         "module.preview_prompts=[a red circle]", "trainer.enable_progress_bar=false"]


def test_pretrain_runs_exports_and_resumes(cfg_factory, tmp_path):
    cfg = cfg_factory("train", ["experiment=pretrain_mini", *SMALL, "trainer.max_steps=4",
                                "callbacks.model_checkpoint.every_n_train_steps=2", "module.export_every_n_steps=2"])
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
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
