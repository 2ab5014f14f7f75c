"""Group-relative advantages (Flow-GRPO, GRPO-Guard, DiffusionNFT; docs/algorithms.md).

``A_i = (R_i − mean_{g(i)} R) / (std + eps)``, clipped to ``[−clip, clip]``, where ``g(i)`` is the
group (prompt) of sample ``i`` and ``std`` is either the standard deviation of *all* rewards
(``global_std=True``, Flow-GRPO's default for every task and DiffusionNFT's) or of the group's
(``global_std=False``, GRPO-Guard). Both are *population* standard deviations (divide by ``N``, not
``N − 1``): the reference tracker calls ``np.std`` with its default ``ddof=0``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_rewards(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a [N] tensor; got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must have the shape of rewards {tuple(rewards.shape)}; "
                         f"got {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor (one id per prompt); got {group_ids.dtype}")
    nan = torch.isnan(rewards)
    if bool(nan.any()):
        idx = nan.nonzero().flatten().tolist()
        shown = ", ".join(map(str, idx[:20])) + (", ..." if len(idx) > 20 else "")
        raise ValueError(f"rewards contain {len(idx)} NaN value(s) at indices [{shown}]: a reward model "
                         "failed on those samples; make it return a number (e.g. 0) for failures")


def group_advantages(rewards: Tensor, group_ids: Tensor, global_std: bool = True, eps: float = 1e-4,
                     clip: float = 5.0) -> Tensor:
    """Normalised, clipped advantages ``[N]`` of the rewards ``[N]`` grouped by ``group_ids [N]`` (long).

    The caller passes the rewards and group ids of *all* ranks (gathered), so that group means and the
    global std see every sample of the epoch, as the references do. Computed in float64 (the
    reference computes in numpy float64); returned in the rewards' dtype (float32 if not floating).
    Raises ``ValueError`` naming the indices of NaN rewards.
    """
    _check_rewards(rewards, group_ids)
    r = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if r.numel() else 0
    counts = torch.bincount(inverse, minlength=num_groups).to(r.dtype)
    group_mean = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, r) / counts
    centred = r - group_mean[inverse]
    if global_std:
        std = r.std(unbiased=False)
    else:
        group_var = torch.zeros_like(group_mean).index_add_(0, inverse, centred.square()) / counts
        std = group_var.sqrt()[inverse]
    adv = (centred / (std + eps)).clamp(-clip, clip)
    return adv.to(rewards.dtype if rewards.dtype.is_floating_point else torch.float32)


def nonzero_advantage_mask(advantages: Tensor) -> Tensor:
    """``bool [N]``: samples whose advantage ``[N]`` (or ``[N, T]``, one per step) is not exactly 0.

    Flow-GRPO drops the others: a group whose rewards are all equal gives ``A = 0`` for each of its
    samples, which carry no policy gradient but would still cost a forward and backward pass.
    """
    if advantages.ndim == 0:
        raise ValueError("advantages must be [N] or [N, ...]; got a 0-d tensor")
    return advantages.reshape(advantages.shape[0], -1).ne(0).any(dim=1)
