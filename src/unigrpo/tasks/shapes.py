"""``task.kind: shapes``: the built-in shapes world as a task, and its evaluation.

Training prompts stream from pools of generated tasks (a new seed per data epoch); the evaluation
draws one image per held-out prompt with the deterministic ODE and scores it strictly (overall, per
category, and whether the sampled description was right). Three modes, as in the paper's Table 2:
``think`` (the model's own reasoning), ``no_think`` (image from the prompt alone), ``gt``
(ground-truth reasoning given: how well the image expert follows an explicit description).
``unigrpo eval``, ``unigrpo pretrain --eval`` and the demo print these tables; the training loop
logs ``evaluate``'s metrics. The world's own image statistic (off-palette pixels,
``world.shapes_image_stats``) is logged by this task only.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch

from unigrpo.config import Config
from unigrpo.rollout import derive_seed
from unigrpo.sampling import Generation
from unigrpo.tasks.base import Prompt, generate_eval, rollout_image_metrics, write_eval_grid
from unigrpo.utils.images import save_grid
from unigrpo.world import evaluate_images, make_tasks, shapes_image_stats

MODES = ("think", "no_think", "gt")
SHAPES_EVAL_KEYS = ("accuracy", "score", "accuracy_direct", "accuracy_reasoning", "score_direct",
                    "score_reasoning", "count_ok", "shape_ok", "color_ok", "relation_ok", "n_extra",
                    "reasoning_ok", "reasoning_ok_direct", "reasoning_ok_reasoning",
                    "accuracy_given_reasoning_ok")


@functools.lru_cache(maxsize=2)
def _shapes_pool(seed: int, epoch: int, size: int):
    return make_tasks("train", size, seed=derive_seed(seed, epoch) % 2**31)


def shapes_prompt(task) -> Prompt:
    meta = task.to_metadata()
    meta["target_reasoning"] = meta.pop("reasoning")  # "reasoning" is the SAMPLED text (RESERVED)
    return Prompt(task.prompt, meta)


def eval_tasks(cfg: Config, num_prompts: int | None = None):
    """The evaluation prompts: deterministic for ``cfg.eval.seed``."""
    return make_tasks(cfg.eval.split, num_prompts or cfg.eval.num_prompts, seed=cfg.eval.seed)


def evaluate_model(model, tasks, cfg: Config, mode: str = "think", cfg_scale: float | None = None):
    """Generate one image per task and score it. Returns (metrics dict, Generation)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gen = generate_eval(model, [t.prompt for t in tasks], cfg, thinking=mode != "no_think",
                        reasoning=[t.reasoning for t in tasks] if mode == "gt" else None, cfg_scale=cfg_scale)
    metrics = evaluate_images(gen.images, tasks, responses=gen.reasoning if mode == "think" else None)
    return metrics, gen


class ShapesTask:
    """The built-in shapes world: a stream over pools of ``task.prompt_pool`` generated training
    prompts (a new seed per data epoch); evaluation on ``eval.num_prompts`` of ``eval.split``."""

    def __init__(self, cfg: Config):
        self.seed, self.pool, self.cfg = cfg.seed, cfg.task.prompt_pool, cfg

    def world_tasks(self, step: int, count: int) -> list:
        return [_shapes_pool(self.seed, i // self.pool, self.pool)[i % self.pool]
                for i in range(step * count, (step + 1) * count)]

    def train_prompts(self, step: int, count: int) -> list[Prompt]:
        return [shapes_prompt(t) for t in self.world_tasks(step, count)]

    def eval_world_tasks(self) -> list:
        return eval_tasks(self.cfg)

    def eval_prompts(self) -> list[Prompt]:
        return [shapes_prompt(t) for t in self.eval_world_tasks()]

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None) -> dict[str, float]:
        start = time.perf_counter()
        tasks = self.eval_world_tasks()
        res, gen = evaluate_model(model, tasks, cfg, "think" if cfg.eval.thinking else "no_think")
        write_eval_grid(gen, [shapes_prompt(t) for t in tasks], cfg, step, out)
        m = {f"eval/{k}": res[k] for k in SHAPES_EVAL_KEYS if k in res}  # reasoning_ok*: thinking on
        for cat, r in res["categories"].items():
            m.update({f"eval/category/{cat}/{k}": r[k] for k in ("accuracy", "score", "reasoning_ok") if k in r})
        m.update({f"eval/{k}": v for k, v in shapes_image_stats(gen.images).items()})
        m["perf/eval_s"] = time.perf_counter() - start
        return m

    def report(self, model, cfg: Config, mode: str, out: Path | None) -> str:
        """Strict accuracy and partial-credit score tables of ``mode`` (or ``all`` three), and which
        expert fails; with ``out``, each mode's metrics JSON, grid and sampled reasoning."""
        tasks = self.eval_world_tasks()
        results = {}
        for m in MODES if mode == "all" else (mode,):
            results[m], gen = evaluate_model(model, tasks, cfg, m)
            if out is not None:
                write_eval(out, m, results[m], gen, tasks, cfg.eval.grid_prompts)
        lines = [(f"{cfg.eval.split} split, {len(tasks)} prompts, {cfg.sampler.eval_num_steps} ODE steps, "
                 f"CFG {cfg.sampler.eval_cfg_scale}; strict accuracy:"), format_table(results),
                 "mean partial-credit score:", format_table(results, metric="score")]
        if decomposition := format_decomposition(results):
            lines += [("which expert fails (a sampled description is right when, drawn exactly, it passes the "
                      "strict check):"), decomposition]
        return "\n".join(lines)

    def demo_evaluate(self, model, cfg: Config, out: Path, name: str) -> dict:
        """The demo's held-out evaluation, thinking on: the metrics (``evaluate_images``'), with the
        grid ``out/name.png`` and the sampled reasoning ``out/name_samples.md``."""
        tasks = self.eval_world_tasks()
        res, gen = evaluate_model(model, tasks, cfg, "think")
        write_eval(out, name, res, gen, tasks, cfg.eval.grid_prompts)
        return res

    @staticmethod
    def demo_tables(results: dict[str, dict]) -> list[tuple[str, str]]:
        """The demo report's sections (title, markdown) comparing ``results`` (name -> metrics)."""
        return [("Strict accuracy (GenEval-style: everything right)", format_table(results)),
                ("Mean partial-credit score", format_table(results, metric="score")),
                ("Text expert vs image expert", "A sampled description is right when, drawn exactly by the "
                 "ground-truth renderer, it passes the strict check.\n\n" + format_decomposition(results))]

    def check(self, model, cfg: Config) -> None:
        """Nothing to check: the world's prompts are in the tiny model's words, and ``tiny_config``
        checks their length against ``model.max_seq_len``."""

    def rollout_metrics(self, images: torch.Tensor, group_size: int) -> dict[str, float]:
        return rollout_image_metrics(shapes_image_stats(images), images, group_size)


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
