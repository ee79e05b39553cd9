"""Fixtures of the reliability tests: the recipe tests' tiny random model and tiny sizes (imported
from tests/recipe/conftest.py by path, so the two conftest modules never shadow each other), a
reward that raises, and a helper that runs the CLI in-process and returns (code, stderr lines)."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipe"
for p in (HERE, RECIPE):  # `smooth_reward:...` and `faulty_reward:...` import as dotted-path rewards
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

_spec = importlib.util.spec_from_file_location("recipe_conftest_for_reliability", RECIPE / "conftest.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)
MODEL, SIZES, RUN = recipe.MODEL, recipe.SIZES, recipe.RUN
BAR = re.compile(r"^unigrpo:\s+\d+%\|")  # a tqdm progress bar (its description is "unigrpo")


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


def overrides(checkpoint: str, out_dir, *extra: str) -> list[str]:
    return [*MODEL, *RUN, "eval_every=100", f"model.checkpoint={checkpoint}", f"output_dir={out_dir}", *extra]


def error_lines(err: str) -> list[str]:
    """stderr without progress-bar frames (tqdm redraws with \\r on stderr)."""
    parts = [p.strip() for chunk in err.split("\n") for p in chunk.split("\r")]
    return [p for p in parts if p and not BAR.match(p)]


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    from unigrpo.cli import main

    code = main(argv)
    return code, error_lines(capsys.readouterr().err)
