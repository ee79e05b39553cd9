"""The OCR reward (extra ``ocr``: rapidocr-onnxruntime, weights shipped, offline) on text rendered
by Pillow: exact renderings score 1, wrong or missing text less; the target comes from
``metadata["text"]`` or the prompt's quoted text."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from unigrpo.rewards.ocr import edit_distance, target_text

FAST = {"intra_op_num_threads": 1, "det_limit_side_len": 128, "use_cls": False}  # small images, 1 core


def render(text: str) -> torch.Tensor:
    im = Image.new("RGB", (192, 64), "white")
    ImageDraw.Draw(im).text((8, 14), text, fill="black", font=ImageFont.load_default(size=28))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)


def test_edit_distance_and_targets():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert target_text('a sign that says "Open Late"', {}) == "Open Late"
    assert target_text("a poster reading \u201cUNI\u201d", {}) == "UNI"
    assert target_text('says "x"', {"text": "from metadata"}) == "from metadata"
    with pytest.raises(ValueError, match="no target text"):
        target_text("a plain prompt", {})


def test_ocr_scores_rendered_text():
    pytest.importorskip("rapidocr_onnxruntime", reason="the 'ocr' extra (rapidocr-onnxruntime) is not installed")
    from unigrpo.rewards import RewardSet

    rs = RewardSet([("ocr", 1.0, {"engine_kwargs": FAST})])
    images = torch.stack([render("HELLO"), render("unigrpo"), render("unigrpo"), render("")])
    prompts = ['a sign that says "hello"', "a mug", "a mug", "a blank card"]
    meta = [{}, {"text": "unigrpo"}, {"text": "unigrpa"}, {"text": "cat"}]
    scores = rs(images, prompts, meta).total.tolist()
    assert scores[0] == 1.0 and scores[1] == 1.0  # case-insensitive exact
    assert scores[2] == pytest.approx(1 - 1 / 7)  # one substitution out of 7 characters
    assert scores[3] == 0.0  # nothing legible
