"""The text phase of an HF adapter: any ``transformers`` causal LM as the reasoning policy.

A building block of ``model.kind: hf`` (the diffusers half and the adapter class come with it): it
implements the text methods of ``UnifiedModel`` for a causal LM and its tokenizer, so that the
same LM can reason and then (shared mode) condition the image transformer on its hidden states.

- **Prompts** go through the tokenizer's chat template (``add_generation_prompt``) when it has one,
  and are LEFT-padded: every row's next token is at the same column.
- **Positions** are ``cumsum(mask) - 1`` everywhere (the prefill, every decode step, the
  teacher-forced pass), the convention of ``generate()``; passing them explicitly keeps rollout and
  training identical for padded rows.
- **Sampling** is the text engine's seeded KV-cache loop (``models.decode``; ``generate()`` takes
  no ``torch.Generator``): this class supplies its ``prefill`` / ``decode_step`` contract. Rows
  stop at any of ``stop_ids`` independently (the stop token is kept: it is an action).
- **Scoring** (``forward_context``) is ONE teacher-forced pass with the same mask and positions;
  it returns the response log-probs under temperature-scaled logits (float32 log-softmax) and the
  hidden states of ``hidden_layers`` (index into ``hidden_states``: 0 = embeddings, -1 = the last
  layer's output; in transformers 5 that last entry is after the final norm).

Reference: transformers' ``GenerationMixin`` (position ids from the mask, the cache protocol).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from unigrpo.models.base import TextSide
from unigrpo.models.decode import response_logprobs, target_logprobs
from unigrpo.models.protocol import TokenBatch

__all__ = ["CausalLMReasoner", "LMContext", "packed_rows", "positions", "unpacked_logprobs"]


@dataclass
class LMContext:
    """What the image side reads: the chosen hidden states [B, L, D] (layers concatenated on D),
    the token mask [B, L] and the response mask [B, L] (to drop or keep template / pad tokens)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    response_mask: torch.Tensor


def positions(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1``, clamped at 0 for the left padding (masked anyway). [B, L] long."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def packed_rows(tokens: TokenBatch, min_width: int, pad_id: int, left_to: int = 0):
    """A pipeline's padded layout of ``tokens``: each row's real tokens in order, then pads, at
    least ``min_width`` columns. ``left_to`` > 0 is a LEFT-padding tokenizer's ``padding="max_length"``
    at ``left_to``: a row of n < left_to tokens starts after ``left_to - n`` pads (a longer row is
    not padded: the tokenizer truncates the pipeline's copy, on the right), and trailing pads make
    the rows one width (causal: they change no earlier position). Returns (ids [B, W], real [B, W]
    mask, src [B, W]: the caller's column of each packed column)."""
    width = tokens.ids.shape[1]
    n = tokens.mask.sum(1)
    before = (left_to - n).clamp(min=0)  # [B] pads before each row's first real token
    packed_w = max(min_width, int((n + before).max()))
    order = torch.sort((~tokens.mask).long(), dim=1, stable=True).indices  # [B, width]: real columns first
    k = torch.arange(packed_w, device=tokens.ids.device)[None] - before[:, None]  # [B, packed_w]: real index
    real = (k >= 0) & (k < n[:, None])
    src = order.gather(1, k.clamp(0, width - 1))  # outside ``real``: any valid column (never read)
    return torch.where(real, tokens.ids.gather(1, src), torch.full_like(src, pad_id)), real, src


def unpacked_logprobs(logits: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, src: torch.Tensor,
                      tokens: TokenBatch) -> torch.Tensor:
    """The teacher-forced log-probs of the packed ``ids`` (``logits`` [B, W - 1, V]: float32,
    temperature applied) back in ``tokens``' layout [B, L], zero outside its response."""
    logp_packed = response_logprobs(target_logprobs(logits, ids[:, 1:]), real)
    b, width = tokens.ids.shape
    logp = torch.zeros(b, width, dtype=logp_packed.dtype, device=ids.device)  # packed column j of row i is src[i, j]
    return logp.scatter_add(1, src, logp_packed * real) * tokens.response_mask


class CausalLMReasoner(TextSide):
    """Text methods of the protocol for a causal LM (``lm``) and its tokenizer (module docstring)."""

    def __init__(self, lm, tokenizer, *, hidden_layers: tuple[int, ...] = (-1,), stop_ids: tuple[int, ...] | None = None,
                 system_prompt: str | None = None, template_kwargs: dict | None = None):
        self.lm, self.tokenizer = lm, tokenizer
        self.template_kwargs = dict(template_kwargs or {})  # extra chat-template variables (enable_thinking=...)
        self.hidden_layers, self.system_prompt = tuple(hidden_layers), system_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (tokenizer.eos_token_id,)
        # transformers 5 names the cache argument `cache`; 4.x named it `past_key_values`
        self.cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self.fixed_steps = False  # True: never stop decoding early (module docstring)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def _text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            return prompt
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        return self.tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, **self.template_kwargs)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(self._text(prompt), add_special_tokens=False)["input_ids"]

    def response_ids(self, text: str) -> list[int]:
        """A given response + ``stop_ids[0]`` (by default the EOS), as if sampled."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop_ids[0]]

    def token_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
        out = self.lm(input_ids=ids, attention_mask=mask.long(), position_ids=pos, use_cache=True,
                      **{self.cache_arg: cache})
        return out.logits[:, -1].float(), getattr(out, self.cache_arg)

    def prefill(self, tokens: TokenBatch):
        """The decode engine's prefill (``models.decode``): logits of each row's next token + cache."""
        from transformers import DynamicCache

        return self._step(tokens.ids, tokens.mask, positions(tokens.mask), DynamicCache())

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, cache):
        return self._step(tok[:, None], key_mask, pos[:, None], cache)

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, LMContext]:
        """One teacher-forced pass -> (logp [B, L] of response tokens, zero elsewhere; context)."""
        out = self.lm(input_ids=tokens.ids, attention_mask=tokens.mask.long(), position_ids=positions(tokens.mask),
                      output_hidden_states=True, use_cache=False)
        # token i is predicted from position i - 1; float32 log-softmax of temperature-scaled logits
        logits = out.logits[:, :-1].float() / temperature
        logp = response_logprobs(target_logprobs(logits, tokens.ids[:, 1:]), tokens.response_mask)
        hidden = torch.cat([out.hidden_states[k] for k in self.hidden_layers], -1)
        return logp, LMContext(hidden, tokens.mask, tokens.response_mask)
