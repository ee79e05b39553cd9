"""Profile UniGRPO steps on the tiny model: throughput and model compute vs everything else.

    python benchmarks/profile_step.py [STEPS] [--warmup 1] [--torch-profiler] [key=value ...]

Runs `train` from the shipped SFT checkpoint (builtin:demo) for ``warmup + STEPS + 1`` steps and
counts STEPS of them (``joint_step_flux2.StepTimer``: a step runs from one ``rollout_step`` call to
the next, so the run's set-up and its last step, which also runs the final evaluation and
checkpoint, are not counted). Per counted step it reports the share of wall time inside the
model (the forward of the text expert, the vision encoder and the image expert, every call, the
reference's included, and ``loss.backward()``), inside the optimizer's ``step``, and the rest
(Python glue, the reward, tokenisation, losses, clipping, logging), with the loop's own
trajectories/s. Writes benchmarks/results/profile_step.json.

``--torch-profiler`` also runs the whole training under torch.profiler and writes its top
operators next to the JSON (``profile_step.txt``), with the older whole-run measure
``aten_op_fraction``: the self CPU time of all aten operators over the wall time of the whole
run, set-up and final evaluation included (the profiler's own per-operator cost is in that wall
time, which makes it pessimistic).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from joint_step_flux2 import (  # this folder is on sys.path when run as a script
    StepTimer,
    median_rest,
)

from unigrpo.config import load_config
from unigrpo.recipes.train import train

OUT = Path(__file__).resolve().parent / "results"


def hook_tiny(model, tl) -> None:
    """Every forward of the tiny model's parameterised parts."""
    for m in (model.text, model.vision, model.image):
        if m is not None:
            tl.hook(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", nargs="?", type=int, default=3, help="counted steps")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted first steps")
    ap.add_argument("--torch-profiler", action="store_true", help="also write torch.profiler's op table")
    ap.add_argument("--out", default=str(OUT / "profile_step.json"))
    args, overrides = ap.parse_known_args()
    n = args.warmup + args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("builtin:demo", [f"steps={n}", "eval_every=0", "save_every=0", f"output_dir={tmp}",
                                           "eval.num_prompts=8", *overrides])
        start = time.perf_counter()
        with StepTimer(hook_tiny) as timer:
            if args.torch_profiler:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    train(cfg)
            else:
                train(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_s" in r][args.warmup:-1]
    steps = timer.steps(args.warmup)
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0] if k != "rest"}
    result = {"counted_steps": args.steps, "warmup_steps": args.warmup, "threads": torch.get_num_threads(),
              "overrides": overrides, "torch_profiler": args.torch_profiler, "steps": steps,
              "median_step_s": med["step_s"], "model_compute_fraction_median": med["model_fraction"],
              "optimizer_fraction_median": med["optimizer_fraction"],
              "rest_fraction_median": statistics.median(1 - s["model_fraction"] - s["optimizer_fraction"] for s in steps),
              "rest_median": median_rest(steps),
              **{k: statistics.median(r[k] for r in rows) for k in (
                  "perf/rollout_s", "perf/train_s", "perf/reward_s", "perf/rollout_traj_per_s", "perf/train_traj_per_s")},
              "wall_s_incl_setup_and_final_eval": wall}
    if args.torch_profiler:
        events = prof.key_averages()
        result["aten_op_fraction"] = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6 / wall
        Path(args.out).with_suffix(".txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=25))
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        if k not in ("steps", "rest_median"):
            print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    for k, v in result["rest_median"].items():
        print(f"  rest: {100 * v:5.1f}%  {k}")
    print("per step: " + ", ".join(f"{s['step_s']:.2f} s (model {s['model_fraction']:.2f}, optimizer "
                                   f"{s['optimizer_fraction']:.2f})" for s in steps))


if __name__ == "__main__":
    main()
