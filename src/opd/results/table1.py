"""Assemble the mini reproduction of the paper's Table 1 from a folder of runs (``make mini-table1``).

    python -m opd.results.table1 --runs runs/table1 --out runs/table1/table \
        [--previous docs/results/archive/mini_table1_v1/round1] [--stages JSON] [--extra JSON] [--also KEY ...]

Each row is a run ``<runs>/<run>`` (a chain of runs, ``--stages``): its evaluation is the row named
``<run>`` of ``<run>/eval/results.json`` (``python -m opd.evaluate +checkpoints.<run>=<run>/adapter
hydra.run.dir=<run>/eval``), its CFG scale that evaluation's, its minutes the training wall-clock
of its stages' CSV logs (:mod:`opd.results.logs`). A row trained with several seeds has runs
``<run>_seed<N>`` (each stage likewise): its metrics are the seeds' means with 95 % t-intervals over
the seeds, and ``num_seeds`` says how many (:func:`mean_over_seeds`). The teachers' rows name the winners in
``<runs>/picked.json`` (:mod:`opd.results.pick_teachers`); the base row is ``--base``. A row not
evaluated under ``--runs`` comes from ``--previous`` (an earlier table's folder), and so does the
training record of a row whose runs left no log (a teacher re-evaluated as shipped).

The columns are the headline metrics of ``conf/eval_tasks/<suite>.yaml`` (``--also`` adds more
``results.json`` keys). Writes ``results.json``, ``runs.json`` (per row: stages, commands, minutes,
minutes including its teachers', rounds, images sampled, model TFLOP (summed over the stages) and TFLOP
including its teachers', label, CFG), ``results.md`` (the table, with every row's average share of the teachers' gains, then each student's share
of each teacher's gain on the teacher's own metric) and ``curves.png`` (rewards against TFLOP).
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from opd.results.gain_share import format_share, images_note, row_shares
from opd.results.logs import chained_log, column, moving_average, run_command
from opd.results.metrics import (
    averages,
    columns,
    evaluated_rows,
    guidance_scales,
    own_metrics,
    reward_names,
    with_interval,
)
from opd.results.over_seeds import t_interval
from opd.utils.files import write_atomic

#: the table's rows after the base and the teachers: key → label, the teachers it distils (a row's
#: run is its key, unless ``--stages`` names its runs)
ROWS = {
    "multi_reward_rl": {"label": "multi-reward RL (DiffusionNFT, alternating tasks)"},
    "cascade_rl": {"label": "cascade RL (aesthetic → OCR → GenEval)",
                   "stages": ["cascade_aesthetic", "cascade_ocr", "cascade_geneval"]},
    "sopd_geneval": {"label": "SOPD student, GenEval teacher", "teachers": ["geneval"]},
    "sopd_ocr": {"label": "SOPD student, OCR teacher", "teachers": ["ocr"]},
    "sopd_aesthetic": {"label": "SOPD student, aesthetic teacher", "teachers": ["aesthetic"]},
    "mopd": {"label": "**MOPD student** (3 teachers)", "teachers": ["geneval", "ocr", "aesthetic"]},
}


def table_rows(picked: Mapping, tasks: Sequence[str], stages: Mapping[str, list[str]] | None = None,
               extra: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """Every row: ``{key: {label, run, stages[, teachers]}}`` (base: ``run`` None), in table order.

    A teacher row per task: its run is ``teacher_<task>`` (the test evaluation of the picked
    teacher), its stages the runs it continued (``stages["teacher_<task>"]``) and then its winner in
    ``picked``. ``stages`` names the runs of any other row in order (the last one is evaluated);
    ``extra`` adds rows (default teachers: all tasks)."""
    stages, extra = dict(stages or {}), dict(extra or {})
    rows: dict[str, dict] = {"base": {"label": "base (mini_base)", "run": None, "stages": []}}
    for task in tasks:
        winner = picked[task]["winner"] if task in picked else f"teacher_{task}"
        rows[f"teacher_{task}"] = {"label": f"{task} teacher ({winner})", "run": f"teacher_{task}",
                                   "stages": [*stages.get(f"teacher_{task}", []), winner]}
    for key, row in {**ROWS, **{k: {"teachers": list(tasks), **v} for k, v in extra.items()}}.items():
        row = {"stages": [key], **row}
        if key in stages:
            row["stages"] = list(stages[key])
        rows[key] = {"run": row["stages"][-1], **row}
    return rows


def gain_share(results: Mapping[str, Mapping[str, float]], student: str, teachers: Sequence[str],
               own: Mapping[str, str]) -> dict[str, float]:
    """``{teacher: share}``: how much of the teacher's gain over the base, on the teacher's own metric,
    ``student`` keeps: ``(student - base) / (teacher - base)`` (NaN when the teacher gained nothing;
    teachers without a row are left out)."""
    out = {}
    for t in teachers:
        metric, teacher = own[t], results.get(f"teacher_{t}")
        if teacher is None or student not in results:
            continue
        gain = teacher[metric] - results["base"][metric]
        out[t] = (results[student][metric] - results["base"][metric]) / gain if gain > 0 else math.nan
    return out


#: the average over tasks of each row's share of the teachers' gains (:func:`normalised_gain`)
NORM_GAIN = "normalised_gain"


def normalised_gain(row: Mapping[str, float], results: Mapping[str, Mapping[str, float]],
                    own: Mapping[str, str]) -> float:
    """The mean over the tasks whose teacher gained over the base of ``(row - base) / (teacher - base)``
    on the teacher's own metric: 1 for a model level with every teacher on its task, 0 for the base
    (NaN with no such teacher). The same normalisation for every row, so students and baselines compare."""
    scored = [task for task, metric in own.items() if metric in row]
    shares = [v for v in gain_share({**results, NORM_GAIN: row}, NORM_GAIN, scored, own).values() if math.isfinite(v)]
    return sum(shares) / len(shares) if shares else math.nan


#: a row trained with several seeds: its runs are ``<run>_seed<N>`` (every stage likewise), each
#: evaluated as its own row ``<run>_seed<N>`` of ``<run>_seed<N>/eval/results.json``
SEED = "_seed"
#: training totals each row reports from its log (the last value), for comparisons at equal compute
TFLOP = "compute/model_tflop"
#: a log TFLOP axis for the curves when the longest row ends this many times later than the shortest
LOG_X_SPAN = 5.0
COMPUTE = {"rounds": "train/round", "images_sampled": "compute/images_sampled", "model_tflop": TFLOP}


def seed_suffixes(root: Path, run: str) -> list[str]:
    """``[""]`` when ``<root>/<run>`` holds an evaluation; else the suffixes ``_seed<N>`` (by N) of the
    ``<root>/<run>_seed<N>`` that do; ``[]`` when neither exists."""
    if (Path(root) / run / "eval" / "results.json").is_file():
        return [""]
    found = [(int(p.name[len(run) + len(SEED):]), p.name[len(run):]) for p in Path(root).glob(f"{run}{SEED}*")
             if p.name[len(run) + len(SEED):].isdigit() and (p / "eval" / "results.json").is_file()]
    return [suffix for _, suffix in sorted(found)]


def mean_over_seeds(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One row from the evaluations of a run's training seeds: every metric's mean, ``num_seeds``, and,
    with two seeds or more, each metric's ``/ci_low`` and ``/ci_high`` as the 95 % t-interval of
    that mean over the seeds (``mean ± t · sd / √n``), which replaces the single evaluation's
    bootstrap over prompts. One seed keeps its evaluation as it is."""
    if not rows:
        raise ValueError("mean_over_seeds: no evaluations")
    if len(rows) == 1:
        return {**rows[0], "num_seeds": 1}
    keys = [k for k in rows[0] if not k.endswith(("/ci_low", "/ci_high")) and all(k in r for r in rows)]
    out: dict[str, float] = {"num_seeds": len(rows)}
    for key in keys:
        mean, low, high = t_interval([float(r[key]) for r in rows])
        out.update({key: mean, f"{key}/ci_low": low, f"{key}/ci_high": high})
    return out


def last_logged(log: Sequence[Mapping[str, str]], key: str) -> float | None:
    return (column(log, key) or [None])[-1]


def collect(root: Path, rows: Mapping[str, dict], base: Mapping[str, float], base_cfg: float | str = "",
            previous: Path | None = None, device: str = "", teacher_metrics: Mapping[str, str] | None = None
            ) -> tuple[dict, dict, dict]:
    """``(results, runs, curves)``: each row's metrics, its record for runs.json, its training log.
    Rows are read in order, so a student's minutes including its teachers' see the teacher rows.
    With ``teacher_metrics`` (task → the teacher's own metric) every row also gets :data:`NORM_GAIN`, computed per
    seed and then averaged like the other metrics (with its t-interval over the seeds)."""
    earlier = ({name: json.loads((Path(previous) / f"{name}.json").read_text()) for name in ("results", "runs")}
               if previous else {"results": {}, "runs": {}})
    results: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    curves: dict[str, list] = {}
    per_seed: dict[str, list[Mapping[str, float]]] = {}
    for key, row in rows.items():
        if row["run"] is None:
            results[key] = dict(base)
            runs[key] = {"label": row["label"], "cfg": base_cfg, "minutes": 0.0, "cumulative_minutes": 0.0,
                         "command": "models/mini_base (see its card)"}
            continue
        suffixes = seed_suffixes(root, row["run"])
        eval_file = Path(root) / row["run"] / "eval" / "results.json"
        if not suffixes:
            if key in earlier["results"]:
                results[key] = earlier["results"][key]
                runs[key] = {"label": row["label"], **earlier["runs"][key], "table": str(previous)}
                print(f"[table1] {key}: from {previous}")
            else:
                print(f"[table1] {key}: no evaluation at {eval_file}; row left out")
            continue
        seeds = [row["run"] + suffix for suffix in suffixes]
        evals = [Path(root) / run / "eval" / "results.json" for run in seeds]
        per_seed[key] = [evaluated_rows(file)[run] for run, file in zip(seeds, evals)]
        results[key] = mean_over_seeds(per_seed[key])
        cfg = guidance_scales(evals[0]).get(seeds[0], "")
        logs = [chained_log(root, [stage + suffix for stage in row["stages"]]) for suffix in suffixes]
        # a seed whose training log was lost counts in the metrics, not in the minutes, compute and curve
        with_log = [i for i, (seed_log, _) in enumerate(logs) if seed_log]
        log = logs[with_log[0]][0] if with_log else []
        own = sum(logs[i][1] for i in with_log) / len(with_log) if with_log else 0.0  # minutes: the seeds' mean
        if not log and key in earlier["runs"]:  # evaluated again, trained before: the earlier record
            record = {k: v for k, v in earlier["runs"][key].items() if k not in ("label", "cfg", "run", "table")}
            runs[key] = {"run": row["run"], "label": row["label"], "cfg": cfg, **record, "training_from": str(previous)}
            continue
        teachers = [runs.get(f"teacher_{t}", {}) for t in row.get("teachers", [])]
        cumulative = own + sum(t.get("minutes", 0.0) for t in teachers)
        compute = {}
        for name, logged_key in COMPUTE.items():  # each seed's total over its stages, averaged over the seeds
            totals = [v for v in (last_logged(seed_log, logged_key) for seed_log, _ in logs) if v is not None]
            if totals:
                compute[name] = round(sum(totals) / len(totals), 3)
        if "model_tflop" in compute:
            compute["cumulative_model_tflop"] = round(
                compute["model_tflop"] + sum(t.get("model_tflop", 0.0) for t in teachers), 3)
        runs[key] = {"run": row["run"], "stages": row["stages"], "minutes": round(own, 2),
                     "cumulative_minutes": round(cumulative, 2), "label": row["label"], "cfg": cfg,
                     "num_seeds": len(seeds), "seeds": seeds, **compute,
                     "command": " ; ".join(run_command(Path(root) / (s + suffixes[(with_log or [0])[0]])) for s in row["stages"]),
                     "device": device}
        if len(with_log) < len(seeds):
            runs[key]["seeds_without_log"] = [seeds[i] for i in range(len(seeds)) if i not in with_log]
        curves[key] = log
    for key in [k for k in results if k != "base"] if teacher_metrics else []:  # after the loop: all teachers read
        gains = [normalised_gain(r, results, teacher_metrics) for r in per_seed.get(key, [results[key]])]
        if all(math.isfinite(g) for g in gains):
            results[key].update({k: v for k, v in mean_over_seeds([{NORM_GAIN: g} for g in gains]).items()
                                 if k != "num_seeds"})
    for key in list(curves):  # a row that another row continues is part of that row's curve
        mine = rows[key]["stages"]
        if any(len(r["stages"]) > len(mine) and r["stages"][:len(mine)] == mine for r in rows.values()):
            del curves[key]
    return results, runs, curves


#: prompt-blind controls from the base's evaluation, shown under the base
CONTROLS = {"cover": "control: one constant image for every prompt (the best of the cover search)",
            "swapped": "control: the base's images scored against other prompts of their tag"}


def with_controls(rows: Mapping[str, dict], results: Mapping[str, dict], runs: Mapping[str, dict],
                  base_eval: Mapping[str, Mapping[str, float]], own: Mapping[str, str]) -> tuple[dict, dict, dict]:
    """The table with the control rows of the base's evaluation (``cover``: its cover row;
    ``swapped``: its ``<metric>/swapped`` scores) after the base, each with its average share of the
    teachers' gains: what a model earns that ignores the prompt."""
    controls = {"cover": dict(base_eval.get("cover", {})),
                "swapped": {k.replace("/swapped", "", 1): v for k, v in base_eval.get("base", {}).items()
                            if "/swapped" in k}}
    ordered, results, runs = {k: v for k, v in rows.items() if k == "base"}, dict(results), dict(runs)
    for key, metrics in controls.items():
        if not metrics:
            continue
        ordered[key] = {"label": CONTROLS[key], "run": None, "stages": []}
        gain = normalised_gain(metrics, results, own)
        results[key] = {**metrics, **({NORM_GAIN: gain} if math.isfinite(gain) else {})}
        cfg = "–" if key == "cover" else runs.get("base", {}).get("cfg", "")  # the cover is drawn, not sampled
        runs[key] = {"label": CONTROLS[key], "cfg": cfg, "minutes": 0.0,
                     "cumulative_minutes": 0.0, "command": "the base's evaluation (--base)"}
    ordered.update({k: v for k, v in rows.items() if k != "base"})
    return ordered, results, runs


def _count(value: float | None) -> str:
    """A compute figure for the table: ``–`` where a row has none, 3 significant digits otherwise."""
    return "–" if value is None else f"{value:.3g}"


def markdown(rows: Mapping[str, dict], results: Mapping[str, dict], runs: Mapping[str, dict],
             cols: Mapping[str, str], own: Mapping[str, str], device: str = "", suite: str = "mini") -> str:
    """results.md: the table (rows with results, in order; ``cols`` = title → results key), then each
    student's share of its teachers' gains."""
    head = ["model", "CFG", "seeds", *cols, "avg. share of teachers' gains", "rounds", "images", "TFLOP (own)", "TFLOP (incl. teachers)",
            "GPU min (own)", "GPU min (incl. teachers)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in (k for k in rows if k in results):
        record = runs[key]
        cells = [record["label"] + (" ¹" if "table" in record else ""), str(record.get("cfg", "")),
                 str(record.get("num_seeds", "–")),
                 *(with_interval(results[key], m) for m in cols.values()), with_interval(results[key], NORM_GAIN),
                 *(_count(record.get(k)) for k in ("rounds", "images_sampled", "model_tflop", "cumulative_model_tflop")),
                 f"{record['minutes']:.1f}", f"{record['cumulative_minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    shares = []
    for key, row in rows.items():
        share = gain_share(results, key, row.get("teachers", []), own)
        if share:
            shares.append(f"- {runs[key]['label']}: " + ", ".join(_share_cell(results[key], t, v) for t, v in share.items()))
    intro = (f"Every row is scored by `python -m opd.evaluate` on the test prompts of "
             f"`conf/eval_tasks/{suite}.yaml`, at the CFG scale in the table (the DiffusionNFT-trained "
             "models are CFG-free: 1.0). In brackets: 95 % intervals, over the training seeds for rows "
             "with several (t-interval of the mean), else over the prompts (the evaluation's bootstrap). "
             "\"Avg. share of teachers' gains\": the mean over the tasks of (row − base) / (teacher − base) "
             "on each teacher's own metric, per seed (1: level with every teacher on its task; 0: the base). "
             "Compute is the training's, summed over a row's stages and averaged over its seeds: rounds, images "
             "sampled and model TFLOP (every transformer pass of the training rounds: rollouts, targets, training; all GPUs); \"incl. "
             "teachers\" adds the runs that trained the row's teachers. GPU minutes are training wall-clock (the seeds' mean)"
             + (f" on {device}." if device else "."))
    carried = sorted({record["table"] for record in runs.values() if "table" in record})
    if carried:
        intro += (f" ¹ Carried over from the earlier table {', '.join(f'`{t}`' for t in carried)} (same "
                  "evaluation; its device and command are in runs.json, its curves in its curves.png).")
    shares_title = "## Share of each teacher's gain (over the base, on the teacher's own metric) kept by the students"
    shares_intro = ("In brackets: 95 % intervals from resampling the test prompts once for base, teacher and student "
                    "(a student with several seeds enters as their mean; `opd.results.gain_share`): the evaluation's "
                    "noise. A student with several seeds also gets the 95 % t-interval of its seeds' own shares "
                    "(\"over seeds\"): the spread between training seeds. ∞ where the teacher's own gain is not clear "
                    "in some resamples. Share and interval come from the evaluations named by their images a prompt "
                    "(the table's own, or `make mini-table1-dense`'s).")
    targets = ["## Against the targets", "", *target_lines(results, own)] if "mopd" in results else []
    return "\n".join(["# The mini Table 1", "", intro, "", *lines, "", shares_title, "", shares_intro, "", *shares, "",
                      *targets, ""])


def target_lines(results: Mapping[str, Mapping[str, float]], own: Mapping[str, str], student: str = "mopd",
                 baseline: str = "multi_reward_rl", keep: float = 0.9, floor: float = 0.75,
                 also: Sequence[str] = ("multi_total",)) -> list[str]:
    """The table against the method's targets: ``student`` keeps at least ``keep`` of each teacher's gain
    with the lower end of its interval at ``floor`` or above (:mod:`opd.results.gain_share`; with several
    seeds, the lower of the ends over prompts and over seeds), and its
    average share of the teachers' gains (:data:`NORM_GAIN`) is above ``baseline``'s with intervals that
    do not overlap. A check whose numbers are missing says so. The rows of ``also`` that the table has
    (multi-reward RL at MOPD's total compute) get the same comparison of average shares."""
    lines = []
    row = results.get(student, {})
    for task in own:
        share, low = row.get(f"gain_share/{task}"), row.get(f"gain_share/{task}/ci_low")
        if share is None or low is None or not math.isfinite(share):
            lines.append(f"- {task}: the student's share of the teacher's gain has no interval yet")
            continue
        seeds_low = row.get(f"gain_share/{task}/seeds_ci_low")
        lowest = low if seeds_low is None else min(low, seeds_low)
        misses = [what for what, bad in (("the share", share < keep), ("the lower end", lowest < floor)) if bad]
        lines.append(f"- {task}: keeps {share:.0%} of the teacher's gain, lower end {low:.0%}"
                     + ("" if seeds_low is None else f" over prompts, {seeds_low:.0%} over seeds")
                     + f" (target: ≥ {keep:.0%}, lower end ≥ {floor:.0%}): "
                     + ("met" if not misses else f"missed ({' and '.join(misses)})"))
    for other in (baseline, *(name for name in also if name in results)):
        mine, theirs = row, results.get(other, {})
        bounds = [m.get(f"{NORM_GAIN}/{end}") for m in (mine, theirs) for end in ("ci_low", "ci_high")]
        if NORM_GAIN not in mine or NORM_GAIN not in theirs or None in bounds:
            lines.append(f"- against {other}: no interval of both rows' average share yet (it needs two seeds or more)")
            continue
        apart = bounds[0] > bounds[3] or bounds[2] > bounds[1]
        lines.append(f"- average share of the teachers' gains: {mine[NORM_GAIN]:.2f} [{bounds[0]:.2f}, {bounds[1]:.2f}] "
                     f"against {other}'s {theirs[NORM_GAIN]:.2f} [{bounds[2]:.2f}, {bounds[3]:.2f}]: "
                     + ("above it, intervals apart: met" if apart and mine[NORM_GAIN] > theirs[NORM_GAIN]
                        else "intervals overlap or below: missed"))
    return lines


def _share_cell(metrics: Mapping[str, float], task: str, share: float) -> str:
    """``geneval 94% [63, 134]``: a student's share of a teacher's gain, with its interval when measured."""
    if f"gain_share/{task}" not in metrics:  # no interval measured: the share of the table's means
        metrics = {**metrics, f"gain_share/{task}": share}
    if not math.isfinite(metrics[f"gain_share/{task}"]):
        return f"{task} – (its teacher gained nothing)"
    return f"{task} {format_share(metrics, task)}{images_note(metrics, task)}"


def plot_curves(path: Path, curves: Mapping[str, list[dict[str, str]]], rewards: Mapping[str, list[str]]) -> str:
    """One panel per task: the training reward (``reward/<name>``, RL runs) and the teacher-slot
    monitor reward (``teacher/<task>/<name>``, OPD runs) of each row against the model TFLOP it has
    spent (rows compared at equal compute; a row that logged no compute is left out). The TFLOP axis
    is logarithmic when the rows' compute spans more than :data:`LOG_X_SPAN` times (a long baseline
    would squeeze every other row into its first tenth); the scale drawn is returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rewards), figsize=(5.3 * len(rewards), 4.5), squeeze=False)
    spans: list[tuple[float, float]] = []  # (first, last) TFLOP of every curve drawn
    for ax, (task, names) in zip(axes[0], rewards.items()):
        wanted = {f"reward/{n}" for n in names} | {f"teacher/{task}/{n}" for n in names}
        for key, log in curves.items():
            for col in sorted({k for r in log for k in r} & wanted):  # chained stages log different keys
                pts = [(float(r[TFLOP]), float(r[col])) for r in log if r.get(col) and r.get(TFLOP)]
                if len(pts) < 2:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, moving_average(ys, max(1, len(ys) // 25)), label=key)  # over ~4 % of the run
                spans.append((min(xs), max(xs)))
        ax.set_title(f"{task}: reward during training")
        ax.set_xlabel("model TFLOP (training)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    scale = "linear"
    if spans and min(lo for lo, _ in spans) > 0 and max(hi for _, hi in spans) / min(hi for _, hi in spans) > LOG_X_SPAN:
        scale = "log"
        for ax in axes[0]:
            ax.set_xscale("log")
            ax.set_xlabel("model TFLOP (training, log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return scale


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=Path("docs/results/mini_base/results.json"),
                        help="the base model's evaluation (its row 'base')")
    parser.add_argument("--base-cfg", type=float, default=None,
                        help="the base's CFG scale (default: from its evaluation's .hydra config, else 4.5)")
    parser.add_argument("--suite", default="mini", help="conf/eval_tasks/<suite>.yaml names the headline metrics")
    parser.add_argument("--also", nargs="*", default=[], metavar="KEY", help="more results.json keys as columns")
    parser.add_argument("--device", default="", help="where the runs trained, for the text and runs.json")
    parser.add_argument("--stages", default="{}",
                        help='JSON: a row\'s runs in order, e.g. \'{"mopd": ["mopd_a", "mopd_a_phase2"], '
                             '"teacher_geneval": ["gen_nft_lr1e3"]}\' (a teacher: the runs before its winner)')
    parser.add_argument("--extra", default="{}",
                        help='JSON: more student rows, e.g. \'{"mopd_sum": {"label": "MOPD, summed KLs"}}\' '
                             '(keys: label, stages, teachers; default teachers: all)')
    parser.add_argument("--dense-base", type=Path, default=None,
                        help="the base's evaluation with more images per prompt (make mini-table1-dense): the shares' "
                             "intervals then use <run>/dense of the teachers and students where they all have the task")
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier table's folder (results.json, runs.json) for rows not evaluated here")
    args = parser.parse_args(argv)
    own = own_metrics(args.suite)
    cols = {**columns(args.suite), **{key: key for key in args.also}}
    picked_file = args.runs / "picked.json"
    picked = json.loads(picked_file.read_text()) if picked_file.exists() else {}
    rows = table_rows(picked, list(own), json.loads(args.stages), json.loads(args.extra))
    base_cfg = args.base_cfg if args.base_cfg is not None else guidance_scales(args.base).get("base", 4.5)
    results, runs, curves = collect(args.runs, rows, evaluated_rows(args.base)["base"], base_cfg,
                                    args.previous, args.device, own)
    rows, results, runs = with_controls(rows, results, runs, json.loads(args.base.read_text()), own)
    teachers_of = {key: row["teachers"] for key, row in rows.items() if row.get("teachers") and key in results}
    share_bases = {**({"dense": args.dense_base} if args.dense_base else {}), "eval": args.base.parent}
    try:
        shares_of = row_shares(args.runs, share_bases, runs, teachers_of, own, averages(args.suite))
    except ValueError as err:  # a dense evaluation of another model: name it, write nothing
        parser.error(str(err))
    for key, shares in shares_of.items():
        results[key].update(shares)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
    md = markdown(rows, results, runs, cols, own, args.device, args.suite)
    if any(curves.values()):  # rows whose training logs are gone (carried over, or records without logs) draw no curve
        plot_curves(args.out / "curves.png", curves, {t: reward_names(args.suite).get(t, []) for t in own})
    else:
        print(f"[table1] no row has a training log under {args.runs}: {args.out / 'curves.png'} not written")
    write_atomic(args.out / "results.md", md)  # last: the file make waits for
    print(md)
    return md


if __name__ == "__main__":
    main()
