"""Atomic checkpoint writes: a crash during a save never corrupts the last good checkpoint."""

import pytest
import torch

from unigrpo.utils import checkpoint as ckpt


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.atomic_torch_save({"step": 1, "w": torch.ones(3)}, tmp_path / "checkpoint.pt")
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"partial")  # some bytes are out ...
        raise OSError("disk full")  # ... then the process dies mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_torch_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_rng_states_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == a
