"""DiffusionOPD's per-step loss: the reverse KL from the student's transition kernel to a teacher's
(paper Eq. 10–12), for ONE trained step ``j``; the training module adds up the trained
steps and the teachers, each term weighted by :meth:`OPDLoss.accumulation_weight` (``step_reduction``).

At a state ``x_j`` the student visited, student and teacher give means ``μ_S, μ_T`` with the *same*
kernel, schedule and noise level, hence the same covariance ``s_j² I`` (``Δ_j = σ_j − σ_{j+1} > 0``),
so the per-step KL is exact and the sampled noise cancels:

- SDE step (``s_j > 0``): ``KL_j = ||μ_S − μ_T||² / (2 s_j²)`` (``variant="paper"``).
- ODE step (``s_j = 0``): mean matching ``½ ||μ_S − μ_T||²`` (the variant does not enter).

``variant="code"`` reproduces the authors' released loss, which divides ``||μ_S − μ_T||²`` by twice the
square of whatever their step function returns as ``std_dev_t``. Only Flow-GRPO's SDE step returns its
noise scale ``g_j`` *without* the ``sqrt(Δ_j)`` of its std ``s_j = g_j sqrt(Δ_j)``, so per kernel:

- ``flow``: ``KL_code = ||δ||² / (2 g_j²) = Δ_j · KL_paper``;
- ``dance`` (std ``a sqrt(Δ_j)``) and ``ddim`` (std ``η σ' sqrt(1 − e^{−2h})``): their step functions
  return the step's std, so ``KL_code = KL_paper``;
- ``cps`` (std ``σ' sin(aπ/2)``) is not among the authors' solvers; its std has no separate ``sqrt(Δ)``
  factor, so the same rule gives ``KL_paper`` (an extension of their rule, not a reproduction);
- ``ode`` and deterministic ``dpm1``/``dpm2`` (``s_j = 0``): ``½ ||δ||²`` in both. The authors run DPM
  deterministically only (their step returns std 0), so ``variant="code"`` with a stochastic ``dpm*``
  step raises: there is no released loss to reproduce.

So ``variant="code"`` needs the sampler's kernel (``kernel``). ``reduction="mean"`` (default, as the
reference) divides the squared norm by the number ``D`` of latent elements, i.e. it is the exact KL
over ``D``; ``reduction="sum"`` gives the exact KL.

``step_reduction`` sets how the per-step, per-teacher losses of one optimiser step add up, through
:meth:`OPDLoss.accumulation_weight`, the weight of one (step, teacher) term:

- ``"sum"`` (default): ``Σ_m Σ_j KL_mj``, the paper's Eq. 11 (weight 1).
- ``"mean"``: ``(1 / (T M)) Σ_m Σ_j KL_mj`` over ``T`` trained steps and ``M`` teachers, what the
  authors' script computes: it runs gradient accumulation over every trained step of every
  teacher's batch (accelerate divides each backward by the number of accumulated passes) before one
  clipped optimiser step. Before the same clip norm the summed gradient is ``T·M`` times larger
  (27× for 9 steps and 3 teachers). Under AdamW the overall scale cancels (up to ``eps``) except
  through gradient clipping, which sees that larger norm.

Two gradient estimators of ``E[KL_j]`` (paper Sec. 3.3):

- ``pathwise`` (default): the closed form above with the teacher mean detached, so only ``μ_S``
  carries gradient.
- ``score_function`` (PPO/REINFORCE-style, kept to measure the variance claim; SDE steps only):
  with ``x' ~ q_old`` the student's rollout kernel, ``c_i = log q_S(x'_i) − log p_T(x'_i)`` (the reverse
  KL's integrand, reduced over ``D`` like the KL, detached) and ``log ρ_i = log q_θ(x'_i) − log q_old(x'_i)``,
  the per-sample loss is ``c_i (1 + log ρ_i)``, the first-order expansion of the importance-weighted
  ``c_i ρ_i`` at ``ρ = 1``. On-policy its value is a Monte-Carlo estimate of the KL and its gradient is
  ``c_i ∇ log q_θ(x'_i)``, whose expectation is ``∇ E[KL]`` because
  ``∇ E_{q_θ}[log q_θ − log p] = E[(log q_θ − log p) ∇ log q_θ] + E[∇ log q_θ]`` and the last term is 0.
  The linear form never exponentiates ``log ρ = D (ℓ_θ − ℓ_old)`` (``ℓ`` element-averaged, as
  ``Transition.log_prob``), which overflows for SD3-sized ``D`` once θ moves; the price is a bias once θ
  has moved away from the rollout policy (exact on-policy, which is how DiffusionOPD trains).
  ``variant="code"`` scales ``c_i`` as it scales the KL (by ``Δ_j`` for ``flow``). No baseline is subtracted.
"""
from __future__ import annotations

import torch
from torch import Tensor

from opd.objectives.gaussian import (
    REDUCTIONS,
    check_choice,
    compute_dtype,
    per_sample_scalar,
    reduce_elements,
)
from opd.sampling.kernels import KERNELS, gaussian_log_prob

ESTIMATORS = ("pathwise", "score_function")
VARIANTS = ("paper", "code")
STEP_REDUCTIONS = ("sum", "mean")
#: kernels whose reference step function returns ``g = s / sqrt(Δ)`` as ``std_dev_t`` (Flow-GRPO's SDE)
#: rather than the step's std ``s``: the authors' loss divides by ``2 g²``, so ``KL_code = Δ · KL_paper``
CODE_STD_WITHOUT_SQRT_DELTA = frozenset({"flow"})
#: kernels the authors' code has only as deterministic solvers
CODE_DETERMINISTIC_ONLY = frozenset({"dpm1", "dpm2"})


class OPDLoss:
    """DiffusionOPD's reverse KL for one trained step (see the module docstring).

    ``estimator`` ∈ {"pathwise", "score_function"}; ``variant`` ∈ {"paper", "code"} (divide by ``2 s²``,
    or reproduce the released code, which needs ``kernel``, the sampler's kernel name);
    ``reduction`` ∈ {"mean", "sum"} over the latent elements; ``step_reduction`` ∈ {"sum", "mean"} over
    the trained steps and teachers (:meth:`accumulation_weight`).
    """

    def __init__(self, estimator: str = "pathwise", variant: str = "paper", reduction: str = "mean",
                 kl_weight: float = 1.0, kernel: str | None = None, step_reduction: str = "sum") -> None:
        if kl_weight <= 0:
            raise ValueError(f"kl_weight must be > 0 (it scales the distillation loss); got {kl_weight}")
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("variant", variant, VARIANTS)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("step_reduction", step_reduction, STEP_REDUCTIONS)
        if kernel is not None:
            check_choice("kernel", kernel, tuple(sorted(KERNELS)))
        if variant == "code" and kernel is None:
            raise ValueError("variant='code' needs the sampler's kernel (objective.kernel, normally "
                             "${sampler.kernel}): the released loss divides by a different quantity per kernel")
        self.estimator = estimator
        self.variant = variant
        self.reduction = reduction
        self.kl_weight = kl_weight
        self.kernel = kernel
        self.step_reduction = step_reduction

    def accumulation_weight(self, num_steps: int, num_teachers: int = 1) -> float:
        """The weight of one (trained step, teacher) loss in an optimiser step's total: 1 for
        ``step_reduction="sum"`` (paper Eq. 11), ``1 / (num_steps · num_teachers)`` for ``"mean"``
        (the authors' gradient accumulation)."""
        if num_steps < 1 or num_teachers < 1:
            raise ValueError(f"num_steps and num_teachers must be >= 1; got {num_steps}, {num_teachers}")
        return 1.0 if self.step_reduction == "sum" else 1.0 / (num_steps * num_teachers)

    def __call__(self, student_mean: Tensor, teacher_mean: Tensor, std: Tensor | float, delta: Tensor | float,
                 x_next: Tensor | None = None, student_log_prob: Tensor | None = None,
                 old_student_log_prob: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` for one step; ``loss`` is the mean over the ``B`` samples.

        ``student_mean [B, ...]`` = μ_S (carries gradient), ``teacher_mean [B, ...]`` = μ_T (detached here),
        ``std`` = the shared ``s_j`` (scalar, ``[B]`` or ``[B, 1, ...]``; 0 on ODE steps), ``delta`` =
        ``Δ_j = σ_j − σ_{j+1} > 0`` (scalar or per sample). Score-function estimator only: ``x_next [B, ...]``
        drawn from the student's rollout kernel; ``student_log_prob [B]`` / ``old_student_log_prob [B]``
        element-averaged as ``Transition.log_prob`` returns them (default: computed from ``student_mean``,
        and its detached value, i.e. on-policy). Metrics: ``train/kl_step`` (this step's closed-form KL,
        mean over the samples), ``train/mean_gap`` (RMS of μ_S − μ_T) and, for the score-function
        estimator, ``train/sf_weight_mean`` (mean of the weights ``c_i``, a Monte-Carlo estimate of
        ``train/kl_step``).
        """
        b = student_mean.shape[0]
        std_b = per_sample_scalar(std, b, "std").to(student_mean.device).expand(b)
        delta_b = per_sample_scalar(delta, b, "delta").to(student_mean.device).expand(b)
        if bool((delta_b <= 0).any()):
            raise ValueError("delta must be the step size Δ_j = σ_j − σ_{j+1} > 0 (the kernels' "
                             "sigma_next − sigma is its negative)")
        if bool((std_b < 0).any()):
            raise ValueError("std must be >= 0 (the step's standard deviation s_j; 0 on ODE steps)")
        mu_s, mu_t = compute_dtype(student_mean), compute_dtype(teacher_mean.detach())
        kl = self._closed_form(mu_s, mu_t, std_b, delta_b)
        metrics = {
            "train/kl_step": kl.detach().mean(),
            "train/mean_gap": (mu_s.detach() - mu_t).square().mean().sqrt(),
        }
        if self.estimator == "pathwise":
            return self.kl_weight * kl.mean(), metrics
        weight, log_ratio = self._score_function_terms(mu_s, mu_t, std_b, delta_b, x_next, student_log_prob,
                                                       old_student_log_prob)
        metrics["train/sf_weight_mean"] = weight.mean()
        return self.kl_weight * (weight * (1 + log_ratio)).mean(), metrics

    def _code_factor(self, std: Tensor, delta: Tensor) -> Tensor:
        """``KL_code / KL_paper`` per sample ``[B]`` on SDE steps (see the module docstring)."""
        if self.kernel in CODE_DETERMINISTIC_ONLY and bool((std > 0).any()):
            raise ValueError(f"variant='code' with a stochastic {self.kernel!r} step: the authors' code runs "
                             "DPM-Solver deterministically only; use variant='paper' or sampler.noise_level=0")
        return delta if self.kernel in CODE_STD_WITHOUT_SQRT_DELTA else torch.ones_like(delta)

    def _closed_form(self, mu_s: Tensor, mu_t: Tensor, std: Tensor, delta: Tensor) -> Tensor:
        """Per-sample KL ``[B]``: SDE samples divide by ``2 s²`` (the code's variant: by ``2 s²/factor``),
        ODE samples (``s = 0``) give ``½ reduce_D (μ_S − μ_T)²``."""
        var = std.square()
        sde = var > 0
        # where() differentiates both branches: a safe denominator keeps 0·inf out of the ODE samples
        denom = torch.where(sde, var, torch.ones_like(var))
        if self.variant == "code":
            denom = denom / self._code_factor(std, delta)
        sq = reduce_elements((mu_s - mu_t).square(), self.reduction)
        return torch.where(sde, sq / (2 * denom), 0.5 * sq)

    def _score_function_terms(self, mu_s: Tensor, mu_t: Tensor, std: Tensor, delta: Tensor,
                              x_next: Tensor | None, student_log_prob: Tensor | None,
                              old_student_log_prob: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(c [B] detached, log ρ [B])`` of the score-function estimator."""
        if bool((std == 0).any()):
            raise ValueError("estimator='score_function' needs an SDE step (std > 0): an ODE step has no "
                             "density to take a score of; use estimator='pathwise' or noise_level > 0")
        if x_next is None:
            raise ValueError("estimator='score_function' needs x_next, the state sampled from the "
                             "student's kernel at this step")
        x = compute_dtype(x_next.detach())
        var = std.square()
        if self.variant == "code":
            var = var / self._code_factor(std, delta)  # KL_code = factor · KL_paper: weight factor · c
        # log q_S(x') − log p_T(x') with a shared std: the normalisers cancel, only the quadratics remain
        weight = reduce_elements((x - mu_t).square() - (x - mu_s.detach()).square(), self.reduction) / (2 * var)
        log_prob = student_log_prob if student_log_prob is not None else gaussian_log_prob(x, mu_s, std.view(-1, *([1] * (x.ndim - 1))))
        old = old_student_log_prob if old_student_log_prob is not None else log_prob.detach()
        # the log-probabilities are element means (Transition.log_prob): D × gives log q_θ − log q_old
        num_elements = x[0].numel()
        return weight, num_elements * (compute_dtype(log_prob) - compute_dtype(old.detach()))
