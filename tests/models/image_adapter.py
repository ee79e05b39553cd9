"""The tiny model that sees and edits (``TinyConfig(sees_images=True, edits=True)``: patch tokens
before the text, the input latent as extra image-expert channels) as a conformance-suite adapter,
and ``IgnoringTiny``: the same model with the fault the suite must catch (it declares
``sees_images`` but drops the images)."""

from __future__ import annotations

import torch
from conftest import (  # tests/models/conftest.py (imported while this module loads)
    TINY,
    TINY_PROMPTS,
)

from unigrpo.models.protocol import TokenBatch
from unigrpo.models.tiny import TinyUnifiedModel


class IgnoringTiny(TinyUnifiedModel):
    """The fault: claims to see images, never looks at them."""

    def _prefix(self, tokens: TokenBatch):
        return None, None


def seeing_factory(seed: int = 0, cls: type = TinyUnifiedModel):
    """Like ``tiny_factory``: a random tiny model that sees and edits (``model.sees_images`` /
    ``model.edits``; every weight perturbed), of class ``cls``; its prompts carry 0, 1 and 2 images
    (a different count per row)."""
    from unigrpo.config import load_config
    from unigrpo.models import build_model
    from unigrpo.tasks import Prompt

    cfg = load_config(None, [*TINY, "model.sees_images=true", "model.edits=true"])
    m = cfg.model
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    if cls is not type(model):
        model.__class__ = cls  # the faulty twin: same weights and config, its own _prefix
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(100 + seed)
    side = m.image_size
    prompts = [Prompt(text, images=torch.rand(n, 3, side, side, generator=g) if n else None)
               for n, text in zip((1, 0, 2), TINY_PROMPTS)]
    return model.eval(), cfg, prompts
