"""The reflection mixture of the tiny model's SFT (``pretrain.reflect_frac``): second-round samples in
the rollout's layout (prompt, first response, the reflection turn; the drawn image as input), and a
reduced run through the real CLI."""

import numpy as np
import pytest
import torch
from conftest import MODEL

from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.models import build_model
from unigrpo.models.tiny import TinyUnifiedModel
from unigrpo.recipes.pretrain import make_batch, reflection_pool
from unigrpo.tasks import Prompt
from unigrpo.world import make_tasks
from unigrpo.world.refine import parse_reflection

SEEING = ["model.sees_images=true", "model.edits=true", "model.max_seq_len=80", "threads=1"]


def test_the_batch_mixes_reflections_in_the_rollouts_layout():
    cfg = load_config(None, [*MODEL, *SEEING, "model.checkpoint=null", "pretrain.batch_size=1000",
                             "pretrain.reflect_frac=0.3", "pretrain.edit_frac=0.2"])
    model = build_model(cfg, checkpoint=None)
    tasks = make_tasks("train", 300, seed=0)
    from unigrpo.world.edit import make_edit_problems

    edits = make_edit_problems("train", 100, seed=0)
    pool = reflection_pool(model, tasks, cfg)
    assert len(pool) == len(tasks)  # max_seq_len 80 holds every one
    prompts, responses, targets, modes = make_batch(tasks, np.random.default_rng(0), cfg, edits, [], pool)
    by_text = {}  # a context may recur (one prompt, several first images)
    for ex in pool:
        by_text.setdefault(ex.context, []).append(ex)
    refl = np.array([isinstance(p, Prompt) and p.text in by_text for p in prompts])
    assert abs(refl.mean() - 0.3) < 0.04
    for p, r, t, m in zip(prompts, responses, targets, modes):
        if isinstance(p, Prompt) and p.text in by_text:
            # the drawn image is the input the model sees and edits, with its own reflection and next image
            ex = next(e for e in by_text[p.text] if torch.equal(p.images[0], e.image) and r == e.response)
            assert parse_reflection(r) is not None and t == ex.next_spec and m == "full"
    # the sample's tokens are the rollout's round 2 without its pads: prompt, first response + <eos>, the turn
    ex = pool[0]
    ids = model.prompt_ids(ex.context)
    first = model.response_ids(ex.first_response)
    assert ids == model.prompt_ids(ex.problem.prompt) + first + model.reflection_ids()


def test_reflections_need_a_model_that_sees_and_room_for_them():
    with pytest.raises(ConfigError, match="pretrain.reflect_frac: reflections read the drawn image"):
        load_config(None, [*MODEL, "model.checkpoint=null", "pretrain.reflect_frac=0.2"])
    cfg = load_config(None, [*MODEL, *SEEING, "model.max_seq_len=24", "model.checkpoint=null",
                             "pretrain.reflect_frac=0.2", "text.max_reasoning_tokens=4"])
    with pytest.raises(ValueError, match="no reflection fits model.max_seq_len=24"):
        reflection_pool(build_model(cfg, checkpoint=None), make_tasks("train", 50, seed=0)[:5], cfg)


def test_pretrain_with_reflections_through_the_cli(tmp_path):
    out = tmp_path / "reflect.safetensors"
    assert main(["pretrain", *MODEL, *SEEING, "model.checkpoint=null", "pretrain.steps=2", "pretrain.batch_size=8",
                 "pretrain.reflect_frac=0.5", "--out", str(out)]) == 0
    model = TinyUnifiedModel.load(out)
    assert model.sees_images and model.cfg.max_seq_len == 80


def test_growing_into_a_longer_context_keeps_every_known_position():
    """``pretrain.init`` from a max_seq_len 64 model into 80 (room for a second round): the positions
    both have are copied, so on a one-round prompt the grown model computes what it grew from."""
    old = build_model(load_config(None, [*MODEL, "model.checkpoint=null"]), checkpoint=None)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    new = build_model(load_config(None, [*MODEL, *SEEING, "model.checkpoint=null"]), checkpoint=None)
    new.grow_from(old)
    assert torch.equal(new.text.pos.weight[:64], old.text.pos.weight)
    a, b = old.encode(["a red circle", "two blue squares"]), new.encode(["a red circle", "two blue squares"])
    la, _ = old.prefill(a)
    lb, _ = new.prefill(b)
    assert torch.allclose(la, lb[:, :la.shape[1]], atol=1e-6)
