"""DiffusionOPD module on a toy mini model: batched = step-by-step, validation, an MOPD run."""
import pytest
import torch
from omegaconf import OmegaConf

from opd.models.lora import add_lora, lora_parameters, save_lora
from opd.sampling import rollout, sd3_sigmas
from opd.train import train
from test_models import toy


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    """A toy base and two teacher adapters (random B, so the teachers differ from the base)."""
    root = tmp_path_factory.mktemp("opd")
    base = toy(seed=5)
    base.save_pretrained(root / "base", dtype=torch.float32)
    for i, name in enumerate(["ocr", "geneval"]):
        add_lora(base.transformer, name, rank=2, alpha=4)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in lora_parameters(base.transformer, name):
                p.add_(0.3 * torch.randn_like(p))
        save_lora(base.transformer, name, root / name)
    return root


def overrides(root, extra=()):
    return ["experiment=mini/mopd_aesthetic_ocr_geneval", f"model.path={root / 'base'}", "model.image_size=16",
            "teacher=[mini_ocr,mini_geneval]", f"teacher.ocr.adapter={root / 'ocr'}",
            f"teacher.geneval.adapter={root / 'geneval'}", "trainer=cpu", "logger=csv",
            "trainer.enable_progress_bar=false", "module.prompts_per_teacher=2", "module.lora={rank:2,alpha:4}",
            "sampler.num_steps=3", "module.train_chunk=4", "module.target_chunk=5", "callbacks.image_grid.num_steps=2",
            "+module.preview_prompts=[a red circle]", "teacher.ocr.monitor_reward=null",
            "teacher.geneval.monitor_reward=null", *extra]


def build(cfg_factory, root, extra=()):
    cfg = cfg_factory("train", overrides(root, extra))
    OmegaConf.resolve(cfg)
    import hydra

    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    return module


@pytest.mark.parametrize("sampler", ["ode", "flow_sde"])
def test_batched_loss_and_gradient_equal_the_step_by_step_loop(cfg_factory, toy_world, sampler):
    module = build(cfg_factory, toy_world, [f"sampler={sampler}", "sampler.num_steps=3"])
    with torch.no_grad():  # give the student a non-zero B so it differs from the base
        for p in module.policy_parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher = module.teachers[0]
    cond = module.encode(["a red circle", 'a sign that says "K7P"'])
    traj = rollout(module.backbone, cond, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                   sd3_sigmas(3), kernel=module.sampler.kernel, noise_level=module.sampler.noise_level,
                   guidance_scale=module.sampler.guidance_scale, uncond=module.encode(["", ""]),
                   generator=torch.Generator().manual_seed(1))
    params = module.policy_parameters()
    ref = module.reference_loss(traj, teacher)
    ref_grads = torch.autograd.grad(ref, params)
    module.manual_backward = lambda loss: loss.backward()
    for p in params:
        p.grad = None
    batched = module.distill_on(traj, teacher, backward=True)
    assert ref.item() > 0
    torch.testing.assert_close(batched, ref.detach(), rtol=1e-5, atol=1e-7)
    for g_ref, p in zip(ref_grads, params):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))  # float32 reassociation


def test_student_starts_equal_to_the_base(cfg_factory, toy_world):
    module = build(cfg_factory, toy_world)
    assert all(torch.count_nonzero(p) == 0 for n, p in module.backbone.transformer.named_parameters()
               if "lora_B.student" in n)


def test_a_second_phase_starts_from_the_first_students_adapter(cfg_factory, toy_world, tmp_path):
    first = build(cfg_factory, toy_world)
    with torch.no_grad():
        for p in first.policy_parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_lora(first.backbone.transformer, first.STUDENT, tmp_path / "phase1")
    second = build(cfg_factory, toy_world, [f"+module.init_adapter={tmp_path / 'phase1'}"])
    for a, b in zip(first.policy_parameters(), second.policy_parameters(), strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
    assert all(p.requires_grad for p in second.policy_parameters())
    with pytest.raises(Exception, match="LoRA adapter not found: .*phase0"):  # before the backbone loads
        build(cfg_factory, toy_world, [f"+module.init_adapter={tmp_path / 'phase0'}"])


def test_mopd_round_sums_teacher_kls_and_trains_only_the_student(cfg_factory, toy_world):
    with_monitors = [o for o in overrides(toy_world, ["trainer.max_steps=2"]) if "monitor_reward" not in o]
    cfg = cfg_factory("train", with_monitors)
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    assert metrics["teacher/ocr/kl"] > 0 and metrics["teacher/geneval/kl"] > 0
    assert metrics["train/kl"] == pytest.approx(metrics["teacher/ocr/kl"] + metrics["teacher/geneval/kl"], rel=1e-5)
    assert 0.0 <= metrics["teacher/ocr/ocr"] <= 1.0  # the OCR teacher's monitor, scored off the critical path
    assert 0.0 <= metrics["teacher/geneval/geneval_mini/correct"] <= 1.0  # each teacher logs its own monitor
    assert not any(k.startswith(("teacher/geneval/ocr", "teacher/ocr/geneval")) for k in metrics)
    student = [p for n, p in objects["module"].backbone.transformer.named_parameters() if "lora_B.student" in n]
    assert any(torch.count_nonzero(p) > 0 for p in student)
    teachers = {n: p for n, p in objects["module"].backbone.transformer.named_parameters() if ".teacher_" in n}
    assert teachers and not any(p.requires_grad for p in teachers.values())


def test_bad_teacher_configs_fail_before_any_model_loads(cfg_factory, toy_world, tmp_path):
    import hydra

    def instantiate(extra):
        cfg = cfg_factory("train", overrides(toy_world, extra))
        OmegaConf.resolve(cfg)
        return hydra.utils.instantiate(cfg.module)

    with pytest.raises(Exception, match="duplicate teacher name 'ocr'"):
        instantiate(["teacher.geneval.name=ocr"])
    with pytest.raises(Exception, match="LoRA adapter not found"):
        instantiate([f"teacher.ocr.adapter={tmp_path / 'missing'}"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_lora_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception, match="not a readable safetensors file"):
        instantiate([f"teacher.ocr.adapter={tmp_path / 'bad'}"])
    other = toy(seed=1)
    add_lora(other.transformer, "x", rank=3, alpha=6)
    save_lora(other.transformer, "x", tmp_path / "other")
    with pytest.raises(Exception, match="different base models or LoRA settings"):
        instantiate([f"teacher.geneval.adapter={tmp_path / 'other'}"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="empty"):
        instantiate([f"+teacher.ocr.prompts.path={empty}"])


def test_balanced_weighting_divides_each_teacher_by_its_running_kl(cfg_factory, toy_world):
    """Round 0: weight = 1/KL (measured without grad) so every teacher starts with loss 1; the scale
    then follows an EMA of the KLs; the gradient equals that of the KL-normalised sum."""
    module = build(cfg_factory, toy_world, ["module.teacher_weighting=balanced", "module.balance_decay=0.5"])
    module.all_gather = lambda t: t  # type: ignore[method-assign]  # one process: the identity
    module.manual_backward = lambda loss: loss.backward()  # type: ignore[method-assign]
    teacher = module.teachers[0]
    prompts = [r["prompt"] for r in teacher.prompts[:2]]
    with torch.no_grad():
        traj = module.sample(prompts, kernel="ode", noise_level=0.0, guidance_scale=4.5)
    w = module.teacher_weight(teacher, traj)
    kl = module.distill_on(traj, teacher, backward=False)
    assert w == pytest.approx(1 / kl.item(), rel=1e-5)
    params = module.policy_parameters()
    for p in params:
        p.grad = None
    module.distill_on(traj, teacher, backward=True, weight=w)
    weighted = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    module.distill_on(traj, teacher, backward=True)
    for g_w, p in zip(weighted, params):
        # float32: where terms cancel an element keeps only the error of its summands, so atol scales with them
        torch.testing.assert_close(g_w, p.grad * w, rtol=1e-4, atol=1e-5 * float(g_w.abs().max()))
    module.update_kl_scale(teacher, torch.tensor(3.0))
    assert module.kl_scale[teacher.name] == pytest.approx(0.5 * kl.item() + 0.5 * 3.0, rel=1e-5)
    assert module.teacher_weight(teacher, traj) == pytest.approx(1 / module.kl_scale[teacher.name])


def test_kill_and_resume_matches_uninterrupted(toy_world, tmp_path_factory):
    """MOPD stopped after 2 rounds and resumed with ``ckpt_path=last`` ends with the same student LoRA and
    logs the same per-teacher KLs as a 4-round run; balanced weighting, so its running KL scales
    must survive the checkpoint too."""
    from conftest import compose_cfg, logged

    def launch(out_dir, steps, extra=()):
        cfg = compose_cfg("train", overrides(toy_world, ["module.teacher_weighting=balanced", "trainer.log_every_n_steps=1",
                                                         f"trainer.max_steps={steps}", *extra]), out_dir)
        OmegaConf.resolve(cfg)
        return train(cfg)[1]["module"]

    straight_dir, resumed_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    straight = launch(straight_dir, 4)
    launch(resumed_dir, 2, ["callbacks.model_checkpoint.every_n_train_steps=2"])
    resumed = launch(resumed_dir, 4, ["ckpt_path=last"])
    a = {n: p for n, p in straight.backbone.transformer.named_parameters() if ".student." in n}
    b = dict(resumed.backbone.transformer.named_parameters())
    assert a
    for n, p in a.items():
        torch.testing.assert_close(p, b[n], rtol=0, atol=0)
    assert straight.kl_scale == resumed.kl_scale
    for key in ("teacher/ocr/kl", "teacher/geneval/weight"):
        la, lb = logged(straight_dir, key), logged(resumed_dir, key)
        assert len(la) == 4 and la == lb


def test_multirun_sweeps_the_kl_weight(tmp_path):
    """`python -m opd.train -m ... objective.kl_weight=0.5,2` launches one job per value (the shipped
    teachers, zero optimiser steps: composition, model and teacher loading per job)."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "opd.train", "-m", "experiment=mini/mopd_aesthetic_ocr_geneval", "trainer=cpu",
         "logger=csv", "trainer.max_steps=0", "callbacks.image_grid.num_steps=1", "objective.kl_weight=0.5,2",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(p.parent.parent for p in tmp_path.glob("*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    weights = sorted(float(OmegaConf.load(j / ".hydra" / "config.yaml").objective.kl_weight) for j in jobs)
    assert weights == [0.5, 2.0]
