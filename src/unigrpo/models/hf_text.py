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
- **The decode step** runs on transformers' ``DynamicCache`` (its keys grow by a ``cat`` per step),
  or with ``static_cache`` on a preallocated :class:`StaticKV`: the prefill's keys and values
  copied into buffers of a fixed capacity (grown by ``CACHE_CHUNK`` columns when a row needs
  more), written in place, and the attention mask handed to the model ready-made (the real keys so
  far, the unwritten columns masked), so every step between growths has the same shapes and
  ``compile`` can ``torch.compile`` it (opt-in: compiling takes seconds to minutes before the
  first step). The static step computes the same logits up to float rounding (attention over
  masked columns); tested against the dynamic one.
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
import torch.nn.functional as F

from unigrpo.models.base import TextSide
from unigrpo.models.decode import response_logprobs, target_logprobs
from unigrpo.models.protocol import TokenBatch

__all__ = ["CACHE_CHUNK", "CausalLMReasoner", "LMContext", "StaticKV", "packed_rows", "positions",
           "unpacked_logprobs"]

CACHE_CHUNK = 64  # a static cache's capacity is a multiple of this: few distinct shapes to compile


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


class StaticKV:
    """A preallocated KV cache: per layer, keys and values [B, H, C, D] of capacity C (a multiple of
    ``CACHE_CHUNK``) and ``at``, the column the next token writes. That column is the same for every
    row (prompts are left-padded and every row takes one column per step, a finished row too), so
    the step writes with ``index_copy_`` at a tensor index: no shape changes between growths. The
    duck type of transformers' ``Cache`` that an attention layer calls (``update``)."""

    def __init__(self, cache):
        """From the prefill's ``DynamicCache`` (transformers 5: ``cache.layers``), written up to
        its width W; capacity: W + 1 rounded up to ``CACHE_CHUNK``."""
        width = cache.layers[0].keys.shape[2]
        pad = -(width + 1) % CACHE_CHUNK + 1  # room for at least the first decoded token
        self.keys = [F.pad(layer.keys, (0, 0, 0, pad)) for layer in cache.layers]
        self.values = [F.pad(layer.values, (0, 0, 0, pad)) for layer in cache.layers]
        self.at = torch.full((1,), width, dtype=torch.long, device=self.keys[0].device)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, width: int) -> None:
        """Room for ``width`` columns: grow by ``CACHE_CHUNK`` columns (zeros) when short."""
        if width > self.capacity:
            pad = -width % CACHE_CHUNK
            self.keys = [F.pad(k, (0, 0, 0, width + pad - k.shape[2])) for k in self.keys]
            self.values = [F.pad(v, (0, 0, 0, width + pad - v.shape[2])) for v in self.values]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this step's keys / values [B, H, 1, D] at column ``at``; -> the whole buffers."""
        self.keys[layer_idx].index_copy_(2, self.at, key)
        self.values[layer_idx].index_copy_(2, self.at, value)
        return self.keys[layer_idx], self.values[layer_idx]


class CausalLMReasoner(TextSide):
    """Text methods of the protocol for a causal LM (``lm``) and its tokenizer (module docstring)."""

    def __init__(self, lm, tokenizer, *, hidden_layers: tuple[int, ...] = (-1,), stop_ids: tuple[int, ...] | None = None,
                 system_prompt: str | None = None, template_kwargs: dict | None = None, static_cache: bool = False,
                 compile: bool = False):
        self.lm, self.tokenizer = lm, tokenizer
        self.template_kwargs = dict(template_kwargs or {})  # extra chat-template variables (enable_thinking=...)
        self.hidden_layers, self.system_prompt = tuple(hidden_layers), system_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (tokenizer.eos_token_id,)
        # transformers 5 names the cache argument `cache`; 4.x named it `past_key_values`
        self.cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self.fixed_steps = False  # True: never stop decoding early (module docstring)
        self.configure_decode(static_cache=static_cache, compile=compile)

    def configure_decode(self, *, token_sampler: str = "multinomial", static_cache: bool = False,
                         compile: bool = False) -> None:
        """``TextSide.configure_decode``, with the static cache (module docstring) and, with
        ``compile``, its ``torch.compile``d step (which needs the static cache: it turns it on)."""
        TextSide.configure_decode(self, token_sampler=token_sampler)
        if static_cache or compile:
            kinds = set(self.lm.config.get_text_config().layer_types or ["full_attention"])
            if kinds != {"full_attention"}:  # a sliding window needs its own mask; the static step builds one
                raise ValueError(f"text.static_cache: the LM has {sorted(kinds)} attention layers; the static decode "
                                 "step supports full attention only: set text.static_cache and text.compile to false")
        self.static_cache, self.compile = static_cache or compile, compile
        self._fixed_step = None  # the static step, compiled on first use when ``compile``

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
        """The decode engine's prefill (``models.decode``): logits of each row's next token + cache
        (a ``StaticKV`` of the same keys and values with ``static_cache``)."""
        from transformers import DynamicCache

        logits, cache = self._step(tokens.ids, tokens.mask, positions(tokens.mask), DynamicCache())
        return logits, StaticKV(cache) if self.static_cache else cache

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, cache):
        if not isinstance(cache, StaticKV):
            return self._step(tok[:, None], key_mask, pos[:, None], cache)
        width = key_mask.shape[1]
        cache.reserve(width)  # outside the compiled step: a growth is a new shape
        cache.at.fill_(width - 1)
        keys = F.pad(key_mask, (0, cache.capacity - width))[:, None, None, :]  # [B, 1, 1, C]: the real keys so far
        if self._fixed_step is None:
            if self.compile:
                print("[unigrpo] text.compile: compiling the decode step (seconds to minutes, once per cache size)",
                      flush=True)
            self._fixed_step = torch.compile(self._static_step, dynamic=False) if self.compile else self._static_step
        return self._fixed_step(tok[:, None], keys, pos[:, None], cache), cache

    def _static_step(self, ids: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One token per row [B, 1] at ``pos`` [B, 1], attending to the columns ``keys`` [B, 1, 1, C]
        marks (the mask is given per layer type, so the model builds none). -> float32 logits [B, V]."""
        out = self.lm(input_ids=ids, attention_mask={"full_attention": keys}, position_ids=pos, use_cache=True,
                      **{self.cache_arg: cache})
        return out.logits[:, -1].float()

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, LMContext]:
        """One teacher-forced pass -> (logp [B, L] of response tokens, zero elsewhere; context)."""
        out = self.lm(input_ids=tokens.ids, attention_mask=tokens.mask.long(), position_ids=positions(tokens.mask),
                      output_hidden_states=True, use_cache=False)
        # token i is predicted from position i - 1; float32 log-softmax of temperature-scaled logits
        logits = out.logits[:, :-1].float() / temperature
        logp = response_logprobs(target_logprobs(logits, tokens.ids[:, 1:]), tokens.response_mask)
        hidden = torch.cat([out.hidden_states[k] for k in self.hidden_layers], -1)
        return logp, LMContext(hidden, tokens.mask, tokens.response_mask)
