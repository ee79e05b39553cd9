"""Reward terms: factories with kwargs, group-wise terms, the text term, missing results, config."""

import pytest
import torch

from unigrpo.config import load_config
from unigrpo.rewards import BUILTIN, RewardSet, RewardUnavailable, resolve_reward


def batch(n=4, group=2):
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    meta = [{"prompt_index": i // group, "group_index": i % group, "reasoning": "<think> red </think> a red dot <eos>"}
            for i in range(n)]
    return images, [f"p{i // group}" for i in range(n)], meta


def test_factory_kwargs_built_in_and_dotted():
    images, prompts, meta = batch()
    fn = resolve_reward("slow_rewards:brightness_factory", {"scale": 2.0})
    torch.testing.assert_close(torch.as_tensor(fn(images, prompts, meta)), 2 * images.mean(dim=(1, 2, 3)))
    remote = resolve_reward("remote", {"url": "http://127.0.0.1:9", "timeout_s": 1})
    assert remote.url == "http://127.0.0.1:9" and remote.client.timeout_s == 1.0
    with pytest.raises(ValueError, match=r"reward 'remote': bad kwargs.*url"):
        resolve_reward("remote")  # a factory needs its url
    with pytest.raises(ValueError, match="bad kwargs"):
        resolve_reward("remote", {"url": "http://x:1", "timeout": 3})  # misspelled kwarg
    with pytest.raises(ValueError, match="on_failure"):
        resolve_reward("remote", {"url": "http://x:1", "on_failure": "ignore"})
    assert resolve_reward("shapes") is BUILTIN["shapes"]  # plain callables stay themselves


def test_config_terms_carry_kwargs_and_names_are_unique():
    cfg = load_config(None, [("rewards=[{name: remote, weight: 0.5, kwargs: {url: 'http://127.0.0.1:9'}}, "
                             "{name: remote, kwargs: {url: 'http://127.0.0.1:10'}}, {name: reasoning_format}]")])
    assert cfg.rewards[0].kwargs == {"url": "http://127.0.0.1:9"} and cfg.rewards[2].kwargs == {}
    rs = RewardSet(cfg.rewards)
    assert rs.names == ["remote", "remote_2", "reasoning_format"]
    assert [t[2].url for t in rs.terms[:2]] == ["http://127.0.0.1:9", "http://127.0.0.1:10"]
    rs.close()
    from unigrpo.config import ConfigError

    with pytest.raises(ConfigError, match=r"rewards\[0\].kwargs"):
        load_config(None, ["rewards=[{name: remote, kwargs: 3}]"])


def test_reasoning_format():
    fn = resolve_reward("reasoning_format")
    meta = [{"reasoning": r} for r in ["<think> red lemon </think> a yellow square <eos>",
                                       "<think> red lemon </think> <eos> <pad>",  # no answer
                                       "<think> </think> a square",  # empty thinking
                                       "a yellow square",  # no tags
                                       "<think> facts"]]
    assert fn(None, [""] * 5, meta).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    lax = resolve_reward("reasoning_format", {"require_answer": False, "min_think_words": 0})
    assert lax(None, [""] * 5, meta).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_groupwise_terms_see_one_prompt_at_a_time():
    images, prompts, meta = batch(n=6, group=3)
    rs = RewardSet([("slow_rewards:count_calls", 1.0), ("group_diversity", 1.0)])
    terms = rs(images, prompts, meta).per_term
    assert terms["slow_rewards:count_calls"].tolist() == [3.0] * 6  # each call: one group's 3 rows
    x = images.flatten(1)
    d01, d02 = (x[0] - x[1]).abs().mean(), (x[0] - x[2]).abs().mean()
    torch.testing.assert_close(terms["group_diversity"][0], (d01 + d02) / 2)
    # a chunk holds a share of each group: rows of one prompt are scored together wherever they are
    shuffled = [5, 0, 3, 1, 4, 2]
    t2 = rs(images[shuffled], [prompts[i] for i in shuffled], [meta[i] for i in shuffled]).per_term
    torch.testing.assert_close(t2["group_diversity"], terms["group_diversity"][shuffled])


def test_unavailable_term_makes_the_result_missing():
    def down(images, prompts, metadata):
        raise RewardUnavailable("reward service http://127.0.0.1:9: cannot connect")

    import sys

    mod = sys.modules["slow_rewards"]
    mod.down = down
    images, prompts, meta = batch()
    res = RewardSet([("smooth_reward:brightness", 1.0), ("slow_rewards:down", 1.0)])(images, prompts, meta)
    assert res.missing == ["slow_rewards:down"] and torch.isnan(res.total).all()
    assert torch.isfinite(res.per_term["smooth_reward:brightness"]).all()
    ok = RewardSet([("smooth_reward:brightness", 1.0)])(images, prompts, meta)
    assert ok.missing == [] and ok.metrics == {}
    assert torch.isfinite(ok.total).all() and ok.seconds >= 0
