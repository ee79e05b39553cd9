"""Word-level tokenizer over the shapes world's closed vocabulary.

Text is split on whitespace ("." and "," are separate words in every generated text). Special
tokens have fixed ids: <pad>=0, <bos>=1, <eos>=2, <think>=3, </think>=4, <unk>=5; the world's
words follow in sorted order, then the edit words (``knowledge.EDIT_WORDS``) in their listed order:
appended, so the ids of the original vocabulary never move and every id is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unigrpo.world.knowledge import EDIT_WORDS, all_words

SPECIALS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<unk>")


class WordTokenizer:
    """Maps words <-> ids. ``vocab`` must start with ``SPECIALS`` in order."""

    def __init__(self, vocab: list[str]):
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("duplicate words in vocabulary")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        (self.pad_id, self.bos_id, self.eos_id, self.think_id, self.end_think_id,
         self.unk_id) = range(len(SPECIALS))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Whitespace split -> ids; unknown words map to <unk>."""
        ids = [self.index.get(w, self.unk_id) for w in text.split()]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special: bool = False) -> str:
        """ids (list or 1-D tensor) -> space-joined words; ``skip_special`` drops all SPECIALS."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        words = [self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>" for i in ids]
        if skip_special:
            words = [w for w in words if w not in SPECIALS]
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "word", "vocab": self.vocab}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        return cls(list(d["vocab"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_world_tokenizer() -> WordTokenizer:
    """The tokenizer of the built-in world: SPECIALS + every word of ``knowledge.all_words()`` +
    ``knowledge.EDIT_WORDS`` (appended: a checkpoint saved before them keeps its ids)."""
    return WordTokenizer([*SPECIALS, *all_words(), *EDIT_WORDS])
