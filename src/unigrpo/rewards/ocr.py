"""The ``ocr`` reward term: text rendering scored by OCR (extra ``ocr``: rapidocr-onnxruntime, which
ships its ONNX weights; nothing is downloaded at run time). About 0.2-0.8 s per image on a CPU, so
run it in a reward thread (``reward_workers``) or serve it (``unigrpo serve-reward ocr``).

The target text is ``metadata[target_key]`` (default ``"text"``) or, without it, the prompt's
first quoted text (``"..."``, ``'...'`` or curly quotes). The score is
``1 - min(1, edit_distance(recognised, target) / len(target))`` after normalisation (lower case and
spaces removed unless told otherwise): 1 for an exact rendering, 0 for nothing legible.
"""

from __future__ import annotations

import re

import numpy as np
import torch

__all__ = ["OcrReward", "edit_distance", "target_text"]

QUOTED = re.compile(r"\"([^\"]+)\"|\u201c([^\u201d]+)\u201d|'([^']+)'")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def target_text(prompt: str, meta: dict, key: str = "text") -> str:
    if meta.get(key):
        return str(meta[key])
    found = QUOTED.search(prompt)
    if found is None:
        raise ValueError(f"ocr reward: no target text: metadata has no {key!r} and the prompt {prompt!r} "
                         f"quotes nothing")
    return next(g for g in found.groups() if g)


class OcrReward:
    """``{name: ocr, kwargs: {target_key: text, case_sensitive: false, ignore_spaces: true, min_side: 64,
    engine_kwargs: {...}}}``; ``engine_kwargs`` go to ``rapidocr_onnxruntime.RapidOCR`` (its config keys,
    e.g. ``intra_op_num_threads: 1``, ``det_limit_side_len: 256`` for small images)."""

    def __init__(self, target_key: str = "text", case_sensitive: bool = False, ignore_spaces: bool = True,
                 min_side: int = 64, engine_kwargs: dict | None = None):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise RuntimeError("the ocr reward needs the 'ocr' extra: pip install 'unigrpo[ocr]'") from e
        self.engine = RapidOCR(**dict(engine_kwargs or {}))  # e.g. {intra_op_num_threads: 1, det_limit_side_len: 256}
        self.target_key, self.case_sensitive, self.ignore_spaces = target_key, case_sensitive, ignore_spaces
        self.min_side = int(min_side)

    def norm(self, s: str) -> str:
        s = s if self.case_sensitive else s.lower()
        return re.sub(r"\s+", "", s) if self.ignore_spaces else " ".join(s.split())

    def read(self, image: torch.Tensor) -> str:
        """[3, H, W] in [0, 1] -> the recognised text (boxes joined by spaces, top to bottom)."""
        arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        side = min(arr.shape[:2])
        if side < self.min_side:  # tiny images: upscale (nearest) so the detector sees strokes
            k = -(-self.min_side // side)
            arr = arr.repeat(k, 0).repeat(k, 1)
        result, _ = self.engine(np.ascontiguousarray(arr[:, :, ::-1]))  # the engine expects BGR
        if not result:
            return ""
        boxes = sorted(result, key=lambda r: (min(p[1] for p in r[0]), min(p[0] for p in r[0])))
        return " ".join(str(r[1]) for r in boxes)

    def score_text(self, recognised: str, target: str) -> float:
        got, want = self.norm(recognised), self.norm(target)
        return 1.0 - min(1.0, edit_distance(got, want) / max(len(want), 1))

    def __call__(self, images, prompts, metadata):
        targets = [target_text(p, m, self.target_key) for p, m in zip(prompts, metadata)]
        return torch.tensor([self.score_text(self.read(img), t) for img, t in zip(images, targets)],
                            dtype=torch.float32)
