"""Joint UniGRPO steps on a tiny random FLUX.2 [klein] pipeline: trajectories/s and model-compute fraction.

    HF_HUB_OFFLINE=1 python benchmarks/joint_step_flux2.py [--steps 4] [--warmup 1] [--threads 2] [key=value ...]

Builds the tests' tiny pipeline (``tests/models/conftest.py``: Qwen3 text encoder, FLUX.2
transformer, VAE, code-trained tokenizer) in a temporary folder with ``save_pretrained`` and runs
the real ``unigrpo.recipes.train.train`` on it (``model.kind=hf``, shared mode, LoRA rank 4 on both
sides, the ``group_diversity`` reward; nothing downloaded). Default batch: 4 prompts x 4
trajectories, 16 reasoning tokens, 4 denoising steps with a 2-step SDE window, 32 px, 1 PPO epoch.

Model compute = wall time inside the LM's and the transformer's ``forward`` (every call: decode
steps, scoring, velocities), ``vae.decode``, and ``loss.backward()``; the optimizer's ``step`` is
timed apart; the rest of a step is Python glue, tokenisation, the reward, losses, clipping and
logging (``StepTimer``, also used by ``profile_step.py``). A step is the time from one
``rollout_step`` call to the next; the first ``--warmup`` steps are not counted, nor the last one
run (it also runs the final evaluation and checkpoint). Traj/s is from the loop's own ``perf/``
metrics. Writes benchmarks/results/joint_step_flux2.json.
"""

from __future__ import annotations

import argparse
import contextlib
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


class Timeline:
    """Exclusive wall time per named region: time spent in a region minus the time of the regions
    called inside it, so the shares add up to the step. ``model`` is time in the hooked modules'
    forward and in ``loss.backward()``, ``optimizer`` in the optimizer's ``step``."""

    def __init__(self):
        self.own: dict[str, float] = {}
        self.stack: list[list] = []

    def enter(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), 0.0])

    def exit(self) -> None:
        name, t0, inner = self.stack.pop()
        elapsed = time.perf_counter() - t0
        self.own[name] = self.own.get(name, 0.0) + elapsed - inner
        if self.stack:
            self.stack[-1][2] += elapsed

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            self.enter(name)
            try:
                return fn(*a, **kw)
            finally:
                self.exit()
        return timed

    def wrap_cm(self, name: str, cm_fn):
        """A context-manager function timed on entry and on exit, not over the block it guards."""
        @contextlib.contextmanager
        def timed(*a, **kw):
            self.enter(name)
            cm = cm_fn(*a, **kw)
            cm.__enter__()
            self.exit()
            try:
                yield
            finally:
                self.enter(name)
                cm.__exit__(None, None, None)
                self.exit()
        return timed

    def hook(self, module, name: str = "model") -> None:
        module.register_forward_pre_hook(lambda *_: self.enter(name))
        module.register_forward_hook(lambda *_: self.exit())


class StepTimer:
    """Times the steps of ``unigrpo.recipes.train.train`` and where their time goes.

    A step runs from one ``rollout_step`` call to the next (sampling, reward, PPO update, logging),
    so the last step of a run (it also runs the final evaluation and checkpoint) is never counted:
    run one step more than you count. ``hook_model(model, timeline)`` hooks the model's modules as
    the region ``model``; ``loss.backward()`` is ``model`` too and the optimizer's ``step`` is
    ``optimizer``. The other regions are the library functions below (their own time, without the
    model time or the regions inside them), so that the rest of a step is attributed to code."""

    def __init__(self, hook_model):
        self.hook_model, self.tl, self.marks = hook_model, Timeline(), []

    def _patch(self, owner, attr: str, name: str | None = None, cm: bool = False) -> None:
        fn = getattr(owner, attr)
        self.patched.append((owner, attr, fn))
        name = name or f"{owner.__name__.removeprefix('unigrpo.')}.{attr}"
        setattr(owner, attr, self.tl.wrap_cm(name, fn) if cm else self.tl.wrap(name, fn))

    def __enter__(self):
        import unigrpo.recipes.train as T
        from unigrpo import rollout
        from unigrpo.models import base
        from unigrpo.utils.logging import RunLogger

        self.patched = []
        for attr in ("build_model", "build_optimizer", "rollout_step"):
            self.patched.append((T, attr, getattr(T, attr)))
        build_model, build_optimizer, rollout_step = (getattr(T, a) for a in ("build_model", "build_optimizer",
                                                                               "rollout_step"))
        timed_rollout = self.tl.wrap("recipes.train.rollout_step", rollout_step)

        def marked_rollout_step(*a, **kw):  # a step starts here
            self.marks.append((time.perf_counter(), dict(self.tl.own)))
            return timed_rollout(*a, **kw)

        def timed_build(*a, **kw):  # hook the model's own compute as soon as it exists
            model = build_model(*a, **kw)
            self.hook_model(model, self.tl)
            for attr in ("encode", "forward_context", "velocity", "decode", "decode_text"):
                setattr(model, attr, self.tl.wrap(f"adapter.{attr} (outside its modules)", getattr(model, attr)))
            return model

        def timed_optimizer(*a, **kw):
            opt = build_optimizer(*a, **kw)
            opt.step = self.tl.wrap("optimizer", opt.step)
            return opt

        T.rollout_step, T.build_model, T.build_optimizer = marked_rollout_step, timed_build, timed_optimizer
        self.patched.append((torch.Tensor, "backward", torch.Tensor.backward))
        torch.Tensor.backward = self.tl.wrap("model", torch.Tensor.backward)
        for owner, attr in ((rollout, "sample_episode"), (rollout, "sample_reasoning"), (rollout, "sample_images"),
                            (rollout, "score_window"), (T, "ppo_epochs"), (T, "round_loss"), (T, "image_loss"),
                            (T, "optimizer_step"), (T, "step_metrics")):
            self._patch(owner, attr)
        for owner, attr in ((rollout, "sde_step"), (rollout, "gaussian_log_prob"), (T, "flow_grpo_loss"),
                            (T, "velocity_mse"), (T, "latent_kl"), (T, "text_grpo_loss"), (T, "group_advantages")):
            self._patch(owner, attr, f"algo.{attr}")
        self._patch(RunLogger, "log", "utils.logging.RunLogger.log")
        self._patch(base, "adapters_disabled", "models.base.adapters_disabled (the reference's LoRA off / on)", cm=True)
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self.patched):
            setattr(owner, attr, fn)

    def steps(self, warmup: int) -> list[dict]:
        """Per counted step (after ``warmup`` steps): step_s, model_s, optimizer_s, their fractions,
        and ``rest``: every other region's own time / step, ``untimed`` what no region covers."""
        out = []
        for (t0, r0), (t1, r1) in list(itertools.pairwise(self.marks))[warmup:]:
            step = t1 - t0
            share = {k: (v - r0.get(k, 0.0)) / step for k, v in r1.items()}
            model, opt = share.pop("model", 0.0), share.pop("optimizer", 0.0)
            share["untimed"] = 1 - model - opt - sum(share.values())
            out.append({"step_s": step, "model_s": model * step, "optimizer_s": opt * step,
                        "model_fraction": model, "optimizer_fraction": opt, "rest": share})
        return out


def median_rest(steps: list[dict]) -> dict[str, float]:
    """The median share of each region's own time over the counted steps, largest first."""
    rest = {k: statistics.median(s["rest"].get(k, 0.0) for s in steps) for k in steps[0]["rest"]}
    return dict(sorted(rest.items(), key=lambda kv: -kv[1]))


def hook_hf(model, tl: Timeline) -> None:
    """The LM's and the transformer's forward (every call: decode steps, scoring, velocities) and ``vae.decode``."""
    for m in (model.lm, model.dit):
        tl.hook(m)
    model.vae.decode = tl.wrap("model", model.vae.decode)


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

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        n = args.warmup + args.steps + 1  # the last step (final evaluation + checkpoint) is not counted
        cfg = load_config(None, [*tiny_pipeline(str(Path(tmp) / "pipe")), "task.kind=prompts", f"task.prompts={prompts}",
                                 "rewards=[{name: group_diversity}]", "algo.prompts_per_step=4", "algo.group_size=4",
                                 "algo.trajectories_per_minibatch=16", "algo.micro_batch_trajectories=16", "algo.ppo_epochs=1",
                                 "sampler.num_steps=4", "sampler.window_range=[0,3]", "sampler.window_size=2",
                                 "text.max_reasoning_tokens=16", f"threads={args.threads}", f"steps={n}",
                                 "eval_every=0", "save_every=0", "log_every=1", f"output_dir={Path(tmp) / 'run'}",
                                 *overrides])
        with StepTimer(hook_hf) as timer:
            T.train(cfg)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_s" in r][args.warmup:-1]
    steps = timer.steps(args.warmup)
    fractions = [s["model_fraction"] for s in steps]
    traj = cfg.algo.prompts_per_step * cfg.algo.group_size
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "diffusers": diffusers.__version__},
        "batch": {"prompts": cfg.algo.prompts_per_step, "group": cfg.algo.group_size,
                  "reasoning_tokens": cfg.text.max_reasoning_tokens, "num_steps": cfg.sampler.num_steps,
                  "window_size": cfg.sampler.window_size, "overrides": overrides},
        "counted_steps": len(steps), "warmup_steps": args.warmup,
        "step_s": [s["step_s"] for s in steps], "model_s": [s["model_s"] for s in steps],
        "optimizer_s": [s["optimizer_s"] for s in steps],
        "median_step_s": statistics.median(s["step_s"] for s in steps),
        "trajectories_per_s": traj / statistics.median(s["step_s"] for s in steps),
        "model_compute_fraction_median": statistics.median(fractions),
        "optimizer_fraction_median": statistics.median(s["optimizer_fraction"] for s in steps),
        "rest_median": median_rest(steps),
        "rollout_traj_per_s_median": statistics.median(r["perf/rollout_traj_per_s"] for r in rows),
        "train_traj_per_s_median": statistics.median(r["perf/train_traj_per_s"] for r in rows),
    }
    print(f"joint step ({traj} trajectories): median {result['median_step_s']:.3f} s = "
          f"{result['trajectories_per_s']:.1f} traj/s; model compute {100 * result['model_compute_fraction_median']:.0f}% "
          f"(per step {[round(f, 2) for f in fractions]}), optimizer "
          f"{100 * result['optimizer_fraction_median']:.0f}%; rollout {result['rollout_traj_per_s_median']:.1f} traj/s, "
          f"train {result['train_traj_per_s_median']:.1f} traj/s")
    for k, v in result["rest_median"].items():
        print(f"  rest: {100 * v:5.1f}%  {k}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
