"""The issue's acceptance test: a tiny run whose reward is served by `unigrpo serve-reward` in
another process (loopback) gives the same metrics and bitwise the same weights as the in-process
reward (same seed). Images travel as float32 .npy (lossless), so the scores are the same bits."""

import json
import sys

import pytest
import torch
from services import ServeRewardProcess

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from unigrpo.config import load_config
from unigrpo.recipes.train import train

RECIPE = sys.modules["_recipe_conftest"]  # the recipe tests' tiny model and sizes (tests/rewards/conftest.py)


def read(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_served_reward_trains_exactly_like_the_in_process_one(tiny_checkpoint, tmp_path):
    base = RECIPE.tiny_overrides(tiny_checkpoint, tmp_path / "local", "reward_workers=1")
    local = train(load_config(None, base))
    with ServeRewardProcess("smooth_reward:brightness", cwd=RECIPE.HERE) as srv:
        served = train(load_config(None, [*RECIPE.tiny_overrides(tiny_checkpoint, tmp_path / "served", "reward_workers=1"),
                                          f"rewards=[{{name: remote, kwargs: {{url: '{srv.url}', timeout_s: 30}}}}]"]))
    rows_l, rows_s = read(tmp_path / "local"), read(tmp_path / "served")
    assert len(rows_l) == len(rows_s) > 0
    for a, b in zip(rows_l, rows_s):
        assert a["step"] == b["step"]
        if "reward/mean" in a:  # a training row (not an evaluation row)
            assert a["reward/smooth_reward:brightness"] == b["reward/remote"] == a["reward/mean"]
        same = [k for k in a if (k.startswith(("loss/", "rollout/", "eval/")) or k in (
            "reward/mean", "reward/std", "reward/min", "reward/max", "reward/group_std"))]
        assert same and {k: a[k] for k in same} == {k: b[k] for k in same}
        assert b.get("reward/remote_failures", 0) == 0 and b.get("reward/skipped_steps", 0) == 0
    assert sum(any(k.startswith("loss/") for k in r) for r in rows_l) == 2  # both steps trained
    ws_l, ws_s = local["model"].state_dict(), served["model"].state_dict()
    assert ws_l.keys() == ws_s.keys() and all(torch.equal(ws_l[k], ws_s[k]) for k in ws_l)
