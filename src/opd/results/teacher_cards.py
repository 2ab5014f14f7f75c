"""Write the mini teachers' model cards and their results page from a folder of runs (``make mini-teachers``).

    python -m opd.results.teacher_cards --runs runs/teachers --teachers runs/teachers/teachers \
        --results runs/teachers/cards [--teacher-stages '{"geneval": ["gen_nft_lr1e3"]}'] [--device TEXT]

For each skill in ``<runs>/picked.json`` (:mod:`opd.results.pick_teachers`): ``<teachers>/<skill>/README.md``
(how it was trained: commands, minutes, device; the candidates it was picked from with their
validation scores; its test scores, ``<runs>/teacher_<skill>/eval/results.json``, against the base)
and ``<results>/<skill>_curves.png`` (training reward against wall-clock, with the test grids copied
beside it); ``<results>/results.md`` / ``results.json`` hold the base and the teachers on every
task. The metrics are the headlines of ``conf/eval_tasks/<suite>.yaml``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import OmegaConf

from opd.results.logs import MINUTES, chained_log, moving_average, run_command, snapshot_of
from opd.results.metrics import columns, evaluated_rows, reward_names
from opd.utils.files import write_atomic


def algorithm(run: str, root: Path | None = None) -> str:
    """The RL algorithm of run ``<root>/<run>``: from its ``.hydra/config.yaml`` (``module._target_``),
    else from its name (``*nft*`` is DiffusionNFT, anything else GRPO-Guard)."""
    config = Path(root or ".") / run / ".hydra" / "config.yaml"
    target = ""
    if root is not None and config.is_file():
        target = str(OmegaConf.select(OmegaConf.load(config), "module._target_", default="") or "")
    return "DiffusionNFT" if "nft" in (target or run).lower() else "GRPO-Guard"


def scores_table(rows: Mapping[str, Mapping[str, float]], cols: Mapping[str, str]) -> str:
    """A markdown table: one line per row, one column per metric (``cols`` = title → results key)."""
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[m]:.3f}" if m in r else "–" for m in cols.values()) + " |")
    return "\n".join(lines) + "\n"


def card(skill: str, pick: Mapping, stages: Sequence[str], commands: Sequence[str], minutes: float,
         base: Mapping[str, float], test: Mapping[str, float], cols: Mapping[str, str], rewards: Sequence[str],
         device: str = "", curves: str = "", root: Path | None = None) -> str:
    """The teacher's model card (markdown). ``pick``: its entry of picked.json; ``stages``: its runs
    (under ``root``), each continuing the last, with their ``commands``; ``test``/``base``: test scores."""
    winner = pick["winner"]
    guidance = pick["candidates"][winner].get("guidance_scale")
    run, step = snapshot_of(winner)
    snapshot = f"; the weights are its EMA snapshot at step {step}, the best on val" if step is not None else ""
    scores = "\n".join(f"| {title} | {base[m]:.3f} | {test[m]:.3f} | {test[m] - base[m]:+.3f} |"
                       for title, m in cols.items() if m in base and m in test)
    candidates = "\n".join(f"| {n} | {algorithm(snapshot_of(n)[0], root)} | {c['score']:.3f} |"
                           for n, c in pick["candidates"].items())
    made_by = "\n".join(f"  `{c}`" for c in commands if c)
    return f"""# mini {skill} teacher

A LoRA on `models/mini_base`, trained with **{algorithm(run, root)}** on the `{skill}` training prompts
of the mini world, rewarded by {', '.join(f'`{r}`' for r in rewards)}. Sample it at **CFG {guidance}**.
Used as the `{skill}` teacher of the mini DiffusionOPD experiments (`conf/teacher/mini_{skill}.yaml`).

- **Made by** (run{'s' if len(stages) > 1 else ''} {', '.join(f'`{x}`' for x in stages)}{', each continuing the last' if len(stages) > 1 else ''}):
{made_by}
- **Device**: {device or 'not recorded'}; **training time**: {minutes:.1f} min wall-clock{snapshot}
- **Weights**: the EMA of the LoRA weights, diffusers format (`pytorch_lora_weights.safetensors`).

## Test scores (`python -m opd.evaluate`: all test prompts)

| metric | base | this teacher | change |
|---|---|---|---|
{scores}

## How it was picked

Each candidate (a run's final adapter, or each of its EMA snapshots) was evaluated on the task's
held-out *val* prompts and the best on the task's own metric (`{pick['metric']}`) won. The test
sets were never used for the choice.

| candidate | algorithm | validation {pick['metric']} |
|---|---|---|
{candidates}
""" + (f"\nTraining reward against wall-clock: `{curves}`.\n" if curves else "")


def plot(log: list[dict[str, str]], skill: str, out: Path) -> None:
    """The training rewards of a teacher's (chained) log against minutes, raw and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in log for k in r if k.startswith("reward/") and not k.endswith("_std") and k.count("/") == 1})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in keys:
        pts = [(float(r[MINUTES]), float(r[key])) for r in log if r.get(key) and r.get(MINUTES)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=0.6, alpha=0.35)
        ax.plot(xs, moving_average(ys, max(1, len(ys) // 25)), lw=1.8, label=f"{key} (moving avg.)")
    ax.set_xlabel("training wall-clock minutes")
    ax.set_ylabel("mean reward of the round's rollouts")
    ax.set_title(f"mini {skill} teacher: training reward")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--teachers", type=Path, required=True, help="the cards go to <teachers>/<skill>/README.md")
    parser.add_argument("--results", type=Path, required=True, help="the results page's folder")
    parser.add_argument("--base", type=Path, default=Path("docs/results/mini_base/results.json"))
    parser.add_argument("--suite", default="mini")
    parser.add_argument("--device", default="")
    parser.add_argument("--teacher-stages", default="{}", help="JSON: the runs each teacher's winner continued")
    args = parser.parse_args(argv)
    picked = json.loads((args.runs / "picked.json").read_text())
    cols, rewards = columns(args.suite), reward_names(args.suite)
    base = evaluated_rows(args.base)["base"]
    args.results.mkdir(parents=True, exist_ok=True)
    table = {"base": base}
    for skill, pick in picked.items():
        stages = [*json.loads(args.teacher_stages).get(skill, []), pick["winner"]]
        evaluation = args.runs / f"teacher_{skill}" / "eval"
        test = table[f"teacher_{skill}"] = evaluated_rows(evaluation / "results.json")[f"teacher_{skill}"]
        log, minutes = chained_log(args.runs, stages)  # a snapshot's teacher: its run up to that step
        plot(log, skill, args.results / f"{skill}_curves.png")
        for png in sorted((evaluation / "grids").glob("*.png")):
            shutil.copy(png, args.results / png.name)
        runs = [snapshot_of(s)[0] for s in stages]
        text = card(skill, pick, runs, [run_command(args.runs / r) for r in runs], minutes, base, test, cols,
                    rewards.get(skill, []), args.device, str(args.results / f"{skill}_curves.png"), args.runs)
        (args.teachers / skill).mkdir(parents=True, exist_ok=True)
        (args.teachers / skill / "README.md").write_text(text)
    (args.results / "results.json").write_text(json.dumps(table, indent=1, sort_keys=True))
    page = "# Mini teachers vs the base (test prompts)\n\n" + scores_table(table, cols)
    write_atomic(args.results / "results.md", page)  # last: the file make waits for
    print(page)
    return table


if __name__ == "__main__":
    main()
