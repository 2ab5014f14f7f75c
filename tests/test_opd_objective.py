"""DiffusionOPD's per-step KL loss (docs/method.md) against torch.distributions, Monte Carlo and
hand-derived gradients, on real transitions of ``opd.sampling``."""
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from opd.objectives.gaussian import gaussian_kl_same_std
from opd.objectives.opd import OPDLoss
from opd.sampling import Transition, transition

SIGMA, SIGMA_NEXT, NOISE = 0.8, 0.7, 0.7
DELTA = SIGMA - SIGMA_NEXT


def _step_pair(b: int, shape: tuple[int, ...], seed: int, kernel: str = "flow", sigma=SIGMA):
    """Student and teacher transitions from the same states ``x`` with different velocities; the
    kernels compute in float32, the results are widened to float64 so the checks can be tight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g)
    v_s = torch.randn(b, *shape, generator=g)
    v_t = v_s + 0.3 * torch.randn(b, *shape, generator=g)

    def widened(tr: Transition) -> Transition:
        return Transition(mean=tr.mean.double(), std=tr.std.double(), history=tr.history)

    return (widened(transition(kernel, x, v_s, sigma, SIGMA_NEXT, NOISE)),
            widened(transition(kernel, x, v_t, sigma, SIGMA_NEXT, NOISE)))


def test_closed_form_matches_torch_kl_and_monte_carlo():
    tr_s, tr_t = _step_pair(4, (16,), seed=0)
    mu_s, mu_t, s = tr_s.mean.double(), tr_t.mean.double(), tr_s.std.double()
    assert s.ndim == 0 and s.item() > 0
    kl_sum = gaussian_kl_same_std(mu_s, mu_t, s, "sum")
    exact = kl_divergence(Independent(Normal(mu_s, s), 1), Independent(Normal(mu_t, s), 1))
    torch.testing.assert_close(kl_sum, exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(gaussian_kl_same_std(mu_s, mu_t, s, "mean"), exact / 16, rtol=1e-6, atol=0)
    _, m = OPDLoss(reduction="sum")(mu_s, mu_t, tr_s.std, DELTA)
    torch.testing.assert_close(m["train/kl_step"], exact.mean(), rtol=1e-6, atol=0)

    # E_{x ~ q_S}[log q_S(x) − log q_T(x)] with 200k draws per sample
    q_s, q_t = Normal(mu_s, s), Normal(mu_t, s)
    draws = q_s.sample((200_000,))
    log_ratio = (q_s.log_prob(draws) - q_t.log_prob(draws)).sum(-1)  # [N, B]
    mc, se = log_ratio.mean(0), log_ratio.std(0) / log_ratio.shape[0] ** 0.5
    assert ((mc - kl_sum).abs() < 4 * se).all(), (mc, kl_sum, se)


def test_code_variant_is_paper_times_delta_for_flow():
    tr_s, tr_t = _step_pair(3, (2, 4, 4), seed=1)
    for delta in (DELTA, torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64)):
        paper, _ = OPDLoss()(tr_s.mean, tr_t.mean, tr_s.std, delta)
        code, mc = OPDLoss(variant="code", kernel="flow")(tr_s.mean, tr_t.mean, tr_s.std, delta)
        per_sample = gaussian_kl_same_std(tr_s.mean, tr_t.mean, tr_s.std)
        torch.testing.assert_close(paper, per_sample.mean())
        torch.testing.assert_close(code, (torch.as_tensor(delta) * per_sample).mean())
        torch.testing.assert_close(mc["train/kl_step"], code)
    # the score-function estimator rescales its weights the same way
    x_next = tr_s.sample(torch.Generator().manual_seed(0))
    delta = torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64)
    sf_paper, _ = OPDLoss("score_function")(tr_s.mean, tr_t.mean, tr_s.std, delta, x_next=x_next)
    sf_code, m = OPDLoss("score_function", "code", kernel="flow")(tr_s.mean, tr_t.mean, tr_s.std, delta,
                                                                  x_next=x_next)
    # c_i = (log q_S − log q_T)(x'_i) / D for two Gaussians with the same std
    c = (Normal(tr_s.mean, tr_s.std).log_prob(x_next) - Normal(tr_t.mean, tr_s.std).log_prob(x_next)).flatten(1)
    c = c.mean(1)
    torch.testing.assert_close(sf_paper, c.mean())
    torch.testing.assert_close(sf_code, (delta * c).mean())
    torch.testing.assert_close(m["train/sf_weight_mean"], (delta * c).mean())


def test_ode_step_is_half_mean_squared_gap():
    tr_s, tr_t = _step_pair(3, (2, 3), seed=2, kernel="ode")
    assert tr_s.std.item() == 0
    gap = (tr_s.mean - tr_t.mean).flatten(1)
    by_hand = sum(0.5 * sum(e**2 for e in row) / len(row) for row in gap.tolist()) / 3
    for variant in ("paper", "code"):  # the variant only rescales the SDE KL
        loss, _ = OPDLoss(variant=variant, kernel="ode")(tr_s.mean, tr_t.mean, tr_s.std, DELTA)
        assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    loss_sum, _ = OPDLoss(reduction="sum")(tr_s.mean, tr_t.mean, tr_s.std, DELTA)
    assert loss_sum.item() == pytest.approx(6 * by_hand, rel=1e-12)
    # per-sample std with an ODE sample among SDE ones: each sample gets its own formula
    std = torch.tensor([0.0, 0.5, 0.25], dtype=torch.float64).view(3, 1, 1)
    mixed, _ = OPDLoss()(tr_s.mean, tr_t.mean, std, DELTA)
    sq = gap.square().mean(1)
    torch.testing.assert_close(mixed, (0.5 * sq[0] + sq[1] / (2 * 0.25) + sq[2] / (2 * 0.0625)) / 3)


# The authors' released loss by hand, per kernel: ½ mean_D (μ_S − μ_T)² / std_dev_t², std_dev_t being what
# their step function returns: Flow-GRPO's SDE g = a sqrt(σ/(1 − σ)) (σ_1 in the guard at σ = 1), DanceGRPO's
# a sqrt(Δ), DDIM's ρ = η σ' sqrt(1 − σ'²(1−σ)²/(σ²(1−σ')²)), Flow-GRPO's cps σ' sin(aπ/2); ½ mean_D (μ_S − μ_T)²
# at noise 0 (ode, dpm).
XS, VS, VT = [0.4, -1.1, 2.0], [0.3, 0.8, -0.5], [0.1, 1.0, -0.2]


def _released_mean_and_std_dev(kernel, x, v, s, sn, a):
    d, x0 = sn - s, x - s * v
    if kernel == "flow":
        g = a * math.sqrt(s / (1 - (sn if s == 1 else s)))
        return x * (1 + g * g * d / (2 * s)) + v * (1 + g * g * (1 - s) / (2 * s)) * d, g
    if kernel == "dance":
        score = -(x - x0 * (1 - s)) / s**2
        return x + d * v + (-0.5 * a * a * score) * d, a * math.sqrt(s - sn)
    if kernel == "ddim":
        rho = a * sn * math.sqrt(1 - sn**2 * (1 - s) ** 2 / (s**2 * (1 - sn) ** 2))
        return (1 - sn) * x0 + math.sqrt(sn**2 - rho**2) * (x - (1 - s) * x0) / s, rho
    if kernel == "cps":
        std = sn * math.sin(a * math.pi / 2)
        return (1 - sn) * x0 + math.sqrt(sn**2 - std**2) * (x + (1 - s) * v), std
    assert a == 0  # ode, dpm1 (deterministic: DPM-Solver++(1) is Euler at first order)
    return x + d * v, 0.0


@pytest.mark.parametrize("kernel,a", [("flow", 0.7), ("dance", 0.7), ("ddim", 0.7), ("cps", 0.7),
                                      ("ode", 0.0), ("dpm1", 0.0), ("flow", 0.0)])
@pytest.mark.parametrize("s,sn", [(1.0, 0.9), (0.8, 0.6), (0.3, 0.1)])
def test_code_variant_reproduces_the_released_loss_by_hand(kernel, a, s, sn):
    released, paper = 0.0, 0.0
    for x, v_s, v_t in zip(XS, VS, VT):
        mu_s, std_dev = _released_mean_and_std_dev(kernel, x, v_s, s, sn, a)
        mu_t, _ = _released_mean_and_std_dev(kernel, x, v_t, s, sn, a)
        step_std = std_dev * math.sqrt(s - sn) if kernel == "flow" else std_dev  # the step's real std
        released += 0.5 * (mu_s - mu_t) ** 2 / (std_dev**2 if a > 0 else 1.0) / len(XS)
        paper += 0.5 * (mu_s - mu_t) ** 2 / (step_std**2 if a > 0 else 1.0) / len(XS)
    x = torch.tensor([XS], dtype=torch.float64)
    tr_s = transition(kernel, x, torch.tensor([VS], dtype=torch.float64), s, sn, a)
    tr_t = transition(kernel, x, torch.tensor([VT], dtype=torch.float64), s, sn, a)
    code, _ = OPDLoss(variant="code", kernel=kernel)(tr_s.mean, tr_t.mean, tr_s.std, s - sn)
    ours, _ = OPDLoss()(tr_s.mean, tr_t.mean, tr_s.std, s - sn)
    assert code.item() == pytest.approx(released, rel=2e-5)
    assert ours.item() == pytest.approx(paper, rel=2e-5)
    if kernel == "flow" and a > 0:  # the only kernel where the two differ: by the factor Δ
        assert released == pytest.approx((s - sn) * paper, rel=1e-12)
    else:
        assert released == pytest.approx(paper, rel=1e-12)


def test_code_variant_score_function_weight_follows_the_kernel():
    tr_s, tr_t = _step_pair(3, (2, 4), seed=7, kernel="dance")
    x_next = tr_s.sample(torch.Generator().manual_seed(0))
    paper, mp = OPDLoss("score_function")(tr_s.mean, tr_t.mean, tr_s.std, DELTA, x_next=x_next)
    code, mc = OPDLoss("score_function", "code", kernel="dance")(tr_s.mean, tr_t.mean, tr_s.std, DELTA,
                                                                 x_next=x_next)
    torch.testing.assert_close(code, paper)  # dance's released std carries sqrt(Δ): nothing rescaled
    torch.testing.assert_close(mc["train/sf_weight_mean"], mp["train/sf_weight_mean"])


def test_code_variant_needs_a_kernel_with_a_released_loss():
    with pytest.raises(ValueError, match="kernel"):
        OPDLoss(variant="code")
    with pytest.raises(ValueError, match="kernel"):
        OPDLoss(variant="code", kernel="eulr")
    tr_s, tr_t = _step_pair(2, (3,), seed=8, kernel="dpm1")  # η = 0.7: SDE-DPM-Solver++
    with pytest.raises(ValueError, match="deterministic"):
        OPDLoss(variant="code", kernel="dpm1")(tr_s.mean, tr_t.mean, tr_s.std, DELTA)
    OPDLoss()(tr_s.mean, tr_t.mean, tr_s.std, DELTA)  # the paper's KL is defined for it


# -------------------------------------------------------------------- sum vs mean over steps and teachers


def test_step_reduction_mean_is_sum_over_steps_times_teachers_and_scales_gradients():
    """An optimiser step accumulated as the module does (one backward per (teacher, step) term, each
    weighted by accumulation_weight): with 9 trained steps and 3 teachers, "mean" is the sum / 27 in
    value and in gradient, so before the clip its gradient norm is 27× smaller."""
    num_steps, num_teachers = 9, 3
    g = torch.Generator().manual_seed(9)
    theta0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    terms = [(torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64))
             for _ in range(num_steps * num_teachers)]

    def accumulate(step_reduction):
        loss_fn = OPDLoss(step_reduction=step_reduction)
        w = loss_fn.accumulation_weight(num_steps, num_teachers)
        theta = theta0.clone().requires_grad_()
        total = 0.0
        for x, target in terms:
            loss, _ = loss_fn(x @ theta.T @ theta, target, 0.2, 0.1)  # any differentiable μ_S(θ)
            (w * loss).backward()
            total += w * loss.item()
        return total, theta.grad

    assert OPDLoss().accumulation_weight(num_steps, num_teachers) == 1.0
    assert OPDLoss(step_reduction="mean").accumulation_weight(num_steps, num_teachers) == 1 / 27
    total_sum, grad_sum = accumulate("sum")
    total_mean, grad_mean = accumulate("mean")
    assert total_mean == pytest.approx(total_sum / 27, rel=1e-14)
    torch.testing.assert_close(grad_mean, grad_sum / 27, rtol=1e-13, atol=0)
    assert (grad_sum.norm() / grad_mean.norm()).item() == pytest.approx(27, rel=1e-13)


@pytest.mark.parametrize("reduction,scale", [("mean", 1 / 12), ("sum", 1.0)])
def test_pathwise_gradient_by_hand(reduction, scale):
    tr_s, tr_t = _step_pair(5, (3, 4), seed=3)
    mu_s = tr_s.mean.detach().requires_grad_()
    mu_t = tr_t.mean.detach().requires_grad_()
    loss, m = OPDLoss(reduction=reduction)(mu_s, mu_t, tr_s.std, DELTA)
    loss.backward()
    s2 = tr_s.std.item() ** 2
    # d/dμ_S of (1/B) Σ_i reduce_D (μ_S − μ_T)²/(2 s²) = (μ_S − μ_T)/(s² B) · (1/D for the mean)
    torch.testing.assert_close(mu_s.grad, (mu_s - mu_t).detach() * scale / (s2 * 5))
    assert mu_t.grad is None
    assert not m["train/kl_step"].requires_grad
    gap = (mu_s - mu_t).detach()
    assert m["train/mean_gap"].item() == pytest.approx(gap.square().mean().sqrt().item())


def _per_sample_grads(estimator: str, num: int, d: int, seed: int, fixed_state: bool):
    """Per-sample gradients ``[num, d]`` of one estimator wrt θ, the student's velocity offset, through a
    real flow step (noise level 0.7); every sample has its own copy of θ so ``num · grad`` are the
    per-sample contributions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1 if fixed_state else num, d, generator=g, dtype=torch.float64).expand(num, d)
    theta = torch.full((num, d), 0.05, dtype=torch.float64, requires_grad=True)
    tr_s = transition("flow", x, 0.9 * x + theta, SIGMA, SIGMA_NEXT, NOISE)
    tr_t = transition("flow", x, 0.8 * x + 0.3, SIGMA, SIGMA_NEXT, NOISE)
    x_next = tr_s.sample(g).detach() if estimator == "score_function" else None
    loss, _ = OPDLoss(estimator=estimator)(tr_s.mean, tr_t.mean, tr_s.std, DELTA, x_next=x_next)
    (grad,) = torch.autograd.grad(loss, theta)
    return num * grad, tr_s, tr_t


def test_score_function_gradient_is_unbiased_and_report_variance_ratio():
    num, d = 200_000, 16
    pw, tr_s, tr_t = _per_sample_grads("pathwise", num, d, seed=4, fixed_state=False)
    sf, _, _ = _per_sample_grads("score_function", num, d, seed=4, fixed_state=False)
    # hand-derived pathwise: dμ_S/dθ = (1 + g²(1 − σ)/(2σ))(σ' − σ), times (μ_S − μ_T)/(s² D)
    g2 = NOISE**2 * SIGMA / (1 - SIGMA)
    dmu_dtheta = (1 + g2 * (1 - SIGMA) / (2 * SIGMA)) * (SIGMA_NEXT - SIGMA)
    by_hand = dmu_dtheta * (tr_s.mean - tr_t.mean).detach().double() / (tr_s.std.item() ** 2 * d)
    torch.testing.assert_close(pw, by_hand, rtol=1e-5, atol=1e-7)
    # same states, so the difference isolates the score-function noise: its mean must be 0
    diff = sf - pw
    z = diff.mean(0) / (diff.std(0) / num**0.5)
    assert (z.abs() < 4.5).all(), z
    ratio = (sf.var(0).sum() / pw.var(0).sum()).item()
    print(f"\nper-sample gradient variance, score-function / pathwise (flow, a = {NOISE}, D = {d}, "
          f"random states): {ratio:.1f}")
    assert ratio > 1


def test_score_function_variance_matches_closed_form_at_a_fixed_state():
    """At one state the pathwise gradient is deterministic; the score-function one, g = c ξ/(s D)·dμ/dθ
    with ξ ~ N(0, I), has total variance (dμ/dθ)² [(D+1)|d|²/s² + D|d|⁴/(4s⁴)] / (s² D²), d = μ_S − μ_T."""
    num, d = 200_000, 16
    sf, tr_s, tr_t = _per_sample_grads("score_function", num, d, seed=5, fixed_state=True)
    pw, _, _ = _per_sample_grads("pathwise", num, d, seed=5, fixed_state=True)
    assert pw.var(0).max().item() < 1e-20
    gap2 = (tr_s.mean[0] - tr_t.mean[0]).square().sum().item()
    s2 = tr_s.std.item() ** 2
    g2 = NOISE**2 * SIGMA / (1 - SIGMA)
    dmu_dtheta = (1 + g2 * (1 - SIGMA) / (2 * SIGMA)) * (SIGMA_NEXT - SIGMA)
    expect = dmu_dtheta**2 * ((d + 1) * gap2 / s2 + d * gap2**2 / (4 * s2**2)) / (s2 * d**2)
    assert sf.var(0).sum().item() == pytest.approx(expect, rel=0.03)


def test_score_function_log_prob_convention_and_on_policy_value():
    tr_s, tr_t = _step_pair(6, (2, 4), seed=6)
    x_next = tr_s.sample(torch.Generator().manual_seed(0)).float()
    mu_s, mu_t, std = tr_s.mean.detach().float().requires_grad_(), tr_t.mean.float(), tr_s.std.float()
    loss_fn = OPDLoss(estimator="score_function")
    loss_a, m = loss_fn(mu_s, mu_t, std, DELTA, x_next=x_next)
    (grad_a,) = torch.autograd.grad(loss_a, mu_s)
    # passing Transition.log_prob's element-averaged values gives the same loss and gradient
    lp = Transition(mean=mu_s, std=std, history=tr_s.history).log_prob(x_next)
    loss_b, _ = loss_fn(mu_s, mu_t, std, DELTA, x_next=x_next, student_log_prob=lp,
                        old_student_log_prob=lp.detach())
    (grad_b,) = torch.autograd.grad(loss_b, mu_s)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    # on-policy the value is mean_i c_i, c_i = (log q_S − log q_T)(x'_i) / D
    c = (Normal(mu_s.detach(), std).log_prob(x_next) - Normal(mu_t, std).log_prob(x_next)).flatten(1)
    torch.testing.assert_close(loss_a, c.mean(1).mean())
    torch.testing.assert_close(m["train/sf_weight_mean"], c.mean(1).mean())
    # and its gradient is c_i ∇_μ log q_S(x'_i) / B = c_i (x' − μ_S)/(s² B)
    by_hand = c.mean(1).view(6, 1, 1) * (x_next - mu_s.detach()) / (std**2 * 6)
    torch.testing.assert_close(grad_a, by_hand)


@pytest.mark.parametrize("kwargs,name", [({"estimator": "reinforce"}, "estimator"),
                                         ({"variant": "released"}, "variant"),
                                         ({"reduction": "max"}, "reduction"),
                                         ({"step_reduction": "avg"}, "step_reduction")])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OPDLoss(**kwargs)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_kl_same_std(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, "max")


def test_accumulation_weight_needs_positive_counts():
    with pytest.raises(ValueError, match="num_steps"):
        OPDLoss(step_reduction="mean").accumulation_weight(0, 3)


def test_bad_call_arguments():
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="std > 0"):
        OPDLoss(estimator="score_function")(mu, mu, 0.0, DELTA, x_next=mu)
    with pytest.raises(ValueError, match="x_next"):
        OPDLoss(estimator="score_function")(mu, mu, 0.5, DELTA)
    with pytest.raises(ValueError, match="delta"):
        OPDLoss()(mu, mu, 0.5, -DELTA)
    with pytest.raises(ValueError, match="std"):
        OPDLoss()(mu, mu, torch.ones(3), DELTA)


def test_kl_weight_scales_loss_not_metrics():
    torch.manual_seed(0)
    ms, mt = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    base, m1 = OPDLoss()(ms, mt, 0.3, 0.1)
    scaled, m2 = OPDLoss(kl_weight=2.5)(ms, mt, 0.3, 0.1)
    torch.testing.assert_close(scaled, 2.5 * base)
    torch.testing.assert_close(m1["train/kl_step"], m2["train/kl_step"])
