"""Tasks: where the prompts come from, and what an evaluation reports (``task.kind``).

A task is a prompt source (a deterministic training stream and a fixed evaluation set, each prompt
with its metadata) plus an evaluator. The training loop only asks a task for ``train_prompts`` and
``evaluate``; the rewards receive each prompt's metadata, to which the loop adds
``"reasoning"`` (the sampled reasoning text), ``"prompt_index"`` (the prompt's index in the step,
shared by its group) and ``"group_index"`` (0 .. G-1).

- ``shapes``: the built-in shapes world (``unigrpo.world``): generated prompts with held-out
  splits; the evaluator reports strict accuracy overall, per category, and whether the sampled
  description was right (``eval/reasoning_ok``). Its metadata is ``Task.to_metadata()`` with the
  ground-truth reasoning under ``"target_reasoning"``.
- ``prompts``: JSONL files (``task.prompts``, ``task.eval_prompts``), one object per line with at
  least ``"prompt"``; every other field is passed through (GenEval's ``evaluation_metadata.jsonl``
  loads as it is). The evaluator reports the configured rewards on the evaluation prompts, overall
  and per ``"tag"`` / ``"category"`` field when the lines have one.

Add a task: a class with the three methods below and an entry in ``TASKS``; its config section is a
dataclass with ``kind: Literal[...]`` in ``unigrpo.config`` (``TaskConfig``).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from unigrpo.config import Config, ConfigError
from unigrpo.recipes.evaluate import evaluate_model, generate_eval
from unigrpo.rollout import derive_seed
from unigrpo.sampling import Generation
from unigrpo.utils.images import save_grid
from unigrpo.world import image_stats, make_tasks

__all__ = ["RESERVED", "TASKS", "Prompt", "PromptsTask", "ShapesTask", "Task", "build_task", "load_prompt_file"]

RESERVED = ("reasoning", "prompt_index", "group_index")  # metadata keys the loop sets


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task: its text, its metadata and the images it refers to (the model input
    is built from it by ``UnifiedModel.encode``)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-like; handed to the rewards
    images: torch.Tensor | None = None  # [n, 3, H, W] in [0, 1]: the prompt's input images (None: none)


class Task(Protocol):
    def train_prompts(self, step: int, count: int) -> list[Prompt]:
        """The ``count`` training prompts of ``step`` (deterministic: data position step * count)."""

    def eval_prompts(self) -> list[Prompt]:
        """The evaluation prompts (fixed for the run)."""

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None) -> dict[str, float]:
        """``eval/*`` metrics of ``model`` on ``eval_prompts`` (+ a grid under ``out/grids``)."""


def write_eval_grid(gen: Generation, prompts: list[Prompt], cfg: Config, step: int, out: Path | None) -> None:
    """``grids/eval_stepN.png`` (numbered images) and ``.md`` (prompt -> sampled reasoning); none
    when ``out`` is None or ``eval.grid_prompts`` is 0."""
    n = min(cfg.eval.grid_prompts, len(prompts))
    if out is None or n == 0:  # eval.grid_prompts=0: no grid
        return
    save_grid(gen.images[:n], out / "grids" / f"eval_step{step:06d}.png", nrow=min(n, 8), scale=4,
              labels=[str(i) for i in range(n)])
    (out / "grids" / f"eval_step{step:06d}.md").write_text("".join(
        f"{i}. `{prompts[i].text}` -> `{gen.reasoning[i]}`\n" for i in range(n)))


def _image_metrics(images: torch.Tensor, group_size: int) -> dict[str, float]:
    """``rollout/*`` image statistics of a step's images [P * G, 3, H, W] (docs/metrics.md)."""
    from unigrpo.world import group_diversity

    groups = images.reshape(len(images) // group_size, group_size, *images.shape[1:])
    return {**{f"rollout/{k}": x for k, x in image_stats(images).items()},
            "rollout/group_diversity": group_diversity(groups)}


# ------------------------------------------------------------------------------------ shapes
@functools.lru_cache(maxsize=2)
def _shapes_pool(seed: int, epoch: int, size: int):
    return make_tasks("train", size, seed=derive_seed(seed, epoch) % 2**31)


def shapes_prompt(task) -> Prompt:
    meta = task.to_metadata()
    meta["target_reasoning"] = meta.pop("reasoning")  # "reasoning" is the SAMPLED text (RESERVED)
    return Prompt(task.prompt, meta)


SHAPES_EVAL_KEYS = ("accuracy", "score", "accuracy_direct", "accuracy_reasoning", "score_direct",
                    "score_reasoning", "count_ok", "shape_ok", "color_ok", "relation_ok", "n_extra",
                    "reasoning_ok", "reasoning_ok_direct", "reasoning_ok_reasoning",
                    "accuracy_given_reasoning_ok")


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
        e = self.cfg.eval
        return make_tasks(e.split, e.num_prompts, seed=e.seed)

    def eval_prompts(self) -> list[Prompt]:
        return [shapes_prompt(t) for t in self.eval_world_tasks()]

    def rollout_metrics(self, images: torch.Tensor, group_size: int) -> dict[str, float]:
        return _image_metrics(images, group_size)

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None) -> dict[str, float]:
        start = time.perf_counter()
        tasks = self.eval_world_tasks()
        res, gen = evaluate_model(model, tasks, cfg, "think" if cfg.eval.thinking else "no_think")
        write_eval_grid(gen, [shapes_prompt(t) for t in tasks], cfg, step, out)
        m = {f"eval/{k}": res[k] for k in SHAPES_EVAL_KEYS if k in res}  # reasoning_ok*: thinking on
        for cat, r in res["categories"].items():
            m.update({f"eval/category/{cat}/{k}": r[k] for k in ("accuracy", "score", "reasoning_ok") if k in r})
        m.update({f"eval/{k}": v for k, v in image_stats(gen.images).items()})
        m["perf/eval_s"] = time.perf_counter() - start
        return m


# ------------------------------------------------------------------------------------ prompts
def load_prompt_file(path: str | Path, key: str = "task.prompts") -> list[Prompt]:
    """JSONL -> prompts; blank lines are skipped. A bad file is one ConfigError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: prompt file not found: {p}")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{key}: {p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ConfigError(f"{where}: expected a JSON object with a non-empty \"prompt\" string")
        taken = [k for k in RESERVED if k in obj]
        if taken:
            raise ConfigError(f"{where}: field {taken[0]!r} is set by the training loop (the sampled "
                              f"reasoning / indices); rename it")
        meta = {k: v for k, v in obj.items() if k != "prompt"}
        prompts.append(Prompt(obj["prompt"], {**meta, "line": n}))
    if not prompts:
        raise ConfigError(f"{key}: {p} holds no prompts")
    return prompts


class PromptsTask:
    """Prompts from JSONL files: each data epoch is a new permutation of the training file (seeded
    by ``seed`` and the epoch); evaluation on the first ``eval.num_prompts`` evaluation prompts."""

    def __init__(self, cfg: Config):
        t = cfg.task
        self.seed, self.cfg, self.orders = cfg.seed, cfg, {}
        self.train = load_prompt_file(t.prompts)
        self.eval = self.train if t.eval_prompts is None else load_prompt_file(t.eval_prompts, "task.eval_prompts")

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self.orders:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch) % 2**63)
            self.orders = {epoch: torch.randperm(len(self.train), generator=g).tolist()}  # keep one epoch
        return self.orders[epoch]

    def train_prompts(self, step: int, count: int) -> list[Prompt]:
        n = len(self.train)
        return [self.train[self._order(i // n)[i % n]] for i in range(step * count, (step + 1) * count)]

    def eval_prompts(self) -> list[Prompt]:
        return self.eval[:self.cfg.eval.num_prompts]

    def rollout_metrics(self, images: torch.Tensor, group_size: int) -> dict[str, float]:
        return _image_metrics(images, group_size)

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None) -> dict[str, float]:
        start = time.perf_counter()
        prompts = self.eval_prompts()
        gen = generate_eval(model, [p.text for p in prompts], cfg, thinking=cfg.eval.thinking)
        meta = [{**p.metadata, "reasoning": gen.reasoning[i], "prompt_index": i, "group_index": 0}
                for i, p in enumerate(prompts)]
        res = rewards(gen.images, [p.text for p in prompts], meta)
        total, per_term = res.total, res.per_term
        write_eval_grid(gen, prompts, cfg, step, out)
        m = {} if res.missing else {"eval/reward": float(total.mean()),  # missing (on_failure: skip): none
                                    **{f"eval/reward/{k}": float(v.mean()) for k, v in per_term.items()}}
        cats = [str(p.metadata.get("tag", p.metadata.get("category", ""))) for p in prompts]
        for cat in [] if res.missing else sorted(set(cats) - {""}):
            sel = torch.tensor([c == cat for c in cats])
            m[f"eval/category/{cat}/reward"] = float(total[sel].mean())
        m.update({f"eval/{k}": v for k, v in image_stats(gen.images).items()})
        m["perf/eval_s"] = time.perf_counter() - start
        return m


TASKS: dict[str, type] = {"shapes": ShapesTask, "prompts": PromptsTask}


def build_task(cfg: Config) -> Task:
    """The task of ``cfg.task`` (prompt files are read and checked here)."""
    return TASKS[cfg.task.kind](cfg)
