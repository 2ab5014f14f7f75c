"""Stop a run once it has spent a compute budget, so that runs compare at equal compute.

``callbacks.compute_budget.max_model_tflop=<T>`` (or ``max_images_sampled=<N>``) ends training after
the first round at which the module's :class:`~opd.modules.compute.ComputeMeter` (what the log's
``compute/...`` columns show, summed over all GPUs) reaches the budget; the round that crosses it is
completed, so a run overshoots by less than one round. Both unset (the default): no budget.
``python -m opd.results.compute`` reads the budget off finished runs (e.g. a MOPD student plus its
teachers), for a baseline trained "at MOPD's compute".
"""
from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback

log = logging.getLogger(__name__)

#: budget argument → the ``compute/...`` metric it bounds
LIMITS = {"max_model_tflop": "compute/model_tflop", "max_images_sampled": "compute/images_sampled"}


def _number(name: str, value: Any) -> float:
    """A budget as a float, or an error that names the setting (an empty one is what a failed
    ``$(python -m opd.results.compute ...)`` in a Makefile recipe leaves behind)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"callbacks.compute_budget.{name}={value!r} is not a number"
                         + (": the command that computed it (python -m opd.results.compute in make) failed, "
                            "see its error above, or give the budget yourself" if value == "" else "")) from None


class ComputeBudget(Callback):
    def __init__(self, max_model_tflop: float | None = None, max_images_sampled: float | None = None) -> None:
        self.limits = {LIMITS[k]: _number(k, v) for k, v in
                       (("max_model_tflop", max_model_tflop), ("max_images_sampled", max_images_sampled))
                       if v is not None}
        for key, value in self.limits.items():
            if not value > 0:
                raise ValueError(f"callbacks.compute_budget: the budget of {key} must be > 0, got {value}")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.limits and getattr(pl_module, "compute", None) is None:
            raise ValueError(f"callbacks.compute_budget needs a module that meters its compute "
                             f"(a post-training module); {type(pl_module).__name__} does not")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.limits:
            return
        spent = pl_module.compute.metrics(trainer.world_size)  # what the log shows: totals over all ranks
        reached = [k for k, limit in self.limits.items() if spent.get(k, 0.0) >= limit]
        if reached:
            if not trainer.should_stop:
                log.info("compute budget reached at step %d: %s", trainer.global_step,
                         ", ".join(f"{k} {spent[k]:.4g} >= {self.limits[k]:.4g}" for k in reached))
            trainer.should_stop = True
