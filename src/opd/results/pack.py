"""Pack what a folder of runs produced (adapters, metrics, evaluations, grids, logs) into tarballs.

    python -m opd.results.pack runs/table1 out/table1.tar.gz [--max-mb 15] [--with-ckpt] [--adapters only]

Leaves out what is large and reproducible: Lightning checkpoints (``last.ckpt`` stays with
``--with-ckpt``) and the per-image PNGs of evaluations (``images/`` of ``eval/``, ``val/`` or ``dense/``; their grids
and ``samples.jsonl`` stay). Files go in smallest first; past ``--max-mb`` of input a new part
``<name>.<k>.tar.gz`` starts. Paths in the archive start with the folder's name.
"""
from __future__ import annotations

import argparse
import tarfile
from collections.abc import Sequence
from pathlib import Path

from opd.results.records import EVALUATIONS

ADAPTERS = ("include", "only", "skip")


def wanted(path: Path, root: Path, with_ckpt: bool = False, adapters: str = "include") -> bool:
    """Whether the file ``path`` under ``root`` goes into the archive."""
    if not path.is_file():
        return False
    parts = set(path.relative_to(root).parts[:-1])  # the folders inside the root, not the root's own
    is_adapter = "adapter" in parts
    if (adapters == "only" and not is_adapter) or (adapters == "skip" and is_adapter):
        return False
    if path.suffix == ".ckpt":
        return with_ckpt and path.name == "last.ckpt"
    return not ("images" in parts and parts & set(EVALUATIONS))


def split_parts(sizes: Sequence[tuple[Path, int]], budget: float) -> list[list[Path]]:
    """Files (with their sizes) smallest first into parts of at most ``budget`` bytes each; a file
    larger than the budget gets a part of its own."""
    parts: list[list[Path]] = [[]]
    used = 0
    for path, size in sorted(sizes, key=lambda item: (item[1], str(item[0]))):
        if parts[-1] and used + size > budget:
            parts.append([])
            used = 0
        parts[-1].append(path)
        used += size
    return parts


def pack(root: Path, out: Path, max_mb: float = 15.0, with_ckpt: bool = False, adapters: str = "include"
         ) -> list[Path]:
    """Write the archive(s) of ``root``; returns their paths (``out`` itself when one part suffices)."""
    if adapters not in ADAPTERS:
        raise ValueError(f"adapters={adapters!r}: one of {ADAPTERS}")
    root = Path(root).resolve()
    files = [(p, p.stat().st_size) for p in sorted(root.rglob("*")) if wanted(p, root, with_ckpt, adapters)]
    parts = split_parts(files, max_mb * 2**20)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for k, part in enumerate(parts):
        target = out if len(parts) == 1 else out.with_name(out.name.replace(".tar.gz", "") + f".{k}.tar.gz")
        with tarfile.open(target, "w:gz") as tar:
            for path in part:
                tar.add(path, arcname=str(path.relative_to(root.parent)))
        print(f"packed {len(part)} files into {target}")
        if target.stat().st_size > max_mb * 2**20:  # one file larger than a part: it cannot be smaller
            big = max(part, key=lambda q: q.stat().st_size)
            print(f"warning: {target} is {target.stat().st_size / 2**20:.1f} MiB, over --max-mb {max_mb:g}: "
                  f"{big} alone is {big.stat().st_size / 2**20:.1f} MiB")
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path, help="<name>.tar.gz")
    parser.add_argument("--max-mb", type=float, default=15.0)
    parser.add_argument("--with-ckpt", action="store_true", help="also each run's last.ckpt")
    parser.add_argument("--adapters", choices=ADAPTERS, default="include",
                        help="exported adapters: with the rest, alone (a second archive), or left out")
    args = parser.parse_args(argv)
    return pack(args.root, args.out, args.max_mb, args.with_ckpt, args.adapters)


if __name__ == "__main__":
    main()
