"""DiffusionNFT: negative-aware fine-tuning on the forward process (docs/algorithms.md, DiffusionNFT).

Rollouts come from the old policy ``v_old``; only the final ``x0`` is kept. Each ``x0`` is re-noised
at grid times, and the trained velocity ``v_θ`` defines an implicit positive and negative policy

    v⁺ = β v_θ + (1 − β) v_old,    v⁻ = (1 + β) v_old − β v_θ    (v_old stop-grad),

whose data predictions ``x̂0^± = x_t − t v^±`` regress ``x0``, weighted by the optimality probability
``r`` (positive) and ``1 − r`` (negative). With ``v_θ = v_old`` both equal ``v_old``, so the loss is
then independent of ``r``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def optimality_probability(advantages: Tensor, clip: float = 5.0) -> Tensor:
    """``r = clip((clip(A, −c, c)/c + 1)/2, 0, 1)`` ``[B]``: A = −c → 0, 0 → ½, c → 1."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0; got {clip}")
    return ((advantages.clamp(-clip, clip) / clip + 1) / 2).clamp(0, 1)


def _view(t: Tensor, like: Tensor) -> Tensor:
    """``[B]`` → ``[B, 1, ...]`` broadcastable to ``like``."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _normalised_x0_loss(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """``mean_D (x̂0 − x0)² / w`` ``[B]``, ``w = stopgrad(max(mean_D |x̂0 − x0|, 1e-5))``.

    The weight makes the gradient scale-free per sample (DiffusionNFT's adaptive weighting); the
    floor keeps it finite once a prediction is exact.
    """
    err = (x0_hat - x0).flatten(1)
    weight = err.detach().abs().mean(dim=1).clamp_min(1e-5)
    return err.square().mean(dim=1) / weight


class NFTLoss:
    """``L = s · mean_i [(r_i L⁺_i + (1 − r_i) L⁻_i)/β] + λ mean_i mean_D (v_θ − v_ref)²``.

    ``beta`` = β_NFT (1.0 GenEval/PickScore, 0.1 OCR), ``kl_weight`` = λ, ``loss_scale`` = s (the
    reference multiplies by its advantage clip, 5).
    """

    def __init__(self, beta: float = 1.0, kl_weight: float = 1e-4, loss_scale: float = 5.0) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0 (the loss divides by it); got {beta}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0; got {kl_weight}")
        self.beta = beta
        self.kl_weight = kl_weight
        self.loss_scale = loss_scale

    def __call__(self, v_theta: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor,
                 v_ref: Tensor | None = None, weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)``.

        ``v_theta [B, ...]`` (carries gradient), ``v_old [B, ...]`` (old policy, detached here),
        ``x_t [B, ...]`` noised at ``t [B]`` (σ, not 1000·σ) from ``x0 [B, ...]``, ``r [B]`` from
        :func:`optimality_probability`; ``v_ref [B, ...]`` (reference model) enables the λ term.
        Metrics: ``train/policy_loss``, ``train/loss_pos``, ``train/loss_neg``, ``train/old_deviate``
        (``mean (v_θ − v_old)²``), ``train/r_mean`` and, with ``v_ref``, ``train/kl_ref_velocity_mse``
        (the λ term: ``mean (v_θ − v_ref)²``, DiffusionNFT's velocity-space stand-in for the KL to the
        reference model). ``weights [B]`` (default all 1) weight each sample's terms inside the means:
        0 leaves a sample out of the gradient (:class:`~opd.modules.teacher_nft.NFTTeacher`'s
        ``skip_zero_variance_groups``), and weights averaging 1 keep the loss a mean over the others.
        """
        v, v_o = v_theta.float(), v_old.detach().float()
        w = torch.ones_like(t, dtype=torch.float32) if weights is None else weights.float()
        xt, x0f = x_t.float(), x0.float()
        tt = _view(t.float(), xt)
        v_pos = self.beta * v + (1 - self.beta) * v_o
        v_neg = (1 + self.beta) * v_o - self.beta * v
        loss_pos = _normalised_x0_loss(xt - tt * v_pos, x0f)
        loss_neg = _normalised_x0_loss(xt - tt * v_neg, x0f)
        rf = r.float()
        policy_loss = self.loss_scale * (w * (rf * loss_pos + (1 - rf) * loss_neg) / self.beta).mean()
        metrics = {
            "train/policy_loss": policy_loss.detach(),
            "train/loss_pos": loss_pos.detach().mean(),
            "train/loss_neg": loss_neg.detach().mean(),
            "train/old_deviate": (v.detach() - v_o).square().mean(),
            "train/r_mean": rf.mean(),
        }
        loss = policy_loss
        if v_ref is not None:
            kl = (w * (v - v_ref.detach().float()).square().flatten(1).mean(dim=1)).mean()
            metrics["train/kl_ref_velocity_mse"] = kl.detach()
            loss = loss + self.kl_weight * kl
        return loss, metrics


def nft_noising(x0: Tensor, grid: Tensor, num_train_steps: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Re-noise each clean sample at ``num_train_steps`` distinct grid times, in random order.

    ``x0 [B, ...]``; ``grid [K+1]`` the sampling schedule ``1 = t_0 > … > t_K = 0``. Per sample, a
    random permutation of the K sampling times ``t_0 … t_{K−1}`` (the reference permutes the
    scheduler's timesteps, which exclude the final 0, where ``x_t = x0`` would teach nothing); the
    first ``num_train_steps`` are kept. Returns ``x_t [B, S, ...] = (1 − t) x0 + t ε`` with fresh
    ``ε ~ N(0, I)``, ``t [B, S]`` (σ units) and ``ε [B, S, ...]``, ``S = num_train_steps``.
    """
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be a [K+1] schedule from 1 to 0; got shape {tuple(grid.shape)}")
    times = grid[:-1].to(device=x0.device, dtype=torch.float32)
    num_times = times.numel()
    if not 1 <= num_train_steps <= num_times:
        raise ValueError(f"num_train_steps must be in [1, K = {num_times}]; got {num_train_steps}")
    b = x0.shape[0]
    # argsort of i.i.d. uniforms is a uniformly random permutation per row, drawn in one call
    perm = torch.rand(b, num_times, generator=generator, device=x0.device).argsort(dim=1)
    t = times[perm[:, :num_train_steps]]
    noise = torch.randn((b, num_train_steps, *x0.shape[1:]), generator=generator, device=x0.device,
                        dtype=x0.dtype)
    tt = t.reshape(b, num_train_steps, *([1] * (x0.ndim - 1))).to(x0.dtype)
    x_t = (1 - tt) * x0.unsqueeze(1) + tt * noise
    return x_t, t, noise


def old_policy_decay(num_updates: int, schedule: str) -> float:
    """η of the old-policy update after ``num_updates`` optimiser steps.

    ``"linear"`` (GenEval, PickScore): ``min(0.001 n, 0.5)``; ``"delayed"`` (OCR): 0 for ``n < 75``,
    then ``min(0.0075 (n − 75), 0.999)`` — the old policy tracks θ exactly at first.
    """
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0; got {num_updates}")
    if schedule == "linear":
        return min(0.001 * num_updates, 0.5)
    if schedule == "delayed":
        return 0.0 if num_updates < 75 else min(0.0075 * (num_updates - 75), 0.999)
    raise ValueError(f"unknown old-policy decay schedule {schedule!r}; choose 'linear' or 'delayed'")


@torch.no_grad()
def soft_update_(old_params: Iterable[Tensor], params: Iterable[Tensor], eta: float) -> None:
    """In place ``θ_old ← η θ_old + (1 − η) θ``, parameter by parameter (matched by position)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1]; got {eta}")
    old_list, new_list = list(old_params), list(params)
    # checked up front so that a mismatch leaves θ_old untouched rather than half-updated
    if len(old_list) != len(new_list):
        raise ValueError(f"old_params has {len(old_list)} tensors but params has {len(new_list)}")
    for old, new in zip(old_list, new_list):
        old.mul_(eta).add_(new.detach().to(old.dtype), alpha=1 - eta)
