"""What a training run has spent, so that runs compare at equal compute: images sampled, transformer
passes and model FLOPs.

Only the training rounds count (:meth:`ComputeMeter.counting` around each): image-grid previews,
evaluations and the FLOP measurement itself are monitoring, not the method. Inside a round, a
forward pre-hook on the transformer counts *sample-passes*: every call adds its batch size (a CFG
pass of ``B`` images is one call of ``2B``), as a training pass when autograd records it, else as a
no-grad pass (rollouts, teacher targets, reference passes). FLOPs are the counts times the FLOPs of
one sample-pass, measured once with torch's FLOP counter on a one-image forward (no grad) and a
one-image forward + backward through the trainable LoRA, at the run's image size and text length:
``model_flops = nograd_passes · F_forward + train_passes · F_train`` (every pass priced with the
student's LoRA on: a teacher's LoRA of another rank, or none, differs by its thin matmuls only). Activation checkpointing
recomputes forwards in the backward pass; those recomputations are counted as further training
passes, so the figure is then an upper bound of what ran.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class ComputeMeter:
    """Running totals of a run's compute; ``state_dict``/``load_state_dict`` carry them over a resume."""

    def __init__(self) -> None:
        self.images_sampled = 0
        self.train_passes = 0
        self.nograd_passes = 0
        self.forward_flops = 0.0  # one sample, no grad
        self.train_flops = 0.0    # one sample, forward + backward
        self._counting = False
        self._handle: Any = None

    def add_images(self, count: int) -> None:
        """``count`` images sampled (counted inside :meth:`counting` only)."""
        if self._counting:
            self.images_sampled += count

    def attach(self, transformer: nn.Module) -> None:
        """Count every forward of ``transformer`` from now on (once per meter)."""
        if self._handle is None:
            self._handle = transformer.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._counting:
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, Tensor):
            return
        if torch.is_grad_enabled():
            self.train_passes += int(x.shape[0])
        else:
            self.nograd_passes += int(x.shape[0])

    def measure(self, forward: Any, trainable: list[nn.Parameter]) -> None:
        """FLOPs of one sample-pass: ``forward()`` runs the transformer on one image and returns its
        output; it is called once without grad and once with a backward of ``output.sum()`` (the
        gradients it leaves on ``trainable`` are cleared)."""
        from torch.utils.flop_counter import FlopCounterMode

        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                forward()
            self.forward_flops = float(counter.get_total_flops())
            with FlopCounterMode(display=False) as counter:
                forward().float().sum().backward()
            self.train_flops = float(counter.get_total_flops())
        finally:
            for p in trainable:
                p.grad = None

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count the transformer passes (and, through the module, the images sampled) of the body."""
        self._counting = True
        try:
            yield
        finally:
            self._counting = False

    @property
    def model_flops(self) -> float:
        return self.nograd_passes * self.forward_flops + self.train_passes * self.train_flops

    def metrics(self, world_size: int = 1) -> dict[str, float]:
        """The totals to log (``compute/...``; FLOPs in TFLOP) over ``world_size`` ranks, each of which
        does the same work as this one."""
        return {"compute/images_sampled": float(self.images_sampled) * world_size,
                "compute/transformer_passes": float(self.train_passes + self.nograd_passes) * world_size,
                "compute/model_tflop": self.model_flops / 1e12 * world_size}

    def state_dict(self) -> dict[str, float]:
        return {"images_sampled": self.images_sampled, "train_passes": self.train_passes,
                "nograd_passes": self.nograd_passes}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.images_sampled = int(state.get("images_sampled", 0))
        self.train_passes = int(state.get("train_passes", 0))
        self.nograd_passes = int(state.get("nograd_passes", 0))
