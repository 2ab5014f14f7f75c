"""Pick the pre-training snapshot that makes the most *mediocre* base (room for RL on both skills).

    python scripts/pick_mini_base.py runs/sel/step_003000 runs/sel/step_004000 ...

Each argument is an evaluation folder (``python -m opd.evaluate`` output) whose ``results.json``
has ``geneval/geneval_mini_correct`` and ``ocr/ocr_exact``. The pick is the snapshot whose two
scores sit deepest inside the band [low, high] (issue: 0.2-0.7); it prints a JSON summary.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LOW, HIGH = 0.25, 0.65


def margin(scores: dict[str, float]) -> float:
    """Distance of the worse of the two scores to the nearest band edge (negative: outside)."""
    values = (scores["geneval/geneval_mini_correct"], scores["ocr/ocr_exact"])
    return min(min(v - LOW, HIGH - v) for v in values)


def main(folders: list[str]) -> None:
    table = {f: json.loads((Path(f) / "results.json").read_text())["base"] for f in folders}
    best = max(table, key=lambda f: margin(table[f]))
    summary = {"band": [LOW, HIGH], "picked": best,
               "candidates": {f: {k: round(v, 4) for k, v in s.items() if k.count("/") == 1}
                              for f, s in table.items()}}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
