"""The model protocol shared by the recipe and every adapter (tiny model, HF LM + diffusers, Bagel):
the model input ``TokenBatch`` here, the interface ``UnifiedModel`` (``models.base``: every adapter
derives from it; its members and their defaults are documented there).

A unified model is used in two phases of one MDP:

1. **Think**: ``encode`` builds the input batch of a task's prompts (tokens, and the input images
   each prompt refers to), ``sample_reasoning`` extends it with generated reasoning tokens (the
   text engine, ``models.decode``: KV cache, seeded per row).
2. **Draw**: ``forward_context`` runs ONE teacher-forced pass over prompt + reasoning and returns
   the per-token log-probs of the reasoning (the text policy) together with the image context
   (what the image expert reads: hidden states for the tiny model and HF text encoders, a KV cache
   for Bagel). ``velocity(x_t, t, ctx)`` is then called at every denoising step with that context.

Rollout and training call the same ``forward_context`` / ``velocity`` code path (both live in
``unigrpo.rollout``), so the recorded behaviour log-probs and the training log-probs come from
identical computations: the ratio is exactly 1 on the first update (docs/training.md). Token
layout: prompts are LEFT-padded, responses RIGHT-padded, so all rows generate in lockstep;
positions are derived from the mask.

What a model can do beyond that is declared, never probed: ``sees_images``, ``edits``, its own
time grid (``timesteps``), its guidance rule (``combine_guidance``, ``eval_guidance``),
``sharded``, ``validate_prompts``, each with a default in ``UnifiedModel``, which also holds the
lifecycle every kind shares.

Besides the two phases, a model owns its **lifecycle**, so that the training loop never has to know
what kind of model it trains (docs/design.md):

- ``reference()``: the frozen starting policy: the same model with its LoRA adapters off and a
  snapshot of its other trainable tensors substituted (``base.ReferencePolicy``; never a second model);
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
from dataclasses import dataclass

import torch

__all__ = ["TokenBatch"]


@dataclass(frozen=True)
class TokenBatch:
    """The model input of a batch: padded token sequences ``[left-padded prompt | right-padded
    response]`` and the input images each row refers to (any count per row, including none).

    ids:           [B, L] long, pad id where ``mask`` is False
    mask:          [B, L] bool, True on real tokens
    response_mask: [B, L] bool, True on generated (action) tokens; all False before sampling
    images:        [B, N, 3, H, W] float in [0, 1], or None (no row has an image); N = the most
                   images of a row, the others padded with zeros
    image_mask:    [B, N] bool, True on a row's real images (None with ``images``)

    Built by the adapter (``UnifiedModel.encode``), which decides where the images enter its
    context; rows keep their images through ``index`` / ``cat`` / padding / sampling.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    response_mask: torch.Tensor
    images: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def _tokens(self, ids: torch.Tensor, mask: torch.Tensor, response_mask: torch.Tensor) -> TokenBatch:
        """Other tokens, these rows' images."""
        return TokenBatch(ids, mask, response_mask, self.images, self.image_mask)

    def index(self, idx: torch.Tensor | slice) -> TokenBatch:
        """Rows ``idx`` with the SAME padded width (keeps numerics identical to the rollout)."""
        images = None if self.images is None else self.images[idx]
        return TokenBatch(self.ids[idx], self.mask[idx], self.response_mask[idx], images,
                          None if self.image_mask is None else self.image_mask[idx])

    def to(self, device: torch.device | str) -> TokenBatch:
        images = None if self.images is None else self.images.to(device)
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.response_mask.to(device), images,
                          None if self.image_mask is None else self.image_mask.to(device))

    def with_images(self, images: list[torch.Tensor | None]) -> TokenBatch:
        """These tokens with row ``i``'s images ``images[i]`` ([n_i, 3, H, W], or None = none);
        no image in any row: ``images`` stays None."""
        if len(images) != len(self):
            raise ValueError(f"{len(images)} image lists for {len(self)} rows")
        rows = list(images)
        n = max((x.shape[0] for x in rows if x is not None), default=0)
        if n == 0:
            return self._tokens(self.ids, self.mask, self.response_mask)
        like = next(x for x in rows if x is not None and x.shape[0])
        out = like.new_zeros(len(self), n, *like.shape[1:])
        keep = torch.zeros(len(self), n, dtype=torch.bool)
        for i, x in enumerate(rows):
            if x is not None and x.shape[0]:
                if x.shape[1:] != like.shape[1:]:
                    raise ValueError(f"row {i}: image shape {tuple(x.shape[1:])}, row images must all be "
                                     f"{tuple(like.shape[1:])} (resize them to the model's input size)")
                out[i, :x.shape[0]], keep[i, :x.shape[0]] = x, True
        dev = self.ids.device
        return TokenBatch(self.ids, self.mask, self.response_mask, out.to(dev), keep.to(dev))

    def row_images(self, i: int) -> torch.Tensor | None:
        """Row ``i``'s real images [n_i, 3, H, W] (None: it has none)."""
        if self.images is None or not bool(self.image_mask[i].any()):
            return None
        return self.images[i][self.image_mask[i]]

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

    def left_padded_to(self, width: int, pad_id: int) -> TokenBatch:
        """These prompts (no response yet) LEFT-padded to ``width`` columns."""
        extra = width - self.ids.shape[1]
        if extra < 0 or self.response_mask.any():
            raise ValueError(f"cannot left-pad width {self.ids.shape[1]} to {width} (or a batch with responses)")

        def pad(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (extra, 0), value=value)

        return self._tokens(pad(self.ids, pad_id), pad(self.mask, False), pad(self.response_mask, False))

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
        return self._tokens(torch.cat([self.ids, resp], 1), torch.cat([self.mask, rmask], 1),
                            torch.cat([torch.zeros_like(self.mask), rmask], 1))

    def with_sampled(self, new_ids: list[torch.Tensor], new_mask: list[torch.Tensor],
                     new_logp: list[torch.Tensor] | None = None):
        """These prompts followed by a decode loop's tokens (one [B] tensor per step, with the [B]
        mask of rows still live); with ``new_logp`` also the [B, L] log-probs (0 on the prompt)."""
        resp_ids, resp_mask = torch.stack(new_ids, 1), torch.stack(new_mask, 1)
        out = self._tokens(torch.cat([self.ids, resp_ids], 1), torch.cat([self.mask, resp_mask], 1),
                           torch.cat([torch.zeros_like(self.mask), resp_mask], 1))
        if new_logp is None:
            return out
        return out, torch.cat([torch.zeros(self.mask.shape, device=self.ids.device), torch.stack(new_logp, 1)], 1)

    def padded(self, width: int, pad_id: int) -> TokenBatch:
        """Right-padded to ``width`` columns (masked; positions come from the mask, so values are
        unchanged up to numerics: rollout and training always use the same width)."""
        extra = width - self.ids.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad width {self.ids.shape[1]} down to {width}")

        def pad(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, extra), value=value)

        return self._tokens(pad(self.ids, pad_id), pad(self.mask, False), pad(self.response_mask, False))

    @staticmethod
    def cat(batches: Iterable[TokenBatch], pad_id: int) -> TokenBatch:
        """Concatenate batches whose widths (tokens, images per row) may differ: the narrower ones
        are right-padded."""
        batches = list(batches)
        width = max(b.ids.shape[1] for b in batches)
        same = [b.padded(width, pad_id) for b in batches]
        out = TokenBatch(torch.cat([b.ids for b in same]), torch.cat([b.mask for b in same]),
                         torch.cat([b.response_mask for b in same]))
        if all(b.images is None for b in batches):
            return out
        return out.with_images([b.row_images(i) for b in batches for i in range(len(b))])
