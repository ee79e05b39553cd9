"""The cost of classifier-free guidance for editing (issue 19, item 5): per trajectory, CFG-free vs
each edit family's default guidance, on the tests' tiny random pipelines.

    HF_HUB_OFFLINE=1 python benchmarks/edit_cfg_cost.py [--families a,b] [--steps 10] [--window 3]
        [--group 4] [--repeats 3] [--threads 2] [--out PATH]

Each family is one entry of ``FAMILIES``: name -> builder() returning ``(model, prompt, guidance)``,
a tiny edit model (``UnifiedModel`` with ``edits``), one ``tasks.Prompt`` with its input image(s),
and ``guidance(model, tokens, ctx) -> velocity(x_t, t)``: the family's default edit guidance (the
unconditional branch(es) and their rule). Another edit family is one builder and one line.

Measured per family, on ``--group`` trajectories of the prompt (rows share the prompt, as a group):

- **rollout image phase** per trajectory: the context pass, ``--steps`` denoising steps (Euler; the
  SDE window's arithmetic is negligible next to the model calls) and the VAE decode; CFG-free = one
  transformer call per step, guided = the family's guidance (its extra context passes included);
- **train step** per trajectory: the teacher-forced context pass with gradient, ``--window`` trained
  steps (velocity with gradient) and the backward of ``sum |v|^2 - logp``; guided = every branch;
- the reasoning (the text engine, 8 tokens) is the same either way and reported once.

Times are medians of ``--repeats`` after one warm-up, as wall clock and as this process's CPU time
(the ratios use CPU time: steadier on a shared machine); the transformer call count and its token
count say what scales to a real model. Writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "edit_cfg_cost.json"
INSTRUCTION = "make the circle blue"


def tests_conftest():
    """The tests' tiny pipeline builders (one copy: tests/models/conftest.py)."""
    if "hf_conftest" not in sys.modules:
        sys.path.insert(0, str(ROOT / "tests"))  # conftest's builders import testkit
        spec = importlib.util.spec_from_file_location("hf_conftest", ROOT / "tests" / "models" / "conftest.py")
        module = sys.modules["hf_conftest"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["hf_conftest"]


def qwen_edit_builder(plus: bool) -> Callable:
    """Tiny Qwen-Image-Edit(-Plus), no LoRA; guidance = the pipelines' (``eval_guidance``: negative
    prompt " " with the input images, true CFG 4): 2 context passes, 2 transformer calls per step."""
    def build():
        from unigrpo.config import load_config
        from unigrpo.models import build_model

        c = tests_conftest()
        cfg = load_config(None, c.edit_overrides(c.tiny_qwenimage_edit_dir(plus), 0, 0, plus))  # rank 0: all trained
        torch.manual_seed(0)
        prompt = c.edit_prompts((2,) if plus else (1,), side=48)[0]
        return build_model(cfg, checkpoint=None), prompt, lambda m, tokens, ctx: m.eval_guidance(tokens, ctx, 4.0)

    return build


# family -> builder() -> (model, prompt, guidance(model, tokens, ctx) -> velocity(x_t, t))
FAMILIES: dict[str, Callable] = {"qwen_image_edit": qwen_edit_builder(False),
                                 "qwen_image_edit_plus": qwen_edit_builder(True)}


class DiTCounter:
    """Counts the transformer's calls and the image tokens they read (a forward pre-hook)."""

    def __init__(self, dit):
        self.calls, self.tokens = 0, 0
        dit.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        self.tokens = kwargs["hidden_states"].shape[1]

    def take(self) -> tuple[int, int]:
        out, self.calls = (self.calls, self.tokens), 0
        return out


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn``, medians of ``repeats`` after a warm-up. CPU time (this
    process, all threads) is the steadier measure on a shared machine: other jobs stretch the wall
    clock, not the work."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure(name: str, build: Callable, a) -> dict:
    from unigrpo.sampling import ode_sample

    model, prompt, guidance = build()
    counter = DiTCounter(model.dit)
    c0 = time.process_time()  # the reasoning is the same with and without CFG: measured once
    tokens = model.sample_reasoning(model.encode([prompt] * a.group), max_new_tokens=8,
                                    generator=torch.Generator().manual_seed(0))
    reason_cpu = time.process_time() - c0
    x_init = torch.randn((a.group, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    grid = model.timesteps(a.steps, None)[:a.window]  # the first steps: high noise, where RL trains

    def rollout(guided: bool):
        def run():
            with torch.no_grad():
                _, ctx = model.forward_context(tokens)
                own = guidance(model, tokens, ctx) if guided else None
                model.decode(ode_sample(model, ctx, a.steps, None, x_init=x_init, velocity=own))
        return run

    def train(guided: bool):
        def run():
            logp, ctx = model.forward_context(tokens)
            v_of = guidance(model, tokens, ctx) if guided else (lambda x, t: model.velocity(x, t, ctx))
            loss = -logp.sum()
            for k in range(a.window):
                loss = loss + v_of(x_init, grid[k].expand(a.group)).pow(2).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    row = {"family": name, "pipeline": model.pipeline_class, "group": a.group, "steps": a.steps, "window": a.window}
    row["reasoning_cpu_s_per_traj"] = reason_cpu / a.group
    for label, fn in (("rollout", rollout), ("train", train)):
        for guided in (False, True):
            key = f"{label}_{'guided' if guided else 'cfg_free'}"
            counter.take()
            wall, cpu = timed(fn(guided), a.repeats)
            calls, dit_tokens = counter.take()
            row[f"{key}_s_per_traj"], row[f"{key}_cpu_s_per_traj"] = wall / a.group, cpu / a.group
            row[f"{key}_dit_calls"] = calls // (a.repeats + 1)
            row["dit_tokens_per_call"] = dit_tokens  # noisy + reference tokens (the same in every call)
        row[f"{label}_ratio"] = row[f"{label}_guided_cpu_s_per_traj"] / row[f"{label}_cfg_free_cpu_s_per_traj"]
    row["rollout_with_reasoning_ratio"] = ((row["reasoning_cpu_s_per_traj"] + row["rollout_guided_cpu_s_per_traj"])
                                           / (row["reasoning_cpu_s_per_traj"] + row["rollout_cfg_free_cpu_s_per_traj"]))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of a rollout")
    p.add_argument("--window", type=int, default=3, help="trained (SDE window) steps of a train step")
    p.add_argument("--group", type=int, default=4, help="trajectories per measured batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.families.split(","):
        if name not in FAMILIES:
            raise SystemExit(f"--families: no family {name!r} (have {', '.join(FAMILIES)})")
        rows.append(measure(name, FAMILIES[name], a))
        r = rows[-1]
        print(f"{name}: CPU s/traj: rollout {r['rollout_cfg_free_cpu_s_per_traj']:.3f} -> "
              f"{r['rollout_guided_cpu_s_per_traj']:.3f} (x{r['rollout_ratio']:.2f}; with the reasoning "
              f"x{r['rollout_with_reasoning_ratio']:.2f}; DiT calls {r['rollout_cfg_free_dit_calls']} -> "
              f"{r['rollout_guided_dit_calls']}, {r['dit_tokens_per_call']} tokens each), train "
              f"{r['train_cfg_free_cpu_s_per_traj']:.3f} -> {r['train_guided_cpu_s_per_traj']:.3f} (x{r['train_ratio']:.2f})")
    result = {"rows": rows, "machine": f"{platform.processor() or platform.machine()}, {a.threads} threads, CPU",
              "torch": torch.__version__, "command": " ".join(sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
