"""The shapes world's closed vocabulary and its fixed body of world knowledge.

Everything a prompt, a reasoning trace or a description can say is listed here, so the tokenizer's
vocabulary is closed and every fact used by the reasoning prompts is checkable. Knowledge items
are (phrase as it appears in a prompt, value) pairs; the reasoning states the fact in one short
sentence (``color_fact`` / ``shape_fact`` / ``count_fact``) that the text model must produce
before it writes the explicit description.
"""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle")  # singular nouns; plural adds "s"
COLORS = ("red", "green", "blue", "yellow", "purple")
RELATIONS = ("left of", "right of", "above", "below")  # "A <relation> B", A is group 0
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4  # total objects in one image (layouts are built for at most a 2x2 grid)
# The longest prompt the generator writes, in world tokens with <bos>: a model reading the world's
# tokens must fit it + the reasoning in its context (the tiny model's config check reads it).
MAX_PROMPT_TOKENS = 19

# Colour knowledge: "a square the color of a lemon" -> yellow. Phrases carry their determiner.
COLOR_ITEMS: dict[str, str] = {
    "a tomato": "red", "a strawberry": "red", "a cherry": "red", "a fire truck": "red",
    "grass": "green", "a frog": "green", "a leaf": "green", "a cucumber": "green",
    "the sky": "blue", "the ocean": "blue", "a blueberry": "blue", "a sapphire": "blue",
    "a lemon": "yellow", "a banana": "yellow", "the sun": "yellow", "a sunflower": "yellow",
    "a grape": "purple", "a plum": "purple", "an eggplant": "purple", "lavender": "purple",
}

# Shape knowledge: "a red thing shaped like a wheel" -> circle. "a pizza" vs "a slice of pizza"
# is deliberate: the reasoning must read the whole phrase.
SHAPE_ITEMS: dict[str, str] = {
    "a wheel": "circle", "a coin": "circle", "a plate": "circle", "a pizza": "circle",
    "a dice": "square", "a chessboard": "square", "a floor tile": "square",
    "a sticky note": "square",
    "a pyramid": "triangle", "a slice of pizza": "triangle", "a tent": "triangle",
    "a sail": "triangle",
}

# Count knowledge: "as many red circles as a bicycle has wheels" -> 2. Each entry is
# (subject, counted noun or None for arithmetic, value); counts stay in 2..4 so that wrong
# (off-by-one) facts also stay drawable.
COUNT_ITEMS: dict[str, tuple[str, str | None, int]] = {
    "a bicycle has wheels": ("a bicycle", "wheels", 2),
    "a tricycle has wheels": ("a tricycle", "wheels", 3),
    "a car has wheels": ("a car", "wheels", 4),
    "a bird has legs": ("a bird", "legs", 2),
    "a stool has legs": ("a stool", "legs", 3),
    "a dog has legs": ("a dog", "legs", 4),
    "a person has eyes": ("a person", "eyes", 2),
    "a triangle has corners": ("a triangle", "corners", 3),
    "a square has corners": ("a square", "corners", 4),
    "a triangle has sides": ("a triangle", "sides", 3),
    "a square has sides": ("a square", "sides", 4),
    "one plus one": ("one plus one", None, 2),
    "two plus one": ("two plus one", None, 3),
    "one plus two": ("one plus two", None, 3),
    "two plus two": ("two plus two", None, 4),
    "three plus one": ("three plus one", None, 4),
    "one plus three": ("one plus three", None, 4),
    "three minus one": ("three minus one", None, 2),
    "four minus one": ("four minus one", None, 3),
    "four minus two": ("four minus two", None, 2),
}
FACT_COUNTS = (2, 3, 4)  # values a count fact (true or wrong) can take

# Fixed sentences of the reasoning for prompts that need no knowledge.
THINK_EXPLICIT = "draw exactly what is asked ."
THINK_FREE_COLOR = "any color will do ."


def color_fact(item: str, color: str) -> str:
    """'a lemon' + 'yellow' -> 'a lemon is yellow .' (``color`` may be a wrong one)."""
    return f"{item} is {color} ."


def shape_fact(item: str, shape: str) -> str:
    """'a wheel' + 'circle' -> 'a wheel looks like a circle .'"""
    return f"{item} looks like a {shape} ."


def count_fact(item: str, n: int) -> str:
    """'a bicycle has wheels' + 2 -> 'a bicycle has two wheels .'; 'two plus one' + 3 ->
    'two plus one is three .'"""
    subject, noun, _ = COUNT_ITEMS[item]
    if noun is None:
        return f"{subject} is {NUMBER_WORDS[n]} ."
    return f"{subject} has {NUMBER_WORDS[n]} {noun} ."


# Words of the prompt templates in tasks.py (kept here so the vocabulary is one closed list).
TEMPLATE_WORDS = ("a", "an", "and", "the", "color", "of", "thing", "things", "shaped", "like", "as",
                  "many", "has", "is", "looks", "any", "will", "do", "draw", "exactly", "what",
                  "asked", ".", ",")


# Words of the edit instructions and of "i see ..." descriptions of an input image (edit.py), then
# those of the reflections of multi-round episodes (refine.py: a verdict, the stop word, what an
# unreadable image shows). They come AFTER the sorted ``all_words()`` in the tokenizer, in this
# order, so every id of the original vocabulary (and of checkpoints trained on it) stays the same.
EDIT_WORDS = ("make", "add", "remove", "swap", "replace", "with", "change", "number", "to", "i",
              "see", "in", "image", "wrong", "done", "nothing", "something", "else")

# The reflection turn of multi-round episodes: what the tiny model reads after the image it drew
# (``TinyUnifiedModel.reflection_prompt``; refine.py has the grammar of the answer).
REFLECT_PROMPT = "is the image right"


def all_words() -> list[str]:
    """Every word that a prompt, reasoning or description of this world can contain, sorted."""
    words = set(TEMPLATE_WORDS) | set(COLORS) | set(NUMBER_WORDS.values())
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    for phrase in [*RELATIONS, *COLOR_ITEMS, *SHAPE_ITEMS, *COUNT_ITEMS]:
        words |= set(phrase.split())
    for subject, noun, _ in COUNT_ITEMS.values():
        words |= set(subject.split()) | ({noun} if noun else set())
    return sorted(words)
