"""Fixtures shared by the whole suite."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: the tensors are small, and on 2 shared cores 2 OpenMP threads
    contending with another process made a 2-step training run ~70x slower (measured 175 s vs
    2.5 s). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
