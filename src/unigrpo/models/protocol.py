"""The model protocol shared by the recipe and every adapter (tiny model, HF LM + diffusers, Bagel).

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
``sharded``, ``validate_prompts``. Adapters derive from ``models.base.ModelBase``, which holds the
defaults and the lifecycle every kind shares.

Besides the two phases, a model owns its **lifecycle**, so that the training loop never has to know
what kind of model it trains (docs/design.md):

- ``reference()``: the frozen starting policy: the same model with its LoRA adapters off and a
  snapshot of its other trainable tensors substituted (``base.Reference``; never a second model);
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
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["ReferencePolicy", "TokenBatch", "UnifiedModel"]


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


@runtime_checkable
class ReferencePolicy(Protocol):
    """The frozen starting policy, as the regularisers read it (``UnifiedModel.reference()``)."""

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, Any]:
        """As ``UnifiedModel.forward_context``, under the reference weights (no gradient needed)."""

    def null_context(self, batch_size: int) -> Any:
        """As ``UnifiedModel.null_context``, under the reference weights."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        """As ``UnifiedModel.velocity``, under the reference weights."""

    def combine_guidance(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """The policy's guidance rule."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What must be saved so that a resumed run regularises against the SAME reference (the
        snapshot of the fully trained tensors; nothing for LoRA, whose reference is the frozen base)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any:
        """Restore ``state_dict()``."""


@runtime_checkable
class UnifiedModel(Protocol):
    """What the recipe needs from a reason-then-draw model. Adapters implement exactly this."""

    latent_shape: tuple[int, ...]  # shape of one image latent, e.g. (12, 16, 16)
    pad_id: int
    sees_images: bool  # input images enter the reasoning context (the text can be about them)
    edits: bool  # the denoiser is conditioned on input images' latents
    sharded: bool  # every forward is a collective (FSDP2): every rank runs the same calls

    def encode(self, prompts: list) -> TokenBatch:
        """The input batch of prompts (``tasks.Prompt`` or str): tokens LEFT-padded, no response
        yet, and each prompt's images (a model that does not see images refuses them: never drops)."""

    def validate_prompts(self, texts: list[str]) -> None:
        """Raise ValueError (one line) when the model cannot read a prompt text."""

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

    def timesteps(self, num_steps: int, shift: float | None) -> torch.Tensor:
        """The sampling grid ``[1, ..., 0]`` [num_steps + 1]; ``shift`` None: the model's own."""

    def combine_guidance(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """How CFG combines the conditional and unconditional velocities."""

    def eval_guidance(self, tokens: TokenBatch, ctx: Any, cfg_scale: float):
        """The model's own evaluation guidance ``(x_t, t) -> v``, or None (plain CFG)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent] -> RGB images [B, 3, H, W] in [0, 1]."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images [B, 3, H, W] in [0, 1] -> latents (for supervised flow matching)."""

    # ----------------------------------------------------------------- lifecycle
    def reference(self) -> ReferencePolicy:
        """The frozen starting policy; call before the first update."""

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
