"""Pure transition kernels of the reverse (sampling) process of a flow-matching model.

Convention (SD3): ``x_σ = (1 − σ) x0 + σ ε``, the network predicts ``v ≈ ε − x0``, sampling runs
from ``σ = 1`` to ``σ = 0``. One step goes from ``x`` at ``σ`` to ``x'`` at ``σ' < σ`` with
``Δ = σ' − σ < 0``. Every kernel is a pure function of ``(x, v, σ, σ', noise level[, history])``
returning the Gaussian ``N(mean, std² I)`` of ``x'`` — there is no scheduler state and no hidden
step index, so the same function serves rollouts, log-probabilities in RL losses and the
closed-form per-step KL of DiffusionOPD.

Shapes: ``x, v`` are ``[B, ...]``; ``σ, σ'`` are Python floats, 0-d tensors or per-sample
tensors ``[B]``. ``std`` is returned with shape ``[B, 1, ...]`` (or a 0-d tensor) so that it
broadcasts against ``x``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class History:
    """What a multistep kernel (``dpm2``) needs from the previous step.

    ``x0``: the previous step's data prediction ``[B, ...]``; ``sigma``: the σ it was made at.
    """

    x0: Tensor
    sigma: Tensor | float


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample log-density of ``x`` under ``N(mean, std² I)``, averaged over elements (as
    Flow-GRPO): ``[B]``. ``std`` positive and broadcastable to ``x``."""
    lp = -0.5 * ((x - mean) / std).square() - torch.log(std) - _LOG_SQRT_2PI
    return lp.flatten(1).mean(dim=1)


@dataclass(frozen=True)
class Transition:
    """The Gaussian ``N(mean, std² I)`` of the next state, plus what the next step may need."""

    mean: Tensor
    std: Tensor
    history: History

    def log_prob(self, x_next: Tensor) -> Tensor:
        """Per-sample log-density of ``x_next``, averaged over elements (as Flow-GRPO): ``[B]``.

        The sample is detached (the score-function estimators differentiate through the mean
        only). Raises for a deterministic step, whose density is undefined.
        """
        std = self.std.to(torch.float32)
        if bool((std <= 0).any()):
            raise ValueError("log_prob of a deterministic transition (std = 0): use an SDE kernel "
                             "with noise_level > 0 for the steps whose log-probabilities you need")
        return gaussian_log_prob(x_next.detach().float(), self.mean.float(), std)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x' = mean + std · ξ`` with ``ξ ~ N(0, I)`` from ``generator``."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std.to(self.mean.dtype) * noise


def _expand(s: Tensor | float, x: Tensor) -> Tensor:
    """σ as a float32 tensor broadcastable to ``x``: scalars stay 0-d, ``[B]`` becomes ``[B, 1, ...]``."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or a [B] tensor; got shape {tuple(s.shape)} for x {tuple(x.shape)}")
    return s.view(-1, *([1] * (x.ndim - 1)))


def _x0(x: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """Data prediction ``x̂0 = x − σ v``."""
    return x - sigma * v


def ode(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float,
        history: History | None = None) -> tuple[Tensor, Tensor]:
    """Euler: ``μ = x + Δ v``, no noise (``noise_level`` is ignored)."""
    return x + (sigma_next - sigma) * v, torch.zeros_like(sigma)


def flow(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float,
         history: History | None = None) -> tuple[Tensor, Tensor]:
    """Flow-GRPO's SDE (paper Eq. 5–7).

    ``g = a·sqrt(σ / (1 − σ̃))`` with ``σ̃ = σ'`` at ``σ = 1`` (the references' guard, σ_1 there);
    ``μ = x(1 + g²Δ/(2σ)) + v(1 + g²(1 − σ)/(2σ))Δ``; ``std = g·sqrt(−Δ)``.
    """
    dt = sigma_next - sigma
    g = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = x * (1 + g**2 * dt / (2 * sigma)) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, g * torch.sqrt(-dt)


def dance(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float,
          history: History | None = None) -> tuple[Tensor, Tensor]:
    """DanceGRPO's SDE: Euler plus a score correction ``−½ a² s(x) Δ``, ``std = a·sqrt(−Δ)``.

    The score of ``x_σ`` given the data prediction is ``s = −(x − (1 − σ) x̂0) / σ²``.
    """
    dt = sigma_next - sigma
    score = -(x - (1 - sigma) * _x0(x, v, sigma)) / sigma**2
    mean = x + dt * v - 0.5 * noise_level**2 * score * dt
    return mean, noise_level * torch.sqrt(-dt)


def _exp_neg_h(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """``e^{−h}`` with ``h = λ' − λ``, ``λ = log((1 − σ)/σ)``, written without logs so that the
    endpoints σ = 1 (λ = −∞) and σ' = 0 (λ' = +∞) give 0 exactly instead of NaN."""
    return (1 - sigma) * sigma_next / (sigma * (1 - sigma_next)).clamp_min(1e-12)


def cps(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float,
        history: History | None = None) -> tuple[Tensor, Tensor]:
    """Flow-GRPO's coefficient-preserving sampler (``sde_type="cps"``).

    ``s = σ' sin(aπ/2)``; ``μ = (1 − σ') x̂0 + sqrt(σ'² − s²) ε̂`` with ``ε̂ = x + (1 − σ) v``: the
    coefficients of ``x̂0`` and of the total noise stay ``(1 − σ', σ')``. At ``a = 0`` this is Euler.
    Not DDIM with η (:func:`ddim`): the two agree only at noise level 0.
    """
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    eps_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * _x0(x, v, sigma) + torch.sqrt(sigma_next**2 - std**2) * eps_hat
    return mean, std


def ddim(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float,
         history: History | None = None) -> tuple[Tensor, Tensor]:
    """DDIM with stochasticity ``η`` = ``noise_level`` (Song et al. 2021, Eq. 12, in flow units), as
    DiffusionNFT's and the DiffusionOPD authors' ``ddim`` solver.

    With ``α = 1 − σ``: ``std = η σ' sqrt(1 − (σ' α)² / (σ α')²) = η σ' sqrt(1 − e^{−2h})``;
    ``μ = α' x̂0 + sqrt(σ'² − std²) ε̂`` with ``ε̂ = (x − α x̂0)/σ = x + (1 − σ) v``.
    ``η = 0`` is deterministic DDIM (= Euler); ``η = 1`` equals the SDE-DPM-Solver++ step (:func:`dpm1`).
    """
    if not 0 <= noise_level <= 1:  # beyond 1 the mean's noise coefficient sqrt(σ'² − std²) is imaginary
        raise ValueError(f"kernel 'ddim' needs 0 <= eta <= 1 (sampler.noise_level); got {noise_level}")
    std = noise_level * sigma_next * torch.sqrt(1 - _exp_neg_h(sigma, sigma_next) ** 2)
    eps_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * _x0(x, v, sigma) + torch.sqrt(sigma_next**2 - std**2) * eps_hat
    return mean, std


def _dpm(x: Tensor, x0: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(SDE-)DPM-Solver++ step in data prediction with stochasticity ``η`` (DPM-Solver++ paper):
    ``x' = (σ'/σ) e^{−ηh} x + α'(1 − e^{−(1+η)h}) x̂0``, ``std = σ' sqrt(1 − e^{−2ηh})``, ``α = 1 − σ``.
    ``η = 0`` is the deterministic solver (equal to Euler at first order), ``η = 1`` the SDE solver."""
    e = _exp_neg_h(sigma, sigma_next)
    mean = sigma_next / sigma * e**eta * x + (1 - sigma_next) * (1 - e ** (1 + eta)) * x0
    return mean, sigma_next * torch.sqrt(1 - e ** (2 * eta))


def dpm1(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float,
         history: History | None = None) -> tuple[Tensor, Tensor]:
    """DPM-Solver++ order 1 (``noise_level`` = η, 0 deterministic, 1 SDE-DPM-Solver++)."""
    return _dpm(x, _x0(x, v, sigma), sigma, sigma_next, noise_level)


def dpm2(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float,
         history: History | None = None) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M): the first-order step applied to ``D = x̂0 + (x̂0 − x̂0_prev)/(2r)``,
    ``r = h_prev / h``. First order where there is no history (first step), where the previous
    step started at σ = 1 (``h_prev = ∞``) and on the last step (σ' = 0, "lower order final")."""
    x0 = _x0(x, v, sigma)
    if history is None:
        return _dpm(x, x0, sigma, sigma_next, noise_level)
    sigma_prev = _expand(history.sigma, x)
    inner = (sigma_prev < 1) & (sigma_next > 0)

    def lam(s: Tensor) -> Tensor:  # λ = log(α/σ), finite strictly inside (0, 1)
        return torch.log((1 - s) / s)

    def safe(s: Tensor) -> Tensor:  # endpoints replaced so no NaN enters torch.where's other branch
        return torch.where(inner, s, torch.full_like(s, 0.5))

    h = lam(safe(sigma_next)) - lam(safe(sigma))
    h_prev = lam(safe(sigma)) - lam(safe(sigma_prev))
    weight = torch.where(inner, h / (2 * h_prev), torch.zeros_like(h))
    return _dpm(x, x0 + weight * (x0 - history.x0), sigma, sigma_next, noise_level)


KERNELS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "ode": ode, "flow": flow, "dance": dance, "cps": cps, "ddim": ddim, "dpm1": dpm1, "dpm2": dpm2,
}


def transition(kernel: str, x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
               noise_level: float = 0.0, history: History | None = None) -> Transition:
    """One reverse step of ``kernel`` from ``x`` at ``sigma`` to ``sigma_next``.

    Computed in float32 (bf16 overflows in the SDE mean, as the references note). Returns a
    :class:`Transition` with ``mean [B, ...]``, ``std`` broadcastable to it, ``log_prob`` and
    ``sample``; ``transition.history`` feeds the next call of a multistep kernel.
    """
    try:
        fn = KERNELS[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {sorted(KERNELS)} (sampler.kernel)") from None
    xf, vf = x.float(), v.float()
    s, sn = _expand(sigma, xf), _expand(sigma_next, xf)
    if bool((sn >= s).any()):
        raise ValueError("sampling runs from sigma = 1 to 0: sigma_next must be smaller than sigma")
    mean, std = fn(xf, vf, s, sn, float(noise_level), history)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    return Transition(mean=mean, std=std, history=History(x0=_x0(xf, vf, s), sigma=sigma))
