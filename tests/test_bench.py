"""`python -m opd.bench` runs on a CPU and reports consistent figures; both loops do the same math."""
import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from opd.bench import build_backbone, build_module, iteration, main


def test_bench_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--model", "mini", "--batch", "3", "--steps", "2", "--iters", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["speedup"] == result["speedup"] > 0
    assert written["speedup"] == (written["ours"]["trajectories_per_second"]
                                  / written["reference_style"]["trajectories_per_second"])
    for side in ("ours", "reference_style"):
        fig = written[side]
        assert abs(fig["trajectories_per_second"] * fig["seconds_per_iteration"] - 3) < 1e-6
        # the two loops share one FLOP count, so their achieved rates stand in the ratio of their times
        assert abs(fig["achieved_tflops"] * 1e12 * fig["seconds_per_iteration"]
                   - written["ours"]["flops_per_iteration"]) < 1e-3 * written["ours"]["flops_per_iteration"]


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
