"""Pick each skill's teacher among trained candidates by the skill's own metric, and install it.

    python -m opd.results.pick_teachers --root runs/teachers --dest runs/teachers/teachers \
        ocr=mini_teacher_ocr,mini_teacher_ocr_nft geneval=gen_more aesthetic=mini_teacher_aesthetic

Each candidate is a run folder ``<root>/<name>`` holding ``adapter/`` and ``val/results.json``: the
evaluation of that adapter under the checkpoint name ``<name>`` on held-out *val* prompts (candidates
are never compared on the test sets), whose ``.hydra/config.yaml`` gives the CFG scale it sampled
at. ``<name>/*`` makes every snapshot of the run a candidate (early stopping on val): each row
``step_NNNNNN`` of ``<root>/<name>/val/results.json`` is the EMA snapshot ``<name>/exports/step_NNNNNN``
and the row ``final`` the run's ``adapter/``, as ``make mini-teachers`` evaluates them. A skill is
a task of ``conf/eval_tasks/<suite>.yaml``; its metric is the task's headline. The winner's adapter is copied to ``<dest>/<skill>/``, and ``<root>/picked.json`` records every
candidate's scores, the winner, its adapter and CFG scale (a later pick of other skills keeps the
earlier ones). No config file is edited: the Hydra overrides that use the picked teachers are
printed, and printed again later by

    python -m opd.results.pick_teachers --root runs/teachers --overrides geneval ocr   # for opd.train
    python -m opd.results.pick_teachers --root runs/teachers --checkpoint ocr          # for opd.evaluate

``--shipped models/mini_teachers geneval ocr aesthetic`` records the shipped teachers instead, as they
are (no candidates, winner ``shipped``): the students of ``make mini-table1 TEACHERS=shipped`` distil
them without ``make mini-teachers``. A shipped teacher's ``training.json`` (the compute its training
run spent up to the shipped weights: rounds, images_sampled, model_tflop, minutes) goes into its
entry as ``training``, which ``opd.results.compute --picked`` counts as that teacher's compute.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from opd.results.logs import FINAL
from opd.results.metrics import evaluated_rows, guidance_scales, own_metrics
from opd.utils.files import write_atomic

RECORD = "picked.json"


def _candidates(root: Path, name: str) -> dict[str, tuple[Path, Path, str]]:
    """``{candidate: (adapter folder, val results, row)}`` of one ``choices`` entry: a run, or with
    ``/*`` every snapshot of it that its val evaluation has a row for."""
    run = name.removesuffix("/*")
    results = Path(root) / run / "val" / "results.json"
    if run == name:
        return {name: (Path(root) / name / "adapter", results, name)}
    if not results.exists():
        return {}
    return {f"{run}/{row}": (Path(root) / run / ("adapter" if row == FINAL else f"exports/{row}"), results, row)
            for row in evaluated_rows(results) if row == FINAL or row.startswith("step_")}


def candidate_scores(root: Path, names: Sequence[str], metric: str) -> dict[str, dict]:
    """``{name: {"score": its metric, "guidance_scale": CFG, "adapter_dir": its folder, **its validation
    row}}`` of the candidates with an adapter and a validation; the others are named and left out."""
    scores = {}
    for entry in names:
        found = _candidates(root, entry)
        if not found:
            print(f"[pick] candidate {entry} has no val/results.json; skipped")
        for name, (adapter, results, row_name) in found.items():
            if not results.exists() or not adapter.is_dir():
                print(f"[pick] candidate {name} has no adapter or no val/results.json; skipped")
                continue
            row = evaluated_rows(results)[row_name]
            if metric not in row:
                raise KeyError(f"{results}: row {row_name!r} has no {metric!r} (keys: {sorted(row)})")
            scores[name] = {"score": row[metric], "guidance_scale": guidance_scales(results).get(row_name),
                            "adapter_dir": str(adapter), **row}
    return scores


def winner(scores: Mapping[str, Mapping[str, float]]) -> str:
    """The candidate with the highest score (the first listed of a tie)."""
    if not scores:
        raise ValueError("no usable candidate")
    return max(scores, key=lambda name: scores[name]["score"])


def pick(root: Path, dest: Path, skill: str, names: Sequence[str], metric: str) -> dict:
    """Score ``names``, copy the winner's adapter to ``<dest>/<skill>`` and return its picked.json entry."""
    scores = candidate_scores(root, names, metric)
    if not scores:
        raise ValueError(f"{skill}: no usable candidate among {list(names)}")
    best = winner(scores)
    target = Path(dest) / skill
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(scores[best]["adapter_dir"], target)
    return {"winner": best, "metric": metric, "adapter": str(target),
            "guidance_scale": scores[best]["guidance_scale"], "candidates": scores}


#: the winner recorded for a teacher taken as shipped (no candidates, no training run of its own here)
SHIPPED = "shipped"
#: beside a shipped adapter: what its training spent (rounds, images_sampled, model_tflop, minutes, run)
TRAINING = "training.json"


def shipped_entry(folder: Path, skill: str, metric: str, guidance_scale: float) -> dict:
    """The picked.json entry of a shipped teacher: its adapter ``<folder>/<skill>`` (checked to hold
    one), sampled at ``guidance_scale``; no candidates were compared. Its ``training.json``, when
    shipped, becomes the entry's ``training`` (the compute that made it)."""
    adapter = Path(folder) / skill
    if not any(adapter.glob("*.safetensors")):
        raise ValueError(f"{adapter}: no shipped adapter (*.safetensors) for the {skill} teacher")
    entry = {"winner": SHIPPED, "metric": metric, "adapter": str(adapter), "guidance_scale": guidance_scale,
             "candidates": {}}
    if (adapter / TRAINING).is_file():
        try:
            entry["training"] = json.loads((adapter / TRAINING).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{adapter / TRAINING}: not JSON ({err})") from None
    return entry


def train_overrides(picked: Mapping[str, Mapping], skills: Sequence[str]) -> list[str]:
    """``opd.train`` overrides that distil from the picked teachers of ``skills`` (the run's
    experiment must have those teachers)."""
    out = []
    for skill in skills:
        entry = _entry(picked, skill)
        out.append(f"teacher.{skill}.adapter={entry['adapter']}")
        if entry.get("guidance_scale") is not None:
            out.append(f"teacher.{skill}.guidance_scale={float(entry['guidance_scale'])}")
    return out


def eval_checkpoint(picked: Mapping[str, Mapping], skill: str, name: str | None = None) -> str:
    """The ``opd.evaluate`` override that evaluates the picked teacher of ``skill`` at its own CFG
    scale, as checkpoint ``name`` (default ``teacher_<skill>``)."""
    entry = _entry(picked, skill)
    spec = f"adapter:{entry['adapter']}"
    if entry.get("guidance_scale") is not None:
        spec += f",guidance_scale:{float(entry['guidance_scale'])}"
    return f"+checkpoints.{name or f'teacher_{skill}'}={{{spec}}}"


def _entry(picked: Mapping[str, Mapping], skill: str) -> Mapping:
    if skill not in picked:
        raise KeyError(f"no teacher picked for {skill!r} (picked: {sorted(picked)})")
    return picked[skill]


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the candidates' runs; picked.json goes here")
    parser.add_argument("--dest", type=Path, help="the picked adapters go to <dest>/<skill>")
    parser.add_argument("--suite", default="mini", help="conf/eval_tasks/<suite>.yaml: each skill's metric")
    parser.add_argument("--overrides", nargs="+", metavar="SKILL", help="only print opd.train overrides")
    parser.add_argument("--checkpoint", metavar="SKILL", help="only print the opd.evaluate checkpoint override")
    parser.add_argument("--shipped", type=Path, metavar="DIR",
                        help="take each skill named (SKILL, no runs) as shipped in DIR/<skill> instead of picking")
    parser.add_argument("--shipped-cfg", type=float, default=1.0, help="the CFG scale the shipped teachers sample at")
    parser.add_argument("choices", nargs="*", metavar="SKILL=RUN[,RUN...]")
    args = parser.parse_args(argv)
    record = args.root / RECORD
    picked = json.loads(record.read_text()) if record.exists() else {}
    if args.overrides or args.checkpoint:
        try:
            print(" ".join(train_overrides(picked, args.overrides)) if args.overrides
                  else eval_checkpoint(picked, args.checkpoint))
        except KeyError as err:
            parser.error(f"{record}: {err.args[0]}")
        return picked
    if not args.choices or (args.dest is None and args.shipped is None):
        parser.error("name --dest and at least one SKILL=RUN[,RUN...] (or --shipped DIR SKILL..., --overrides, --checkpoint)")
    own = own_metrics(args.suite)
    for choice in args.choices:
        skill, _, names = choice.partition("=")
        if skill not in own:
            parser.error(f"{skill!r} is no task of conf/eval_tasks/{args.suite}.yaml (tasks: {list(own)})")
        if args.shipped is not None:
            try:
                picked[skill] = shipped_entry(args.shipped, skill, own[skill], args.shipped_cfg)
            except ValueError as err:
                raise SystemExit(f"[pick] {err}") from None
            print(f"[pick] {skill}: shipped {picked[skill]['adapter']} at CFG {args.shipped_cfg:g}")
            continue
        try:
            picked[skill] = entry = pick(args.root, args.dest, skill, names.split(","), own[skill])
        except ValueError as err:
            raise SystemExit(f"[pick] {err}") from None
        print(f"[pick] {skill}: {entry['winner']} ({entry['metric']} = "
              f"{entry['candidates'][entry['winner']]['score']:.3f}) → {entry['adapter']}; "
              + ", ".join(f"{n} {s['score']:.3f}" for n, s in entry["candidates"].items()))
    record.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(picked, indent=1))  # last: the file make waits for
    print("[pick] train with:", " ".join(train_overrides(picked, [c.partition("=")[0] for c in args.choices])))
    return picked


if __name__ == "__main__":
    main()
