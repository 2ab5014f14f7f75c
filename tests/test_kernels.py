"""Transition kernels against formulas written out independently here (scalar Python math)."""
import math

import pytest
import torch

from opd.sampling import KERNELS, History, sd3_sigmas, transition

torch.manual_seed(0)
X = torch.randn(3, 2, 4, 4)
V = torch.randn(3, 2, 4, 4)


def scalar_expect(kernel, x, v, s, sn, a, x0_prev=None, s_prev=None):
    """(mean, std) of one element, from the papers' formulas in plain floats."""
    d = sn - s
    x0 = x - s * v
    if kernel == "ode":
        return x + d * v, 0.0
    if kernel == "flow":
        g = a * math.sqrt(s / (1 - (sn if s == 1 else s)))
        return x * (1 + g * g * d / (2 * s)) + v * (1 + g * g * (1 - s) / (2 * s)) * d, g * math.sqrt(-d)
    if kernel == "dance":
        score = -(x - (1 - s) * x0) / s**2
        return x + d * v - 0.5 * a * a * score * d, a * math.sqrt(-d)
    if kernel == "cps":
        std = sn * math.sin(a * math.pi / 2)
        return (1 - sn) * x0 + math.sqrt(sn * sn - std * std) * (x + (1 - s) * v), std
    if kernel == "ddim":  # DiffusionNFT's ddim_update: σ_DDIM = η σ', ρ = σ_DDIM · sqrt(1 − σ'²(1−σ)²/(σ²(1−σ')²))
        rho = a * sn * math.sqrt(1 - sn**2 * (1 - s) ** 2 / (s**2 * (1 - sn) ** 2))
        eps = (x - (1 - s) * x0) / s
        return (1 - sn) * x0 + math.sqrt(sn**2 - rho**2) * eps, rho
    lam = lambda t: math.log((1 - t) / t) if 0 < t < 1 else (math.inf if t == 0 else -math.inf)
    h = lam(sn) - lam(s)
    D = x0
    if kernel == "dpm2" and x0_prev is not None and s_prev < 1 and sn > 0:
        r = (lam(s) - lam(s_prev)) / h
        D = x0 + (x0 - x0_prev) / (2 * r)
    ex = lambda c: 1.0 if c == 0 else math.exp(-c * h)
    mean = (sn / s) * ex(a) * x + (1 - sn) * (1 - ex(1 + a)) * D
    return mean, sn * math.sqrt(1 - ex(2 * a))


@pytest.mark.parametrize("kernel", ["ode", "flow", "dance", "cps", "ddim", "dpm1", "dpm2"])
@pytest.mark.parametrize("s,sn", [(1.0, 0.9), (0.8, 0.55), (0.3, 0.1), (0.2, 0.0)])
@pytest.mark.parametrize("a", [0.0, 0.7])
def test_kernel_mean_std_match_formula(kernel, s, sn, a):
    step = transition(kernel, X, V, s, sn, a)
    std = step.std.expand_as(X) if step.std.ndim else step.std.expand(X.shape)
    for idx in [(0, 0, 0, 0), (1, 1, 2, 3), (2, 0, 3, 1)]:
        m, sd = scalar_expect(kernel, X[idx].item(), V[idx].item(), s, sn, a)
        assert step.mean[idx].item() == pytest.approx(m, rel=1e-5, abs=1e-5)
        assert std[idx].item() == pytest.approx(sd, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("s_prev,s,sn", [(0.9, 0.7, 0.5), (1.0, 0.7, 0.5), (0.5, 0.3, 0.0)])
@pytest.mark.parametrize("a", [0.0, 1.0])
def test_dpm2_uses_history(s_prev, s, sn, a):
    x0_prev = torch.randn_like(X)
    step = transition("dpm2", X, V, s, sn, a, History(x0=x0_prev, sigma=s_prev))
    for idx in [(0, 0, 0, 0), (2, 1, 1, 2)]:
        m, _ = scalar_expect("dpm2", X[idx].item(), V[idx].item(), s, sn, a, x0_prev[idx].item(), s_prev)
        assert step.mean[idx].item() == pytest.approx(m, rel=1e-5, abs=1e-5)
    if s_prev < 1 and sn > 0:  # genuinely second order: differs from dpm1
        assert not torch.allclose(step.mean, transition("dpm1", X, V, s, sn, a).mean)


@pytest.mark.parametrize("kernel", ["flow", "dance", "cps", "ddim", "dpm1", "dpm2"])
def test_zero_noise_is_euler_for_first_order(kernel):
    euler = transition("ode", X, V, 0.7, 0.4)
    step = transition(kernel, X, V, 0.7, 0.4, 0.0)
    torch.testing.assert_close(step.mean, euler.mean, rtol=1e-5, atol=1e-5)
    assert float(step.std.max()) == 0.0


@pytest.mark.parametrize("s,sn", [(1.0, 0.9), (0.8, 0.55), (0.3, 0.1), (0.2, 0.0)])
def test_ddim_and_cps_by_hand_agree_only_at_zero_noise(s, sn):
    """One element, every number written out: x = 0.5, v = −1.2, a = η = 0.6."""
    x, v, a = 0.5, -1.2, 0.6
    x0 = x - s * v
    eps = x + (1 - s) * v  # = (x − (1 − σ) x̂0)/σ
    euler = x + (sn - s) * v
    assert (1 - sn) * x0 + sn * eps == pytest.approx(euler)  # both kernels' mean at noise 0
    std_cps = sn * math.sin(a * math.pi / 2)
    ratio = sn * (1 - s) / (s * (1 - sn))  # e^{−h}: 0 at σ = 1 and at σ' = 0
    std_ddim = a * sn * math.sqrt(1 - ratio**2)
    one = lambda t: torch.full((1, 1), t)
    for kernel, std in (("cps", std_cps), ("ddim", std_ddim)):
        step = transition(kernel, one(x), one(v), s, sn, a)
        assert step.std.item() == pytest.approx(std, abs=1e-7)
        assert step.mean.item() == pytest.approx((1 - sn) * x0 + math.sqrt(sn**2 - std**2) * eps, abs=1e-6)
        at_zero = transition(kernel, one(x), one(v), s, sn, 0.0)
        assert at_zero.mean.item() == pytest.approx(euler, abs=1e-6) and at_zero.std.item() == 0.0
    if 0 < sn:  # with noise their stds differ (at σ' = 0 both are 0)
        assert abs(std_cps - std_ddim) > 1e-3


def test_ddim_at_eta_one_is_the_sde_dpm_solver_step():
    """DDIM with η = 1 and SDE-DPM-Solver++(1) are the same Gaussian (Lu et al. 2022, DPM-Solver++ §4)."""
    for s, sn in [(1.0, 0.9), (0.7, 0.4), (0.3, 0.1)]:
        ddim, dpm = transition("ddim", X, V, s, sn, 1.0), transition("dpm1", X, V, s, sn, 1.0)
        torch.testing.assert_close(ddim.mean, dpm.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ddim.std, dpm.std)


def test_ddim_rejects_eta_above_one():
    with pytest.raises(ValueError, match="noise_level"):
        transition("ddim", X, V, 0.7, 0.4, 1.5)


def test_flow_at_zero_noise_equals_ode_on_whole_schedule():
    sig = sd3_sigmas(10)
    for j in range(10):
        a = transition("flow", X, V, sig[j], sig[j + 1], 0.0)
        b = transition("ode", X, V, sig[j], sig[j + 1])
        torch.testing.assert_close(a.mean, b.mean)


@pytest.mark.parametrize("kernel", ["flow", "dance", "cps", "ddim", "dpm1"])
def test_log_prob_matches_torch_distributions(kernel):
    step = transition(kernel, X, V, 0.6, 0.45, 0.7)
    x_next = step.sample(torch.Generator().manual_seed(1))
    normal = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    expected = normal.log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob(x_next), expected, rtol=1e-5, atol=1e-5)


def test_log_prob_of_deterministic_step_raises():
    step = transition("ode", X, V, 0.6, 0.45)
    with pytest.raises(ValueError, match="deterministic"):
        step.log_prob(step.mean)


@pytest.mark.parametrize("kernel", ["flow", "dance", "cps", "ddim", "dpm1"])
def test_sampling_matches_stated_mean_and_std(kernel):
    x, v = torch.randn(1, 1, 1, 1).expand(20000, 1, 4, 4).clone(), torch.randn(1, 1, 1, 1).expand(20000, 1, 4, 4).clone()
    step = transition(kernel, x, v, 0.8, 0.6, 0.7)
    samples = step.sample(torch.Generator().manual_seed(0))
    mean, std = step.mean[0, 0, 0, 0].item(), float(step.std.expand_as(x)[0, 0, 0, 0])
    emp = samples.flatten()
    se = std / math.sqrt(emp.numel())
    assert abs(emp.mean().item() - mean) < 5 * se
    assert emp.std().item() == pytest.approx(std, rel=0.02)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_per_sample_sigmas_equal_scalar_calls(kernel):
    s = torch.tensor([1.0, 0.7, 0.3])
    sn = torch.tensor([0.9, 0.5, 0.0])
    batched = transition(kernel, X, V, s, sn, 0.5)
    for i in range(3):
        single = transition(kernel, X[i : i + 1], V[i : i + 1], s[i].item(), sn[i].item(), 0.5)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)
        torch.testing.assert_close(batched.std.expand_as(X)[i], single.std.expand_as(X[0:1])[0])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown kernel 'eulr'"):
        transition("eulr", X, V, 0.5, 0.4)
    with pytest.raises(ValueError, match="sigma_next must be smaller"):
        transition("ode", X, V, 0.4, 0.5)


def test_sd3_sigmas_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps, shift in [(10, 3.0), (40, 3.0), (7, 1.0)]:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(steps)  # what StableDiffusion3Pipeline does when given no sigmas
        torch.testing.assert_close(sd3_sigmas(steps, shift), sched.sigmas.float(), rtol=0, atol=1e-6)
        assert sd3_sigmas(steps, shift)[0] == 1.0 and sd3_sigmas(steps, shift)[-1] == 0.0
