"""opd.results: the commands that turn runs into shipped results, on hand-built run folders
(CSV logs, results.json, .hydra records) whose expected numbers are worked out by hand below."""
import gzip
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from opd.results import (
    compare,
    logs,
    metrics,
    over_seeds,
    pack,
    pick_base,
    pick_teachers,
    table1,
    teacher_cards,
)

ROOT = Path(__file__).resolve().parents[1]
G, O, X, A = "geneval/geneval_mini_correct", "ocr/ocr", "ocr/ocr_exact", "aesthetic/aesthetic_mini"
SUITE = """\
defaults:
  - _self_
geneval:
  prompts: {_target_: x.load, task: geneval}
  rewards: {geneval_mini: {_target_: x.GenEvalMini}}
  table: {GenEval: geneval_mini_correct}
ocr:
  prompts: {_target_: x.load, path: "${paths.data_dir}/ocr.txt"}
  rewards: {ocr: {_target_: x.OCR}}
  table: {OCR: ocr}
aesthetic:
  rewards: {aesthetic_mini: {_target_: x.Aesthetic}}
  table: {Aesthetic: aesthetic_mini}
"""


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """A conf/ folder whose mini suite's headlines are GenEval strict, OCR edit accuracy (``ocr``,
    not ``ocr_exact``) and aesthetic; opd.results reads it instead of the checkout's."""
    folder = tmp_path / "conf"
    (folder / "eval_tasks").mkdir(parents=True)
    (folder / "eval_tasks" / "mini.yaml").write_text(SUITE)
    monkeypatch.setattr(metrics, "CONF_DIR", folder)
    return folder


def scores(geneval, ocr, exact, aesthetic):
    return {G: geneval, O: ocr, X: exact, A: aesthetic, "geneval/geneval_mini_correct/ci_low": 0.0}


def write_log(run: Path, rows: list[dict], version: int = 0) -> None:
    folder = run / "csv" / f"version_{version}"
    folder.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def write_eval(folder: Path, rows: dict, guidance: dict | None = None, overrides: list[str] | None = None) -> Path:
    """``<folder>/results.json`` (+ a cover row) and the .hydra record of the evaluation."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({**rows, "cover": {G: 0.9}}))
    checkpoints = {name: ({"adapter": f"{name}/adapter", "guidance_scale": guidance[name]}
                          if guidance and name in guidance else f"{name}/adapter") for name in rows}
    config = {"guidance_scale": "${sampler.guidance_scale}", "sampler": {"guidance_scale": 4.5},
              "checkpoints": checkpoints, "output_dir": "${hydra:runtime.output_dir}"}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "results.json"


def write_overrides(run: Path, overrides: list[str]) -> None:
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


# ---- metrics -------------------------------------------------------------------------------------

def test_headlines_come_from_the_suites_table_entries(conf):
    assert metrics.headline_keys() == {"geneval": {"GenEval": G}, "ocr": {"OCR": O}, "aesthetic": {"Aesthetic": A}}
    assert metrics.own_metrics() == {"geneval": G, "ocr": O, "aesthetic": A}
    assert metrics.reward_names() == {"geneval": ["geneval_mini"], "ocr": ["ocr"], "aesthetic": ["aesthetic_mini"]}
    (conf / "eval_tasks" / "two.yaml").write_text(
        "a: {table: {Score: r_x, Other: r_y}}\nb: {table: {Score: s}}\nc: {rewards: {q: {}}}\n")
    assert metrics.columns("two") == {"Score (a)": "a/r_x", "Other": "a/r_y", "Score (b)": "b/s"}
    assert metrics.own_metrics("two") == {"a": "a/r_x", "b": "b/s"}  # c has no table
    assert metrics.reward_names("two") == {"a": ["r_x", "r_y"], "b": ["s"], "c": ["q"]}
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        metrics.headline_keys("nope")


def test_the_checkouts_suites_give_task_slash_table_key():
    for suite in ("mini", "sd35"):
        raw = yaml.safe_load((ROOT / "conf" / "eval_tasks" / f"{suite}.yaml").read_text())
        expected = {task: {title: f"{task}/{key}" for title, key in node["table"].items()}
                    for task, node in raw.items() if isinstance(node, dict) and node.get("table")}
        assert metrics.headline_keys(suite) == expected and expected


def test_guidance_scales_read_the_evaluations_hydra_record(tmp_path):
    results = write_eval(tmp_path / "eval", {"a": {}, "b": {}}, guidance={"b": 1.0})
    assert metrics.guidance_scales(results) == {"a": 4.5, "b": 1.0}  # a: the resolved default
    assert metrics.evaluated_rows(results) == {"a": {}, "b": {}}  # the cover row left out
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "results.json").write_text("{}")
    assert metrics.guidance_scales(tmp_path / "bare" / "results.json") == {}
    with pytest.raises(FileNotFoundError, match="opd.evaluate"):
        metrics.evaluated_rows(tmp_path / "missing" / "results.json")


# ---- logs ----------------------------------------------------------------------------------------

def test_training_logs_read_every_version_in_order_and_chain_stages(tmp_path):
    write_log(tmp_path / "a", [{"step": 0, "time/minutes": 1.0, "r": 0.1}, {"step": 1, "time/minutes": 2.0}])
    write_log(tmp_path / "b", [{"step": 0, "time/minutes": 0.5, "r": 0.2}])
    write_log(tmp_path / "b", [{"step": 2, "time/minutes": 1.25, "r": 0.3}], version=1)
    write_log(tmp_path / "b", [{"step": 3, "time/minutes": 1.5, "r": 0.4}], version=10)  # after 1, not before
    rows, minutes = logs.training_log(tmp_path / "b")
    assert [r["r"] for r in rows] == ["0.2", "0.3", "0.4"] and minutes == 1.5
    assert logs.training_log(tmp_path / "nothing") == ([], 0.0)
    chained, total = logs.chained_log(tmp_path, ["a", "b"])  # b's minutes start where a's end (2.0)
    assert [float(r["time/minutes"]) for r in chained] == [1.0, 2.0, 2.5, 3.25, 3.5] and total == 3.5
    # compute totals (each run counts from 0) add up along a chain; other columns are left as logged
    write_log(tmp_path / "c", [{"step": 0, "compute/model_tflop": 2.0, "train/round": 1, "r": 0.5},
                               {"step": 1, "compute/model_tflop": 4.0, "train/round": 2}])
    write_log(tmp_path / "d", [{"step": 0, "compute/model_tflop": 1.5, "train/round": 1, "r": 0.6}])
    chained, _ = logs.chained_log(tmp_path, ["c", "d"])
    assert [float(r["compute/model_tflop"]) for r in chained] == [2.0, 4.0, 5.5]
    assert [float(r["train/round"]) for r in chained] == [1, 2, 3] and [r["r"] for r in chained] == ["0.5", "", "0.6"]
    assert [float(r["compute/model_tflop"]) for r in logs.chained_log(tmp_path, ["c/step_000001", "d"])[0]] == [2.0, 3.5]


def test_a_run_started_from_another_runs_adapter_chains_to_it_and_counts_its_compute(tmp_path):
    from opd.results import compute

    def command(run, *overrides):
        (tmp_path / run / ".hydra").mkdir(parents=True, exist_ok=True)
        (tmp_path / run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))

    write_log(tmp_path / "cfgd", [{"step": 0, "compute/model_tflop": 1.0}, {"step": 1, "compute/model_tflop": 3.0}])
    write_log(tmp_path / "nft", [{"step": 0, "compute/model_tflop": 10.0}, {"step": 1, "compute/model_tflop": 20.0},
                                 {"step": 2, "compute/model_tflop": 30.0}])
    write_log(tmp_path / "late", [{"step": 0, "compute/model_tflop": 100.0}])
    command("cfgd", "experiment=mini/sopd_geneval")  # from the base: the chain's start
    command("nft", "seed=0", "module.init_adapter=/elsewhere/runs/mini/cfgd/adapter")  # matched by name under the root
    command("late", "+module.init_adapter=runs/mini/nft/exports/step_000002")  # from an EMA snapshot of nft
    assert logs.started_from(tmp_path, "cfgd") is None and logs.started_from(tmp_path, "nft/step_000001") == "cfgd"
    assert logs.stages_of(tmp_path, "late") == ["cfgd", "nft/step_000002", "late"]
    # the compute of the whole training: 3 (cfgd) + 20 (nft's first 2 rounds) + 100
    assert compute.main([str(tmp_path / "late")]) == 123.0
    assert compute.main([str(tmp_path / "nft" / "step_000001")]) == 3.0 + 10.0
    assert compute.main([str(tmp_path / "cfgd")]) == 3.0
    command("cfgd", "module.init_adapter=models/mini_teachers/geneval")  # an adapter that is no run here: the end
    assert logs.stages_of(tmp_path, "nft") == ["cfgd", "nft"]
    command("cfgd", "module.init_adapter=x/late/adapter")  # a circle is an error naming the runs
    with pytest.raises(ValueError, match="late, cfgd, nft start from one another in a circle"):
        logs.stages_of(tmp_path, "nft")


def test_logged_values_by_step_a_resumed_runs_later_value_winning(tmp_path):
    write_log(tmp_path / "a", [{"step": 0, "kl": 0.4}, {"step": 1, "kl": 0.3}, {"step": 2, "kl": ""}])
    write_log(tmp_path / "a", [{"step": 1, "kl": 0.25}, {"step": 2, "kl": 0.2}], version=1)
    assert logs.logged(tmp_path / "a", "kl") == [(0, 0.4), (1, 0.25), (2, 0.2)]
    with pytest.raises(ValueError, match="logger=csv"):
        logs.logged(tmp_path / "a", "teacher/ocr/kl")


def test_moving_average_trailing_and_centred_by_hand():
    assert logs.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]  # each with the one before
    assert logs.moving_average([1.0, 2.0, 3.0, 4.0], 3, centred=True) == [1.5, 2.0, 3.0, 3.5]  # both neighbours
    assert logs.moving_average([1.0, 5.0], 1) == [1.0, 5.0]


def test_run_command_from_the_hydra_overrides_without_hydra_ones(tmp_path):
    write_overrides(tmp_path / "r", ["experiment=mini/sopd_ocr", "hydra.run.dir=/x", "hydra/launcher=local",
                                     "trainer.max_time=00:00:04:30"])
    assert logs.run_command(tmp_path / "r") == "python -m opd.train experiment=mini/sopd_ocr trainer.max_time=00:00:04:30"
    # a run resumed in time slices by a make chain: the scheduling overrides go, a repeated key keeps its last value
    write_overrides(tmp_path / "s", ["trainer.max_steps=1000000", "experiment=mini/teacher_geneval", "trainer.max_steps=500",
                                     "ckpt_path=last", "callbacks.time_slice.minutes=7.6", "+reward.ocr.num_workers=4"])
    assert logs.run_command(tmp_path / "s") == ("python -m opd.train experiment=mini/teacher_geneval trainer.max_steps=500 "
                                                "+reward.ocr.num_workers=4")
    assert logs.run_command(tmp_path / "none") == ""


# ---- table1 --------------------------------------------------------------------------------------

def test_table_rows_name_teachers_winners_stages_and_extra_rows():
    rows = table1.table_rows({"ocr": {"winner": "ocr_nft"}}, ["geneval", "ocr"],
                             stages={"mopd": ["m1", "m2"], "teacher_ocr": ["ocr_first"]},
                             extra={"mopd_sum": {"label": "summed"}})
    assert list(rows)[:3] == ["base", "teacher_geneval", "teacher_ocr"]
    assert rows["teacher_ocr"] == {"label": "ocr teacher (ocr_nft)", "run": "teacher_ocr",
                                   "stages": ["ocr_first", "ocr_nft"]}
    assert rows["teacher_geneval"]["stages"] == ["teacher_geneval"]  # not picked here
    assert rows["mopd"]["run"] == "m2" and rows["mopd"]["stages"] == ["m1", "m2"]
    assert rows["sopd_ocr"]["run"] == "sopd_ocr" and rows["sopd_ocr"]["teachers"] == ["ocr"]
    assert rows["mopd_sum"] == {"run": "mopd_sum", "stages": ["mopd_sum"], "label": "summed",
                                "teachers": ["geneval", "ocr"]}
    assert rows["cascade_rl"]["run"] == "cascade_geneval"


def test_gain_share_by_hand():
    own = {"geneval": G, "ocr": O}
    results = {"base": scores(0.2, 0.6, 0.5, 0.4), "teacher_geneval": scores(0.6, 0.0, 0.0, 0.3),
               "teacher_ocr": scores(0.0, 0.6, 0.9, 0.1), "s": scores(0.5, 0.7, 0.2, 0.0)}
    share = table1.gain_share(results, "s", ["geneval", "ocr", "aesthetic"], {**own, "aesthetic": A})
    assert share["geneval"] == pytest.approx((0.5 - 0.2) / (0.6 - 0.2))  # 0.75
    assert math.isnan(share["ocr"])  # the OCR teacher gained nothing on ocr/ocr (its ocr_exact does not count)
    assert "aesthetic" not in share  # no aesthetic teacher row
    assert table1.gain_share(results, "missing", ["geneval"], own) == {}
    rows = {"base": {"label": "base"}, "s": {"label": "student", "teachers": ["geneval", "ocr"]}}
    records = {k: {"label": r["label"], "cfg": 4.5, "minutes": 1.0, "cumulative_minutes": 2.0} for k, r in rows.items()}
    md = table1.markdown(rows, results, records, {"GenEval": G}, own)
    assert "| student | 4.5 | – | 0.500 | – | – | – | – | – | 1.0 | 2.0 |" in md  # no normalised gain given
    assert "- student: geneval 75%, ocr – (its teacher gained nothing)" in md


@pytest.fixture
def table_runs(tmp_path, conf):
    """Round-2-like runs: an earlier table (teachers, 10/5/4 min), the OCR teacher evaluated again
    as shipped (no log of its own), a two-stage MOPD student (2.0 + 1.5 min) and its first stage."""
    base = write_eval(tmp_path / "base", {"base": scores(0.2, 0.6, 0.5, 0.4)})
    previous = tmp_path / "round1"
    previous.mkdir()
    teachers = {"teacher_geneval": scores(0.6, 0.0, 0.0, 0.3), "teacher_ocr": scores(0.0, 0.8, 0.3, 0.1),
                "teacher_aesthetic": scores(0.0, 0.1, 0.1, 0.9)}
    (previous / "results.json").write_text(json.dumps(teachers))
    (previous / "runs.json").write_text(json.dumps(
        {k: {"minutes": m, "cumulative_minutes": m, "label": f"old {k}", "cfg": 1.0, "command": f"train {k}"}
         for k, m in zip(teachers, (10.0, 5.0, 4.0))}))
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "picked.json").write_text(json.dumps({"ocr": {"winner": "ocr_shipped"}}))
    write_eval(runs / "teacher_ocr" / "eval", {"teacher_ocr": scores(0.0, 0.84, 0.3, 0.1)}, guidance={"teacher_ocr": 1.0})
    write_log(runs / "mopd_a", [{"step": 0, "time/minutes": 1.0, "teacher/ocr/ocr": 0.5, "compute/model_tflop": 1.0},
                                {"step": 1, "time/minutes": 2.0, "teacher/ocr/ocr": 0.6, "compute/model_tflop": 2.0}])
    write_overrides(runs / "mopd_a", ["experiment=mini/mopd_aesthetic_ocr_geneval", "hydra.run.dir=x"])
    write_eval(runs / "mopd_a" / "eval", {"mopd_a": scores(0.3, 0.7, 0.4, 0.5)})
    write_log(runs / "mopd_a2", [{"step": 0, "time/minutes": 0.5, "teacher/ocr/ocr": 0.7, "compute/model_tflop": 0.5},
                                 {"step": 1, "time/minutes": 1.5, "teacher/ocr/ocr": 0.8, "compute/model_tflop": 1.5}])
    write_overrides(runs / "mopd_a2", ["experiment=mini/mopd_phase2"])
    write_eval(runs / "mopd_a2" / "eval", {"mopd_a2": scores(0.5, 0.78, 0.2, 0.65)})
    return base, previous, runs


def test_collect_chains_stages_carries_earlier_rows_and_training_records(table_runs):
    base, previous, runs = table_runs
    rows = table1.table_rows({"ocr": {"winner": "ocr_shipped"}}, ["geneval", "ocr", "aesthetic"],
                             stages={"mopd": ["mopd_a", "mopd_a2"]},
                             extra={"mopd_first": {"label": "MOPD, stage 1", "stages": ["mopd_a"]}})
    results, records, curves = table1.collect(runs, rows, metrics.evaluated_rows(base)["base"], 4.5, previous, "H200")
    assert results["teacher_ocr"][O] == 0.84  # evaluated here ...
    assert records["teacher_ocr"]["minutes"] == 5.0 and records["teacher_ocr"]["training_from"] == str(previous)
    assert records["teacher_ocr"]["cfg"] == 1.0 and "table" not in records["teacher_ocr"]  # ... trained before
    assert records["teacher_geneval"]["table"] == str(previous) and records["teacher_geneval"]["label"] == "old teacher_geneval"
    assert records["mopd"]["minutes"] == 3.5  # 2.0 + 1.5
    assert records["mopd"]["cumulative_minutes"] == 22.5  # + the teachers' 10 + 5 + 4
    assert records["mopd"]["cfg"] == 4.5 and records["mopd"]["stages"] == ["mopd_a", "mopd_a2"]
    assert records["mopd"]["command"] == ("python -m opd.train experiment=mini/mopd_aesthetic_ocr_geneval ; "
                                          "python -m opd.train experiment=mini/mopd_phase2")
    assert records["mopd_first"]["minutes"] == 2.0 and records["mopd_first"]["cumulative_minutes"] == 21.0
    # compute: each stage counts from 0, so a chain's is the sum of its stages' last values (2.0 + 1.5);
    # the teachers here logged none (trained in the earlier table), so "incl. teachers" adds nothing
    assert records["mopd"]["model_tflop"] == 3.5 and records["mopd"]["cumulative_model_tflop"] == 3.5
    assert records["mopd_first"]["model_tflop"] == 2.0 and "rounds" not in records["mopd"]
    assert "sopd_ocr" not in results and "multi_reward_rl" not in results  # no evaluation anywhere
    assert list(curves) == ["mopd"]  # stage 1 is the first part of the MOPD curve
    assert [float(r["time/minutes"]) for r in curves["mopd"]] == [1.0, 2.0, 2.5, 3.5]


def test_the_table_command_writes_the_table_with_the_suites_columns(table_runs):
    base, previous, runs = table_runs
    out = runs / "table"
    md = table1.main(["--runs", str(runs), "--out", str(out), "--base", str(base), "--previous", str(previous),
                      "--stages", json.dumps({"mopd": ["mopd_a", "mopd_a2"]}), "--also", X])
    assert md == (out / "results.md").read_text()
    assert ("| model | CFG | seeds | GenEval | OCR | Aesthetic | ocr/ocr_exact | avg. share of teachers' gains | "
            "rounds | images | TFLOP (own) | TFLOP (incl. teachers) | GPU min (own) | GPU min (incl. teachers) |") in md
    assert "| base (mini_base) | 4.5 | – | 0.200 | 0.600 | 0.400 | 0.500 | – | – | – | – | – | 0.0 | 0.0 |" in md
    # the average share of the teachers' gains, by hand (own metrics G, O = ocr/ocr, A; base 0.2, 0.6, 0.4;
    # teachers 0.6, 0.84, 0.9): the geneval teacher (0.6-0.2)/0.4 = 1, (0.0-0.6)/0.24 = -2.5, (0.3-0.4)/0.5 = -0.2
    assert "| old teacher_geneval ¹ | 1.0 | – | 0.600 | 0.000 | 0.300 | 0.000 | -0.567 | – | – | – | – | 10.0 | 10.0 |" in md
    # the OCR teacher: -0.5, 1, (0.1-0.4)/0.5 = -0.6
    assert "| ocr teacher (ocr_shipped) | 1.0 | – | 0.000 | 0.840 | 0.100 | 0.300 | -0.033 | – | – | – | – | 5.0 | 5.0 |" in md
    # MOPD: 0.75, 0.75, 0.5
    assert ("| **MOPD student** (3 teachers) | 4.5 | 1 | 0.500 | 0.780 | 0.650 | 0.200 | 0.667 | – | – | 3.5 | 3.5 | "
            "3.5 | 22.5 |") in md
    # shares on the suite's own metrics: geneval (0.5-0.2)/(0.6-0.2), ocr (0.78-0.6)/(0.84-0.6) on ocr/ocr
    # (ocr_exact would be negative), aesthetic (0.65-0.4)/(0.9-0.4)
    assert "- **MOPD student** (3 teachers): geneval 75%, ocr 75%, aesthetic 50%" in md
    assert json.loads((out / "results.json").read_text())["mopd"][G] == 0.5
    assert json.loads((out / "runs.json").read_text())["mopd"]["cumulative_minutes"] == 22.5
    assert (out / "curves.png").stat().st_size > 0


def test_curves_take_a_log_tflop_axis_only_when_one_row_runs_far_longer(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    plot_line = matplotlib.axes.Axes.plot

    def spy(ax, x, y, **kwargs):
        drawn.append((list(x), list(y), kwargs.get("label")))
        return plot_line(ax, x, y, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)

    def log(last_tflop, n=10):  # an RL row logging reward/ocr every round, its compute growing evenly
        return [{table1.TFLOP: str(last_tflop * (i + 1) / n), "reward/ocr": str(0.1 * i)} for i in range(n)]

    rewards = {"ocr": ["ocr"]}
    # ends 2,000 and 9,000 TFLOP: 4.5 times, not more than LOG_X_SPAN = 5
    assert table1.plot_curves(tmp_path / "a.png", {"short": log(2000), "long": log(9000)}, rewards) == "linear"
    assert drawn[0][0] == [200.0 * (i + 1) for i in range(10)] and drawn[0][2] == "short"
    assert drawn[0][1] == pytest.approx([0.1 * i for i in range(10)])  # 10 points: a moving average of 1
    # 2,000 against 16,000 (MOPD's own compute against multi-reward RL at its total): 8 times
    assert table1.plot_curves(tmp_path / "b.png", {"short": log(2000), "long": log(16000)}, rewards) == "log"
    assert (tmp_path / "b.png").stat().st_size > 1000
    # a row whose log has a single point draws nothing and does not count
    assert table1.plot_curves(tmp_path / "c.png", {"short": log(2000), "one": log(16000, n=1)}, rewards) == "linear"


# ---- teacher cards -------------------------------------------------------------------------------

def test_teacher_cards_from_picked_candidates_logs_and_test_scores(tmp_path, conf):
    base = write_eval(tmp_path / "base", {"base": scores(0.2, 0.6, 0.5, 0.4)})
    runs = tmp_path / "runs"
    picked = {"ocr": {"winner": "ocr_nft", "metric": O, "candidates": {
        "ocr_grpo": {"score": 0.7, "guidance_scale": 4.5}, "ocr_nft": {"score": 0.8, "guidance_scale": 1.0}}}}
    runs.mkdir()
    (runs / "picked.json").write_text(json.dumps(picked))
    write_log(runs / "ocr_first", [{"step": 0, "time/minutes": 3.0, "reward/ocr": 0.5, "reward/ocr_std": 0.1}])
    write_overrides(runs / "ocr_first", ["experiment=mini/teacher_ocr_nft"])
    write_log(runs / "ocr_nft", [{"step": 0, "time/minutes": 1.0, "reward/ocr": 0.6},
                                 {"step": 1, "time/minutes": 2.5, "reward/ocr": 0.7}])
    write_overrides(runs / "ocr_nft", ["experiment=mini/teacher_ocr_nft", "++module.init_adapter=ocr_first/adapter"])
    evaluation = runs / "teacher_ocr" / "eval"
    controls = {f"{O}/ci_low": 0.8, f"{O}/ci_high": 0.875, f"{O}/swapped": 0.05, "ocr/sensitivity": 1.25}
    write_eval(evaluation, {"teacher_ocr": {**scores(0.0, 0.84, 0.3, 0.1), **controls}})
    (evaluation / "grids").mkdir()
    (evaluation / "grids" / "teacher_ocr_ocr.png").write_bytes(b"png")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "ocr.md").write_text("Round 1 collapsed at lr 1e-3.\n")
    table = teacher_cards.main(["--runs", str(runs), "--teachers", str(tmp_path / "teachers"), "--results",
                                str(tmp_path / "page"), "--base", str(base), "--device", "one H200",
                                "--teacher-stages", json.dumps({"ocr": ["ocr_first"]}),
                                "--notes", str(tmp_path / "notes")])
    assert table["teacher_ocr"][O] == 0.84
    card = (tmp_path / "teachers" / "ocr" / "README.md").read_text()
    assert "trained with **DiffusionNFT**" in card and "rewarded by `ocr`" in card and "CFG 1.0" in card
    assert "(runs `ocr_first`, `ocr_nft`, each continuing the last)" in card
    assert "  `python -m opd.train experiment=mini/teacher_ocr_nft ++module.init_adapter=ocr_first/adapter`" in card
    assert "**training time**: 5.5 min" in card  # 3.0 + 2.5
    assert "| OCR | 0.600 | 0.840 [0.80, 0.88] | +0.240 |" in card  # with its interval where the row has one
    assert "| metric | base (CFG 4.5) | this teacher (CFG 1.0) | change |" in card  # the base's from its evaluation
    assert f"Its images on its own test prompts: `{tmp_path / 'page' / 'teacher_ocr_ocr.png'}`." in card
    assert "| GenEval | 0.200 | 0.000 | -0.200 |" in card  # its row has ci_low only: no interval
    # the controls: swapped prompts and sensitivity from the teacher's row, the cover image from the evaluation's
    assert "| OCR | 0.050 | 1.25 | – |" in card and "| GenEval | – | – | 0.900 |" in card
    assert "| ocr_grpo | GRPO-Guard | 0.700 |" in card and "| ocr_nft  **picked** | DiffusionNFT | 0.800 |" in card
    assert card.endswith("## What was tried\n\nRound 1 collapsed at lr 1e-3.\n")
    page = (tmp_path / "page" / "results.md").read_text()
    assert "| base | 0.200 | 0.600 | 0.400 |" in page and "| teacher_ocr | 0.000 | 0.840 | 0.100 |" in page
    assert (tmp_path / "page" / "teacher_ocr_ocr.png").read_bytes() == b"png"
    assert (tmp_path / "page" / "ocr_curves.png").stat().st_size > 0
    one = teacher_cards.card("ocr", picked["ocr"], ["ocr_nft"], ["python -m opd.train x=1"], 2.5, table["base"],
                             table["teacher_ocr"], {"OCR": O}, ["ocr"])
    assert "- **Made by** (run `ocr_nft`):\n  `python -m opd.train x=1`\n" in one and "**Device**: not recorded" in one
    assert "By prompt tag" not in one  # OCR's rows have no tags
    tagged = {"metric": G, "winner": "gen", "candidates": {"gen": {"score": 0.3, "guidance_scale": 1.0}}}
    by_tag = {f"{G}/two_object": 0.125, f"{G}/colors": 0.75, f"{G}/colors/ci_low": 0.5, f"{G}/swapped": 0.0}
    gen = teacher_cards.card("geneval", tagged, ["gen"], [""], 1.0, {**table["base"], f"{G}/two_object": 0.25,
                             f"{G}/colors": 0.5, f"{G}/swapped": 0.0}, {**table["teacher_ocr"], **by_tag},
                             {"GenEval": G}, ["geneval_mini"])
    assert (f"By prompt tag (`{G}`):\n\n| tag | base | this teacher | change |\n|---|---|---|---|\n"
            "| colors | 0.500 | 0.750 | +0.250 |\n| two_object | 0.250 | 0.125 | -0.125 |\n") in gen


def test_teacher_card_of_a_snapshot_counts_its_run_up_to_that_step(tmp_path, conf):
    """A winner ``run/step_N`` (pick_teachers' ``run/*``): the card names the run's command and the
    snapshot, and its training time and curves stop at step N."""
    base = write_eval(tmp_path / "base", {"base": scores(0.2, 0.6, 0.5, 0.4)})
    runs = tmp_path / "runs"
    picked = {"geneval": {"winner": "gen_nft/step_000050", "metric": G, "candidates": {
        "gen_nft/step_000025": {"score": 0.3, "guidance_scale": 1.0},
        "gen_nft/step_000050": {"score": 0.6, "guidance_scale": 1.0}, "gen_nft/final": {"score": 0.5}}}}
    runs.mkdir()
    (runs / "picked.json").write_text(json.dumps(picked))
    # rounds 25, 50, 75 are logged at steps 24, 49, 74 (before each round's optimiser step)
    write_log(runs / "gen_nft", [{"step": 24, "time/minutes": 2.0, "reward/geneval_mini": 0.3},
                                 {"step": 49, "time/minutes": 4.0, "reward/geneval_mini": 0.4},
                                 {"step": 74, "time/minutes": 6.0, "reward/geneval_mini": 0.5}])
    write_overrides(runs / "gen_nft", ["experiment=mini/teacher_geneval"])
    write_eval(runs / "teacher_geneval" / "eval", {"teacher_geneval": scores(0.45, 0.6, 0.5, 0.4)})
    # the run's val evaluation also scored step 75, whose snapshot is gone (not a candidate of the pick)
    write_eval(runs / "gen_nft" / "val", {"step_000025": scores(0.3, 0, 0, 0), "step_000050": scores(0.6, 0, 0, 0),
                                          "step_000075": scores(0.25, 0, 0, 0), "final": scores(0.5, 0, 0, 0)})
    teacher_cards.main(["--runs", str(runs), "--teachers", str(tmp_path / "teachers"), "--results",
                        str(tmp_path / "page"), "--base", str(base), "--val-base", "geneval=0.2"])
    card = (tmp_path / "teachers" / "geneval" / "README.md").read_text()
    assert f"The snapshots' val scores against their steps: `{tmp_path / 'page' / 'geneval_val.png'}`." in card
    assert (tmp_path / "page" / "geneval_val.png").stat().st_size > 0
    # no snapshot rows (a run's final adapter only): nothing drawn
    assert teacher_cards.plot_val({"gen": {"final": {G: 0.5}}}, G, "gen/final", None, "geneval",
                                  tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()
    # every candidate run with snapshot rows is a curve; a run without any is left out
    two = {"gen_nft": {"step_000025": {G: 0.3}, "final": {G: 0.5}}, "gen_kl": {"step_000050": {G: 0.2}},
           "gen_old": {"final": {G: 0.1}}}
    assert teacher_cards.plot_val(two, G, "gen_nft/step_000025", 0.2, "geneval", tmp_path / "two.png") == 2
    assert "(run `gen_nft`)" in card and "`python -m opd.train experiment=mini/teacher_geneval`" in card
    assert "**training time**: 4.0 min wall-clock; the weights are its EMA snapshot at step 50" in card
    assert "| gen_nft/step_000050  **picked** | DiffusionNFT | 0.600 |" in card and "held-out *val* prompts" in card
    assert ("| gen_nft/step_000050  **picked** | DiffusionNFT | 0.600 |\n"
            "| gen_nft/step_000075 | DiffusionNFT | 0.250 (snapshot not kept) |\n") in card
    assert "What was tried" not in card and "Its images on" not in card  # no grid
    assert "| metric | base (CFG 4.5) | this teacher (CFG 1.0) | change |" in card
    assert logs.snapshot_of("gen_nft/final") == ("gen_nft", None) == logs.snapshot_of("gen_nft")
    assert logs.snapshot_of("a/b/step_000050") == ("a/b", 50) and logs.snapshot_of("a/step_x") == ("a/step_x", None)


def test_algorithm_and_scores_table(tmp_path):
    assert teacher_cards.algorithm("gen_NFT_more") == "DiffusionNFT" and teacher_cards.algorithm("aes") == "GRPO-Guard"
    (tmp_path / "gen_more" / ".hydra").mkdir(parents=True)  # the run's config says it, whatever its name
    (tmp_path / "gen_more" / ".hydra" / "config.yaml").write_text(
        "module: {_target_: opd.modules.teacher_nft.NFTTeacher, lr: '${x}'}\n")
    assert teacher_cards.algorithm("gen_more", tmp_path) == "DiffusionNFT"
    assert teacher_cards.algorithm("aes", tmp_path) == "GRPO-Guard"  # no record: by name
    (tmp_path / "gen_kl" / ".hydra").mkdir(parents=True)  # with the KL weight its config records
    (tmp_path / "gen_kl" / ".hydra" / "config.yaml").write_text(
        "module: {_target_: opd.modules.teacher_nft.NFTTeacher}\nobjective: {kl_weight: 1.0e-4}\n")
    assert teacher_cards.algorithm("gen_kl", tmp_path) == "DiffusionNFT, KL weight 0.0001"
    assert teacher_cards.scores_table({"base": {G: 0.25}}, {"GenEval": G, "OCR": O}) == (
        "| model | GenEval | OCR |\n|---|---|---|\n| base | 0.250 | – |\n")


# ---- compare -------------------------------------------------------------------------------------

def test_compare_reads_labelled_runs_smooths_and_plots(tmp_path):
    write_log(tmp_path / "sum", [{"step": s, "kl": v} for s, v in enumerate([0.4, 0.2, 0.3, 0.1])])
    write_log(tmp_path / "bal", [{"step": s, "kl": v} for s, v in enumerate([0.5, 0.1])])
    runs = compare.parse_runs([f"summed={tmp_path / 'sum'}", str(tmp_path / "bal")])
    assert runs == {"summed": tmp_path / "sum", "bal": tmp_path / "bal"}
    data = compare.curves(runs, ["kl"], smooth=3)
    steps, raw, smoothed = data["kl"]["summed"]
    assert steps == [0, 1, 2, 3] and raw == [0.4, 0.2, 0.3, 0.1]
    assert smoothed == pytest.approx([0.3, 0.3, 0.2, 0.2])  # (0.4+0.2)/2, (0.4+0.2+0.3)/3, (0.2+0.3+0.1)/3, (0.3+0.1)/2
    assert compare.curves(runs, ["kl"])["kl"]["bal"][2] == [0.5, 0.1]
    with pytest.raises(ValueError, match="labelled"):
        compare.parse_runs([f"a={tmp_path}", f"a={tmp_path}"])
    assert compare.main(["--out", str(tmp_path / "kl.png"), "--keys", "kl", "--smooth", "3", *map(str, runs.values())]
                        ).stat().st_size > 0
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path / "x.png"), "--keys", "missing", str(tmp_path / "sum")])


# ---- pack ----------------------------------------------------------------------------------------

def test_pack_leaves_out_checkpoints_and_evaluation_images_and_splits_by_size(tmp_path):
    root = tmp_path / "eval"  # a root named like a left-out folder still packs
    files = {"r/adapter/pytorch_lora_weights.safetensors": 300, "r/checkpoints/last.ckpt": 50,
             "r/checkpoints/step_1.ckpt": 50, "r/eval/images/base/0.png": 10, "r/eval/grids/g.png": 200,
             "r/eval/results.json": 100, "r/images/step_0.png": 20, "r/dense/images/base/0.png": 10}
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * size)
    kept = {str(p.relative_to(root)) for p in root.rglob("*") if pack.wanted(p, root)}
    assert kept == {"r/adapter/pytorch_lora_weights.safetensors", "r/eval/grids/g.png", "r/eval/results.json",
                    "r/images/step_0.png"}
    assert pack.wanted(root / "r/checkpoints/last.ckpt", root, with_ckpt=True)
    assert not pack.wanted(root / "r/checkpoints/step_1.ckpt", root, with_ckpt=True)
    assert not pack.wanted(root / "r/eval/results.json", root, adapters="only")
    assert not pack.wanted(root / "r/adapter/pytorch_lora_weights.safetensors", root, adapters="skip")
    # smallest first, a new part past the budget: 20+100 | 200 | 300 with 250 bytes a part
    parts = pack.split_parts([(Path(n), s) for n, s in files.items() if n in kept], 250)
    assert [[str(p) for p in part] for part in parts] == [["r/images/step_0.png", "r/eval/results.json"],
                                                          ["r/eval/grids/g.png"],
                                                          ["r/adapter/pytorch_lora_weights.safetensors"]]
    written = pack.pack(root, tmp_path / "out" / "runs.tar.gz", max_mb=250 / 2**20)
    assert [p.name for p in written] == ["runs.0.tar.gz", "runs.1.tar.gz", "runs.2.tar.gz"]
    with tarfile.open(written[0]) as tar:
        assert tar.getnames() == ["eval/r/images/step_0.png", "eval/r/eval/results.json"]
    assert pack.pack(root, tmp_path / "one.tar.gz") == [tmp_path / "one.tar.gz"]


# ---- pick_base -----------------------------------------------------------------------------------

def test_pick_base_chooses_by_the_suites_headlines_with_choose_s_rule(tmp_path, conf, capsys):
    paths = []
    for step, (g, o, x, a) in {"step_1": (0.30, 0.60, 0.45, 0.50), "step_2": (0.40, 0.66, 0.45, 0.45),
                               "step_3": (0.35, 0.50, 0.10, 0.15)}.items():
        paths.append(str(write_eval(tmp_path / step, {"base": scores(g, o, x, a)})))
    # band [0.2, 0.7]: depths step_1 min(.1,.4,.4,.1,.3,.2)=.1; step_2 .04 (ocr .66); step_3 -.05 (aesthetic .15)
    choice = pick_base.main(paths)
    assert choice["chosen"] == "step_1" and choice["depth"] == pytest.approx(0.1)
    assert choice["metrics"] == [G, O, A]
    # on GenEval and OCR only, step_3 (.35, .50) sits deepest: min(.15, .35, .3, .2) = .15
    choice = pick_base.main([*paths, "--tasks", "geneval", "ocr", "--json", str(tmp_path / "c.json")])
    assert choice["chosen"] == "step_3" and choice["depth"] == pytest.approx(0.15)
    assert json.loads((tmp_path / "c.json").read_text())["chosen"] == "step_3"
    # a narrower band [0.25, 0.65]: step_2's OCR .66 is outside, step_1 .05 deep, step_3 .1
    assert pick_base.main([*paths, "--tasks", "geneval", "ocr", "--band", "0.25", "0.65"])["chosen"] == "step_3"
    with pytest.raises(ValueError, match="drawbench"):
        pick_base.base_metrics(["drawbench"])
    assert "<- chosen" in capsys.readouterr().out


# ---- pick_teachers -------------------------------------------------------------------------------

def candidate(root: Path, name: str, ocr: float | None, guidance: float, adapter: bool = True) -> None:
    if adapter:
        (root / name / "adapter").mkdir(parents=True)
        (root / name / "adapter" / "pytorch_lora_weights.safetensors").write_text(name)
    if ocr is not None:
        write_eval(root / name / "val", {name: scores(0.1, ocr, 0.9 - ocr, 0.2)}, guidance={name: guidance})


def test_pick_teachers_by_the_skills_headline_installs_and_prints_overrides(tmp_path, conf, capsys):
    root, dest = tmp_path / "runs", tmp_path / "teachers"
    candidate(root, "ocr_grpo", 0.7, 4.5)  # ocr_exact 0.2: higher on exact, lower on the headline
    candidate(root, "ocr_nft", 0.8, 1.0)
    candidate(root, "ocr_broken", None, 1.0)  # no validation: skipped
    candidate(root, "gen_a", 0.5, 1.0)
    picked = pick_teachers.main(["--root", str(root), "--dest", str(dest), "ocr=ocr_grpo,ocr_nft,ocr_broken"])
    entry = picked["ocr"]
    assert entry["winner"] == "ocr_nft" and entry["metric"] == O and entry["guidance_scale"] == 1.0
    assert entry["candidates"]["ocr_grpo"]["score"] == 0.7 and entry["candidates"]["ocr_grpo"]["guidance_scale"] == 4.5
    assert set(entry["candidates"]) == {"ocr_grpo", "ocr_nft"}
    assert (dest / "ocr" / "pytorch_lora_weights.safetensors").read_text() == "ocr_nft"
    assert f"[pick] train with: teacher.ocr.adapter={dest / 'ocr'} teacher.ocr.guidance_scale=1.0" in capsys.readouterr().out
    pick_teachers.main(["--root", str(root), "--dest", str(dest), "geneval=gen_a"])  # keeps the OCR pick
    picked = json.loads((root / "picked.json").read_text())
    assert set(picked) == {"ocr", "geneval"}
    capsys.readouterr()
    pick_teachers.main(["--root", str(root), "--overrides", "geneval", "ocr"])
    assert capsys.readouterr().out.split() == [f"teacher.geneval.adapter={dest / 'geneval'}", "teacher.geneval.guidance_scale=1.0",
                                               f"teacher.ocr.adapter={dest / 'ocr'}", "teacher.ocr.guidance_scale=1.0"]
    pick_teachers.main(["--root", str(root), "--checkpoint", "ocr"])
    assert capsys.readouterr().out.strip() == f"+checkpoints.teacher_ocr={{adapter:{dest / 'ocr'},guidance_scale:1.0}}"
    with pytest.raises(SystemExit):
        pick_teachers.main(["--root", str(root), "--checkpoint", "aesthetic"])  # nothing picked for it
    with pytest.raises(SystemExit):
        pick_teachers.main(["--root", str(root), "--dest", str(dest), "drawbench=gen_a"])  # no such task
    with pytest.raises(SystemExit, match="no usable candidate"):
        pick_teachers.main(["--root", str(root), "--dest", str(dest), "ocr=ocr_broken"])


def test_pick_teachers_records_the_shipped_teachers_as_they_are(tmp_path, conf, capsys):
    root, shipped = tmp_path / "runs", tmp_path / "models" / "mini_teachers"
    for skill in ("ocr", "geneval"):
        (shipped / skill).mkdir(parents=True)
        (shipped / skill / "pytorch_lora_weights.safetensors").write_bytes(b"")
    picked = pick_teachers.main(["--root", str(root), "--shipped", str(shipped), "ocr", "geneval"])
    assert picked["ocr"] == {"winner": "shipped", "metric": O, "adapter": str(shipped / "ocr"), "guidance_scale": 1.0,
                             "candidates": {}}
    assert json.loads((root / "picked.json").read_text()) == picked
    capsys.readouterr()
    pick_teachers.main(["--root", str(root), "--checkpoint", "ocr"])  # the table evaluates it as any picked teacher
    assert capsys.readouterr().out.strip() == f"+checkpoints.teacher_ocr={{adapter:{shipped / 'ocr'},guidance_scale:1.0}}"
    with pytest.raises(SystemExit, match="no shipped adapter"):
        pick_teachers.main(["--root", str(root), "--shipped", str(shipped), "aesthetic"])


def test_shipped_teachers_training_counts_in_the_compute_of_a_baseline(tmp_path, conf, capsys):
    """A shipped teacher's training.json goes into picked.json, and compute --picked adds it to a run's
    own compute (multi-reward RL at MOPD's total compute with TEACHERS=shipped)."""
    from opd.results import compute
    root, shipped = tmp_path / "runs", tmp_path / "models" / "mini_teachers"
    for skill, tflop in (("ocr", 2.5), ("geneval", 4.0)):
        (shipped / skill).mkdir(parents=True)
        (shipped / skill / "pytorch_lora_weights.safetensors").write_bytes(b"")
        (shipped / skill / "training.json").write_text(json.dumps({"run": f"{skill}_nft", "model_tflop": tflop}))
    picked = pick_teachers.main(["--root", str(root), "--shipped", str(shipped), "ocr", "geneval"])
    assert picked["ocr"]["training"] == {"run": "ocr_nft", "model_tflop": 2.5}
    write_log(root / "mopd", [{"step": 0, "compute/model_tflop": 1.0}, {"step": 1, "compute/model_tflop": 1.25}])
    assert compute.main([str(root / "mopd"), "--picked", str(root / "picked.json")]) == 1.25 + 2.5 + 4.0
    assert compute.main(["--picked", str(root / "picked.json"), "--scale", "2"]) == 13.0
    with pytest.raises(SystemExit):  # the images a shipped teacher sampled were not recorded: a clear error
        compute.main(["--picked", str(root / "picked.json"), "--key", "compute/images_sampled"])
    assert "records no training images_sampled" in capsys.readouterr().err
    (shipped / "ocr" / "training.json").write_text("{not json")
    with pytest.raises(SystemExit, match="training.json: not JSON"):
        pick_teachers.main(["--root", str(root), "--shipped", str(shipped), "ocr"])


def test_pick_teachers_among_a_runs_snapshots_early_stopping_on_val(tmp_path, conf):
    """``RUN/*``: every EMA snapshot (``exports/step_*``) and the final adapter (row ``final``) of
    ``RUN/val/results.json`` is a candidate; the winner's own folder is installed."""
    root, dest = tmp_path / "runs", tmp_path / "teachers"
    run = root / "gen_nft"
    for folder in ("exports/step_000025", "exports/step_000050", "adapter"):
        (run / folder).mkdir(parents=True)
        (run / folder / "pytorch_lora_weights.safetensors").write_text(folder)
    (run / "exports" / "step_000075").mkdir()  # a snapshot the evaluation did not score: not a candidate
    write_eval(run / "val", {"step_000025": scores(0.3, 0.1, 0.1, 0.1), "step_000050": scores(0.6, 0.1, 0.1, 0.1),
                             "final": scores(0.5, 0.1, 0.1, 0.1)},
               guidance={"step_000025": 1.0, "step_000050": 1.0, "final": 1.0})
    candidate(root, "gen_grpo", None, 4.5)
    write_eval(root / "gen_grpo" / "val", {"gen_grpo": scores(0.55, 0.1, 0.1, 0.1)}, guidance={"gen_grpo": 4.5})
    entry = pick_teachers.main(["--root", str(root), "--dest", str(dest), "geneval=gen_nft/*,gen_grpo"])["geneval"]
    assert entry["winner"] == "gen_nft/step_000050" and entry["guidance_scale"] == 1.0
    assert {n: c["score"] for n, c in entry["candidates"].items()} == {
        "gen_nft/step_000025": 0.3, "gen_nft/step_000050": 0.6, "gen_nft/final": 0.5, "gen_grpo": 0.55}
    assert (dest / "geneval" / "pytorch_lora_weights.safetensors").read_text() == "exports/step_000050"
    with pytest.raises(SystemExit, match="no usable candidate"):
        pick_teachers.main(["--root", str(root), "--dest", str(dest), "geneval=missing/*"])


def test_winner_takes_the_first_of_a_tie_and_overrides_without_a_known_cfg():
    assert pick_teachers.winner({"a": {"score": 0.5}, "b": {"score": 0.5}, "c": {"score": 0.4}}) == "a"
    with pytest.raises(ValueError):
        pick_teachers.winner({})
    picked = {"ocr": {"adapter": "t/ocr", "guidance_scale": None}}
    assert pick_teachers.train_overrides(picked, ["ocr"]) == ["teacher.ocr.adapter=t/ocr"]
    assert pick_teachers.eval_checkpoint(picked, "ocr", "x") == "+checkpoints.x={adapter:t/ocr}"


# ---- ship_adapter --------------------------------------------------------------------------------

def test_shipped_fp16_adapter_keeps_keys_and_metadata_and_the_velocity(tmp_path):
    from safetensors import safe_open

    from opd.models.lora import add_lora, lora_parameters, save_lora
    from opd.results import ship_adapter
    from test_models import toy

    base = toy(seed=3)
    base.save_pretrained(tmp_path / "base", dtype=torch.float32)
    add_lora(base.transformer, "s", rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(base.transformer, "s"):
            p.add_(0.2 * torch.randn_like(p))
    source = save_lora(base.transformer, "s", tmp_path / "fp32")
    copy = ship_adapter.to_fp16(source, tmp_path / "fp16")
    with safe_open(str(source), framework="pt") as a, safe_open(str(copy), framework="pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        for k in a.keys():  # noqa: SIM118 (safe_open is not iterable)
            assert b.get_tensor(k).dtype == torch.float16
            torch.testing.assert_close(b.get_tensor(k).float(), a.get_tensor(k), rtol=1e-3, atol=1e-4)
    gaps = ship_adapter.velocity_gaps(tmp_path / "base", source, copy, ["a red circle", 'a sign that says "CAT"'])
    assert gaps["adapter_vs_base"] > 1e-2  # the adapter changes the velocity ...
    assert 0 < gaps["fp16_vs_fp32"] < 1e-2 * gaps["adapter_vs_base"]  # ... far more than rounding does
    shipped = ship_adapter.main([str(tmp_path / "fp32"), str(tmp_path / "main"), "--base", str(tmp_path / "base")])
    assert (tmp_path / "main" / "pytorch_lora_weights.safetensors").is_file() and shipped["fp16_vs_fp32"] > 0


DISTILL_RUN = ("task_name: mopd_aesthetic_ocr_geneval\n"
               "model: {_target_: opd.models.random_sd3.random_sd3_backbone, image_size: 512, use_t5: true}\n"
               "module: {prompts_per_teacher: 3, train_chunk: 8}\n"
               "teacher: {ocr: {}, aesthetic: {}, geneval: {}}\n")


def _scale_run(tmp_path: Path, minutes: list[float], reserved: list[float], config: str = DISTILL_RUN) -> Path:
    """A run folder as `opd.train logger=csv` writes it: a composed config and one metrics.csv."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(config)
    csv_dir = run / "csv" / "version_0"
    csv_dir.mkdir(parents=True)
    lines = ["step,time/minutes,memory/peak_reserved_gib,memory/peak_allocated_gib"]
    lines += [f"{i},{m},{r},{r - 1}" for i, (m, r) in enumerate(zip(minutes, reserved))]
    (csv_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def test_scale_record_times_rounds_after_the_first_and_takes_the_largest_memory(tmp_path: Path) -> None:
    from opd.results.scale_record import main, scale_record

    # rounds end at these minutes: 2.0 (warm-up, 120 s), then 30 s, 36 s, 24 s, 30 s
    run = _scale_run(tmp_path, [2.0, 2.5, 3.1, 3.5, 4.0], [50.0, 61.5, 60.0, 61.0, 61.0])
    record = scale_record(run, gpus=1, device="1x test GPU")
    assert record["round_seconds"] == pytest.approx([36.0, 24.0, 30.0])  # the first difference (30 s) is warm-up
    assert record["seconds_per_round"] == pytest.approx(30.0)
    assert record["trajectories_per_second"] == pytest.approx(9 / 30.0)  # 3 prompts × 3 teachers per round
    assert record["peak_memory_gib"] == pytest.approx(61.5)
    assert record["torch_peak_allocated_gib"] == pytest.approx(60.5)
    assert record["settings"]["teachers"] == ["aesthetic", "geneval", "ocr"]
    assert record["settings"]["module.train_chunk"] == 8
    smi = tmp_path / "nvsmi.csv"
    smi.write_text("0, 1024\n1, 70656\n0, 2048\n")  # MiB per GPU: the largest is 69 GiB
    out = tmp_path / "scale" / "h200.json"
    main([str(run), "--out", str(out), "--smi", str(smi), "--gpus", "8", "--device", "8x test GPU"])
    written = json.loads(out.read_text())
    assert written["peak_memory_gib"] == pytest.approx(69.0)
    assert written["peak_memory_source"].startswith("nvidia-smi")
    assert written["trajectories_per_second"] == pytest.approx(72 / 30.0)


def test_scale_record_of_a_teacher_rl_run_counts_its_groups(tmp_path: Path) -> None:
    from opd.results.scale_record import scale_record

    config = ("task_name: mini_teacher_geneval\nmodel: {_target_: opd.models.build.mini_backbone}\n"
              "module: {num_groups_per_round: 16, group_size: 8, nograd_chunk: 1152, terms_per_forward: 3}\n")
    run = _scale_run(tmp_path, [0.5, 0.55, 0.6, 0.65], [9.0, 11.0, 11.0, 11.0], config)
    record = scale_record(run, gpus=2)
    assert record["seconds_per_round"] == pytest.approx(3.0)
    assert record["trajectories_per_second"] == pytest.approx(128 / 3.0)  # 16 groups × 8 images, all GPUs
    assert record["settings"]["trajectories_per_round"] == 128
    assert record["settings"]["module.terms_per_forward"] == 3


def test_scale_record_refuses_a_run_with_too_few_rounds(tmp_path: Path) -> None:
    from opd.results.scale_record import scale_record

    with pytest.raises(ValueError, match="at least 3"):
        scale_record(_scale_run(tmp_path, [1.0, 1.5], [10.0, 10.0]))
    with pytest.raises(FileNotFoundError, match="hydra.run.dir"):
        scale_record(tmp_path / "nowhere")


def test_t_quantiles_and_a_three_seed_mean_by_hand():
    assert over_seeds.t_quantile(2) == 4.303
    assert over_seeds.t_quantile(30) == pytest.approx(2.042, abs=1e-3)  # the expansion beyond the table
    assert over_seeds.t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    rows = [{"g": 0.2, "g/ci_low": 0.0, "g/ci_high": 1.0, "o": 0.5}, {"g": 0.4, "o": 0.5}, {"g": 0.3, "o": 0.5}]
    out = table1.mean_over_seeds(rows)
    # mean 0.3, sd 0.1, n 3: 0.3 ± 4.303 · 0.1 / √3 = 0.3 ± 0.24843
    assert out["num_seeds"] == 3 and out["g"] == pytest.approx(0.3)
    assert (out["g/ci_low"], out["g/ci_high"]) == pytest.approx((0.3 - 0.24843, 0.3 + 0.24843), abs=1e-5)
    assert (out["o/ci_low"], out["o/ci_high"]) == pytest.approx((0.5, 0.5))  # seeds that agree: no spread
    assert table1.mean_over_seeds(rows[:1]) == {**rows[0], "num_seeds": 1}  # one seed keeps its bootstrap


def test_a_row_of_three_seeds_is_their_mean_with_compute_totals(tmp_path):
    """Runs mopd_seed0..2, each evaluated as its own row and logging its compute: the table row is the
    seeds' mean with a t-interval, num_seeds 3, and the seeds' mean minutes, images and FLOPs."""
    for n, (score, minutes) in enumerate([(0.2, 3.0), (0.4, 5.0), (0.3, 4.0)]):
        run = tmp_path / f"mopd_seed{n}"
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "results.json").write_text(json.dumps({f"mopd_seed{n}": {"geneval/x": score}}))
        (run / "csv" / "version_0").mkdir(parents=True)
        (run / "csv" / "version_0" / "metrics.csv").write_text(
            "step,time/minutes,train/round,compute/images_sampled,compute/model_tflop\n"
            f"0,{minutes / 2},1,10,1.5\n1,{minutes},2,20,{3.0 + n}\n")
    rows = {"mopd": {"label": "MOPD", "run": "mopd", "stages": ["mopd"], "teachers": []}}
    results, runs, curves = table1.collect(tmp_path, rows, base={"geneval/x": 0.1})
    assert results["mopd"]["num_seeds"] == 3 and results["mopd"]["geneval/x"] == pytest.approx(0.3)
    assert results["mopd"]["geneval/x/ci_high"] == pytest.approx(0.3 + 0.24843, abs=1e-5)
    record = runs["mopd"]
    assert record["num_seeds"] == 3 and record["seeds"] == ["mopd_seed0", "mopd_seed1", "mopd_seed2"]
    assert record["minutes"] == pytest.approx(4.0) and record["rounds"] == 2 and record["images_sampled"] == 20
    assert record["model_tflop"] == pytest.approx(4.0)  # (3 + 4 + 5) / 3
    assert [r["time/minutes"] for r in curves["mopd"]] == ["1.5", "3.0"]  # the curve: the first seed's log


def test_a_seed_whose_log_was_lost_counts_in_the_metrics_not_in_minutes_or_compute(tmp_path):
    """Seed 0 kept only its evaluation (its training log lost), seeds 1 and 2 kept everything: the row's
    metrics are the three seeds' mean, its minutes, compute, command and curve those of the logged seeds,
    and runs.json names the seed without a log."""
    for n, score in enumerate([0.2, 0.4, 0.3]):
        run = tmp_path / f"mopd_seed{n}"
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "results.json").write_text(json.dumps({f"mopd_seed{n}": {"geneval/x": score}}))
        if n:
            (run / "csv" / "version_0").mkdir(parents=True)
            (run / "csv" / "version_0" / "metrics.csv").write_text(
                f"step,time/minutes,compute/model_tflop\n0,{2 * n},{10.0 * n}\n")
            (run / ".hydra").mkdir()
            (run / ".hydra" / "overrides.yaml").write_text(f"- seed={n}\n")
    rows = {"mopd": {"label": "MOPD", "run": "mopd", "stages": ["mopd"], "teachers": []}}
    results, runs, curves = table1.collect(tmp_path, rows, base={"geneval/x": 0.1})
    assert results["mopd"]["num_seeds"] == 3 and results["mopd"]["geneval/x"] == pytest.approx(0.3)
    record = runs["mopd"]
    assert record["minutes"] == pytest.approx(3.0) and record["model_tflop"] == pytest.approx(15.0)  # seeds 1, 2
    assert record["seeds_without_log"] == ["mopd_seed0"] and record["command"] == "python -m opd.train seed=1"
    assert [float(r["time/minutes"]) for r in curves["mopd"]] == [2.0]  # seed 1's log


def test_records_keep_commands_logs_and_evaluations_gzipped_and_read_back_alike(tmp_path):
    from opd.results import records

    run = tmp_path / "runs" / "mopd_sum_seed1"
    write_log(run, [{"step": 0, "time/minutes": 1.0, "compute/model_tflop": 7.0}])
    write_log(run, [{"step": 1, "time/minutes": 2.5, "compute/model_tflop": 14.0}], version=1)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- seed=1\n- ckpt_path=last\n")
    write_eval(run / "eval", {run.name: {"geneval/x": 0.25}})
    (run / "eval" / "samples.jsonl").write_text('{"checkpoint": "mopd_sum_seed1", "task": "geneval"}\n' * 50)
    for big in (run / "adapter" / "pytorch_lora_weights.safetensors", run / "checkpoints" / "last.ckpt",
                run / "eval" / "images" / "a.png"):
        big.parent.mkdir(parents=True, exist_ok=True)
        big.write_bytes(b"x" * 1000)
    (tmp_path / "runs" / "not_evaluated").mkdir()
    (tmp_path / "runs" / "picked.json").write_text("{}")
    dest = tmp_path / "records"
    written = records.main([str(tmp_path / "runs"), str(dest)])
    assert list(written) == ["mopd_sum_seed1"]  # every run with an evaluation, no other
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == ["mopd_sum_seed1/" + k for k in (".hydra/overrides.yaml", "csv/version_0/metrics.csv.gz",
                    "csv/version_1/metrics.csv.gz", "eval/.hydra/config.yaml", "eval/results.json",
                    "eval/samples.jsonl.gz")] + ["picked.json"]
    assert logs.training_log(dest / run.name) == logs.training_log(run)  # the gzipped log reads the same
    assert logs.run_command(dest / run.name) == "python -m opd.train seed=1"
    assert gzip.decompress((dest / run.name / "eval" / "samples.jsonl.gz").read_bytes()) == \
        (run / "eval" / "samples.jsonl").read_bytes()
    with pytest.raises(SystemExit):
        records.main([str(tmp_path / "runs"), str(dest), "missing_run"])


# ---- pick_setting --------------------------------------------------------------------------------

def test_pick_setting_takes_the_best_mean_of_the_headlines_on_val(tmp_path, conf, capsys):
    from opd.results import pick_setting

    a, b = tmp_path / "tune_lr3e-4", tmp_path / "tune_lr1e-3"
    write_eval(a / "val", {a.name: scores(0.30, 0.6, 0.5, 0.30)})  # headlines G, O, A: mean 0.4
    write_eval(b / "val", {b.name: scores(0.20, 0.8, 0.5, 0.35)})  # mean 0.45
    out = tmp_path / "lr.txt"
    assert pick_setting.main(["--out", str(out), f"{a}=3e-4", f"{b}=1e-3"]) == "1e-3"
    assert out.read_text() == "1e-3\n"
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["candidates"]["3e-4"]["score"] == pytest.approx(0.4)
    assert record["candidates"]["1e-3"]["score"] == pytest.approx((0.20 + 0.8 + 0.35) / 3)
    assert "1e-3: 0.4500" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pick_setting.main(["--out", str(out), f"{tmp_path / 'missing'}=1"])
    assert "no such results.json" in capsys.readouterr().err


def test_the_average_share_of_the_teachers_gains_per_seed_with_its_interval(tmp_path):
    """Base 0.2, a GenEval teacher at 0.6, a student of three seeds at 0.3 / 0.4 / 0.5: shares 0.25,
    0.5, 0.75, mean 0.5 ± t(2)·0.25/√3; the teacher's own share is 1."""
    write_eval(tmp_path / "teacher_geneval" / "eval", {"teacher_geneval": {G: 0.6}})
    for n, value in enumerate([0.3, 0.4, 0.5]):
        write_eval(tmp_path / f"s_seed{n}" / "eval", {f"s_seed{n}": {G: value}})
    rows = {"base": {"label": "base", "run": None, "stages": []},
            "teacher_geneval": {"label": "t", "run": "teacher_geneval", "stages": ["teacher_geneval"]},
            "s": {"label": "s", "run": "s", "stages": ["s"], "teachers": ["geneval"]}}
    results, _, _ = table1.collect(tmp_path, rows, base={G: 0.2}, teacher_metrics={"geneval": G})
    gain = results["s"]
    assert gain[table1.NORM_GAIN] == pytest.approx(0.5) and gain["num_seeds"] == 3
    assert gain[f"{table1.NORM_GAIN}/ci_high"] == pytest.approx(0.5 + 4.303 * 0.25 / math.sqrt(3))
    assert results["teacher_geneval"][table1.NORM_GAIN] == pytest.approx(1.0)
    assert table1.NORM_GAIN not in results["base"]


def test_the_prompt_blind_controls_follow_the_base_with_their_share_of_the_gains():
    """The base's cover row and its swapped-prompt scores become rows after the base: GenEval 0.1 and
    0.05 against base 0.2 and teacher 0.6 are shares of (0.1-0.2)/0.4 = -0.25 and -0.375."""
    base_eval = {"base": {G: 0.2, f"{G}/swapped": 0.05, f"{G}/swapped/ci_low": 0.01}, "cover": {G: 0.1}}
    rows = {"base": {"label": "base"}, "teacher_geneval": {"label": "t"}}
    results = {"base": {G: 0.2}, "teacher_geneval": {G: 0.6}}
    runs = {"base": {"label": "base", "cfg": 4.5}, "teacher_geneval": {"label": "t", "cfg": 1.0}}
    rows, results, runs = table1.with_controls(rows, results, runs, base_eval, {"geneval": G})
    assert list(rows) == ["base", "cover", "swapped", "teacher_geneval"]
    assert results["swapped"] == {G: 0.05, f"{G}/ci_low": 0.01, table1.NORM_GAIN: pytest.approx(-0.375)}
    assert results["cover"][table1.NORM_GAIN] == pytest.approx(-0.25)
    assert runs["cover"]["cfg"] == "–" and runs["swapped"]["cfg"] == 4.5
    assert table1.with_controls(rows, results, runs, {"base": {G: 0.2}}, {"geneval": G})[0].keys() == rows.keys()


# ---- one metric over training seeds ----------------------------------------------------------------

def test_over_seeds_means_t_intervals_and_the_paired_difference(tmp_path, capsys):
    from opd.results import over_seeds

    def seed_file(name, s8, s16):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"s16": {O: s16, "other": 1.0}, "s8": {O: s8}}))
        return str(path)

    a = [seed_file(f"a{i}", v, v + 0.25) for i, v in enumerate((0.2, 0.4, 0.6))]
    b = [seed_file(f"b{i}", v, v) for i, v in enumerate((0.1, 0.2, 0.3))]
    out = tmp_path / "out"
    summary = over_seeds.main(["--metric", O, "--out", str(out), "--group", "ode", *a, "--group", "sde", *b,
                               "--start", "0.1", "--line", "guided base=0.5"])
    # a at step 8: mean 0.4, sd 0.2, half-width t(2) 4.303 * 0.2 / sqrt(3)
    assert summary["ode"]["s8"]["mean"] == pytest.approx(0.4)
    assert summary["ode"]["s8"]["ci_high"] == pytest.approx(0.4 + 4.303 * 0.2 / 3 ** 0.5)
    # seed by seed a - b at step 8: 0.1, 0.2, 0.3 -> mean 0.2, sd 0.1
    diff = summary["ode - sde"]["s8"]
    assert diff["seeds"] == pytest.approx([0.1, 0.2, 0.3]) and diff["mean"] == pytest.approx(0.2)
    assert diff["ci_low"] == pytest.approx(0.2 - 4.303 * 0.1 / 3 ** 0.5)
    assert summary["ode - sde"]["s16"]["mean"] == pytest.approx(0.45)
    assert list(summary["ode"]) == ["s8", "s16"]  # by step, not by name
    table = capsys.readouterr().out
    assert "| step | ode | sde | ode - sde |" in table and "| 8 | 0.400 [-0.10, 0.90] | 0.200 [-0.05, 0.45] |" in table
    assert json.loads((out / "summary.json").read_text())["sde"]["s16"]["seeds"] == pytest.approx([0.1, 0.2, 0.3])
    assert (out / "over_seeds.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # unequal seeds cannot be paired
        over_seeds.main(["--metric", O, "--out", str(out), "--group", "ode", *a, "--group", "sde", *b[:2]])
    with pytest.raises(SystemExit):
        over_seeds.main(["--metric", O, "--out", str(out), "--group", "ode", str(tmp_path / "missing.json")])
    with pytest.raises(ValueError, match="two seeds or more"):
        over_seeds.interval([0.5])
