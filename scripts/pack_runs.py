"""Pack what a plan of runs produced (adapters, metrics, evaluations, grids, logs) into one tarball.

    python scripts/pack_runs.py runs/table1 out/table1.tar.gz [--max-mb 15]

Leaves out what is large and reproducible: Lightning checkpoints (except ``last.ckpt`` when
``--with-ckpt``) and the per-image PNGs of evaluations (their grids and ``samples.jsonl`` stay).
Files are added smallest first; past ``--max-mb`` of input a new part ``<name>.<k>.tar.gz`` starts.
"""
from __future__ import annotations

import argparse
import tarfile
from pathlib import Path


def wanted(path: Path, with_ckpt: bool, adapters: str) -> bool:
    parts = set(path.parts)
    is_adapter = "adapter" in parts
    if (adapters == "only" and not is_adapter) or (adapters == "skip" and is_adapter):
        return False
    if path.suffix == ".ckpt":
        return with_ckpt and path.name == "last.ckpt"
    if "images" in parts and parts & {"eval", "val"}:
        return False
    return path.is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-mb", type=float, default=15.0)
    parser.add_argument("--with-ckpt", action="store_true")
    parser.add_argument("--adapters", choices=["include", "only", "skip"], default="include",
                        help="exported adapters: with the rest, alone (a second archive), or left out")
    args = parser.parse_args()
    files = sorted((p for p in args.root.rglob("*") if wanted(p, args.with_ckpt, args.adapters)), key=lambda p: p.stat().st_size)
    budget = args.max_mb * 2**20
    parts: list[list[Path]] = [[]]
    used = 0
    for path in files:  # smallest first; a new part whenever this one is full
        size = path.stat().st_size
        if parts[-1] and used + size > budget:
            parts.append([])
            used = 0
        parts[-1].append(path)
        used += size
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(parts):
        out = args.out if len(parts) == 1 else args.out.with_name(args.out.name.replace(".tar.gz", f".{k}.tar.gz"))
        with tarfile.open(out, "w:gz") as tar:
            for path in part:
                tar.add(path, arcname=str(path.relative_to(args.root.parent)))
        print(f"packed {len(part)} files into {out}")
        if out.stat().st_size > budget:  # one file larger than a part: the part cannot be smaller
            big = max(part, key=lambda q: q.stat().st_size)
            print(f"warning: {out} is {out.stat().st_size / 2**20:.1f} MiB, over --max-mb {args.max_mb:g}: "
                  f"{big} alone is {big.stat().st_size / 2**20:.1f} MiB (leave it out, e.g. without --with-ckpt)")


if __name__ == "__main__":
    main()
