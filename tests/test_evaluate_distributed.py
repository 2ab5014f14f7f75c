"""``torchrun --nproc_per_node 2 -m opd.evaluate`` (gloo, CPU) reports what one process does, with
another batch size: each image's noise depends only on (seed, prompt, image index)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, compose_cfg
from opd.evaluate import evaluate
from test_models import toy_base_and_adapter


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    return toy_base_and_adapter(tmp_path_factory.mktemp("toy_dist"), seed=5)


def overrides(toy_dirs: Path, batch_size: int) -> list[str]:
    return [f"model.path={toy_dirs / 'base'}", "model.image_size=16", "max_prompts=3", "num_steps=2", "device=cpu",
            f"batch_size={batch_size}", "images_per_prompt=2", "controls.cover.num_scenes=8",
            "controls.cover.num_train_prompts=4", "controls.sensitivity_pairs=2",
            f"+checkpoints.lora={{adapter:{toy_dirs / 'lora'},guidance_scale:1.0}}"]


def test_two_gloo_ranks_merge_to_the_one_process_result(toy_dirs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:  # one process, every task's 6 images in one batch of 7
        evaluate(compose_cfg("eval", overrides(toy_dirs, 7), one))
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # two ranks, batches of 2: rank 0 draws images 0-1 and 4-5 of each task, rank 1 images 2-3
    done = subprocess.run([*torchrun, "-m", "opd.evaluate", *overrides(toy_dirs, 2), f"hydra.run.dir={two}"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((one / "results.json").read_text())
    assert set(results) == {"base", "lora", "cover"} and "geneval/geneval_mini_correct" in results["lora"]
    assert "ocr/ocr/swapped" in results["lora"] and results["base"]["ocr/sensitivity"] == 1.0
    merged = json.loads((two / "results.json").read_text())
    assert merged.keys() == results.keys() and merged["cover"] == results["cover"]  # the cover: rank 0, same search
    for ckpt, metrics in results.items():  # float noise of another batch size may move a score by ~1e-6
        assert merged[ckpt] == pytest.approx(metrics, rel=1e-4, abs=1e-4), ckpt
    ident = ("checkpoint", "task", "index", "prompt_index", "image_index", "prompt", "image")
    samples = [json.loads(x) for x in (one / "samples.jsonl").read_text().splitlines()]
    other = [json.loads(x) for x in (two / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 * 3 * 2
    assert [[s[k] for k in ident] for s in other] == [[s[k] for k in ident] for s in samples]
    for line in samples:  # every rank's images landed where rank 0's records say, the same images
        a = np.asarray(Image.open(one / line["image"]), dtype=np.int16)
        b = np.asarray(Image.open(two / line["image"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, line["image"]  # allclose: at most one 8-bit level apart
    md = (two / "results.md").read_text()
    assert "| base | 4.5 |" in md and "| lora | 1 |" in md  # per-checkpoint CFG
