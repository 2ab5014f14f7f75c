"""Group-relative advantages against hand-computed values (docs/algorithms.md, Group-relative advantages)."""
import math

import numpy as np
import pytest
import torch

from opd.objectives.advantages import group_advantages, nonzero_advantage_mask

# two groups of two: {0, 1} and {2, 4}
REWARDS = torch.tensor([0.0, 1.0, 2.0, 4.0])
GROUPS = torch.tensor([0, 0, 1, 1])


def test_global_std_by_hand():
    # group means 0.5 and 3; population variance of all four around 7/4:
    # (1.75² + 0.75² + 0.25² + 2.25²)/4 = 8.75/4
    std = math.sqrt(8.75 / 4)
    expect = torch.tensor([-0.5, 0.5, -1.0, 1.0], dtype=torch.float64) / (std + 1e-4)
    adv = group_advantages(REWARDS.double(), GROUPS, global_std=True)
    torch.testing.assert_close(adv, expect, rtol=0, atol=1e-12)
    # the reference tracker's np.std (ddof=0), computed independently
    assert np.std(REWARDS.numpy().astype(np.float64)) == pytest.approx(std, abs=1e-15)


def test_group_std_by_hand():
    # within-group population stds: 0.5 and 1
    expect = torch.tensor([-0.5 / 0.5001, 0.5 / 0.5001, -1 / 1.0001, 1 / 1.0001], dtype=torch.float64)
    adv = group_advantages(REWARDS.double(), GROUPS, global_std=False)
    torch.testing.assert_close(adv, expect, rtol=0, atol=1e-12)


def test_groups_need_not_be_contiguous_and_dtype_is_kept():
    perm = torch.tensor([2, 0, 3, 1])
    adv = group_advantages(REWARDS, GROUPS, global_std=False)
    adv_perm = group_advantages(REWARDS[perm], GROUPS[perm] + 7, global_std=False)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv_perm, adv[perm])


def test_clip_to_five():
    # one 1 among 49 zeros, group std: A = 0.98/(0.14 + 1e-4) ≈ 6.995 → 5; the zeros get −0.02/(0.14 + 1e-4)
    rewards = torch.zeros(50, dtype=torch.float64)
    rewards[7] = 1.0
    adv = group_advantages(rewards, torch.zeros(50, dtype=torch.long), global_std=False)
    assert adv[7].item() == 5.0
    others = torch.cat([adv[:7], adv[8:]])
    torch.testing.assert_close(others, torch.full((49,), -0.02 / 0.1401, dtype=torch.float64))
    assert group_advantages(rewards, torch.zeros(50, dtype=torch.long), global_std=False, clip=2.0)[7] == 2.0


def test_zero_advantage_mask():
    # group 1's rewards are all equal: A is exactly 0 there and those samples are dropped
    rewards = torch.tensor([0.0, 1.0, 0.3, 0.3, 0.3])
    groups = torch.tensor([0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups, global_std=True)
    assert adv[2:].eq(0).all()
    assert nonzero_advantage_mask(adv).tolist() == [True, True, False, False, False]
    per_step = adv[:, None].expand(5, 9)  # the [N, T] layout of the references
    assert nonzero_advantage_mask(per_step).tolist() == [True, True, False, False, False]


def test_nan_rewards_raise_naming_indices():
    rewards = torch.tensor([0.1, float("nan"), 0.2, float("nan")])
    with pytest.raises(ValueError, match=r"2 NaN value\(s\) at indices \[1, 3\]"):
        group_advantages(rewards, torch.tensor([0, 0, 1, 1]), global_std=True)


def test_bad_group_ids_raise():
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        group_advantages(REWARDS, GROUPS.float(), global_std=True)
    with pytest.raises(ValueError, match="group_ids must have the shape"):
        group_advantages(REWARDS, GROUPS[:3], global_std=True)
