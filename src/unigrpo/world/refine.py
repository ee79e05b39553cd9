"""Reflections of the shapes world: what a model says when it looks at the image it drew (multi-round
episodes, ``algo.rounds > 1``), and SFT data for them.

Round 1 is the text-to-image task of ``world.tasks``. In round r + 1 the model reads its context,
the image it drew, the reflection turn ``knowledge.REFLECT_PROMPT`` ("is the image right") and
answers with a **reflection** (exact grammar)::

    reflection := "<think> i see " SEEN " . " VERDICT " . </think> " ANSWER
    SEEN       := description of the detected objects (``spec.describe`` of their groups: what, not
                  where; groups sorted by shape then colour)
                | "nothing"                    (no object detected)
                | "something else"             (an object of no known shape / colour, or > 4 objects)
    VERDICT    := "right" | "wrong"            (the image passes / fails the prompt's strict check)
    ANSWER     := "done"                       (VERDICT right: the episode stops, the image is final)
                | description                  (VERDICT wrong: what to draw next, ``spec.describe``)

e.g. ``<think> i see a red circle . wrong . </think> a yellow circle`` or ``<think> i see two blue
squares . right . </think> done``. SEEN is read by the world's detector (``detect.py``), never
copied from the spec, so the data teaches the model to read its own pixels; VERDICT comes from the
same strict check as the reward (``score_images(...).correct``). The stop word is ``done``
(``UnifiedModel.stop_word``).

``reflection_examples`` makes SFT data: a prompt, a first response, the image "drawn" after it
(the right image, the image of a wrong reasoning, or the right description drawn with a drawing
error: ``drawing_error``), and the reflection on that image with the next image to draw.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from unigrpo.world import knowledge as K
from unigrpo.world.detect import UNKNOWN_COLOR, UNKNOWN_SHAPE, detect
from unigrpo.world.render import render_batch
from unigrpo.world.reward import score_images
from unigrpo.world.spec import ObjectGroup, Spec, describe, split_response
from unigrpo.world.tasks import ShapesProblem, wrong_reasoning

NOTHING, UNREADABLE, STOP = "nothing", "something else", "done"
RIGHT, WRONG = "right", "wrong"
# Default mix of the first images: right, a wrong reasoning's image (reasoning-required prompts only;
# the others draw a drawing error instead), a drawing error of the right description.
DEFAULT_MIX = (0.4, 0.3, 0.3)


def seen_descriptions(images) -> list[str]:
    """SEEN of each image [B, 3, H, W] (module docstring): what the detector reads from it."""
    objs = detect(images)
    out = []
    for i in range(len(images)):
        sel = objs.image == i
        shapes, colors = objs.shape[sel], objs.color[sel]
        if not sel.any():
            out.append(NOTHING)
            continue
        if (shapes == UNKNOWN_SHAPE).any() or (colors == UNKNOWN_COLOR).any() or sel.sum() > K.MAX_OBJECTS:
            out.append(UNREADABLE)
            continue
        kinds = sorted(set(zip(shapes.tolist(), colors.tolist())))  # (shape, colour) indices: shape then colour
        groups = tuple(ObjectGroup(K.SHAPES[s], K.COLORS[c], int(((shapes == s) & (colors == c)).sum()))
                       for s, c in kinds)
        out.append(describe(Spec(groups)))
    return out


def reflection(seen: str, right: bool, want: str) -> str:
    """The reflection text (module docstring): ``want`` is what to draw next when the image is wrong."""
    answer = STOP if right else want
    return f"<think> i see {seen} . {RIGHT if right else WRONG} . </think> {answer}"


def parse_reflection(text: str) -> tuple[str, str, str] | None:
    """A reflection (special tokens allowed) -> (SEEN, VERDICT, ANSWER), or None off the grammar."""
    think, answer = split_response(text)
    words = think.split()
    if words[:2] != ["i", "see"] or len(words) < 6 or words[-1] != "." or words[-2] not in (RIGHT, WRONG) \
            or words[-3] != ".":
        return None
    verdict = words[-2]
    if (verdict == RIGHT) != (answer == STOP):
        return None
    return " ".join(words[2:-3]), verdict, answer


def verdict_reward(images, prompts, metadata) -> torch.Tensor:
    """Reward protocol (``shapes_verdict``): 1 where a later round's reflection (``metadata["reflection"]``)
    follows the grammar and its VERDICT is the strict check of the image it looked at
    (``metadata["previous_image"]`` against ``metadata["spec"]``), else 0: round 1, a row that had
    stopped (no reflection) and a reflection off the grammar. An image-only reward never pays for
    what a reflection says; add this term to pay for an honest verdict (docs/demo.md)."""
    del images, prompts
    out = torch.zeros(len(metadata), dtype=torch.float32)
    rows = [i for i, m in enumerate(metadata) if m.get("reflection")]
    if rows:
        right = score_images(torch.stack([metadata[i]["previous_image"].float().cpu() for i in rows]),
                             [metadata[i]["spec"] for i in rows]).correct
        for i, ok in zip(rows, right.tolist()):
            parsed = parse_reflection(metadata[i]["reflection"])
            out[i] = float(parsed is not None and (parsed[1] == RIGHT) == bool(ok))
    return out


def drawing_error(spec: Spec, rng: np.random.Generator) -> Spec:
    """``spec`` (concrete) drawn with one mistake: a group's colour or shape changed, a count off by
    one, or a relation reversed. Always a valid Spec different from ``spec``."""
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    options = []
    for j, g in enumerate(spec.groups):
        alts = [replace(g, color=c) for c in K.COLORS if c != g.color]
        alts += [replace(g, shape=s) for s in K.SHAPES if s != g.shape]
        alts += [replace(g, count=m) for m in (g.count - 1, g.count + 1) if spec.relation is None and m >= 1]
        for new in alts:
            groups = list(spec.groups)
            groups[j] = new
            try:
                options.append(Spec(tuple(groups), spec.relation))
            except ValueError:  # a collision with another group, or too many objects
                continue
    if spec.relation is not None:
        options.append(Spec(spec.groups, opposite[spec.relation]))
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class ReflectionExample:
    """One SFT example of a second round: the prompt, the first response, the image it led to and
    the reflection on it (``next_spec``: what the next image must show)."""

    problem: ShapesProblem
    first_response: str  # round 1: "<think> ... </think> description"
    image: torch.Tensor  # [3, H, W] in [0, 1], the image round 1 drew
    response: str  # the reflection (module docstring)
    next_spec: Spec  # the image of round 2 (the prompt's target; equal to the image's when it was right)

    @property
    def context(self) -> str:
        """Round 2's text before the reflection, in the world's words: prompt, first response (closed
        by ``<eos>``, as the model wrote it), the reflection turn. ``TinyUnifiedModel.prompt_ids``
        of it is the rollout's round-2 context with its pads dropped (positions come from the mask)."""
        return f"{self.problem.prompt} {self.first_response} <eos> {K.REFLECT_PROMPT}"


def reflection_examples(problems: list[ShapesProblem], seed: int, size: int = 32,
                        mix: tuple[float, float, float] = DEFAULT_MIX) -> list[ReflectionExample]:
    """One :class:`ReflectionExample` per problem, deterministic given ``seed``: the first image is
    right, a wrong reasoning's, or a drawing error, drawn in proportion ``mix`` (a problem that needs
    no reasoning draws a drawing error where a wrong reasoning was drawn)."""
    rng = np.random.default_rng([seed, 2])  # 2: a stream apart from make_tasks' and the edit problems'
    firsts, drawn = [], []
    for p in problems:
        u = rng.random()
        if u < mix[0]:
            firsts.append(p.reasoning)
            drawn.append(p.target)
        elif u < mix[0] + mix[1] and p.requires_reasoning:
            response, wrong = wrong_reasoning(p, rng)
            firsts.append(response)
            drawn.append(wrong)
        else:
            firsts.append(p.reasoning)
            drawn.append(drawing_error(p.target, rng))
    images = render_batch(drawn, seed=int(rng.integers(2**31)), size=size)
    right = score_images(images, [p.spec for p in problems]).correct
    seen = seen_descriptions(images)
    return [ReflectionExample(p, first, img, reflection(s, bool(ok), describe(p.target)), p.target)
            for p, first, img, s, ok in zip(problems, firsts, images, seen, right)]
