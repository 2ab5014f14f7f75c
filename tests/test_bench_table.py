"""opd.results.bench_table: ratios within each bench run, the markdown table and the plot."""
import json

import pytest

from opd.results.bench_table import main, markdown, rows


def fig(tps, **extra):
    return {"batch": 12, "trajectories_per_second": tps, "rollout_seconds": 1.0, "targets_seconds": 2.0,
            "train_seconds": 3.0, "peak_memory_gib": 40.0, "mfu": 0.25, **extra}


LEVERS_RUN = {"ours": fig(1.2, levers=[]), "reference_style": fig(0.6),
              "batch_sweep": [fig(1.0, batch=6), fig(1.3, batch=24)],
              "levers": {"merge_teacher": fig(1.5), "fp8": {"skipped": "no FP8 GPU"}}}
CONFIG_RUN = {"ours": fig(2.4, levers=["--compile", "--merge-teacher"], mfu=None), "reference_style": fig(0.5)}


def test_ratios_are_taken_within_each_run():
    table = {(r["run"], r["what"]): r for r in rows({"a.json": LEVERS_RUN, "b.json": CONFIG_RUN})}
    assert table["a.json", "merge_teacher"]["speedup_vs_plain"] == pytest.approx(1.5 / 1.2)
    assert table["a.json", "merge_teacher"]["speedup_vs_reference"] == pytest.approx(1.5 / 0.6)
    assert table["a.json", "plain module, batch 24"]["speedup_vs_plain"] == pytest.approx(1.3 / 1.2)
    config = table["b.json", "configuration: --compile --merge-teacher (batch 12)"]
    assert config["speedup_vs_reference"] == pytest.approx(2.4 / 0.5) and config["speedup_vs_plain"] is None
    assert table["a.json", "fp8"]["note"] == "no FP8 GPU"
    text = markdown(table.values())
    assert "| a.json | merge_teacher | 1.500 | 1.25 | 2.50 | 1.00 / 2.00 / 3.00 | 40.0 | 25.0 % |" in text
    assert "| b.json | configuration: --compile --merge-teacher (batch 12) | 2.400 | – | 4.80 |" in text


def test_a_run_cut_short_shows_what_it_measured_and_no_ratio_from_another_run():
    cut = {"ours": fig(2.4, levers=["--compile", "--cfg-free"], mfu=None)}  # cut before its reference loop
    table = rows({"a.json": LEVERS_RUN, "cut.json": cut, "none.json": {"matmul_peak_tflops": 790.0}})
    mine = [r for r in table if r["run"] == "cut.json"]
    assert len(mine) == 1 and mine[0]["speedup_vs_reference"] is None and mine[0]["trajectories_per_second"] == 2.4
    assert not [r for r in table if r["run"] == "none.json"]
    assert "| cut.json | configuration: --compile --cfg-free (batch 12) | 2.400 | – | – |" in markdown(table)


def test_cli_writes_the_plot_and_names_a_missing_file(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(LEVERS_RUN))
    b.write_text(json.dumps(CONFIG_RUN))
    main([str(a), str(b), "--plot", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "merge_teacher" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json")])
    assert "no bench JSON at" in capsys.readouterr().err
