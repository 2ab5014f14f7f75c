"""`python -m opd.bench` runs on a CPU and reports consistent figures; both loops do the same math."""
import argparse
import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from opd.bench import (
    LEVERS,
    PHASES,
    PhaseClock,
    build,
    build_backbone,
    build_module,
    iteration,
    main,
    parse_args,
    reference_backward,
    reference_loss,
)


def test_bench_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--model", "mini", "--batch", "3", "--steps", "2", "--iters", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["speedup"] == result["speedup"] > 0
    assert written["speedup"] == (written["ours"]["trajectories_per_second"]
                                  / written["reference_style"]["trajectories_per_second"])
    assert written["ours"]["peak_memory_gib"] is None and written["ours"]["mfu"] is None  # a CPU: no GPU figures
    for side in ("ours", "reference_style"):
        fig = written[side]
        assert abs(fig["trajectories_per_second"] * fig["seconds_per_iteration"] - 3) < 1e-6
        # the two loops share one FLOP count, so their achieved rates stand in the ratio of their times
        assert abs(fig["achieved_tflops"] * 1e12 * fig["seconds_per_iteration"]
                   - written["ours"]["flops_per_iteration"]) < 1e-3 * written["ours"]["flops_per_iteration"]
        assert_phases_add_up(fig)


def assert_phases_add_up(fig):
    """rollout + targets + train account for the iteration (all but loop overhead), each positive."""
    parts = [fig[f"{p}_seconds"] for p in PHASES]
    assert all(p > 0 for p in parts), parts
    assert 0.8 * fig["seconds_per_iteration"] - 0.01 <= sum(parts) <= fig["seconds_per_iteration"] + 1e-6


def test_batched_and_reference_loops_count_the_same_flops(tmp_path):
    """The speed-up is batching alone: on the SD3 architecture (toy size) one batched iteration and
    one batch-3 step-by-step iteration over the same 6 prompts run the same number of model FLOPs."""
    torch.manual_seed(0)
    args = argparse.Namespace(kernel="ode", noise_level=0.0, steps=3, batch=6, ref_batch=3,
                              target_chunk=64, train_chunk=16)
    module = build_module(build_backbone("sd3-tiny", "cpu", torch.float32), args, tmp_path)
    opt = torch.optim.SGD(module.policy_parameters(), lr=0.0)
    prompts = [f"prompt {i}" for i in range(6)]
    counts = []
    for batched in (True, False):
        with FlopCounterMode(display=False) as counter:
            iteration(module, opt, prompts, batched, args.ref_batch)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_per_step_backward_gives_the_gradient_of_the_summed_loss_and_of_the_batched_loop():
    """The timed reference loop backpropagates each step as the authors' script does; its gradient is
    that of ``reference_loss`` (one graph) and of the batched ``distill_on``."""
    module = build(parse_args(["--model", "sd3-tiny", "--batch", "3", "--steps", "4", "--train-chunk", "5"], "cpu"),
                   "cpu", torch.float32)
    with torch.no_grad():  # a student that differs from the base
        for p in module.policy_parameters():
            p.add_(0.05 * torch.randn_like(p))
    params, teacher = module.policy_parameters(), module.teachers[0]
    traj = module.rollout_student(["a", "b", "c"])

    def grads_of(run):
        for p in params:
            p.grad = None
        loss = run()
        return loss.detach(), [p.grad.clone() for p in params]

    def summed_then_backward():
        loss = reference_loss(module, traj, teacher)
        loss.backward()
        return loss

    summed, g_sum = grads_of(summed_then_backward)
    stepped, g_step = grads_of(lambda: reference_backward(module, traj, teacher))
    batched, g_batch = grads_of(lambda: module.distill_on(traj, teacher, backward=True))
    assert summed.item() > 0
    torch.testing.assert_close(stepped, summed, rtol=1e-6, atol=0)
    torch.testing.assert_close(batched, summed, rtol=1e-5, atol=0)
    scale = max(float(g.abs().max()) for g in g_sum)
    for a, b, ref in zip(g_step, g_batch, g_sum, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(b, ref, rtol=1e-4, atol=1e-5 * scale)


def test_phase_clock_takes_inner_phases_out_of_the_outer_one():
    clock = PhaseClock()

    class Work:
        def teacher_targets(self):
            time.sleep(0.03)

    work = Work()
    with clock("train"), clock.calls(work, "teacher_targets", "targets"):
        time.sleep(0.02)
        work.teacher_targets()
    assert "teacher_targets" not in vars(work)  # the method is the class's again
    assert 0.03 <= clock.seconds["targets"] < 0.045
    assert 0.02 <= clock.seconds["train"] < 0.035
    assert clock.seconds["rollout"] == 0.0


def test_levers_mode_measures_each_lever_alone_and_writes_every_entry(tmp_path):
    out = tmp_path / "levers.json"
    result = main(["--model", "sd3-tiny", "--batch", "2", "--iters", "1", "--steps", "2", "--levers",
                   "--compile-backend", "eager", "--batch-sweep", "1", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    ours, ref = written["ours"], written["reference_style"]
    assert written["speedup"] == ours["trajectories_per_second"] / ref["trajectories_per_second"]
    assert ours["levers"] == [] and ours["flops_per_iteration"] == ref["flops_per_iteration"] > 0
    assert set(written["levers"]) == set(LEVERS)
    assert written["levers"]["fp8"]["skipped"].startswith("FP8 needs a CUDA GPU")
    assert "No viable backend" in written["levers"]["attention_efficient"]["error"]  # no such kernel on a CPU
    runs_on_cpu = [n for n in LEVERS if n not in ("fp8", "attention_efficient", "attention_cudnn", "attention_flash")]
    for name in runs_on_cpu:
        fig = written["levers"][name]
        assert "error" not in fig and "skipped" not in fig, (name, fig)
        assert abs(fig["trajectories_per_second"] * fig["seconds_per_iteration"] - 2) < 1e-6
        assert fig["speedup_vs_ours"] == pytest.approx(fig["trajectories_per_second"] / ours["trajectories_per_second"])
        assert fig["speedup_vs_reference"] == pytest.approx(fig["trajectories_per_second"]
                                                            / ref["trajectories_per_second"])
        assert_phases_add_up(fig)
    levers = written["levers"]
    assert levers["checkpointing_chunk_x4"]["flags"] == {"gradient_checkpointing": True, "train_chunk": 64}
    assert levers["train_chunk_half"]["flags"] == {"train_chunk": 8}
    # CFG-free: the student's rollout and training passes halve, the teacher's CFG targets do not
    free, full = levers["cfg_free"]["flops_per_iteration"], ours["flops_per_iteration"]
    assert full / 2 < free < full
    assert levers["merge_teacher"]["achieved_tflops"] * levers["merge_teacher"]["seconds_per_iteration"] == (
        pytest.approx(full / 1e12))  # same math as ours: credited with ours' FLOPs
    sweep = written["batch_sweep"]
    assert [e["batch"] for e in sweep] == [1, 2]
    assert sweep[1]["flops_per_iteration"] == pytest.approx(2 * sweep[0]["flops_per_iteration"], rel=1e-9)
    for e in sweep:
        assert abs(e["trajectories_per_second"] * e["seconds_per_iteration"] - e["batch"]) < 1e-6


def test_flags_that_cannot_run_are_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--levers", "--compile"], "cpu")
    assert "--levers measures each lever alone" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--levers", "merge_teacher", "--attention", "math"], "cpu")
    assert "drop --attention math" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--fp8"], "cpu")
    assert "--fp8 needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--batch-sweep", "4", "0"], "cpu")
    assert "--batch-sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--levers", "warp_drive"], "cpu")
    assert "invalid choice: 'warp_drive'" in capsys.readouterr().err


def test_lever_flags_apply_to_ours_and_the_reference_stays_the_plain_cfg_loop():
    result = main(["--model", "sd3-tiny", "--batch", "2", "--iters", "1", "--steps", "2", "--cfg-free",
                   "--merge-teacher", "--attention", "math"])
    ours, ref = result["ours"], result["reference_style"]
    assert ours["levers"] == ["--merge-teacher", "--attention math", "--cfg-free"]
    assert result["speedup"] == ours["trajectories_per_second"] / ref["trajectories_per_second"]
    # the reference ran with CFG on both passes (more FLOPs), ours without it on the student's
    assert ref["flops_per_iteration"] / 2 < ours["flops_per_iteration"] < ref["flops_per_iteration"]
