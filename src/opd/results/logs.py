"""A run's training log (``logger=csv``: ``<run>/csv/version_*/metrics.csv``) and its command.

A resumed run logs into a new ``version_k``; :func:`training_log` reads them all, in order. Runs
that continued one another (``module.init_adapter=<earlier run>/adapter``) read as one log on one
wall-clock axis with :func:`chained_log`.
"""
from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path

import yaml

MINUTES = "time/minutes"  # training wall-clock, logged every step (opd.modules.policy)
#: running totals each run counts from 0 (rounds; opd.modules.compute): a chain of runs adds them up
COUNTERS = ("train/round", "compute/images_sampled", "compute/transformer_passes", "compute/model_tflop")


def training_log(run: Path) -> tuple[list[dict[str, str]], float]:
    """The run's logged rows (all CSV versions, in order; ``metrics.csv.gz`` where a records folder
    keeps them gzipped, :mod:`opd.results.records`) and its training wall-clock minutes (the largest
    ``time/minutes``; 0 without any)."""
    rows: list[dict[str, str]] = []
    files = [*Path(run).glob("csv/version_*/metrics.csv"), *Path(run).glob("csv/version_*/metrics.csv.gz")]
    for file in sorted(files, key=lambda p: int(p.parent.name[8:])):
        with (gzip.open if file.suffix == ".gz" else open)(file, "rt", newline="") as f:
            rows += list(csv.DictReader(f))
    minutes = [float(r[MINUTES]) for r in rows if r.get(MINUTES)]
    return rows, max(minutes, default=0.0)


#: the name of a run's final adapter among its snapshots (``run/final``, as ``run``)
FINAL = "final"


def snapshot_of(stage: str) -> tuple[str, int | None]:
    """``(run, step)`` of a stage name: ``run/step_NNNNNN`` is the EMA snapshot of ``run`` after that
    many rounds (``exports/step_NNNNNN``), ``run/final`` and ``run`` the whole run (step None)."""
    head, _, tail = stage.rpartition("/")
    if head and tail.startswith("step_") and tail[5:].isdigit():
        return head, int(tail[5:])
    return (head, None) if head and tail == FINAL else (stage, None)


def up_to_step(log: list[dict[str, str]], step: int) -> tuple[list[dict[str, str]], float]:
    """The rows of one run's log up to its snapshot at global step ``step`` (its first ``step``
    rounds, logged at steps 0 … step - 1: a round's metrics are logged before its optimiser step
    advances the global step), and the latest minutes logged by then."""
    rows = [r for r in log if not r.get("step") or int(float(r["step"])) < step]
    return rows, max((float(r[MINUTES]) for r in rows if r.get(MINUTES)), default=0.0)


def chained_log(root: Path, stages: Sequence[str]) -> tuple[list[dict[str, str]], float]:
    """The logs of ``<root>/<stage>`` runs that continued one another, as one log: each stage's
    minutes and compute totals (:data:`COUNTERS`) shifted by those of the stages before it; and the
    total minutes. A stage ``run/step_NNNNNN`` is that run up to its snapshot (:func:`snapshot_of`)."""
    rows, before = [], dict.fromkeys((MINUTES, *COUNTERS), 0.0)  # what the stages so far added up to
    for stage in stages:
        run, step = snapshot_of(stage)
        log = training_log(Path(root) / run)[0]
        if step is not None:
            log = up_to_step(log, step)[0]
        rows += [{k: str(float(v) + before[k]) if k in before and v else v for k, v in r.items()} for r in log]
        for key in before:  # each stage's total: its largest value (minutes and counters only grow)
            before[key] += max((float(r[key]) for r in log if r.get(key)), default=0.0)
    return rows, before[MINUTES]


#: the training overrides that start a run from an earlier run's adapter
INIT_ADAPTER = ("module.init_adapter=", "+module.init_adapter=")


def started_from(root: Path, stage: str) -> str | None:
    """The stage that ``stage``'s run continued: the run under ``root`` whose adapter its command's
    ``module.init_adapter`` names (``.../<name>/adapter`` → ``<name>``, an EMA snapshot
    ``.../<name>/exports/step_N`` → ``<name>/step_N``), matched by name so that a records folder
    (:mod:`opd.results.records`) chains like the runs folder did; None when the run started from
    the base model, or from an adapter that is not a run under ``root``."""
    overrides = Path(root) / snapshot_of(stage)[0] / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    given = [str(o) for o in yaml.safe_load(overrides.read_text()) or []]
    values = [o.split("=", 1)[1] for o in given if o.startswith(INIT_ADAPTER)]
    if not values or values[-1] in ("", "null", "None"):
        return None
    adapter = Path(values[-1])
    if adapter.name == "adapter":
        name = adapter.parent.name
    elif adapter.parent.name == "exports" and snapshot_of(f"x/{adapter.name}")[1] is not None:
        name = f"{adapter.parent.parent.name}/{adapter.name}"
    else:
        return None
    return name if (Path(root) / snapshot_of(name)[0]).is_dir() else None


def stages_of(root: Path, stage: str) -> list[str]:
    """``stage`` and the runs it continued (:func:`started_from`), earliest first: what
    :func:`chained_log` reads as one training (e.g. a CFG-distilled start and the RL run on it)."""
    stages = [stage]
    while (earlier := started_from(root, stages[0])) is not None:
        if earlier in stages or snapshot_of(earlier)[0] in {snapshot_of(s)[0] for s in stages}:
            raise ValueError(f"{root}: the runs {', '.join([earlier, *stages])} start from one another in a circle "
                             "(module.init_adapter in their .hydra/overrides.yaml)")
        stages.insert(0, earlier)
    return stages


def column(rows: Sequence[dict[str, str]], key: str) -> list[float]:
    """The logged values of ``key`` in ``rows`` (:func:`training_log`), in row order, blanks left out."""
    return [float(r[key]) for r in rows if r.get(key)]


def logged(run: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` over the run's logs in step order (a resumed run's later value
    of a step wins); an error naming the run when it never logged ``key``."""
    points = {int(float(r["step"])): float(r[key]) for r in training_log(run)[0] if r.get(key)}
    if not points:
        raise ValueError(f"{run}: no logged values of {key!r} in csv/version_*/metrics.csv (was logger=csv set?)")
    return sorted(points.items())


def moving_average(values: Sequence[float], width: int, centred: bool = False) -> list[float]:
    """The mean over the ``width`` values ending at each point (``centred``: around it, ``width // 2``
    on each side), over fewer values near the ends."""
    before, after = (width // 2, width // 2) if centred else (width - 1, 0)
    windows = [values[max(0, i - before): i + after + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def run_command(run: Path) -> str:
    """``python -m opd.train <overrides>`` as the run was started (``.hydra/overrides.yaml``), without
    Hydra's own overrides (``hydra.*``, ``hydra/*``) and those that only schedule the run (``ckpt_path``:
    the resume of a stopped run; ``callbacks.time_slice.*``: where it stopped), each key once with the
    value Hydra applied (the last); empty when the run has no Hydra record."""
    overrides = Path(run) / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return ""
    scheduling = ("hydra.", "hydra/", "ckpt_path=", "callbacks.time_slice.")
    given = [str(o) for o in yaml.safe_load(overrides.read_text()) or [] if not str(o).startswith(scheduling)]
    last = {o.split("=", 1)[0]: i for i, o in enumerate(given)}
    items = [o for i, o in enumerate(given) if last[o.split("=", 1)[0]] == i]
    return " ".join(["python -m opd.train", *items])
