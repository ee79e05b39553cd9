"""Edit problems of the shapes world: an input scene, an instruction, the edited scene.

A ``Scene`` places every object in its own quadrant of the 2x2 grid (``tl``, ``tr``, ``bl``,
``br``) for every count 1..4, so an edit can leave the objects it does not touch where they were.
The text-to-image layouts (centred single object, halves for pairs) are not used here.

Categories (``EDIT_DIRECT``, ``EDIT_REASONING``; ``describe`` only on request):

- ``recolor`` "make the circle blue" · ``add`` "add a red square" (to an empty cell) · ``remove``
  "remove the triangle" · ``swap`` "swap the circle and the square" (their cells exchange) ·
  ``count`` "change the number of circles to three" (added ones go to empty cells, a decrease may
  keep any of the group's objects);
- ``reason_recolor`` "make the square the color of the sky" · ``reason_add`` "add as many red
  triangles as a tricycle has wheels" · ``reason_shape`` "replace the circle with a thing shaped
  like a dice" (same cell and colour, new shape);
- ``describe`` "what is in the image": the target is the input itself, the response describes it.

An object is named by its shape when that is unique in the scene, else by colour and shape; a
scene where neither is unique for the chosen object is redrawn. The response is
``<think> i see {source} . {fact .} </think> {target}`` with canonical ``spec.describe`` texts
(what, not where; groups sorted by shape then colour), so ``parse_description`` reads both the
description of the input and the one after ``</think>``. Problems whose prompt exceeds
``MAX_PROMPT_WORDS`` or whose response exceeds ``MAX_RESPONSE_WORDS`` are redrawn (the same rule in
every split), which keeps busy scenes out of the reasoning categories.

Splits hold out combinations by arithmetic on indices, as ``world.tasks`` does (docs/world.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from unigrpo.world import knowledge as K
from unigrpo.world.render import QUADRANTS, layout_cells, paint
from unigrpo.world.spec import ObjectGroup, Spec, describe, split_response
from unigrpo.world.tasks import SPLITS, _allocate

EDIT_DIRECT = ("recolor", "add", "remove", "swap", "count")
EDIT_REASONING = ("reason_recolor", "reason_add", "reason_shape")
DESCRIBE = "describe"
DESCRIBE_PROMPT = "what is in the image"
# Default mix: 40% reasoning-required (5 x 0.9 direct vs 3 x 1.0 reasoning), no describe problems.
DEFAULT_WEIGHTS = {**{c: 0.9 for c in EDIT_DIRECT}, **{c: 1.0 for c in EDIT_REASONING}}
MAX_PROMPT_WORDS = 14  # the tiny model reads prompt + response in max_seq_len = 64 positions
MAX_RESPONSE_WORDS = 28
_KIND = {"reason_recolor": "color", "reason_add": "count", "reason_shape": "shape"}
_TABLES = {"color": list(K.COLOR_ITEMS), "shape": list(K.SHAPE_ITEMS), "count": list(K.COUNT_ITEMS)}


def edit_categories() -> tuple[str, ...]:
    """Every edit category, direct ones first, ``describe`` last."""
    return EDIT_DIRECT + EDIT_REASONING + (DESCRIBE,)


@dataclass(frozen=True)
class Placed:
    """One object of a scene in quadrant ``cell`` ('tl' | 'tr' | 'bl' | 'br')."""

    shape: str
    color: str
    cell: str

    @property
    def kind(self) -> tuple[str, str]:
        return self.shape, self.color


@dataclass(frozen=True)
class Scene:
    """1..4 objects, one per quadrant. Objects are kept sorted by cell, so equal scenes compare equal."""

    objects: tuple[Placed, ...]

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: QUADRANTS.index(o.cell) if o.cell in QUADRANTS else -1))
        for o in objs:
            if o.shape not in K.SHAPES or o.color not in K.COLORS or o.cell not in QUADRANTS:
                raise ValueError(f"unknown shape/colour/cell in {o}")
        if not 1 <= len(objs) <= K.MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{K.MAX_OBJECTS} objects, got {len(objs)}")
        if len({o.cell for o in objs}) < len(objs):
            raise ValueError(f"two objects in one cell: {objs}")
        object.__setattr__(self, "objects", objs)

    def spec(self) -> Spec:
        """What the scene shows, not where: groups of equal (shape, colour), sorted by shape then colour."""
        kinds = sorted({o.kind for o in self.objects}, key=lambda k: (K.SHAPES.index(k[0]), K.COLORS.index(k[1])))
        return Spec(tuple(ObjectGroup(s, c, sum(o.kind == (s, c) for o in self.objects)) for s, c in kinds))

    def description(self) -> str:
        return describe(self.spec())

    def empty_cells(self) -> tuple[str, ...]:
        used = {o.cell for o in self.objects}
        return tuple(c for c in QUADRANTS if c not in used)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [{"shape": o.shape, "color": o.color, "cell": o.cell} for o in self.objects]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        return Scene(tuple(Placed(o["shape"], o["color"], o["cell"]) for o in d["objects"]))


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: each object jittered inside its quadrant (``render.layout_cells``)."""
    return paint(layout_cells([(o.shape, o.color, o.cell) for o in scene.objects], rng, size), size)


def render_scenes(scenes, seed: int, size: int = 32) -> torch.Tensor:
    """Scenes (or their dicts) -> float32 [B, 3, size, size] in [0, 1], deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    imgs = [render_scene(s if isinstance(s, Scene) else Scene.from_dict(s), rng, size) for s in scenes]
    return torch.from_numpy(np.stack(imgs).astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def render_pair(source: Scene, target: Scene, rng: np.random.Generator,
                size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Input and result images (uint8 [size, size, 3] each) with ONE placement per cell, drawn as
    ``layout_cells`` draws it: an untouched object is at the same pixels in both, a recoloured or
    reshaped one keeps its box, swapped objects take each other's boxes. Training pairs where only
    the edit changes pixels (independent renders would also move every object by its jitter)."""
    placed = layout_cells([("square", "red", c) for c in QUADRANTS], rng, size)  # one box per cell
    boxes = {c: (x, y, s) for c, (_, _, x, y, s) in zip(QUADRANTS, placed)}
    return tuple(paint([(o.shape, o.color, *boxes[o.cell]) for o in scene.objects], size)
                 for scene in (source, target))


def render_edit_pairs(problems, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, results) float32 [B, 3, size, size] in [0, 1] of ``problems`` (``EditProblem`` or
    metadata dicts) by ``render_pair``, deterministic given ``seed``: what edit SFT data trains on."""
    rng = np.random.default_rng(seed)
    probs = [p if isinstance(p, EditProblem) else EditProblem.from_metadata(p) for p in problems]
    src, tgt = zip(*(render_pair(p.source, p.target, rng, size) for p in probs))
    return tuple(torch.from_numpy(np.stack(x).astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
                 for x in (src, tgt))


@dataclass(frozen=True)
class EditProblem:
    """One edit: ``instruction`` turns ``source`` into ``target``.

    ``allowed[i]`` are the cells where ``target.objects[i]`` may be drawn: its own cell for an
    object that stays (or is recoloured, reshaped, swapped), the input's empty cells for an added
    one, the group's input cells when a count decreases. ``target`` is one valid arrangement (the
    ground-truth render); the reward accepts every arrangement ``allowed`` permits.
    ``reasoning`` is the ground-truth response; ``item`` the knowledge item a reasoning edit uses.
    """

    instruction: str
    category: str
    source: Scene
    target: Scene
    allowed: tuple[tuple[str, ...], ...]
    reasoning: str
    requires_reasoning: bool
    key: str  # the held-out combination
    split: str  # "train" | "val" | "test" | "all" (describe: no held-out scheme)
    item: str | None = None

    def kept(self) -> tuple[Placed, ...]:
        """The input's objects the instruction leaves untouched: pinned to their cell and unchanged."""
        pinned = {t for t, a in zip(self.target.objects, self.allowed) if a == (t.cell,)}
        return tuple(o for o in self.source.objects if o in pinned)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able dict (what a reward reads over the wire); the ground-truth response is under
        ``target_reasoning`` because ``reasoning`` is the sampled text in a reward's metadata."""
        return {"instruction": self.instruction, "category": self.category, "source": self.source.to_dict(),
                "target": self.target.to_dict(), "allowed": [list(a) for a in self.allowed],
                "target_reasoning": self.reasoning, "requires_reasoning": self.requires_reasoning,
                "key": self.key, "split": self.split, "item": self.item}

    @staticmethod
    def from_metadata(d: dict[str, Any]) -> EditProblem:
        return EditProblem(d["instruction"], d["category"], Scene.from_dict(d["source"]),
                           Scene.from_dict(d["target"]), tuple(tuple(a) for a in d["allowed"]),
                           d["target_reasoning"], bool(d["requires_reasoning"]), d["key"], d["split"],
                           d.get("item"))


def edit_response(source: Scene, target: Scene, fact: str = "") -> str:
    """'<think> i see {source} . {fact} </think> {target}' (``fact`` ends with ' .' or is empty)."""
    think = f"i see {source.description()} ." + (f" {fact}" if fact else "")
    return f"<think> {think} </think> {target.description()}"


def split_edit_response(response: str) -> tuple[str, str, str]:
    """'<think> i see X . fact . </think> Y <eos>' -> ('X', 'fact .', 'Y'): what the model says it
    sees, the rest of its thought, and its description of the result. ``seen`` is '' when the
    thought does not start with 'i see ... .'."""
    think, desc = split_response(response)
    words = think.split()
    if words[:2] != ["i", "see"] or "." not in words:
        return "", think, desc
    k = words.index(".")
    return " ".join(words[2:k]), " ".join(words[k + 1:]), desc


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _split(held_out: bool, parity: int) -> str:
    return ("val" if parity % 2 == 0 else "test") if held_out else "train"


def _kind_split(shape: str, color: str) -> str:
    """(shape, colour) combinations: one shape per colour held out (5 of 15), val/test by colour."""
    s, c = K.SHAPES.index(shape), K.COLORS.index(color)
    return _split((s + c) % 3 == 0, c)


def _random_scene(rng: np.random.Generator, n: int) -> Scene:
    """n objects in random cells; each copies an earlier object's kind with probability 0.35, so
    groups of equal objects (what count edits change) are common."""
    objs: list[Placed] = []
    for cell in rng.permutation(len(QUADRANTS))[:n]:
        if objs and rng.random() < 0.35:
            shape, color = _pick(rng, objs).kind
        else:
            shape, color = _pick(rng, K.SHAPES), _pick(rng, K.COLORS)
        objs.append(Placed(shape, color, QUADRANTS[cell]))
    return Scene(tuple(objs))


def ref(scene: Scene, obj: Placed) -> str | None:
    """'the circle' when its shape is unique in ``scene``, 'the red circle' when its kind is, else None."""
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return f"the {obj.shape}"
    return f"the {obj.color} {obj.shape}" if sum(o.kind == obj.kind for o in same_shape) == 1 else None


def _pinned(scene: Scene) -> tuple[tuple[str, ...], ...]:
    return tuple((o.cell,) for o in scene.objects)


def _with(source: Scene, drop: tuple[Placed, ...], new: tuple[Placed, ...], free: tuple[str, ...] = ()):
    """(target, allowed): ``source`` minus ``drop`` plus ``new``; new objects in ``free`` cells may
    go to any of them, every other object is pinned to its cell."""
    target = Scene(tuple(o for o in source.objects if o not in drop) + new)
    return target, tuple(free if o in new and o.cell in free else (o.cell,) for o in target.objects)


def _added(source: Scene, shape: str, color: str, k: int, rng, cells=None):
    """Add k objects of one kind to random empty cells (or to ``cells``): any empty cell is right."""
    free = source.empty_cells() if cells is None else cells
    new = tuple(Placed(shape, color, free[i]) for i in sorted(rng.permutation(len(free))[:k]))
    return _with(source, (), new, free)


def _recolored(source: Scene, obj: Placed, color: str):
    return _with(source, (obj,), (replace(obj, color=color),))


def _reshaped(source: Scene, obj: Placed, shape: str):
    return _with(source, (obj,), (replace(obj, shape=shape),))


def _counted(source: Scene, kind: tuple[str, str], m: int, rng):
    """The group of ``kind`` gets m objects: added ones to empty cells; on a decrease, the kept ones
    are drawn at random and may be any m of the group's cells."""
    group = tuple(o for o in source.objects if o.kind == kind)
    if m > len(group):
        return _added(source, *kind, m - len(group), rng)
    cells = tuple(o.cell for o in group)
    new = tuple(Placed(*kind, cells[i]) for i in sorted(rng.permutation(len(cells))[:m]))
    target = Scene(tuple(o for o in source.objects if o.kind != kind) + new)
    return target, tuple(cells if o in new else (o.cell,) for o in target.objects)


def _ref_group(scene: Scene, kind: tuple[str, str]) -> str:
    """'circles' when every circle of ``scene`` has this colour, else 'red circles'."""
    alone = all(o.color == kind[1] for o in scene.objects if o.shape == kind[0])
    return f"{kind[0]}s" if alone else f"{kind[1]} {kind[0]}s"


def _held(idx: int, j: int, modulus: int) -> str:
    """Knowledge item ``idx`` x attribute ``j``: one combination in ``modulus`` held out, val/test
    by the item's parity (the rule of ``world.tasks`` for text-to-image prompts)."""
    return _split((idx + j) % modulus == 0, idx)


# One sampler per category: (source, rng) -> (instruction, (target, allowed), key, split, item, fact),
# or None when the scene does not allow this edit (the caller draws another scene).
def _recolor(src, rng):
    obj = _pick(rng, [o for o in src.objects if ref(src, o)])
    color = _pick(rng, [c for c in K.COLORS if c != obj.color])
    return (f"make {ref(src, obj)} {color}", _recolored(src, obj, color), f"{color} {obj.shape}",
            _kind_split(obj.shape, color), None, "")


def _reason_recolor(src, rng):
    obj = _pick(rng, [o for o in src.objects if ref(src, o)])
    item = _pick(rng, [i for i, c in K.COLOR_ITEMS.items() if c != obj.color])
    color = K.COLOR_ITEMS[item]
    return (f"make {ref(src, obj)} the color of {item}", _recolored(src, obj, color), f"{item}|{obj.shape}",
            _held(_TABLES["color"].index(item), K.SHAPES.index(obj.shape), 3), item, K.color_fact(item, color))


def _reason_shape(src, rng):
    obj = _pick(rng, [o for o in src.objects if ref(src, o)])
    item = _pick(rng, [i for i, s in K.SHAPE_ITEMS.items() if s != obj.shape])
    shape = K.SHAPE_ITEMS[item]
    return (f"replace {ref(src, obj)} with a thing shaped like {item}", _reshaped(src, obj, shape),
            f"{item}|{obj.color}", _held(_TABLES["shape"].index(item), K.COLORS.index(obj.color), 5), item,
            K.shape_fact(item, shape))


def _add(src, rng):
    shape, color = _pick(rng, K.SHAPES), _pick(rng, K.COLORS)
    return (f"add a {color} {shape}", _added(src, shape, color, 1, rng), f"{color} {shape}",
            _kind_split(shape, color), None, "")


def _reason_add(src, rng):
    """One object in the input and a fact worth 2 or 3, so an off-by-one wrong fact stays drawable."""
    item = _pick(rng, [i for i, (_, _, v) in K.COUNT_ITEMS.items() if v <= 3])
    v, shape, color = K.COUNT_ITEMS[item][2], _pick(rng, K.SHAPES), _pick(rng, K.COLORS)
    return (f"add as many {color} {shape}s as {item}", _added(src, shape, color, v, rng), f"{item}|{shape}",
            _held(_TABLES["count"].index(item), K.SHAPES.index(shape), 3), item, K.count_fact(item, v))


def _remove(src, rng):
    obj = _pick(rng, [o for o in src.objects if ref(src, o)])
    return (f"remove {ref(src, obj)}", _with(src, (obj,), ()), f"{obj.color} {obj.shape}",
            _kind_split(obj.shape, obj.color), None, "")


def _swap(src, rng):
    named = [o for o in src.objects if ref(src, o)]
    pairs = [(a, b) for a in named for b in named if a.kind != b.kind]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    target = _with(src, (a, b), (replace(a, cell=b.cell), replace(b, cell=a.cell)))
    i, j = sorted(K.SHAPES.index(o.shape) * len(K.COLORS) + K.COLORS.index(o.color) for o in (a, b))
    key = "|".join(sorted(f"{o.color} {o.shape}" for o in (a, b)))
    return f"swap {ref(src, a)} and {ref(src, b)}", target, key, _split((i + j) % 5 == 0, i), None, ""


def _count(src, rng):
    kind = _pick(rng, sorted({o.kind for o in src.objects}))
    k = sum(o.kind == kind for o in src.objects)
    options = [m for m in range(1, K.MAX_OBJECTS + 1) if m != k and len(src.objects) - k + m <= K.MAX_OBJECTS]
    if not options:
        return None
    m = _pick(rng, options)
    return (f"change the number of {_ref_group(src, kind)} to {K.NUMBER_WORDS[m]}", _counted(src, kind, m, rng),
            f"{kind[0]}|{m}", _split((K.SHAPES.index(kind[0]) + m) % 3 == 0, m), None, "")


def _describe(src, rng):
    return DESCRIBE_PROMPT, (src, _pinned(src)), src.description(), "all", None, ""


# category -> (sampler, (min, max) objects in the input)
_SAMPLERS = {"recolor": (_recolor, (1, 4)), "add": (_add, (1, 3)), "remove": (_remove, (2, 4)),
             "swap": (_swap, (2, 4)), "count": (_count, (1, 4)), "reason_recolor": (_reason_recolor, (1, 4)),
             "reason_add": (_reason_add, (1, 1)), "reason_shape": (_reason_shape, (1, 4)),
             DESCRIBE: (_describe, (1, 4))}


def sample_edit(category: str, rng: np.random.Generator) -> EditProblem:
    """One random edit problem of ``category`` (any split)."""
    if category not in _SAMPLERS:
        raise ValueError(f"unknown edit category {category!r}; known: {edit_categories()}")
    sampler, (lo, hi) = _SAMPLERS[category]
    while True:  # redraw scenes that do not allow the edit or give too long a text
        src = _random_scene(rng, int(rng.integers(lo, hi + 1)))
        if not any(ref(src, o) for o in src.objects):
            continue
        drawn = sampler(src, rng)
        if drawn is None:
            continue
        instruction, (target, allowed), key, split, item, fact = drawn
        response = edit_response(src, target, fact)
        if len(instruction.split()) > MAX_PROMPT_WORDS or len(response.split()) > MAX_RESPONSE_WORDS:
            continue
        problem = EditProblem(instruction, category, src, target, allowed, response,
                              category in EDIT_REASONING, key, split, item)
        # a reasoning edit must also have a wrong response that fits (SFT data); lengths do not
        # depend on where added objects go, so a fixed generator keeps ``rng``'s stream unchanged
        if not problem.requires_reasoning or _wrong_options(problem, np.random.default_rng(0)):
            return problem


def make_edit_problems(split: str, n: int, seed: int = 0,
                       weights: dict[str, float] | None = None) -> list[EditProblem]:
    """``n`` problems of ``split`` ('train' | 'val' | 'test'), deterministic given (split, n, seed).

    Categories are allocated exactly in proportion to ``weights`` (default ``DEFAULT_WEIGHTS``: 40%
    reasoning-required, no ``describe``; add ``{"describe": w}`` for describe-the-image data), then
    shuffled; within a category problems are drawn at random from the split's combinations.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    weights = weights or DEFAULT_WEIGHTS
    if unknown := set(weights) - set(edit_categories()):
        raise ValueError(f"unknown edit categories in weights: {sorted(unknown)}; known: {edit_categories()}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])  # 1: a stream apart from make_tasks'
    cats = _allocate(n, weights)
    out = []
    for i in rng.permutation(len(cats)):
        while True:  # rejection keeps the within-category distribution identical across splits
            p = sample_edit(cats[i], rng)
            if p.split in ("all", split):
                out.append(p)
                break
    return out


def _edited(problem: EditProblem) -> Placed:
    """The input object a recolour / reshape edit changes (the one not kept in its cell)."""
    kept = problem.kept()
    return next(o for o in problem.source.objects if o not in kept)


def wrong_edit_reasoning(problem: EditProblem, rng: np.random.Generator) -> tuple[str, Scene]:
    """Plausible but wrong response for a reasoning-required edit: its fact is corrupted ("the sky is
    green .", "a tricycle has two wheels .", "a dice looks like a circle .") and the description of
    the result follows the wrong fact; drawn among the corruptions whose response stays within
    ``MAX_RESPONSE_WORDS`` (``sample_edit`` makes sure there is one). Returns (response, wrong target)."""
    if problem.category not in EDIT_REASONING:
        raise ValueError(f"edit {problem.instruction!r} ({problem.category}) has no knowledge to get wrong")
    return _pick(rng, _wrong_options(problem, rng))


def _wrong_options(problem: EditProblem, rng: np.random.Generator) -> list[tuple[str, Scene]]:
    """Every (response, target) of a corrupted fact whose response fits ``MAX_RESPONSE_WORDS``."""
    src, item = problem.source, problem.item
    if problem.category == "reason_recolor":
        options = [(_recolored(src, _edited(problem), c)[0], K.color_fact(item, c))
                   for c in K.COLORS if c != K.COLOR_ITEMS[item]]
    elif problem.category == "reason_shape":
        options = [(_reshaped(src, _edited(problem), s)[0], K.shape_fact(item, s))
                   for s in K.SHAPES if s != K.SHAPE_ITEMS[item]]
    else:  # off by one, in the drawable range of count facts (reason_add inputs hold one object)
        v = K.COUNT_ITEMS[item][2]
        new = next(o for o in problem.target.objects if o.cell in src.empty_cells())
        options = [(_added(src, new.shape, new.color, m, rng)[0], K.count_fact(item, m))
                   for m in K.FACT_COUNTS if abs(m - v) == 1 and len(src.objects) + m <= K.MAX_OBJECTS]
    texts = [(edit_response(src, t, fact), t) for t, fact in options]
    return [(text, t) for text, t in texts if len(text.split()) <= MAX_RESPONSE_WORDS]
