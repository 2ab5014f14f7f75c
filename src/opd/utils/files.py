"""Files that are either whole or absent.

The Makefile's chains take a run's result file (``eval/results.json``, ``picked.json``, a table's
``results.md``, ``mopd_lr.txt``) as the sign that a step is done. Such a file is written *last*, after
everything it stands for (grids, samples, plots), and through :func:`write_atomic`: to
``<name>.partial`` beside it, then renamed into place, so a kill at any moment leaves the old file or
the new one, never a truncated one that ``make`` would take for a finished step. Folders written by
another library (an exported adapter, a checkpoint's shards) go to a side name and are moved into
place with :func:`replace_path`.
"""
from __future__ import annotations

import os
import shutil
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


def replace_path(new: Path | str, final: Path | str) -> None:
    """Move ``new`` (a file or a folder) onto ``final``, atomically where the OS can: a file or a folder
    onto nothing by one rename; a folder onto a folder through a hidden side name (``.<final>.old``,
    which globs such as ``exports/step_*`` skip), so that ``final`` is for a moment absent, never
    half-written."""
    new, final = Path(new), Path(final)
    if new.is_dir() and final.is_dir():  # a folder cannot replace a non-empty one: swap through a side name
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)
