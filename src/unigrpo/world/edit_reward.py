"""Rule-based reward of the shapes world's edits: the output must show the edited scene, in place.

Objects are detected as for text-to-image (``detect.py``) and each is assigned to the quadrant of
its centroid. Target object i of an ``EditProblem`` is *found* by a detected object of the same
shape and colour lying in one of its ``allowed[i]`` cells (its own cell; any empty input cell for
an added one; any of the group's cells when a count decreases). ``found`` is the size of a maximum
matching between target objects and detected objects (a detected object finds at most one target)::

    extra     = detected objects that find no target (wrong kind, wrong cell, junk blobs >= 4 px)
    score     = found / targets / (1 + 0.5 * extra)                      in [0, 1]
    correct   = found == targets and extra == 0 and no two objects share a cell
    preserved = every input object the instruction leaves untouched (``EditProblem.kept``) is
                detected unchanged in its cell                            NaN: nothing untouched
    dense     = score with each target credited 1/3 per attribute (shape, colour, cell) of its best
                detected object when it is not found (an image that recolours right but draws
                the wrong shape keeps part of its credit)

So the input returned unchanged, a redraw that moves untouched objects, and an edit applied to the
wrong object all fail ``correct``; ``preserved`` separates "did the edit wrong" from "broke the rest".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from unigrpo.utils.images import to_numpy_images
from unigrpo.world.detect import detect
from unigrpo.world.edit import EditProblem, split_edit_response
from unigrpo.world.knowledge import COLORS, SHAPES
from unigrpo.world.render import QUADRANTS
from unigrpo.world.reward import EXTRA_PENALTY
from unigrpo.world.spec import parse_description


@dataclass
class EditScore:
    """Per-image results, [B] numpy arrays."""

    score: np.ndarray  # float partial credit in [0, 1]
    dense: np.ndarray  # float partial credit with per-attribute terms in [0, 1]
    correct: np.ndarray  # bool, strict
    preserved: np.ndarray  # 1.0 / 0.0, NaN when the edit leaves no input object untouched
    n_objects: np.ndarray  # int, detected objects
    n_extra: np.ndarray  # int, detected objects that find no target

    def summary(self) -> dict[str, float]:
        p = self.preserved
        return {"score": float(self.score.mean()), "accuracy": float(self.correct.mean()),
                "dense": float(self.dense.mean()),
                "preserved": float(np.nanmean(p)) if np.isfinite(p).any() else float("nan"),
                "n_extra": float(self.n_extra.mean())}


def _as_problem(p) -> EditProblem:
    return p if isinstance(p, EditProblem) else EditProblem.from_metadata(p)


def _max_matching(ok: np.ndarray) -> np.ndarray:
    """Maximum matching of the bipartite graph ``ok`` [T, D]: owner [D], the target each detected
    object finds or -1 (Kuhn's augmenting paths; T <= 4, so cheap even with hundreds of blobs)."""
    owner = np.full(ok.shape[1], -1)

    def augment(t: int, seen: np.ndarray) -> bool:
        for d in np.flatnonzero(ok[t] & ~seen):
            seen[d] = True
            if owner[d] < 0 or augment(owner[d], seen):
                owner[d] = t
                return True
        return False

    for t in range(ok.shape[0]):
        augment(t, np.zeros(ok.shape[1], dtype=bool))
    return owner


def _score_one(p: EditProblem, shapes, colors, cells) -> tuple[float, float, bool, float, int]:
    """(score, dense, correct, preserved, extra) of one image; its detected objects as [D] arrays
    (shape and colour indices, quadrant index)."""
    t_shape = np.array([SHAPES.index(o.shape) for o in p.target.objects])
    t_color = np.array([COLORS.index(o.color) for o in p.target.objects])
    in_cell = np.array([[c in a for c in QUADRANTS] for a in p.allowed])[:, cells]  # [T, D]
    same_s, same_c = t_shape[:, None] == shapes[None], t_color[:, None] == colors[None]
    owner = _max_matching(same_s & same_c & in_cell)
    n_t, n_d = len(t_shape), len(shapes)
    found, extra = int((owner >= 0).sum()), int((owner < 0).sum())
    correct = found == n_t and extra == 0 and len(set(cells.tolist())) == n_d
    penalty = 1.0 + EXTRA_PENALTY * extra
    # dense: a target not found gets a third per attribute (shape, colour, cell) it shares with
    # its closest unmatched detected object (< 1, else the matching would have found it)
    unfound = np.ones(n_t, dtype=bool)
    unfound[owner[owner >= 0]] = False
    part = (same_s.astype(float) + same_c + in_cell)[unfound][:, owner < 0] / 3
    dense = found + (part.max(1).sum() if part.size else 0.0)
    seen = set(zip(cells.tolist(), shapes.tolist(), colors.tolist()))
    kept = p.kept()
    preserved = (float(all((QUADRANTS.index(o.cell), SHAPES.index(o.shape), COLORS.index(o.color)) in seen
                           for o in kept)) if kept else float("nan"))
    return found / n_t / penalty, dense / n_t / penalty, correct, preserved, extra


def score_edits(images, problems) -> EditScore:
    """Score a batch of outputs against their edit problems.

    images: torch float [B, 3, H, W] in [0, 1] (or numpy uint8 [B, H, W, 3]); problems: [B]
    ``EditProblem`` or their ``to_metadata()`` dicts.
    """
    problems = [_as_problem(p) for p in problems]
    img = to_numpy_images(images)
    b, h, w = img.shape[:3]
    if len(problems) != b:
        raise ValueError(f"{b} images but {len(problems)} edit problems")
    objs = detect(img)
    cells = 2 * (objs.cy >= h / 2) + (objs.cx >= w / 2)  # index into QUADRANTS of each centroid
    rows = [_score_one(p, objs.shape[sel], objs.color[sel], cells[sel])
            for p, sel in ((p, objs.image == i) for i, p in enumerate(problems))]
    score, dense, correct, preserved, extra = (np.array(x) for x in zip(*rows))
    return EditScore(score, dense, correct.astype(bool), preserved.astype(float),
                     np.bincount(objs.image, minlength=b), extra)


def shapes_edit_reward(images, prompts, metadata) -> torch.Tensor:
    """Reward protocol: (images [B, 3, H, W], prompts [B], metadata [B] dicts) -> [B] float32.

    ``metadata[i]`` holds ``EditProblem.to_metadata()`` (JSON only: works over the reward
    service's wire); ``prompts`` is unused because the problem is the ground truth.
    """
    del prompts
    return torch.as_tensor(score_edits(images, metadata).score, dtype=torch.float32)


def shapes_edit_dense_reward(images, prompts, metadata) -> torch.Tensor:
    """``shapes_edit_reward`` with per-attribute partial credit (``EditScore.dense``); same protocol."""
    del prompts
    return torch.as_tensor(score_edits(images, metadata).dense, dtype=torch.float32)


def same_content(text: str, spec) -> bool:
    """Whether the description ``text`` parses and names the same groups as ``spec`` (any order)."""
    parsed = parse_description(text)
    return parsed is not None and _groups(parsed) == _groups(spec)


def _groups(spec) -> Counter:
    return Counter((g.shape, g.color, g.count) for g in spec.groups)


def responses_correct(responses: list[str], problems) -> tuple[np.ndarray, np.ndarray]:
    """(seen_ok, description_ok) bool [B] of sampled responses: the 'i see ...' part names exactly
    the input's objects (describe-the-input accuracy), and the description after '</think>' names
    exactly the target's (the text expert got the edit right; cells are the image expert's job)."""
    problems = [_as_problem(p) for p in problems]
    if len(responses) != len(problems):
        raise ValueError(f"{len(responses)} responses but {len(problems)} edit problems")
    parts = [split_edit_response(r) for r in responses]
    seen = np.array([same_content(s, p.source.spec()) for (s, _, _), p in zip(parts, problems)])
    desc = np.array([same_content(d, p.target.spec()) for (_, _, d), p in zip(parts, problems)])
    return seen, desc


def evaluate_edits(images, problems, responses: list[str] | None = None) -> dict:
    """Strict accuracy, score, dense and preserved rate, overall, by direct / reasoning-required
    and per category. With the sampled ``responses``: ``seen_ok`` (the input described right),
    ``description_ok`` (the result described right) and ``accuracy_given_description_ok`` (the
    image expert's accuracy where the text expert was right). A plain dict of built-ins."""
    problems = [_as_problem(p) for p in problems]
    res = score_edits(images, problems)
    out = {**res.summary(), "n": len(problems), "categories": {}}
    cats = np.array([p.category for p in problems])
    needs = np.array([p.requires_reasoning for p in problems])
    seen_ok, desc_ok = (None, None) if responses is None else responses_correct(responses, problems)

    def mean(x, sel):
        x = x[sel]
        return float(np.nanmean(x)) if np.isfinite(x.astype(float)).any() else float("nan")

    def add(d: dict, suffix: str, sel: np.ndarray) -> None:
        for k, v in (("accuracy", res.correct), ("score", res.score), ("preserved", res.preserved)):
            d[k + suffix] = mean(v, sel)
        if desc_ok is not None:
            d["seen_ok" + suffix], d["description_ok" + suffix] = mean(seen_ok, sel), mean(desc_ok, sel)
            d["accuracy_given_description_ok" + suffix] = mean(res.correct, sel & desc_ok)

    add(out, "", np.ones(len(problems), dtype=bool))
    add(out, "_direct", ~needs)
    add(out, "_reasoning", needs)
    for c in dict.fromkeys(cats.tolist()):
        out["categories"][c] = {"n": int((cats == c).sum())}
        add(out["categories"][c], "", cats == c)
    return out
