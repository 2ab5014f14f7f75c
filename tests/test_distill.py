"""DiffusionOPD module on a toy mini model: batched = step-by-step, validation, an MOPD run."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg
from opd.bench import reference_loss
from opd.models.lora import add_lora, lora_parameters, save_lora
from opd.modules.guards import NonFiniteError
from opd.modules.policy import RewardFailedError
from opd.sampling import rollout, sd3_sigmas
from opd.train import train
from test_models import toy


def write_toy_world(root: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A toy base saved in ``dtype`` and two teacher adapters with random factors (so the teachers
    differ from the base), each factor rounded to ``dtype`` and back, so that a module built in that
    dtype starts from exactly these weights."""
    base = toy(seed=5)
    base.save_pretrained(root / "base", dtype=dtype)
    for i, name in enumerate(["ocr", "geneval"]):
        add_lora(base.transformer, name, rank=2, alpha=4)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in lora_parameters(base.transformer, name):
                p.copy_((p + 0.3 * torch.randn_like(p)).to(dtype).float())
        save_lora(base.transformer, name, root / name)
    return root


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    return write_toy_world(tmp_path_factory.mktemp("opd"))


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


@pytest.mark.parametrize(("sampler", "chunks"), [("ode", (5, 4)), ("flow_sde", (5, 4)), ("ode", (3, 1))])
def test_batched_loss_and_gradient_equal_the_step_by_step_loop(cfg_factory, toy_world, sampler, chunks):
    """2 prompts × 2 trained steps = 4 states: in one teacher chunk and one training chunk, or in
    chunks of 3 + 1 teacher states and 4 training chunks of one state (the chunks cross steps)."""
    module = build(cfg_factory, toy_world, [f"sampler={sampler}", "sampler.num_steps=3",
                                            f"module.target_chunk={chunks[0]}", f"module.train_chunk={chunks[1]}"])
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
    ref = reference_loss(module, traj, teacher)
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
    assert metrics["train/kl_sum"] == pytest.approx(metrics["teacher/ocr/kl"] + metrics["teacher/geneval/kl"], rel=1e-5)
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


def test_balance_normalize_keeps_the_ratios_of_the_balanced_weights_and_makes_them_average_one(
        cfg_factory, toy_world):
    """balanced: w_m = 1/KL_m; balance_normalize rescales them to mean 1 over the teachers."""
    module = build(cfg_factory, toy_world, ["module.teacher_weighting=balanced", "module.balance_normalize=true"])
    module.all_gather = lambda t: t  # type: ignore[method-assign]
    trajs, kls = [], []
    for teacher in module.teachers:
        with torch.no_grad():
            traj = module.sample([r["prompt"] for r in teacher.prompts[:2]], kernel="ode", noise_level=0.0,
                                 guidance_scale=4.5)
        trajs.append(traj)
        kls.append(module.distill_on(traj, teacher, backward=False).item())
    weights = module.teacher_weights(trajs)
    raw = [1 / kl for kl in kls]
    expected = [r / (sum(raw) / len(raw)) for r in raw]
    assert weights == pytest.approx(expected, rel=1e-5)
    assert sum(weights) == pytest.approx(len(weights))
    assert kls[0] != pytest.approx(kls[1], rel=1e-2)  # the teachers differ, so the ratio is not trivially 1


def test_cfg_free_student_trains_its_conditional_mean_towards_the_teachers_guided_mean(cfg_factory, toy_world):
    """sampler.guidance_scale=1 (the CFG-free student): the student's mean is one conditional pass while
    the teacher keeps its own CFG; the loss is ½·mean_D (μ_S − μ_T)² summed over the ODE steps,
    recomputed here from raw backbone velocities."""
    module = build(cfg_factory, toy_world, ["sampler.guidance_scale=1.0", "teacher.ocr.guidance_scale=4.5"])
    with torch.no_grad():
        for p in module.policy_parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher = module.teachers[0]
    assert teacher.guidance_scale == 4.5
    prompts = [r["prompt"] for r in teacher.prompts[:2]]
    with torch.no_grad():
        traj = module.sample(prompts, kernel="ode", noise_level=0.0, guidance_scale=module.sampler.guidance_scale)
        loss = module.distill_on(traj, teacher, backward=False)
        bb, tr = module.backbone, module.backbone.transformer
        cond, empty = bb.encode_prompts(prompts), bb.encode_prompts(["", ""])
        expected = torch.zeros(())
        for j in range(module.num_trained_steps):
            x, s, s_next = traj.latents[:, j], traj.sigmas[j], traj.sigmas[j + 1]
            sig = torch.full((2,), float(s))
            tr.set_adapter(module.STUDENT)
            v_s = bb.velocity(x, sig, cond)
            tr.set_adapter(teacher.adapter_name)
            v_u, v_c = bb.velocity(x, sig, empty), bb.velocity(x, sig, cond)
            v_t = v_u + 4.5 * (v_c - v_u)
            gap = (s_next - s) * (v_s - v_t)  # ODE means x + (σ' − σ) v: x cancels
            expected = expected + 0.5 * gap.square().flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("merge", [True, False])
def test_a_base_model_teacher_is_cfg_distillation_its_targets_the_bare_base_guided(cfg_factory, toy_world, merge):
    """teacher.<name>.adapter=null: the teacher is the base model itself at its own CFG scale. At CFG 1 a
    fresh CFG-free student (B = 0) already equals it (KL exactly 0); at CFG 4.5 the loss is
    ½·mean_D (μ_S − μ_T)² over the ODE steps with μ_T from a separately built base that has no LoRA at all."""
    from opd.modules.distill import BASE_TEACHER

    def geneval_only(extra):  # the toy world's overrides with one teacher, geneval
        import hydra

        kept = [o for o in overrides(toy_world) if not o.startswith(("teacher=", "teacher.ocr."))]
        cfg = cfg_factory("train", [*kept, "teacher=[mini_geneval]", "teacher.geneval.monitor_reward=null", *extra])
        OmegaConf.resolve(cfg)
        built = hydra.utils.instantiate(cfg.module)
        built.configure_model()
        return built

    base_teacher = ["sampler.guidance_scale=1.0", "teacher.geneval.adapter=null", f"module.merge_teacher_lora={merge}"]
    module = geneval_only([*base_teacher, "teacher.geneval.guidance_scale=1.0"])
    teacher = module.teachers[0]
    assert (teacher.adapter, teacher.adapter_name, teacher.sha256) == (None, None, BASE_TEACHER)
    assert not any(".teacher_" in n for n, _ in module.backbone.transformer.named_parameters())
    prompts = [r["prompt"] for r in teacher.prompts[:2]]
    with torch.no_grad():
        traj = module.sample(prompts, kernel="ode", noise_level=0.0, guidance_scale=1.0)
        assert module.distill_on(traj, teacher, backward=False).item() == 0.0

    module = geneval_only([*base_teacher, "teacher.geneval.guidance_scale=4.5"])
    with torch.no_grad():
        for p in module.policy_parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher, bare = module.teachers[0], toy(seed=5)  # the toy world's base, built again without adapters
    with torch.no_grad():
        traj = module.sample(prompts, kernel="ode", noise_level=0.0, guidance_scale=1.0)
        loss = module.distill_on(traj, teacher, backward=False)
        bb = module.backbone
        cond, empty = bb.encode_prompts(prompts), bb.encode_prompts(["", ""])
        expected = torch.zeros(())
        for j in range(module.num_trained_steps):
            x, s, s_next = traj.latents[:, j], traj.sigmas[j], traj.sigmas[j + 1]
            sig = torch.full((2,), float(s))
            v_s = bb.velocity(x, sig, cond)  # the student is the only adapter, and active
            v_u, v_c = bare.velocity(x, sig, empty), bare.velocity(x, sig, cond)
            gap = (s_next - s) * (v_s - (v_u + 4.5 * (v_c - v_u)))
            expected = expected + 0.5 * gap.square().flatten(1).mean(1).mean()
    assert expected.item() > 0
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    # a checkpoint records the base as that teacher; a resume with an adapter there (or the reverse) is named
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["opd_teacher_sha256"] == {"geneval": BASE_TEACHER}
    with pytest.raises(ValueError, match="trained with adapter sha256 abc, now it is the base model"):
        module.check_teachers({"geneval": "abc"})
    adapter_teacher = geneval_only([f"teacher.geneval.adapter={toy_world / 'geneval'}"])
    with pytest.raises(ValueError, match="trained with the base model as that teacher, now it is adapter .*geneval"):
        adapter_teacher.check_teachers({"geneval": BASE_TEACHER})


def test_step_reduction_mean_scales_the_first_rounds_gradient_by_steps_times_teachers(toy_world, tmp_path):
    """objective.step_reduction=mean (the authors' gradient accumulation) divides round 0's gradient
    (logged before clipping) by trained steps × teachers, and leaves the logged KLs summed."""
    logged = {}
    for reduction in ("sum", "mean"):
        cfg = compose_cfg("train", overrides(toy_world, ["trainer.max_steps=1", f"objective.step_reduction={reduction}",
                                                         "module.timestep_fraction=1.0"]), tmp_path / reduction)
        OmegaConf.resolve(cfg)
        logged[reduction] = train(cfg)[0]
    num_steps, num_teachers = 3, 2  # sampler.num_steps=3, all trained; teacher=[mini_ocr,mini_geneval]
    assert logged["mean"]["train/kl_sum"] == pytest.approx(logged["sum"]["train/kl_sum"], rel=1e-5)
    assert logged["mean"]["train/grad_norm"] == pytest.approx(
        logged["sum"]["train/grad_norm"] / (num_steps * num_teachers), rel=1e-4)


# exact resume after SIGKILL and the teacher-hash check on resume: tests/test_kill_resume.py


def small_prompt_files(folder: Path, rows: int = 24) -> list[str]:
    """The teachers' prompt sets cut to ``rows`` rows (Hydra wraps every row of a teacher's prompt set in
    OmegaConf, seconds for the full sets)."""
    out = []
    for name, task in (("ocr", "ocr"), ("geneval", "geneval")):
        lines = (ROOT / "data" / "mini" / f"{task}_train.jsonl").read_text().splitlines()[:rows]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
        out.append(f"+teacher.{name}.prompts.path={folder / f'{task}.jsonl'}")
    return out


def poisoned_teacher(toy_world, folder, value, every=False):
    """A copy of the OCR teacher's adapter with its first LoRA B tensor (``every``: all of them) set to ``value``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from opd.models.lora import WEIGHT_NAME

    src = toy_world / "ocr" / WEIGHT_NAME
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()  # the LoRA config travels in the metadata
    state = load_file(str(src))
    keys = [k for k in state if "lora_B" in k]
    for k in keys if every else keys[:1]:
        state[k] = torch.full_like(state[k], value)
    folder.mkdir()
    save_file(state, str(folder / WEIGHT_NAME), metadata=meta)
    return folder


def test_a_teacher_adapter_holding_nan_is_refused_naming_the_teacher(cfg_factory, toy_world, tmp_path):
    bad = poisoned_teacher(toy_world, tmp_path / "nan_teacher", float("nan"))
    cfg = cfg_factory("train", overrides(toy_world, [f"teacher.ocr.adapter={bad}", "trainer.max_steps=2",
                                                     "callbacks.model_checkpoint.every_n_train_steps=1",
                                                     *small_prompt_files(tmp_path)]))
    OmegaConf.resolve(cfg)
    with pytest.raises(Exception, match="teacher 'ocr' .*holds non-finite weights") as err:
        train(cfg)
    assert isinstance(err.value.__cause__ or err.value, NonFiniteError)  # (Hydra wraps it)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "adapter").exists()  # nothing saved


def test_a_teacher_whose_targets_overflow_stops_the_run_before_the_student_steps(cfg_factory, toy_world, tmp_path):
    """Finite but absurd teacher weights: round 0's targets are inf/NaN. The run stops before the
    optimiser step, naming the teacher; no checkpoint or adapter is written."""
    bad = poisoned_teacher(toy_world, tmp_path / "huge_teacher", 3e38, every=True)
    cfg = cfg_factory("train", overrides(toy_world, [f"teacher.ocr.adapter={bad}", "trainer.max_steps=2",
                                                     "callbacks.model_checkpoint.every_n_train_steps=1",
                                                     *small_prompt_files(tmp_path)]))
    OmegaConf.resolve(cfg)
    with pytest.raises(NonFiniteError, match="round 0.*the targets of teacher 'ocr'.*teacher/ocr/kl"):
        train(cfg)
    assert not list(tmp_path.glob("checkpoints/*.ckpt")) and not (tmp_path / "adapter").exists()


def test_monitor_failures_are_counted_and_a_monitor_that_never_scores_stops_the_run(toy_world, tmp_path):
    flaky = "{flaky:{_target_:test_teacher_rl.FlakyReward,fail_every:%d}}"
    base = overrides(toy_world, ["trainer.max_steps=1", "callbacks.image_grid=null", "callbacks.curves=null",
                                 *small_prompt_files(tmp_path)])  # monitors null, then replaced
    cfg = compose_cfg("train", [*base, f"teacher.ocr.monitor_reward={flaky % 2}", "teacher.geneval.monitor_reward=null"],
                      tmp_path / "some")
    OmegaConf.resolve(cfg)
    metrics, _ = train(cfg)
    assert metrics["teacher/ocr/flaky/failures"] == 1.0  # 2 prompts a teacher: image 0 fails
    cfg = compose_cfg("train", [*base, "teacher.ocr.monitor_reward=null", f"teacher.geneval.monitor_reward={flaky % 1}"],
                      tmp_path / "all")
    OmegaConf.resolve(cfg)
    with pytest.raises(RewardFailedError, match="reward 'flaky' failed on every image of round 0 \\(2 images, "
                                                "logged under teacher/geneval/\\)"):
        train(cfg)


def test_multirun_sweeps_the_kl_weight(tmp_path):
    """`python -m opd.train -m ... objective.kl_weight=0.5,2` launches one job per value (the shipped
    teachers, zero optimiser steps: composition, model and teacher loading per job)."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "opd.train", "-m", "experiment=mini/mopd_aesthetic_ocr_geneval", "trainer=cpu", "eval=null",
         "logger=csv", "trainer.max_steps=0", "callbacks.image_grid.num_steps=1", "objective.kl_weight=0.5,2",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(p.parent.parent for p in tmp_path.glob("*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    weights = sorted(float(OmegaConf.load(j / ".hydra" / "config.yaml").objective.kl_weight) for j in jobs)
    assert weights == [0.5, 2.0]
