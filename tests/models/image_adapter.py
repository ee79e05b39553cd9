"""A test adapter that SEES input images: the tiny model with each row's images summarised into
the embedding of its ``<bos>`` token (so the reasoning, the context and the image expert all
depend on them, row by row). It exercises the image half of the protocol (``TokenBatch.images``,
``sees_images``) in the conformance suite; no shipped adapter sees images yet.

``IgnoringTiny`` is the same adapter with the fault the suite must catch: it declares
``sees_images`` but drops the images.
"""

from __future__ import annotations

import torch
from conftest import (  # tests/models/conftest.py (imported while this module loads)
    TINY,
    TINY_PROMPTS,
)
from torch import nn

from unigrpo.models.protocol import TokenBatch
from unigrpo.models.tiny import TinyUnifiedModel


class Look(nn.Module):
    """The token embedding, plus ``summary`` [B, D] (set per call) added at each row's first
    ``<bos>`` (the prompt's; a sampled ``<bos>`` later in the row is a token like any other)."""

    def __init__(self, tok: nn.Embedding, bos_id: int):
        super().__init__()
        self.tok, self.bos_id = tok, bos_id
        self.proj = nn.Linear(6, tok.embedding_dim)  # per image: mean and std of each colour channel
        self.summary: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.tok(ids)
        if self.summary is None:
            return e
        bos = ids == self.bos_id
        first = bos & (bos.long().cumsum(1) == 1)
        return e + first[..., None] * self.summary[:, None]


class SeeingTiny(TinyUnifiedModel):
    """The tiny model that sees its input images (module docstring)."""

    sees_images = True

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.text.tok = Look(self.text.tok, tokenizer.bos_id)

    def summary(self, tokens: TokenBatch) -> torch.Tensor | None:
        """[B, D]: the sum over each row's real images of a projection of their colour statistics."""
        if tokens.images is None:
            return None
        x = tokens.images.flatten(3)  # [B, N, 3, HW]
        feats = torch.cat([x.mean(-1), x.std(-1)], -1)  # [B, N, 6]
        return (self.text.tok.proj(feats) * tokens.image_mask[..., None]).sum(1)

    def _seeing(self, tokens: TokenBatch, fn, *args):
        self.text.tok.summary = self.summary(tokens)
        try:
            return fn(tokens, *args)
        finally:
            self.text.tok.summary = None

    def prefill(self, tokens: TokenBatch):
        return self._seeing(tokens, super().prefill)

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0):
        return self._seeing(tokens, super().forward_context, temperature)


class IgnoringTiny(SeeingTiny):
    """The fault: claims to see images, never looks at them."""

    def summary(self, tokens: TokenBatch) -> torch.Tensor | None:
        return None


def seeing_factory(seed: int = 0, cls: type = SeeingTiny):
    """Like ``tiny_factory``: a random tiny model (every weight perturbed), of class ``cls``; its
    prompts carry 0, 1 and 2 images (a different count per row)."""
    from unigrpo.config import load_config
    from unigrpo.models.tiny import TinyConfig
    from unigrpo.tasks import Prompt
    from unigrpo.world.tokenizer import build_world_tokenizer

    cfg = load_config(None, TINY)
    m = cfg.model
    torch.manual_seed(seed)
    tok = build_world_tokenizer()
    model = cls(TinyConfig(vocab_size=tok.vocab_size, d_text=m.d_text, text_layers=m.text_layers,
                           text_heads=m.text_heads, unet_channels=tuple(m.unet_channels), image_size=m.image_size,
                           max_seq_len=m.max_seq_len), tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(100 + seed)
    side = m.image_size
    prompts = [Prompt(text, images=torch.rand(n, 3, side, side, generator=g) if n else None)
               for n, text in zip((1, 0, 2), TINY_PROMPTS)]
    return model.eval(), cfg, prompts
