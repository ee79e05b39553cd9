"""Throughput of the shapes-world reward (and of the ground-truth renderer), one process.

Usage: python benchmarks/reward_speed.py [--repeats 5] [--out benchmarks/results/reward_speed.json]

Cases: ground-truth renders (what a trained model draws), noisy renders (sigma 0.1) and uniform
noise (worst case for the component labelling: hundreds of tiny components per image), at batch
sizes 64 / 256 / 1024 and canvas sides 32 / 24. Reports the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from unigrpo.world import make_tasks, render_batch, score_images


def best_rate(fn, fn_args: tuple, n_images: int, repeats: int) -> float:
    """Images per second of ``fn(*fn_args)`` (best of ``repeats`` runs, after one warm-up)."""
    fn(*fn_args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*fn_args)
        times.append(time.perf_counter() - t0)
    return n_images / min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks = make_tasks("val", 1024, seed=0)
    specs = [t.spec for t in tasks]
    rows = []
    for size in (32, 24):
        clean = render_batch([t.target for t in tasks], seed=0, size=size)
        gen = torch.Generator().manual_seed(0)
        cases = {"ground_truth": clean,
                 "noisy_0.1": (clean + 0.1 * torch.randn(clean.shape, generator=gen)).clamp(0, 1),
                 "uniform_noise": torch.rand(clean.shape, generator=gen)}
        for name, imgs in cases.items():
            for b in (64, 256, 1024):
                rate = best_rate(score_images, (imgs[:b], specs[:b]), b, args.repeats)
                rows.append({"what": "score_images", "case": name, "size": size, "batch": b,
                             "images_per_s": round(rate)})
                print(f"score_images  size={size:2d} {name:14s} batch={b:5d}  {rate:9.0f} images/s")
        targets = [t.target for t in tasks[:256]]
        rate = best_rate(render_batch, (targets, 1, size), 256, args.repeats)
        rows.append({"what": "render_batch", "case": "ground_truth", "size": size, "batch": 256,
                     "images_per_s": round(rate)})
        print(f"render_batch  size={size:2d} {'ground_truth':14s} batch=  256  {rate:9.0f} images/s")
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "numpy": np.__version__, "torch": torch.__version__, "cpus": os.cpu_count()},
           "repeats": args.repeats, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
