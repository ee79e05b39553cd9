"""Helpers of the reliability tests (a unique module name: ``from conftest import`` can see another
directory's conftest): the recipe tests' tiny sizes (read from tests/recipe/conftest.py by path),
run overrides, and the CLI run in-process returning (code, stderr lines without progress bars)."""

import importlib.util
import re
import sys
from pathlib import Path

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
