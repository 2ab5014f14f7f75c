"""Choosing a snapshot by a rule fixed in advance (opd.evaluation.choose)."""
import json
import math

import pytest

from opd.evaluation.choose import choose, depth_in_band, load_candidates, main

METRICS = ["geneval/geneval_mini_correct", "ocr/ocr_exact"]


def test_depth_is_the_worst_distance_to_a_band_edge():
    assert depth_in_band({METRICS[0]: 0.3, METRICS[1]: 0.6}, METRICS, 0.2, 0.7) == pytest.approx(0.1)
    assert depth_in_band({METRICS[0]: 0.45, METRICS[1]: 0.45}, METRICS, 0.2, 0.7) == pytest.approx(0.25)
    assert depth_in_band({METRICS[0]: 0.1, METRICS[1]: 0.45}, METRICS, 0.2, 0.7) == pytest.approx(-0.1)
    assert depth_in_band({METRICS[0]: 0.9, METRICS[1]: 0.45}, METRICS, 0.2, 0.7) == pytest.approx(-0.2)
    assert depth_in_band({METRICS[0]: 0.3}, METRICS, 0.2, 0.7) == -math.inf
    assert depth_in_band({METRICS[0]: 0.3, METRICS[1]: math.nan}, METRICS, 0.2, 0.7) == -math.inf


def test_the_deepest_snapshot_wins_and_a_tie_goes_to_the_later_one():
    runs = {"step_010000": {METRICS[0]: 0.05, METRICS[1]: 0.40},   # -0.15
            "step_012000": {METRICS[0]: 0.25, METRICS[1]: 0.68},   # +0.02
            "step_013000": {METRICS[0]: 0.35, METRICS[1]: 0.60},   # +0.10
            "step_014000": {METRICS[0]: 0.40, METRICS[1]: 0.60}}   # +0.10 (tie, later)
    assert choose(runs, METRICS, 0.2, 0.7) == ("step_014000", pytest.approx(0.1))
    outside = {"a": {METRICS[0]: 0.0, METRICS[1]: 0.9}, "b": {METRICS[0]: 0.1, METRICS[1]: 0.8}}
    assert choose(outside, METRICS, 0.2, 0.7) == ("b", pytest.approx(-0.1))
    with pytest.raises(ValueError, match="no candidates"):
        choose({}, METRICS, 0.2, 0.7)


def test_the_command_reads_results_files_and_names_bad_ones(tmp_path, capsys):
    paths = []
    for step, (g, o) in {"step_001000": (0.1, 0.3), "step_002000": (0.3, 0.5)}.items():
        (tmp_path / step).mkdir()
        path = tmp_path / step / "results.json"
        path.write_text(json.dumps({"base": {METRICS[0]: g, METRICS[1]: o}, "cover": {METRICS[0]: 0.0}}))
        paths.append(str(path))
    out = tmp_path / "choice.json"
    choice = main([*paths, "--metrics", *METRICS, "--json", str(out)])
    assert choice["chosen"] == "step_002000" and json.loads(out.read_text())["chosen"] == "step_002000"
    assert "step_002000" in capsys.readouterr().out.splitlines()[2] and "chosen" in choice.__repr__()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_candidates([tmp_path / "missing" / "results.json"])
    with pytest.raises(KeyError, match="no row 'student'"):
        load_candidates([tmp_path / "step_001000" / "results.json"], row="student")
