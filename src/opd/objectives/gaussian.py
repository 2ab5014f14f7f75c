"""Gaussian helpers shared by the objectives: per-step scalars and the same-covariance KL.

Every kernel of :mod:`opd.sampling` gives the student, the teacher, the old and the reference
policy the *same* step covariance ``s² I``, so all KLs between their transitions reduce to
:func:`gaussian_kl_same_std`; it lives here once for GRPO's KL penalty and DiffusionOPD's loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def per_sample_scalar(value: Tensor | float, batch_size: int, name: str) -> Tensor:
    """A per-step quantity (``s_k``, ``Δ_k``) as float32 of shape ``[]`` or ``[B]``.

    Accepts a float, a 0-d tensor, ``[B]`` or ``[B, 1, ...]`` (the broadcastable ``Transition.std``).
    """
    v = torch.as_tensor(value, dtype=torch.float32)
    if v.numel() == 1:
        return v.reshape(())
    if v.shape[0] != batch_size or v.numel() != batch_size:
        raise ValueError(f"{name} must be a scalar, [B] or [B, 1, ...] with B = {batch_size}; "
                         f"got shape {tuple(v.shape)}")
    return v.reshape(batch_size)


def compute_dtype(t: Tensor) -> Tensor:
    """At least float32 (bf16 loses the small mean gaps a KL is made of); float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def reduce_elements(per_element: Tensor, reduction: str) -> Tensor:
    """``[B, ...]`` → ``[B]`` by mean or sum over the ``D`` latent elements."""
    flat = per_element.flatten(1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def gaussian_kl_same_std(mean_a: Tensor, mean_b: Tensor, std: Tensor | float, reduction: str = "mean") -> Tensor:
    """Per-sample ``KL(N(μ_a, s² I) || N(μ_b, s² I)) = reduce_D (μ_a − μ_b)² / (2 s²)`` ``[B]``.

    ``mean_a, mean_b [B, ...]``; ``std`` = ``s > 0``, a scalar, ``[B]`` or ``[B, 1, ...]`` (as
    ``Transition.std``). ``reduction="sum"`` is the exact KL, ``"mean"`` the exact KL over ``D``.
    Neither mean is detached here; callers detach their fixed targets.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    var = per_sample_scalar(std, mean_a.shape[0], "std").to(mean_a.device).square()
    diff = compute_dtype(mean_a) - compute_dtype(mean_b)
    return reduce_elements(diff.square(), reduction) / (2 * var)
