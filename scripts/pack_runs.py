"""Pack what a plan of runs produced (adapters, metrics, evaluations, grids, logs) into one tarball.

    python scripts/pack_runs.py runs/table1 out/table1.tar.gz [--max-mb 15]

Leaves out what is large and reproducible: Lightning checkpoints (except ``last.ckpt`` when
``--with-ckpt``) and the per-image PNGs of evaluations (their grids and ``samples.jsonl`` stay).
Files are added smallest first, so an over-full archive drops the biggest ones and says which.
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
    if "images" in parts and "eval" in parts:
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
    budget, used, dropped = args.max_mb * 2**20, 0, []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out, "w:gz") as tar:
        for path in files:
            size = path.stat().st_size
            if used + size > budget:
                dropped.append(str(path.relative_to(args.root)))
                continue
            used += size
            tar.add(path, arcname=str(path.relative_to(args.root.parent)))
    print(f"packed {len(files) - len(dropped)} files ({used / 2**20:.1f} MiB before compression) into {args.out}")
    if dropped:
        print(f"left out {len(dropped)} file(s) over the {args.max_mb} MiB budget: {dropped[:10]}")


if __name__ == "__main__":
    main()
