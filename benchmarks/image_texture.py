"""Texture the reward does not see: `high_freq` (world.shapes_image_stats) of evaluation images per checkpoint.

    python benchmarks/image_texture.py builtin:sft runs/long/weights_step150.safetensors ...

Same 64 test prompts and noise for every checkpoint (builtin:demo: 20 ODE steps, thinking on).
Prints one line per checkpoint and writes benchmarks/results/image_texture.json.
"""

import json
import sys
from pathlib import Path

import torch

from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.tasks.shapes import eval_tasks, evaluate_model
from unigrpo.world import shapes_image_stats


def main(checkpoints: list[str]) -> None:
    torch.set_num_threads(2)
    cfg = load_config("builtin:demo", ["eval.num_prompts=64"])
    tasks = eval_tasks(cfg)
    out = {}
    for path in checkpoints:
        model = build_model(cfg, checkpoint=path)
        metrics, gen = evaluate_model(model, tasks, cfg, "think")
        out[path] = {**shapes_image_stats(gen.images), "accuracy": metrics["accuracy"]}
        print(f"{path}: high_freq {out[path]['high_freq']:.4f}  accuracy {metrics['accuracy']:.3f}")
    Path("benchmarks/results/image_texture.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:] or ["builtin:sft"])
