"""Fixtures of the reliability tests: the recipe tests' tiny random model (helpers and sizes:
reliability_helpers.py; its import also puts this directory and tests/recipe on sys.path, so
``smooth_reward:...`` and ``faulty_reward:...`` import as dotted-path rewards)."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reliability_helpers import MODEL


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    from unigrpo.config import load_config
    from unigrpo.models import build_model

    cfg = load_config(None, MODEL + ["model.checkpoint=null"])
    torch.manual_seed(0)
    model = build_model(cfg, checkpoint=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("relmodel") / "tiny.safetensors"
    model.save(path)
    return str(path)
