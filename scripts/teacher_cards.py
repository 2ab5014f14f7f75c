"""Write the shipped mini teachers' model cards and their results page from a plan's runs.

    python scripts/teacher_cards.py --runs runs/table1 --teachers models/mini_teachers \
        --results docs/results/mini_teachers --device "NVIDIA H100 (shared by two runs)"

For each skill in ``picked.json``: ``<teachers>/<skill>/README.md`` (how it was trained: command,
minutes, device, the candidates it was picked from and their validation scores, its test scores
against the base) and ``<results>/<skill>_curves.png`` (training reward against wall-clock);
``<results>/results.md`` / ``results.json`` hold base vs the three teachers on all three tasks.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mini_table1 import EXTRA, METRICS, OWN, chained_log, command, moving_average


def algorithm(run: str) -> str:
    """The plan's run names say the algorithm (``*nft*`` = DiffusionNFT, else GRPO-Guard)."""
    return "DiffusionNFT" if "nft" in run else "GRPO-Guard"


def plot(root: Path, stages: list[str], skill: str, out: Path) -> None:
    log, _ = chained_log(root, stages)
    keys = sorted({k for r in log for k in r if k.startswith("reward/") and not k.endswith("_std")
                   and k.count("/") == 1})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in keys:
        pts = [(float(r["time/minutes"]), float(r[key])) for r in log if r.get(key) and r.get("time/minutes")]
        if not pts:
            continue
        xs, ys = zip(*pts)
        smooth = moving_average(list(ys), max(1, len(ys) // 25))
        ax.plot(xs, ys, lw=0.6, alpha=0.35)
        ax.plot(xs, smooth, lw=1.8, label=f"{key} (moving avg.)")
    ax.set_xlabel("training wall-clock minutes")
    ax.set_ylabel("mean reward of the round's rollouts")
    ax.set_title(f"mini {skill} teacher: training reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--teachers", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=Path("docs/results/mini_base/results.json"))
    parser.add_argument("--device", default="one NVIDIA H100 shared by two runs")
    parser.add_argument("--teacher-stages", default="{}", help="JSON: runs a teacher continued from")
    args = parser.parse_args()
    picked = json.loads((args.runs / "picked.json").read_text())
    base = json.loads(args.base.read_text())["base"]
    args.results.mkdir(parents=True, exist_ok=True)
    table = {"base": base}
    for skill, pick in picked.items():
        winner = pick["winner"]
        stages = [*json.loads(args.teacher_stages).get(skill, []), winner]
        test = json.loads((args.runs / f"teacher_{skill}" / "eval" / "results.json").read_text())[f"teacher_{skill}"]
        table[f"teacher_{skill}"] = test
        _, minutes = chained_log(args.runs, stages)
        plot(args.runs, stages, skill, args.results / f"{skill}_curves.png")
        grids = args.runs / f"teacher_{skill}" / "eval" / "grids"
        if grids.is_dir():
            for png in grids.glob("*.png"):
                shutil.copy(png, args.results / png.name)
        guidance = pick["candidates"][winner]["guidance_scale"]
        own = OWN[skill]
        candidates = "\n".join(f"| {n} | {algorithm(n)} | {c['score']:.3f} |" for n, c in pick["candidates"].items())
        scores = "\n".join(f"| {METRICS.get(m, EXTRA.get(m, m))} | {base[m]:.3f} | {test[m]:.3f} | {test[m] - base[m]:+.3f} |"
                           for m in [*METRICS, *EXTRA])
        card = f"""# mini {skill} teacher

A LoRA (rank 16, alpha 32, on every attention projection) on `models/mini_base`, trained with
**{algorithm(winner)}** on the `{skill}` training prompts of the mini world, rewarded by the
`{pick['metric'].split('/')[1].removesuffix('_exact').removesuffix('_correct')}` reward. Sample it
at **CFG {guidance}**. Used as the `{skill}` teacher of the mini DiffusionOPD experiments
(`conf/teacher/mini_{skill}.yaml`).

- **Made by** (run{'s' if len(stages) > 1 else ''} {', '.join(f'`{x}`' for x in stages)} of `scripts/plans/mini_table1.yaml`, each continuing the last):
{chr(10).join(f'  `{command(args.runs / x)}`' for x in stages)}
- **Device**: {args.device}; **training time**: {minutes:.1f} min wall-clock
- **Weights**: the EMA of the LoRA weights (decay 0.9 every 8 steps), diffusers format
  (`pytorch_lora_weights.safetensors`, fp16).

## Test scores (`make eval`: all test prompts, 40 ODE steps, seed 0)

| metric | base | this teacher | change |
|---|---|---|---|
{scores}

## How it was picked

Candidates differed in learning rate (and, for GenEval, algorithm); each was evaluated on 300
*training* prompts per task (seed 1) and the best on its own metric (`{own}`) won. The test sets
were never used for the choice.

| candidate | algorithm | validation {own} |
|---|---|---|
{candidates}

Training reward against wall-clock: `docs/results/mini_teachers/{skill}_curves.png`.
"""
        (args.teachers / skill).mkdir(parents=True, exist_ok=True)
        (args.teachers / skill / "README.md").write_text(card)
    (args.results / "results.json").write_text(json.dumps(table, indent=1, sort_keys=True))
    head = ["model", *METRICS.values(), *EXTRA.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in table.items():
        lines.append("| " + " | ".join([name, *(f"{r[m]:.3f}" for m in [*METRICS, *EXTRA])]) + " |")
    (args.results / "results.md").write_text("# Mini teachers vs the base (test prompts, `make eval`)\n\n"
                                             + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
