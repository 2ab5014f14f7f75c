"""The lever table and plots of ``python -m opd.bench`` runs (``docs/bench/``).

    python -m opd.results.bench_table docs/bench/h200_levers.json docs/bench/h200_levers2.json \
        docs/bench/h200.json --plot docs/bench/h200.png

Each bench JSON holds its own plain module (``ours``) and reference-style loop, so every ratio is
taken within one run (one process, one GPU): a lever's ``speedup_vs_ours`` against that run's plain
module and ``speedup_vs_reference`` against that run's reference-style loop. A run made with lever
flags (no ``--levers``) is a *configuration*: its ``ours`` is the levers together, listed by their
flags. Rows of several runs are printed together; the ``run`` column says which file each came from.
The plot: each lever's speed-up over its run's plain module (bars), and trajectories per second
against the batch size (``--batch-sweep``) beside the reference-style loop.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COLUMNS = ("run", "what", "trajectories/s", "× plain", "× reference", "rollout / targets / train s",
           "peak GiB", "MFU")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def row(run: str, what: str, fig: dict[str, Any], plain: dict[str, Any] | None,
        reference: dict[str, Any] | None) -> dict[str, Any]:
    """One table row: ``fig``'s rates and its speed-ups over ``plain`` (None: it is the plain module,
    or a configuration run without one) and over the same run's ``reference`` (None: the run was
    cut short before it; no speed-up, since ratios are only taken within one run)."""
    if "error" in fig or "skipped" in fig:
        return {"run": run, "what": what, "note": fig.get("error") or fig.get("skipped")}
    tps = fig["trajectories_per_second"]
    return {
        "run": run, "what": what, "trajectories_per_second": tps,
        "speedup_vs_plain": tps / plain["trajectories_per_second"] if plain else None,
        "speedup_vs_reference": tps / reference["trajectories_per_second"] if reference else None,
        "phases": tuple(fig.get(f"{p}_seconds") for p in ("rollout", "targets", "train")),
        "peak_memory_gib": fig.get("peak_memory_gib"), "mfu": fig.get("mfu"),
    }


def rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row of every run: its reference-style loop, its plain module (or its configuration),
    its batch sweep and its levers, in the run's own order."""
    out = []
    for run, result in runs.items():
        ref, ours = result.get("reference_style"), result.get("ours")
        if ref is not None:
            out.append(row(run, "reference-style loop", ref, None, ref))
        if ours is None:  # cut short before its batched module was measured
            continue
        flags = ours.get("levers") or []
        plain_name = "plain module" if not flags else "configuration: " + " ".join(flags)
        out.append(row(run, f"{plain_name} (batch {ours.get('batch', '?')})", ours, None, ref))
        plain = ours if not flags else None
        for fig in result.get("batch_sweep") or []:
            out.append(row(run, f"plain module, batch {fig['batch']}", fig, plain, ref))
        for name, fig in (result.get("levers") or {}).items():
            out.append(row(run, name, fig, plain, ref))
    return out


def markdown(table: Iterable[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table:
        if "note" in r:
            lines.append(f"| {r['run']} | {r['what']} | {r['note']} |" + " |" * (len(COLUMNS) - 3))
            continue
        phases = " / ".join(_fmt(p, ".2f") for p in r["phases"])
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append("| " + " | ".join([
            r["run"], r["what"], _fmt(r["trajectories_per_second"], ".3f"), _fmt(r["speedup_vs_plain"], ".2f"),
            _fmt(r["speedup_vs_reference"], ".2f"), phases, _fmt(r["peak_memory_gib"], ".1f"),
            "–" if mfu is None else f"{mfu:.1f} %"]) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, Any]], out: Path) -> Path:
    """Levers' speed-ups over their run's plain module, and trajectories/s against the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levers = [(f"{name}", fig["trajectories_per_second"] / result["ours"]["trajectories_per_second"])
              for result in runs.values() if not result["ours"].get("levers")
              for name, fig in (result.get("levers") or {}).items() if "trajectories_per_second" in fig]
    configs = [(" + ".join(f.lstrip("-") for f in result["ours"]["levers"]), result["ours"])
               for result in runs.values() if result["ours"].get("levers")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names = [n + (" (other math)" if n == "cfg_free" else "") for n, _ in levers]
    colours = ["tab:blue" if n == "cfg_free" else "tab:green" if v > 1.01 else "tab:gray" for n, v in levers]
    ax1.barh(names, [v for _, v in levers], color=colours)
    ax1.axvline(1.0, color="black", lw=0.8)
    ax1.set_xlabel("trajectories/s, × the plain batched module (same run)")
    ax1.set_title("each lever alone")
    for i, (_, v) in enumerate(levers):
        ax1.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    batches = set()
    for result in runs.values():
        sweep = result.get("batch_sweep") or []
        if sweep:
            batches |= {f["batch"] for f in sweep}
            ax2.plot([f["batch"] for f in sweep], [f["trajectories_per_second"] for f in sweep], "o-",
                     label="plain batched module")
            ax2.axhline(result["reference_style"]["trajectories_per_second"], color="tab:red", ls="--",
                        label="reference-style loop (batch 3 per step)")
    for name, ours in configs:
        batches.add(ours["batch"])
        ax2.plot([ours["batch"]], [ours["trajectories_per_second"]], "*", markersize=14, color="tab:purple",
                 label=name)
    ax2.set_xticks(sorted(batches))
    ax2.set_xlabel("trajectories per iteration")
    ax2.set_ylabel("trajectories/s")
    ax2.set_ylim(bottom=0)
    ax2.set_title("batch size")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="bench JSON files (python -m opd.bench --out)")
    parser.add_argument("--plot", type=Path, help="write the levers / batch-size plot here (PNG)")
    args = parser.parse_args(argv)
    for path in args.runs:
        if not path.is_file():
            parser.error(f"no bench JSON at {path}")
    runs = {path.name: json.loads(path.read_text()) for path in args.runs}
    print(markdown(rows(runs)), end="")
    if args.plot:
        print(f"plot: {plot(runs, args.plot)}")


if __name__ == "__main__":
    main()
