"""The cost of classifier-free guidance for Bagel image-to-image (issue 19, item 5), MEASURED on the
tiny random BAGEL folder with the ViT path (``write_tiny_bagel(vit=True)``: hidden 64, 2 layers,
SigLIP width 32; 32 px input and output) on the CPU.

    python benchmarks/edit_cfg_cost_bagel.py [--rows 4] [--steps 24] [--window 3] [--epochs 2] [--repeats 7]

Two ways to draw an edit, everything else equal (the same prompts, input images, reasoning length):

- **CFG-free** (UniGRPO's training): one context pass (``forward_context``), ONE velocity pass per
  denoising step;
- **Bagel's edit guidance** (``app.py: edit_image``; ``bagel_cfg``): the context pass + the two
  unconditional contexts (``cfg_contexts``: ``[sys][VAE][ViT]`` and ``[sys][prompt]``), THREE
  velocity passes per step (text scale 4, image scale 2, interval (0, 1]: every step guided).

Rollout per trajectory = reasoning decode + context pass(es) + ``steps`` velocity steps + VAE decode,
no gradient. Update per trajectory = one PPO micro-batch as the recipe computes it: the context pass
with gradient, ``window`` velocity steps with gradient on a detached context plus the reference's
velocity for the MSE (timed as the same passes without gradient: the reference is the same
computation under other weights), then ``backward``. A train step = rollout + ``epochs`` updates;
``train_step_ratio`` = guided / CFG-free. Timings are the FASTEST of ``--repeats`` interleaved runs with
one thread (the machine is shared: a slower run is another process's load, not this code's cost;
every run is kept under ``raw``, with the medians).
Writes benchmarks/results/edit_cfg_cost_bagel.json (family -> numbers).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.bagel_cfg import EDIT
from unigrpo.models.bagel_io import write_tiny_bagel
from unigrpo.tasks import Prompt

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "edit_cfg_cost_bagel.json"
PROMPTS = ["make the circle blue", "add a red square", "remove the triangle", "swap the two shapes"]


def velocity_fn(model, tokens, ctx, guided: bool):
    """v(x, t): one pass, or Bagel's three-branch edit guidance (its two contexts built here)."""
    if not guided:
        return lambda x, t: model.velocity(x, t, ctx)
    ctx_text, ctx_img = model.cfg_contexts(tokens)
    return lambda x, t: model.cfg_velocity(x, t, ctx, ctx_text, ctx_img, text_scale=4.0, **EDIT)


def rollout(model, prompts, guided: bool, steps: int, tokens_n: int, seed: int):
    """(seconds for one rollout of ``len(prompts)`` trajectories, its tokens) (module docstring)."""
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=tokens_n,
                                        generator=torch.Generator().manual_seed(seed))
        _, ctx = model.forward_context(tokens)
        v = velocity_fn(model, tokens, model.detach_context(ctx), guided)
        x = torch.randn((len(prompts), *model.latent_shape), generator=torch.Generator().manual_seed(seed))
        grid = model.timesteps(steps, 3.0)
        for k in range(steps):
            x = x + (grid[k + 1] - grid[k]) * v(x, grid[k].expand(len(prompts)))
        model.decode(x)
    return time.perf_counter() - start, tokens


def update(model, tokens, guided: bool, window: int, seed: int) -> float:
    """Seconds for one PPO micro-batch over ``tokens`` (module docstring)."""
    b = len(tokens)
    x = torch.randn((b, *model.latent_shape), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    logp, ctx = model.forward_context(tokens)
    v = velocity_fn(model, tokens, model.detach_context(ctx), guided)
    with torch.no_grad():  # the reference's context and branches (same compute as the policy's)
        _, ref_ctx = model.forward_context(tokens)
        v_ref = velocity_fn(model, tokens, ref_ctx, guided)
    loss = -logp.sum()
    for k in range(window):
        t = torch.full((b,), 1.0 - 0.1 * k)
        with torch.no_grad():
            target = v_ref(x, t)
        loss = loss + (v(x, t) - target).pow(2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4, help="trajectories per rollout / micro-batch")
    ap.add_argument("--steps", type=int, default=24, help="denoising steps (the paper's training 25 Bagel timesteps)")
    ap.add_argument("--window", type=int, default=3, help="SDE window steps trained per update")
    ap.add_argument("--epochs", type=int, default=2, help="PPO epochs (updates per trajectory and step)")
    ap.add_argument("--tokens", type=int, default=16, help="reasoning tokens sampled per row")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    folder = write_tiny_bagel(tempfile.mkdtemp(prefix="bagel_edit_cost_"), vit=True)
    cfg = load_config(None, ["model.kind=bagel", f"model.path={folder}", "model.resolution=32", "model.lora.text_rank=4",
                             "model.lora.image_rank=4", "device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg, checkpoint=None)
    g = torch.Generator().manual_seed(1)
    prompts = [Prompt(PROMPTS[i % len(PROMPTS)], images=torch.rand(1, 3, 32, 32, generator=g)) for i in range(a.rows)]
    times = {"cfg_free": {"rollout": [], "update": []}, "cfg": {"rollout": [], "update": []}}
    rollout(model, prompts, True, 2, a.tokens, 0)  # warm-up
    for r in range(a.repeats):
        for name, guided in (("cfg_free", False), ("cfg", True)):  # interleaved: drift hits both alike
            sec, tokens = rollout(model, prompts, guided, a.steps, a.tokens, r)
            times[name]["rollout"].append(sec / a.rows)
            times[name]["update"].append(update(model, tokens, guided, a.window, r) / a.rows)
    med = {k: {p: min(v) for p, v in d.items()} for k, d in times.items()}
    step = {k: d["rollout"] + a.epochs * d["update"] for k, d in med.items()}
    row = {
        "rollout_s_per_traj_cfg_free": med["cfg_free"]["rollout"],
        "rollout_s_per_traj_cfg": med["cfg"]["rollout"],
        "update_s_per_traj_cfg_free": med["cfg_free"]["update"],
        "update_s_per_traj_cfg": med["cfg"]["update"],
        "passes": {"cfg_free": 1, "cfg": 3, "context_passes_cfg_free": 1, "context_passes_cfg": 3},
        "rollout_ratio": med["cfg"]["rollout"] / med["cfg_free"]["rollout"],
        "train_step_s_per_traj_cfg_free": step["cfg_free"],
        "train_step_s_per_traj_cfg": step["cfg"],
        "train_step_ratio": step["cfg"] / step["cfg_free"],
        "guidance": {"text_scale": 4.0, **{k: list(v) if isinstance(v, tuple) else v for k, v in EDIT.items()}},
        "settings": {**vars(a), "model": "tiny bagel + ViT (hidden 64, 2 layers; SigLIP 32 wide, 2 layers), 32 px, LoRA 4"},
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, CPU",
        "median_rollout_ratio": statistics.median(times["cfg"]["rollout"]) / statistics.median(times["cfg_free"]["rollout"]),
        "median_update_ratio": statistics.median(times["cfg"]["update"]) / statistics.median(times["cfg_free"]["update"]),
        "raw": times,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"bagel": row}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "raw"}, indent=1))


if __name__ == "__main__":
    main()
