"""The compute finished runs spent, as a budget for another run (equal-compute baselines).

    python -m opd.results.compute runs/table1/mopd_s0 [runs/teachers/geneval_nft ...] [--key compute/model_tflop]

prints the sum over the runs of the last logged value of ``--key`` (``compute/model_tflop`` by
default, or ``compute/images_sampled``) from their CSV logs (``logger=csv``), times ``--scale``,
ready for ``callbacks.compute_budget.max_model_tflop=...`` (:mod:`opd.callbacks.budget`). A teacher
that was picked at an EMA snapshot is named ``RUN/step_NNNNNN``: its run's value at that step is
used. ``--picked <root>/picked.json`` adds every picked teacher's run (``pick_teachers``' record); a
teacher taken as shipped (``pick_teachers --shipped``) counts the ``training`` its ``training.json`` recorded.
A run that started from another run's adapter (``module.init_adapter``) counts that run too.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from opd.results.logs import chained_log, column, snapshot_of, stages_of
from opd.results.pick_teachers import SHIPPED, TRAINING

KEYS = ("compute/model_tflop", "compute/images_sampled", "compute/transformer_passes")


def spent(run: Path, key: str = KEYS[0]) -> float:
    """The last logged ``key`` of ``run`` (``RUN/step_N``: of its run up to that snapshot, as
    :func:`opd.results.logs.chained_log` reads a snapshot stage), plus what the runs it continued
    spent (``module.init_adapter`` naming an earlier run beside it, :func:`opd.results.logs.stages_of`)."""
    root = Path(snapshot_of(str(run))[0]).parent  # the folder beside which a run it continued would be
    values = column(chained_log(root, stages_of(root, Path(run).relative_to(root).as_posix()))[0], key)
    if not values:
        raise ValueError(f"{run}: no logged values of {key!r} in csv/version_*/metrics.csv (was logger=csv set?)")
    return values[-1]


def teacher_spent(picked_file: Path, skill: str, entry: dict, key: str = KEYS[0]) -> float:
    """What the picked teacher of ``skill`` spent: its winner's run (``<root>/<winner>``), or for a
    shipped teacher the value its ``training.json`` recorded."""
    if entry.get("winner") != SHIPPED:
        return spent(picked_file.parent / entry["winner"], key)
    name = key.split("/")[-1]
    value = entry.get("training", {}).get(name)
    if value is None:
        raise ValueError(f"{picked_file}: the shipped {skill} teacher records no training {name} (add it to "
                         f"{entry.get('adapter', '<adapter>')}/{TRAINING} and run pick_teachers --shipped again)")
    return float(value)


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (RUN/step_N: that snapshot of RUN)")
    parser.add_argument("--key", default=KEYS[0], choices=KEYS)
    parser.add_argument("--picked", type=Path, help="pick_teachers' picked.json: add every picked teacher's run")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the total (e.g. 0.3333 for a third)")
    args = parser.parse_args(argv)
    runs = list(args.runs)
    if args.picked is not None:
        if not args.picked.is_file():
            parser.error(f"no picked teachers at {args.picked} (run make mini-teachers first)")
        picked = json.loads(args.picked.read_text())
    else:
        picked = {}
    if not runs and not picked:
        parser.error("name at least one run (or --picked)")
    try:
        total = args.scale * (sum(spent(run, args.key) for run in runs)
                              + sum(teacher_spent(args.picked, skill, entry, args.key) for skill, entry in picked.items()))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"{total:.6g}")
    return total


if __name__ == "__main__":
    main()
