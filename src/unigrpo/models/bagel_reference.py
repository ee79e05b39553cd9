"""The reference policy of ``model.kind: bagel``: the starting policy without a second model.

LoRA experts are the same modules with their adapters switched off; experts trained in full are
a snapshot of their trainable tensors taken at ``reference()`` time, substituted by name with
``torch.func.functional_call`` (``BagelModel._call``). Memory: one copy of the trainable tensors of
the fully trained experts, nothing for LoRA experts.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from unigrpo.models.bagel import BagelContext, BagelModel
from unigrpo.models.protocol import TokenBatch

__all__ = ["BagelReference"]


class BagelReference:
    """The starting policy: LoRA adapters off, fully trained sides' tensors from a snapshot taken at
    ``reference()`` time (one copy of the trainable tensors, nothing else)."""

    def __init__(self, model: BagelModel):
        self.model = model
        self.snapshot = {n: p.detach().clone() for side, rank in (("text", model.text_rank), ("image", model.image_rank))
                         if rank == 0 for n, p in model.parameter_groups()[side]}

    def _off(self):
        if not (self.model.text_rank or self.model.image_rank):
            return nullcontext()
        from unigrpo.models.hf import adapters_disabled

        return adapters_disabled(self.model.language_model)

    @torch.no_grad()
    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0):
        with self._off():
            return self.model._context(self.snapshot, tokens, temperature)

    @torch.no_grad()
    def null_context(self, batch_size: int) -> BagelContext:
        with self._off():
            return self.model._null(self.snapshot, batch_size)

    @torch.no_grad()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: BagelContext) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        with self._off():
            return self.model._call(self.snapshot, "image", x_t, t, ctx)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot (empty when every side is LoRA: the reference is the frozen base)."""
        return {k: v.cpu().clone() for k, v in self.snapshot.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(self.snapshot.keys() - state.keys()), sorted(state.keys() - self.snapshot.keys())
        if missing or unexpected:
            raise ValueError(f"reference state does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in self.snapshot.items():
            v.copy_(state[k])
