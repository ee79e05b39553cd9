"""Profile UniGRPO steps on the tiny model: throughput and model compute vs everything else.

    python benchmarks/profile_step.py [STEPS] [key=value ...]

Runs `train` from the shipped SFT checkpoint (builtin:demo) under torch.profiler and reports:
trajectories/s for rollout and training (from the loop's own perf/ metrics), and the share of wall
time spent inside PyTorch operators (model compute: conv, matmul, attention, norms, optimizer
kernels) versus everything else (Python glue, reward, tokenisation, logging). Writes
benchmarks/results/profile_step.json and the top operators to benchmarks/results/profile_step.txt.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from unigrpo.config import load_config
from unigrpo.recipes.train import train

OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> None:
    steps = int(argv[0]) if argv and "=" not in argv[0] else 3
    overrides = [a for a in argv if "=" in a]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("builtin:demo", [f"steps={steps}", "eval_every=0", "save_every=0",
                                                f"output_dir={tmp}", "eval.num_prompts=8", *overrides])
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "perf/step_s" in r]
    # Self CPU time of the leaf operators = time inside PyTorch kernels (children excluded, no double count).
    events = prof.key_averages()
    op_time = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    mean = {k: sum(r[k] for r in steps_rows) / len(steps_rows)
            for k in ("perf/step_s", "perf/rollout_s", "perf/train_s", "perf/reward_s",
                      "perf/rollout_traj_per_s", "perf/train_traj_per_s")}
    result = {"steps": steps, "threads": torch.get_num_threads(), "wall_s_incl_setup_and_final_eval": wall,
              "aten_op_time_s": op_time, "model_compute_fraction": op_time / wall, **mean}
    OUT.mkdir(exist_ok=True)
    (OUT / "profile_step.json").write_text(json.dumps(result, indent=2))
    (OUT / "profile_step.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=25))
    for k, v in result.items():
        print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")


if __name__ == "__main__":
    main(sys.argv[1:])
