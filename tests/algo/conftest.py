"""Fixtures of the algo tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Small tensors: one intra-op thread is fastest and does not oversubscribe a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
