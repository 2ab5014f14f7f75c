"""The scripts that turn runs into shipped results: mini_table1.py (rows from chained runs and from an
earlier table, gain shares, minutes) and ship_adapter.py (the fp16 copy of an adapter)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "mini_table1.py"
KEYS = ("geneval/geneval_mini_correct", "ocr/ocr_exact", "aesthetic/aesthetic_mini", "geneval/geneval_mini", "ocr/ocr")


def scores(geneval, ocr, aesthetic):
    return dict(zip(KEYS, (geneval, ocr, aesthetic, geneval, ocr), strict=True))


def fake_run(root: Path, name: str, minutes: list[float], evaluated: dict | None = None) -> None:
    run = root / name
    (run / "csv" / "version_0").mkdir(parents=True)
    rows = "\n".join(f"{m},{0.1 * i}" for i, m in enumerate(minutes))
    (run / "csv" / "version_0" / "metrics.csv").write_text("time/minutes,teacher/ocr/ocr\n" + rows + "\n")
    if evaluated is not None:
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps({name: evaluated}))


def test_table_chains_stages_carries_earlier_rows_and_computes_gain_shares(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"base": scores(0.2, 0.6, 0.4)}))
    previous = tmp_path / "round1"
    previous.mkdir()
    teachers = {"teacher_geneval": scores(0.6, 0.0, 0.3), "teacher_ocr": scores(0.0, 0.8, 0.1),
                "teacher_aesthetic": scores(0.0, 0.1, 0.9)}
    (previous / "results.json").write_text(json.dumps(teachers))
    (previous / "runs.json").write_text(json.dumps({k: {"minutes": m, "cumulative_minutes": m, "label": f"old {k}",
                                                        "cfg": 1.0} for k, m in zip(teachers, (10.0, 5.0, 4.0))}))
    runs = tmp_path / "runs"
    fake_run(runs, "mopd_a", [1.0, 2.0])
    fake_run(runs, "mopd_a2", [0.5, 1.5], scores(0.5, 0.78, 0.65))  # continues mopd_a: 2 + 1.5 minutes
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(SCRIPT), "--runs", str(runs), "--out", str(out), "--base", str(base),
                    "--previous", str(previous), "--stages", json.dumps({"mopd": ["mopd_a", "mopd_a2"]})],
                   check=True, capture_output=True)
    results, table = json.loads((out / "runs.json").read_text()), (out / "results.md").read_text()
    assert results["mopd"]["stages"] == ["mopd_a", "mopd_a2"]
    assert results["mopd"]["minutes"] == 3.5
    assert results["mopd"]["cumulative_minutes"] == 3.5 + 10.0 + 5.0 + 4.0
    assert results["teacher_ocr"]["table"] == str(previous)
    assert "| old teacher_ocr ¹ | 1.0 | 0.000 | 0.800 |" in table
    # shares of each gain: geneval (0.5-0.2)/(0.6-0.2), ocr (0.78-0.6)/(0.8-0.6), aesthetic (0.65-0.4)/(0.9-0.4)
    assert "**MOPD student** (3 teachers): geneval 75%, ocr 90%, aesthetic 50%" in table
    assert "sopd_ocr" not in results  # no evaluation anywhere: left out
    assert (out / "curves.png").stat().st_size > 0


def test_shipped_fp16_adapter_keeps_keys_and_metadata_and_the_velocity(tmp_path):
    from safetensors import safe_open

    from opd.models.lora import add_lora, lora_parameters, save_lora
    from test_models import toy

    spec = importlib.util.spec_from_file_location("ship_adapter", SCRIPTS / "ship_adapter.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    base = toy(seed=3)
    base.save_pretrained(tmp_path / "base", dtype=torch.float32)
    add_lora(base.transformer, "s", rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(base.transformer, "s"):
            p.add_(0.2 * torch.randn_like(p))
    source = save_lora(base.transformer, "s", tmp_path / "fp32")
    copy = ship.to_fp16(source, tmp_path / "fp16")
    with safe_open(str(source), framework="pt") as a, safe_open(str(copy), framework="pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        for k in a.keys():  # noqa: SIM118 (safe_open is not iterable)
            assert b.get_tensor(k).dtype == torch.float16
            torch.testing.assert_close(b.get_tensor(k).float(), a.get_tensor(k), rtol=1e-3, atol=1e-4)
    gaps = ship.velocity_gaps(tmp_path / "base", source, copy, ["a red circle", 'a sign that says "CAT"'])
    assert gaps["adapter_vs_base"] > 1e-2  # the adapter changes the velocity ...
    assert 0 < gaps["fp16_vs_fp32"] < 1e-2 * gaps["adapter_vs_base"]  # ... far more than rounding does


def test_moving_average_trailing_and_centred_by_hand():
    sys.path.insert(0, str(SCRIPTS))
    from mini_table1 import moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]  # each value with the one before
    assert moving_average([1.0, 2.0, 3.0, 4.0], 3, centred=True) == [1.5, 2.0, 3.0, 3.5]  # with both neighbours
    assert moving_average([1.0, 5.0], 1) == [1.0, 5.0]
