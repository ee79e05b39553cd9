"""Data parallel on CPU: 2 gloo processes (torchrun) give bit-identical parameters to 1 process.

Why it can be exact: every random draw is keyed by global prompt/trajectory indices (not by rank),
rewards are gathered before the group statistics, every global minibatch is the same set of
trajectories for any number of ranks (``ppo_order``), and gradients are averaged over ranks. The
per-rank micro-batch is kept at 2 trajectories in both runs (``micro_batch_trajectories`` counts
over all ranks: 2 for 1 process, 4 for 2) so the CPU kernels see the same shapes and rows; then
one process accumulates ``a/2 + b/2`` and two processes average ``(a + b)/2`` -- the same floats.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import HERE, tiny_overrides
from safetensors.torch import load_file

from unigrpo.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_match_one_process(tiny_checkpoint, tmp_path):
    common = ["steps=2", "eval_every=100", "eval.num_prompts=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *tiny_overrides(tiny_checkpoint, one, *common, "algo.micro_batch_trajectories=2")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "unigrpo.cli", "train",
           *tiny_overrides(tiny_checkpoint, two, *common, "algo.micro_batch_trajectories=4")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "unigrpo train: 2 rank(s)" in proc.stdout and "(4 per rank)" in proc.stdout
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    changed = [k for k in a if not torch.equal(a[k], load_file(tiny_checkpoint)[k])]
    assert changed  # training moved the parameters ...
    assert all(torch.equal(a[k], b[k]) for k in a)  # ... identically
    rows = [[json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (one, two)]
    for r1, r2 in zip(*rows):
        if "reward/mean" in r1:
            assert r1["reward/mean"] == r2["reward/mean"] and r1["reward/std"] == r2["reward/std"]
