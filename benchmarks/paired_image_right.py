"""Did the image expert get better? A paired comparison of two policies on the same held-out prompts
and noise (the test split, 20 ODE steps, evaluation CFG 1):

    python benchmarks/paired_image_right.py runs/image_learns/RUN/final.safetensors           # vs the SFT checkpoint
    python benchmarks/paired_image_right.py B.safetensors --base A.safetensors [key=value ...]

Two measures of the image expert, each per prompt, so the difference is paired (its standard
error is that of the per-prompt differences, much smaller than that of two independent
proportions when most prompts agree):

- **image right given description** (thinking on): accuracy on the prompts whose sampled
  description is right for BOTH policies (docs/demo.md's "image right" column, restricted to the
  prompts both can be judged on; with the text expert frozen the descriptions are the same);
- **ground-truth reasoning** (`gt` mode): accuracy when both draw from the world's own description.

Writes the numbers to stdout and, with ``--out FILE.json``, as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.tasks.base import generate_eval
from unigrpo.tasks.shapes import eval_tasks
from unigrpo.world.reward import description_correct, score_images


def per_prompt(model, tasks, cfg) -> dict[str, np.ndarray]:
    """Per prompt: correct with own reasoning, description right, correct with ground-truth reasoning."""
    prompts, specs = [t.prompt for t in tasks], [t.spec for t in tasks]
    own = generate_eval(model, prompts, cfg, thinking=True)
    gt = generate_eval(model, prompts, cfg, thinking=True, reasoning=[t.reasoning for t in tasks])
    images = own.images
    return {"correct": np.asarray(score_images(images, specs).correct, bool),
            "desc_ok": np.asarray(description_correct(own.reasoning, specs, size=images.shape[-1]), bool),
            "gt_correct": np.asarray(score_images(gt.images, specs).correct, bool)}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a, of b, the difference b - a and its standard error over the paired rows."""
    d = b.astype(float) - a.astype(float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"n": len(d), "base": float(a.mean()), "new": float(b.mean()), "diff": float(d.mean()), "se": se,
            "z": float(d.mean() / se) if se > 0 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new", help="the trained policy's final.safetensors")
    ap.add_argument("--base", help="the policy to compare against (default: the config's checkpoint, the SFT)")
    ap.add_argument("--config", default="builtin:demo")
    ap.add_argument("--out", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, ["threads=1", *args.overrides])
    tasks = eval_tasks(cfg)
    base = build_model(cfg, checkpoint=args.base) if args.base else build_model(cfg)
    a = per_prompt(base.eval(), tasks, cfg)
    b = per_prompt(build_model(cfg, checkpoint=args.new).eval(), tasks, cfg)
    both = a["desc_ok"] & b["desc_ok"]
    res = {"image_right_given_description": paired(a["correct"][both], b["correct"][both]),
           "gt_reasoning": paired(a["gt_correct"], b["gt_correct"]),
           "accuracy": paired(a["correct"], b["correct"]),
           "description_right": paired(a["desc_ok"], b["desc_ok"])}
    for name, r in res.items():
        print(f"{name:32s} n={r['n']:3d}  {r['base']:.3f} -> {r['new']:.3f}  diff {r['diff']:+.3f} +- {r['se']:.3f} "
              f"(paired se; {r['z']:+.1f} se)")
    if args.out:
        args.out.write_text(json.dumps({"new": args.new, "base": args.base or "config checkpoint", **res}, indent=1))


if __name__ == "__main__":
    main()
