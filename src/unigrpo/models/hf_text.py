"""The text phase of an HF adapter: any ``transformers`` causal LM as the reasoning policy.

A building block of ``model.kind: hf`` (the diffusers half and the adapter class come with it): it
implements the text methods of ``UnifiedModel`` for a causal LM and its tokenizer, so that the
same LM can reason and then (shared mode) condition the image transformer on its hidden states.

- **Prompts** go through the tokenizer's chat template (``add_generation_prompt``) when it has one,
  and are LEFT-padded: every row's next token is at the same column.
- **Positions** are ``cumsum(mask) - 1`` everywhere (the prefill, every decode step, the
  teacher-forced pass), the convention of ``generate()``; passing them explicitly keeps rollout and
  training identical for padded rows.
- **Sampling** is our own KV-cache loop, because ``generate()`` takes no ``torch.Generator``: each
  group draws from its own seeded generator, so the reasoning does not depend on the batching.
  ``generator`` may also be one generator per row: the rows of several groups then decode in ONE
  loop (one model call per token for all of them, instead of one loop per group), each
  contiguous run of rows sharing a generator drawing exactly the calls its own loop would.
  Rows stop at any of ``stop_ids`` independently (the stop token is kept: it is an action).
  With ``fixed_steps`` (a sharded LM, whose every forward is a collective) every call runs all
  ``max_new_tokens`` decode forwards whatever the rows do, and the result is cut back to the steps
  the early-stopping loop takes: the same tokens, on every number of ranks.
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

from unigrpo.models.protocol import TokenBatch
from unigrpo.models.tiny import sample_top_p

__all__ = ["CausalLMReasoner", "LMContext", "sample_rows"]


@dataclass
class LMContext:
    """What the image side reads: the chosen hidden states [B, L, D] (layers concatenated on D),
    the token mask [B, L] and the response mask [B, L] (to drop or keep template / pad tokens)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    response_mask: torch.Tensor


def sample_rows(logits: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """``sample_top_p`` with one generator (or None) for all rows, or a sequence of one generator
    per row: each contiguous run of rows sharing a generator object is one draw. [B, V] -> [B]."""
    if generator is None or isinstance(generator, torch.Generator):
        return sample_top_p(logits, top_p, generator)
    if len(generator) != logits.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {logits.shape[0]} rows")
    toks, start = [], 0
    for end in range(1, len(generator) + 1):
        if end == len(generator) or generator[end] is not generator[start]:
            toks.append(sample_top_p(logits[start:end], top_p, generator[start]))
            start = end
    return torch.cat(toks)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1``, clamped at 0 for the left padding (masked anyway). [B, L] long."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


class CausalLMReasoner:
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

    def encode_prompts(self, prompts: list[str]) -> TokenBatch:
        rows = [self.tokenizer(self._text(p), add_special_tokens=False)["input_ids"] for p in prompts]
        return TokenBatch.left_padded(rows, self.pad_id, self.device)

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
        out = self.lm(input_ids=ids, attention_mask=mask.long(), position_ids=pos, use_cache=True,
                      **{self.cache_arg: cache})
        return out.logits[:, -1].float(), getattr(out, self.cache_arg)

    @torch.no_grad()
    def sample_reasoning(self, prompts: TokenBatch, *, max_new_tokens: int, temperature: float = 1.0,
                         top_p: float = 1.0, generator: torch.Generator | list[torch.Generator] | None = None,
                         return_logprobs: bool = False):
        """Seeded KV-cache sampling; rows stop at a stop id independently (module docstring).
        ``generator``: one for the batch, or one per row (:func:`sample_rows`)."""
        from transformers import DynamicCache

        ids, mask = prompts.ids, prompts.mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        stop = torch.tensor(self.stop_ids, device=ids.device)
        new_ids, new_mask, new_logp = [], [], []
        logits, cache = self._step(ids, mask, positions(mask), DynamicCache())
        key_mask, pos = mask, positions(mask)[:, -1:]
        n_steps = None  # the step after which every row has finished
        for i in range(max_new_tokens):
            logits = logits / temperature
            tok = sample_rows(logits, top_p, generator)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            if return_logprobs:  # of the temperature-scaled distribution, as forward_context scores
                new_logp.append(logits.log_softmax(-1).gather(1, tok[:, None])[:, 0] * ~done)
            new_ids.append(tok)
            new_mask.append(~done)
            done = done | torch.isin(tok, stop)
            if n_steps is None and bool(done.all()):
                n_steps = i + 1
                if not self.fixed_steps:
                    break
            key_mask = torch.cat([key_mask, new_mask[-1][:, None]], 1)  # the token fed now is real iff sampled live
            pos = pos + new_mask[-1][:, None].long()  # finished rows keep their position (masked)
            logits, cache = self._step(tok[:, None], key_mask, pos, cache)
        new_ids, new_mask, new_logp = new_ids[:n_steps], new_mask[:n_steps], new_logp[:n_steps]
        return prompts.with_sampled(new_ids, new_mask, new_logp if return_logprobs else None)

    def with_response(self, prompts: TokenBatch, responses: list[str]) -> TokenBatch:
        """Append given response texts (+ ``stop_ids[0]``, by default the EOS) to prompts, as if sampled."""
        rows = [self.tokenizer(r, add_special_tokens=False)["input_ids"] + [self.stop_ids[0]] for r in responses]
        return prompts.with_responses(rows, self.pad_id)

    def decode_text(self, tokens: TokenBatch) -> list[str]:
        return [self.tokenizer.decode([i for i, keep in zip(ids, m) if keep], skip_special_tokens=False)
                for ids, m in zip(tokens.ids.tolist(), tokens.response_mask.tolist())]

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, LMContext]:
        """One teacher-forced pass -> (logp [B, L] of response tokens, zero elsewhere; context)."""
        out = self.lm(input_ids=tokens.ids, attention_mask=tokens.mask.long(), position_ids=positions(tokens.mask),
                      output_hidden_states=True, use_cache=False)
        # token i is predicted from position i - 1; float32 log-softmax of temperature-scaled logits
        logits = out.logits[:, :-1].float() / temperature
        logp_next = torch.gather(logits.log_softmax(-1), 2, tokens.ids[:, 1:, None])[..., 0]
        logp = torch.nn.functional.pad(logp_next, (1, 0)) * tokens.response_mask
        hidden = torch.cat([out.hidden_states[k] for k in self.hidden_layers], -1)
        return logp, LMContext(hidden, tokens.mask, tokens.response_mask)

    @staticmethod
    def detach_context(ctx: LMContext) -> LMContext:
        return LMContext(ctx.hidden.detach(), ctx.mask, ctx.response_mask)
