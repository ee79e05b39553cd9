"""The model protocol shared by the recipe and every adapter (tiny model, HF LM + diffusers, Bagel).

A unified model is used in two phases of one MDP:

1. **Think**: ``sample_reasoning`` extends prompt tokens with generated reasoning tokens (KV cache).
2. **Draw**: ``forward_context`` runs ONE teacher-forced pass over prompt + reasoning and returns
   the per-token log-probs of the reasoning (the text policy) together with the image context
   (what the image expert reads: hidden states for the tiny model and HF text encoders, a KV cache
   for Bagel). ``velocity(x_t, t, ctx)`` is then called at every denoising step with that context.

Rollout and training call the same ``forward_context`` / ``velocity`` code path (both live in
``unigrpo.rollout``), so the recorded behaviour log-probs and the training log-probs come from
identical computations: the ratio is exactly 1 on the first update (docs/training.md). Token
layout: prompts are LEFT-padded, responses RIGHT-padded, so all rows generate in lockstep;
positions are derived from the mask.

Besides the two phases, a model owns its **lifecycle**, so that the training loop never has to know
what kind of model it trains (docs/design.md):

- ``reference()``: the frozen starting policy (a frozen copy, LoRA adapters disabled, or a weight
  snapshot: the adapter chooses; the loop never deep-copies a model);
- ``parameter_groups()``: the trainable parameters of the text and the image expert, by name;
- ``trainable_state()`` / ``load_trainable_state()``: what a checkpoint must hold to resume (written
  as safetensors); ``save()``: a standalone file ``build_model`` loads (``model.checkpoint``);
- ``wrap()`` / ``reduce_gradients()``: data parallelism (DDP semantics; a sharded adapter, e.g.
  ``model.kind: hf`` with ``model.fsdp``, shards in ``wrap``, makes ``reduce_gradients`` a no-op
  and sets ``sharded = True``: its forwards are collectives, so the recipe then runs the
  evaluation on every rank too). Every rank calls every lifecycle method but ``save`` (rank 0),
  in the same order, so a sharded adapter can gather inside them (``save_checkpoint`` calls
  ``trainable_state`` on every rank right before rank 0's ``save``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["ReferencePolicy", "TokenBatch", "UnifiedModel"]


@dataclass(frozen=True)
class TokenBatch:
    """Padded token sequences of a batch: ``[left-padded prompt | right-padded response]``.

    ids:           [B, L] long, pad id where ``mask`` is False
    mask:          [B, L] bool, True on real tokens
    response_mask: [B, L] bool, True on generated (action) tokens; all False before sampling
    """

    ids: torch.Tensor
    mask: torch.Tensor
    response_mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def index(self, idx: torch.Tensor | slice) -> TokenBatch:
        """Rows ``idx`` with the SAME padded width (keeps numerics identical to the rollout)."""
        return TokenBatch(self.ids[idx], self.mask[idx], self.response_mask[idx])

    def repeat_interleave(self, n: int) -> TokenBatch:
        """Each row repeated ``n`` times consecutively: [P] -> [P * n] (prompt -> group)."""
        return TokenBatch(*(x.repeat_interleave(n, dim=0) for x in (self.ids, self.mask, self.response_mask)))

    def to(self, device: torch.device | str) -> TokenBatch:
        return replace(self, ids=self.ids.to(device), mask=self.mask.to(device),
                       response_mask=self.response_mask.to(device))

    @staticmethod
    def left_padded(rows: list[list[int]], pad_id: int, device: torch.device | str) -> TokenBatch:
        """Prompts from token id lists, LEFT-padded: every row's last prompt token is aligned."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = True
        return TokenBatch(ids.to(device), mask.to(device), torch.zeros_like(mask).to(device))

    def with_responses(self, rows: list[list[int]], pad_id: int) -> TokenBatch:
        """These prompts followed by the responses ``rows`` (token id lists, RIGHT-padded), marked
        as responses: teacher forcing of given texts."""
        width = max(len(r) for r in rows)
        resp = torch.full((len(rows), width), pad_id, dtype=torch.long)
        rmask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            resp[i, :len(r)] = torch.tensor(r)
            rmask[i, :len(r)] = True
        resp, rmask = resp.to(self.ids.device), rmask.to(self.ids.device)
        return TokenBatch(torch.cat([self.ids, resp], 1), torch.cat([self.mask, rmask], 1),
                          torch.cat([torch.zeros_like(self.mask), rmask], 1))

    def with_sampled(self, new_ids: list[torch.Tensor], new_mask: list[torch.Tensor],
                     new_logp: list[torch.Tensor] | None = None):
        """These prompts followed by a decode loop's tokens (one [B] tensor per step, with the [B]
        mask of rows still live); with ``new_logp`` also the [B, L] log-probs (0 on the prompt)."""
        resp_ids, resp_mask = torch.stack(new_ids, 1), torch.stack(new_mask, 1)
        out = TokenBatch(torch.cat([self.ids, resp_ids], 1), torch.cat([self.mask, resp_mask], 1),
                         torch.cat([torch.zeros_like(self.mask), resp_mask], 1))
        if new_logp is None:
            return out
        return out, torch.cat([torch.zeros(self.mask.shape, device=self.ids.device), torch.stack(new_logp, 1)], 1)

    @staticmethod
    def cat(batches: Iterable[TokenBatch], pad_id: int) -> TokenBatch:
        """Concatenate batches whose widths may differ (right-pads the narrower ones)."""
        batches = list(batches)
        width = max(b.ids.shape[1] for b in batches)

        def pad(x: torch.Tensor, value: int | bool) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return TokenBatch(torch.cat([pad(b.ids, pad_id) for b in batches]),
                          torch.cat([pad(b.mask, False) for b in batches]),
                          torch.cat([pad(b.response_mask, False) for b in batches]))


@runtime_checkable
class ReferencePolicy(Protocol):
    """The frozen starting policy, as the regularisers read it (``UnifiedModel.reference()``)."""

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, Any]:
        """As ``UnifiedModel.forward_context``, under the reference weights (no gradient needed)."""

    def null_context(self, batch_size: int) -> Any:
        """As ``UnifiedModel.null_context``, under the reference weights."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        """As ``UnifiedModel.velocity``, under the reference weights."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What must be saved so that a resumed run regularises against the SAME reference (the whole
        frozen copy for the tiny model; nothing for LoRA, whose reference is the frozen base)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any:
        """Restore ``state_dict()``."""


@runtime_checkable
class UnifiedModel(Protocol):
    """What the recipe needs from a reason-then-draw model. Adapters implement exactly this."""

    latent_shape: tuple[int, ...]  # shape of one image latent, e.g. (12, 16, 16)
    pad_id: int

    def encode_prompts(self, prompts: list[str]) -> TokenBatch:
        """Tokenise prompts (left-padded, no response yet)."""

    def sample_reasoning(self, prompts: TokenBatch, *, max_new_tokens: int, temperature: float = 1.0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         return_logprobs: bool = False) -> TokenBatch | tuple[TokenBatch, torch.Tensor]:
        """Sample reasoning tokens after each prompt (KV cache); returns prompt + response. With
        ``return_logprobs`` also the decode-time log-probs [B, L] of the sampled tokens under the
        temperature-scaled distribution (not renormalised to the top-p nucleus; 0 outside the
        response): the conformance suite checks they equal ``forward_context``'s (training never
        uses them: its behaviour log-probs come from ``forward_context``)."""

    def with_response(self, prompts: TokenBatch, responses: list[str]) -> TokenBatch:
        """Append given response texts to prompts as if sampled (teacher forcing, SFT, evaluation)."""

    def decode_text(self, tokens: TokenBatch) -> list[str]:
        """The generated response of each row as text."""

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, Any]:
        """One teacher-forced pass: (log-probs [B, L] of ``tokens.ids`` under temperature-scaled
        logits, zero outside ``response_mask``; image context for ``velocity``)."""

    def null_context(self, batch_size: int) -> Any:
        """The unconditional context (no prompt, no reasoning) for classifier-free guidance."""

    def detach_context(self, ctx: Any) -> Any:
        """The context with gradients to the text expert cut."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Predicted velocity ``v = eps - x0`` at state ``x_t`` [B, *latent], flow time ``t`` [B]
        (one time per row; a 0-dim ``t`` is broadcast to all rows)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent] -> RGB images [B, 3, H, W] in [0, 1]."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images [B, 3, H, W] in [0, 1] -> latents (for supervised flow matching)."""

    # ----------------------------------------------------------------- lifecycle
    def reference(self) -> ReferencePolicy:
        """The frozen starting policy; call before the first update (the adapter decides how)."""

    def parameter_groups(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        """``{"text": [(name, parameter), ...], "image": [...]}``: what each expert may train.
        Names are those of ``trainable_state`` (``optim.image_params`` matches them)."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every parameter training can change, by name, as full CPU tensors (a sharded adapter
        gathers here: every rank calls it)."""

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``trainable_state()`` (missing or unexpected names are an error, raised before
        anything is copied)."""

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """A standalone checkpoint that ``build_model`` loads via ``model.checkpoint`` (rank 0)."""

    def wrap(self, ranks: Any) -> None:
        """Prepare for data parallelism over ``ranks`` (``unigrpo.utils.dist.Dist``); no-op on 1 rank."""

    def reduce_gradients(self, params: list[torch.nn.Parameter], ranks: Any) -> None:
        """Average the gradients of ``params`` over ranks (after the last micro-batch of an update)."""

    def named_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """All parameters by name (``torch.nn.Module``)."""
