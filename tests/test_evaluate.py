"""`python -m opd.evaluate` end to end on a toy mini model: report files, metrics, adapters."""
import json

import numpy as np
import pytest

from opd.evaluate import evaluate
from test_models import toy_base_and_adapter


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    return toy_base_and_adapter(tmp_path_factory.mktemp("toy"), seed=3)


def run_eval(cfg_factory, toy_dirs, extra=()):
    cfg = cfg_factory("eval", [f"model.path={toy_dirs / 'base'}", "model.image_size=16", "max_prompts=3",
                               "num_steps=2", "device=cpu", "batch_size=4", *extra])
    return evaluate(cfg)


def test_report_files_and_metrics(cfg_factory, toy_dirs, tmp_path):
    results = run_eval(cfg_factory, toy_dirs, [f"+checkpoints.lora={toy_dirs / 'lora'}"])
    assert set(results) == {"base", "lora"}
    for key in ("geneval/geneval_mini_correct", "ocr/ocr_exact", "ocr/ocr", "aesthetic/aesthetic_mini"):
        assert 0.0 <= results["base"][key] <= 1.0
    assert any(k.startswith("geneval/geneval_mini_correct/") for k in results["base"])  # per-tag accuracies
    written = json.loads((tmp_path / "results.json").read_text())
    assert {c: pytest.approx(m) for c, m in written.items()} == results
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 3 * 3
    assert all((tmp_path / line["image"]).is_file() for line in lines)
    # the mean of the per-image scores is the reported metric (the report adds up what it shows)
    ocr = [x["scores"]["ocr_exact"] for x in lines if x["checkpoint"] == "lora" and x["task"] == "ocr"]
    assert results["lora"]["ocr/ocr_exact"] == pytest.approx(sum(ocr) / len(ocr), abs=1e-6)
    for f in ("results.md", "scores.png", "grids/base_geneval.png", "grids/lora_ocr.png"):
        assert (tmp_path / f).is_file()
    # side by side: 3 prompts (rows) × 2 checkpoints (columns), each cell the image that checkpoint drew
    from PIL import Image
    single = Image.open(tmp_path / "grids/base_ocr.png")  # 3 cells in one row
    compare = Image.open(tmp_path / "grids/compare_ocr.png")
    cell_w, cell_h = (single.width - 4) // 3, single.height - 4
    assert (compare.width - 4) // cell_w == 2 and (compare.height - 4) // cell_h == 3
    drawn = np.asarray(Image.open(tmp_path / "images/lora/ocr/00001.png").convert("RGB"))
    scale = (cell_w - 4) // drawn.shape[1]
    x, y = 4 + cell_w, 4 + cell_h  # row 2 (the second prompt), column 2 (lora)
    cell = np.asarray(compare.convert("RGB"))[y:y + drawn.shape[0] * scale:scale, x:x + drawn.shape[1] * scale:scale]
    assert np.array_equal(cell, drawn)
    # the adapter changes the images: same prompt and seed, different pixels
    a = np.asarray(Image.open(tmp_path / "images/base/ocr/00000.png"), dtype=np.float32)
    b = np.asarray(Image.open(tmp_path / "images/lora/ocr/00000.png"), dtype=np.float32)
    assert np.abs(a - b).max() > 10


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
