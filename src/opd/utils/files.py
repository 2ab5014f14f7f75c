"""Files that are either whole or absent.

The Makefile's chains take a run's result file (``eval/results.json``, ``picked.json``, a table's
``results.md``, ``mopd_lr.txt``) as the sign that a step is done. Such a file is written *last*, after
everything it stands for (grids, samples, plots), and through :func:`write_atomic`: to
``<name>.partial`` beside it, then renamed into place, so a kill at any moment leaves the old file or
the new one, never a truncated one that ``make`` would take for a finished step.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (same folder, ``os.replace``)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # only left when the write failed
