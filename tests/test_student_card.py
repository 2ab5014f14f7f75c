"""The student's model card: its numbers come from the run's own evaluation, the table's rows and the
evaluations' samples, as written by hand here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.results import student_card
from test_gain_share import write_samples

COLS = {"OCR": "ocr/s"}
OWN = {"ocr": "ocr/s"}


def test_card_puts_each_number_where_it_belongs():
    text = student_card.card(
        "mopd_seed0", "python -m opd.train seed=0", {"rounds": 300.0, "images_sampled": 14400.0, "model_tflop": 2176.2},
        6.24, "one H100", {"fp16_vs_fp32": 1.27e-4, "adapter_vs_base": 2.12}, Path("models/s"), 1.0,
        {"ocr/s": 0.6, "ocr/s/ci_low": 0.55, "ocr/s/ci_high": 0.65}, 4.5, {"ocr": {"ocr/s": 0.8}},
        {"ocr/s": 0.78, "ocr/s/ci_low": 0.7, "ocr/s/ci_high": 0.85},
        {"gain_share/ocr": 0.9, "gain_share/ocr/ci_low": 0.8, "gain_share/ocr/ci_high": float("inf")},
        {"num_seeds": 3, "ocr/s": 0.77, "ocr/s/ci_low": 0.7, "ocr/s/ci_high": 0.84, "normalised_gain": 0.85,
         "gain_share/ocr": 0.85}, COLS, OWN, reproduce="python -m opd.results.student_card ...")
    assert text.startswith("# mini MOPD student") and "Sample it at **CFG 1**" in text
    assert "300 rounds, 14,400 sampled images, 2,176 model TFLOP, 6.2 min wall-clock" in text
    assert "fp32 weights is 1.3e-04, against 2.12" in text
    assert "| OCR | 0.600 [0.55, 0.65] | 0.800 | 0.780 [0.70, 0.85] | 90 % [80, ∞] |" in text
    assert "## The table row over its 3 training seeds" in text and "| 0.770 [0.70, 0.84] | 0.850 |" in text
    assert "ocr 85 %." in text and "`python -m opd.results.student_card ...`" in text
    # the prompt-blind controls: its images against swapped prompts, prompt sensitivity, the cover image
    controlled = student_card.card("r", "c", {}, 1.0, "", {"fp16_vs_fp32": 0.0, "adapter_vs_base": 1.0}, Path("d"),
                                   1.0, {"ocr/s": 0.6}, 4.5, {}, {"ocr/s": 0.7, "ocr/s/swapped": 0.02,
                                                                  "ocr/sensitivity": 1.1}, {}, {}, COLS, OWN,
                                   cover={"ocr/s": 0.01})
    assert "| OCR | 0.020 | 1.10 | 0.010 |" in controlled
    one_seed = student_card.card("r", "c", {}, 1.0, "", {"fp16_vs_fp32": 0.0, "adapter_vs_base": 1.0}, Path("d"), 1.0,
                                 {"ocr/s": 0.6}, 4.5, {}, {"ocr/s": 0.7}, {}, {"num_seeds": 1}, COLS, OWN)
    assert "over its" not in one_seed and "| OCR | 0.600 | – | 0.700 | – |" in one_seed


def test_main_ships_the_run_and_writes_its_card(tmp_path, monkeypatch):
    runs, table, base = tmp_path / "runs", tmp_path / "table", tmp_path / "base"
    for name, value in (("teacher_ocr", 1.0), ("mopd_seed0", 0.5)):
        evaluation = runs / name / "eval"
        write_samples(evaluation / "samples.jsonl", name, "ocr", [(p, value) for p in range(3)], key="ocr_exact")
        (evaluation / "results.json").write_text(json.dumps({name: {"ocr/ocr_exact": value}}))
    write_samples(base / "samples.jsonl", "base", "ocr", [(p, 0.0) for p in range(3)], key="ocr_exact")
    (base / "results.json").write_text(json.dumps({"base": {"ocr/ocr_exact": 0.0}}))
    (runs / "mopd_seed0" / "adapter").mkdir()
    (runs / "mopd_seed0" / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    table.mkdir()
    (table / "results.json").write_text(json.dumps({"teacher_ocr": {"ocr/ocr_exact": 1.0},
                                                    "mopd": {"ocr/ocr_exact": 0.5, "num_seeds": 1}}))
    (table / "runs.json").write_text(json.dumps({"mopd": {"device": "one H100"}}))
    shipped = []
    monkeypatch.setattr(student_card, "to_fp16", lambda source, dest: shipped.append((source, dest)) or dest)
    monkeypatch.setattr(student_card, "velocity_gaps", lambda *a: {"fp16_vs_fp32": 1e-4, "adapter_vs_base": 2.0})
    text = student_card.main(["--runs", str(runs), "--table", str(table), "--run", "mopd_seed0",
                              "--dest", str(tmp_path / "ship"), "--base", str(base / "results.json"), "--suite", "mini"])
    assert shipped == [(runs / "mopd_seed0" / "adapter" / "pytorch_lora_weights.safetensors", tmp_path / "ship")]
    assert (tmp_path / "ship" / "README.md").read_text() == text
    # OCR: base 0, teacher 1, student 0.5 on every prompt -> 50 % with no prompt noise
    assert "| OCR | 0.000 | 1.000 | 0.500 | 50 % [50, 50] (1 image a prompt) |" in text and "**Device**: one H100" in text
    # a records folder keeps no adapter: the card is written again from shipped.json, the weights left alone
    assert json.loads((tmp_path / "ship" / "shipped.json").read_text())["gaps"] == {"fp16_vs_fp32": 1e-4,
                                                                                    "adapter_vs_base": 2.0}
    (runs / "mopd_seed0" / "adapter" / "pytorch_lora_weights.safetensors").unlink()
    (runs / "mopd_seed0" / "adapter").rmdir()
    again = student_card.main(["--runs", str(runs), "--table", str(table), "--run", "mopd_seed0",
                               "--dest", str(tmp_path / "ship"), "--base", str(base / "results.json")])
    assert again == text and len(shipped) == 1
    with pytest.raises(SystemExit, match="no adapter to ship"):
        student_card.main(["--runs", str(runs), "--table", str(table), "--run", "mopd_seed0",
                           "--dest", str(tmp_path / "elsewhere"), "--base", str(base / "results.json")])
    with pytest.raises(SystemExit, match="no row 'sopd'"):
        student_card.main(["--runs", str(runs), "--table", str(table), "--run", "mopd_seed0", "--row", "sopd",
                           "--dest", str(tmp_path / "ship"), "--base", str(base / "results.json")])
