"""Refactor parity: short real CLI runs of every model kind, to compare two versions of the code.

A refactor must keep the numbers: the same seed must give the same ``metrics.jsonl`` values (all
but timings) and the same ``final.safetensors`` tensors. This script runs, in one process each,
the tiny model (``builtin:unigrpo``, 3 steps at small sizes) and a 1-step LoRA run on each tiny
random pipeline of the test suite (FLUX.2 [klein], Qwen-Image, SD3 + a reasoner, Bagel), and
writes each run directory under ``--out``. ``--compare A B`` then diffs two such folders:

    python benchmarks/parity.py --out /tmp/after                    # this checkout
    PYTHONPATH=/old/checkout/src python benchmarks/parity.py --out /tmp/before
    python benchmarks/parity.py --compare /tmp/before /tmp/after     # exit 1 on any difference

The tiny pipelines are built by ``tests/models/conftest.py`` (random weights, nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("perf/", "eval/perf")  # keys that measure time: never compared


def _runs(work: Path) -> dict[str, list[str]]:
    sys.path[:0] = [str(ROOT / "tests" / "models"), str(ROOT / "tests")]
    from conftest import (
        bagel_overrides,
        hf_overrides,
        qwen_overrides,
        sd3_overrides,
        tiny_bagel_dir,
        tiny_flux2_dir,
        tiny_qwenimage_dir,
    )

    prompts = work / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a red circle", "two blue squares")))
    small = ["task.kind=prompts", f"task.prompts={prompts}", "rewards=[{name: 'parity_reward:brightness'}]",
             "algo.prompts_per_step=2", "algo.group_size=2", "algo.trajectories_per_minibatch=2",
             "algo.micro_batch_trajectories=2", "sampler.num_steps=4", "sampler.window_range=[0,3]",
             "sampler.window_size=2", "sampler.shift=3.0", "sampler.eval_num_steps=2", "eval.num_prompts=2",
             "eval.grid_prompts=2", "text.max_reasoning_tokens=6", "threads=1", "optim.lr_text=1e-3",
             "optim.lr_image=1e-3", "steps=1", "algo.c_mse=0.5"]
    return {
        "tiny": ["builtin:unigrpo", "steps=3", "algo.prompts_per_step=4", "algo.group_size=4",
                 "algo.trajectories_per_minibatch=8", "algo.micro_batch_trajectories=4", "eval.num_prompts=16",
                 "eval_every=0", "threads=1"],
        "flux2": [*hf_overrides(tiny_flux2_dir()), *small],
        "qwenimage": [*qwen_overrides(tiny_qwenimage_dir()), *small],
        "sd3": [*sd3_overrides(), *small],
        "bagel": [*bagel_overrides(tiny_bagel_dir()), *small],
    }


def run(out: Path, only: list[str] | None) -> None:
    from unigrpo.cli import main

    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(tempfile.mkdtemp(prefix="unigrpo_parity_"))
    (work / "parity_reward.py").write_text(
        "def brightness(images, prompts, metadata):\n    return images.float().mean(dim=(1, 2, 3))\n")
    sys.path.insert(0, str(work))
    for name, args in _runs(work).items():
        if only and name not in only:
            continue
        code = main(["train", *args, f"output_dir={out / name}", "--overwrite"])
        print(f"{name}: exit {code}", flush=True)


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING) and not k.endswith("_s")} for r in rows]


def compare(a: Path, b: Path) -> int:
    import torch
    from safetensors.torch import load_file

    bad = 0
    for run_a in sorted(p for p in a.iterdir() if p.is_dir()):
        run_b = b / run_a.name
        ma, mb = _metrics(run_a / "metrics.jsonl"), _metrics(run_b / "metrics.jsonl")
        diffs = [(i, k, ra.get(k), rb.get(k)) for i, (ra, rb) in enumerate(zip(ma, mb))
                 for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
        if len(ma) != len(mb):
            diffs.append(("rows", "", len(ma), len(mb)))
        wa, wb = load_file(str(run_a / "final.safetensors")), load_file(str(run_b / "final.safetensors"))
        wdiff = sorted(set(wa) ^ set(wb)) + [k for k in sorted(set(wa) & set(wb)) if not torch.equal(wa[k], wb[k])]
        status = "identical" if not diffs and not wdiff else "DIFFERENT"
        print(f"{run_a.name}: {len(ma)} metric rows, {len(wa)} tensors: {status}")
        for d in diffs[:10]:
            print("   metric", d)
        for k in wdiff[:10]:
            print("   tensor", k)
        bad += status != "identical"
    return int(bad > 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the runs here")
    p.add_argument("--only", nargs="*", help="run only these (tiny flux2 qwenimage sd3 bagel)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args.out, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
