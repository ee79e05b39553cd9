"""Reflections of the shapes world (world/refine.py): the detector's reading of a drawn image, the
exact grammar, drawing errors, and SFT examples whose verdict is the reward's strict check."""

import numpy as np
import pytest
import torch

from unigrpo.world import make_tasks, parse_description, render_batch, score_images
from unigrpo.world.knowledge import REFLECT_PROMPT
from unigrpo.world.refine import (
    NOTHING,
    UNREADABLE,
    drawing_error,
    parse_reflection,
    reflection,
    reflection_examples,
    seen_descriptions,
)
from unigrpo.world.tokenizer import build_world_tokenizer


@pytest.fixture(scope="module")
def problems():
    return make_tasks("train", 300, seed=3)


def kinds(spec):
    """The (shape, colour, count) groups of a spec, what SEEN can say (no relation, no order)."""
    return sorted((g.shape, g.color, g.count) for g in spec.groups)


def test_seen_reads_what_is_drawn(problems):
    images = render_batch([p.target for p in problems], seed=0)
    for p, seen in zip(problems, seen_descriptions(images)):
        spec = parse_description(seen)
        assert spec is not None and spec.relation is None and kinds(spec) == kinds(p.target), (p.prompt, seen)
        order = [(g.shape, g.color) for g in spec.groups]
        assert order == sorted(order, key=lambda k: (["circle", "square", "triangle"].index(k[0]),
                                                     ["red", "green", "blue", "yellow", "purple"].index(k[1])))


def test_seen_of_an_empty_and_of_an_unreadable_image():
    blank = torch.zeros(1, 3, 32, 32)
    grey = blank.clone()
    grey[:, :, 8:16, 8:16] = 0.8  # bright but off the palette: an object of no known colour
    many = render_batch([parse_description("four red squares")], seed=0)
    many[:, :, 0:3, 0:3] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # a fifth object (a blue blob)
    assert seen_descriptions(torch.cat([blank, grey, many])) == [NOTHING, UNREADABLE, UNREADABLE]


def test_reflection_grammar_round_trip():
    right = reflection("two blue squares", True, "two blue squares")
    wrong = reflection("a red circle", False, "a yellow circle")
    assert right == "<think> i see two blue squares . right . </think> done"
    assert wrong == "<think> i see a red circle . wrong . </think> a yellow circle"
    assert parse_reflection(wrong + " <eos> <pad>") == ("a red circle", "wrong", "a yellow circle")
    assert parse_reflection(right) == ("two blue squares", "right", "done")
    for bad in ("<think> i see a red circle . right . </think> a red circle",  # right must stop
                "<think> i see a red circle . wrong . </think> done",  # wrong must redraw
                "<think> a red circle . wrong . </think> a red square", "a red circle", ""):
        assert parse_reflection(bad) is None, bad


def test_a_drawing_error_is_a_different_valid_spec_that_fails_the_strict_check(problems):
    rng = np.random.default_rng(0)
    errors = [drawing_error(p.target, rng) for p in problems]
    assert all(e != p.target for e, p in zip(errors, problems))
    images = render_batch(errors, seed=1)
    assert not score_images(images, [p.target for p in problems]).correct.any()
    changed = {("relation" if e.relation != p.target.relation else
                "count" if sum(g.count for g in e.groups) != sum(g.count for g in p.target.groups) else "kind")
               for e, p in zip(errors, problems)}
    assert changed == {"relation", "count", "kind"}


def test_reflection_examples_say_done_exactly_when_the_image_is_right(problems):
    ex = reflection_examples(problems, seed=5)
    again = reflection_examples(problems, seed=5)
    assert [e.response for e in ex] == [e.response for e in again]  # deterministic
    assert all(torch.equal(a.image, b.image) for a, b in zip(ex, again))
    right = score_images(torch.stack([e.image for e in ex]), [e.problem.spec for e in ex]).correct
    parsed = [parse_reflection(e.response) for e in ex]
    assert all(p is not None for p in parsed)
    assert [p[2] == "done" for p in parsed] == right.tolist()
    assert all(p[2] == "done" or parse_description(p[2]) == e.problem.target for p, e in zip(parsed, ex))
    assert 0.3 < right.mean() < 0.8  # both kinds, in about the default mix
    # SEEN is the detector's reading of the example's own image
    assert [p[0] for p in parsed] == seen_descriptions(torch.stack([e.image for e in ex]))
    tok = build_world_tokenizer()
    for e in ex:  # the world's words only, and the context ends with the reflection turn
        assert tok.unk_id not in tok.encode(e.context + " " + e.response)
        assert e.context.endswith(" <eos> " + REFLECT_PROMPT) and e.context.startswith(e.problem.prompt + " <think>")


def test_the_verdict_reward_pays_a_reflection_whose_verdict_is_the_strict_check():
    """Hand-made rows: a right and a wrong image (the renderer's, the prompt's spec and a drawing
    error), each with a "right" and a "wrong" reflection, an off-grammar one, round 1 and a row that
    had stopped: 1 exactly where the verdict matches the image."""
    from unigrpo.rewards import resolve_reward
    from unigrpo.world import Spec
    from unigrpo.world.refine import drawing_error, reflection

    spec = Spec.from_dict(make_tasks("train", 1, seed=3)[0].to_metadata()["spec"])
    wrong_spec = drawing_error(spec, np.random.default_rng(0))
    good, bad = render_batch([spec, wrong_spec], seed=1)
    meta = {"spec": spec.to_dict()}
    rows = [({"round": 1, "previous_image": good, "reflection": reflection("x", True, "")}, 1.0),
            ({"round": 1, "previous_image": good, "reflection": reflection("x", False, "a red circle")}, 0.0),
            ({"round": 1, "previous_image": bad, "reflection": reflection("x", False, "a red circle")}, 1.0),
            ({"round": 1, "previous_image": bad, "reflection": reflection("x", True, "")}, 0.0),
            ({"round": 1, "previous_image": bad, "reflection": "<think> i see . </think> done"}, 0.0),
            ({"round": 0}, 0.0),
            ({"round": 1, "previous_image": good, "reflection": ""}, 0.0)]
    reward = resolve_reward("shapes_verdict")
    got = reward(torch.zeros(len(rows), 3, 32, 32), [""] * len(rows), [{**meta, **m} for m, _ in rows])
    assert got.tolist() == [want for _, want in rows]
