"""``task.kind: shapes_edit``: the shapes world's edits as a task, and their evaluation.

Each prompt is an instruction ("make the circle blue") with the rendered input scene as its image
(``Prompt.images`` [1, 3, S, S], S = ``task.image_size``); its metadata is
``world.EditProblem.to_metadata()`` (the ground-truth response under ``target_reasoning``), which
is all the ``shapes_edit`` reward reads. Training problems stream from pools of generated ones (a
new seed per data epoch); the evaluation draws one image per held-out problem with the
deterministic ODE and scores it strictly (``world.edit_reward.evaluate_edits``): overall, per
category, reasoning-required separated, the rate of untouched objects preserved, and with thinking
on, whether the model saw the input right (``seen_ok``: its "i see ..." names the input's objects)
and described the result right (``description_ok``). Modes as for ``shapes``: ``think``,
``no_think``, ``gt`` (ground-truth reasoning given). Grids show input | output pairs.
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
from unigrpo.tasks.base import Prompt, check_prompts, generate_eval, rollout_image_metrics
from unigrpo.tasks.shapes import MODES, format_table
from unigrpo.utils.images import pairs, save_grid
from unigrpo.world import shapes_image_stats
from unigrpo.world.edit import (
    DEFAULT_WEIGHTS,
    DESCRIBE,
    EditProblem,
    make_edit_problems,
    render_scenes,
)
from unigrpo.world.edit_reward import evaluate_edits

EDIT_EVAL_KEYS = ("accuracy", "score", "preserved", "accuracy_direct", "accuracy_reasoning", "score_direct",
                  "score_reasoning", "preserved_direct", "preserved_reasoning", "n_extra", "seen_ok",
                  "description_ok", "description_ok_reasoning", "accuracy_given_description_ok")


def _weights(describe_weight: float) -> dict[str, float]:
    return {**DEFAULT_WEIGHTS, DESCRIBE: describe_weight} if describe_weight > 0 else DEFAULT_WEIGHTS


@functools.lru_cache(maxsize=2)
def _edit_pool(seed: int, epoch: int, size: int, describe_weight: float) -> list[EditProblem]:
    return make_edit_problems("train", size, seed=derive_seed(seed, epoch) % 2**31,
                              weights=_weights(describe_weight))


def edit_prompt(problem: EditProblem, image: torch.Tensor) -> Prompt:
    """The instruction, the problem as metadata, and ``image`` [3, S, S] (the rendered input, also
    ``metadata["input_images"]`` for the rewards, as for a prompt file's images)."""
    return Prompt(problem.instruction, problem.to_metadata()).with_images(image[None])


def edit_prompts(problems: list[EditProblem], seed: int, size: int) -> list[Prompt]:
    """Prompts of ``problems`` with their inputs rendered at ``size`` px, deterministic for ``seed``."""
    if not problems:
        return []
    images = render_scenes([p.source for p in problems], seed=seed, size=size)  # [B, 3, S, S]
    return [edit_prompt(p, x) for p, x in zip(problems, images)]


def evaluate_model(model, prompts: list[Prompt], cfg: Config, mode: str = "think",
                   cfg_scale: float | None = None) -> tuple[dict, Generation]:
    """Generate one image per edit prompt and score it. Returns (metrics dict, Generation)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    given = [p.metadata["target_reasoning"] for p in prompts] if mode == "gt" else None
    gen = generate_eval(model, prompts, cfg, thinking=mode != "no_think", reasoning=given, cfg_scale=cfg_scale)
    metas = [p.metadata for p in prompts]
    return evaluate_edits(gen.images, metas, responses=gen.reasoning if mode == "think" else None), gen


class ShapesEditTask:
    """The shapes world's edits: a stream over pools of ``task.prompt_pool`` generated training
    problems (a new seed per data epoch); evaluation on ``eval.num_prompts`` of ``eval.split``."""

    def __init__(self, cfg: Config):
        t = cfg.task
        self.seed, self.pool, self.size, self.describe_weight, self.cfg = (
            cfg.seed, t.prompt_pool, t.image_size, t.describe_weight, cfg)

    def train_prompts(self, step: int, count: int) -> list[Prompt]:
        out = []
        for i in range(step * count, (step + 1) * count):
            epoch, k = divmod(i, self.pool)
            problem = _edit_pool(self.seed, epoch, self.pool, self.describe_weight)[k]
            image = render_scenes([problem.source], seed=derive_seed(self.seed, epoch, k), size=self.size)[0]
            out.append(edit_prompt(problem, image))
        return out

    def eval_prompts(self) -> list[Prompt]:
        e = self.cfg.eval
        problems = make_edit_problems(e.split, e.num_prompts, seed=e.seed, weights=_weights(self.describe_weight))
        return edit_prompts(problems, seed=e.seed, size=self.size)

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None) -> dict[str, float]:
        start = time.perf_counter()
        prompts = self.eval_prompts()
        res, gen = evaluate_model(model, prompts, cfg, "think" if cfg.eval.thinking else "no_think")
        if out is not None and cfg.eval.grid_prompts:
            write_pair_grid(out / "grids" / f"eval_step{step:06d}", prompts, gen, cfg.eval.grid_prompts)
        m = {f"eval/{k}": res[k] for k in EDIT_EVAL_KEYS if k in res}  # seen_ok, description_ok*: thinking on
        for cat, r in res["categories"].items():
            keys = ("accuracy", "score", "preserved", "seen_ok", "description_ok")
            m.update({f"eval/category/{cat}/{k}": r[k] for k in keys if k in r})
        m.update({f"eval/{k}": v for k, v in shapes_image_stats(gen.images).items()})
        m["perf/eval_s"] = time.perf_counter() - start
        return m

    def report(self, model, cfg: Config, mode: str, out: Path | None) -> str:
        """Strict edit accuracy, preserved rate and score tables of ``mode`` (or ``all`` three),
        and which expert fails; with ``out``, each mode's metrics JSON, pair grid and responses."""
        prompts = self.eval_prompts()
        results = {}
        for m in MODES if mode == "all" else (mode,):
            results[m], gen = evaluate_model(model, prompts, cfg, m)
            if out is not None:
                write_eval(Path(out), m, results[m], gen, prompts, cfg.eval.grid_prompts)
        lines = [(f"{cfg.eval.split} split, {len(prompts)} edit prompts, {cfg.sampler.eval_num_steps} ODE steps, "
                  f"CFG {cfg.sampler.eval_cfg_scale}; strict edit accuracy:"), format_table(results),
                 "untouched objects preserved:", format_table(results, metric="preserved"),
                 "mean partial-credit score:", format_table(results, metric="score")]
        if decomposition := format_decomposition(results):
            lines += ["what the text expert got right, and the image expert's accuracy where it did:", decomposition]
        return "\n".join(lines)

    def demo_evaluate(self, model, cfg: Config, out: Path, name: str) -> dict:
        """The demo's held-out evaluation, thinking on: the metrics (``evaluate_edits``'), with the
        input | output grid ``out/name.png`` and the responses ``out/name.md``."""
        prompts = self.eval_prompts()
        res, gen = evaluate_model(model, prompts, cfg, "think")
        write_eval(out, name, res, gen, prompts, cfg.eval.grid_prompts)
        return res

    @staticmethod
    def demo_tables(results: dict[str, dict]) -> list[tuple[str, str]]:
        """The demo report's sections (title, markdown) comparing ``results`` (name -> metrics)."""
        return [("Strict edit accuracy (the edit right, in place, nothing else changed)", format_table(results)),
                ("Untouched objects preserved", format_table(results, metric="preserved")),
                ("Mean partial-credit score", format_table(results, metric="score")),
                ("Text expert vs image expert", "The input is seen right when the response's `i see ...` names "
                 "its objects; the result is described right when its description, drawn exactly, passes the "
                 "strict check.\n\n" + format_decomposition(results))]

    def check(self, model, cfg: Config) -> None:
        """The model reads images of ``task.image_size``, and the evaluation prompts (and the
        generator's longest instruction) fit its words and context with ``text.max_reasoning_tokens``."""
        from unigrpo.utils.errors import InputError

        if model.input_image_size != (self.size, self.size):
            raise InputError(f"task.image_size={self.size}: the model reads {model.input_image_size} input images "
                             "(set task.image_size to the model's image size)")
        prompts = self.eval_prompts()
        check_prompts(model, prompts, cfg.text.max_reasoning_tokens,
                      lambda p: f"task.kind=shapes_edit, prompt {p.text!r}")

    def rollout_metrics(self, images: torch.Tensor, group_size: int) -> dict[str, float]:
        return rollout_image_metrics(shapes_image_stats(images), images, group_size)


def format_decomposition(results: dict[str, dict]) -> str:
    """Markdown table, rows with thinking on: the input seen right, the result described right
    (overall and reasoning-required), and the accuracy where the description was right. Empty
    string when no row has them."""
    rows = [(name, r) for name, r in results.items() if "description_ok" in r]
    if not rows:
        return ""
    head = ("| | accuracy | input seen right | result described right (text expert) | accuracy when described "
            "right (image expert) | described right, reasoning-required |\n|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {name} | {r['accuracy']:.3f} | {r['seen_ok']:.3f} | {r['description_ok']:.3f} | "
        f"{r['accuracy_given_description_ok']:.3f} | {r['description_ok_reasoning']:.3f} |\n" for name, r in rows)


def write_pair_grid(stem: Path, prompts: list[Prompt], gen: Generation, n: int) -> None:
    """``stem.png``: input | output pairs of the first ``n`` prompts, 4 pairs a row, numbered;
    ``stem.md``: each number's instruction -> sampled response."""
    n = min(n, len(prompts))
    if n == 0:
        return
    inputs = torch.cat([p.images for p in prompts[:n]])
    labels = [f"{i}{side}" for i in range(n) for side in (" in", "")]
    save_grid(pairs(inputs, gen.images[:n]), stem.with_suffix(".png"), nrow=2 * min(n, 4), scale=4, labels=labels)
    stem.with_suffix(".md").write_text("".join(
        f"{i}. `{prompts[i].text}` -> `{gen.reasoning[i]}`\n" for i in range(n)))


def write_eval(out: Path, name: str, metrics: dict, gen: Generation, prompts: list[Prompt], grid_prompts: int) -> None:
    """metrics JSON + an input | output grid + the sampled responses of the first prompts."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(metrics, indent=2))
    write_pair_grid(out / name, prompts, gen, grid_prompts)
