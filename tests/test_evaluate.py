"""`python -m opd.evaluate` end to end on a toy mini model: report files, metrics, adapters."""
import json
import re

import numpy as np
import pytest

from opd.evaluate import evaluate
from opd.evaluation.bootstrap import bootstrap_ci
from test_models import toy_base_and_adapter


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    return toy_base_and_adapter(tmp_path_factory.mktemp("toy"), seed=3)


#: small controls: a 16-scene cover search on 6 training prompts per task
SMALL_CONTROLS = ["controls.cover.num_scenes=16", "controls.cover.num_train_prompts=6"]


def run_eval(cfg_factory, toy_dirs, extra=()):
    cfg = cfg_factory("eval", [f"model.path={toy_dirs / 'base'}", "model.image_size=16", "max_prompts=3",
                               "num_steps=2", "device=cpu", "batch_size=4", *SMALL_CONTROLS, *extra])
    return evaluate(cfg)


def test_report_files_and_metrics(cfg_factory, toy_dirs, tmp_path):
    results = run_eval(cfg_factory, toy_dirs, [f"+checkpoints.lora={toy_dirs / 'lora'}", "images_per_prompt=2"])
    assert set(results) == {"base", "lora", "cover"}  # the checkpoints, then the cover images' row
    for key in ("geneval/geneval_mini_correct", "ocr/ocr_exact", "ocr/ocr", "aesthetic/aesthetic_mini"):
        assert 0.0 <= results["base"][key] <= 1.0 and 0.0 <= results["cover"][key] <= 1.0
    assert any(k.startswith("geneval/geneval_mini_correct/") for k in results["base"])  # per-tag accuracies
    written = json.loads((tmp_path / "results.json").read_text())
    assert {c: pytest.approx(m) for c, m in written.items()} == results
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 3 * 3 * 2
    assert all((tmp_path / line["image"]).is_file() for line in lines)
    assert [(x["prompt_index"], x["image_index"]) for x in lines[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # the mean of the per-image scores is the reported metric (the report adds up what it shows), and
    # its interval is the prompt-clustered bootstrap of those scores
    ocr = [x for x in lines if x["checkpoint"] == "lora" and x["task"] == "ocr"]
    values = [x["scores"]["aesthetic_mini"] for x in lines if x["checkpoint"] == "lora" and x["task"] == "aesthetic"]
    assert results["lora"]["aesthetic/aesthetic_mini"] == pytest.approx(sum(values) / len(values), abs=1e-6)
    groups = [values[i : i + 2] for i in range(0, 6, 2)]  # two images per prompt, in prompt order
    assert (results["lora"]["aesthetic/aesthetic_mini/ci_low"], results["lora"]["aesthetic/aesthetic_mini/ci_high"]) \
        == pytest.approx(bootstrap_ci(groups), abs=1e-6)
    # swapped prompts: the same images against their partner prompts, averaged the same way
    swapped = [x["swapped"]["scores"]["ocr"] for x in ocr]
    assert {x["swapped"]["prompt_index"] for x in ocr} <= {0, 1, 2}
    assert all(x["swapped"]["prompt_index"] != x["prompt_index"] for x in ocr)
    assert results["lora"]["ocr/ocr/swapped"] == pytest.approx(sum(swapped) / len(swapped), abs=1e-6)
    # prompt sensitivity: the base is its own reference; the adapter moves pixels far more between prompts
    assert results["base"]["ocr/sensitivity"] == 1.0
    assert results["lora"]["ocr/sensitivity"] == pytest.approx(
        results["lora"]["ocr/sensitivity/raw"] / results["base"]["ocr/sensitivity/raw"])
    md = (tmp_path / "results.md").read_text()
    assert re.search(r"\| base \| 4\.5 \| \d\.\d{3} \[\d\.\d\d, \d\.\d\d\] \|", md)  # value [95 % interval]
    for text in ("## Controls", "| lora, swapped prompts |", "| cover image |", "1,000 resamples"):
        assert text in md, text
    for f in ("results.md", "scores.png", "grids/base_geneval.png", "grids/lora_ocr.png", "grids/cover_ocr.png",
              "grids/cover_geneval.png", "grids/cover_aesthetic.png"):
        assert (tmp_path / f).is_file()
    # side by side: 6 images (rows: 3 prompts × 2) × 2 checkpoints (columns), each cell the image that checkpoint drew
    from PIL import Image
    single = Image.open(tmp_path / "grids/base_ocr.png")  # 6 cells in one row
    compare = Image.open(tmp_path / "grids/compare_ocr.png")
    cell_w = (single.width - 4) // 6
    cell_h = (compare.height - 4) // 6  # each grid's caption band fits its own longest caption
    assert (compare.width - 4) // cell_w == 2 and (compare.height - 4) % 6 == 0
    drawn = np.asarray(Image.open(tmp_path / "images/lora/ocr/00001.png").convert("RGB"))
    scale = (cell_w - 4) // drawn.shape[1]
    x, y = 4 + cell_w, 4 + cell_h  # row 2 (the first prompt's second image), column 2 (lora)
    cell = np.asarray(compare.convert("RGB"))[y:y + drawn.shape[0] * scale:scale, x:x + drawn.shape[1] * scale:scale]
    assert np.array_equal(cell, drawn)
    # the adapter changes the images: same prompt and seed, different pixels
    a = np.asarray(Image.open(tmp_path / "images/base/ocr/00000.png"), dtype=np.float32)
    b = np.asarray(Image.open(tmp_path / "images/lora/ocr/00000.png"), dtype=np.float32)
    assert np.abs(a - b).max() > 10
    # without the base among the checkpoints, its sensitivity is still measured (adapter off): same ratio
    alone = run_eval(cfg_factory, toy_dirs, ["~checkpoints", f"+checkpoints.lora={toy_dirs / 'lora'}",
                                             "images_per_prompt=1", "controls.cover=null", "controls.swapped=false",
                                             f"output_dir={tmp_path / 'alone'}"])
    assert set(alone) == {"lora"} and "ocr/ocr/swapped" not in alone["lora"]
    for task in ("geneval", "ocr", "aesthetic"):
        assert alone["lora"][f"{task}/sensitivity"] == pytest.approx(results["lora"][f"{task}/sensitivity"], rel=1e-4)


def test_missing_adapter_fails_before_sampling(cfg_factory, toy_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA adapter not found"):
        run_eval(cfg_factory, toy_dirs, [f"+checkpoints.bad={tmp_path / 'nope'}"])
    assert not (tmp_path / "images").exists()


def test_empty_prompt_file_is_named(cfg_factory, toy_dirs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="empty.jsonl is empty"):
        run_eval(cfg_factory, toy_dirs, [f"+eval_tasks.ocr.prompts.path={empty}"])
