"""GenEval-like rule-based reward of the shapes world, plus its image statistics for hacking checks.

Detected objects (``detect.py``) are matched to the prompt's ground-truth ``Spec`` (never to the
model's reasoning). For group j with required count n_j, ``found_j`` counts detected objects of its
shape and colour (any palette colour if the group's colour is free). Partial credit::

    q_j     = min(found_j, n_j) / max(found_j, n_j)        (too few and too many both cost)
    base    = (sum_j q_j + [relation holds]) / (groups + has_relation)
    extra   = detected objects that match no group (wrong colour/shape, junk blobs >= 4 px)
    score   = base / (1 + 0.5 * extra)                      in [0, 1]

``correct`` (strict, GenEval-style): every found_j == n_j, no extra object, relation holds.

``dense`` (the ``shapes_dense`` training reward, opt-in) adds partial credit per attribute to the
per-group terms: for every shape the prompt needs, ``min(found_s, need_s) / max(found_s, need_s)``
counting objects of that shape in any colour, and the same for every colour it needs (only when
every group names its colour)::

    dense = (sum_j q_j + sum_s q_s + sum_c q_c + [relation holds]) / (number of terms)
            / (1 + 0.5 * extra)

so the right shapes in a wrong colour keep their shape credit, which ``score`` gives only to
objects right in every attribute; a ground-truth image scores 1 in both.
The relation compares centroids of the two groups' objects ("left of": x_A < x_B - size/16 px;
"above": y_A < y_B - size/16), and is false when either group is not found exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unigrpo.utils.images import image_stats, to_numpy_images
from unigrpo.world.detect import UNKNOWN_COLOR, classify_pixels, detect
from unigrpo.world.knowledge import COLORS, MAX_OBJECTS, RELATIONS, SHAPES
from unigrpo.world.render import render_batch
from unigrpo.world.spec import Spec, parse_description, split_response

EXTRA_PENALTY = 0.5
NC, NS = len(COLORS) + 1, len(SHAPES) + 1  # with the unknown colour / shape


@dataclass
class ScoreResult:
    """Per-image results, all [B] numpy arrays. Checks are 1.0 / 0.0, NaN where not applicable."""

    score: np.ndarray  # float partial credit in [0, 1]
    dense: np.ndarray  # float partial credit with per-attribute terms in [0, 1] (module docstring)
    correct: np.ndarray  # bool, strict
    count_ok: np.ndarray  # total number of objects right
    shape_ok: np.ndarray  # number of objects of every shape right (colours ignored)
    color_ok: np.ndarray  # number of objects of every colour right (NaN: prompt frees colours)
    relation_ok: np.ndarray  # NaN without a relation
    n_objects: np.ndarray  # int, detected objects
    n_extra: np.ndarray  # int, detected objects matching no group

    def summary(self) -> dict[str, float]:
        """Means over the batch (checks: over the images where they apply)."""
        out = {"score": float(self.score.mean()), "accuracy": float(self.correct.mean())}
        for k in ("count_ok", "shape_ok", "color_ok", "relation_ok"):
            v = getattr(self, k)
            out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        out["n_extra"] = float(self.n_extra.mean())
        return out


def _spec_arrays(specs: list[Spec]):
    """Specs -> padded arrays shape/colour/count [B, G] and relation [B].

    Colour -1 = free, count 0 = padding group, relation -1 = none.
    """
    b = len(specs)
    g_shape = np.zeros((b, MAX_OBJECTS), dtype=np.int64)
    g_color = np.full((b, MAX_OBJECTS), -1, dtype=np.int64)
    g_count = np.zeros((b, MAX_OBJECTS), dtype=np.int64)
    rel = np.full(b, -1, dtype=np.int64)
    for i, s in enumerate(specs):
        for j, g in enumerate(s.groups):
            g_shape[i, j], g_count[i, j] = SHAPES.index(g.shape), g.count
            g_color[i, j] = -1 if g.color is None else COLORS.index(g.color)
        rel[i] = -1 if s.relation is None else RELATIONS.index(s.relation)
    return g_shape, g_color, g_count, rel


def _relation(objs, g_shape, g_color, found, rel, b: int, size: int) -> np.ndarray:
    """Bool [B]: the relation between groups 0 and 1 holds (False where it cannot be judged)."""
    cents = []
    for j in (0, 1):
        s, c = g_shape[objs.image, j], g_color[objs.image, j]
        hit = (objs.shape == s) & np.where(c < 0, objs.color < UNKNOWN_COLOR, objs.color == c)
        cents.append([np.bincount(objs.image[hit], v[hit], b) for v in (objs.cx, objs.cy)])
    (x0, y0), (x1, y1) = cents  # valid only where each group is found exactly once
    tol = size / 16  # 2 px at 32: ground-truth layouts separate centroids by >= 8 px
    holds = np.select([rel == 0, rel == 1, rel == 2, rel == 3],
                      [x0 < x1 - tol, x0 > x1 + tol, y0 < y1 - tol, y0 > y1 + tol], False)
    assert RELATIONS == ("left of", "right of", "above", "below")  # order used just above
    return holds & (found[:, 0] == 1) & (found[:, 1] == 1)


def score_images(images, specs) -> ScoreResult:
    """Score a batch against ground-truth specs.

    images: torch float [B, 3, H, W] in [0, 1] (or numpy uint8 [B, H, W, 3]); specs: [B] Spec or
    spec dicts (``Spec.to_dict`` / ``ShapesProblem.to_metadata()["spec"]``).
    """
    specs = [s if isinstance(s, Spec) else Spec.from_dict(s) for s in specs]
    img = to_numpy_images(images)
    b, size = img.shape[0], min(img.shape[1:3])
    if len(specs) != b:
        raise ValueError(f"{b} images but {len(specs)} specs")
    objs = detect(img)
    counts = np.bincount((objs.image * NC + objs.color) * NS + objs.shape, minlength=b * NC * NS)
    counts = counts.reshape(b, NC, NS)  # [B, colour (+unknown), shape (+unknown)]
    g_shape, g_color, g_count, rel = _spec_arrays(specs)
    rows = np.arange(b)[:, None]
    free = counts[:, :UNKNOWN_COLOR, :].sum(1)[rows, g_shape]  # any palette colour
    found = np.where(g_color >= 0, counts[rows, np.maximum(g_color, 0), g_shape], free)
    found = np.where(g_count > 0, found, 0)  # [B, G]
    valid = g_count > 0
    q = np.where(valid, np.minimum(found, g_count) / np.maximum(np.maximum(found, g_count), 1), 0.0)
    has_rel = rel >= 0
    rel_ok = _relation(objs, g_shape, g_color, found, rel, b, size)
    base = (q.sum(1) + (rel_ok & has_rel)) / (valid.sum(1) + has_rel)
    n_obj = counts.sum((1, 2))
    extra = n_obj - found.sum(1)  # groups are disjoint (Spec validation), so no double counting
    correct = (found == g_count).all(1) & (extra == 0) & (rel_ok | ~has_rel)
    # Attribute checks, each ignoring the other attributes (diagnostics, not part of the score).
    need_shape = np.zeros((b, NS), dtype=np.int64)
    need_color = np.zeros((b, NC), dtype=np.int64)
    np.add.at(need_shape, (np.repeat(np.arange(b), MAX_OBJECTS), g_shape.ravel()), g_count.ravel())
    np.add.at(need_color, (np.repeat(np.arange(b), MAX_OBJECTS), np.maximum(g_color, 0).ravel()),
              g_count.ravel())
    explicit = np.array([s.concrete for s in specs])
    # dense: + a term per needed shape (any colour) and per needed colour (any shape; concrete specs)
    q_shape = _ratio(counts.sum(1), need_shape)  # [B, NS]
    q_color = np.where(explicit[:, None], _ratio(counts.sum(2), need_color), 0.0)  # [B, NC]
    n_color = np.where(explicit, (need_color > 0).sum(1), 0)
    dense = ((q.sum(1) + q_shape.sum(1) + q_color.sum(1) + (rel_ok & has_rel))
             / (valid.sum(1) + (need_shape > 0).sum(1) + n_color + has_rel))
    return ScoreResult(
        score=base / (1.0 + EXTRA_PENALTY * extra), dense=dense / (1.0 + EXTRA_PENALTY * extra), correct=correct,
        count_ok=(n_obj == g_count.sum(1)).astype(float),
        shape_ok=(counts.sum(1) == need_shape).all(1).astype(float),
        color_ok=np.where(explicit, (counts.sum(2) == need_color).all(1), np.nan),
        relation_ok=np.where(has_rel, rel_ok, np.nan), n_objects=n_obj, n_extra=extra)


def _ratio(found: np.ndarray, need: np.ndarray) -> np.ndarray:
    """``min(found, need) / max(found, need)`` where ``need > 0``, else 0 (too few and too many cost)."""
    return np.where(need > 0, np.minimum(found, need) / np.maximum(np.maximum(found, need), 1), 0.0)


def shapes_dense_reward(images, prompts, metadata) -> torch.Tensor:
    """``shapes_reward`` with per-attribute partial credit (``ScoreResult.dense``); same protocol."""
    del prompts
    return torch.as_tensor(score_images(images, [m["spec"] for m in metadata]).dense, dtype=torch.float32)


def shapes_reward(images, prompts, metadata) -> torch.Tensor:
    """Reward protocol: (images [B, 3, H, W], prompts [B], metadata [B] dicts) -> [B] float32.

    ``metadata[i]`` is ``ShapesProblem.to_metadata()`` (only its ``"spec"`` is read); ``prompts`` is unused
    because the spec is the prompt's ground truth.
    """
    del prompts
    res = score_images(images, [m["spec"] for m in metadata])
    return torch.as_tensor(res.score, dtype=torch.float32)


def evaluate_images(images, tasks, responses: list[str] | None = None) -> dict:
    """Strict accuracy and mean score, overall, by direct/reasoning and per category.

    tasks: [B] ``ShapesProblem`` or ``ShapesProblem.to_metadata()`` dicts. With the sampled ``responses`` (reasoning
    + description), also ``reasoning_ok`` (``description_correct``: the description is right) and
    ``accuracy_given_reasoning_ok`` (the image expert's accuracy on those prompts), overall, by
    direct/reasoning and per category. Returns a plain dict of built-ins.
    """
    meta = [t if isinstance(t, dict) else t.to_metadata() for t in tasks]
    specs = [m["spec"] for m in meta]
    images = to_numpy_images(images)  # float32 [B, H, W, 3] in [0, 1]
    res = score_images(images, specs)
    out = {**res.summary(), "n": len(meta), "categories": {}}
    cats = np.array([m["category"] for m in meta])
    needs = np.array([bool(m["requires_reasoning"]) for m in meta])
    desc_ok = None if responses is None else description_correct(responses, specs, size=images.shape[1])

    def mean(x, sel):
        return float(x[sel].mean()) if sel.any() else float("nan")

    def add(d: dict, suffix: str, sel: np.ndarray) -> None:
        d[f"accuracy{suffix}"], d[f"score{suffix}"] = mean(res.correct, sel), mean(res.score, sel)
        if desc_ok is not None:
            d[f"reasoning_ok{suffix}"] = mean(desc_ok, sel)
            d[f"accuracy_given_reasoning_ok{suffix}"] = mean(res.correct, sel & desc_ok)

    return breakdown(out, add, needs, cats)  # overall accuracy / score equal summary()'s


def breakdown(out: dict, add, needs: np.ndarray, cats: np.ndarray) -> dict:
    """``out`` with ``add(d, suffix, sel)``'s metrics of every row (suffix ""), of the direct and
    the reasoning-required rows (``needs`` [B] bool: ``_direct``, ``_reasoning``) and of each
    category (``cats`` [B]: ``out["categories"][c]``, with its row count ``n``)."""
    add(out, "", np.ones(len(needs), dtype=bool))
    add(out, "_direct", ~needs)
    add(out, "_reasoning", needs)
    for c in dict.fromkeys(cats.tolist()):
        out["categories"][c] = {"n": int((cats == c).sum())}
        add(out["categories"][c], "", cats == c)
    return out


def description_correct(responses: list[str], specs, size: int = 32) -> np.ndarray:
    """Whether each sampled response's explicit description is right for the prompt: bool [B].

    The part after ``</think>`` is parsed (``parse_description``), drawn by the ground-truth
    renderer and scored with the same strict check as the model's images. True means a perfect
    image expert following the description would be correct; a description that does not parse
    or leaves a colour free (the world's descriptions always fix every colour) is False. This
    separates reasoning errors (wrong description) from drawing errors (right description, wrong
    image). specs: [B] Spec or spec dicts of the prompts' ground truth.
    """
    if len(responses) != len(specs):
        raise ValueError(f"{len(responses)} responses but {len(specs)} specs")
    parsed = [parse_description(split_response(r)[1]) for r in responses]
    ok = np.array([p is not None and p.concrete for p in parsed])
    if ok.any():
        idx = np.flatnonzero(ok)
        images = render_batch([parsed[i] for i in idx], seed=0, size=size)
        ok[idx] = score_images(images, [specs[i] for i in idx]).correct
    return ok


def shapes_image_stats(images) -> dict[str, float]:
    """The image statistics a shapes run logs: the generic ones (``utils.images.image_stats``) and
    the world's own, unknown_color_fraction: pixels bright enough to be an object but off the
    world's palette (blur, blends, artefacts)."""
    img = to_numpy_images(images)
    stats = image_stats(img)
    high_freq = stats.pop("high_freq")  # keeps the order the metrics have always had
    return {**stats, "unknown_color_fraction": float((classify_pixels(img) == UNKNOWN_COLOR + 1).mean()),
            "high_freq": high_freq}
