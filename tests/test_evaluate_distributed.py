"""``torchrun --nproc_per_node 2 -m opd.evaluate`` (gloo, CPU) reports exactly what one process does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_cfg
from opd.evaluate import evaluate
from test_models import toy_base_and_adapter


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    return toy_base_and_adapter(tmp_path_factory.mktemp("toy_dist"), seed=5)


def overrides(toy_dirs: Path) -> list[str]:
    return [f"model.path={toy_dirs / 'base'}", "model.image_size=16", "max_prompts=3", "num_steps=2", "device=cpu",
            "batch_size=2", f"+checkpoints.lora={{adapter:{toy_dirs / 'lora'},guidance_scale:1.0}}"]


def test_two_gloo_ranks_merge_to_the_one_process_result(toy_dirs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): the same kernels, the same bits
    try:
        evaluate(compose_cfg("eval", overrides(toy_dirs), one))
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, "-m", "opd.evaluate", *overrides(toy_dirs), f"hydra.run.dir={two}"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((one / "results.json").read_text())
    assert set(results) == {"base", "lora"} and "geneval/geneval_mini_correct" in results["lora"]
    assert json.loads((two / "results.json").read_text()) == results
    samples = (one / "samples.jsonl").read_text().splitlines()
    assert (two / "samples.jsonl").read_text().splitlines() == samples and len(samples) == 2 * 3 * 3
    for line in map(json.loads, samples):  # every rank's images landed where rank 0's records say
        assert (one / line["image"]).read_bytes() == (two / line["image"]).read_bytes()
    md = (two / "results.md").read_text()
    assert "| base | 4.5 |" in md and "| lora | 1 |" in md  # per-checkpoint CFG
