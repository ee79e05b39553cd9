"""FSDP2 helpers shared by the sharded adapters (``model.kind: hf`` and ``bagel`` with
``model.fsdp``): whole tensors from shards, in-place write counters (a gathered state knows when
it is stale), loading full tensors shard-wise, and the state ``save`` writes on rank 0.

The protocol's contract (models/protocol.py): every rank calls ``trainable_state`` in the same
order (it gathers: a collective); ``save`` runs on rank 0 alone, so it writes the state that rank
gathered last, refused when a parameter was written since; ``load_trainable_state`` is given the
same full tensors on every rank and keeps this rank's shard (no collective).
"""

from __future__ import annotations

import torch

__all__ = ["GatheredState", "full", "load_full_state", "versions"]


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: gathered from every rank if sharded (a collective)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def versions(params) -> tuple[int, ...]:
    """In-place write counters of ``params``: they change when a step or a load writes a parameter,
    so a gathered state can tell that it is stale (a DTensor's own counter: its local tensor's does
    not move when the DTensor is written)."""
    return tuple(p._version for p in params)


def load_full_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy the full tensors ``state`` into the parameters ``own`` (by name), each sharded one
    keeping this rank's chunk of its own copy (``src_data_rank=None``: no collective). The names
    are checked first: a rejected state leaves the model untouched."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"trainable state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in own.items():
            src = state[n]
            if isinstance(p, DTensor):
                src = distribute_tensor(src.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(src)


class GatheredState:
    """The last gathered trainable state of a sharded model, for ``save`` on rank 0: written once
    (no full copy kept around), refused when a parameter was written after the gather."""

    def __init__(self):
        self._held = None

    def gather(self, own: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
        """Full CPU copies of the parameters ``own`` (sharded: a collective every rank runs in the
        same order); ``keep``: held for ``take`` (rank 0 of a sharded model)."""
        state = {n: full(p).detach().cpu().clone() for n, p in own.items()}
        if keep:  # what save() on rank 0 writes, while no parameter is written
            self._held = (versions(own.values()), state)
        return state

    def take(self, params) -> dict[str, torch.Tensor]:
        held, self._held = self._held, None
        if held is None or held[0] != versions(params):
            raise RuntimeError("model.fsdp: save() writes the state gathered by trainable_state(), which every "
                               "rank must call after the last update (unigrpo.utils.checkpoint.save_checkpoint does)")
        return held[1]
