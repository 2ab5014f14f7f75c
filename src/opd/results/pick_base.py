"""Pick the mini base among pre-training snapshots: the one whose headline scores sit deepest inside a band.

    python -m opd.results.pick_base runs/sel/step_*/results.json [--tasks geneval ocr] [--band 0.2 0.7] [--json F]

A deliberately mediocre base leaves its teachers room above it while every skill is already there.
The rule and the table are :mod:`opd.evaluation.choose`'s; this only names its metrics: the headline
of each task (``--tasks``, default all) in ``conf/eval_tasks/<suite>.yaml``. Score the snapshots on
``val``/training prompts, never the test sets.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from opd.evaluation import choose
from opd.results.metrics import own_metrics


def base_metrics(tasks: Sequence[str] | None = None, suite: str = "mini") -> list[str]:
    """The headline metric of each of ``tasks`` (default: every task of the suite), in that order."""
    own = own_metrics(suite)
    unknown = sorted(set(tasks or []) - set(own))
    if unknown:
        raise ValueError(f"no task(s) {unknown} with a table entry in conf/eval_tasks/{suite}.yaml (tasks: {list(own)})")
    return [own[t] for t in (tasks or own)]


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files, one per snapshot")
    parser.add_argument("--tasks", nargs="+", default=None, help="judge by these tasks' headlines (default: all)")
    parser.add_argument("--suite", default="mini", help="conf/eval_tasks/<suite>.yaml")
    parser.add_argument("--band", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                        help="default: opd.evaluation.choose's")
    parser.add_argument("--row", default="base", help="the results row to read (default: base)")
    parser.add_argument("--json", default=None, help="also write the choice and the table here")
    args = parser.parse_args(argv)
    try:
        metrics = base_metrics(args.tasks, args.suite)
    except ValueError as err:
        parser.error(str(err))
    options = [*(["--band", *map(str, args.band)] if args.band else []), "--row", args.row,
               *(["--json", args.json] if args.json else [])]
    return choose.main([*options, "--metrics", *metrics, "--", *args.results])


if __name__ == "__main__":
    main()
