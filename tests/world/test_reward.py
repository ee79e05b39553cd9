import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unigrpo.utils.images import group_rms_distance
from unigrpo.world import (
    ObjectGroup,
    Spec,
    all_categories,
    description_correct,
    evaluate_images,
    parse_description,
    render_batch,
    score_images,
    shapes_dense_reward,
    shapes_image_stats,
    shapes_reward,
    wrong_reasoning,
)
from unigrpo.world.knowledge import COLORS, SHAPES

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _per_category(tasks, n):
    """Up to n tasks of every category."""
    out = []
    for c in all_categories():
        out += [t for t in tasks if t.category == c][:n]
    return out


@pytest.mark.parametrize("size", [32, 24, 16])
def test_ground_truth_renders_are_correct(split_tasks, size):
    tasks = _per_category(split_tasks["train"] + split_tasks["val"], 300)
    assert len(tasks) == 300 * len(all_categories())
    res = evaluate_images(render_batch([t.target for t in tasks], seed=size, size=size), tasks)
    assert res["accuracy"] >= 0.99 and res["score"] >= 0.99
    for c, r in res["categories"].items():
        assert r["n"] == 300 and r["accuracy"] >= 0.99, (c, r)
    assert res["n_extra"] == 0.0 and res["relation_ok"] == 1.0 and res["color_ok"] == 1.0


def test_free_colors_accept_any_palette_colour():
    spec = parse_description("three circles")
    for c in COLORS:
        img = render_batch([parse_description(f"three {c} circles")], seed=0)
        assert score_images(img, [spec]).correct[0]


def test_blank_and_noise_images_score_near_zero(split_tasks):
    tasks = _per_category(split_tasks["val"], 50)
    specs = [t.spec for t in tasks]
    rng = np.random.default_rng(0)
    b = len(tasks)
    cases = {
        "blank": np.zeros((b, 32, 32, 3), np.uint8),
        "uniform noise": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
        "gaussian noise": np.clip(rng.normal(0.5, 0.3, (b, 32, 32, 3)) * 255, 0, 255).astype(
            np.uint8
        ),
        "grey": np.full((b, 32, 32, 3), 128, np.uint8),
    }
    for c in COLORS:  # a canvas flooded with one colour is one huge blob, never an object
        full = render_batch([parse_description(f"a {c} square")], seed=0)[0].amax((1, 2))
        cases[f"flood {c}"] = np.broadcast_to(full.numpy() * 255, (b, 32, 32, 3)).astype(np.uint8)
    for name, imgs in cases.items():
        res = score_images(imgs, specs)
        assert res.score.mean() < 0.1 and not res.correct.any(), name


def _mutate(spec: Spec, kind: str, rng) -> Spec | None:
    """A valid spec differing from ``spec`` in one aspect (None where the aspect does not apply)."""
    g0, rest, rel = spec.groups[0], spec.groups[1:], spec.relation
    if kind == "relation":
        cands = [(spec.groups, OPPOSITE[rel])] if rel else []
    elif kind == "color":
        cands = [((replace(g0, color=c),) + rest, rel) for c in COLORS if g0.color not in (None, c)]
    elif kind == "shape":
        cands = [((replace(g0, shape=s),) + rest, rel) for s in SHAPES if s != g0.shape]
    elif kind == "count":
        cands = [
            ((replace(g0, count=g0.count + d),) + rest, None) for d in (-1, 1) if g0.count + d >= 1
        ]
    elif kind == "missing":
        cands = [(rest, None)] if rest else []
    else:  # one extra object
        cands = (
            [(spec.groups + (ObjectGroup(s, c),), None) for s in SHAPES for c in COLORS]
            if not rel
            else []
        )
    for i in rng.permutation(len(cands)):
        try:
            return Spec(*cands[i])
        except ValueError:  # e.g. the mutated group collides with another one
            continue
    return None


@pytest.mark.parametrize("kind", ["color", "shape", "count", "relation", "missing", "extra"])
def test_mutations_lower_the_score_and_break_strictness(split_tasks, kind):
    rng = np.random.default_rng(1)
    tasks = _per_category(split_tasks["train"], 60)
    if kind == "color":  # a prompt that leaves the colour free accepts every colour
        tasks = [t for t in tasks if t.spec.concrete]
    pairs = [(t.spec, m) for t in tasks if (m := _mutate(t.target, kind, rng)) is not None]
    assert len(pairs) >= 60
    truth = [p[0] for p in pairs]
    res = score_images(render_batch([p[1] for p in pairs], seed=2), truth)
    assert not res.correct.any() and (res.score < 1.0).all()
    ok = score_images(
        render_batch([p[0] for p in pairs if p[0].concrete], seed=2),
        [p[0] for p in pairs if p[0].concrete],
    )
    assert res.score.mean() < ok.score.mean() - 0.2
    check = {
        "color": "color_ok",
        "shape": "shape_ok",
        "count": "count_ok",
        "relation": "relation_ok",
    }.get(kind)
    if check:  # the matching diagnostic flags the broken aspect
        assert np.nanmean(getattr(res, check)) < 0.05
    if kind == "relation":
        assert np.allclose(res.score, 2 / 3)  # both objects right, relation wrong


def test_small_noise_and_jitter_do_not_flip_results(split_tasks):
    tasks = _per_category(split_tasks["train"], 100)
    rng = np.random.default_rng(3)
    muts = [m for t in tasks if (m := _mutate(t.target, "shape", rng)) is not None]
    imgs = render_batch([t.target for t in tasks], seed=4)
    bad = render_batch(muts, seed=4)
    g = torch.Generator().manual_seed(0)
    variants = {
        "noise": lambda x: (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1),
        "shift": lambda x: torch.roll(x, (1, -1), (2, 3)),
        "shift_back": lambda x: torch.roll(x, (-1, 1), (2, 3)),
        "dim": lambda x: 0.7 * x,
        "blur": lambda x: F.avg_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=1),
    }
    base = score_images(imgs, [t.spec for t in tasks])
    for name, f in variants.items():
        res = score_images(f(imgs), [t.spec for t in tasks])
        assert (res.correct == base.correct).mean() >= (0.99 if name == "blur" else 1.0), name
        res_bad = score_images(f(bad), [t.spec for t in tasks[: len(muts)]])
        assert not res_bad.correct.any(), name


def test_wrong_reasoning_images_are_penalised(split_tasks):
    rng = np.random.default_rng(0)
    tasks = [t for t in split_tasks["train"] if t.requires_reasoning][:400]
    wrong = [wrong_reasoning(t, rng)[1] for t in tasks]
    res = score_images(render_batch(wrong, seed=0), [t.spec for t in tasks])
    assert (res.score < 1).all() and not res.correct.any()


def test_shapes_reward_protocol_and_input_formats(split_tasks):
    tasks = _per_category(split_tasks["val"], 8)
    meta = [
        json.loads(json.dumps(t.to_metadata())) for t in tasks
    ]  # what crosses process boundaries
    imgs = render_batch([t.target for t in tasks], seed=0)
    r = shapes_reward(imgs, [t.prompt for t in tasks], meta)
    assert r.shape == (len(tasks),) and r.dtype == torch.float32 and torch.all(r == 1.0)
    as_uint8 = (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(score_images(as_uint8, [m["spec"] for m in meta]).score, r.numpy())
    out_of_range = imgs * 2 - 0.5  # model outputs may overshoot; clipped, same verdicts
    assert shapes_reward(out_of_range, [""] * len(tasks), meta).tolist() == r.tolist()
    with pytest.raises(ValueError):
        score_images(imgs[:3], [m["spec"] for m in meta])


def test_evaluate_images_breakdown(split_tasks):
    tasks = _per_category(split_tasks["test"], 5)
    imgs = render_batch([t.target for t in tasks], seed=0)
    imgs[::2] = 0.0  # blank every other image
    res = evaluate_images(imgs, tasks)
    json.dumps(res)
    assert res["n"] == len(tasks) and set(res["categories"]) == set(all_categories())
    assert sum(c["n"] for c in res["categories"].values()) == len(tasks)
    assert res["accuracy"] == pytest.approx(np.mean([i % 2 == 1 for i in range(len(tasks))]))
    assert 0 <= res["accuracy_reasoning"] <= 1 and 0 <= res["accuracy_direct"] <= 1


def test_description_correct_separates_reasoning_from_drawing(split_tasks):
    tasks = _per_category(split_tasks["test"], 30)
    specs = [t.spec for t in tasks]
    assert description_correct([t.reasoning + " <eos>" for t in tasks], specs).all()
    rng = np.random.default_rng(0)
    needs = [t for t in tasks if t.requires_reasoning]
    wrong = [wrong_reasoning(t, rng)[0] for t in needs]
    assert not description_correct(wrong, [t.spec for t in needs]).any()
    t = next(t for t in tasks if t.category == "colors")  # "a blue circle"
    desc = t.description
    bad = [
        "<think> draw exactly what is asked . </think>",  # no description
        "<think> draw exactly what is asked . </think> a blue blue",  # does not parse
        "<think> draw exactly what is asked . </think> " + " ".join(w for w in desc.split() if w not in COLORS),  # colour left free
        desc + " and " + desc,  # duplicated group (invalid spec)
    ]
    assert not description_correct(bad, [t.spec] * len(bad)).any()
    assert description_correct([desc], [t.spec]).all()  # no <think> block: whole text is the description
    with pytest.raises(ValueError):
        description_correct([desc], [t.spec] * 2)


def test_evaluate_images_reasoning_decomposition(split_tasks):
    tasks = _per_category(split_tasks["test"], 6)
    rng = np.random.default_rng(1)
    responses = [wrong_reasoning(t, rng)[0] if t.requires_reasoning and i % 2 else t.reasoning
                 for i, t in enumerate(tasks)]
    desc_ok = np.array([not (t.requires_reasoning and i % 2) for i, t in enumerate(tasks)])
    imgs = render_batch([t.target for t in tasks], seed=0)
    imgs[::3] = 0.0  # blank every third image: drawing errors
    drawn_ok = np.arange(len(tasks)) % 3 != 0
    res = evaluate_images(imgs, tasks, responses=responses)
    json.dumps(res)
    assert res["reasoning_ok"] == pytest.approx(desc_ok.mean())
    assert res["accuracy_given_reasoning_ok"] == pytest.approx(drawn_ok[desc_ok].mean())
    assert res["reasoning_ok_direct"] == 1.0
    for c, r in res["categories"].items():
        sel = np.array([t.category == c for t in tasks])
        assert r["reasoning_ok"] == pytest.approx(desc_ok[sel].mean()), c
    assert "reasoning_ok" not in evaluate_images(imgs, tasks)


def test_image_stats_and_group_diversity(split_tasks):
    tasks = split_tasks["val"][:16]
    imgs = render_batch([t.target for t in tasks], seed=0)
    st = shapes_image_stats(imgs)
    assert (
        0.6 < st["background_fraction"] < 1.0
        and st["saturation"] > 0.99
        and st["unknown_color_fraction"] == 0
    )
    assert shapes_image_stats(torch.zeros(2, 3, 32, 32))["background_fraction"] == 1.0
    assert shapes_image_stats(torch.zeros(2, 3, 32, 32))["high_freq"] == 0.0
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float()  # [H, W]
    textured = (imgs + 0.06 * checker).clamp(0, 1)  # dim enough to stay "background" for the detector
    np.testing.assert_array_equal(score_images(textured, [t.spec for t in tasks]).correct,
                                  score_images(imgs, [t.spec for t in tasks]).correct)
    assert shapes_image_stats(textured)["high_freq"] > st["high_freq"] + 0.02
    same = imgs[:4].unsqueeze(1).expand(4, 6, 3, 32, 32)  # [P, G, 3, H, W], collapsed groups
    assert group_rms_distance(same) == 0.0
    varied = render_batch([tasks[0].target] * 24, seed=1).reshape(4, 6, 3, 32, 32)
    assert group_rms_distance(varied) > 0.1


def test_reward_speed_sanity(split_tasks):
    imgs = render_batch([t.target for t in split_tasks["train"][:1024]], seed=0)
    res = score_images(
        imgs, [t.spec for t in split_tasks["train"][:1024]]
    )  # not timed: see benchmarks/
    assert res.correct.all()


@pytest.mark.parametrize("kind", ["color", "shape", "count", "relation"])
def test_dense_reward_keeps_the_credit_of_the_attributes_a_mistake_leaves_right(split_tasks, kind):
    """``shapes_dense``: 1 on ground-truth renders; a single-aspect mistake scores below 1, and a
    wrong colour / shape / relation keeps the credit of the attributes it left right, which the
    partial-credit ``score`` takes away with the whole object."""
    rng = np.random.default_rng(3)
    tasks = _per_category(split_tasks["train"], 40)
    if kind == "color":
        tasks = [t for t in tasks if t.spec.concrete]
    pairs = [(t.spec, t.to_metadata()["spec"], m) for t in tasks if (m := _mutate(t.target, kind, rng)) is not None]
    truth = [p[1] for p in pairs]
    exact = shapes_dense_reward(render_batch([p[0] for p in pairs if p[0].concrete], seed=4),
                                [""] * sum(p[0].concrete for p in pairs), [{"spec": p[1]} for p in pairs if p[0].concrete])
    assert torch.all(exact == 1.0)
    wrong = render_batch([p[2] for p in pairs], seed=4)
    dense = shapes_dense_reward(wrong, [""] * len(pairs), [{"spec": s} for s in truth]).numpy()
    res = score_images(wrong, truth)
    assert (dense < 1.0).all()
    if kind == "count":  # every attribute's count is off by one object: about the same credit
        assert abs(dense.mean() - res.score.mean()) < 0.15
    else:
        assert (dense >= res.score - 1e-6).all() and dense.mean() > res.score.mean() + 0.05
