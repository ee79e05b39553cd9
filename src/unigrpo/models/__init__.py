"""Model adapters. ``build_model(cfg, device)`` is how every recipe gets the model of ``cfg.model``.

``KINDS`` maps ``model.kind`` to the adapter's builder, ``"module:function"``, imported only when
that kind is used (an HF or Bagel adapter pulls in heavy packages). A builder takes
``(cfg, checkpoint)`` and returns a ``UnifiedModel``; its config section is the dataclass of that
kind in the light module beside it (``tiny_config.py``, ``hf_config.py``, ``bagel_config.py``;
``model.kind`` selects it from ``unigrpo.config.ModelConfig``).

The protocol names are imported on first use: ``unigrpo.config`` imports the config modules of
this package, and importing it must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unigrpo.models.base import UnifiedModel

__all__ = ["KINDS", "ReferencePolicy", "TokenBatch", "UnifiedModel", "build_model"]

KINDS: dict[str, str] = {"tiny": "unigrpo.models.tiny:build", "hf": "unigrpo.models.hf:build",
                         "bagel": "unigrpo.models.bagel_io:build"}

FROM_CONFIG = "__from_config__"
_PROTOCOL = {"ReferencePolicy": "base", "TokenBatch": "protocol", "UnifiedModel": "base"}  # where each is defined


def __getattr__(name: str):
    if name in _PROTOCOL:
        return getattr(importlib.import_module(f"unigrpo.models.{_PROTOCOL[name]}"), name)
    raise AttributeError(f"module 'unigrpo.models' has no attribute {name!r}")


def build_model(cfg, device: str | None = None, checkpoint: str | None = FROM_CONFIG) -> UnifiedModel:
    """The model of ``cfg.model`` on ``device`` (default ``cfg.device``), in eval mode (no dropout:
    rollout and training compute the same thing). Weights come from ``checkpoint`` (default
    ``cfg.model.checkpoint``); ``None`` = a random init."""
    kind = cfg.model.kind
    if kind not in KINDS:
        raise ValueError(f"model.kind: no adapter {kind!r} (available: {', '.join(KINDS)})")
    module, _, name = KINDS[kind].partition(":")
    builder = getattr(importlib.import_module(module), name)
    model = builder(cfg, cfg.model.checkpoint if checkpoint == FROM_CONFIG else checkpoint)
    from unigrpo.utils.typed_config import to_dict

    model.configure_decode(token_sampler=cfg.text.token_sampler, static_cache=cfg.text.static_cache,
                           compile=cfg.text.compile)
    model.config_section = to_dict(cfg.model)  # recorded by model.save (what `unigrpo export` rebuilds)
    return model.to(device or cfg.device).eval()
