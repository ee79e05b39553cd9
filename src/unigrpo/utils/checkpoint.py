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

Integrity (docs/reliability.md): the policy file's metadata holds a format version and the sha256
of its tensors (names, dtypes, shapes, bytes); ``checkpoint.pt`` repeats the hash. Loading checks
both, refuses non-finite weights and names the first tensor whose shape does not fit the model, so
a torn, swapped or corrupted checkpoint is one line, never a silently wrong run. ``final.safetensors``
(plain weights for eval/sample) is written with the same atomic rule, at the same step, before the
pointer: it is never behind the checkpoint. Every other weight file carries its hash too
(``hashed_metadata``: ``model.save``; ``reference.pt``) and every load verifies it (``verify_hash``);
a file from before hashes (none recorded) loads as it is. Foreign weights have no hash: they are
checked for NaN / inf at load (``check_finite``), and a folder ``unigrpo export`` wrote against its
``SHA256SUMS`` (``verify_sums``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from unigrpo.utils import dist
from unigrpo.utils.errors import CheckpointError, RunError

__all__ = ["CHECKPOINT", "FORMAT", "REFERENCE", "atomic_save", "atomic_torch_save", "capture_rng", "check_finite",
           "check_fits", "file_sha256", "hashed_metadata", "load_checkpoint", "load_reference", "nonfinite_tensor", "pointed_policy",
           "restore_rng", "resume", "save_checkpoint", "save_reference", "state_hash", "verify_hash", "verify_sums"]

CHECKPOINT, REFERENCE = "checkpoint.pt", "reference.pt"
FORMAT = "1"  # checkpoint format version, in the policy metadata; loading refuses any other


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def nonfinite_tensor(state: dict[str, torch.Tensor]) -> str | None:
    """The first tensor (name order) holding NaN / inf, or None."""
    return next((k for k in sorted(state) if state[k].is_floating_point() and not torch.isfinite(state[k]).all()),
                None)


def hashed_metadata(state: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """``meta`` + the format version and the sha256 of ``state``: what every weight file unigrpo
    writes carries (``verify_hash`` checks it on load)."""
    return {**meta, "format": FORMAT, "sha256": state_hash(state)}


def verify_hash(state: dict[str, torch.Tensor], meta: dict[str, str], source) -> None:
    """The tensors read from ``source`` against the sha256 in its metadata; a file without one
    (written before hashes were recorded) is accepted as it is."""
    if "sha256" in meta and state_hash(state) != meta["sha256"]:
        raise CheckpointError(f"{source}: content hash does not match the one recorded in the file (corrupted or "
                              "modified since unigrpo wrote it); refusing to load it")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sums(folder: str | Path) -> None:
    """The files of a folder ``unigrpo export`` wrote against its ``SHA256SUMS`` (the ``sha256sum``
    format); a folder without one (a release, a hub download) is accepted as it is, and so is a
    listed file that is absent (a partial download fails where the file is read)."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        f = folder / name
        if len(digest) == 64 and name and f.is_file() and file_sha256(f) != digest:
            raise CheckpointError(f"{f}: content hash does not match {sums} (corrupted or modified since unigrpo "
                                  "exported it); refusing to load it")


def check_finite(modules: dict, source) -> None:
    """Every floating parameter and buffer of ``modules`` (name -> nn.Module) is finite: foreign
    weights (a pipeline folder, a released checkpoint) are checked once at load, so a NaN in them
    is one line naming the tensor before a run starts, not a failure mid-rollout."""
    for name, module in modules.items():
        if module is None:
            continue
        for k, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{source}: {name}.{k} holds NaN/inf; refusing to load broken weights")


def check_fits(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source) -> None:
    """Names, then shapes of ``state`` against the model's ``own``: one line naming the first misfit."""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k in sorted(own):
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {list(state[k].shape)}, the model's is "
                                  f"{list(own[k].shape)} (check the model.* size keys)")


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Ctrl-C (SIGINT) inside the block is held and raised as KeyboardInterrupt when it ends: a
    KeyboardInterrupt raised inside torch.save's C++ writer comes out as a RuntimeError ("unexpected
    pos"), so a Ctrl-C during a save would end the run with exit 1 instead of the one-line exit 130
    (docs/reliability.md). Only in the main thread, the only one that receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain (torch.save chains its own RuntimeError)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def atomic_save(write, path: str | Path) -> Path:
    """``write(file)`` to ``path`` atomically (tmp file + fsync + os.replace + directory fsync); a
    Ctrl-C waits for the file to be complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with _ctrl_c_deferred():
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # data on disk before the rename makes it visible
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            if _disk_full(e):  # torch.save's writer says "enforce fail at inline_container.cc" instead
                raise RunError(f"{path}: no space left on device while writing it; the previous file (if any) "
                               "is intact: free some space, then --resume") from e
            raise
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
                    data_position: int, config: dict, is_main: bool, extra: dict | None = None,
                    write_final=None) -> None:
    """Write the checkpoint of ``step`` (optimisation steps completed). Called on every rank.
    ``write_final(path)``: also write the plain weights (``final.safetensors``), before the pointer."""
    out = Path(out_dir)
    policy = model.trainable_state()  # every rank: a sharded model gathers here
    opt_state = dist.full_optimizer_state(optimizer)  # ... and its sharded optimizer state here
    if not is_main:
        return
    name, digest = f"policy_step{step:06d}.safetensors", state_hash(policy)
    _save_safetensors(policy, out / name, {"step": str(step), "format": FORMAT, "sha256": digest})
    if write_final is not None:
        write_final(out / "final.safetensors")
    state = {"policy": name, "sha256": digest, "format": FORMAT, "optimizer": opt_state, "step": step,
             "data_position": data_position, "config": config, "rng": capture_rng(), "extra": extra or {}}
    atomic_torch_save(state, out / CHECKPOINT)  # the pointer: from now on `name` is the checkpoint
    for old in out.glob("policy_step*.safetensors"):
        if old.name != name:
            old.unlink()


def save_reference(out_dir: str | Path, reference) -> Path:
    state = _cpu_state(reference)
    return atomic_torch_save({"model": state, "sha256": state_hash(state)}, Path(out_dir) / REFERENCE)


def _read_pointer(path: Path, device) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:  # weights_only=False: the state holds RNG states (numpy arrays, tuples) written by this code
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, garbage, empty: torch raises many types
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}); it is not a file "
                              f"written by unigrpo train, or it is truncated") from e
    if not isinstance(state, dict) or "policy" not in state:
        raise CheckpointError(f"{path}: not a unigrpo checkpoint (no policy pointer)")
    return state


def pointed_policy(out_dir: str | Path) -> str | None:
    """The policy file ``checkpoint.pt`` names (None if it cannot be read)."""
    try:
        return _read_pointer(Path(out_dir) / CHECKPOINT, "cpu")["policy"]
    except (OSError, CheckpointError):
        return None


def load_checkpoint(out_dir: str | Path, device: torch.device | str = "cpu") -> dict:
    """The state written by ``save_checkpoint``, with the policy weights under ``"model"``, verified:
    format version, sha256 of the tensors (file metadata and pointer agree), finite weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(out_dir) / CHECKPOINT
    state = _read_pointer(path, device)
    policy = Path(out_dir) / state["policy"]
    if not policy.is_file():
        raise FileNotFoundError(f"{path} names policy weights that are missing: {policy}")
    try:
        with safe_open(str(policy), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(policy), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{policy}: unreadable policy weights ({type(e).__name__})") from e
    if meta.get("format") != FORMAT or state.get("format") != FORMAT:
        raise CheckpointError(f"{policy}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT!r}")
    digest = state_hash(weights)
    if digest != meta.get("sha256") or digest != state.get("sha256"):
        raise CheckpointError(f"{policy}: content hash does not match (corrupted, or not the file {path} was "
                              f"written with)")
    if (bad := nonfinite_tensor(weights)) is not None:
        raise CheckpointError(f"{policy}: tensor {bad} holds NaN/inf; refusing to resume from broken weights")
    state["model"] = {k: v.to(device) for k, v in weights.items()}
    return state


def load_reference(out_dir: str | Path, device: torch.device | str = "cpu") -> dict | None:
    path = Path(out_dir) / REFERENCE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        state = saved["model"]
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable reference policy ({type(e).__name__})") from e
    verify_hash(state, saved, path)  # written before hashes: no "sha256", accepted
    return state


def resume(out_dir: str | Path, model, ref, optimizer: torch.optim.Optimizer, device) -> dict:
    """Restore a run from ``out_dir``: policy weights, the ORIGINAL reference (when the run has
    one), optimizer and RNG states. Returns the checkpoint's state (step, config, extra)."""
    state = load_checkpoint(out_dir, device)
    check_fits(state["model"], model.trainable_state(), Path(out_dir) / state["policy"])
    model.load_trainable_state(state["model"])
    if ref is not None:
        ref_state = load_reference(out_dir, device)
        if ref_state is None:
            raise FileNotFoundError(f"resume needs the reference policy {Path(out_dir) / REFERENCE}")
        check_fits(ref_state, ref.state_dict(), Path(out_dir) / REFERENCE)
        ref.load_state_dict(ref_state)
    dist.load_optimizer_state(optimizer, state["optimizer"])  # a sharded model's: this rank's shard
    restore_rng(state["rng"])
    return state
