"""One metric over training seeds: each group's mean and 95 % t-interval per checkpoint row, the paired
difference of two groups seed by seed, a table and a plot against the rows' steps.

    python -m opd.results.over_seeds --metric ocr/ocr_exact --out docs/results/ode_vs_sde_cpu \
        --group ode runs/odesde/ode_s*/val/results.json --group flow_sde runs/odesde/flow_sde_s*/val/results.json \
        --start 0.229 --line "guided base=0.578" --line "teacher=0.853"

Each ``--group LABEL FILE...`` names one evaluation (``results.json`` of ``python -m opd.evaluate``) per
training seed, in seed order; its rows are checkpoints whose names end in their step (``s8``, ``s16``,
``step_000024``). The first two groups are compared seed by seed (seed i of one against seed i of the
other: the same seed gives both the same prompts and starting noise), so they must have equal numbers
of seeds. Writes ``summary.json`` and ``over_seeds.png`` into ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

#: two-sided 95 % quantiles of Student's t for 1-10 degrees of freedom (beyond: the Cornish-Fisher
#: expansion around the normal quantile, within 0.001 of the exact value)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1; got {df}")
    if df in T_975:
        return T_975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` (one per training seed, ≥ 2) and its 95 % t-interval
    ``mean ± t · sd / √n``."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval over seeds needs two seeds or more; got {n}")
    mean = sum(values) / n
    half = t_quantile(n - 1) * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, mean - half, mean + half


def row_step(row: str) -> int:
    """The step a checkpoint row's name ends in (``s16`` → 16, ``step_000024`` → 24)."""
    match = re.search(r"(\d+)$", row)
    if match is None:
        raise ValueError(f"row {row!r}: its name does not end in a step number")
    return int(match.group(1))


def interval(values: Sequence[float]) -> dict[str, float | list[float]]:
    """Mean and 95 % t-interval of ``values`` (one per seed; ≥ 2), with the values."""
    mean, low, high = t_interval(values)
    return {"mean": mean, "ci_low": low, "ci_high": high, "seeds": list(values)}


def per_seed(files: Sequence[Path], metric: str) -> dict[str, list[float]]:
    """``{row: [value of seed 0, seed 1, ...]}`` over the rows every file holds."""
    tables = [json.loads(Path(f).read_text()) for f in files]
    rows = [r for r in tables[0] if all(isinstance(t.get(r), Mapping) and metric in t[r] for t in tables)]
    if not rows:
        raise ValueError(f"no row holds {metric!r} in every one of {', '.join(map(str, files))}")
    return {r: [float(t[r][metric]) for t in tables] for r in sorted(rows, key=row_step)}


def summarise(groups: Mapping[str, Sequence[Path]], metric: str) -> dict:
    values = {label: per_seed(files, metric) for label, files in groups.items()}
    summary: dict = {label: {r: interval(v) for r, v in rows.items()} for label, rows in values.items()}
    if len(values) >= 2:
        (a, rows_a), (b, rows_b) = list(values.items())[:2]
        if len(groups[a]) != len(groups[b]):
            raise ValueError(f"pairing {a} with {b} needs as many seeds in each; got {len(groups[a])} and {len(groups[b])}")
        summary[f"{a} - {b}"] = {r: interval([x - y for x, y in zip(rows_a[r], rows_b[r])])
                                 for r in rows_a if r in rows_b}
    return summary


def markdown(summary: Mapping, metric: str) -> str:
    labels = list(summary)
    rows = sorted({r for label in labels for r in summary[label]}, key=row_step)
    cell = lambda s: f"{s['mean']:.3f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
    lines = [f"| step | {' | '.join(labels)} |", "|---|" + "---|" * len(labels)]
    lines += [f"| {row_step(r)} | " + " | ".join(cell(summary[lb][r]) if r in summary[lb] else "–" for lb in labels) + " |"
              for r in rows]
    n = len(next(iter(next(iter(summary.values())).values()))["seeds"])
    return f"`{metric}`, mean over {n} seeds [95 % t-interval]\n\n" + "\n".join(lines) + "\n"


def plot(summary: Mapping, metric: str, out: Path, start: float | None = None,
         lines: Mapping[str, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    groups = {label: rows for label, rows in summary.items() if " - " not in label}
    for i, (label, rows) in enumerate(groups.items()):
        dodge = 0.2 * (i - (len(groups) - 1) / 2)  # side by side, so that the intervals do not hide each other
        steps = [row_step(r) + dodge for r in rows]
        means = [s["mean"] for s in rows.values()]
        low = [s["mean"] - s["ci_low"] for s in rows.values()]
        high = [s["ci_high"] - s["mean"] for s in rows.values()]
        x, y = ([0, *steps], [start, *means]) if start is not None else (steps, means)
        (line,) = ax.plot(x, y, marker="o", label=label)
        ax.errorbar(steps, means, yerr=[low, high], fmt="none", capsize=3, color=line.get_color())
    for name, value in (lines or {}).items():
        ax.axhline(value, ls="--", lw=1, color="grey")
        ax.annotate(name, (0, value), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
    ax.set_xlabel("training rounds")
    ax.set_ylabel(metric)
    ax.set_title("mean over seeds, 95 % t-intervals")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metric", required=True)
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "FILE"),
                        help="a label, then one results.json per training seed, in seed order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--start", type=float, help="every group's value at step 0 (the model they start from)")
    parser.add_argument("--line", action="append", default=[], metavar="NAME=VALUE", help="a reference line")
    args = parser.parse_args(argv)
    groups = {}
    for label, *files in args.group:
        if not files:
            parser.error(f"--group {label}: name its results.json files")
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            parser.error(f"--group {label}: no such file {', '.join(missing)}")
        groups[label] = [Path(f) for f in files]
    lines = {}
    for spec in args.line:
        name, sep, value = spec.rpartition("=")
        if not sep:
            parser.error(f"--line {spec!r}: write NAME=VALUE")
        lines[name] = float(value)
    try:
        summary = summarise(groups, args.metric)
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.metric, args.out / "over_seeds.png", args.start, lines)
    print(markdown(summary, args.metric))
    return summary


if __name__ == "__main__":
    main()
