"""The built-in "shapes" world: problems (prompts, reasoning, splits), renderer, reward, tokenizer.

See docs/world.md for the design (categories, held-out scheme, grammar, reward definition).
"""

from unigrpo.world.edit import (
    EditProblem,
    Placed,
    Scene,
    edit_categories,
    make_edit_problems,
    render_edit_pairs,
    render_scene,
    render_scenes,
    split_edit_response,
    wrong_edit_reasoning,
)
from unigrpo.world.render import render, render_batch
from unigrpo.world.reward import (
    ScoreResult,
    description_correct,
    evaluate_images,
    score_images,
    shapes_dense_reward,
    shapes_image_stats,
    shapes_reward,
)
from unigrpo.world.spec import ObjectGroup, Spec, describe, parse_description, split_response
from unigrpo.world.tasks import (
    Clue,
    ShapesProblem,
    all_categories,
    make_tasks,
    sample_task,
    wrong_reasoning,
)
from unigrpo.world.tokenizer import WordTokenizer, build_world_tokenizer

__all__ = ["Clue", "EditProblem", "ObjectGroup", "Placed", "Scene", "ScoreResult", "ShapesProblem", "Spec",
           "WordTokenizer", "all_categories", "build_world_tokenizer", "describe", "description_correct",
           "edit_categories", "evaluate_images", "make_edit_problems", "make_tasks", "parse_description",
           "render", "render_batch", "render_edit_pairs", "render_scene", "render_scenes", "sample_task", "score_images",
           "shapes_dense_reward", "shapes_image_stats", "shapes_reward", "split_edit_response",
           "split_response", "wrong_edit_reasoning", "wrong_reasoning"]
