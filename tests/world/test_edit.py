import json
from collections import Counter
from importlib import resources

import numpy as np
import pytest
import torch

from unigrpo.world import build_world_tokenizer, parse_description, split_response
from unigrpo.world import knowledge as K
from unigrpo.world.detect import detect
from unigrpo.world.edit import (
    DEFAULT_WEIGHTS,
    DESCRIBE,
    DESCRIBE_PROMPT,
    EDIT_DIRECT,
    EDIT_REASONING,
    MAX_PROMPT_WORDS,
    MAX_RESPONSE_WORDS,
    EditProblem,
    Placed,
    Scene,
    edit_categories,
    make_edit_problems,
    ref,
    render_edit_pairs,
    render_scene,
    render_scenes,
    sample_edit,
    split_edit_response,
    wrong_edit_reasoning,
)
from unigrpo.world.edit_reward import evaluate_edits, responses_correct, score_edits
from unigrpo.world.render import QUADRANTS

WITH_DESCRIBE = {**DEFAULT_WEIGHTS, DESCRIBE: 0.9}


@pytest.fixture(scope="module")
def edit_splits():
    """900 problems per split (100 per category, describe included)."""
    return {s: make_edit_problems(s, 900, seed=0, weights=WITH_DESCRIBE) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def all_edits(edit_splits):
    return [p for ps in edit_splits.values() for p in ps]


def _spec_key(spec):
    """Order-free content of a Spec: the groups as a multiset."""
    return Counter((g.shape, g.color, g.count) for g in spec.groups)


# ----------------------------------------------------------------------------------- scenes
def test_scene_validates_sorts_by_cell_and_round_trips():
    a = Scene((Placed("circle", "red", "br"), Placed("square", "blue", "tl")))
    assert [o.cell for o in a.objects] == ["tl", "br"]
    assert a == Scene((Placed("square", "blue", "tl"), Placed("circle", "red", "br")))
    assert Scene.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert a.empty_cells() == ("tr", "bl")
    assert a.description() == "a red circle and a blue square"  # by shape, then colour: not by cell
    for bad in [(), (Placed("circle", "red", "tl"), Placed("square", "red", "tl")),
                (Placed("hexagon", "red", "tl"),), (Placed("circle", "orange", "tl"),),
                (Placed("circle", "red", "middle"),)]:
        with pytest.raises(ValueError):
            Scene(bad)


def test_scene_spec_groups_equal_objects():
    s = Scene((Placed("circle", "red", "tl"), Placed("circle", "red", "br"), Placed("circle", "blue", "tr")))
    assert s.description() == "two red circles and a blue circle"
    assert ref(s, s.objects[1]) == "the blue circle"  # circle is not unique, blue circle is
    assert ref(s, s.objects[0]) is None  # two red circles: no single object to name
    lone = Scene((Placed("triangle", "green", "bl"), Placed("circle", "red", "tl")))
    assert ref(lone, lone.objects[1]) == "the triangle"


@pytest.mark.parametrize("size", [16, 24, 32, 48])
def test_render_scene_puts_each_object_in_its_quadrant(size):
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_edit("recolor", rng).source
        img = render_scene(scene, rng, size)
        objs = detect(img[None])
        assert len(objs.cx) == len(scene.objects)
        found = {(QUADRANTS[2 * int(cy >= size / 2) + int(cx >= size / 2)], K.SHAPES[s], K.COLORS[c])
                 for cx, cy, s, c in zip(objs.cx, objs.cy, objs.shape, objs.color)}
        assert found == {(o.cell, o.shape, o.color) for o in scene.objects}


def test_render_scenes_is_deterministic_and_in_range():
    scenes = [p.source for p in make_edit_problems("train", 32, seed=1)]
    a, b = render_scenes(scenes, seed=3), render_scenes([s.to_dict() for s in scenes], seed=3)
    assert torch.equal(a, b) and a.shape == (32, 3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) == 1.0
    assert not torch.equal(a, render_scenes(scenes, seed=4))  # jitter depends on the seed


# --------------------------------------------------------------------------------- problems
def test_make_edit_problems_is_deterministic_balanced_and_checked():
    a = make_edit_problems("train", 150, seed=3)
    assert a == make_edit_problems("train", 150, seed=3) and a != make_edit_problems("train", 150, seed=4)
    counts = Counter(p.category for p in a)
    assert counts == {**{c: 18 for c in EDIT_DIRECT}, **{c: 20 for c in EDIT_REASONING}}
    assert sum(p.requires_reasoning for p in a) / len(a) == pytest.approx(0.4)
    assert Counter(p.category for p in make_edit_problems("val", 10, weights={DESCRIBE: 1.0})) == {DESCRIBE: 10}
    for bad in [{"split": "dev"}, {"weights": {"nope": 1.0}}]:
        with pytest.raises(ValueError):
            make_edit_problems(**{"split": "train", "n": 5, **bad})
    with pytest.raises(ValueError, match="unknown edit category"):
        sample_edit("nope", np.random.default_rng(0))


def test_responses_follow_the_grammar_and_fit_the_tiny_model(all_edits):
    tok = build_world_tokenizer()
    for p in all_edits:
        think, desc = split_response(p.reasoning)
        assert p.reasoning.startswith("<think> i see ") and desc == p.target.description()
        assert _spec_key(parse_description(desc)) == _spec_key(p.target.spec())
        seen, fact, desc2 = split_edit_response(p.reasoning)
        assert _spec_key(parse_description(seen)) == _spec_key(p.source.spec()) and desc2 == desc
        assert think == f"i see {seen} ." + (f" {fact}" if fact else "")
        assert bool(fact) == p.requires_reasoning
        for text in (p.instruction, p.reasoning):
            assert tok.unk_id not in tok.encode(text), text
    prompt_len = max(len(p.instruction.split()) for p in all_edits)
    response_len = max(len(p.reasoning.split()) for p in all_edits)
    assert prompt_len <= MAX_PROMPT_WORDS and response_len == MAX_RESPONSE_WORDS  # the bound is reached
    assert prompt_len + 1 + response_len + 1 <= 64  # + <bos> + <eos>: the tiny model's max_seq_len


def test_edits_do_what_the_instruction_says(all_edits):
    for p in all_edits:
        src, tgt, words = p.source, p.target, p.instruction.split()
        moved = [o for o in tgt.objects if o not in src.objects]
        gone = [o for o in src.objects if o not in tgt.objects]
        kinds = Counter(o.kind for o in tgt.objects) - Counter(o.kind for o in src.objects)
        if p.category in ("recolor", "reason_recolor", "reason_shape"):
            (old,), (new,) = gone, moved
            assert old.cell == new.cell and (old.shape == new.shape) != (p.category == "reason_shape")
            assert " ".join(words[1:3 + (old.color in words)]) == ref(src, old)
            if p.category == "reason_recolor":
                assert new.color == K.COLOR_ITEMS[p.item] and K.color_fact(p.item, new.color) in p.reasoning
            if p.category == "reason_shape":
                assert new.shape == K.SHAPE_ITEMS[p.item] and new.color == old.color
        elif p.category in ("add", "reason_add"):
            assert not gone and all(o.cell in src.empty_cells() for o in moved)
            (kind, k), = kinds.items()
            assert k == (1 if p.category == "add" else K.COUNT_ITEMS[p.item][2])
            assert f"{kind[1]} {kind[0]}" in p.instruction
        elif p.category == "remove":
            assert not moved and len(gone) == 1 and p.instruction == f"remove {ref(src, gone[0])}"
        elif p.category == "swap":
            a, b = gone
            assert {(o.kind, o.cell) for o in moved} == {(a.kind, b.cell), (b.kind, a.cell)}
            assert a.kind != b.kind and tgt.spec() == src.spec()
        elif p.category == "count":
            changed = {o.kind for o in moved + gone} or set(kinds)
            (kind,) = changed
            m = sum(o.kind == kind for o in tgt.objects)
            assert p.instruction.endswith(f"{kind[0]}s to {K.NUMBER_WORDS[m]}")
            assert m != sum(o.kind == kind for o in src.objects)
        else:
            assert p.category == DESCRIBE and p.instruction == DESCRIBE_PROMPT and tgt == src
        for o in src.objects:  # what the instruction does not touch stays where it was
            if o not in gone and not (p.category == "count" and o.kind in kinds):
                assert o in tgt.objects
        assert set(p.kept()) == {o for o in src.objects if o in tgt.objects
                                 and p.allowed[tgt.objects.index(o)] == (o.cell,)}


def _named(scene, words: list[str]) -> list:
    """The input objects a noun phrase names ('the circle', 'the red circle', 'red circles')."""
    words = [w for w in words if w != "the"]
    color = words[0] if len(words) == 2 else None
    shape = words[-1].removesuffix("s") if words[-1] not in K.SHAPES else words[-1]
    return [o for o in scene.objects if o.shape == shape and color in (None, o.color)]


def test_instructions_name_their_objects_unambiguously(all_edits):
    """Read back independently of ``ref``: a singular phrase names exactly one input object, a
    count edit's plural phrase exactly one group of equal objects."""
    for p in all_edits:
        w = p.instruction.split()
        if p.category in ("recolor", "reason_recolor", "remove", "reason_shape"):
            # make <ref> <colour> · remove <ref> · make <ref> the color of .. · replace <ref> with ..
            stop = {"recolor": "", "remove": "", "reason_recolor": "color", "reason_shape": "with"}[p.category]
            end = len(w) - (p.category == "recolor") if not stop else w.index(stop) - (stop == "color")
            assert len(_named(p.source, w[1:end])) == 1, p.instruction
        elif p.category == "swap":
            k = w.index("and")
            assert len(_named(p.source, w[1:k])) == len(_named(p.source, w[k + 1:])) == 1, p.instruction
        elif p.category == "count":
            group = _named(p.source, w[4:w.index("to")])
            assert group and len({o.kind for o in group}) == 1, p.instruction


def test_allowed_cells_cover_the_ground_truth_and_only_free_cells():
    rng = np.random.default_rng(0)
    for p in [sample_edit(c, rng) for c in ("add", "count", "reason_add") for _ in range(200)]:
        for o, cells in zip(p.target.objects, p.allowed):
            assert o.cell in cells
            if len(cells) > 1:  # free: the input's empty cells (added) or the group's cells (fewer)
                assert set(cells) == set(p.source.empty_cells()) or all(
                    p.source.objects[[x.cell for x in p.source.objects].index(c)].kind == o.kind for c in cells)


def test_metadata_round_trips_through_json(all_edits):
    for p in all_edits[::7]:
        meta = json.loads(json.dumps(p.to_metadata()))
        assert "reasoning" not in meta and meta["target_reasoning"] == p.reasoning
        assert EditProblem.from_metadata(meta) == p


def test_held_out_combinations_are_absent_from_train(edit_splits):
    assert all(p.split in ("train", "all") for p in edit_splits["train"])
    for cat in EDIT_DIRECT + EDIT_REASONING:
        keys = {s: {p.key for p in ps if p.category == cat} for s, ps in edit_splits.items()}
        assert keys["val"] and keys["test"], cat
        assert not keys["train"] & (keys["val"] | keys["test"]), cat
        assert not keys["val"] & keys["test"], cat
    train_items = {p.item for p in edit_splits["train"] if p.item}
    held_items = {p.item for s in ("val", "test") for p in edit_splits[s] if p.item}
    assert held_items <= train_items  # an item is held out only in combination, never alone
    train_words = {w for p in edit_splits["train"] for w in (p.instruction + " " + p.reasoning).split()}
    assert train_words >= {w for p in edit_splits["test"] for w in (p.instruction + " " + p.reasoning).split()}


def test_wrong_edit_reasoning_is_plausible_and_wrong(all_edits):
    rng = np.random.default_rng(0)
    for p in (p for p in all_edits if p.requires_reasoning):
        text, wrong = wrong_edit_reasoning(p, rng)
        seen, fact, desc = split_edit_response(text)
        true_seen, true_fact, _ = split_edit_response(p.reasoning)
        assert wrong != p.target and desc == wrong.description()
        assert seen == true_seen  # the input is still seen right: only the fact is wrong
        assert p.item in p.instruction and fact != true_fact
        assert len(text.split()) <= MAX_RESPONSE_WORDS
        assert build_world_tokenizer().unk_id not in build_world_tokenizer().encode(text)
    with pytest.raises(ValueError, match="no knowledge"):
        wrong_edit_reasoning(next(p for p in all_edits if p.category == "recolor"), rng)


def test_edit_words_extend_the_shipped_vocabulary_without_moving_an_id():
    from safetensors import safe_open

    path = resources.files("unigrpo") / "assets" / "tiny_sft.safetensors"
    with safe_open(str(path), "pt") as f:
        shipped = json.loads(f.metadata()["tokenizer"])["vocab"]
    vocab = build_world_tokenizer().vocab
    assert vocab[: len(shipped)] == shipped and vocab[len(shipped):] == list(K.EDIT_WORDS)
    assert set(edit_categories()) == set(EDIT_DIRECT + EDIT_REASONING + (DESCRIBE,))


# ----------------------------------------------------------------------------------- reward
def _problems(per_category: int = 40, seed: int = 0):
    return make_edit_problems("test", per_category * len(edit_categories()), seed=seed,
                              weights={c: 1.0 for c in edit_categories()})


def _score(scenes, problems, size=32, seed=0):
    """score_edits of renders of ``scenes`` (None: a blank canvas)."""
    imgs = render_scenes([s or problems[0].source for s in scenes], seed=seed, size=size)
    imgs[[i for i, s in enumerate(scenes) if s is None]] = 0.0
    return score_edits(imgs, problems)


@pytest.mark.parametrize("size", [32, 24, 16])
def test_ground_truth_edits_score_one_at_every_size(size):
    ps = _problems()
    res = _score([p.target for p in ps], ps, size)
    assert res.correct.all() and (res.score == 1).all() and (res.dense == 1).all()
    assert (res.n_extra == 0).all()
    kept = np.array([bool(p.kept()) for p in ps])
    assert (res.preserved[kept] == 1).all() and np.isnan(res.preserved[~kept]).all()
    assert set(evaluate_edits(render_scenes([p.target for p in ps], 0, size), ps)["categories"]) == set(
        edit_categories())


def test_any_allowed_arrangement_is_correct():
    """An added object may go to any empty cell, a count decrease may keep any of the group."""
    rng = np.random.default_rng(1)
    ps, scenes = [], []
    for p in _problems():
        free = [i for i, a in enumerate(p.allowed) if len(a) > 1]
        if not free:
            continue
        objs = list(p.target.objects)
        used = {o.cell for o in objs}
        for i in free:  # move each free object to another allowed cell that is still empty
            others = [c for c in p.allowed[i] if c not in used]
            if others:
                used.discard(objs[i].cell)
                objs[i] = Placed(objs[i].shape, objs[i].color, others[int(rng.integers(len(others)))])
                used.add(objs[i].cell)
        ps.append(p)
        scenes.append(Scene(tuple(objs)))
    assert sum(s != p.target for s, p in zip(scenes, ps)) > 50  # the test moved objects
    assert _score(scenes, ps).correct.all()


def _mutations(p: EditProblem, rng):
    """name -> a scene (None: blank) that differs from the target in one aspect, where possible."""
    objs, out = list(p.target.objects), {}
    i = int(rng.integers(len(objs)))
    o = objs[i]
    out["wrong colour"] = [*objs[:i], Placed(o.shape, _other(K.COLORS, o.color, rng), o.cell), *objs[i + 1:]]
    out["wrong shape"] = [*objs[:i], Placed(_other(K.SHAPES, o.shape, rng), o.color, o.cell), *objs[i + 1:]]
    out["missing"] = objs[:i] + objs[i + 1:] or None
    empty = p.target.empty_cells()
    if empty:
        out["extra"] = [*objs, Placed(K.SHAPES[int(rng.integers(3))], K.COLORS[int(rng.integers(5))], empty[0])]
    kept = p.kept()
    if kept:
        k = objs.index(kept[0])
        out["kept recoloured"] = [*objs[:k], Placed(kept[0].shape, _other(K.COLORS, kept[0].color, rng),
                                                     kept[0].cell), *objs[k + 1:]]
        if empty:
            out["kept moved"] = [*objs[:k], Placed(kept[0].shape, kept[0].color, empty[0]), *objs[k + 1:]]
    if p.category != DESCRIBE:
        out["input unchanged"] = list(p.source.objects)
    rot = {"tl": "tr", "tr": "br", "br": "bl", "bl": "tl"}  # a quarter turn of the grid
    back = {v: k for k, v in rot.items()}
    target_at = {t.cell: t.kind for t in objs}
    if any(target_at.get(back[t.cell]) != t.kind for t, a in zip(objs, p.allowed) if a == (t.cell,)):
        out["redrawn elsewhere"] = [Placed(t.shape, t.color, rot[t.cell]) for t in objs]
    return {k: v and Scene(tuple(v)) for k, v in out.items()}


def _other(seq, x, rng):
    rest = [y for y in seq if y != x]
    return rest[int(rng.integers(len(rest)))]


def test_every_single_aspect_mistake_breaks_correct():
    rng = np.random.default_rng(0)
    ps = _problems(30)
    cases = [(name, p, s) for p in ps for name, s in _mutations(p, rng).items()]
    res = _score([s for _, _, s in cases], [p for _, p, _ in cases])
    names = np.array([name for name, _, _ in cases])
    for name in dict.fromkeys(names.tolist()):
        sel = names == name
        assert sel.sum() >= 30, name
        assert not res.correct[sel].any(), name
        assert (res.score[sel] < 1).all() and (res.dense[sel] < 1).all(), name
    for name in ("kept recoloured", "kept moved"):
        assert (res.preserved[names == name] == 0).all(), name
    for name in ("wrong colour", "wrong shape"):  # the dense reward keeps two thirds of the object
        sel = names == name
        n_t = np.array([len(p.target.objects) for (_, p, _), s in zip(cases, sel) if s])
        assert np.allclose(res.dense[sel], (n_t - 1 + 2 / 3) / n_t / 1.5)


def test_blank_and_noise_score_about_zero():
    ps = _problems(4)
    blank = score_edits(torch.zeros(len(ps), 3, 32, 32), ps)
    assert (blank.score == 0).all() and not blank.correct.any() and (blank.n_objects == 0).all()
    noise = score_edits(torch.rand(len(ps), 3, 32, 32, generator=torch.Generator().manual_seed(0)), ps)
    assert not noise.correct.any() and noise.score.max() < 0.2 and noise.dense.mean() < 0.1


def test_partial_credit_closed_forms():
    two = Scene((Placed("circle", "red", "tl"), Placed("square", "blue", "br")))
    p = EditProblem("add a green triangle", "add", two,
                    Scene((*two.objects, Placed("triangle", "green", "tr"))),
                    (("tl",), ("tr", "bl"), ("br",)), "", False, "k", "test")
    junk = Placed("circle", "yellow", "bl")
    res = _score([two, Scene((*p.target.objects, junk)), Scene((*two.objects, Placed("triangle", "green", "bl")))],
                 [p] * 3)
    assert np.allclose(res.score, [2 / 3, 1 / 1.5, 1.0])  # missing 1 of 3; all + 1 extra; other empty cell
    assert np.allclose(res.dense, [2 / 3, 1 / 1.5, 1.0]) and res.n_extra.tolist() == [0, 1, 0]
    # the junk yellow circle in an allowed cell, shape wrong and colour wrong: 1/3 credit of the triangle
    res = _score([Scene((*two.objects, junk))], [p])
    assert np.isclose(res.dense[0], (2 + 1 / 3) / 3 / 1.5) and np.isclose(res.score[0], 2 / 3 / 1.5)


def test_max_matching_matches_brute_force():
    import itertools

    from unigrpo.world.edit_reward import _max_matching

    rng = np.random.default_rng(0)
    for _ in range(300):
        t, d = int(rng.integers(1, 5)), int(rng.integers(0, 7))
        ok = rng.random((t, d)) < 0.4
        owner = _max_matching(ok)
        assert all(ok[owner[j], j] for j in range(d) if owner[j] >= 0)  # only edges, each target once
        assert len({x for x in owner if x >= 0}) == (owner >= 0).sum()
        best = max((sum(ok[i, j] for i, j in zip(perm, cols)) for cols in itertools.permutations(range(d), min(t, d))
                    for perm in itertools.permutations(range(t), min(t, d))), default=0)
        assert (owner >= 0).sum() == best


def test_reward_reads_json_metadata_only():
    from unigrpo.rewards import BUILTIN

    ps = _problems(3)
    meta = [{**json.loads(json.dumps(p.to_metadata())), "reasoning": "anything", "prompt_index": i, "group_index": 0}
            for i, p in enumerate(ps)]
    imgs = render_scenes([p.target if i % 2 else p.source for i, p in enumerate(ps)], seed=0)
    r = BUILTIN["shapes_edit"](imgs, [p.instruction for p in ps], meta)
    assert r.dtype == torch.float32 and r.shape == (len(ps),)
    assert torch.equal(r, torch.as_tensor(score_edits(imgs, ps).score, dtype=torch.float32))
    assert (r[1::2] == 1).all()
    dense = BUILTIN["shapes_edit_dense"](imgs, [""] * len(ps), meta)
    assert torch.equal(dense, torch.as_tensor(score_edits(imgs, ps).dense, dtype=torch.float32))
    with pytest.raises(ValueError, match="edit problems"):
        score_edits(imgs[:2], ps)


def test_responses_are_checked_for_the_input_and_the_result():
    ps = [p for p in _problems(5) if p.requires_reasoning]
    rng = np.random.default_rng(0)
    seen, desc = responses_correct([p.reasoning + " <eos>" for p in ps], ps)
    assert seen.all() and desc.all()
    seen, desc = responses_correct([wrong_edit_reasoning(p, rng)[0] for p in ps], ps)
    assert seen.all() and not desc.any()
    blind = [p.reasoning.replace("i see ", "i see a red circle and ", 1) for p in ps]
    assert not responses_correct(blind, ps)[0].any()
    shuffled = [f"<think> i see {' and '.join(reversed(p.source.description().split(' and ')))} . </think> "
                f"{' and '.join(reversed(p.target.description().split(' and ')))}" for p in ps]
    assert all(responses_correct(shuffled, ps)[i].all() for i in (0, 1))  # group order is free
    out = evaluate_edits(render_scenes([p.target for p in ps], 0), ps, [p.reasoning for p in ps])
    assert out["seen_ok"] == out["description_ok"] == out["accuracy_given_description_ok_reasoning"] == 1.0
    assert np.isnan(out["accuracy_direct"]) and out["n"] == len(ps)


@pytest.mark.parametrize("size", [32, 24, 16])
def test_edit_pairs_change_only_the_edited_cells(size):
    from unigrpo.world.render import quadrant

    ps = _problems(20)
    src, tgt = render_edit_pairs(ps, seed=2, size=size)
    assert score_edits(tgt, ps).correct.all()
    assert score_edits(src, [p.to_metadata() for p in ps]).correct.tolist() == [p.category == DESCRIBE for p in ps]
    a, b = render_edit_pairs([p.to_metadata() for p in ps], seed=2, size=size)
    assert torch.equal(a, src) and torch.equal(b, tgt)
    for i, p in enumerate(ps):
        before = {o.cell: o.kind for o in p.source.objects}
        after = {o.cell: o.kind for o in p.target.objects}
        for cell in QUADRANTS:
            x0, y0, x1, y1 = quadrant(cell, size)
            same = torch.equal(src[i, :, y0:y1, x0:x1], tgt[i, :, y0:y1, x0:x1])
            assert same == (before.get(cell) == after.get(cell)), (p.instruction, cell)
