"""The memory and speed record of one training run: ``docs/scale/<gpu>.json``.

    python -m opd.results.scale_record <run> --out docs/scale/h200.json [--smi nvsmi.csv] [--gpus N]

Reads the run's composed config (``<run>/.hydra/config.yaml``) and its CSV log (``logger=csv``):
``seconds_per_round`` is the median of the differences of the logged ``time/minutes`` (logged at the
end of each round, so the differences time rounds 2, 3, ...; round 2 is left out too, as the first two
rounds warm up kernels, allocators and caches), ``trajectories_per_second`` is one round's rollouts
over all GPUs (``module.prompts_per_teacher`` × teachers × GPUs for distillation; for a teacher's RL run
``module.num_groups_per_round`` × ``module.group_size``, which already counts every GPU) divided by it. Memory comes from two places: the peak of PyTorch's allocator
that the training module logs every round on a GPU (``memory/peak_allocated_gib``,
``memory/peak_reserved_gib``, rank 0), and, with ``--smi``, the largest ``memory.used`` of
``nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200`` on any GPU: what
the process held, CUDA context included. ``peak_memory_gib`` is the nvidia-smi figure where there is
one, else the reserved peak. How to make a record: docs/scale/README.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from opd.results.logs import MINUTES, column, training_log

#: the settings that decide memory and speed, copied into the record
SETTINGS = ("model.image_size", "model.torch_dtype", "model.use_t5", "model.max_sequence_length",
            "model.gradient_checkpointing", "model.compile_blocks", "sampler.num_steps", "sampler.kernel",
            "sampler.guidance_scale",
            "module.prompts_per_teacher", "module.target_chunk", "module.train_chunk",
            "module.merge_teacher_lora", "module.merge_rollout_lora", "module.num_groups_per_round",
            "module.group_size", "module.num_train_steps", "module.nograd_chunk", "module.terms_per_forward",
            "module.rollout_chunks", "module.lora", "trainer.precision", "trainer.strategy")


def round_seconds(rows: list[dict[str, str]]) -> list[float]:
    """Seconds of rounds 3, 4, ...: differences of ``time/minutes`` by step, the first one left out."""
    points = sorted({int(r["step"]): float(r[MINUTES]) for r in rows if r.get(MINUTES) and r.get("step")}.items())
    return [60 * (b - a) for (_, a), (_, b) in pairwise(points)][1:]


def smi_peak_gib(path: Path) -> float | None:
    """The largest ``memory.used`` (MiB) of any GPU in an nvidia-smi CSV, in GiB; None without rows."""
    used = [float(line.split(",")[1]) for line in Path(path).read_text().splitlines() if line.count(",") == 1]
    return max(used) / 1024 if used else None


def logged_peak(rows: list[dict[str, str]], key: str) -> float | None:
    return max(column(rows, key), default=None)


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False,
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        out = []
    return out[0].strip() if out else "unknown GPU"


def scale_record(run: Path, gpus: int = 1, smi: Path | None = None, device: str | None = None,
                 notes: str | None = None) -> dict[str, Any]:
    """The record of ``run`` (see the module docstring); raises if the run logged fewer than 3 rounds."""
    run = Path(run)
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: give the folder of a training run (its hydra.run.dir)")
    cfg = OmegaConf.load(config)

    def get(key: str) -> Any:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    rows, _ = training_log(run)
    rounds = round_seconds(rows)
    if len(rounds) < 2:
        raise ValueError(f"{run}: {len(rounds) + 1} logged round(s); a record needs at least 3 "
                         "(train with logger=csv trainer.log_every_n_steps=1)")
    teachers = sorted(cfg.get("teacher") or {})
    if teachers:  # distillation: prompts per GPU, per teacher
        per_round = (get("module.prompts_per_teacher") or 0) * len(teachers) * gpus
    else:  # teacher RL: the round's groups are split over the GPUs
        per_round = (get("module.num_groups_per_round") or 0) * (get("module.group_size") or 0)
    if not per_round:
        raise ValueError(f"{run}: cannot count its trajectories per round: neither module.prompts_per_teacher with "
                         "teachers (distillation) nor module.num_groups_per_round and module.group_size (RL) is set")
    seconds = statistics.median(rounds)
    reserved = logged_peak(rows, "memory/peak_reserved_gib")
    smi_peak = smi_peak_gib(smi) if smi is not None else None
    record = {
        "experiment": str(get("task_name")),
        "device": device or f"{gpus}x {gpu_name()}",
        "peak_memory_gib": round(smi_peak if smi_peak is not None else reserved, 2) if (smi_peak or reserved) else None,
        "peak_memory_source": "nvidia-smi memory.used" if smi_peak is not None else "torch max_memory_reserved",
        "torch_peak_allocated_gib": logged_peak(rows, "memory/peak_allocated_gib"),
        "torch_peak_reserved_gib": reserved,
        "seconds_per_round": round(seconds, 3),
        "trajectories_per_second": round(per_round / seconds, 4),
        "rounds_timed": len(rounds),
        "round_seconds": [round(s, 3) for s in rounds],
        "settings": {"model": str(get("model._target_")).rsplit(".", 1)[-1], "num_gpus": gpus,
                     "teachers": teachers, "trajectories_per_round": per_round,
                     **{key: get(key) for key in SETTINGS if get(key) is not None}},
    }
    if notes:
        record["notes"] = notes
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the training run's folder")
    parser.add_argument("--out", type=Path, required=True, help="where to write the record (JSON)")
    parser.add_argument("--smi", type=Path, help="nvidia-smi memory CSV sampled during the run")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the run (the DDP world size)")
    parser.add_argument("--device", help="the device, in words (default: <gpus>x the nvidia-smi name)")
    parser.add_argument("--notes", help="anything the settings do not say")
    args = parser.parse_args(argv)
    record = scale_record(args.run, args.gpus, args.smi, args.device, args.notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
