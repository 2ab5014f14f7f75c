"""Write the mini teachers' model cards and their results page from a folder of runs (``make mini-teachers``).

    python -m opd.results.teacher_cards --runs runs/teachers --teachers runs/teachers/teachers \
        --results runs/teachers/cards [--teacher-stages '{"geneval": ["gen_nft_lr1e3"]}'] [--device TEXT]

For each skill in ``<runs>/picked.json`` (:mod:`opd.results.pick_teachers`): ``<teachers>/<skill>/README.md``
(how it was trained: commands, minutes, device; the candidates it was picked from with their
validation scores, also of snapshots scored on val but no longer on disk; its test scores,
``<runs>/teacher_<skill>/eval/results.json``, against the base, with 95 % intervals and the controls:
swapped prompts, prompt sensitivity, the cover image; ``--notes DIR`` adds ``DIR/<skill>.md`` as
"What was tried") and ``<results>/<skill>_curves.png`` (training reward against wall-clock, with the test grids copied
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

from opd.evaluation.report import COVER
from opd.results.logs import MINUTES, chained_log, moving_average, run_command, snapshot_of, stages_of
from opd.results.metrics import columns, evaluated_rows, guidance_scales, reward_names, with_interval
from opd.utils.files import write_atomic


def algorithm(run: str, root: Path | None = None) -> str:
    """The RL algorithm of run ``<root>/<run>``: from its ``.hydra/config.yaml`` (``module._target_``,
    with the KL weight towards the base, ``objective.kl_weight``, where it records one), else from its
    name (``*nft*`` is DiffusionNFT, anything else GRPO-Guard)."""
    config = Path(root or ".") / run / ".hydra" / "config.yaml"
    target, kl = "", None
    if root is not None and config.is_file():
        recorded = OmegaConf.load(config)
        target = str(OmegaConf.select(recorded, "module._target_", default="") or "")
        kl = OmegaConf.select(recorded, "objective.kl_weight", default=None)
    name = "DiffusionNFT" if "nft" in (target or run).lower() else "GRPO-Guard"
    return name if kl is None else f"{name}, KL weight {float(kl):g}"


def scores_table(rows: Mapping[str, Mapping[str, float]], cols: Mapping[str, str]) -> str:
    """A markdown table: one line per row, one column per metric (``cols`` = title → results key)."""
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[m]:.3f}" if m in r else "–" for m in cols.values()) + " |")
    return "\n".join(lines) + "\n"


def controls_table(test: Mapping[str, float], cover: Mapping[str, float], cols: Mapping[str, str]) -> str:
    """Per metric: the model's images (a teacher's, a student's) scored against swapped prompts, its prompt sensitivity
    (``<task>/sensitivity``, the base = 1) and the cover image's score; empty without any of them."""
    lines = []
    for title, m in cols.items():
        task = m.split("/")[0]
        cells = [with_interval(test, f"{m}/swapped") if f"{m}/swapped" in test else "–",
                 f"{test[f'{task}/sensitivity']:.2f}" if f"{task}/sensitivity" in test else "–",
                 f"{cover[m]:.3f}" if m in cover else "–"]
        if any(c != "–" for c in cells):
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return ("\n| metric | its images against swapped prompts | prompt sensitivity (base = 1) | cover image |\n"
            "|---|---|---|---|\n" + "\n".join(lines) + "\n")


# suffixes of a metric's key that are not prompt tags
NOT_TAGS = frozenset({"ci_low", "ci_high", "swapped"})


def per_tag_table(base: Mapping[str, float], test: Mapping[str, float], metric: str) -> str:
    """``metric`` tag by tag (tasks averaged over their prompts' tags, as GenEval): base, teacher and
    change; empty for a metric without tags."""
    prefix = f"{metric}/"
    tags = sorted(key.removeprefix(prefix) for key in test if key.startswith(prefix) and key in base
                  and "/" not in key.removeprefix(prefix) and key.removeprefix(prefix) not in NOT_TAGS)
    if not tags:
        return ""
    rows = "\n".join(f"| {t} | {base[prefix + t]:.3f} | {test[prefix + t]:.3f} | {test[prefix + t] - base[prefix + t]:+.3f} |"
                     for t in tags)
    return f"\nBy prompt tag (`{metric}`):\n\n| tag | base | this teacher | change |\n|---|---|---|---|\n{rows}\n"


def card(skill: str, pick: Mapping, stages: Sequence[str], commands: Sequence[str], minutes: float,
         base: Mapping[str, float], test: Mapping[str, float], cols: Mapping[str, str], rewards: Sequence[str],
         device: str = "", curves: str = "", root: Path | None = None, cover: Mapping[str, float] | None = None,
         not_kept: Mapping[str, float] | None = None, notes: str = "", base_cfg: float | None = None,
         grid: str = "", val_plot: str = "") -> str:
    """The teacher's model card (markdown). ``pick``: its entry of picked.json; ``stages``: its runs
    (under ``root``), each continuing the last, with their ``commands``; ``test``/``base``: test scores;
    ``cover``: the cover image's test scores; ``not_kept``: ``{candidate: val score}`` of snapshots scored
    on val whose weights are gone; ``notes``: markdown for "What was tried"; ``base_cfg``: the CFG scale
    of the base's row; ``grid``: the teacher's test grid on its own task; ``val_plot``: its snapshots' val
    scores drawn against their steps."""
    winner = pick["winner"]
    guidance = pick["candidates"][winner].get("guidance_scale")
    run, step = snapshot_of(winner)
    snapshot = f"; the weights are its EMA snapshot at step {step}, the best on val" if step is not None else ""
    scores = "\n".join(f"| {title} | {with_interval(base, m)} | {with_interval(test, m)} | {test[m] - base[m]:+.3f} |"
                       for title, m in cols.items() if m in base and m in test)
    listed = {**{n: (c["score"], "") for n, c in pick["candidates"].items()},
              **{n: (s, " (snapshot not kept)") for n, s in (not_kept or {}).items()}}
    candidates = "\n".join(f"| {n}{'  **picked**' if n == winner else ''} | {algorithm(snapshot_of(n)[0], root)} | "
                           f"{score:.3f}{note} |" for n, (score, note) in sorted(listed.items()))
    made_by = "\n".join(f"  `{c}`" for c in commands if c)
    controls = controls_table(test, cover or {}, cols) + per_tag_table(base, test, pick["metric"])
    return f"""# mini {skill} teacher

A LoRA on `models/mini_base`, trained with **{algorithm(run, root)}** on the `{skill}` training prompts
of the mini world, rewarded by {', '.join(f'`{r}`' for r in rewards)}. Sample it at **CFG {guidance}**.
Used as the `{skill}` teacher of the mini DiffusionOPD experiments (`conf/teacher/mini_{skill}.yaml`).

- **Made by** (run{'s' if len(stages) > 1 else ''} {', '.join(f'`{x}`' for x in stages)}{', each continuing the last' if len(stages) > 1 else ''}):
{made_by}
- **Device**: {device or 'not recorded'}; **training time**: {minutes:.1f} min wall-clock{snapshot}
- **Weights**: the EMA of the LoRA weights, diffusers format (`pytorch_lora_weights.safetensors`).

## Test scores (`python -m opd.evaluate`: all test prompts)

In brackets: 95 % intervals (bootstrap over prompts).{f' Its images on its own test prompts: `{grid}`.' if grid else ''}

| metric | base{f' (CFG {base_cfg:g})' if base_cfg is not None else ''} | this teacher (CFG {guidance}) | change |
|---|---|---|---|
{scores}
{controls}
## How it was picked

Each candidate (a run's final adapter, or each of its EMA snapshots) was evaluated on the task's
held-out *val* prompts and the best on the task's own metric (`{pick['metric']}`) won. The test
sets were never used for the choice.

| candidate | algorithm | validation {pick['metric']} |
|---|---|---|
{candidates}
""" + (f"\nThe snapshots' val scores against their steps: `{val_plot}`.\n" if val_plot else "") + (
        f"\nTraining reward against wall-clock: `{curves}`.\n" if curves else "") + (
        f"\n## What was tried\n\n{notes.strip()}\n" if notes.strip() else "")


def candidate_vals(root: Path, pick: Mapping) -> dict[str, dict[str, dict[str, float]]]:
    """``{run: the rows of its val/results.json}`` of each run among ``pick``'s candidates that has one."""
    runs = sorted({snapshot_of(n)[0] for n in pick["candidates"]})
    return {run: evaluated_rows(Path(root) / run / "val" / "results.json") for run in runs
            if (Path(root) / run / "val" / "results.json").is_file()}


def val_rows_not_kept(root: Path, pick: Mapping) -> dict[str, float]:
    """``{run/row: val score}`` of the rows of each candidate run's ``val/results.json`` that are not
    candidates any more (their snapshot's weights were not kept)."""
    out = {}
    for run, rows in candidate_vals(root, pick).items():
        for row, scores in rows.items():
            name = f"{run}/{row}"
            if name not in pick["candidates"] and run not in pick["candidates"] and pick["metric"] in scores:
                out[name] = scores[pick["metric"]]
    return out


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


def plot_val(series: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str, picked: str,
             base: float | None, skill: str, out: Path) -> int:
    """Every candidate run's snapshots (``step_NNNNNN`` rows of ``series[run]``, its val results) against
    their step, each with its 95 % interval, the picked ``run/row`` marked and ``base`` as a line; returns
    the number of runs drawn (0: none has snapshot rows, nothing is written)."""
    curves = {}
    for run, val in series.items():
        pts = sorted(((step, r) for row, r in val.items()
                      if (step := snapshot_of(f"{run}/{row}")[1]) is not None and metric in r), key=lambda pt: pt[0])
        if pts:
            curves[run] = pts
    if not curves:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for run, pts in curves.items():
        ys = [r[metric] for _, r in pts]
        lo = [r[metric] - r.get(f"{metric}/ci_low", r[metric]) for _, r in pts]
        hi = [r.get(f"{metric}/ci_high", r[metric]) - r[metric] for _, r in pts]
        ax.errorbar([s for s, _ in pts], ys, yerr=[lo, hi], marker="o", capsize=3, alpha=0.85,
                    label=f"{run}: EMA snapshots (95 % interval)")
    (run, step), row = snapshot_of(picked), picked.rpartition("/")[2]
    if step is not None and row in series.get(run, {}):
        ax.plot([step], [series[run][row][metric]], marker="*", ms=16, ls="", color="C3",
                label=f"picked ({picked})")
    if base is not None:
        ax.axhline(base, color="grey", ls="--", lw=1, label="base on val")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"val {metric}")
    ax.set_title(f"mini {skill} teacher candidates on the val prompts")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return len(curves)


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
    parser.add_argument("--base-cfg", type=float, default=None,
                        help="the base row's CFG scale (default: from its evaluation's .hydra record, else 4.5)")
    parser.add_argument("--val-base", nargs="*", default=[], metavar="SKILL=SCORE",
                        help="the base's val score on each skill's metric: a line in the val plots")
    parser.add_argument("--notes", type=Path, help="a folder of <skill>.md: what was tried, added to each card")
    args = parser.parse_args(argv)
    picked = json.loads((args.runs / "picked.json").read_text())
    cols, rewards = columns(args.suite), reward_names(args.suite)
    base = evaluated_rows(args.base)["base"]
    val_base = {k: float(v) for k, v in (pair.split("=", 1) for pair in args.val_base)}
    base_cfg = args.base_cfg if args.base_cfg is not None else guidance_scales(args.base).get("base", 4.5)
    args.results.mkdir(parents=True, exist_ok=True)
    table = {"base": base}
    for skill, pick in picked.items():
        given = json.loads(args.teacher_stages).get(skill)  # else the runs its winner continued (init_adapter)
        stages = [*given, pick["winner"]] if given is not None else stages_of(args.runs, pick["winner"])
        evaluation = args.runs / f"teacher_{skill}" / "eval"
        test = table[f"teacher_{skill}"] = evaluated_rows(evaluation / "results.json")[f"teacher_{skill}"]
        cover = json.loads((evaluation / "results.json").read_text()).get(COVER, {})
        notes = args.notes / f"{skill}.md" if args.notes else None
        log, minutes = chained_log(args.runs, stages)  # a snapshot's teacher: its run up to that step
        plot(log, skill, args.results / f"{skill}_curves.png")
        for png in sorted((evaluation / "grids").glob("*.png")):
            shutil.copy(png, args.results / png.name)
        grid = args.results / f"teacher_{skill}_{skill}.png"  # the evaluation's grid of <row>_<task>
        val_plot = args.results / f"{skill}_val.png"
        drawn = plot_val(candidate_vals(args.runs, pick), pick["metric"], pick["winner"], val_base.get(skill),
                         skill, val_plot)
        runs = [snapshot_of(s)[0] for s in stages]
        text = card(skill, pick, runs, [run_command(args.runs / r) for r in runs], minutes, base, test, cols,
                    rewards.get(skill, []), args.device, str(args.results / f"{skill}_curves.png"), args.runs,
                    cover, val_rows_not_kept(args.runs, pick), notes.read_text() if notes and notes.is_file() else "",
                    base_cfg, str(grid) if grid.is_file() else "", str(val_plot) if drawn else "")
        (args.teachers / skill).mkdir(parents=True, exist_ok=True)
        (args.teachers / skill / "README.md").write_text(text)
    (args.results / "results.json").write_text(json.dumps(table, indent=1, sort_keys=True))
    page = "# Mini teachers vs the base (test prompts)\n\n" + scores_table(table, cols)
    write_atomic(args.results / "results.md", page)  # last: the file make waits for
    print(page)
    return table


if __name__ == "__main__":
    main()
