"""Checkpoints that survive crashes, and exact resume.

A checkpoint is two files in ``output_dir``: ``policy_stepNNNNNN.safetensors``, the model's
trainable state (``UnifiedModel.trainable_state``: the whole tiny model, only the adapters of a LoRA
model), and ``checkpoint.pt``, which names that file and holds the rest a run needs to continue
bit-for-bit: optimizer state, step, data position, config, and the python / numpy / torch (+CUDA)
RNG states. ``checkpoint.pt`` is written last and is the pointer: a crash between the two writes
leaves the previous pair intact (the older policy file is removed only after the new pointer).
The reference policy never changes, so it is written once, at the start of the run, to
``output_dir/reference.pt``: on resume the reference is the ORIGINAL starting policy even if
``model.checkpoint`` (e.g. ``builtin:sft``) has been replaced since, or was a random init.

Every rank calls ``save_checkpoint`` (a sharded model gathers its state there); rank 0 writes.
Every write goes to a temporary file in the same directory, is flushed and fsync'ed, then
``os.replace``'d over the target (atomic on POSIX), and the directory entry is fsync'ed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["CHECKPOINT", "REFERENCE", "atomic_save", "atomic_torch_save", "capture_rng", "load_checkpoint",
           "load_reference", "restore_rng", "resume", "save_checkpoint", "save_reference"]

CHECKPOINT, REFERENCE = "checkpoint.pt", "reference.pt"


def atomic_save(write, path: str | Path) -> Path:
    """``write(file)`` to ``path`` atomically (tmp file + fsync + os.replace + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
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


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_save(lambda f: torch.save(obj, f), path)


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    return atomic_save(lambda f: f.write(save(state, metadata=metadata)), path)


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


def _cpu_state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(out_dir: str | Path, *, model, optimizer: torch.optim.Optimizer, step: int,
                    data_position: int, config: dict, is_main: bool, extra: dict | None = None) -> None:
    """Write the checkpoint of ``step`` (optimisation steps completed). Called on every rank."""
    out = Path(out_dir)
    policy = model.trainable_state()  # every rank: a sharded model gathers here
    if not is_main:
        return
    name = f"policy_step{step:06d}.safetensors"
    _save_safetensors(policy, out / name, {"step": str(step)})
    state = {"policy": name, "optimizer": optimizer.state_dict(), "step": step, "data_position": data_position,
             "config": config, "rng": capture_rng(), "extra": extra or {}}
    atomic_torch_save(state, out / CHECKPOINT)  # the pointer: from now on `name` is the checkpoint
    for old in out.glob("policy_step*.safetensors"):
        if old.name != name:
            old.unlink()


def save_reference(out_dir: str | Path, reference) -> Path:
    return atomic_torch_save({"model": _cpu_state(reference)}, Path(out_dir) / REFERENCE)


def load_checkpoint(out_dir: str | Path, device: torch.device | str = "cpu") -> dict:
    """The state written by ``save_checkpoint``, with the policy weights under ``"model"``
    (raises FileNotFoundError naming the path)."""
    from safetensors.torch import load_file

    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    # weights_only=False: the state holds RNG states (numpy arrays, tuples) written by this code
    state = torch.load(path, map_location=device, weights_only=False)
    policy = Path(out_dir) / state["policy"]
    if not policy.is_file():
        raise FileNotFoundError(f"{path} names policy weights that are missing: {policy}")
    state["model"] = load_file(str(policy), device=str(device))
    return state


def load_reference(out_dir: str | Path, device: torch.device | str = "cpu") -> dict | None:
    path = Path(out_dir) / REFERENCE
    return torch.load(path, map_location=device, weights_only=True)["model"] if path.is_file() else None


def resume(out_dir: str | Path, model, ref, optimizer: torch.optim.Optimizer, device) -> dict:
    """Restore a run from ``out_dir``: policy weights, the ORIGINAL reference (when the run has
    one), optimizer and RNG states. Returns the checkpoint's state (step, config, extra)."""
    state = load_checkpoint(out_dir, device)
    model.load_trainable_state(state["model"])
    if ref is not None:
        ref_state = load_reference(out_dir, device)
        if ref_state is None:
            raise FileNotFoundError(f"resume needs the reference policy {Path(out_dir) / REFERENCE}")
        ref.load_state_dict(ref_state)
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    return state
