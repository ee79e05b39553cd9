import json
from collections import Counter

import numpy as np
import pytest

from unigrpo.world import (
    ObjectGroup,
    ShapesProblem,
    Spec,
    all_categories,
    describe,
    make_tasks,
    parse_description,
    split_response,
    wrong_reasoning,
)
from unigrpo.world import knowledge as K
from unigrpo.world.tasks import DIRECT, REASONING

HELD_OUT = ("colors", "position", "color_attr", *REASONING)


def test_make_tasks_is_deterministic_and_seeded():
    a, b = make_tasks("train", 200, seed=3), make_tasks("train", 200, seed=3)
    assert a == b
    assert make_tasks("train", 200, seed=4) != a
    assert [t.prompt for t in make_tasks("val", 50, seed=3)] != [t.prompt for t in a[:50]]


def test_categories_are_balanced_and_weights_work():
    counts = Counter(t.category for t in make_tasks("val", 100, seed=0))
    assert counts == {c: 10 for c in all_categories()}
    only = make_tasks("train", 30, seed=0, weights={"colors": 2.0, "reason_count": 1.0})
    assert Counter(t.category for t in only) == {"colors": 20, "reason_count": 10}
    with pytest.raises(ValueError):
        make_tasks("train", 5, weights={"nope": 1.0})
    with pytest.raises(ValueError):
        make_tasks("dev", 5)


def test_task_fields_are_consistent(all_tasks):
    for t in all_tasks:
        assert t.requires_reasoning == (t.category in REASONING)
        assert t.requires_reasoning == bool(t.clues)
        _, desc = split_response(t.reasoning)
        assert desc == t.description == describe(t.target)
        assert t.reasoning.startswith("<think> ") and " </think> " in t.reasoning
        assert len(t.reasoning.split()) <= 24 and len(t.prompt.split()) <= 18
        assert t.target.concrete
        for g, h in zip(t.spec.groups, t.target.groups):  # target only fills free colours
            assert (g.shape, g.count) == (h.shape, h.count) and g.color in (None, h.color)
        if t.category in DIRECT:
            assert t.prompt == describe(t.spec)
    assert {t.category for t in all_tasks} == set(all_categories())


def test_knowledge_facts_in_reasoning_are_true(all_tasks):
    for t in (t for t in all_tasks if t.clues):
        think, _ = split_response(t.reasoning)
        for c in t.clues:
            g = t.target.groups[c.group]
            if c.kind == "color":
                assert K.COLOR_ITEMS[c.item] == g.color and K.color_fact(c.item, g.color) in think
            elif c.kind == "shape":
                assert K.SHAPE_ITEMS[c.item] == g.shape and K.shape_fact(c.item, g.shape) in think
            else:
                assert (
                    K.COUNT_ITEMS[c.item][2] == g.count and K.count_fact(c.item, g.count) in think
                )
            assert c.item in t.prompt


def test_held_out_combinations_absent_from_train(split_tasks):
    train = split_tasks["train"]
    assert all(t.split in ("train", "all") for t in train)
    for cat in HELD_OUT:
        keys = {s: {t.key for t in ts if t.category == cat} for s, ts in split_tasks.items()}
        assert keys["val"] and keys["test"]
        assert not keys["train"] & (keys["val"] | keys["test"]), cat
        if cat != "colors":  # colors' 5 held-out prompts are shared by val and test
            assert not keys["val"] & keys["test"], cat
        prompts = {s: {t.prompt for t in ts if t.category == cat} for s, ts in split_tasks.items()}
        assert not prompts["train"] & (prompts["val"] | prompts["test"]), cat
    # Every word of the evaluation splits (and every knowledge item) is seen in training.
    words = {
        s: {w for t in ts for w in f"{t.prompt} {t.reasoning}".split()}
        for s, ts in split_tasks.items()
    }
    assert words["val"] <= words["train"] and words["test"] <= words["train"]
    seen_items = {c.item for t in train for c in t.clues}
    assert seen_items == set(K.COLOR_ITEMS) | set(K.SHAPE_ITEMS) | set(K.COUNT_ITEMS)


def test_reason_color_holds_out_item_shape_pairs(split_tasks):
    def pairs(split):
        return {
            (c.item, t.target.groups[c.group].shape)
            for t in split_tasks[split]
            if t.category == "reason_color"
            for c in t.clues
        }

    held = pairs("val") | pairs("test")
    assert held and not pairs("train") & held
    for item in K.COLOR_ITEMS:  # each colour item keeps two of its three shapes in training
        assert len({s for i, s in pairs("train") if i == item}) == 2


@pytest.mark.parametrize(
    "text",
    [
        "a yellow square",
        "three green circles",
        "a red circle left of a blue triangle",
        "a red circle and a blue square",
        "two circles and a square",
        "a triangle",
        "a red circle right of a red square",
        "four squares",
        "a circle below a square",
    ],
)
def test_describe_parse_round_trip(text):
    spec = parse_description(text)
    assert spec is not None and describe(spec) == text and parse_description(describe(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red",
        "red circle",
        "two red circle",
        "a red circles",
        "five circles",
        "a red circle left of",
        "a red circle and a red circle",
        "a circle and two red circles",
        "two circles left of a square",
        "a circle left of a square and a triangle",
        "a circle and a square left of a red circle",
        "three circles and two squares",
        "a circle , a square",
        "a pink circle",
    ],
)
def test_parse_rejects_invalid(text):
    assert parse_description(text) is None


def test_round_trips_on_generated_tasks(all_tasks):
    for t in all_tasks[::7]:
        assert parse_description(t.description) == t.target
        if t.category in DIRECT:
            assert parse_description(t.prompt) == t.spec
        meta = t.to_metadata()
        assert ShapesProblem.from_metadata(json.loads(json.dumps(meta))) == t
        assert Spec.from_dict(meta["spec"]) == t.spec


def test_spec_validation():
    with pytest.raises(ValueError):
        Spec((ObjectGroup("circle", "red", 3), ObjectGroup("square", "red", 2)))  # 5 objects
    with pytest.raises(ValueError):
        Spec((ObjectGroup("circle", None), ObjectGroup("circle", "red")))  # ambiguous matching
    with pytest.raises(ValueError):
        Spec((ObjectGroup("circle", "red", 2), ObjectGroup("square", "red")), "above")
    with pytest.raises(ValueError):
        Spec((ObjectGroup("hexagon", "red"),))


def test_wrong_reasoning_is_wrong_and_plausible(split_tasks):
    rng = np.random.default_rng(0)
    reasoning = [t for t in split_tasks["train"] if t.requires_reasoning]
    assert len(reasoning) >= 1000
    kinds = Counter()
    for t in reasoning:
        text, wrong = wrong_reasoning(t, rng)
        think, desc = split_response(text)
        assert (
            wrong != t.target and parse_description(desc) == wrong
        )  # the image follows the wrong fact
        true_think, _ = split_response(t.reasoning)
        assert think != true_think and len(think.split()) == len(true_think.split())
        changed = [a != b for a, b in zip(t.target.groups, wrong.groups)]
        assert sum(changed) == 1 and wrong.relation == t.target.relation
        kinds[next(c.kind for c in t.clues if changed[c.group])] += 1
    assert set(kinds) == {"color", "shape", "count"}
    with pytest.raises(ValueError):
        wrong_reasoning(next(t for t in reasoning[:0] + split_tasks["train"] if not t.clues), rng)
