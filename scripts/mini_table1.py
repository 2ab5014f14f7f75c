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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=Path("docs/results/mini_base/results.json"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="one NVIDIA H100 shared by two runs")
    parser.add_argument("--teacher-stages", default="{}",
                        help='JSON: runs a teacher continued from, e.g. \'{"geneval": ["gen_nft_lr1e3"]}\'')
    parser.add_argument("--cascade-stages", default="cascade_aesthetic,cascade_ocr,cascade_geneval",
                        help="the cascade's runs in order (the first table's stage 1 was the aesthetic teacher: "
                             "aes_lr1e3,cascade_ocr,cascade_geneval)")
    args = parser.parse_args()
    picked = json.loads((args.runs / "picked.json").read_text())
    stages = {skill: [p["winner"]] for skill, p in picked.items()}
    for skill, runs_before in json.loads(args.teacher_stages).items():  # a teacher trained in several runs
        stages[skill] = [*runs_before, *stages[skill]]
    cascade = args.cascade_stages.split(",")
    rows: dict[str, dict] = {"base": {"label": "base (mini_base)", "run": None, "cfg": 4.5}}
    for skill in ("geneval", "ocr", "aesthetic"):
        rows[f"teacher_{skill}"] = {"label": f"{skill} teacher ({picked[skill]['winner']})", "run": f"teacher_{skill}",
                                    "stages": stages[skill]}
    rows.update({
        "multi_reward_rl": {"label": "multi-reward RL (DiffusionNFT, alternating tasks)", "run": "multi_reward_nft"},
        "cascade_rl": {"label": "cascade RL (aesthetic → OCR → GenEval)", "run": cascade[-1], "stages": cascade},
        "sopd_geneval": {"label": "SOPD student, GenEval teacher", "run": "sopd_geneval", "teachers": ["geneval"]},
        "sopd_ocr": {"label": "SOPD student, OCR teacher", "run": "sopd_ocr", "teachers": ["ocr"]},
        "sopd_aesthetic": {"label": "SOPD student, aesthetic teacher", "run": "sopd_aesthetic",
                           "teachers": ["aesthetic"]},
        "mopd": {"label": "**MOPD student** (3 teachers)", "run": "mopd", "teachers": ["geneval", "ocr", "aesthetic"]},
    })
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
            print(f"[table1] {key}: no evaluation at {eval_file}; row left out")
            continue
        results[key] = json.loads(eval_file.read_text())[row["run"]]
        hydra_cfg = run / "eval" / ".hydra" / "config.yaml"
        if hydra_cfg.exists():
            import yaml

            row["cfg"] = yaml.safe_load(hydra_cfg.read_text()).get("guidance_scale")
        stages = row.get("stages", [row["run"]])
        log, own = chained_log(args.runs, stages)
        cumulative = own + sum(runs.get(f"teacher_{t}", {}).get("minutes", 0.0) for t in row.get("teachers", []))
        runs[key] = {"run": row["run"], "stages": stages, "minutes": round(own, 2),
                     "cumulative_minutes": round(cumulative, 2),
                     "command": " ; ".join(command(args.runs / s) for s in stages), "device": args.device}
        curves[key] = log
    write_outputs(args.out, rows, results, runs, curves)


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


def write_outputs(out: Path, rows: dict, results: dict, runs: dict, curves: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    head = ["model", "CFG", *METRICS.values(), *EXTRA.values(), "GPU min (own)", "GPU min (incl. teachers)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        if key not in results:
            continue
        r = results[key]
        cells = [row["label"], str(row.get("cfg", "")), *(f"{r[m]:.3f}" for m in METRICS), *(f"{r[m]:.3f}" for m in EXTRA),
                 f"{runs[key]['minutes']:.1f}", f"{runs[key]['cumulative_minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    shares = []
    for key in ("mopd", "sopd_geneval", "sopd_ocr", "sopd_aesthetic"):
        share = gain_share(results, key, rows[key].get("teachers", []))
        if share:
            shares.append(f"- {rows[key]['label']}: " + ", ".join(f"{t} {100 * v:.0f}%" for t, v in share.items()))
    intro = ("All rows evaluated by `make eval` (all 655 test prompts, 40 ODE steps, seed 0) at the CFG scale in "
             "the table: 4.5 for the base, the GRPO-Guard aesthetic teacher and the OPD students (which sample with "
             "CFG), 1.0 for the DiffusionNFT-trained models (CFG-free by construction). GPU minutes are training "
             "wall-clock on an H100 shared by 2-3 mini runs.")
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
                k = max(1, len(ys) // 25)  # moving average over ~4% of the run
                smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
                ax.plot(xs, smooth, label=key)
        ax.set_title(f"{skill}: reward during training")
        ax.set_xlabel("wall-clock minutes (training)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
