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


def chunk_orders(prompts: int, group: int, chunk: int) -> list[list[int]]:
    """The training loop's rollout chunks (recipes/batches.py ``ppo_order``): each group's members
    permuted, each chunk an equal share (chunk / prompts rows) of every group (prompt-major row k =
    prompt k // group, member k % group)."""
    per, g = chunk // prompts, torch.Generator().manual_seed(chunk)
    perms = [torch.randperm(group, generator=g).tolist() for _ in range(prompts)]
    return [[p * group + perms[p][j] for p in range(prompts) for j in range(i * per, (i + 1) * per)]
            for i in range(group // per)]


def step_result(rs, images, prompts, meta, chunk):
    """Score a step chunk by chunk through RewardSet.step(); back to prompt-major order."""
    scoring, order = rs.step(), []
    for rows in chunk_orders(2, 4, chunk):
        scoring.submit(images[rows], [prompts[i] for i in rows], [meta[i] for i in rows])
        order += rows
    res = scoring.result()
    unsort = torch.argsort(torch.tensor(order))
    return res, res.total[unsort], {k: v[unsort] for k, v in res.per_term.items()}


@pytest.mark.parametrize("workers", [0, 1])
def test_step_scores_groupwise_terms_on_whole_groups_whatever_the_chunk_size(workers):
    images, prompts, meta = batch(n=8, group=4)  # 2 prompts x 4, prompt-major
    terms = [("group_diversity", 0.5), ("slow_rewards:count_calls", 0.25), ("smooth_reward:brightness", 1.0)]
    rs = RewardSet(terms, workers=workers)
    whole = rs(images, prompts, meta)  # the reference: one call over the whole step
    for chunk in (2, 4, 8):  # algo.micro_batch_trajectories
        res, total, per_term = step_result(rs, images, prompts, meta, chunk)
        assert per_term["slow_rewards:count_calls"].tolist() == [4.0] * 8  # every call saw a whole group
        for name in rs.names:
            assert torch.equal(per_term[name], whole.per_term[name]), (chunk, name)
        assert torch.equal(total, whole.total) and res.missing == []
    # what per-chunk scoring gives instead (chunks of 2: each call sees 2 of the group's 4 rows)
    rows = chunk_orders(2, 4, 2)[0]
    part = rs.submit(images[rows], [prompts[i] for i in rows], [meta[i] for i in rows]).result()
    assert part.per_term["slow_rewards:count_calls"].tolist() == [1.0, 1.0]
    assert not torch.equal(part.per_term["group_diversity"], whole.per_term["group_diversity"][rows])
    rs.close()


def test_step_without_groupwise_terms_keeps_no_images_and_missing_terms_propagate():
    import sys

    images, prompts, meta = batch(n=8, group=4)
    rs = RewardSet([("smooth_reward:brightness", 1.0)])
    scoring = rs.step()
    for rows in chunk_orders(2, 4, 4):
        scoring.submit(images[rows], [prompts[i] for i in rows], [meta[i] for i in rows])
    assert scoring.chunks == []  # nothing kept for a group-wise pass
    order = [i for rows in chunk_orders(2, 4, 4) for i in rows]
    torch.testing.assert_close(scoring.result().total, images[order].mean(dim=(1, 2, 3)), rtol=0, atol=0)

    def down(images, prompts, metadata):
        raise RewardUnavailable("reward service http://127.0.0.1:9: cannot connect")

    down.groupwise = True
    sys.modules["slow_rewards"].down_groupwise = down
    rs = RewardSet([("smooth_reward:brightness", 1.0), ("slow_rewards:down_groupwise", 1.0)])
    scoring = rs.step()
    scoring.submit(images, prompts, meta)
    res = scoring.result()
    assert res.missing == ["slow_rewards:down_groupwise"] and torch.isnan(res.total).all()
    assert torch.isfinite(res.per_term["smooth_reward:brightness"]).all()
