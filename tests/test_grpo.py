"""Flow-GRPO and GRPO-Guard losses against hand computations and a real SDE step (docs/algorithms.md)."""
import math

import pytest
import torch

from opd.objectives.grpo import GRPOLoss
from opd.objectives.grpo_guard import GRPOGuardLoss, ratio_norm
from opd.sampling import sd3_sigmas, transition

# one sample per case of the clipped surrogate, ε = 0.1:
# (A > 0, ρ > 1 + ε), (A < 0, ρ < 1 − ε) — clipped side; (A > 0, ρ < 1 − ε), (A < 0, ρ > 1 + ε),
# and two inside the band
RATIOS = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.05, 1.05], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
# max(−Aρ, −A clip(ρ)) by hand: −1.1, 0.9, −0.5, 1.5, −2.1, 2.1
SURROGATE = [-1.1, 0.9, -0.5, 1.5, -2.1, 2.1]


def _log_probs(ratios: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ℓ_θ, ℓ_old)`` with ``ℓ_θ − ℓ_old = log(ρ)/scale``; ``ℓ_θ`` a leaf that requires grad."""
    old = torch.linspace(-2.0, -1.0, len(ratios), dtype=torch.float64)
    return (old + ratios.log() / scale).requires_grad_(), old


def test_policy_loss_and_metrics_by_hand():
    log_prob, old = _log_probs(RATIOS)
    loss, m = GRPOLoss(clip_range=0.1, kl_weight=0.0)(log_prob, old, ADV)
    assert loss.item() == pytest.approx(sum(SURROGATE) / 6, abs=1e-6)
    assert m["train/policy_loss"].item() == pytest.approx(sum(SURROGATE) / 6, abs=1e-6)
    assert m["train/clip_frac"].item() == pytest.approx(4 / 6)
    assert m["train/ratio_mean"].item() == pytest.approx(6.1 / 6, abs=1e-6)
    approx_kl = 0.5 * sum(math.log(r) ** 2 for r in RATIOS.tolist()) / 6
    assert m["train/approx_kl"].item() == pytest.approx(approx_kl, abs=1e-6)
    assert "train/kl_ref" not in m


def test_clipped_side_has_zero_gradient():
    log_prob, old = _log_probs(RATIOS)
    loss, _ = GRPOLoss(clip_range=0.1, kl_weight=0.0)(log_prob, old, ADV)
    loss.backward()
    # d/dℓ of −Aρ/B is −Aρ/B on the unclipped side; 0 where the clipped branch wins
    expect = [0.0, 0.0, -0.5 / 6, 1.5 / 6, -2.1 / 6, 2.1 / 6]
    torch.testing.assert_close(log_prob.grad, torch.tensor(expect, dtype=torch.float64), atol=1e-6, rtol=0)


def test_ratio_is_exactly_one_at_old_policy():
    torch.manual_seed(0)
    lp, mean = torch.randn(5), torch.randn(5, 3, 4)
    adv = torch.randn(5)
    # one call signature for both (GRPOLoss ignores old_mean), so the module can swap them
    for loss_fn, scale in [(GRPOLoss(), 1.0), (GRPOGuardLoss(), 1 / 0.1)]:
        loss, m = loss_fn(lp, lp.clone(), adv, mean=mean, std=0.3, delta=0.1, old_mean=mean.clone())
        assert m["train/ratio_mean"].item() == 1.0
        assert m["train/clip_frac"].item() == 0.0
        assert m["train/approx_kl"].item() == 0.0
        torch.testing.assert_close(loss, -adv.mean() * scale)
    assert ratio_norm(lp, lp.clone(), mean, mean.clone(), 0.3).eq(0).all()


def test_kl_exact_vs_quirk_differ_by_delta():
    torch.manual_seed(1)
    mean, ref = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    std = torch.tensor([0.3, 0.2, 0.1]).view(3, 1, 1)  # per-sample s_k, shaped like Transition.std
    delta = 0.1
    lp = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 0.5])
    sq = (mean - ref).square().flatten(1).mean(1)
    exact = (sq / (2 * std.flatten().square())).mean()
    loss_e, m_e = GRPOLoss(kl_weight=0.04)(lp, lp, adv, mean=mean, ref_mean=ref, std=std, delta=delta)
    loss_q, m_q = GRPOLoss(kl_weight=0.04, exact_kl=False)(lp, lp, adv, mean=mean, ref_mean=ref, std=std,
                                                           delta=delta)
    torch.testing.assert_close(m_e["train/kl_ref"], exact)
    torch.testing.assert_close(m_q["train/kl_ref"], delta * exact)
    torch.testing.assert_close(loss_e, -adv.mean() + 0.04 * exact)
    torch.testing.assert_close(loss_q, -adv.mean() + 0.04 * delta * exact)


def test_kl_skipped_without_reference_or_weight():
    mean, ref, lp, adv = torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.tensor([1.0, 2.0])
    loss, m = GRPOLoss(kl_weight=0.0)(lp, lp, adv, mean=mean, ref_mean=ref, std=0.5)
    assert "train/kl_ref" not in m and loss.item() == -1.5
    loss, m = GRPOLoss(kl_weight=0.04)(lp, lp, adv, mean=mean, ref_mean=None, std=0.5)
    assert "train/kl_ref" not in m and loss.item() == -1.5
    with pytest.raises(ValueError, match="pass delta"):
        GRPOLoss(exact_kl=False)(lp, lp, adv, mean=mean, ref_mean=ref, std=0.5)


def _flow_step(sigma: float, sigma_next: float, batch: int, dim: int, dv_scale: float, seed: int):
    """A real Flow-GRPO SDE step: old and perturbed-new transitions and x' drawn from the old one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g)
    v_old = torch.randn(batch, dim, generator=g)
    v_new = (v_old + dv_scale * torch.randn(batch, dim, generator=g)).requires_grad_()
    old = transition("flow", x, v_old, sigma, sigma_next, noise_level=0.7)
    new = transition("flow", x, v_new, sigma, sigma_next, noise_level=0.7)
    x_next = old.sample(g)
    return old, new, x_next


def test_ratio_norm_identity_on_a_real_sde_step():
    old, new, x_next = _flow_step(0.8, 0.7, batch=8, dim=64, dv_scale=0.5, seed=0)
    s = old.std
    xi = (x_next - old.mean) / s
    delta = new.mean - old.mean
    log_ratio = ratio_norm(new.log_prob(x_next), old.log_prob(x_next), new.mean, old.mean, s)
    torch.testing.assert_close(log_ratio, (xi * delta).mean(1), atol=1e-6, rtol=0)
    # its gradient with respect to μ_θ is ξ/D: RatioNorm does not bias the score direction
    (grad,) = torch.autograd.grad(log_ratio.sum(), new.mean)
    torch.testing.assert_close(grad, xi / 64, atol=1e-6, rtol=0)


def test_ratio_norm_has_zero_mean_raw_log_ratio_does_not():
    grid = sd3_sigmas(10).tolist()
    raw_means = []
    for k in (1, 7):
        old, new, x_next = _flow_step(grid[k], grid[k + 1], batch=20000, dim=16, dv_scale=0.3, seed=k)
        with torch.no_grad():
            lp_new, lp_old = new.log_prob(x_next), old.log_prob(x_next)
            s = old.std
            normed = ratio_norm(lp_new, lp_old, new.mean, old.mean, s)
            raw = lp_new - lp_old
            m = (new.mean - old.mean).square().mean(1)
        se = normed.std() / math.sqrt(len(normed))
        assert normed.mean().abs() < 4 * se
        # raw = mean_D(ξ δ)/s − m/(2 s²): mean −E[m]/(2 s²) < 0
        expect_raw = -(m / (2 * s**2)).mean()
        assert expect_raw < 0
        assert (raw.mean() - expect_raw).abs() < 4 * raw.std() / math.sqrt(len(raw))
        raw_means.append(raw.mean().item())
    # step-dependent: the bias differs several-fold between an early and a late step
    assert max(raw_means) / min(raw_means) < 0.5 or min(raw_means) / max(raw_means) < 0.5


def test_ratio_norm_batch_reduction_quirk():
    mean = torch.cat([torch.full((1, 4), 0.1), torch.full((1, 4), 0.3)])
    old_mean, lp = torch.zeros(2, 4), torch.zeros(2)
    # log ρ̃ = m/(2s) with s = 0.5: per-sample m = [0.01, 0.09]; batch-wide m = 0.05
    torch.testing.assert_close(ratio_norm(lp, lp, mean, old_mean, 0.5), torch.tensor([0.01, 0.09]))
    torch.testing.assert_close(ratio_norm(lp, lp, mean, old_mean, 0.5, per_sample=False),
                               torch.tensor([0.05, 0.05]))


def test_guard_policy_loss_by_hand():
    # δ = 0 and s = 0.5: log ρ̃ = 0.5 (ℓ_θ − ℓ_old), so ℓ_θ − ℓ_old = 2 log ρ gives ρ̃ = RATIOS
    log_prob, old = _log_probs(RATIOS, scale=0.5)
    mean = torch.zeros(6, 3, dtype=torch.float64)
    loss_fn = GRPOGuardLoss(clip_range=0.1)
    loss, m = loss_fn(log_prob, old, ADV, mean=mean, std=0.5, delta=0.25, old_mean=mean.clone())
    assert loss.item() == pytest.approx(4 * sum(SURROGATE) / 6, abs=1e-5)
    assert m["train/clip_frac"].item() == pytest.approx(4 / 6)
    assert m["train/ratio_mean"].item() == pytest.approx(6.1 / 6, abs=1e-6)
    assert m["train/ratio_raw_mean"].item() == pytest.approx(sum(r**2 for r in RATIOS.tolist()) / 6, abs=1e-5)
    loss.backward()
    expect = torch.tensor([0.0, 0.0, -0.5, 1.5, -2.1, 2.1], dtype=torch.float64) * 4 * 0.5 / 6
    torch.testing.assert_close(log_prob.grad, expect, atol=1e-5, rtol=0)
    no_rw, _ = GRPOGuardLoss(clip_range=0.1, reweight=False)(log_prob, old, ADV, mean=mean, std=0.5,
                                                              old_mean=mean)
    assert no_rw.item() == pytest.approx(sum(SURROGATE) / 6, abs=1e-5)


def test_guard_defaults_and_errors():
    loss_fn = GRPOGuardLoss()
    assert (loss_fn.clip_range, loss_fn.kl_weight, loss_fn.per_sample, loss_fn.reweight) == (2e-6, 0.0, True, True)
    lp, mean = torch.zeros(2), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_mean"):
        loss_fn(lp, lp, lp, mean=mean, std=0.5, delta=0.1)
    with pytest.raises(ValueError, match="delta"):
        loss_fn(lp, lp, lp, mean=mean, std=0.5, old_mean=mean)
    with pytest.raises(ValueError, match="std must be"):
        loss_fn(lp, lp, lp, mean=mean, std=torch.ones(3), delta=0.1, old_mean=mean)
