"""Problem generator of the shapes world: prompts, ground-truth reasoning, held-out splits.

Categories (``all_categories()``): six direct ones mirroring GenEval and four that need world
knowledge (``requires_reasoning``):

- ``single_object`` "a circle" · ``two_object`` "a circle and a square" · ``counting`` "three
  squares" (colour left free) · ``colors`` "a blue circle" · ``position`` "a red circle left of a
  blue square" · ``color_attr`` "a red circle and a blue square" (attribute binding);
- ``reason_color`` "a square the color of a lemon" · ``reason_shape`` "a red thing shaped like a
  wheel" · ``reason_count`` "as many red circles as a bicycle has wheels" · ``reason_combo`` two
  indirect attributes at once. The first two also come inside count / pair / relation prompts.

A task's response is ``<think> facts </think> description``. ``spec`` is the prompt's ground truth
(the reward's reference; ``color=None`` where the prompt leaves the colour free); ``target`` is the
concrete spec the ground-truth description states (colours picked by the reasoning) — render
``target`` to get an image that matches the reasoning. Splits hold out combinations (see
``docs/world.md``): held-out tasks never occur in ``train`` while every word still does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from unigrpo.world import knowledge as K
from unigrpo.world.spec import ObjectGroup, Spec, describe, describe_group

DIRECT = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
REASONING = ("reason_color", "reason_shape", "reason_count", "reason_combo")
SPLITS = ("train", "val", "test")
_TABLES = {"color": list(K.COLOR_ITEMS), "shape": list(K.SHAPE_ITEMS), "count": list(K.COUNT_ITEMS)}


def all_categories() -> tuple[str, ...]:
    """Every task category, direct ones first."""
    return DIRECT + REASONING


@dataclass(frozen=True)
class Clue:
    """An attribute of group ``group`` given indirectly through knowledge item ``item``."""

    kind: str  # "color" | "shape" | "count"
    item: str  # key of K.COLOR_ITEMS / K.SHAPE_ITEMS / K.COUNT_ITEMS
    group: int


@dataclass(frozen=True)
class ShapesProblem:
    """One prompt of the shapes world with its ground truth (what the shapes task serves; a task in
    ``unigrpo.tasks`` is a whole prompt source). ``reasoning`` is the full response text."""

    prompt: str
    category: str
    spec: Spec  # what the reward checks (prompt's ground truth; may leave colours free)
    target: Spec  # concrete spec stated by ``description`` (what a correct image shows)
    reasoning: str  # "<think> facts </think> description"
    description: str
    requires_reasoning: bool
    key: str  # the held-out combination this task belongs to
    split: str  # "train" | "val" | "test" | "all" (categories without a held-out scheme)
    clues: tuple[Clue, ...] = ()

    def to_metadata(self) -> dict[str, Any]:
        """Plain dict of built-ins (JSON-serialisable); ``ShapesProblem.from_metadata`` inverts it."""
        return {"prompt": self.prompt, "category": self.category, "spec": self.spec.to_dict(),
                "target": self.target.to_dict(), "reasoning": self.reasoning,
                "description": self.description, "requires_reasoning": self.requires_reasoning,
                "key": self.key, "split": self.split,
                "clues": [[c.kind, c.item, c.group] for c in self.clues]}

    @staticmethod
    def from_metadata(d: dict[str, Any]) -> ShapesProblem:
        return ShapesProblem(d["prompt"], d["category"], Spec.from_dict(d["spec"]),
                    Spec.from_dict(d["target"]), d["reasoning"], d["description"],
                    d["requires_reasoning"], d["key"], d["split"],
                    tuple(Clue(k, i, int(g)) for k, i, g in d["clues"]))


def _split(held_out: bool, parity: int) -> str:
    return ("val" if parity % 2 == 0 else "test") if held_out else "train"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _num(n: int) -> str:
    return K.NUMBER_WORDS[n]


def _obj_index(shape: str, color: str) -> int:
    return K.SHAPES.index(shape) * len(K.COLORS) + K.COLORS.index(color)


def _response(facts: list[str], target: Spec) -> str:
    return f"<think> {' '.join(facts)} </think> {describe(target)}"


def _facts(clues: tuple[Clue, ...], target: Spec) -> list[str]:
    """The reasoning's sentences, derived from the clues and the (true or wrong) target."""
    out = []
    for c in clues:
        g = target.groups[c.group]
        if c.kind == "color":
            out.append(K.color_fact(c.item, g.color))
        elif c.kind == "shape":
            out.append(K.shape_fact(c.item, g.shape))
        else:
            out.append(K.count_fact(c.item, g.count))
    return out


def _other_object(rng, first: tuple[str, str], distinct_both: bool) -> tuple[str, str]:
    """A (shape, colour) differing from ``first`` (in both attributes if ``distinct_both``)."""
    while True:
        s, c = _pick(rng, K.SHAPES), _pick(rng, K.COLORS)
        if (s, c) != first and (not distinct_both or (s != first[0] and c != first[1])):
            return s, c


def _direct(category: str, rng: np.random.Generator) -> ShapesProblem:
    """Prompt = canonical description of the spec; free colours are picked by the reasoning."""
    s, c = _pick(rng, K.SHAPES), _pick(rng, K.COLORS)
    relation, split, key = None, "all", s
    if category == "single_object":
        groups = (ObjectGroup(s, None),)
    elif category == "two_object":
        s2 = _pick(rng, [x for x in K.SHAPES if x != s])
        groups, key = (ObjectGroup(s, None), ObjectGroup(s2, None)), "|".join(sorted((s, s2)))
    elif category == "counting":
        n = int(rng.integers(2, K.MAX_OBJECTS + 1))
        groups, key = (ObjectGroup(s, None, n),), f"{_num(n)} {s}s"
    elif category == "colors":
        i, j = K.COLORS.index(c), K.SHAPES.index(s)
        groups, key = (ObjectGroup(s, c),), f"{c} {s}"
        split = "valtest" if (i + j) % 3 == 0 else "train"  # one shape per colour held out
    else:  # position, color_attr: held out by unordered pair of objects
        s2, c2 = _other_object(rng, (s, c), distinct_both=category == "color_attr")
        groups = (ObjectGroup(s, c), ObjectGroup(s2, c2))
        relation = _pick(rng, K.RELATIONS) if category == "position" else None
        a, b = sorted((_obj_index(s, c), _obj_index(s2, c2)))
        key = "|".join(sorted((f"{c} {s}", f"{c2} {s2}")))
        split = _split((a + b) % 5 == 0, a)
    spec = Spec(groups, relation)
    target = Spec(tuple(g if g.color else replace(g, color=_pick(rng, K.COLORS)) for g in groups),
                  relation)
    think = K.THINK_EXPLICIT if spec.concrete else K.THINK_FREE_COLOR
    return ShapesProblem(describe(spec), category, spec, target, _response([think], target),
                describe(target), False, key, split)


def _phrase(count: int, shape: str, color: str, clues: list[Clue]) -> str:
    """Noun phrase of group 0 with its indirect attributes, e.g. 'two things shaped like a coin'."""
    kinds = {c.kind: c.item for c in clues}
    noun = ("thing" if "shape" in kinds else shape) + ("s" if count > 1 or "count" in kinds else "")
    words = [] if "color" in kinds else [color]
    words += [noun] + (["shaped like", kinds["shape"]] if "shape" in kinds else [])
    words += ["the color of", kinds["color"]] if "color" in kinds else []
    body = " ".join(words)
    if "count" in kinds:
        return f"as many {body} as {kinds['count']}"
    return f"{'a' if count == 1 else _num(count)} {body}"


def _reason_split(category: str, clues: list[Clue], shape: str, color: str) -> tuple[str, str]:
    """(key, split) of a reasoning task.

    The held-out combination is (knowledge item, the explicit attribute it is combined with) for
    one clue, the pair of items for two. An index sum picks one combination in 3 (in 5 for shape
    items x colours, and for item pairs); the parity of the (first) item picks val or test.
    """
    idx = [_TABLES[c.kind].index(c.item) for c in clues]
    if category == "reason_combo":
        return "|".join(c.item for c in clues), _split(sum(idx) % 5 == 0, idx[0])
    if clues[0].kind == "shape":
        j, other, modulus = K.COLORS.index(color), color, 5
    else:
        j, other, modulus = K.SHAPES.index(shape), shape, 3
    return f"{clues[0].item}|{other}", _split((idx[0] + j) % modulus == 0, idx[0])


def _reasoning(category: str, rng: np.random.Generator) -> ShapesProblem:
    """Group 0 carries the indirect attribute(s); others (if any) are explicit."""
    items = {k: _pick(rng, table) for k, table in _TABLES.items()}
    combos = [("shape", "color"), ("color", "count"), ("shape", "count")]
    kinds = {"reason_color": ("color",), "reason_shape": ("shape",), "reason_count": ("count",),
             "reason_combo": _pick(rng, combos)}[category]
    clues = [Clue(k, items[k], 0) for k in kinds]
    shape = K.SHAPE_ITEMS[items["shape"]] if "shape" in kinds else _pick(rng, K.SHAPES)
    color = K.COLOR_ITEMS[items["color"]] if "color" in kinds else _pick(rng, K.COLORS)
    base = "single" if "count" in kinds else _pick(rng, ["single", "count", "pair", "relation"])
    if "count" in kinds:
        count = K.COUNT_ITEMS[items["count"]][2]
    else:
        count = int(rng.integers(2, K.MAX_OBJECTS + 1)) if base == "count" else 1
    groups, relation = [ObjectGroup(shape, color, count)], None
    prompt = _phrase(count, shape, color, clues)
    if base in ("pair", "relation"):
        other = ObjectGroup(*_other_object(rng, (shape, color), distinct_both=False))
        relation = _pick(rng, K.RELATIONS) if base == "relation" else None
        groups.append(other)
        prompt += f" {relation or 'and'} {describe_group(other)}"
    key, split = _reason_split(category, clues, shape, color)
    spec, clues_t = Spec(tuple(groups), relation), tuple(clues)
    response = _response(_facts(clues_t, spec), spec)
    return ShapesProblem(prompt, category, spec, spec, response, describe(spec), True, key, split, clues_t)


def sample_task(category: str, rng: np.random.Generator) -> ShapesProblem:
    """One random task of ``category`` (any split)."""
    if category in DIRECT:
        return _direct(category, rng)
    if category in REASONING:
        return _reasoning(category, rng)
    raise ValueError(f"unknown category {category!r}; known: {all_categories()}")


def in_split(task: ShapesProblem, split: str) -> bool:
    """Whether ``task`` belongs to ``split`` ('valtest' combos are in both val and test)."""
    return task.split in ("all", split) or (task.split == "valtest" and split != "train")


def _allocate(n: int, weights: dict[str, float]) -> list[str]:
    """Exactly proportional category list of length n (largest remainder), in category order."""
    cats = list(weights)
    w = np.array([weights[c] for c in cats], dtype=float)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"category weights must be >= 0 with a positive sum, got {weights}")
    quota = n * w / w.sum()
    counts = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [c for c, k in zip(cats, counts) for _ in range(k)]


def make_tasks(split: str, n: int, seed: int = 0,
               weights: dict[str, float] | None = None) -> list[ShapesProblem]:
    """``n`` tasks of ``split`` ('train' | 'val' | 'test'), deterministic given (split, n, seed).

    Categories are allocated exactly in proportion to ``weights`` (default: uniform over
    ``all_categories()``), then shuffled; within a category, tasks are drawn at random from the
    combinations that belong to the split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    weights = weights or {c: 1.0 for c in all_categories()}
    unknown = set(weights) - set(all_categories())
    if unknown:
        raise ValueError(f"unknown categories in weights: {sorted(unknown)}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    cats = _allocate(n, weights)
    tasks = []
    for i in rng.permutation(len(cats)):
        while True:  # rejection keeps the within-category distribution identical across splits
            task = sample_task(cats[i], rng)
            if in_split(task, split):
                tasks.append(task)
                break
    return tasks


def wrong_reasoning(task: ShapesProblem, rng: np.random.Generator) -> tuple[str, Spec]:
    """Plausible but wrong reasoning for a reasoning-required task: one fact is corrupted
    ("a lemon is green .", "a triangle has four corners .", "two plus one is four .") and the
    description follows the wrong fact. Returns (response text, wrong target spec).
    """
    if not task.clues:
        raise ValueError(f"task {task.prompt!r} has no knowledge to get wrong")
    for ci in rng.permutation(len(task.clues)):
        clue = task.clues[ci]
        g = task.target.groups[clue.group]
        if clue.kind == "color":
            options = [replace(g, color=c) for c in K.COLORS if c != g.color]
        elif clue.kind == "shape":
            options = [replace(g, shape=s) for s in K.SHAPES if s != g.shape]
        else:  # off by one, staying in the drawable range of count facts
            options = [replace(g, count=m) for m in K.FACT_COUNTS if abs(m - g.count) == 1]
        valid = []
        for new in options:
            groups = list(task.target.groups)
            groups[clue.group] = new
            try:
                valid.append(Spec(tuple(groups), task.target.relation))
            except ValueError:  # e.g. the new colour collides with the other group
                continue
        if valid:
            wrong = valid[int(rng.integers(len(valid)))]
            return _response(_facts(task.clues, wrong), wrong), wrong
    raise ValueError(f"no valid wrong reasoning for {task.prompt!r}")
