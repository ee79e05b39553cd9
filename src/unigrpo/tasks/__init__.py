"""Tasks: where the prompts come from, and what a task knows about its images (``task.kind``).

A task is a prompt source (a deterministic training stream and a fixed evaluation set, each prompt
with its metadata) plus what it knows about its images: the training loop asks a task for
``train_prompts``, ``evaluate`` (its ``eval/*`` metrics) and ``rollout_metrics`` (the image
statistics it logs as ``rollout/*``); ``unigrpo eval`` prints its ``report``. The rewards receive
each prompt's metadata, to which the loop adds ``"reasoning"`` (the sampled reasoning text),
``"prompt_index"`` (the prompt's index in the step, shared by its group) and ``"group_index"``
(0 .. G-1) (``reward_metadata``); a prompt file that sets one of these, or ``"line"``, is refused
(``RESERVED``): no user field is ever overwritten.

- ``shapes`` (``tasks/shapes.py``): the built-in shapes world (``unigrpo.world``): generated prompts
  with held-out splits; the evaluator reports strict accuracy overall, per category, and whether
  the sampled description was right (``eval/reasoning_ok``). Its metadata is
  ``world.ShapesProblem.to_metadata()`` with the ground-truth reasoning under ``"target_reasoning"``.
- ``shapes_edit`` (``tasks/shapes_edit.py``): the shapes world's edits: a rendered input scene (the
  prompt's image) + an instruction; the evaluator reports strict edit accuracy per category, the
  rate of untouched objects preserved and whether the model saw the input right. Its metadata is
  ``world.EditProblem.to_metadata()`` (ground truth under ``"target_reasoning"``); it needs a model
  that ``sees_images`` and ``edits``.
- ``shapes_refine`` (``tasks/shapes_refine.py``): the shapes prompts in multi-round episodes
  (``algo.rounds``; later rounds reflect on the image drawn before), evaluated round by round.
- ``prompts`` (``tasks/prompts.py``): JSONL files (``task.prompts``, ``task.eval_prompts``), one
  object per line with at least ``"prompt"``; every other field is passed through. The evaluator
  reports the configured rewards on the evaluation prompts, overall and per ``"tag"`` /
  ``"category"``.

Add a task: a module with a class of the ``Task`` protocol (``tasks/base.py``) and an entry in
``TASKS``; its config section is a dataclass with ``kind: Literal[...]`` and ``check(cfg)`` in the
``TaskConfig`` union of ``unigrpo.config``.
"""

from __future__ import annotations

from unigrpo.config import Config
from unigrpo.tasks.base import (
    RESERVED,
    Prompt,
    Task,
    generate_eval,
    reward_metadata,
    write_eval_grid,
)
from unigrpo.tasks.prompts import PromptsTask, load_prompt_file
from unigrpo.tasks.shapes import ShapesTask
from unigrpo.tasks.shapes_edit import ShapesEditTask
from unigrpo.tasks.shapes_refine import ShapesRefineTask

__all__ = ["RESERVED", "TASKS", "Prompt", "PromptsTask", "ShapesEditTask", "ShapesRefineTask", "ShapesTask", "Task",
           "build_task", "generate_eval", "load_prompt_file", "reward_metadata", "write_eval_grid"]

TASKS: dict[str, type] = {"shapes": ShapesTask, "prompts": PromptsTask, "shapes_edit": ShapesEditTask,
                          "shapes_refine": ShapesRefineTask}


def build_task(cfg: Config) -> Task:
    """The task of ``cfg.task`` (prompt files are read and checked here)."""
    return TASKS[cfg.task.kind](cfg)
