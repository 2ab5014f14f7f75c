"""Keep the small files of a folder of runs that a results table is built from, and nothing else.

    python -m opd.results.records runs/mini docs/results/mini_table1/runs [RUN ...]

A table (:mod:`opd.results.table1`), a student card and the gain-share intervals read, per run, only
its command (``.hydra/``), its training log (``csv/version_*/metrics.csv``) and its evaluations
(``eval/``, ``val/``, ``dense/``: ``results.json``, ``results.md``, ``.hydra/``, ``samples.jsonl``).
Those are copied into ``DEST/<run>/`` with the same layout, the logs and samples gzipped (the readers
take ``metrics.csv.gz`` and ``samples.jsonl.gz``); adapters, checkpoints and images stay behind.
``picked.json`` of the folder comes along. A committed records folder is then enough to rebuild the
table, its intervals and its curves on any machine (``--runs DEST``), whatever happens to the runs.
Without ``RUN`` names every run folder that has an evaluation is kept.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
from collections.abc import Sequence
from pathlib import Path

#: the evaluation folders of a run (its test evaluation, its val evaluation, the dense one)
EVALUATIONS = ("eval", "val", "dense")
#: the files of an evaluation folder that results are built from
EVAL_FILES = ("results.json", "results.md", ".hydra/config.yaml", ".hydra/overrides.yaml")
#: gzipped on the way (text that compresses ten to twenty times)
GZIPPED = ("samples.jsonl", "metrics.csv")


def _copy(src: Path, dest: Path) -> int:
    """Copy ``src`` to ``dest`` (gzipped as ``dest.gz`` when its name is in :data:`GZIPPED`); its size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.name in GZIPPED:
        dest = dest.with_name(dest.name + ".gz")
        with open(src, "rb") as f, gzip.GzipFile(dest, "wb", mtime=0) as g:  # mtime 0: same bytes, same file
            shutil.copyfileobj(f, g)
    else:
        shutil.copyfile(src, dest)
    return dest.stat().st_size


def run_files(run: Path) -> list[Path]:
    """The files of one run folder that go into its record, relative to it."""
    run = Path(run)
    files = [Path(".hydra") / name for name in ("overrides.yaml", "config.yaml")]
    files += [p.relative_to(run) for p in sorted(run.glob("csv/version_*/metrics.csv"))]
    for kind in EVALUATIONS:
        files += [Path(kind) / name for name in (*EVAL_FILES, "samples.jsonl")]
        files += [Path(kind) / "samples.jsonl.gz"] if not (run / kind / "samples.jsonl").exists() else []
    return [f for f in files if (run / f).is_file()]


def keep(root: Path, dest: Path, runs: Sequence[str] = ()) -> dict[str, int]:
    """Copy the records of ``runs`` (default: every run with an evaluation) from ``root`` into ``dest``;
    ``{run: bytes written}``."""
    root, dest = Path(root), Path(dest)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such runs folder")
    names = list(runs) or sorted(p.name for p in root.iterdir()
                                 if any((p / kind / "results.json").is_file() for kind in EVALUATIONS))
    missing = [name for name in names if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"no run folder {', '.join(missing)} under {root}")
    written = {name: sum(_copy(root / name / f, dest / name / f) for f in run_files(root / name)) for name in names}
    if (root / "picked.json").is_file():
        shutil.copyfile(root / "picked.json", dest / "picked.json")
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the runs folder (e.g. runs/mini)")
    parser.add_argument("dest", type=Path, help="where the records go (e.g. docs/results/mini_table1/runs)")
    parser.add_argument("runs", nargs="*", help="run names (default: every run with an evaluation)")
    args = parser.parse_args(argv)
    try:
        written = keep(args.root, args.dest, args.runs)
    except FileNotFoundError as err:
        parser.error(str(err))
    for name, size in written.items():
        print(f"[records] {name}: {size / 1024:.0f} KiB → {args.dest / name}")
    return written


if __name__ == "__main__":
    main()
