"""Evaluation entry point: ``python -m opd.evaluate [checkpoints.<name>=<adapter>] ...``.

Generates every task's test prompts with every checkpoint (the base model and LoRA adapters on
it, each at its own CFG scale if given), ``images_per_prompt`` images per prompt, each from its own
noise seed (:mod:`opd.evaluation.seeds`: the same image whatever the batch size or rank count),
scores them with the task's rewards and writes, under the run folder: ``results.json``
(row → metric → value; the key scheme is in :mod:`opd.evaluation.report`), ``results.md`` (the
paper's Table 1 layout with 95 % prompt-clustered bootstrap intervals, a min–max normalised average,
the controls, all metrics and per-tag means), ``scores.png`` (bar chart with the intervals),
``grids/<checkpoint>_<task>.png``, ``grids/compare_<task>.png`` (with several checkpoints: the same
prompts side by side), ``grids/cover_<task>.png``, ``images/…png`` and ``samples.jsonl`` (one line
per image with its prompt, metadata, scores and swapped-prompt scores).

Controls (:mod:`opd.evaluation.controls`, settings under ``controls`` in conf/eval_settings/default.yaml): each
image is also scored against another prompt of its tag (``controls.swapped``); each checkpoint's
prompt sensitivity is measured on ``controls.sensitivity_pairs`` prompt pairs against the base model
(adapter off) at the same CFG scale; and a task with a ``cover`` entry gets a ``cover`` row: the best
constant image among random mini-world scenes, found on its training prompts.

Under ``torchrun --nproc_per_node N`` the batches (and sensitivity pairs) are shared among the
ranks and rank 0 searches the covers and writes the report (:mod:`opd.evaluation.distributed`).

The evaluation itself is :func:`opd.evaluation.run.evaluate`, which every training run also calls at
its end (``opd.train``; the training config's ``eval`` node); the settings both share are
conf/eval_settings/default.yaml.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import opd.config  # registers the structured-config schemas; config_dir
from opd.evaluation.run import (  # noqa: F401 — the evaluation's pieces, importable from here as before
    RANDOM_FLAG,
    _instantiate_prompts,
    build_reward,
    build_tasks,
    cover_specs,
    evaluate,
    load_checkpoints,
    load_prompt_sets,
    random_weight_notes,
    resolve_device,
    takes_random_flag,
)

CONFIG_DIR = str(opd.config.config_dir())  # the checkout's conf/, or the copy inside an installed wheel


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    # `python -m opd.evaluate` runs this file as __main__; call the importable module's main instead, so that
    # multirun launchers that send the task to other processes (hydra/launcher=local, slurm) pickle it
    # by reference rather than by value (which fails on torch's module objects)
    from opd.evaluate import main as importable_main

    importable_main()
