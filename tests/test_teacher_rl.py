"""Teacher RL end to end on a toy mini model (CPU): what trains, what stays frozen, exact resume."""
import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TOY_MODEL, compose_cfg
from opd.data.prompts import rank_slice, round_groups
from opd.modules.guards import NonFiniteError, checkpoint_payload, nonfinite_entries
from opd.modules.policy import RewardFailedError
from opd.rewards.base import Reward
from opd.train import train

SMALL = [*TOY_MODEL, "trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
         "module.num_groups_per_round=2", "module.group_size=3", "module.lora={rank:2,alpha:4}",
         "sampler.num_steps=3", "callbacks.image_grid.every_n_steps=1000", "callbacks.image_grid.num_steps=2",
         "+module.preview_prompts=[a red circle]", "reward=aesthetic_mini",
         "module.prompts={_target_:opd.data.world.grammar.load_prompts,task:aesthetic,split:train}",
         "callbacks.ema.every_n_steps=1"]


def run(cfg_factory, steps, extra=()):
    cfg = cfg_factory("train", ["experiment=mini/teacher_ocr", *SMALL, f"trainer.max_steps={steps}", *extra])
    OmegaConf.resolve(cfg)
    return train(cfg)[1]


def lora_state(module):
    return {k: v.detach().clone() for k, v in module.backbone.transformer.named_parameters() if "lora_" in k}


def test_round_groups_are_seeded_distinct_and_split_over_ranks():
    p1, g1 = round_groups(100, 4, 3, seed=0, round_idx=5)
    p2, g2 = round_groups(100, 4, 3, seed=0, round_idx=5)
    assert torch.equal(p1, p2) and torch.equal(g1, g2)
    assert not torch.equal(round_groups(100, 4, 3, seed=0, round_idx=6)[0], p1)
    for g in range(4):  # every group is one prompt, three times
        assert (g1 == g).sum() == 3 and p1[g1 == g].unique().numel() == 1
    assert p1.unique().numel() == 4
    assert torch.equal(torch.cat([rank_slice(p1, r, 2) for r in range(2)]), p1)
    with pytest.raises(ValueError, match="multiple of the number of GPUs"):
        rank_slice(p1, 0, 5)


def test_only_the_student_adapter_trains(cfg_factory):
    objects = run(cfg_factory, 2, ["trainer.max_steps=0"])
    module = objects["module"]
    before = {k: v.detach().clone() for k, v in module.backbone.named_parameters()}
    objects = run(cfg_factory, 2)
    after = dict(objects["module"].backbone.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    last = objects["module"].backbone.transformer.config.num_layers - 1
    # the last MMDiT block is context-pre-only: its context queries reach no output, so get no gradient
    lora_b = {k for k in before if "lora_B" in k and f"blocks.{last}.attn.add_q_proj" not in k}
    assert len(lora_b) > 10 and lora_b <= changed  # B starts at 0 and must move
    assert all("lora_" in k for k in changed)  # the backbone is frozen


# exact resume after SIGKILL (GRPO-Guard and NFT): tests/test_kill_resume.py


NFT = [*TOY_MODEL, "trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false", "module.num_groups_per_round=2",
       "module.group_size=3", "module.lora={rank:2,alpha:4}", "sampler.num_steps=3", "module.num_train_steps=2",
       "callbacks.image_grid.every_n_steps=1000", "+module.preview_prompts=[a red circle]",
       # a reward that varies on a random toy model (the judge scores all 0 → r = ½ → zero gradient)
       "reward=aesthetic_mini", "module.prompts={_target_:opd.data.world.grammar.load_prompts,task:aesthetic,split:train}"]


def test_nft_round_trains_student_and_soft_updates_old(cfg_factory):
    init = run_nft(cfg_factory, 0)
    after = run_nft(cfg_factory, 1)
    names = [k for k in init if ".student." in k]
    assert names
    for k in names:
        old = k.replace(".student.", ".old.")
        torch.testing.assert_close(init[old], init[k])  # the old adapter starts as a copy
        # one optimiser step so far: η = min(0.001·1, 0.5); θ_old ← η θ_old + (1 − η) θ
        torch.testing.assert_close(after[old], 0.001 * init[k] + 0.999 * after[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(init[k], after[k]) for k in names if "lora_B" in k)


def run_nft_objects(cfg_factory, steps, extra=()):
    return train(_nft_cfg(cfg_factory, steps, extra))[1]


def test_nft_batched_passes_give_the_same_round_as_one_forward_per_noised_time(cfg_factory, monkeypatch):
    """One NFT round (6 images of two prompts, 3 noised times each; λ > 0, so the reference runs too)
    with the old-policy and reference velocities computed first in no-grad forwards of 5 states (the
    chunks cross samples and times: 5 + 5 + 5 + 3) and the student's noised times two per forward (groups
    of 2 and 1), against one forward per noised time: the same losses and the same SGD step. The student starts away from the
    old policy and the base (a seeded perturbation after set-up), so that the gradient is not ~0."""
    from opd.modules.teacher_nft import NFTTeacher

    setup = NFTTeacher.on_fit_start

    def perturbed(self):
        setup(self)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in self.policy_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))

    monkeypatch.setattr(NFTTeacher, "on_fit_start", perturbed)
    sgd = ["~module.optimizer.betas", "~module.optimizer.eps", "module.optimizer._target_=torch.optim.SGD",
           "module.optimizer.lr=1.0", "module.grad_clip=null"]

    def run_with(steps, *extra):
        metrics, objects = train(_nft_cfg(cfg_factory, steps, ["overwrite=true", *sgd, *extra]))
        return metrics, lora_state(objects["module"])

    start = run_with(0)[1]
    m_one, one = run_with(1, "module.num_train_steps=3", "module.nograd_chunk=null", "module.terms_per_forward=1")
    m_batched, batched = run_with(1, "module.num_train_steps=3", "module.nograd_chunk=5", "module.terms_per_forward=2")
    assert m_one["train/grad_norm"] > 1e-3 and m_one["train/kl_ref_velocity_mse"] > 1e-6
    for key in ("train/policy_loss", "train/loss_pos", "train/loss_neg", "train/kl_ref_velocity_mse",
                "train/old_deviate", "train/grad_norm"):
        assert m_batched[key] == pytest.approx(m_one[key], rel=1e-4), key
    students = [k for k in one if ".student." in k]
    step = torch.cat([(one[k] - start[k]).flatten() for k in students])
    diff = torch.cat([(batched[k] - one[k]).flatten() for k in students])
    assert float(step.norm()) > 1e-3
    assert float(diff.norm()) < 1e-4 * float(step.norm())  # float32 sums in another order


@pytest.mark.parametrize("skip_equal_groups", [False, True])
def test_nft_computes_its_targets_while_the_last_rollout_piece_is_scored(cfg_factory, monkeypatch, skip_equal_groups):
    """The old policy's velocities need no rewards, so the round computes them while the reward thread
    scores the last rollout piece: that piece's scoring here waits for them (and would wait in vain if
    the round waited for the scores first). A round that may be skipped for want of reward spread
    computes them only after the scores (``skip_zero_variance_groups``), so that a skipped round costs
    no target passes."""
    import threading

    from opd.modules.online_rl import OnlineRL
    from opd.modules.teacher_nft import NFTTeacher

    computed, seen, calls = threading.Event(), [], []
    targets, score = NFTTeacher.targets, OnlineRL.score

    def targets_then_signal(self, *args):
        out = targets(self, *args)
        computed.set()
        return out

    def score_last_piece_after_targets(self, latents, rows):
        calls.append(len(rows))
        if len(calls) == self.rollout_chunks:  # the last piece of the round
            seen.append(computed.wait(timeout=1.0 if skip_equal_groups else 20.0))
        return score(self, latents, rows)

    monkeypatch.setattr(NFTTeacher, "targets", targets_then_signal)
    monkeypatch.setattr(OnlineRL, "score", score_last_piece_after_targets)
    run_nft_objects(cfg_factory, 1, ["module.rollout_chunks=2", f"module.skip_zero_variance_groups={skip_equal_groups}"])
    assert calls == [3, 3] and computed.is_set()
    assert seen == [not skip_equal_groups]


def test_the_round_logs_how_long_it_waited_for_its_scores(cfg_factory, monkeypatch):
    """A reward that takes 0.5 s a piece: the round waits for the last piece about that long (the toy
    model's targets take milliseconds), and logs it as time/score_wait_s."""
    import time

    from opd.modules.online_rl import OnlineRL

    score = OnlineRL.score

    def slow(self, latents, rows):
        time.sleep(0.5)
        return score(self, latents, rows)

    monkeypatch.setattr(OnlineRL, "score", slow)
    metrics, _ = train(_nft_cfg(cfg_factory, 1, ["module.rollout_chunks=2"]))
    assert 0.3 < metrics["time/score_wait_s"] < 5.0


def test_nft_terms_per_forward_must_be_positive(cfg_factory):
    from opd.validate import ConfigError, validate_train_config

    cfg = cfg_factory("train", ["experiment=mini/teacher_geneval", *NFT, "module.terms_per_forward=0"])
    with pytest.raises(ConfigError, match=r"module.terms_per_forward=0: must be an integer ≥ 1"):
        validate_train_config(cfg)


def _nft_cfg(cfg_factory, steps, extra=()):
    cfg = cfg_factory("train", ["experiment=mini/teacher_geneval", *NFT, "trainer.log_every_n_steps=1",
                                f"trainer.max_steps={steps}", *extra])
    OmegaConf.resolve(cfg)
    return cfg


def run_nft(cfg_factory, steps):
    return lora_state(run_nft_objects(cfg_factory, steps)["module"])


# the SD3.5 teacher experiments (teacher_ocr included) run a round in test_sd35_teachers.py


def test_missing_prompt_file_is_named(tmp_path):
    from opd.data.prompt_files import load_prompt_file

    with pytest.raises(FileNotFoundError, match="nope.txt not found"):
        load_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompt_file(tmp_path / "empty.txt")


def test_multi_reward_rl_alternates_tasks_with_their_own_reward(cfg_factory, tmp_path):
    """Round r uses task r mod 3: its prompts are drawn from that task's set and scored by its reward."""
    cfg = cfg_factory("train", ["experiment=mini/multi_reward_rl", *[o for o in SMALL if not o.startswith(
        ("reward=", "module.prompts="))], "trainer.max_steps=6", "module.num_updates_per_round=1"])
    OmegaConf.resolve(cfg)
    module = train(cfg)[1]["module"]
    assert list(module.tasks) == ["aesthetic_mini", "ocr", "geneval_mini"]
    assert module.round == 6
    seen = []
    for r in range(3):
        module.round = r
        rows, _ = module.draw_round()
        seen.append((module.task_name, {row["tag"] for row in rows}))
        assert type(module.reward).__name__ == {"aesthetic_mini": "AestheticMini", "ocr": "OCRReward",
                                                "geneval_mini": "GenEvalMini"}[module.task_name]
    assert seen[1] == ("ocr", {"ocr"})
    assert seen[0][1].isdisjoint({"ocr"}) and seen[2][1].isdisjoint({"ocr"})
    with open(next(tmp_path.glob("**/metrics.csv"))) as f:
        logged_keys = set().union(*(set(r) for r in csv.DictReader(f)))
    assert {"reward/aesthetic_mini", "reward/ocr", "reward/geneval_mini"} <= logged_keys


def test_multi_task_prompts_and_rewards_must_match(cfg_factory):
    cfg = cfg_factory("train", ["experiment=mini/multi_reward_rl", *[o for o in SMALL if not o.startswith(
        ("reward=", "module.prompts="))], "~reward.ocr"])
    with pytest.raises(Exception, match="same names"):
        train(cfg)


def test_cascade_stage_starts_from_the_previous_adapter(cfg_factory, tmp_path_factory):
    first_dir = tmp_path_factory.mktemp("stage1")
    first = run(lambda name, o: compose_cfg(name, o, first_dir), 2)
    adapter = first_dir / "adapter"
    second_dir = tmp_path_factory.mktemp("stage2")
    second = run(lambda name, o: compose_cfg(name, o, second_dir), 0, [f"+module.init_adapter={adapter}",
                                                                      "trainer.max_steps=0"])
    from safetensors.torch import load_file
    saved = load_file(str(adapter / "pytorch_lora_weights.safetensors"))
    params = dict(second["module"].backbone.transformer.named_parameters())
    assert saved and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    for key, value in saved.items():  # transformer.<module>.lora_A.weight → <module>.lora_A.student.weight
        name = key.removeprefix("transformer.").replace(".weight", ".student.weight")
        torch.testing.assert_close(params[name].detach().float(), value.float(), rtol=0, atol=0)
    assert all(p.requires_grad == (".student." in n) for n, p in params.items() if "lora_" in n)
    del first
    with pytest.raises(Exception, match="rank 2, alpha 4; the new adapter has rank 4"):
        run(lambda name, o: compose_cfg(name, o, second_dir), 0,
            [f"+module.init_adapter={adapter}", "module.lora={rank:4,alpha:8}"])


class FlakyReward(Reward):
    """A stub reward that cannot score every ``fail_every``-th image of each batch it is given
    (``failed`` = 1, reward 0 there) and scores the others by their mean brightness."""

    name = "flaky"

    def __init__(self, fail_every: int = 1) -> None:
        self.fail_every = fail_every

    def score(self, images, prompts, metadata):
        failed = (torch.arange(images.shape[0]) % self.fail_every == 0).float()
        return {"reward": images.detach().float().mean((1, 2, 3)).cpu() * (1 - failed), "failed": failed}


def flaky(fail_every: int) -> list[str]:
    return [*(o for o in SMALL if not o.startswith("reward=")), "reward=none",
            f"+reward.flaky={{_target_:test_teacher_rl.FlakyReward,fail_every:{fail_every}}}"]


def test_reward_failures_are_counted_and_a_round_without_any_score_stops_the_run(tmp_path):
    # 2 groups of 3 images, scored in 2 chunks of 3: image 0 of each chunk fails
    cfg = compose_cfg("train", ["experiment=mini/teacher_ocr", *flaky(3), "trainer.max_steps=2"], tmp_path / "some")
    OmegaConf.resolve(cfg)
    metrics, _ = train(cfg)
    assert metrics["reward/flaky/failures"] == 2.0
    cfg = compose_cfg("train", ["experiment=mini/teacher_ocr", *flaky(1), "trainer.max_steps=2",
                                "callbacks.model_checkpoint.every_n_train_steps=1"], tmp_path / "all")
    OmegaConf.resolve(cfg)
    with pytest.raises(RewardFailedError, match="reward 'flaky' failed on every image of round 0 \\(6 images"):
        train(cfg)
    assert not list((tmp_path / "all").glob("checkpoints/*.ckpt"))  # stopped before the optimiser step


def saved_tensors_are_finite(folder):
    """Every checkpoint and adapter file under ``folder`` holds only finite weights, optimiser and EMA
    states (and no NaN anywhere: ModelCheckpoint's own "k-th best" score is a legitimate inf);
    returns how many files were read."""
    from safetensors.torch import load_file

    files = [*folder.glob("checkpoints/*.ckpt"), *folder.glob("**/*.safetensors")]
    for file in files:
        if file.suffix == ".safetensors":
            assert not nonfinite_entries(load_file(str(file))), file
        else:
            state = torch.load(file, weights_only=False)
            assert not nonfinite_entries(checkpoint_payload(state)), file
            assert not [e for e in nonfinite_entries(state, limit=10**6) if "nan" in e.rsplit("(", 1)[-1]], file
    return len(files)


# loss calls per round: GRPO-Guard one per trained step; NFT one, its 2 noised times in one forward
# (mini/teacher_geneval trains up to 3 per forward)
@pytest.mark.parametrize(("algorithm", "calls_per_round"), [("grpo_guard", 4), ("nft", 1)])
def test_a_nan_loss_stops_before_the_optimiser_step_and_is_never_saved(tmp_path, monkeypatch, algorithm,
                                                                         calls_per_round):
    """Round 1's loss turns NaN: the run stops naming the loss term; round 0's checkpoint is all that
    is saved, and it is finite."""
    from opd.objectives.grpo_guard import GRPOGuardLoss
    from opd.objectives.nft import NFTLoss

    cls = GRPOGuardLoss if algorithm == "grpo_guard" else NFTLoss
    original, calls = cls.__call__, []

    def poisoned(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) > calls_per_round:
            loss, metrics = loss * float("nan"), {**metrics, "train/policy_loss": torch.tensor(float("nan"))}
        return loss, metrics

    monkeypatch.setattr(cls, "__call__", poisoned)
    experiment = ["experiment=mini/teacher_ocr", *SMALL] if algorithm == "grpo_guard" else \
        ["experiment=mini/teacher_geneval", *NFT]
    cfg = compose_cfg("train", [*experiment, "trainer.max_steps=100", "callbacks.model_checkpoint.every_n_train_steps=1"],
                      tmp_path)
    OmegaConf.resolve(cfg)
    with pytest.raises(NonFiniteError, match=f"round 1.*the {cls.__name__} loss at .*non-finite terms: train/policy_loss"):
        train(cfg)
    assert saved_tensors_are_finite(tmp_path) >= 1
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["opd_round"] == 1  # round 0's, written before the NaN


def test_a_diverged_student_rollout_stops_before_scoring(tmp_path):
    """A student adapter whose (finite) weights make the rollout overflow stops the run before the
    reward sees the images, naming the student's rollout."""
    from opd.models.lora import add_lora, lora_parameters, save_lora
    from test_models import toy

    model = toy()
    add_lora(model.transformer, "t", rank=2, alpha=4)
    with torch.no_grad():
        for p in lora_parameters(model.transformer, "t"):
            p.fill_(3e38)
    save_lora(model.transformer, "t", tmp_path / "huge")
    cfg = compose_cfg("train", ["experiment=mini/teacher_ocr", *SMALL, "trainer.max_steps=2",
                                f"+module.init_adapter={tmp_path / 'huge'}"], tmp_path / "run")
    OmegaConf.resolve(cfg)
    with pytest.raises(NonFiniteError, match="before scoring the rollouts .*the rollout of adapter 'student'"):
        train(cfg)


def test_adapter_snapshots_are_the_ema_adapter_at_each_multiple_of_the_step_interval(cfg_factory):
    """callbacks.adapter_snapshots: a GRPO round takes 2 optimiser steps, so with every_n_steps=3 the
    step count passes 3 at step 4 and 6 at step 6; the last snapshot holds the exported adapter's tensors."""
    objects = run(cfg_factory, 6, ["callbacks.adapter_snapshots.every_n_steps=3"])
    out = objects["trainer"].default_root_dir
    exports = sorted(p.name for p in (Path(out) / "exports").iterdir())
    assert exports == ["step_000004", "step_000006"]
    last = load_file(str(Path(out) / "exports" / "step_000006" / "pytorch_lora_weights.safetensors"))
    final = load_file(str(Path(out) / "adapter" / "pytorch_lora_weights.safetensors"))
    assert last.keys() == final.keys() and len(last) > 0
    for k in last:
        torch.testing.assert_close(last[k], final[k], rtol=0, atol=0)
    first = load_file(str(Path(out) / "exports" / "step_000004" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in last if "lora_B" in k)  # the EMA moved in between


def test_nft_skips_rounds_whose_groups_all_have_equal_rewards(cfg_factory, monkeypatch):
    """Every image scores 0.25 (a constant reward): every group has zero reward variance. With
    skip_zero_variance_groups no step is made (adapters bit-identical, the old-policy schedule does
    not advance); without it the optimiser steps (AdamW's decoupled decay alone moves the weights)."""
    from opd.modules.online_rl import OnlineRL

    def constant(self, latents, rows):
        return {"reward": torch.full((latents.shape[0],), 0.25, device=latents.device)}

    monkeypatch.setattr(OnlineRL, "score", constant)
    common = ["experiment=mini/teacher_geneval", *NFT, "trainer.log_every_n_steps=1", "trainer.max_steps=2"]

    def objects(*extra):
        cfg = cfg_factory("train", [*common, "overwrite=true", *extra])
        OmegaConf.resolve(cfg)
        return train(cfg)

    metrics, skipped = objects("module.skip_zero_variance_groups=true")
    init = lora_state(objects("trainer.max_steps=0")[1]["module"])
    after = lora_state(skipped["module"])
    assert init.keys() == after.keys() and all(torch.equal(init[k], after[k]) for k in init)
    assert skipped["module"].num_updates == 0 and skipped["module"].round == 2
    assert metrics["train/skipped_round"] == 1.0 and metrics["train/kept_fraction"] == 0.0
    stepped = lora_state(objects()[1]["module"])
    assert any(not torch.equal(init[k], stepped[k]) for k in init if ".student." in k)


def test_compute_meter_counts_every_transformer_pass_of_an_nft_round(cfg_factory):
    """One NFT round of 2 groups × 3 images, 3 rollout steps, 2 noised times: the counts follow from
    the algorithm (rollout CFG-free: 6 images × 3 steps; each training term: the student with grad,
    the old adapter and, with λ > 0, the reference without), and the FLOPs are those counts times the
    FLOPs of one pass measured here by torch's counter on the run's own transformer."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = cfg_factory("train", ["experiment=mini/teacher_geneval", *NFT, "trainer.log_every_n_steps=1",
                                "trainer.max_steps=1"])
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    module = objects["module"]
    images, steps, terms = 6, 3, 2
    ref = 1 if module.objective.kl_weight > 0 else 0
    meter = module.compute
    assert meter.images_sampled == images
    assert meter.train_passes == images * terms
    assert meter.nograd_passes == images * steps + images * terms * (1 + ref)
    x = torch.randn(1, *module.backbone.latent_shape(module.image_size, module.image_size))
    cond = module.encode(["a red circle"])  # (prompts are padded to one length: their FLOPs do not depend on the text)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.velocity_under(module.STUDENT, x, 0.5, cond, 1.0)
    assert meter.forward_flops == counter.get_total_flops() > 0
    with FlopCounterMode(display=False) as counter:
        module.velocity_under(module.STUDENT, x, 0.5, cond, 1.0).sum().backward()
    # the frozen base needs input gradients only (about one more forward), the LoRA also weight gradients
    assert meter.train_flops == counter.get_total_flops()
    assert 1.5 * meter.forward_flops < meter.train_flops < 3 * meter.forward_flops
    expect = (meter.nograd_passes * meter.forward_flops + meter.train_passes * meter.train_flops) / 1e12
    assert metrics["compute/model_tflop"] == pytest.approx(expect)
    assert metrics["compute/images_sampled"] == images
    assert metrics["compute/transformer_passes"] == meter.train_passes + meter.nograd_passes


def test_skipping_equal_reward_groups_under_fp16_loss_scaling_stops_before_the_first_round(cfg_factory, monkeypatch):
    """fp16's GradScaler cannot count a step without gradients: the run stops at fit start, naming
    the option and the fix (a CPU turns 16-mixed into bf16, so the scaler is simulated here)."""
    from opd.modules.teacher_nft import NFTTeacher

    monkeypatch.setattr(NFTTeacher, "grad_scaler", property(lambda self: object()))
    monkeypatch.setattr(NFTTeacher, "check_precision", lambda self: None)
    monkeypatch.setattr(NFTTeacher, "run_round", lambda self: pytest.fail("a round ran"))
    cfg = cfg_factory("train", ["experiment=mini/teacher_geneval", *NFT, "trainer.max_steps=1",
                                "module.skip_zero_variance_groups=true"])
    OmegaConf.resolve(cfg)
    with pytest.raises(ValueError, match="skip_zero_variance_groups=true.*bf16-mixed"):
        train(cfg)


def test_a_compute_budget_stops_the_run_after_the_round_that_reaches_it(cfg_factory, capsys):
    """callbacks.compute_budget: 6 images a round and a budget of 12 → 2 rounds of max_steps 5; the
    finished run's logged total is the budget read back by python -m opd.results.compute."""
    from opd.callbacks.budget import ComputeBudget
    from opd.results import compute

    cfg = cfg_factory("train", ["experiment=mini/teacher_geneval", *NFT, "trainer.log_every_n_steps=1",
                                "trainer.max_steps=5", "callbacks.compute_budget.max_images_sampled=12"])
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and objects["module"].compute.images_sampled == 12
    assert metrics["compute/images_sampled"] == 12
    run = Path(cfg.paths.output_dir)
    assert compute.main([str(run), "--key", "compute/images_sampled"]) == 12
    # a snapshot after 1 round (logged at step 0) and the whole run
    assert compute.main([str(run), str(run / "step_000001"), "--key", "compute/images_sampled"]) == 12 + 6
    assert compute.main([str(run)]) == pytest.approx(metrics["compute/model_tflop"])
    (run.parent / "picked.json").write_text(json.dumps({"geneval": {"winner": f"{run.name}/step_000001"}}))
    assert compute.main([str(run), "--picked", str(run.parent / "picked.json"), "--scale", "0.5",
                         "--key", "compute/images_sampled"]) == (12 + 6) / 2
    with pytest.raises(SystemExit):
        compute.main([str(run.parent / "no_such_run")])
    assert "no logged values" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be > 0"):
        ComputeBudget(max_model_tflop=0)
    assert ComputeBudget().limits == {}
    # an empty budget (a failed $(python -m opd.results.compute ...) in make) or a word: named, with the cause
    with pytest.raises(ValueError, match=r"max_model_tflop='' is not a number: the command that computed it"):
        ComputeBudget(max_model_tflop="")
    with pytest.raises(ValueError, match=r"max_images_sampled='lots' is not a number$"):
        ComputeBudget(max_images_sampled="lots")
    assert ComputeBudget(max_model_tflop="16040.5").limits == {"compute/model_tflop": 16040.5}


def test_an_export_stopped_midway_leaves_the_previous_adapter_whole(cfg_factory, tmp_path, monkeypatch):
    """The adapter file is what the Makefile's chains wait for: an export that breaks while writing
    leaves the previous adapter as it was (and no partial folder where globs look), and the next
    export replaces it whole."""
    from safetensors.torch import load_file

    from opd.models.lora_files import WEIGHT_NAME
    from opd.modules import policy

    module = run(cfg_factory, 1)["module"]
    out = tmp_path / "exported" / "adapter"
    module.export_adapter(out, "the adapter")
    before = (out / WEIGHT_NAME).read_bytes()
    weights = load_file(out / WEIGHT_NAME)
    real = policy.save_lora

    def broken(transformer, name, folder):
        real(transformer, name, folder)
        (Path(folder) / WEIGHT_NAME).write_bytes(b"trunc")  # a file cut off on the way...
        raise OSError("disk full")  # ...and the export stops

    monkeypatch.setattr(policy, "save_lora", broken)
    with pytest.raises(OSError, match="disk full"):
        module.export_adapter(out, "the adapter")
    assert (out / WEIGHT_NAME).read_bytes() == before
    assert [p.name for p in out.parent.glob("[!.]*")] == ["adapter"]  # the partial folder is hidden from globs
    monkeypatch.undo()
    module.export_adapter(out, "the adapter")
    again = load_file(out / WEIGHT_NAME)  # whole: it loads, with the same weights
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]
