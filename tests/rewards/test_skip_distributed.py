"""2 gloo ranks, the reward missing on rank 1 only in step 2: every rank skips that update, so
the final weights equal one process trained for step 1 only (bitwise; the setting of
tests/recipe/test_train_distributed.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from unigrpo.cli import main

RECIPE = sys.modules["_recipe_conftest"]


@pytest.mark.slow
def test_a_score_missing_on_one_rank_skips_the_step_on_every_rank(tiny_checkpoint, tmp_path):
    common = ["eval_every=100", "eval.num_prompts=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *RECIPE.tiny_overrides(tiny_checkpoint, one, *common, "steps=1",
                                                 "algo.micro_batch_trajectories=2")]) == 0
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [here, str(RECIPE.HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unigrpo.cli",
           "train", *RECIPE.tiny_overrides(tiny_checkpoint, two, *common, "steps=2", "algo.micro_batch_trajectories=4",
                                           "rewards=[{name: 'rank_rewards:rank1_down_in_step2'}]",
                                           "max_skipped_share=0.5")]  # 1 of 2 steps skipped: not a failed run
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "1 of 2 steps skipped" in proc.stderr  # the summary line
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 2 trained on no rank
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["reward/skipped_steps"] for r in rows if "reward/skipped_steps" in r}
    assert skipped == {1: 0.0, 2: 1.0}
