"""A group-wise reward term's values do not depend on ``algo.micro_batch_trajectories`` (the rollout
chunk size): it is scored once per step on whole groups (``RewardSet.step()``).

Expected to fail until recipes/train.py scores through ``rewards.step()`` (``scoring.submit`` per
chunk, ``results = [scoring.result()]``): strict, so that it turns red once it does -- then drop
the mark. Today, with chunks of 2, each call sees 1 of a group's 4 members per prompt and chunk."""

import json
import sys

from unigrpo.cli import main

RECIPE = sys.modules["_recipe_conftest"]  # the recipe tests' tiny model and sizes (tests/rewards/conftest.py)


def test_groupwise_term_is_the_same_whatever_the_chunk_size(tiny_checkpoint, tmp_path):
    logged = {}
    for micro in (2, 8):
        out = tmp_path / f"micro{micro}"
        terms = "[{name: group_diversity}, {name: 'slow_rewards:count_calls', weight: 0.0}]"
        assert main(["train", *RECIPE.tiny_overrides(tiny_checkpoint, out, "eval_every=0", "algo.trajectories_per_minibatch=8",
                                              f"algo.micro_batch_trajectories={micro}", f"rewards={terms}")]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged[micro] = [(r["reward/group_diversity"], r["reward/slow_rewards:count_calls"])
                         for r in rows if "reward/mean" in r]
    assert len(logged[8]) == 2 and all(calls == 4.0 for _, calls in logged[8])  # whole groups of 4
    assert logged[2][0] == logged[8][0]  # step 1: the same weights, the same whole groups: bit for bit
    # step 2 is drawn after an update whose gradient was accumulated over micro-batches of 2 or 8:
    # the weights (hence the images) may differ in the last float bits, the term's calls may not
    (d2, c2), (d8, c8) = logged[2][1], logged[8][1]
    assert c2 == c8 == 4.0 and abs(d2 - d8) <= 1e-5 * abs(d8)
