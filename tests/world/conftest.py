"""Shared, session-cached fixtures of the shapes-world tests (task generation is the slow part)."""

import pytest

from unigrpo.world import all_categories, make_tasks


@pytest.fixture(scope="session")
def split_tasks():
    """3,000 tasks per split (300 per category)."""
    return {s: make_tasks(s, 300 * len(all_categories()), seed=0) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def all_tasks(split_tasks):
    return [t for ts in split_tasks.values() for t in ts]
