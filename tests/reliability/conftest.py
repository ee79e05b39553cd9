"""Fixtures of the reliability tests: the recipe tests' tiny random model (helpers and sizes:
reliability_helpers.py; its import also puts this directory and tests/recipe on sys.path, so
``smooth_reward:...`` and ``faulty_reward:...`` import as dotted-path rewards)."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reliability_helpers import MODEL
from testkit import save_tiny_random_model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    return save_tiny_random_model(MODEL, tmp_path_factory.mktemp("relmodel") / "tiny.safetensors")
