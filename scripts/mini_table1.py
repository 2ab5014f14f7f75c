"""Assemble the mini reproduction of the paper's Table 1 from a plan's runs.

    python scripts/mini_table1.py --runs runs/table1 --out docs/results/mini_table1

Reads each row's evaluation (``<run>/eval/results.json``, written by ``python -m opd.evaluate``),
its training wall-clock (``time/minutes`` in ``<run>/csv/*/metrics.csv``), the teachers picked by
``scripts/pick_teachers.py`` (``picked.json``) and the base model's evaluation; writes
``results.json``, ``results.md`` (rows = models, columns = the three skills, with each row's GPU
minutes and the MOPD student's share of each teacher's gain), ``runs.json`` (per row: run folder,
command, training minutes, cumulative minutes) and ``curves.png`` (training rewards against
wall-clock minutes).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: the three headline metrics: results.json key → column title
METRICS = {"geneval/geneval_mini_correct": "GenEval-mini (strict)", "ocr/ocr_exact": "OCR (exact)",
           "aesthetic/aesthetic_mini": "Aesthetic-mini"}
#: the same, the task each teacher owns
OWN = {"geneval": "geneval/geneval_mini_correct", "ocr": "ocr/ocr_exact", "aesthetic": "aesthetic/aesthetic_mini"}
EXTRA = {"geneval/geneval_mini": "GenEval partial", "ocr/ocr": "OCR edit acc."}


def training_log(run: Path) -> tuple[list[dict[str, str]], float]:
    """The run's logged rows (all CSV versions, in order) and its training wall-clock minutes."""
    rows: list[dict[str, str]] = []
    for file in sorted(run.glob("csv/version_*/metrics.csv")):
        with open(file) as f:
            rows += list(csv.DictReader(f))
    minutes = [float(r["time/minutes"]) for r in rows if r.get("time/minutes")]
    return rows, max(minutes, default=0.0)


def moving_average(values: list[float], width: int, centred: bool = False) -> list[float]:
    """Mean over the ``width`` values ending at each point (``centred``: around it), shorter at the ends."""
    before, after = (width // 2, width // 2) if centred else (width - 1, 0)
    windows = [values[max(0, i - before): i + after + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def chained_log(root: Path, stages: list[str]) -> tuple[list[dict[str, str]], float]:
    """The logs of runs that continued one another, as one log on one wall-clock axis."""
    rows, offset = [], 0.0
    for stage in stages:
        log, minutes = training_log(root / stage)
        for r in log:
            if r.get("time/minutes"):
                r = dict(r, **{"time/minutes": str(float(r["time/minutes"]) + offset)})
            rows.append(r)
        offset += minutes
    return rows, offset


def command(run: Path) -> str:
    overrides = run / ".hydra" / "overrides.yaml"
    if not overrides.exists():
        return ""
    import yaml

    items = [o for o in yaml.safe_load(overrides.read_text()) if not o.startswith("hydra.")]
    return "python -m opd.train " + " ".join(items)


ROWS = {  # row key → label, the run evaluated (default: the row's last training run), the teachers it distils
    "multi_reward_rl": {"label": "multi-reward RL (DiffusionNFT, alternating tasks)", "stages": ["multi_reward_nft"]},
    "cascade_rl": {"label": "cascade RL (aesthetic → OCR → GenEval)",
                   "stages": ["cascade_aesthetic", "cascade_ocr", "cascade_geneval"]},
    "sopd_geneval": {"label": "SOPD student, GenEval teacher", "teachers": ["geneval"]},
    "sopd_ocr": {"label": "SOPD student, OCR teacher", "teachers": ["ocr"]},
    "sopd_aesthetic": {"label": "SOPD student, aesthetic teacher", "teachers": ["aesthetic"]},
    "mopd": {"label": "**MOPD student** (3 teachers)", "teachers": ["geneval", "ocr", "aesthetic"]},
}


def table_rows(picked: dict, stages: dict[str, list[str]], extra: dict[str, dict]) -> dict[str, dict]:
    """Every row with its evaluated run and training stages; ``stages`` overrides a row's training
    runs (a teacher's: the runs it continued from, then its picked winner), ``extra`` adds rows."""
    rows: dict[str, dict] = {"base": {"label": "base (mini_base)", "run": None, "cfg": 4.5}}
    for skill in ("geneval", "ocr", "aesthetic"):
        winner = picked[skill]["winner"] if skill in picked else f"teacher_{skill}"
        rows[f"teacher_{skill}"] = {"label": f"{skill} teacher ({winner})", "run": f"teacher_{skill}",
                                    "stages": [*stages.get(f"teacher_{skill}", []), winner]}
    for key, row in {**ROWS, **extra}.items():
        row = {"stages": [key], **row}
        if key in stages:
            row["stages"] = stages[key]
        rows[key] = {"run": row["stages"][-1], **row}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=Path("docs/results/mini_base/results.json"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="one NVIDIA H100 shared by two runs")
    parser.add_argument("--stages", default="{}",
                        help='JSON: a row\'s training runs in order, e.g. \'{"mopd": ["mopd_a", "mopd_a_phase2"], '
                             '"teacher_geneval": ["gen_nft_lr1e3"]}\' (a teacher: the runs before its picked winner)')
    parser.add_argument("--extra", default="{}",
                        help='JSON: more MOPD rows, e.g. \'{"mopd_sum": {"label": "MOPD, summed KLs"}}\'')
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier table (results.json, runs.json): rows not evaluated under --runs come from it")
    args = parser.parse_args()
    picked_file = args.runs / "picked.json"
    picked = json.loads(picked_file.read_text()) if picked_file.exists() else {}
    extra = {k: {"teachers": ["geneval", "ocr", "aesthetic"], **v} for k, v in json.loads(args.extra).items()}
    rows = table_rows(picked, json.loads(args.stages), extra)
    previous = ({name: json.loads((args.previous / f"{name}.json").read_text()) for name in ("results", "runs")}
                if args.previous else {"results": {}, "runs": {}})
    results, runs, curves = {}, {}, {}
    base = json.loads(args.base.read_text())["base"]
    for key, row in rows.items():
        if row["run"] is None:
            results[key] = base
            runs[key] = {"minutes": 0.0, "cumulative_minutes": 0.0, "command": "models/mini_base (see its card)"}
            continue
        run = args.runs / row["run"]
        eval_file = run / "eval" / "results.json"
        if not eval_file.exists():
            if key in previous["results"]:
                results[key], runs[key] = previous["results"][key], dict(previous["runs"][key], table=str(args.previous))
                row["label"] = previous["runs"][key].get("label", row["label"])
                row["cfg"] = previous["runs"][key].get("cfg", "")
                row["previous"] = True
                print(f"[table1] {key}: from {args.previous}")
            else:
                print(f"[table1] {key}: no evaluation at {eval_file}; row left out")
            continue
        results[key] = json.loads(eval_file.read_text())[row["run"]]
        hydra_cfg = run / "eval" / ".hydra" / "config.yaml"
        if hydra_cfg.exists():
            import yaml

            row["cfg"] = yaml.safe_load(hydra_cfg.read_text()).get("guidance_scale")
        log, own = chained_log(args.runs, row["stages"])
        cumulative = own + sum(runs.get(f"teacher_{t}", {}).get("minutes", 0.0) for t in row.get("teachers", []))
        runs[key] = {"run": row["run"], "stages": row["stages"], "minutes": round(own, 2),
                     "cumulative_minutes": round(cumulative, 2), "label": row["label"], "cfg": row.get("cfg"),
                     "command": " ; ".join(command(args.runs / s) for s in row["stages"]), "device": args.device}
        curves[key] = log
    for key in list(curves):  # a row that another row continues is that row's curve up to its end
        if any(len(r["stages"]) > len(rows[key]["stages"]) and r["stages"][:len(rows[key]["stages"])] == rows[key]["stages"]
               for r in rows.values() if r.get("run")):
            del curves[key]
    write_outputs(args.out, rows, results, runs, curves, args.device, args.previous)


def gain_share(results: dict, student: str, teachers: list[str]) -> dict[str, float]:
    """Fraction of each teacher's gain over the base that ``student`` keeps on the teacher's task."""
    out = {}
    for t in teachers:
        metric, teacher = OWN[t], results.get(f"teacher_{t}")
        if teacher is None or student not in results:
            continue
        gain = teacher[metric] - results["base"][metric]
        out[t] = (results[student][metric] - results["base"][metric]) / gain if gain > 0 else float("nan")
    return out


def write_outputs(out: Path, rows: dict, results: dict, runs: dict, curves: dict, device: str,
                  previous: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    head = ["model", "CFG", *METRICS.values(), *EXTRA.values(), "GPU min (own)", "GPU min (incl. teachers)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        if key not in results:
            continue
        r = results[key]
        label = row["label"] + (" ¹" if row.get("previous") else "")
        cells = [label, str(row.get("cfg", "")), *(f"{r[m]:.3f}" for m in METRICS), *(f"{r[m]:.3f}" for m in EXTRA),
                 f"{runs[key]['minutes']:.1f}", f"{runs[key]['cumulative_minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    shares = []
    for key in [k for k, row in rows.items() if row.get("teachers")]:
        share = gain_share(results, key, rows[key]["teachers"])
        if share:
            shares.append(f"- {rows[key]['label']}: " + ", ".join(f"{t} {100 * v:.0f}%" for t, v in share.items()))
    intro = ("All rows evaluated by `make eval` (all 655 test prompts, 40 ODE steps, seed 0) at the CFG scale in "
             "the table: 4.5 for the base, the GRPO-Guard aesthetic teacher and the OPD students (which sample with "
             "CFG), 1.0 for the DiffusionNFT-trained models (CFG-free by construction). GPU minutes are training "
             f"wall-clock on {device}.")
    if any(row.get("previous") for row in rows.values()):
        intro += (f" ¹ Carried over from the earlier table `{previous}` (same evaluation; its device and command "
                  "in runs.json); its curves are in that table's curves.png.")
    md = "\n".join(["# The mini Table 1", "", intro, "", *lines, "",
                    "## Share of each teacher's gain (over the base, on the teacher's own task) kept by the students",
                    "", *shares, ""])
    (out / "results.md").write_text(md)
    plot_curves(out / "curves.png", curves)
    print(md)


def plot_curves(path: Path, curves: dict[str, list[dict[str, str]]]) -> None:
    """Training rewards (RL runs) and teacher-slot monitor rewards (OPD runs) against minutes."""
    skills = {"geneval": ("geneval_mini",), "ocr": ("ocr",), "aesthetic": ("aesthetic_mini",)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (skill, names) in zip(axes, skills.items()):
        for key, log in curves.items():
            keys = {k for r in log for k in r}  # chained stages log different keys
            cols = [c for c in sorted(keys) for n in names if c in (f"reward/{n}", f"teacher/{skill}/{n}")]
            for col in cols:
                pts = [(float(r["time/minutes"]), float(r[col])) for r in log if r.get(col) and r.get("time/minutes")]
                if len(pts) < 2:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, moving_average(list(ys), max(1, len(ys) // 25)), label=key)  # over ~4% of the run
        ax.set_title(f"{skill}: reward during training")
        ax.set_xlabel("wall-clock minutes (training)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
