"""The adapters the protocol conformance suite (``test_conformance.py``) runs against.

Each adapter is one entry of ``ADAPTERS``: ``model.kind`` -> a factory ``factory(seed=0)`` that
returns ``(model, cfg, prompts)``:

- ``model``: a SMALL model of that kind (seconds on CPU), on CPU, in eval mode, whose every output
  depends on its weights (no zero-initialised head left at zero: the velocity tests would pass
  vacuously on v == 0). Another ``seed`` gives the same architecture with other random weights
  (the suite uses it as "a fresh model" to load states into).
- ``cfg``: the ``unigrpo.config.Config`` the model was built from (``build_model(cfg, checkpoint=...)``
  must rebuild the same architecture from it).
- ``prompts``: 3+ prompts the model's tokenizer understands, of DIFFERENT token lengths (so left
  padding differs from row to row).

To register a new adapter, write its factory below and add one line to ``ADAPTERS``:

    ADAPTERS["hf"] = hf_factory

``test_every_kind_is_tested`` fails while a kind of ``unigrpo.models.KINDS`` has no entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from unigrpo.config import load_config
from unigrpo.models import build_model

TINY = ["model.kind=tiny", "model.checkpoint=null", "model.d_text=32", "model.text_layers=1",
        "model.text_heads=2", "model.unet_channels=[8,16,16]", "model.image_size=16", "device=cpu"]
TINY_PROMPTS = ["a red circle", "two blue squares above a green triangle",
                "a yellow triangle left of a green circle"]


def tiny_factory(seed: int = 0):
    """A random tiny model, every weight perturbed by 0.05 * randn (the UNet's output layer is
    zero-initialised)."""
    cfg = load_config(None, TINY)
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unknown = [w for p in TINY_PROMPTS for w in p.split() if w not in model.tokenizer.index]
    assert not unknown, f"words outside the tiny vocabulary: {unknown}"
    return model.eval(), cfg, list(TINY_PROMPTS)


# model.kind -> factory(seed=0) -> (model, cfg, prompts). One line per adapter.
ADAPTERS: dict[str, Callable[..., tuple[Any, Any, list[str]]]] = {
    "tiny": tiny_factory,
}


@dataclass
class Adapter:
    """One adapter under test: a freshly built model, its config and prompts."""

    kind: str
    model: Any
    cfg: Any
    prompts: list[str]
    factory: Callable[..., tuple[Any, Any, list[str]]]

    def fresh(self, seed: int = 1):
        """Another model of the same architecture and config, with other random weights."""
        return self.factory(seed=seed)[0]


@pytest.fixture(params=sorted(ADAPTERS), ids=str)
def adapter(request) -> Adapter:
    """A new model per test (tests train and load states into it)."""
    factory = ADAPTERS[request.param]
    model, cfg, prompts = factory(seed=0)
    return Adapter(request.param, model, cfg, prompts, factory)


@pytest.fixture
def registered_kinds() -> set[str]:
    """The kinds with an adapter here (test modules cannot import this conftest by name)."""
    return set(ADAPTERS)
