"""Choose a setting on val among runs that differ only in it (an equal tuning budget per method).

    python -m opd.results.pick_setting --out runs/mini/mopd_lr.txt \
        runs/mini/tune_mopd_lr3e-4=3e-4 runs/mini/tune_mopd_lr1e-3=1e-3

Each ``RUN=VALUE``: the run's val evaluation ``RUN/val/results.json`` (its row named after the run's
folder, as the Make chains evaluate it) is scored by the mean of the suite's headline metrics, one per
task (a multi-skill student is judged on all three). The best run's ``VALUE`` is written to
``--out`` and printed, with every candidate's score; a tie goes to the first listed.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from opd.results.metrics import evaluated_rows, own_metrics
from opd.utils.files import write_atomic


def score(run: Path, metrics: Sequence[str]) -> float:
    """The mean of ``metrics`` in the run's own row of its val evaluation."""
    results = run / "val" / "results.json"
    row = evaluated_rows(results).get(run.name)
    if row is None:
        raise KeyError(f"{results}: no row {run.name!r}")
    missing = [m for m in metrics if m not in row]
    if missing:
        raise KeyError(f"{results}: row {run.name!r} has no {missing} (keys: {sorted(row)})")
    return sum(row[m] for m in metrics) / len(metrics)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+", metavar="RUN=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="the chosen VALUE is written here")
    parser.add_argument("--suite", default="mini", help="conf/eval_tasks/<suite>.yaml: the headline metrics")
    args = parser.parse_args(argv)
    metrics = list(own_metrics(args.suite).values())
    scores = {}
    for candidate in args.candidates:
        run, sep, value = candidate.partition("=")
        if not sep or not value:
            parser.error(f"{candidate!r}: write RUN=VALUE")
        try:
            scores[value] = (run, score(Path(run), metrics))
        except (FileNotFoundError, KeyError) as err:
            parser.error(str(err.args[0]))
    best = max(scores, key=lambda v: scores[v][1])
    for value, (run, s) in scores.items():
        print(f"[pick_setting] {value}: {s:.4f} (mean of {', '.join(metrics)}; {run}){'  <- chosen' if value == best else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (args.out.with_suffix(".json")).write_text(json.dumps({"chosen": best, "metrics": metrics, "candidates": {
        v: {"run": r, "score": s} for v, (r, s) in scores.items()}}, indent=1))
    write_atomic(args.out, best + "\n")  # last: the file make waits for
    return best


if __name__ == "__main__":
    main()
