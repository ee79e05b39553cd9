"""Text rewards: terms that score the sampled reasoning (``metadata["reasoning"]``), not the image."""

from __future__ import annotations

import re

import torch

__all__ = ["reasoning_format"]


def reasoning_format(open_tag: str = "<think>", close_tag: str = "</think>", require_answer: bool = True,
                     min_think_words: int = 1):
    """A factory (built-in ``reasoning_format``): 1.0 when the reasoning has ``open_tag ... close_tag``
    with at least ``min_think_words`` words inside and (``require_answer``) a non-empty answer after
    the closing tag (special tokens such as ``<eos>`` / ``<pad>`` do not count), else 0.0.

    The tiny model's reasoning text is ``"<think> facts </think> description <eos>"``; the tags are
    configurable for models that use others."""
    pattern = re.compile(re.escape(open_tag) + r"(.*?)" + re.escape(close_tag) + r"(.*)", re.DOTALL)

    def score(images, prompts, metadata):
        del images, prompts
        out = []
        for m in metadata:
            found = pattern.search(str(m.get("reasoning", "")))
            ok = found is not None and len(found.group(1).split()) >= min_think_words
            if ok and require_answer:
                answer = [w for w in found.group(2).split() if not (w.startswith("<") and w.endswith(">"))]
                ok = bool(answer)
            out.append(1.0 if ok else 0.0)
        return torch.tensor(out, dtype=torch.float32)

    return score
