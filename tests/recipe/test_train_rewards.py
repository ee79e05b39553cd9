"""Reward registry: built-ins, dotted paths, weighted sums, clear errors, background thread."""

import pytest
import torch

from unigrpo.rewards import BUILTIN, RewardSet, resolve_reward
from unigrpo.world import make_tasks, render_batch


def batch(n: int = 4):
    tasks = make_tasks("train", n, seed=0)
    images = render_batch([t.target for t in tasks], seed=0, size=32)
    return images, [t.prompt for t in tasks], [t.to_metadata() for t in tasks]


def test_builtin_and_dotted_path():
    assert resolve_reward("shapes") is BUILTIN["shapes"]
    import smooth_reward

    assert resolve_reward("smooth_reward:brightness") is smooth_reward.brightness
    images, prompts, meta = batch()
    res = RewardSet([("shapes", 1.0)])(images, prompts, meta)
    total, seconds = res.total, res.seconds
    assert total.shape == (4,) and (total == 1.0).all() and seconds >= 0  # rendered ground truth is correct


def test_weighted_sum_and_per_term_values():
    images, prompts, meta = batch()
    rs = RewardSet([("smooth_reward:brightness", 2.0), ("smooth_reward:redness", -0.5)])
    res = rs(images, prompts, meta)
    total, terms = res.total, res.per_term
    torch.testing.assert_close(total, 2.0 * terms["smooth_reward:brightness"] - 0.5 * terms["smooth_reward:redness"])
    torch.testing.assert_close(terms["smooth_reward:brightness"], images.mean(dim=(1, 2, 3)))
    assert rs.names == ["smooth_reward:brightness", "smooth_reward:redness"]


@pytest.mark.parametrize("name, error, message", [
    ("nope", ValueError, "not a built-in"),
    ("no_such_module_xyz:f", ValueError, "cannot import module"),
    ("smooth_reward:missing", ValueError, "has no attribute"),
    ("smooth_reward:NOT_CALLABLE", TypeError, "not callable"),
])
def test_bad_names_are_clear_errors(name, error, message):
    with pytest.raises(error, match=message) as e:
        RewardSet([(name, 1.0)])
    assert name in str(e.value)


@pytest.mark.parametrize("name, message", [("smooth_reward:wrong_shape", r"shape \(4, 2\), expected \(4,\)"),
                                           ("smooth_reward:not_finite", "non-finite")])
def test_bad_outputs_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        RewardSet([(name, 1.0)])(*batch())


def test_background_thread_gives_the_same_result_and_errors():
    images, prompts, meta = batch()
    inline, threaded = RewardSet([("shapes", 1.0)]), RewardSet([("shapes", 1.0)], workers=1)
    try:
        assert torch.equal(inline.submit(images, prompts, meta).result().total,
                           threaded.submit(images, prompts, meta).result().total)
        bad = RewardSet([("smooth_reward:wrong_shape", 1.0)], workers=1)
        with pytest.raises(ValueError, match="expected"):
            bad.submit(images, prompts, meta).result()
        bad.close()
    finally:
        threaded.close()
