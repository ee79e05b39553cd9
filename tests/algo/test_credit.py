"""Credit assignment over rounds (algo/credit.py), each option against a small case computed by hand."""

import numpy as np
import pytest
import torch

from unigrpo.algo.advantages import group_advantages
from unigrpo.algo.credit import (
    masked_group_advantages,
    per_round_credit,
    round_advantages,
    terminal_credit,
    tree_credit,
)
from unigrpo.config import AlgoConfig

NONE = {"scale": "none", "eps": 0.0, "clip": None}


def t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_masked_advantages_with_every_member_live_are_group_advantages(scale):
    r = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 6)))
    r[2] = 0.25  # a constant group: exact zeros in both
    full = torch.ones(5, 6, dtype=torch.bool)
    torch.testing.assert_close(masked_group_advantages(r, full, scale, 1e-4, 2.0), group_advantages(r, scale, 1e-4, 2.0),
                               rtol=1e-12, atol=1e-12)


def test_masked_advantages_use_the_live_members_only():
    r = t([[1.0, 0.0, 0.5, 9.0], [0.3, 0.3, 7.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4])
    live = np.array([1.0, 0.0, 0.5])  # the first group's live rewards, by hand: mean 0.5, population std
    expected = (live - 0.5) / (np.sqrt(((live - 0.5) ** 2).mean()) + 1e-4)
    adv = masked_group_advantages(r, m)
    np.testing.assert_allclose(adv[0, :3].numpy(), expected, rtol=1e-12)
    assert adv[0, 3] == 0  # not live: no credit, and its 9.0 moved no statistic
    assert torch.equal(adv[1], torch.zeros(4, dtype=torch.float64))  # live members equal: exact 0
    assert torch.equal(adv[2], torch.zeros(4, dtype=torch.float64))  # none live: 0, not NaN
    batch = masked_group_advantages(r, m, "batch", 0.0)
    pool = np.array([1.0, 0.0, 0.5, 0.3, 0.3])  # every masked reward
    np.testing.assert_allclose(batch[0, :3].numpy(), (live - 0.5) / pool.std(), rtol=1e-12)


def test_terminal_shares_the_final_images_advantage_with_every_live_round():
    # final rewards 1, 0, 0, 1 -> centred 0.5, -0.5, -0.5, 0.5; row 2 stopped after round 1 (round 2 not live)
    r = t([[[0.0, 0.2, 1.0], [0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    live = torch.tensor([[[True] * 3, [True] * 3, [True, True, False], [True, True, True]]])
    adv = terminal_credit(r, live, **NONE)
    assert torch.equal(adv, t([[[0.5] * 3, [-0.5] * 3, [-0.5, -0.5, 0.0], [0.5] * 3]]))


def test_per_round_is_own_reward_plus_weighted_improvement():
    # rewards per (row, round): row 0 fixes its image, row 1 says done on a wrong one, row 2 breaks a right one
    r = t([[[0.2, 1.0], [0.5, 0.5], [1.0, 0.4]]])
    live = torch.ones(1, 3, 2, dtype=torch.bool)
    adv = per_round_credit(r, live, weight=1.0, **NONE)
    # round 0: u = R_0 = (0.2, 0.5, 1.0), mean 17/30
    # round 1: u = R_1 + (R_1 - R_0) = (1.8, 0.5, -0.2), mean 0.7
    torch.testing.assert_close(adv, t([[[0.2 - 17 / 30, 1.1], [0.5 - 17 / 30, -0.2], [1.0 - 17 / 30, -0.9]]]),
                               rtol=0, atol=1e-12)
    assert adv[0, 1, 1] < 0  # a stop that keeps a wrong image is not free
    half = per_round_credit(r, live, weight=0.5, **NONE)[0, :, 1]  # u = (1.4, 0.5, 0.1), mean 2/3
    torch.testing.assert_close(half, t([1.4 - 2 / 3, 0.5 - 2 / 3, 0.1 - 2 / 3]), rtol=0, atol=1e-12)


def test_per_round_normalises_over_the_rows_live_at_the_round():
    r = t([[[0.0, 1.0, 1.0], [0.0, 0.0, 0.5], [1.0, 1.0, 1.0]]])
    live = torch.tensor([[[True, True, False], [True, True, True], [True, True, True]]])  # row 0 stopped at round 1
    adv = per_round_credit(r, live, weight=1.0, **NONE)
    # round 2, live rows 1 and 2: u = (0.5 + 0.5, 1.0 + 0) = (1.0, 1.0): equal -> exact 0; row 0: 0
    assert torch.equal(adv[0, :, 2], t([0.0, 0.0, 0.0]))
    # round 1: u = (1 + 1, 0 + 0, 1 + 0) = (2, 0, 1), mean 1
    assert torch.equal(adv[0, :, 1], t([1.0, -1.0, 0.0]))


def test_tree_two_levels_by_hand():
    # M = 2 round-1 samples x K = 2 continuations; final rewards (1, 0 | 0, 0)
    r = t([[[0.5, 1.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    live = torch.ones(1, 4, 2, dtype=torch.bool)
    adv = tree_credit(r, live, branches=2, **NONE)
    # level 2 (round 2): siblings (1, 0) -> (0.5, -0.5); (0, 0) -> (0, 0)
    assert torch.equal(adv[0, :, 1], t([0.5, -0.5, 0.0, 0.0]))
    # level 1 (round 1): continuation means (0.5, 0) -> centred (0.25, -0.25), each copy of its sample alike
    assert torch.equal(adv[0, :, 0], t([0.25, 0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="round-1 samples"):
        tree_credit(r[:, :3], live[:, :3], branches=2, **NONE)


def test_round_advantages_dispatches_on_algo_credit():
    r = torch.rand(2, 4, 2, generator=torch.Generator().manual_seed(0))
    live = torch.ones(2, 4, 2, dtype=torch.bool)
    ga = {"scale": "group", "eps": 1e-4, "clip": 5.0}
    assert torch.equal(round_advantages(AlgoConfig(credit="terminal"), r, live), terminal_credit(r, live, **ga))
    assert torch.equal(round_advantages(AlgoConfig(credit="per_round", improvement_weight=0.5), r, live),
                       per_round_credit(r, live, 0.5, **ga))
    assert torch.equal(round_advantages(AlgoConfig(credit="tree", tree_branches=2), r, live),
                       tree_credit(r, live, 2, **ga))
