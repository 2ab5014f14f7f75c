"""Choose one of several evaluated snapshots by a rule fixed before the scores are seen.

``python -m opd.evaluation.choose --band 0.2 0.7 --metrics geneval/geneval_mini_correct ocr/ocr_exact
aesthetic/aesthetic_mini -- runs/val/step_*/results.json`` prints a table of every snapshot's
scores and the chosen one (the rule in :func:`depth_in_band`), and with ``--json F`` writes it.

This is how the mini base is picked among the EMA snapshots of pre-training (on ``val`` prompts; the
test prompts are read only for the committed results): the snapshot whose scores sit deepest inside
the band, so that the teachers have room above it and every skill is already present.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from opd.evaluation.report import checkpoint_rows


def depth_in_band(scores: Mapping[str, float], metrics: Sequence[str], low: float, high: float) -> float:
    """How deep the worst of ``metrics`` sits inside ``[low, high]``: ``min_k min(s_k - low, high - s_k)``
    (negative when any score is outside the band; ``-inf`` when one is missing or not finite)."""
    depth = math.inf
    for name in metrics:
        value = scores.get(name)
        if value is None or not math.isfinite(value):
            return -math.inf
        depth = min(depth, value - low, high - value)
    return depth


def choose(candidates: Mapping[str, Mapping[str, float]], metrics: Sequence[str], low: float, high: float
           ) -> tuple[str, float]:
    """``(name, depth)`` of the candidate deepest inside the band (:func:`depth_in_band`); on a tie
    the later name in sort order (snapshots named by step: the longer-trained one)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    if not metrics:
        raise ValueError("name at least one metric to choose by")
    ranked = sorted(candidates, key=lambda name: (depth_in_band(candidates[name], metrics, low, high), name))
    best = ranked[-1]
    return best, depth_in_band(candidates[best], metrics, low, high)


def load_candidates(paths: Sequence[Path], row: str = "base") -> dict[str, dict[str, float]]:
    """``results.json`` files of ``python -m opd.evaluate`` → ``{name: metrics of row}``, each named by
    its folder's parent (``runs/val/step_012000/results.json`` → ``step_012000``)."""
    found = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such results.json (run python -m opd.evaluate first)")
        rows = checkpoint_rows(json.loads(path.read_text()))
        if row not in rows:
            raise KeyError(f"{path} has no row {row!r} (rows: {sorted(rows)}); pass --row")
        name = path.parent.name
        if name in found:
            raise ValueError(f"two results are named {name!r} (their folders share a name): {path}")
        found[name] = rows[row]
    return found


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files, one per snapshot")
    parser.add_argument("--metrics", nargs="+", required=True, help="results.json keys, e.g. ocr/ocr_exact")
    parser.add_argument("--band", nargs=2, type=float, default=(0.2, 0.7), metavar=("LOW", "HIGH"))
    parser.add_argument("--row", default="base", help="the results row to read (default: base)")
    parser.add_argument("--json", type=Path, help="also write the choice and the table here")
    args = parser.parse_args(argv)
    low, high = args.band
    candidates = load_candidates(args.results, args.row)
    best, depth = choose(candidates, args.metrics, low, high)
    width = max(len(n) for n in candidates)
    print(f"{'snapshot':<{width}}  " + "  ".join(f"{m:>28}" for m in args.metrics) + "   depth")
    for name in sorted(candidates):
        d = depth_in_band(candidates[name], args.metrics, low, high)
        cells = "  ".join(f"{candidates[name].get(m, math.nan):>28.3f}" for m in args.metrics)
        print(f"{name:<{width}}  {cells}  {d:+.3f}{'  <- chosen' if name == best else ''}")
    if depth < 0:
        print(f"no snapshot has every score in [{low}, {high}]; {best} comes closest")
    choice = {"chosen": best, "depth": depth, "band": [low, high], "metrics": list(args.metrics),
              "candidates": candidates}
    if args.json:
        args.json.write_text(json.dumps(choice, indent=1))
    return choice


if __name__ == "__main__":
    main()
