"""Model adapters. ``load_model(cfg)`` is how recipes get the model named by ``cfg.model``."""

from __future__ import annotations

from unigrpo.models.protocol import TokenBatch, UnifiedModel

__all__ = ["TokenBatch", "UnifiedModel", "build_model", "load_model"]


def build_model(cfg):
    """A randomly initialised tiny model with the config's sizes and the world tokenizer."""
    from unigrpo.models.tiny import TinyConfig, TinyUnifiedModel
    from unigrpo.world.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer()
    m = cfg.model
    tiny = TinyConfig(vocab_size=tok.vocab_size, d_text=m.d_text, text_layers=m.text_layers,
                      text_heads=m.text_heads, unet_channels=tuple(m.unet_channels),
                      image_size=m.image_size, max_seq_len=m.max_seq_len)
    return TinyUnifiedModel(tiny, tok)


def load_model(cfg, checkpoint: str | None = "__from_cfg__"):
    """The model of ``cfg.model`` (weights from ``checkpoint`` or ``cfg.model.checkpoint``;
    ``None`` = random init), on ``cfg.device``, in eval mode (no dropout; rollout == training)."""
    from unigrpo.models.tiny import TinyUnifiedModel

    ckpt = cfg.model.checkpoint if checkpoint == "__from_cfg__" else checkpoint
    model = build_model(cfg) if ckpt is None else TinyUnifiedModel.load(ckpt)
    return model.to(cfg.device).eval()
