"""Noise schedules: small pure functions returning σ grids from 1 to 0."""
from __future__ import annotations

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u: Tensor | float, shift: float) -> Tensor | float:
    """SD3's resolution shift ``σ = s·u / (1 + (s − 1)·u)``."""
    return shift * u / (1 + (shift - 1) * u)


def sd3_sigmas(num_steps: int, shift: float = 3.0, device: torch.device | str | None = None) -> Tensor:
    """``[num_steps + 1]`` σ values ``1 = σ_0 > … > σ_{N−1} > σ_N = 0``, exactly as
    ``StableDiffusion3Pipeline`` drives ``FlowMatchEulerDiscreteScheduler(shift)``.

    ``u`` is uniform from 1 down to the scheduler's smallest *training* σ (``shift(1/1000)``, i.e.
    diffusers shifts that end point once and the grid again), then shifted; a final 0 is
    appended. The network sees ``timestep = 1000·σ``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
    u_min = shift_sigma(1.0 / NUM_TRAIN_TIMESTEPS, shift)
    u = torch.linspace(1.0, u_min, num_steps, dtype=torch.float64)
    sigmas = torch.cat([shift_sigma(u, shift), torch.zeros(1, dtype=torch.float64)])
    return sigmas.to(torch.float32).to(device)


def timestep_of(sigma: Tensor) -> Tensor:
    """The network's timestep input: ``1000·σ``."""
    return sigma * 1000.0
