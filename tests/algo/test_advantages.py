"""Group advantages vs numpy (population std), edge cases without NaN."""

import numpy as np
import pytest
import torch

from unigrpo.algo.advantages import group_advantages, zero_variance_fraction


def test_group_scale_matches_numpy_population_std():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 8))
    expected = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=0, keepdims=True) + 1e-4)
    adv = group_advantages(torch.from_numpy(r))
    assert adv.dtype == torch.float64 and adv.shape == (5, 8)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12)
    # not Bessel's std (ddof 1): the two differ by sqrt(G / (G - 1))
    bessel = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    assert not np.allclose(adv.numpy(), bessel)


def test_batch_scale_uses_std_of_all_rewards_and_group_means():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(4, 6)) + np.arange(4)[:, None]
    expected = (r - r.mean(axis=1, keepdims=True)) / (r.std(ddof=0) + 1e-4)
    np.testing.assert_allclose(group_advantages(torch.from_numpy(r), scale="batch").numpy(),
                               expected, rtol=1e-12)
    np.testing.assert_allclose(group_advantages(torch.from_numpy(r), scale="none").numpy(),
                               r - r.mean(axis=1, keepdims=True), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_equal_rewards_give_exact_zeros(scale, eps):
    r = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.7, 0.2], [1.0, 1.0, 1.0]], dtype=torch.float64)
    adv = group_advantages(r, scale=scale, eps=eps)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(adv[2], torch.zeros(3, dtype=torch.float64))
    assert adv[1].abs().sum() > 0
    all_equal = group_advantages(torch.full((2, 4), 0.1), scale=scale, eps=eps)
    assert torch.equal(all_equal, torch.zeros(2, 4))  # batch std 0 too: still no NaN


def test_single_group_and_group_of_one():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(group_advantages(r, eps=0.0), torch.tensor([[1.0, -1.0, -1.0, 1.0]]))
    assert torch.equal(group_advantages(torch.tensor([[3.0], [5.0]])), torch.zeros(2, 1))
    assert zero_variance_fraction(torch.tensor([[3.0], [5.0]])) == 1.0


def test_clip():
    r = torch.tensor([[10.0] + [0.0] * 99], dtype=torch.float64)  # outlier: A = 9.95 unclipped
    assert group_advantages(r)[0, 0].item() > 9
    adv = group_advantages(r, clip=5.0)
    assert adv[0, 0].item() == 5.0 and adv.min().item() > -5
    with pytest.raises(ValueError):
        group_advantages(r, clip=0.0)


def test_integer_rewards_and_bad_input():
    adv = group_advantages(torch.tensor([[1, 0], [1, 1]]))
    assert adv.dtype == torch.float32 and adv[0, 0].item() == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="prompts, group"):
        group_advantages(torch.zeros(6))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2, 3), scale="global")


def test_zero_variance_fraction():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.3]])
    assert zero_variance_fraction(r) == 0.5
    assert zero_variance_fraction(np.zeros((3, 4))) == 1.0


def test_advantages_are_not_differentiated():
    r = torch.tensor([[0.0, 1.0]], requires_grad=True)
    assert not group_advantages(r).requires_grad
