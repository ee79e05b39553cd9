"""Checkpoints that survive crashes, and exact resume.

``output_dir/checkpoint.pt`` holds everything a run needs to continue bit-for-bit: policy weights,
optimizer state, step, data position, config, and the python / numpy / torch (+CUDA) RNG states.
The reference policy never changes, so it is written once, at the start of the run, to
``output_dir/reference.pt``: on resume the reference is the ORIGINAL starting policy even if
``model.checkpoint`` (e.g. ``builtin:sft``) has been replaced since, or was a random init.

Every write goes to a temporary file in the same directory, is flushed and fsync'ed, then
``os.replace``'d over the target (atomic on POSIX), and the directory entry is fsync'ed: a crash
during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["CHECKPOINT", "REFERENCE", "atomic_torch_save", "capture_rng", "load_checkpoint",
           "load_reference", "restore_rng", "save_checkpoint", "save_reference"]

CHECKPOINT, REFERENCE = "checkpoint.pt", "reference.pt"


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (tmp file + fsync + os.replace + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only if something failed before the replace
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)
    return path


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(out_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, data_position: int, config: dict, extra: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint.pt`` atomically. ``step`` = optimisation steps completed."""
    state = {"model": _cpu_state(model), "optimizer": optimizer.state_dict(), "step": step,
             "data_position": data_position, "config": config, "rng": capture_rng(),
             "extra": extra or {}}
    return atomic_torch_save(state, Path(out_dir) / CHECKPOINT)


def save_reference(out_dir: str | Path, reference: torch.nn.Module) -> Path:
    return atomic_torch_save({"model": _cpu_state(reference)}, Path(out_dir) / REFERENCE)


def load_checkpoint(out_dir: str | Path, device: torch.device | str = "cpu") -> dict:
    """The state written by ``save_checkpoint`` (raises FileNotFoundError naming the path)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    # weights_only=False: the state holds RNG states (numpy arrays, tuples) written by this code
    return torch.load(path, map_location=device, weights_only=False)


def load_reference(out_dir: str | Path, device: torch.device | str = "cpu") -> dict | None:
    path = Path(out_dir) / REFERENCE
    return torch.load(path, map_location=device, weights_only=True)["model"] if path.is_file() else None
