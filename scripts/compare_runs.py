"""Overlay the logged curves of several runs, one panel per metric.

    python scripts/compare_runs.py --out kl.png sum=outputs/a balanced=outputs/b \
        --keys teacher/aesthetic/kl teacher/ocr/kl teacher/geneval/kl --smooth 5

Reads every ``<run>/csv/version_*/metrics.csv`` (``logger=csv``) and plots each key against the
optimiser step, with an optional centred moving average (the raw values faintly behind it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mini_table1 import moving_average, training_log  # the same CSV reader and smoothing


def logged(run: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` over the run's CSV logs, in step order."""
    points = {int(r["step"]): float(r[key]) for r in training_log(run)[0] if r.get(key)}
    if not points:
        raise SystemExit(f"{run}: no logged values of {key!r} in csv/version_*/metrics.csv (was logger=csv set?)")
    return sorted(points.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--keys", nargs="+", required=True)
    parser.add_argument("--smooth", type=int, default=1, help="moving-average width in steps (1: none)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.keys), figsize=(4.6 * len(args.keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        for i, spec in enumerate(args.runs):
            label, _, run = spec.partition("=")
            steps, values = zip(*logged(Path(run), key))
            colour = f"C{i}"
            if args.smooth > 1:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                values = moving_average(list(values), args.smooth, centred=True)
            ax.plot(steps, values, color=colour, label=label)
        ax.set_title(key)
        ax.set_xlabel("optimiser step (round)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"[compare] {args.out}")


if __name__ == "__main__":
    main()
