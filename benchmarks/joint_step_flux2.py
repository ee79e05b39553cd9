"""Joint UniGRPO steps on a tiny random FLUX.2 [klein] pipeline: trajectories/s and model-compute fraction.

    HF_HUB_OFFLINE=1 python benchmarks/joint_step_flux2.py [--steps 4] [--warmup 1] [--threads 2] [key=value ...]

Builds the tests' tiny pipeline (``tests/models/conftest.py``: Qwen3 text encoder, FLUX.2
transformer, VAE, code-trained tokenizer) in a temporary folder with ``save_pretrained`` and runs
the real ``unigrpo.recipes.train.train`` on it (``model.kind=hf``, shared mode, LoRA rank 4 on both
sides, the ``group_diversity`` reward; nothing downloaded). Default batch: 4 prompts x 4
trajectories, 16 reasoning tokens, 4 denoising steps with a 2-step SDE window, 32 px, 1 PPO epoch.

Model compute = wall time inside the LM's and the transformer's ``forward`` (every call: decode
steps, scoring, velocities), ``vae.decode``, and ``loss.backward()``; the rest of a step is
Python glue, tokenisation, the reward, losses, the optimizer and logging. A step is the time from
one ``rollout_step`` call to the next (the last: to the end of training); the first ``--warmup``
steps are not counted. Traj/s is from the loop's own ``perf/`` metrics. Writes
benchmarks/results/joint_step_flux2.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "joint_step_flux2.json"
PROMPTS = ["a red circle", "two green triangles above a yellow circle", "a blue square",
           "a yellow circle left of a red square"]


def tiny_pipeline(folder: str):
    """The tests' tiny pipeline builder and overrides (one copy: tests/models/conftest.py)."""
    sys.path.insert(0, str(ROOT / "tests"))  # conftest's builder imports testkit
    spec = importlib.util.spec_from_file_location("hf_conftest", ROOT / "tests" / "models" / "conftest.py")
    conftest = sys.modules["hf_conftest"] = importlib.util.module_from_spec(spec)  # its dataclass needs it
    spec.loader.exec_module(conftest)
    return conftest.hf_overrides(conftest.build_tiny_flux2(folder))


class ModelClock:
    """Wall time inside the model's forward / decode / backward calls (not nested in each other)."""

    def __init__(self):
        self.seconds, self._t0 = 0.0, None

    def start(self, *_):
        self._t0 = time.perf_counter()

    def stop(self, *_):
        self.seconds += time.perf_counter() - self._t0

    def wrap(self, fn):
        def timed(*a, **kw):
            self.start()
            try:
                return fn(*a, **kw)
            finally:
                self.stop()
        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="counted steps")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted first steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args, overrides = ap.parse_known_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    import unigrpo.recipes.train as T
    from unigrpo.config import load_config

    clock, marks = ModelClock(), []
    rollout_step = T.rollout_step

    def marked_rollout_step(*a, **kw):  # a step starts here
        marks.append((time.perf_counter(), clock.seconds))
        return rollout_step(*a, **kw)

    T.rollout_step = marked_rollout_step
    backward = torch.Tensor.backward
    torch.Tensor.backward = clock.wrap(backward)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        n = args.warmup + args.steps
        cfg = load_config(None, [*tiny_pipeline(str(Path(tmp) / "pipe")), "task.kind=prompts", f"task.prompts={prompts}",
                                 "rewards=[{name: group_diversity}]", "algo.prompts_per_step=4", "algo.group_size=4",
                                 "algo.trajectories_per_minibatch=16", "algo.micro_batch_trajectories=16", "algo.ppo_epochs=1",
                                 "sampler.num_steps=4", "sampler.window_range=[0,3]", "sampler.window_size=2",
                                 "text.max_reasoning_tokens=16", f"threads={args.threads}", f"steps={n}",
                                 "eval_every=0", "save_every=0", "log_every=1", f"output_dir={Path(tmp) / 'run'}",
                                 *overrides])
        real_build = T.build_model

        def timed_build(*a, **kw):  # hook the model's own compute as soon as it exists
            model = real_build(*a, **kw)
            for m in (model.lm, model.dit):
                m.register_forward_pre_hook(clock.start)
                m.register_forward_hook(clock.stop)
            model.vae.decode = clock.wrap(model.vae.decode)
            return model

        T.build_model = timed_build
        try:
            T.train(cfg)
            marks.append((time.perf_counter(), clock.seconds))
        finally:
            T.rollout_step, T.build_model, torch.Tensor.backward = rollout_step, real_build, backward
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_s" in r][args.warmup:]
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks)][args.warmup:]
    fractions = [m / s for s, m in steps]
    traj = cfg.algo.prompts_per_step * cfg.algo.group_size
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "diffusers": diffusers.__version__},
        "batch": {"prompts": cfg.algo.prompts_per_step, "group": cfg.algo.group_size,
                  "reasoning_tokens": cfg.text.max_reasoning_tokens, "num_steps": cfg.sampler.num_steps,
                  "window_size": cfg.sampler.window_size, "overrides": overrides},
        "counted_steps": len(steps), "warmup_steps": args.warmup,
        "step_s": [s for s, _ in steps], "model_s": [m for _, m in steps],
        "median_step_s": statistics.median(s for s, _ in steps),
        "trajectories_per_s": traj / statistics.median(s for s, _ in steps),
        "model_compute_fraction_median": statistics.median(fractions),
        "rollout_traj_per_s_median": statistics.median(r["perf/rollout_traj_per_s"] for r in rows),
        "train_traj_per_s_median": statistics.median(r["perf/train_traj_per_s"] for r in rows),
    }
    print(f"joint step ({traj} trajectories): median {result['median_step_s']:.3f} s = "
          f"{result['trajectories_per_s']:.1f} traj/s; model compute {100 * result['model_compute_fraction_median']:.0f}% "
          f"(per step {[round(f, 2) for f in fractions]}); rollout {result['rollout_traj_per_s_median']:.1f} traj/s, "
          f"train {result['train_traj_per_s_median']:.1f} traj/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
