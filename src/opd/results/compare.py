"""Overlay the logged curves of several runs, one panel per key.

    python -m opd.results.compare --out kl.png sum=outputs/a balanced=outputs/b \
        --keys teacher/aesthetic/kl teacher/ocr/kl teacher/geneval/kl --smooth 5

Reads every ``<run>/csv/version_*/metrics.csv`` (``logger=csv``) and plots each key against the
optimiser step, with an optional centred moving average (the raw values faintly behind it).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from opd.results.logs import logged, moving_average


def parse_runs(specs: Sequence[str]) -> dict[str, Path]:
    """``["label=run_dir", ...]`` → ``{label: run_dir}`` (a bare ``run_dir`` is labelled by its name)."""
    runs: dict[str, Path] = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        label, folder = (label, folder) if sep else (Path(spec).name, spec)
        if label in runs:
            raise ValueError(f"two runs are labelled {label!r}; write LABEL=RUN_DIR")
        runs[label] = Path(folder)
    return runs


def curves(runs: dict[str, Path], keys: Sequence[str], smooth: int = 1
           ) -> dict[str, dict[str, tuple[list[int], list[float], list[float]]]]:
    """``{key: {label: (steps, raw values, smoothed values)}}`` (smoothed: a centred moving average
    ``smooth`` wide; 1 = the raw values)."""
    out: dict[str, dict] = {}
    for key in keys:
        out[key] = {}
        for label, run in runs.items():
            steps, values = (list(x) for x in zip(*logged(run, key)))
            out[key][label] = (steps, values, moving_average(values, smooth, centred=True) if smooth > 1 else values)
    return out


def plot(data: dict[str, dict[str, tuple[list[int], list[float], list[float]]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(4.6 * len(data), 3.4), squeeze=False)
    for ax, (key, series) in zip(axes[0], data.items()):
        for i, (label, (steps, raw, smoothed)) in enumerate(series.items()):
            if smoothed is not raw:
                ax.plot(steps, raw, color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, smoothed, color=f"C{i}", label=label)
        ax.set_title(key)
        ax.set_xlabel("optimiser step (round)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--keys", nargs="+", required=True)
    parser.add_argument("--smooth", type=int, default=1, help="moving-average width in steps (1: none)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        data = curves(parse_runs(args.runs), args.keys, args.smooth)
    except ValueError as err:
        parser.error(str(err))
    print(f"[compare] {plot(data, args.out)}")
    return args.out


if __name__ == "__main__":
    main()
