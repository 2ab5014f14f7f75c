"""scripts/mini_table1.py: rows from chained runs and from an earlier table, gain shares, minutes."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mini_table1.py"
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
