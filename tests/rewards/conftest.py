"""Fixtures of the reward tests: the recipe tests' tiny random model and sizes, and their rewards
(``smooth_reward:...``) importable by dotted path."""

import importlib.util
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipe"
HERE = Path(__file__).resolve().parent
for p in (RECIPE, HERE):
    if str(p) not in sys.path:
        sys.path.append(str(p))  # appended: a prepended test dir changes how pytest names other test modules

_spec = importlib.util.spec_from_file_location("_recipe_conftest", RECIPE / "conftest.py")
_recipe = importlib.util.module_from_spec(_spec)
sys.modules["_recipe_conftest"] = _recipe  # the tests read its tiny_overrides
_spec.loader.exec_module(_recipe)
tiny_checkpoint = _recipe.tiny_checkpoint  # the same fixture (its own session instance)
