"""What every task shares: the prompt type, the task protocol, evaluation sampling, the grid.

A task is a prompt source (a deterministic training stream and a fixed evaluation set, each prompt
with its metadata) plus what it knows about its images: how to evaluate a model on them and which
image statistics a run logs (``unigrpo.tasks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from unigrpo.config import Config
from unigrpo.sampling import Generation, generate
from unigrpo.utils.images import group_rms_distance, save_grid

# Every metadata key unigrpo itself adds: a prompt's own metadata may not carry one (refused when
# the prompt file is read), so what a reward reads under a user's name is always what the user wrote.
# "round", "previous_image", "reflection": multi-round episodes (algo.rounds > 1) score every round's image.
RESERVED = ("reasoning", "prompt_index", "group_index", "line", "input_images", "round", "previous_image",
            "reflection")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task: its text, its metadata and the images it refers to (the model input
    is built from it by ``UnifiedModel.encode``)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-like; handed to the rewards
    images: torch.Tensor | None = None  # [n, 3, H, W] in [0, 1]: the prompt's input images (None: none)
    image_files: tuple[str, ...] = ()  # where ``images`` are read from (a prompt file's "images" field)

    def with_images(self, images: torch.Tensor) -> Prompt:
        """This prompt with its input images [n, 3, H, W] (at the model's input size), which also
        reach the rewards as ``metadata["input_images"]`` (in process and over the wire)."""
        return Prompt(self.text, {**self.metadata, "input_images": images}, images, self.image_files)


class Task(Protocol):
    def train_prompts(self, step: int, count: int) -> list[Prompt]:
        """The ``count`` training prompts of ``step`` (deterministic: data position step * count)."""

    def eval_prompts(self) -> list[Prompt]:
        """The evaluation prompts (fixed for the run)."""

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None) -> dict[str, float]:
        """``eval/*`` metrics of ``model`` on ``eval_prompts`` (+ a grid under ``out/grids``)."""

    def report(self, model, cfg: Config, mode: str, out: Path | None) -> str:
        """``unigrpo eval --mode MODE``: evaluate ``model`` and return the text to print (files under ``out``)."""

    def rollout_metrics(self, images: torch.Tensor, group_size: int) -> dict[str, float]:
        """``rollout/*`` statistics of a step's images [P * G, 3, H, W] (groups contiguous)."""

    def check(self, model, cfg: Config) -> None:
        """InputError (one line naming the prompt) for a prompt ``model`` cannot read, or cannot fit
        with ``text.max_reasoning_tokens`` of reasoning: called before a run writes anything."""


def reward_metadata(meta: dict[str, Any], reasoning: str, prompt_index: int, group_index: int) -> dict[str, Any]:
    """What a reward sees of one episode: the prompt's ``meta`` as written plus the sampled
    ``reasoning``, ``prompt_index`` and ``group_index``. A ``meta`` that already holds one of these
    is a task's bug (a user's field would be overwritten): ValueError rather than a silent replace."""
    taken = [k for k in ("reasoning", "prompt_index", "group_index") if k in meta]
    if taken:
        raise ValueError(f"prompt metadata already holds {taken[0]!r}, which unigrpo sets for the rewards")
    return {**meta, "reasoning": reasoning, "prompt_index": prompt_index, "group_index": group_index}


def check_prompts(model, prompts: list[Prompt], max_new_tokens: int, where) -> None:
    """``model.validate_prompts`` over ``prompts``; the first refused one is an InputError
    ``where(prompt): why`` (``where`` names its file and line)."""
    from unigrpo.utils.errors import InputError

    try:
        model.validate_prompts([p.text for p in prompts], max_new_tokens)
        return
    except ValueError:
        pass
    for p in prompts:  # the batch failed: name the first prompt that does
        try:
            model.validate_prompts([p.text], max_new_tokens)
        except ValueError as e:
            raise InputError(f"{where(p)}: {e}") from None


def generate_eval(model, prompts: list, cfg: Config, thinking: bool, reasoning: list[str] | None = None,
                  cfg_scale: float | None = None) -> Generation:
    """Deterministic evaluation images of ``prompts`` (``Prompt`` or str): the ODE with ``sampler.eval_num_steps`` and
    ``sampler.eval_cfg_scale`` (unless ``cfg_scale``), noise and reasoning from ``eval.seed``."""
    s = cfg.sampler
    return generate(model, prompts, thinking=thinking, reasoning=reasoning, num_steps=s.eval_num_steps,
                    shift=s.shift, cfg_scale=s.eval_cfg_scale if cfg_scale is None else cfg_scale,
                    seed=cfg.eval.seed, max_new_tokens=cfg.text.max_reasoning_tokens,
                    temperature=cfg.text.temperature)


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


def rollout_image_metrics(stats: dict[str, float], images: torch.Tensor, group_size: int) -> dict[str, float]:
    """``rollout/<name>`` of each image statistic in ``stats`` + ``rollout/group_diversity`` (the
    mean RMS distance within a group) of ``images`` [P * G, 3, H, W]."""
    groups = images.reshape(images.shape[0] // group_size, group_size, *images.shape[1:])  # [P, G, 3, H, W]
    return {**{f"rollout/{k}": v for k, v in stats.items()}, "rollout/group_diversity": group_rms_distance(groups)}
