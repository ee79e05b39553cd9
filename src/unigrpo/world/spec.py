"""Explicit image specifications and their canonical description grammar.

A ``Spec`` is what an image must show: object groups (shape, colour, count) and an optional
spatial relation between the first two groups. ``color=None`` means "any colour" (prompts such as
"three squares" leave it free; the reasoning then picks one). Canonical grammar::

    description := group ( " and " group )*  |  group " " relation " " group
    group       := "a" [color] shape           (count 1)
                 | number [color] shape "s"    (number in two, three, four)
    relation    := "left of" | "right of" | "above" | "below"   (group 0 relative to group 1)

``describe`` writes it, ``parse_description`` reads it back (``None`` if the text is not a
valid description), so a model's generated description can be checked against the grammar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unigrpo.world.knowledge import COLORS, MAX_OBJECTS, NUMBER_WORDS, RELATIONS, SHAPES

_WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items() if n > 1}


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` objects of one shape and colour (``color=None``: any colour)."""

    shape: str
    color: str | None
    count: int = 1


@dataclass(frozen=True)
class Spec:
    """Ground-truth content of an image. Validated on construction (``ValueError`` if invalid)."""

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None  # groups[0] <relation> groups[1]; needs 2 groups of count 1

    def __post_init__(self) -> None:
        g = self.groups
        if not 1 <= len(g) <= MAX_OBJECTS:
            raise ValueError(f"need 1..{MAX_OBJECTS} groups, got {len(g)}")
        for x in g:
            if x.shape not in SHAPES or (x.color is not None and x.color not in COLORS):
                raise ValueError(f"unknown shape/colour in {x}")
            if x.count < 1:
                raise ValueError(f"count must be >= 1, got {x}")
        if self.total > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects, got {self.total}")
        if len({(x.shape, x.color) for x in g}) < len(g):
            raise ValueError("two groups with the same shape and colour")
        for x in g:  # an any-colour group must own its shape, or matching would be ambiguous
            if x.color is None and sum(y.shape == x.shape for y in g) > 1:
                raise ValueError(f"any-colour group {x.shape} shares its shape with another group")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}")
            if len(g) != 2 or g[0].count != 1 or g[1].count != 1:
                raise ValueError("a relation needs exactly two groups of one object each")

    @property
    def total(self) -> int:
        """Number of objects in the image."""
        return sum(x.count for x in self.groups)

    @property
    def concrete(self) -> bool:
        """True when every colour is fixed (drawable exactly as described)."""
        return all(x.color is not None for x in self.groups)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (what reward metadata carries)."""
        groups = [{"shape": x.shape, "color": x.color, "count": x.count} for x in self.groups]
        return {"groups": groups, "relation": self.relation}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Spec:
        groups = tuple(ObjectGroup(x["shape"], x["color"], int(x["count"])) for x in d["groups"])
        return Spec(groups, d.get("relation"))


def describe_group(g: ObjectGroup) -> str:
    """ObjectGroup('circle', 'red', 2) -> 'two red circles'."""
    color = f"{g.color} " if g.color else ""
    if g.count == 1:
        return f"a {color}{g.shape}"
    return f"{NUMBER_WORDS[g.count]} {color}{g.shape}s"


def describe(spec: Spec) -> str:
    """Canonical description, e.g. 'a red circle left of a blue triangle'."""
    sep = f" {spec.relation} " if spec.relation else " and "
    return sep.join(describe_group(g) for g in spec.groups)


def _parse_group(words: list[str], i: int) -> tuple[ObjectGroup, int] | None:
    """Parse one group starting at ``words[i]``; returns (group, next index) or None."""
    if i >= len(words):
        return None
    count = 1 if words[i] == "a" else _WORD_NUMBERS.get(words[i])
    if count is None:
        return None
    i += 1
    color = None
    if i < len(words) and words[i] in COLORS:
        color, i = words[i], i + 1
    if i >= len(words):
        return None
    noun = words[i]
    shape = noun if count == 1 else (noun[:-1] if noun.endswith("s") else "")
    if shape not in SHAPES:
        return None
    return ObjectGroup(shape, color, count), i + 1


def parse_description(text: str) -> Spec | None:
    """Inverse of ``describe``: canonical description -> Spec, or None if it does not parse."""
    words = text.split()
    groups: list[ObjectGroup] = []
    relation = None
    i = 0
    while True:
        parsed = _parse_group(words, i)
        if parsed is None:
            return None
        group, i = parsed
        groups.append(group)
        if i == len(words):
            break
        if relation is not None:  # a relation joins exactly two groups
            return None
        if words[i] == "and":
            i += 1
            continue
        two = " ".join(words[i:i + 2])
        if groups[1:] or not (words[i] in RELATIONS or two in RELATIONS):
            return None
        relation = words[i] if words[i] in RELATIONS else two
        i += len(relation.split())
    try:
        return Spec(tuple(groups), relation)
    except ValueError:
        return None


def split_response(response: str) -> tuple[str, str]:
    """'<think> facts </think> description <eos>' -> ('facts', 'description').

    Special tokens after the description (<eos>, <pad>) are dropped. Without a '</think>' the whole
    text (minus specials) is taken as the description and the thought is empty.
    """
    words = [w for w in response.split() if w not in ("<eos>", "<pad>", "<bos>")]
    if "</think>" in words:
        k = words.index("</think>")
        think = [w for w in words[:k] if w != "<think>"]
        return " ".join(think), " ".join(words[k + 1:])
    return "", " ".join(w for w in words if w != "<think>")
