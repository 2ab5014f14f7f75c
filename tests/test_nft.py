"""DiffusionNFT's loss, noising and old-policy update against hand computations (docs/algorithms.md)."""
import pytest
import torch

from opd.objectives.nft import NFTLoss, nft_noising, old_policy_decay, optimality_probability, soft_update_
from opd.sampling import sd3_sigmas


def test_optimality_probability():
    adv = torch.tensor([5.0, -5.0, 0.0, 7.0, -9.0, 2.5])
    assert optimality_probability(adv).tolist() == [1.0, 0.0, 0.5, 1.0, 0.0, 0.75]


@pytest.mark.parametrize(("beta", "expect"), [(1.0, 35 / 12), (0.5, 3.4375)])
def test_loss_by_hand(beta, expect):
    # one sample, D = 2, t = ½, x0 = 0, x_t = (1, 2), v_θ = (1, 2), v_old = (2, 3), r = ¼.
    # β = 1: v⁺ = (1, 2) → x̂0⁺ = (½, 1), L⁺ = (1¼/2)/(1½/2) = 5/6;
    #        v⁻ = (3, 4) → x̂0⁻ = (−½, 0), L⁻ = (¼/2)/(½/2) = ½;  5·(¼·5/6 + ¾·½) = 35/12.
    # β = ½: v⁺ = (1.5, 2.5) → L⁺ = 0.3125/0.5; v⁻ = (2.5, 3.5) → L⁻ = 0.0625/0.25;
    #        5·(¼·0.625 + ¾·0.25)/½ = 3.4375.
    x0, x_t, t = torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), torch.tensor([0.5])
    v_theta, v_old, r = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 3.0]]), torch.tensor([0.25])
    loss, m = NFTLoss(beta=beta, kl_weight=1e-4)(v_theta, v_old, x_t, x0, t, r)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert "train/kl_ref_velocity_mse" not in m
    # the λ term: mean_D (v_θ − v_ref)² = (1 + 4)/2 with v_ref = 0
    loss_kl, m = NFTLoss(beta=beta, kl_weight=1e-4)(v_theta, v_old, x_t, x0, t, r, v_ref=torch.zeros(1, 2))
    assert loss_kl.item() == pytest.approx(expect + 2.5e-4, rel=1e-6)
    assert m["train/kl_ref_velocity_mse"].item() == 2.5


def _batch(seed: int = 0, batch: int = 3, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    t = torch.tensor([0.3, 0.6, 0.9])[:batch]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v_old = torch.randn(batch, dim, generator=g)
    return x0, x_t, t, v_old, eps - x0


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_independent_of_r_at_old_policy(beta):
    x0, x_t, t, v_old, _ = _batch()
    losses = [NFTLoss(beta=beta)(v_old.clone(), v_old, x_t, x0, t, torch.full((3,), r))[0]
              for r in (0.0, 0.3, 1.0)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-6, atol=0)


def test_gradient_direction_at_old_policy():
    # at v_θ = v_old the r = 1 loss descends straight toward v* = ε − x0, the r = 0 loss straight away
    x0, x_t, t, v_old, v_star = _batch()
    for r, sign in ((1.0, 1.0), (0.0, -1.0)):
        v = v_old.clone().requires_grad_()
        NFTLoss(beta=1.0)(v, v_old, x_t, x0, t, torch.full((3,), r))[0].backward()
        cos = torch.nn.functional.cosine_similarity(-v.grad, v_star - v_old, dim=1)
        torch.testing.assert_close(cos, torch.full((3,), sign), atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_r1_minimiser_is_the_true_velocity(beta):
    x0, x_t, t, v_old, v_star = _batch(seed=1)
    v = torch.zeros_like(v_old, requires_grad=True)
    opt = torch.optim.SGD([v], lr=2.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.98)
    loss_fn = NFTLoss(beta=beta, kl_weight=0.0)
    for _ in range(400):
        opt.zero_grad()
        loss_fn(v, v_old, x_t, x0, t, torch.ones(3))[0].backward()
        opt.step()
        sched.step()
    # the implicit positive policy v⁺ = β v_θ + (1 − β) v_old reaches v*, i.e. x̂0⁺ = x0
    v_pos = beta * v.detach() + (1 - beta) * v_old
    torch.testing.assert_close(v_pos, v_star, atol=1e-3, rtol=0)


def test_exact_prediction_is_finite():
    x0, x_t, t, v_old, v_star = _batch()
    v = v_star.clone().requires_grad_()
    loss, m = NFTLoss(beta=1.0, kl_weight=0.0)(v, v_old, x_t, x0, t, torch.ones(3))
    loss.backward()
    assert m["train/loss_pos"].item() < 1e-6
    assert torch.isfinite(v.grad).all()


def test_noising():
    grid = sd3_sigmas(10)
    x0 = torch.randn(6, 2, 3)
    x_t, t, noise = nft_noising(x0, grid, 9, torch.Generator().manual_seed(0))
    assert x_t.shape == (6, 9, 2, 3) and t.shape == (6, 9) and noise.shape == (6, 9, 2, 3)
    allowed = set(grid[:-1].tolist())
    for row in t.tolist():
        assert len(set(row)) == 9 and set(row) <= allowed
    tt = t[:, :, None, None]
    torch.testing.assert_close(x_t, (1 - tt) * x0[:, None] + tt * noise)
    again = nft_noising(x0, grid, 9, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((x_t, t, noise), again))
    _, t_all, _ = nft_noising(x0, grid, 10, torch.Generator().manual_seed(1))
    assert sorted(t_all[0].tolist()) == sorted(allowed)
    with pytest.raises(ValueError, match="num_train_steps"):
        nft_noising(x0, grid, 11)


def test_noising_permutation_is_uniform():
    grid = sd3_sigmas(10)
    _, t, _ = nft_noising(torch.zeros(5000, 1), grid, 1, torch.Generator().manual_seed(2))
    counts = torch.stack([(t[:, 0] == s).sum() for s in grid[:-1]])
    assert (counts - 500).abs().max() < 100  # ±5 standard errors of a Binomial(5000, 0.1)


def test_old_policy_decay_schedules():
    assert old_policy_decay(0, "linear") == 0.0
    assert old_policy_decay(100, "linear") == pytest.approx(0.1)
    assert old_policy_decay(1000, "linear") == 0.5
    assert old_policy_decay(74, "delayed") == 0.0
    assert old_policy_decay(75, "delayed") == 0.0
    assert old_policy_decay(100, "delayed") == pytest.approx(0.1875)
    assert old_policy_decay(208, "delayed") == pytest.approx(0.9975)
    assert old_policy_decay(209, "delayed") == 0.999
    assert old_policy_decay(5000, "delayed") == 0.999
    with pytest.raises(ValueError, match="'cosine'"):
        old_policy_decay(1, "cosine")


def test_soft_update():
    old = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[4.0]]))]
    new = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]])]
    soft_update_(old, new, eta=0.25)  # 0.25·old + 0.75·new
    assert old[0].tolist() == [2.5, 5.0] and old[1].tolist() == [[1.0]]
    assert old[0].grad is None and old[0].requires_grad
    soft_update_(old, new, eta=0.0)
    assert old[0].tolist() == [3.0, 6.0]
    with pytest.raises(ValueError, match="old_params has 2"):
        soft_update_(old, new[:1], eta=0.5)
    assert old[0].tolist() == [3.0, 6.0]


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_sample_weights_leave_samples_out_and_keep_a_mean_over_the_rest(beta):
    # weights (0, 3, 0) over 3 samples: the loss of sample 1 alone, and no gradient on the others
    x0, x_t, t, v_old, _ = _batch()
    v_ref = torch.randn_like(v_old)
    v = (v_old + 0.1 * torch.randn_like(v_old)).requires_grad_()
    r = torch.tensor([0.2, 0.7, 0.5])
    loss, _ = NFTLoss(beta=beta)(v, v_old, x_t, x0, t, r, v_ref=v_ref, weights=torch.tensor([0.0, 3.0, 0.0]))
    loss.backward()
    alone, _ = NFTLoss(beta=beta)(v.detach()[1:2], v_old[1:2], x_t[1:2], x0[1:2], t[1:2], r[1:2], v_ref=v_ref[1:2])
    torch.testing.assert_close(loss, alone, rtol=1e-6, atol=0)
    assert v.grad[0].abs().max() == 0 and v.grad[2].abs().max() == 0 and v.grad[1].abs().max() > 0
    unweighted, _ = NFTLoss(beta=beta)(v.detach(), v_old, x_t, x0, t, r, v_ref=v_ref)
    weighted, _ = NFTLoss(beta=beta)(v.detach(), v_old, x_t, x0, t, r, v_ref=v_ref, weights=torch.ones(3))
    torch.testing.assert_close(weighted, unweighted, rtol=0, atol=0)
