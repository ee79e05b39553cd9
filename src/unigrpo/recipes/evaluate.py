"""Evaluation of a unified model on a held-out split: overall and per-category accuracy.

Three modes, as in the paper's Table 2: ``think`` (the model's own reasoning), ``no_think``
(image from the prompt alone), ``gt`` (ground-truth reasoning given: how well the image expert
follows an explicit description). Images are drawn with the deterministic ODE.
"""

from __future__ import annotations

import json
from pathlib import Path

from unigrpo.config import Config
from unigrpo.sampling import Generation, generate
from unigrpo.utils.images import save_grid
from unigrpo.world import evaluate_images, make_tasks

MODES = ("think", "no_think", "gt")


def eval_tasks(cfg: Config, num_prompts: int | None = None):
    """The evaluation prompts: deterministic for ``cfg.eval.seed``."""
    return make_tasks(cfg.eval.split, num_prompts or cfg.eval.num_prompts, seed=cfg.eval.seed)


def generate_eval(model, prompts: list[str], cfg: Config, thinking: bool, reasoning: list[str] | None = None,
                  cfg_scale: float | None = None) -> Generation:
    """Deterministic evaluation images of ``prompts``: the ODE with ``sampler.eval_num_steps`` and
    ``sampler.eval_cfg_scale`` (unless ``cfg_scale``), noise and reasoning from ``eval.seed``."""
    s = cfg.sampler
    return generate(model, prompts, thinking=thinking, reasoning=reasoning, num_steps=s.eval_num_steps,
                    shift=s.shift, cfg_scale=s.eval_cfg_scale if cfg_scale is None else cfg_scale,
                    seed=cfg.eval.seed, max_new_tokens=cfg.text.max_reasoning_tokens,
                    temperature=cfg.text.temperature)


def evaluate_model(model, tasks, cfg: Config, mode: str = "think", cfg_scale: float | None = None):
    """Generate one image per task and score it. Returns (metrics dict, Generation)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gen = generate_eval(model, [t.prompt for t in tasks], cfg, thinking=mode != "no_think",
                        reasoning=[t.reasoning for t in tasks] if mode == "gt" else None, cfg_scale=cfg_scale)
    metrics = evaluate_images(gen.images, tasks, responses=gen.reasoning if mode == "think" else None)
    return metrics, gen


def format_table(results: dict[str, dict], metric: str = "accuracy") -> str:
    """Markdown table: one row per result, overall + per-category columns."""
    cats = list(dict.fromkeys(c for r in results.values() for c in r["categories"]))
    head = ("| | overall | direct | reasoning-required | " + " | ".join(cats) + " |\n|---|---|---|---|"
            + "---|" * len(cats) + "\n")
    rows = []
    for name, r in results.items():
        cells = [f"{r['categories'][c][metric]:.3f}" if c in r["categories"] else "-" for c in cats]
        rows.append(f"| {name} | **{r[metric]:.3f}** | {r[metric + '_direct']:.3f} | "
                    f"{r[metric + '_reasoning']:.3f} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def format_decomposition(results: dict[str, dict]) -> str:
    """Markdown table splitting accuracy into the text expert's and the image expert's part.

    Rows with thinking on only: ``reasoning_ok`` (the sampled description is right) and
    ``accuracy_given_reasoning_ok`` (the image is right when the description is), overall and on
    reasoning-required prompts. Empty string when no row has them.
    """
    rows = [(name, r) for name, r in results.items() if "reasoning_ok" in r]
    if not rows:
        return ""
    head = ("| | accuracy | description right (text expert) | accuracy when the description is right "
            "(image expert) | description right, reasoning-required |\n|---|---|---|---|---|\n")
    return head + "".join(
        f"| {name} | {r['accuracy']:.3f} | {r['reasoning_ok']:.3f} | {r['accuracy_given_reasoning_ok']:.3f} "
        f"| {r['reasoning_ok_reasoning']:.3f} |\n" for name, r in rows)


def write_eval(out_dir: str | Path, name: str, metrics: dict, gen: Generation, tasks, grid_prompts: int = 16):
    """metrics JSON + an image grid + the sampled reasoning of the first prompts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(metrics, indent=2))
    n = min(grid_prompts, len(tasks))
    if n:  # grid_prompts=0: metrics only
        save_grid(gen.images[:n], out / f"{name}.png", nrow=8)
    with open(out / f"{name}_samples.md", "w") as f:
        f.writelines(f"{i}. prompt: `{tasks[i].prompt}`  \n   reasoning: `{gen.reasoning[i]}`\n" for i in range(n))
